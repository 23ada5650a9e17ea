//! The fake Messages API seen from an HTTP client.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};

use super::*;

const WAIT: Duration = Duration::from_secs(5);

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures").join(name)
}

async fn start() -> FakeAnthropic {
    let any_port: SocketAddr = "127.0.0.1:0".parse().unwrap();
    FakeAnthropic::start(any_port).await.unwrap()
}

fn post(fake: &FakeAnthropic, body: &Value) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .post(format!("{}/v1/messages", fake.base_url()))
        .header("x-api-key", "test-key")
        .header("anthropic-version", "2023-06-01")
        .timeout(WAIT)
        .json(body)
}

fn request_body() -> Value {
    json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 256,
        "stream": true,
        "messages": [{ "role": "user", "content": "What is the capital of France?" }],
    })
}

#[tokio::test]
async fn replays_a_fixture_byte_for_byte_and_records_the_call() {
    let fake = start().await;
    let path = fixture("anthropic/text_capital.sse");
    fake.push([ScriptedResponse::from_file(&path).unwrap()]);

    let response = post(&fake, &request_body()).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let request_id = response.headers()["request-id"].to_str().unwrap().to_owned();
    assert!(request_id.starts_with("req_"), "{request_id}");
    let body = response.bytes().await.unwrap();
    assert_eq!(body.as_ref(), std::fs::read(&path).unwrap().as_slice());

    assert!(fake.wait_for(|calls| calls.iter().any(|c| c.ended_at.is_some()), WAIT).await);
    let calls = fake.calls();
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert_eq!(call.index, 0);
    assert_eq!(call.status, 200);
    assert_eq!(call.body, request_body());
    assert!(call.api_key_present);
    assert_eq!(call.anthropic_version.as_deref(), Some("2023-06-01"));
    assert_eq!(call.events_sent, 8);
    assert!(call.completed);
}

#[tokio::test]
async fn http_529_comes_with_retry_after_and_an_overloaded_error() {
    let fake = start().await;
    fake.push([ScriptedResponse::http_error(529, Some(1))]);

    let response = post(&fake, &request_body()).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 529);
    assert_eq!(response.headers()["retry-after"], "1");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "overloaded_error");
    assert_eq!(fake.calls()[0].status, 529);
    assert!(fake.calls()[0].ended_at.is_some());
}

#[tokio::test]
async fn a_stalled_stream_sends_its_events_then_nothing_until_the_client_leaves() {
    let fake = start().await;
    let path = fixture("anthropic/tides_stalls.sse");
    fake.push([ScriptedResponse { stall_after_events: Some(5), ..ScriptedResponse::from_file(&path).unwrap() }]);
    let expected: Vec<u8> = replay::split_events(&std::fs::read(&path).unwrap().into())[..5].concat();

    let response = post(&fake, &request_body()).timeout(Duration::from_secs(30)).send().await.unwrap();
    let mut stream = response.bytes_stream();
    let mut received = Vec::new();
    while received.len() < expected.len() {
        let chunk = tokio::time::timeout(WAIT, stream.next()).await.unwrap();
        received.extend_from_slice(&chunk.unwrap().unwrap());
    }
    assert_eq!(received, expected);
    let next = tokio::time::timeout(Duration::from_millis(300), stream.next()).await;
    assert!(next.is_err(), "the stalled stream sent more: {next:?}");
    let call = fake.calls().remove(0);
    assert_eq!((call.events_sent, call.completed, call.ended_at), (5, false, None));
    let served = call.usage.as_ref().map(|u| (u.input_tokens, u.output_tokens));
    assert_eq!(served, Some((Some(388), Some(1))), "usage of the events sent: message_start's, not the final delta's");

    drop(stream);
    assert!(
        fake.wait_for(|calls| calls[0].ended_at.is_some(), WAIT).await,
        "the fake did not notice the client leaving"
    );
}

#[tokio::test]
async fn events_are_paced_by_the_delay() {
    let fake = start().await;
    fake.push([ScriptedResponse {
        event_delay_ms: 30,
        ..ScriptedResponse::from_file(fixture("anthropic/text_capital.sse")).unwrap()
    }]);
    let started = std::time::Instant::now();
    let body = post(&fake, &request_body()).send().await.unwrap().bytes().await.unwrap();
    assert!(!body.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(8 * 30));
}

#[tokio::test]
async fn an_empty_queue_falls_back_to_the_default_or_answers_500() {
    let fake = start().await;
    let response = post(&fake, &request_body()).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 500);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "api_error");
    assert_eq!(body["error"]["message"], "no scripted response");

    fake.set_default(Some(ScriptedResponse::from_sse("event: ping\ndata: {}\n\n")));
    for _ in 0..2 {
        let body = post(&fake, &request_body()).send().await.unwrap().text().await.unwrap();
        assert_eq!(body, "event: ping\ndata: {}\n\n");
    }
    assert!(fake.wait_for_calls(3, WAIT).await);
    assert_eq!(fake.call_count(), 3);
}

