//! Admission bounds spend (issue 15.1, 15.2): before every Messages API call
//! and every round of paid tools the job's hold covers what it has spent
//! plus that step's worst case, so a user on a small grant never ends below
//! zero, alone or with two chats at once; a balance that cannot cover the
//! default `max_tokens` gets a shorter answer; below the minimum, a notice
//! with the amounts and no call.
//!
//! The tool rounds are scripted with usage that grows per call (in
//! `message_start` and `message_delta`), within what the requests can
//! really hold: the input bound is a bound of the real API's tokens.

use anyhow::{ensure, Context as _, Result};
use fleet_tests::fake_anthropic::{RecordedCall, ScriptedResponse};
use fleet_tests::harness::tools::{message, spawn_fleet, sse, ADA};
use fleet_tests::harness::{fixture, spawn_billing_worker, stop, wait_until, TestApp as Fleet, BOT_USERNAME, WAIT};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use shared::pricing::PriceTable;

/// The markup and rates of `fixtures/prices.toml` (Sonnet): the test's own
/// reckoning of a call's worst case, independent of the worker's code.
struct Rates {
    table: PriceTable,
}

impl Rates {
    fn load() -> Result<Self> {
        Ok(Self { table: PriceTable::load(&fixture("prices.toml"))? })
    }

    fn sonnet(&self) -> Result<&shared::pricing::ModelPrice> {
        self.table.row_for("claude-sonnet-4-5", chrono::Utc::now().date_naive()).context("no sonnet row")
    }

    /// The most the call of `body` could charge: every byte of the body
    /// (+1,024) as an input token at the dearest input rate, `max_tokens` at
    /// the output rate, marked up (the request has no web search).
    fn worst_case(&self, body: &Value) -> Result<Decimal> {
        let row = self.sonnet()?;
        let dearest = row.input.max(row.cache_write_5m).max(row.cache_write_1h);
        let input = Decimal::from(serde_json::to_vec(body)?.len() as u64 + 1_024);
        let output = Decimal::from(body["max_tokens"].as_u64().context("no max_tokens")?);
        Ok((input * dearest + output * row.output) / Decimal::from(1_000_000) * self.table.markup)
    }

    /// What the call the fake served was charged (its streamed usage).
    fn charge(&self, call: &RecordedCall) -> Result<Decimal> {
        let usage = call.usage.as_ref().context("the call streamed no usage")?;
        let model = call.model.clone().unwrap_or_else(|| "claude-sonnet-4-5".to_owned());
        Ok(self.table.price_call(&model, chrono::Utc::now().date_naive(), &usage.token_counts())?.user_charge.0)
    }
}

/// A turn calling `remember` `notes` times (ids `<prefix>_<n>`, notes of
/// `note_chars` characters), reporting `input_tokens` in `message_start`
/// and `output_tokens` in `message_delta`.
fn remember_turn(prefix: &str, notes: usize, note_chars: usize, input_tokens: u64, output_tokens: u64) -> String {
    let mut body = sse::event(&json!({"type": "message_start", "message": {"id": format!("msg_{prefix}"),
        "type": "message", "role": "assistant", "model": "claude-sonnet-4-5-20250929", "content": [],
        "stop_reason": null, "stop_sequence": null,
        "usage": {"input_tokens": input_tokens, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
            "output_tokens": 1}}}));
    for i in 0..notes {
        let note = format!("{prefix} note {i}: {}", "x".repeat(note_chars));
        body += &sse::event(&json!({"type": "content_block_start", "index": i,
            "content_block": {"type": "tool_use", "id": format!("toolu_{prefix}_{i}"), "name": "remember", "input": {}}}));
        body += &sse::event(&json!({"type": "content_block_delta", "index": i,
            "delta": {"type": "input_json_delta", "partial_json": json!({ "note": note }).to_string()}}));
        body += &sse::event(&json!({"type": "content_block_stop", "index": i}));
    }
    body + &sse::event(&json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null},
        "usage": {"output_tokens": output_tokens}}))
        + &sse::event(&json!({"type": "message_stop"}))
}

