//! A stream that just stops (issue 15 part 5, issue 16 part 11): the
//! Messages API answers 200 with `message_start`, a text block and one
//! delta, then a clean EOF — no `message_stop`, no `error` event. That is a
//! call failed on the provider's side (DESIGN §6): retried within the
//! stream deadline, its partial text neither shown as the answer nor kept
//! in the history, its provider cost recorded (estimated) and charged to
//! nobody.

use anyhow::{ensure, Result};
use fleet_tests::fake_anthropic::ScriptedResponse;
use fleet_tests::harness::tools::{message, spawn_fleet, sse, ADA};
use fleet_tests::harness::{wait_until, TestApp, WAIT};
use rust_decimal::Decimal;

/// What the cut stream says before it stops.
const CUT: &str = "The capital of France is";

/// `message_start`, the text block's start and one delta of `CUT`, then
/// the end of the body (a clean EOF, no `message_stop`).
fn cut_stream() -> ScriptedResponse {
    let body = sse::text_turn(CUT);
    let cut: String = body.split_inclusive("\n\n").take(3).collect();
    assert!(cut.contains(CUT) && !cut.contains("message_stop"), "{cut}");
    ScriptedResponse::from_sse(cut)
}

/// `api_calls` of the chat, in order: (seq, user_charge, provider_cost, estimated, state).
async fn calls(fleet: &TestApp) -> Result<Vec<(i32, Decimal, Decimal, bool, String)>> {
    Ok(sqlx::query_as(
        "SELECT seq, user_charge, provider_cost, estimated, state FROM api_calls ORDER BY created_at, seq",
    )
    .fetch_all(&fleet.db.pool)
    .await?)
}

async fn stored_cut_text(fleet: &TestApp) -> Result<i64> {
    fleet.db.count(&format!("SELECT count(*) FROM messages WHERE content::text LIKE '%{CUT}%'")).await
}

async fn usage_charges(fleet: &TestApp) -> Result<i64> {
    fleet.db.count("SELECT count(*) FROM billing_outbox WHERE payload->>'type' = 'usage_charge.v1'").await
}