#[tokio::test]
async fn requests_without_a_key_or_with_a_bad_body_are_rejected_without_using_the_script() {
    let fake = start().await;
    fake.push([ScriptedResponse::from_sse("event: ping\ndata: {}\n\n")]);
    let url = format!("{}/v1/messages", fake.base_url());
    let client = reqwest::Client::new();

    let no_key = client.post(&url).json(&request_body()).timeout(WAIT).send().await.unwrap();
    assert_eq!(no_key.status(), 401);
    let body: Value = no_key.json().await.unwrap();
    assert_eq!(body["error"]["type"], "authentication_error");

    let not_json = client.post(&url).header("x-api-key", "k").body("{not json").timeout(WAIT).send().await.unwrap();
    assert_eq!(not_json.status(), 400);
    let body: Value = not_json.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");

    let ok = post(&fake, &request_body()).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    let statuses: Vec<u16> = fake.calls().iter().map(|c| c.status).collect();
    assert_eq!(statuses, [401, 400, 200]);
}

#[tokio::test]
async fn count_tokens_answers_the_set_count_and_is_recorded_apart() {
    let fake = start().await;
    fake.set_count_tokens(37);
    let response = reqwest::Client::new()
        .post(format!("{}/v1/messages/count_tokens", fake.base_url()))
        .header("x-api-key", "k")
        .json(&json!({ "model": "m", "messages": [] }))
        .timeout(WAIT)
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body, json!({ "input_tokens": 37 }));
    assert_eq!(fake.count_tokens_calls(), [json!({ "model": "m", "messages": [] })]);
    assert_eq!(fake.call_count(), 0);
}

#[tokio::test]
async fn shutdown_ends_a_stalled_stream() {
    let fake = start().await;
    fake.push([ScriptedResponse {
        stall_after_events: Some(0),
        ..ScriptedResponse::from_sse("event: ping\ndata: {}\n\n")
    }]);
    let response = post(&fake, &request_body()).send().await.unwrap();
    tokio::time::timeout(WAIT, fake.shutdown()).await.unwrap();
    let body = tokio::time::timeout(WAIT, response.bytes()).await.unwrap();
    assert!(body.map(|b| b.is_empty()).unwrap_or(true));
}

