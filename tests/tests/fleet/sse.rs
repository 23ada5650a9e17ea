//! The Anthropic streams of scenarios 01–08, served over real HTTP by the
//! fake and read by the product's client and state machine, give the text
//! and usage the fixture holds and the cost the scenario expects. The
//! expected text and usage are read from the fixture here, independently of
//! the product's parser.

use anyhow::{bail, Context as _, Result};
use fleet_tests::fake_anthropic::{FakeAnthropic, ScriptedResponse};
use fleet_tests::harness::{fixture, fixtures_dir, init_logs, within};
use futures_util::StreamExt;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use shared::anthropic::{AnthropicClient, MessageState};
use shared::pricing::{PriceTable, TokenCounts};
use shared::secret::Secret;
use std::collections::BTreeMap;
use std::time::Duration;

/// What a scenario step expects of a call: provider cost and user charge.
#[derive(Debug, Clone, PartialEq)]
struct ExpectedCost {
    provider: Decimal,
    user: Decimal,
}

/// Expected costs by SSE fixture, from every step of scenarios `0*.toml`
/// that answers with exactly one stream.
fn scenario_costs() -> Result<BTreeMap<String, ExpectedCost>> {
    let mut costs = BTreeMap::new();
    for entry in std::fs::read_dir(fixtures_dir().join("scenarios"))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
        if !(name.starts_with('0') && name.ends_with(".toml")) {
            continue;
        }
        let scenario: toml::Value =
            toml::from_str(&std::fs::read_to_string(&path)?).with_context(|| format!("parsing {name}"))?;
        let steps = scenario.get("step").and_then(toml::Value::as_array).cloned().unwrap_or_default();
        for step in steps {
            let Some([answer]) = step.get("anthropic").and_then(toml::Value::as_array).map(Vec::as_slice) else {
                continue;
            };
            let (Some(sse), Some(expect)) = (answer.get("sse").and_then(toml::Value::as_str), step.get("expect"))
            else {
                continue;
            };
            let amount = |key: &str| -> Result<Decimal> {
                let text = expect
                    .get(key)
                    .and_then(toml::Value::as_str)
                    .with_context(|| format!("{name}: {sse} has no {key}"))?;
                Ok(text.parse()?)
            };
            let cost = ExpectedCost { provider: amount("provider_cost_usd")?, user: amount("user_charge_usd")? };
            if let Some(earlier) = costs.insert(sse.trim_start_matches("anthropic/").to_owned(), cost.clone()) {
                assert_eq!(earlier, cost, "{sse} is expected to cost differently in two scenarios");
            }
        }
    }
    Ok(costs)
}

/// The `data:` JSON of every event of an SSE body.
fn events_of(sse: &str) -> Result<Vec<Value>> {
    sse.lines().filter_map(|l| l.strip_prefix("data:")).map(|d| Ok(serde_json::from_str(d.trim())?)).collect()
}

/// The text of the stream: every `text_delta`, in order.
fn expected_text(events: &[Value]) -> String {
    events
        .iter()
        .filter(|e| e["type"] == "content_block_delta" && e["delta"]["type"] == "text_delta")
        .filter_map(|e| e["delta"]["text"].as_str())
        .collect()
}

/// The final usage by price class: `message_start`'s usage, each field
/// replaced by the last `message_delta` that reports it (fixtures README).
fn expected_tokens(events: &[Value]) -> Result<(String, TokenCounts)> {
    let start = events.iter().find(|e| e["type"] == "message_start").context("no message_start")?;
    let model = start["message"]["model"].as_str().context("no model")?.to_owned();
    let mut usage = start["message"]["usage"].as_object().cloned().unwrap_or_default();
    for delta in events.iter().filter(|e| e["type"] == "message_delta") {
        if let Some(later) = delta["usage"].as_object() {
            usage.extend(later.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), v.clone())));
        }
    }
    let n = |v: Option<&Value>| v.and_then(Value::as_u64).unwrap_or(0);
    let total_writes = n(usage.get("cache_creation_input_tokens"));
    let (five_min, one_hour) = match usage.get("cache_creation") {
        Some(split) => (n(split.get("ephemeral_5m_input_tokens")), n(split.get("ephemeral_1h_input_tokens"))),
        None => (total_writes, 0),
    };
    if five_min + one_hour != total_writes {
        bail!("fixture's cache write split {five_min} + {one_hour} does not add up to {total_writes}");
    }
    let tokens = TokenCounts {
        input: n(usage.get("input_tokens")),
        output: n(usage.get("output_tokens")),
        cache_write_5m: five_min,
        cache_write_1h: one_hour,
        cache_read: n(usage.get("cache_read_input_tokens")),
        web_search_requests: usage.get("server_tool_use").map_or(0, |s| n(s.get("web_search_requests"))),
    };
    Ok((model, tokens))
}

