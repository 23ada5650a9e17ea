//! A provider wait past the deadline (issue 16 part 4): a 429 or 529 whose
//! `retry-after` (3,600 s) is longer than what is left of the stream
//! deadline is not slept: the user is told the wait, rounded; nothing is
//! charged; the chat's next message runs.

use fleet_tests::fake_anthropic::ScriptedResponse;
use fleet_tests::harness::{fixture, TestApp};
use uuid::Uuid;

const ADA: i64 = 100_000_201;

async fn finished(app: &TestApp, update: &str) -> anyhow::Result<(Uuid, String)> {
    app.post_fixture_and_finish(update).await
}

async fn a_long_retry_after_is_told_not_slept(status: u16) -> anyhow::Result<()> {
    let app = TestApp::builder().worker(|s| s.stream_deadline_s = 10).spawn().await?;
    app.grant(ADA, "5").await?;
    app.anthropic.push([
        ScriptedResponse { http_status: Some(status), retry_after_s: Some(3_600), ..ScriptedResponse::default() },
        ScriptedResponse::from_file(fixture("anthropic/t06_back.sse"))?,
    ]);
    let (busy_job, outcome) = finished(&app, "telegram/t06_q1.json").await?;
    assert_eq!(outcome, "answered", "{status}");
    let told = app.wait_for_message(ADA, "asked to wait about an hour").await?;
    assert!(!told.contains("Eddystone"), "{status}: {told}");
    assert_eq!(app.anthropic.calls().len(), 1, "{status}: the hour was not waited for, nor retried");
    // The chat is free: its next message is answered.
    let (_, outcome) = finished(&app, "telegram/t06_q2.json").await?;
    assert_eq!(outcome, "answered");
    app.wait_for_message(ADA, "I'm here again").await?;
    let charged: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ledger_entries WHERE job_id = $1 AND kind IN ('usage_charge', 'tool_charge')",
    )
    .bind(busy_job)
    .fetch_one(&app.db.pool)
    .await?;
    assert_eq!(charged, 0, "{status}: nothing is charged for a call that never started");
    app.cleanup().await
}

#[tokio::test]
async fn a_429_asking_for_an_hour_past_the_deadline_is_told_and_the_next_message_runs() -> anyhow::Result<()> {
    a_long_retry_after_is_told_not_slept(429).await
}

#[tokio::test]
async fn a_529_asking_for_an_hour_past_the_deadline_is_told_and_the_next_message_runs() -> anyhow::Result<()> {
    a_long_retry_after_is_told_not_slept(529).await
}