/// `rounds` remember turns with input growing by 2,000 tokens a call.
fn growing_rounds(prefix: &str, rounds: usize) -> Vec<ScriptedResponse> {
    (0..rounds)
        .map(|k| {
            let mut r = ScriptedResponse::from_sse(remember_turn(
                &format!("{prefix}{k}"),
                4,
                200,
                1_000 + 2_000 * k as u64,
                200,
            ));
            r.event_delay_ms = 5;
            r
        })
        .collect()
}

/// A message from Ada in a supergroup, addressed to the bot.
fn group_message(update_id: i64, chat: i64, text: &str) -> Value {
    let mention = format!("@{BOT_USERNAME}");
    json!({
        "update_id": update_id,
        "message": {
            "message_id": update_id % 100_000,
            "from": { "id": ADA, "is_bot": false, "first_name": "Ada", "language_code": "en" },
            "chat": { "id": chat, "title": "Ada's group", "type": "supergroup" },
            "date": 1_764_460_800,
            "text": format!("{mention} {text}"),
            "entities": [{ "type": "mention", "offset": 0, "length": mention.len() }],
        }
    })
}

/// Waits until `jobs` jobs exist and ended and the billing-worker applied
/// every event (no active hold: a hold is settled only after its job's charges).
async fn settled(fleet: &Fleet, jobs: i64) -> Result<()> {
    let db = &fleet.db;
    wait_until("the jobs to end and their charges to be applied", WAIT, || async {
        let created = db.count("SELECT count(*) FROM jobs").await?;
        let open = db.count("SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')").await?;
        let active = db.count("SELECT count(*) FROM holds WHERE status = 'active'").await?;
        let unpublished = db.count("SELECT count(*) FROM billing_outbox WHERE published_at IS NULL").await?;
        let events = db.count("SELECT count(*) FROM billing_outbox").await?;
        let applied = db.count("SELECT count(*) FROM applied_events").await?;
        Ok(created == jobs && open == 0 && active == 0 && unpublished == 0 && applied >= events)
    })
    .await
}

/// `$` amounts in `text`, in order.
fn amounts(text: &str) -> Result<Vec<Decimal>> {
    let re = regex::Regex::new(r"\$(\d+\.\d+)")?;
    re.captures_iter(text).map(|c| Ok(c[1].parse::<Decimal>()?)).collect()
}