async fn jobs_done(fleet: &TestApp, n: i64) -> Result<()> {
    wait_until("the jobs to finish", WAIT, || async {
        Ok(fleet.db.count("SELECT count(*) FROM jobs WHERE status = 'done'").await? == n)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_just_stops_is_retried_and_only_the_retry_is_answered_stored_and_charged() -> Result<()> {
    let fleet = spawn_fleet(|_| {}).await?;
    fleet.grant(ADA, "5.00").await?;
    fleet.anthropic.push([
        cut_stream(),
        ScriptedResponse::from_sse(sse::text_turn("Paris, of course.")),
        ScriptedResponse::from_sse(sse::text_turn("Lyon is second.")),
    ]);
    fleet.anthropic.set_default(None);

    fleet.post(&message(900_016_001, "What is the capital of France?")).await?;
    let reply = fleet.wait_for_message(ADA, "Paris, of course.").await?;
    ensure!(reply.trim() == "Paris, of course.", "the answer is not the retry's text alone: {reply:?}");
    let sent: Vec<String> = fleet.telegram.messages().into_iter().map(|m| m.text).collect();
    ensure!(sent.iter().all(|t| !t.contains(CUT) && !t.contains("unavailable")), "sent: {sent:#?}");
    jobs_done(&fleet, 1).await?;

    let rows = calls(&fleet).await?;
    ensure!(rows.len() == 2, "expected the failed call and its retry: {rows:?}");
    let (failed, good) = (&rows[0], &rows[1]);
    ensure!(
        failed.0 == 1 && failed.1.is_zero() && failed.2 > Decimal::ZERO && failed.3 && failed.4 == "recorded",
        "the failed call is not recorded as estimated provider cost charged to nobody: {failed:?}"
    );
    ensure!(good.0 == 2 && good.1 > Decimal::ZERO && !good.3, "the retry is not charged: {good:?}");
    ensure!(usage_charges(&fleet).await? == 1, "the user is not charged exactly once");
    ensure!(stored_cut_text(&fleet).await? == 0, "the cut text is in the stored history");

    // The chat's next request carries the retry's answer, not the cut text.
    fleet.post(&message(900_016_002, "And the second city?")).await?;
    fleet.wait_for_message(ADA, "Lyon is second.").await?;
    let requests = fleet.anthropic.calls();
    ensure!(requests.len() == 3, "calls: {}", requests.len());
    let next = serde_json::to_string(&requests[2].body["messages"])?;
    ensure!(!next.contains(CUT), "the cut text was sent back to Claude: {next}");
    ensure!(next.contains("Paris, of course."), "the retry's answer is not in the history: {next}");
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_stops_every_time_tells_the_user_charges_nothing_and_keeps_no_partial_text() -> Result<()> {
    let fleet = spawn_fleet(|_| {}).await?;
    fleet.grant(ADA, "5.00").await?;
    fleet.anthropic.set_default(Some(cut_stream()));

    fleet.post(&message(900_016_011, "What is the capital of France?")).await?;
    let reply = fleet.wait_for_message(ADA, "unavailable").await?;
    ensure!(!reply.contains(CUT), "the cut text was shown: {reply:?}");
    jobs_done(&fleet, 1).await?;
    // The first try and both retries of `AnthropicRestart`.
    let tries = fleet.anthropic.call_count();
    ensure!(tries == 3, "{tries} tries, expected the call and two retries");
    let rows = calls(&fleet).await?;
    ensure!(
        rows.len() == 3 && rows.iter().all(|r| r.1.is_zero() && r.2 > Decimal::ZERO && r.3),
        "every try is recorded as estimated provider cost charged to nobody: {rows:?}"
    );
    ensure!(usage_charges(&fleet).await? == 0, "the user was charged");
    ensure!(stored_cut_text(&fleet).await? == 0, "the cut text is in the stored history");

    fleet.anthropic.set_default(Some(ScriptedResponse::from_sse(sse::text_turn("Paris."))));
    fleet.post(&message(900_016_012, "Try again?")).await?;
    fleet.wait_for_message(ADA, "Paris.").await?;
    let requests = fleet.anthropic.calls();
    let next = serde_json::to_string(&requests[3].body["messages"])?;
    ensure!(!next.contains(CUT), "the cut text was sent back to Claude: {next}");
    fleet.cleanup().await
}

/// `/usage` marks a call cut short (here by the idle timeout): its output
/// was counted, not reported, so the charge is an estimate, and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_marks_the_charge_of_an_answer_cut_short_as_estimated() -> Result<()> {
    let fleet = TestApp::builder().worker(|s| s.idle_timeout_s = 1).spawn().await?;
    fleet.grant(ADA, "5.00").await?;
    // message_start, the text block's start and one delta; then silence.
    let stalled = ScriptedResponse { stall_after_events: Some(3), ..cut_stream() };
    fleet.anthropic.push([stalled, ScriptedResponse::from_sse(sse::text_turn("A whole answer."))]);
    fleet.anthropic.set_default(None);
    fleet.anthropic.set_count_tokens(5);

    fleet.post(&message(900_016_021, "Tell me about France")).await?;
    let cut = fleet.wait_for_message(ADA, "timed out").await?;
    ensure!(cut.starts_with(CUT), "the cut answer keeps what was received: {cut:?}");
    fleet.post(&message(900_016_022, "And Spain?")).await?;
    fleet.wait_for_message(ADA, "A whole answer.").await?;
    wait_until("both charges in the ledger", WAIT, || async {
        Ok(fleet.db.count("SELECT count(*) FROM ledger_entries WHERE kind = 'usage_charge'").await? == 2)
    })
    .await?;

    fleet.post(&message(900_016_023, "/usage")).await?;
    let usage = fleet.wait_for_message(ADA, "recent charges").await?;
    let lines: Vec<&str> = usage.lines().filter(|l| l.contains(" call ")).collect();
    ensure!(lines.len() == 2, "two call charges listed: {usage}");
    let marked: Vec<&&str> = lines.iter().filter(|l| l.contains("estimated") && l.contains("cut short")).collect();
    // Newest first: the whole answer, then the cut one.
    ensure!(marked.len() == 1 && std::ptr::eq(*marked[0], lines[1]), "only the cut call is marked: {usage}");
    fleet.cleanup().await
}

/// A request answered with an HTTP error (400: not retried) got no stream:
/// its `open` row, written before the request left, is closed as not
/// served — recorded, no tokens, no cost — and never left open for the
/// reaper to book as an estimate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_refused_with_an_http_error_is_closed_as_not_served() -> Result<()> {
    let fleet = spawn_fleet(|_| {}).await?;
    fleet.grant(ADA, "5.00").await?;
    fleet.anthropic.push([ScriptedResponse::http_error(400, None)]);
    fleet.anthropic.set_default(None);

    fleet.post(&message(900_016_031, "Hello?")).await?;
    fleet.wait_for_message(ADA, "unavailable").await?;
    jobs_done(&fleet, 1).await?;
    ensure!(fleet.anthropic.call_count() == 1, "the 400 was retried");
    let rows: Vec<(String, bool, i64, i64, Decimal, Decimal)> =
        sqlx::query_as("SELECT state, started, input_tokens, output_tokens, provider_cost, user_charge FROM api_calls")
            .fetch_all(&fleet.db.pool)
            .await?;
    ensure!(
        rows.len() == 1
            && rows[0].0 == "recorded"
            && !rows[0].1
            && (rows[0].2, rows[0].3) == (0, 0)
            && rows[0].4.is_zero()
            && rows[0].5.is_zero(),
        "the refused request is not closed as not served: {rows:?}"
    );
    ensure!(usage_charges(&fleet).await? == 0, "an event was written for a call never served");
    fleet.cleanup().await
}
