//! The fake Messages API seen from an HTTP client.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};

use super::*;

const WAIT: Duration = Duration::from_secs(5);

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures").join(name)
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

    assert!(fake.wait_until(|calls| calls.iter().any(|c| c.ended_at.is_some()), WAIT).await);
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

    drop(stream);
    assert!(
        fake.wait_until(|calls| calls[0].ended_at.is_some(), WAIT).await,
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