/// Streams `name` through the fake and the product's client, and checks the
/// text, the usage and the cost against the fixture and the scenario.
async fn check_stream(name: &str) -> Result<()> {
    init_logs();
    let costs = scenario_costs()?;
    let expected_cost = costs.get(name).with_context(|| format!("no scenario 01–08 step answers with {name}"))?;
    let sse = std::fs::read_to_string(fixture(&format!("anthropic/{name}")))?;
    let events = events_of(&sse)?;
    let (model, tokens) = expected_tokens(&events)?;

    let fake = FakeAnthropic::start("127.0.0.1:0".parse()?).await?;
    fake.push([ScriptedResponse::from_sse(sse.clone().into_bytes())]);
    fake.set_default(None);
    let client = AnthropicClient::new(&fake.base_url(), Secret::new("sk-ant-test-key"), Duration::from_secs(5))?;
    let request = json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "messages": [{ "role": "user", "content": "hello" }],
        "stream": true,
    });
    let mut stream = within("opening the stream", client.stream(&request)).await??;
    let mut state = MessageState::default();
    while let Some(event) = within("the next event", stream.events.next()).await? {
        state.apply(event?);
    }

    assert!(state.stopped, "{name}: the stream reached message_stop");
    assert_eq!(state.error, None);
    assert_eq!(fake.call_count(), 1);
    assert_eq!(state.text(), expected_text(&events), "{name}: final text");
    assert_eq!(state.model.as_deref(), Some(model.as_str()));
    assert_eq!(state.usage.token_counts(), tokens, "{name}: final usage");

    let prices = PriceTable::load(&fixture("prices.toml"))?;
    let priced = prices.price_call(&model, chrono::Utc::now().date_naive(), &state.usage.token_counts())?;
    assert_eq!(priced.provider_cost.0, expected_cost.provider, "{name}: provider cost");
    assert_eq!(priced.user_charge.0, expected_cost.user, "{name}: user charge");
    fake.shutdown().await;
    Ok(())
}

#[test]
fn every_stream_of_scenarios_01_to_08_has_an_expected_cost() -> Result<()> {
    let costs = scenario_costs()?;
    for name in [
        "text_capital.sse",
        "text_long_markdown.sse",
        "cache_write_1h.sse",
        "cache_read_and_5m_write.sse",
        "text_octopus_haiku.sse",
        "text_group_answer.sse",
        "text_emoji_wall.sse",
    ] {
        assert!(costs.contains_key(name), "{name} missing from {costs:?}");
    }
    assert_eq!(costs.len(), 7, "a new stream in scenarios 01–08 needs a test here: {costs:?}");
    Ok(())
}

#[tokio::test]
async fn the_capital_answer_streams_into_its_text_usage_and_cost() -> Result<()> {
    check_stream("text_capital.sse").await
}

#[tokio::test]
async fn the_long_markdown_answer_streams_into_its_text_usage_and_cost() -> Result<()> {
    check_stream("text_long_markdown.sse").await
}

#[tokio::test]
async fn a_one_hour_cache_write_streams_into_its_text_usage_and_cost() -> Result<()> {
    check_stream("cache_write_1h.sse").await
}

#[tokio::test]
async fn a_cache_read_with_a_five_minute_write_is_not_counted_twice() -> Result<()> {
    check_stream("cache_read_and_5m_write.sse").await
}

#[tokio::test]
async fn the_haiku_octopus_answer_streams_into_its_text_usage_and_cost() -> Result<()> {
    check_stream("text_octopus_haiku.sse").await
}

#[tokio::test]
async fn the_group_answer_streams_into_its_text_usage_and_cost() -> Result<()> {
    check_stream("text_group_answer.sse").await
}

#[tokio::test]
async fn the_emoji_wall_streams_into_its_text_usage_and_cost() -> Result<()> {
    check_stream("text_emoji_wall.sse").await
}