/// Ada's successful `remember` calls × the tool's price.
async fn tool_charges(fleet: &Fleet, rates: &Rates) -> Result<Decimal> {
    let ran = fleet.db.count("SELECT count(*) FROM tool_calls WHERE name = 'remember' AND NOT is_error").await?;
    Ok(Decimal::from(ran) * rates.table.tool_price("remember").0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_granted_ten_cents_is_stopped_before_a_call_the_balance_cannot_cover_and_ends_at_or_above_zero(
) -> Result<()> {
    let fleet = spawn_fleet(|_| {}).await?;
    let billing = spawn_billing_worker(fleet.broker.prefix(), &fleet.broker.url, &fleet.db.url)?;
    let rates = Rates::load()?;
    let grant: Decimal = "0.10".parse()?;
    fleet.grant(ADA, "0.10").await?;
    // Five rounds of four paid `remember` calls, input growing per call,
    // then an answer: far more than 0.10 if every call were made.
    fleet.anthropic.push(growing_rounds("r", 5));
    fleet.anthropic.set_default(Some(ScriptedResponse::from_sse(sse::text_turn("All saved."))));

    fleet.post(&message(910_000_001, "Remember these twenty things about me.")).await?;
    let notice = fleet.wait_for_message(ADA, "/buy").await?;
    settled(&fleet, 1).await?;

    let calls = fleet.anthropic.calls();
    ensure!(!calls.is_empty() && calls.len() < 6, "{} calls: admission did not stop the job", calls.len());
    // No call started that the balance could not cover: before each, what
    // the job had spent plus that call's worst case fitted in the grant.
    let mut spent = Decimal::ZERO;
    for (i, call) in calls.iter().enumerate() {
        let worst = rates.worst_case(&call.body)?;
        ensure!(spent + worst <= grant, "call {i} started with {spent} spent and a worst case of {worst}");
        spent += rates.charge(call)?;
        if i + 1 < calls.len() {
            spent += Decimal::from(4) * rates.table.tool_price("remember").0;
        }
    }
    // The user is told why, with the amounts and /buy.
    ensure!(notice.contains("balance does not cover"), "{notice}");
    let stopped = notice.split("(Stopped here").nth(1).context("no stop notice")?;
    let [needed, left] = amounts(stopped)?[..] else { anyhow::bail!("two amounts expected in {notice:?}") };
    ensure!(needed > left, "needs {needed}, {left} left: {notice}");
    let charged: Decimal =
        calls.iter().map(|c| rates.charge(c)).sum::<Result<Decimal>>()? + tool_charges(&fleet, &rates).await?;
    ensure!(left <= grant - charged, "{left} shown as left, {} truly left", grant - charged);
    let balance = fleet.db.balance(ADA).await?;
    ensure!(balance >= Decimal::ZERO, "balance {balance}");
    assert_eq!(balance, grant - charged, "the ledger holds exactly the calls served and the tools run");
    stop("billing-worker", billing).await?;
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_chats_of_one_user_running_tool_rounds_at_once_cannot_overspend_together() -> Result<()> {
    let fleet = spawn_fleet(|_| {}).await?;
    let billing = spawn_billing_worker(fleet.broker.prefix(), &fleet.broker.url, &fleet.db.url)?;
    let rates = Rates::load()?;
    let grant: Decimal = "0.15".parse()?;
    fleet.grant(ADA, "0.15").await?;
    // Twelve tool turns, served to whichever job asks next.
    fleet.anthropic.push(growing_rounds("p", 6).into_iter().zip(growing_rounds("g", 6)).flat_map(|(a, b)| [a, b]));
    fleet.anthropic.set_default(Some(ScriptedResponse::from_sse(sse::text_turn("All saved."))));

    let group = -1_001_900_000_001;
    let private = message(910_000_101, "Remember these things about me.");
    let in_group = group_message(910_000_102, group, "remember these things about me");
    let (a, b) = tokio::join!(fleet.post(&private), fleet.post(&in_group));
    a?;
    b?;
    settled(&fleet, 2).await?;

    let calls = fleet.anthropic.calls();
    ensure!(calls.len() < 12, "{} calls: admission did not stop the jobs", calls.len());
    let charged: Decimal =
        calls.iter().map(|c| rates.charge(c)).sum::<Result<Decimal>>()? + tool_charges(&fleet, &rates).await?;
    let balance = fleet.db.balance(ADA).await?;
    ensure!(balance >= Decimal::ZERO, "balance {balance} after {} calls", calls.len());
    assert_eq!(balance, grant - charged);
    let told: Vec<String> =
        fleet.telegram.messages().into_iter().map(|m| m.text).filter(|t| t.contains("/buy")).collect();
    ensure!(!told.is_empty(), "no chat was told why it stopped");
    for notice in &told {
        let tail = notice.split("(Stopped here").nth(1).unwrap_or(notice);
        let [needed, left] = amounts(tail)?[..] else { anyhow::bail!("two amounts expected in {notice:?}") };
        ensure!(needed > left, "needs {needed}, {left} left: {notice}");
    }
    stop("billing-worker", billing).await?;
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_cents_get_an_answer_with_a_lower_max_tokens() -> Result<()> {
    let fleet = spawn_fleet(|_| {}).await?;
    let billing = spawn_billing_worker(fleet.broker.prefix(), &fleet.broker.url, &fleet.db.url)?;
    let rates = Rates::load()?;
    let grant: Decimal = "0.05".parse()?;
    fleet.grant(ADA, "0.05").await?;
    fleet.anthropic.set_default(Some(ScriptedResponse::from_sse(sse::text_turn("Paris."))));

    fleet.post(&message(910_000_201, "What is the capital of France?")).await?;
    fleet.wait_for_message(ADA, "Paris.").await?;
    settled(&fleet, 1).await?;

    let calls = fleet.anthropic.calls();
    assert_eq!(calls.len(), 1);
    let max_tokens = calls[0].body["max_tokens"].as_u64().context("no max_tokens")?;
    ensure!((256..1024).contains(&max_tokens), "max_tokens {max_tokens}: lowered from 1024, not below 256");
    let worst = rates.worst_case(&calls[0].body)?;
    ensure!(worst <= grant, "the lowered call's worst case {worst} is over the balance");
    let mut one_more = calls[0].body.clone();
    one_more["max_tokens"] = json!(max_tokens + 8);
    ensure!(rates.worst_case(&one_more)? > grant, "max_tokens {max_tokens} is lower than the balance needed");
    let balance = fleet.db.balance(ADA).await?;
    assert_eq!(balance, grant - rates.charge(&calls[0])?);
    stop("billing-worker", billing).await?;
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balance_below_the_smallest_call_gets_the_amounts_and_buy_and_no_call() -> Result<()> {
    let fleet = spawn_fleet(|_| {}).await?;
    fleet.grant(ADA, "0.02").await?;
    fleet.anthropic.set_default(Some(ScriptedResponse::from_sse(sse::text_turn("Paris."))));

    fleet.post(&message(910_000_301, "What is the capital of France?")).await?;
    let notice = fleet.wait_for_message(ADA, "/buy").await?;
    let [needed, available] = amounts(&notice)?[..] else { anyhow::bail!("two amounts expected in {notice:?}") };
    assert_eq!(available, "0.0200".parse()?, "{notice}");
    ensure!(needed > available, "{notice}");
    ensure!(notice.contains("too low"), "{notice}");
    wait_until("the job to finish", WAIT, || async {
        Ok(fleet.db.count("SELECT count(*) FROM jobs WHERE outcome = 'no_balance'").await? == 1)
    })
    .await?;
    assert_eq!(fleet.anthropic.call_count(), 0, "Claude was not called");
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_beyond_the_per_round_limit_are_answered_with_an_error_and_not_run() -> Result<()> {
    let fleet = spawn_fleet(|s| s.max_tool_calls_per_round = 3).await?;
    fleet.grant(ADA, "5").await?;
    fleet.anthropic.push([ScriptedResponse::from_sse(remember_turn("many", 5, 10, 500, 40))]);
    fleet.anthropic.set_default(Some(ScriptedResponse::from_sse(sse::text_turn("Saved three."))));

    fleet.post(&message(910_000_401, "Remember five things.")).await?;
    fleet.wait_for_message(ADA, "Saved three.").await?;
    let notes = fleet.db.count("SELECT count(*) FROM user_notes").await?;
    assert_eq!(notes, 3, "only the first three calls ran");
    let calls = fleet.anthropic.calls();
    let results: Vec<Value> = calls[1].body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|t| t["content"].as_array())
        .cloned()
        .unwrap_or_default();
    assert_eq!(results.len(), 5, "every tool_use is answered: {results:?}");
    let refused: Vec<&Value> = results.iter().filter(|r| r["is_error"] == json!(true)).collect();
    assert_eq!(refused.len(), 2, "{results:?}");
    ensure!(refused.iter().all(|r| r["content"].as_str().is_some_and(|c| c.contains("at most 3"))), "{refused:?}");
    fleet.cleanup().await
}