/// `GET /v1/organizations/usage_report/messages` with `query`, as JSON.
async fn usage_report(fake: &FakeAnthropic, query: &[(&str, String)]) -> (u16, Value) {
    let response = reqwest::Client::new()
        .get(format!("{}/v1/organizations/usage_report/messages", fake.base_url()))
        .header("x-api-key", "sk-ant-admin-test")
        .header("anthropic-version", "2023-06-01")
        .query(query)
        .timeout(WAIT)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

/// Sums the results of `pages` per model: `[input, output, 5m, 1h, read, searches]`.
fn sums(pages: &[Value]) -> std::collections::BTreeMap<String, [u64; 6]> {
    let mut out = std::collections::BTreeMap::new();
    for page in pages {
        for bucket in page["data"].as_array().unwrap() {
            for r in bucket["results"].as_array().unwrap() {
                let model = r["model"].as_str().unwrap_or("(none)").to_owned();
                let t: &mut [u64; 6] = out.entry(model).or_default();
                t[0] += r["uncached_input_tokens"].as_u64().unwrap();
                t[1] += r["output_tokens"].as_u64().unwrap();
                t[2] += r["cache_creation"]["ephemeral_5m_input_tokens"].as_u64().unwrap();
                t[3] += r["cache_creation"]["ephemeral_1h_input_tokens"].as_u64().unwrap();
                t[4] += r["cache_read_input_tokens"].as_u64().unwrap();
                t[5] += r["server_tool_use"]["web_search_requests"].as_u64().unwrap();
            }
        }
    }
    out
}

#[tokio::test]
async fn the_usage_report_counts_what_was_served_by_hour_and_model_plus_added_rows() {
    let fake = start().await;
    let haiku = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_h\",\"model\":\"claude-haiku-4-5\",\"usage\":{\"input_tokens\":7,\"output_tokens\":1}}}\n\n\
                 event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":5}}\n\n\
                 event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
    fake.push([
        ScriptedResponse::from_file(fixture("anthropic/text_capital.sse")).unwrap(),
        ScriptedResponse::from_file(fixture("anthropic/cache_write_1h.sse")).unwrap(),
        ScriptedResponse::from_file(fixture("anthropic/web_search_two_deltas.sse")).unwrap(),
        // Served up to the error event: billed as far as it went.
        ScriptedResponse::from_file(fixture("anthropic/overloaded_midstream.sse")).unwrap(),
        // Nothing served.
        ScriptedResponse::http_error(529, Some(1)),
        ScriptedResponse::from_sse(haiku),
    ]);
    for _ in 0..6 {
        let _ = post(&fake, &request_body()).send().await.unwrap().bytes().await.unwrap();
    }
    let call = &fake.calls()[1];
    assert_eq!(call.model.as_deref(), Some("claude-sonnet-4-5-20250929"));
    assert_eq!(call.usage.as_ref().map(|u| u.token_counts().cache_write_1h), Some(2100));
    assert!(fake.calls()[4].usage.is_none(), "an HTTP error served nothing");
    fake.add_report_usage(
        "claude-opus-4-1",
        chrono::Utc::now(),
        shared::pricing::TokenCounts { input: 1000, cache_read: 3, ..Default::default() },
    );

    let today = chrono::Utc::now().date_naive();
    let day_start = today.and_time(chrono::NaiveTime::MIN).and_utc();
    let query = |limit: u32, page: Option<&str>| {
        let mut q = vec![
            ("starting_at", day_start.to_rfc3339()),
            ("ending_at", (day_start + chrono::TimeDelta::days(1)).to_rfc3339()),
            ("bucket_width", "1h".to_owned()),
            ("group_by[]", "model".to_owned()),
            ("limit", limit.to_string()),
        ];
        if let Some(page) = page {
            q.push(("page", page.to_owned()));
        }
        q
    };
    let (status, one_page) = usage_report(&fake, &query(24, None)).await;
    assert_eq!(status, 200, "{one_page}");
    assert_eq!(one_page["data"].as_array().unwrap().len(), 24, "every hour of the day");
    assert_eq!(one_page["has_more"], false);
    assert_eq!(one_page["next_page"], Value::Null);
    let want = std::collections::BTreeMap::from([
        ("claude-haiku-4-5".to_owned(), [7, 5, 0, 0, 0, 0]),
        ("claude-opus-4-1".to_owned(), [1000, 0, 0, 0, 3, 0]),
        // text_capital + cache_write_1h + web_search_two_deltas + overloaded_midstream.
        ("claude-sonnet-4-5-20250929".to_owned(), [412 + 35 + 5400 + 300, 12 + 80 + 210 + 1, 0, 2100, 0, 1]),
    ]);
    assert_eq!(sums(std::slice::from_ref(&one_page)), want);
    let now = chrono::Utc::now();
    let hour =
        one_page["data"].as_array().unwrap().iter().find(|b| !b["results"].as_array().unwrap().is_empty()).unwrap();
    let starting_at = chrono::DateTime::parse_from_rfc3339(hour["starting_at"].as_str().unwrap()).unwrap().to_utc();
    assert!(starting_at <= now && now - starting_at < chrono::TimeDelta::hours(1), "bucketed by the hour: {hour}");
    assert_eq!(hour["results"][0]["api_key_id"], Value::Null);

    // Five buckets a page: the pages add up to the same.
    let mut pages = Vec::new();
    let mut page: Option<String> = None;
    loop {
        let (status, body) = usage_report(&fake, &query(5, page.as_deref())).await;
        assert_eq!(status, 200, "{body}");
        page = body["next_page"].as_str().map(str::to_owned);
        let more = body["has_more"] == true;
        pages.push(body);
        if !more {
            break;
        }
    }
    assert_eq!(pages.len(), 5, "24 buckets, 5 a page");
    assert_eq!(sums(&pages), want);

    // Daily buckets without grouping: one row of everything.
    let (_, daily) = usage_report(
        &fake,
        &[
            ("starting_at", day_start.to_rfc3339()),
            ("ending_at", (day_start + chrono::TimeDelta::days(1)).to_rfc3339()),
        ],
    )
    .await;
    assert_eq!(daily["data"].as_array().unwrap().len(), 1);
    assert_eq!(sums(&[daily])["(none)"][0], 7 + 1000 + 412 + 35 + 5400 + 300);
}

#[tokio::test]
async fn the_usage_report_wants_a_key_and_a_valid_query() {
    let fake = start().await;
    let url = format!("{}/v1/organizations/usage_report/messages", fake.base_url());
    let no_key = reqwest::Client::new()
        .get(&url)
        .query(&[("starting_at", "2025-11-30T00:00:00Z")])
        .timeout(WAIT)
        .send()
        .await
        .unwrap();
    assert_eq!(no_key.status(), 401);
    let body: Value = no_key.json().await.unwrap();
    assert_eq!(body["error"]["type"], "authentication_error");
    let (status, body) = usage_report(&fake, &[("bucket_width", "1h".to_owned())]).await;
    assert_eq!((status, body["error"]["type"].as_str()), (400, Some("invalid_request_error")), "{body}");
    let (status, _) =
        usage_report(&fake, &[("starting_at", "2025-11-30T00:00:00Z".to_owned()), ("limit", "200".to_owned())]).await;
    assert_eq!(status, 400, "more than 31 daily buckets a page");
}
