//! A token count that never answers (issue 13): the count of an answer cut
//! short is bounded by `COUNT_TOKENS_TIMEOUT_S`; on timeout the output the
//! stream reported is billed as an estimate, the job finishes normally and
//! the chat answers its next message.

use anyhow::{ensure, Result};
use fleet_tests::fake_anthropic::ScriptedResponse;
use fleet_tests::harness::tools::{message, spawn_fleet, sse, ADA};
use fleet_tests::harness::{wait_until, WAIT};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_count_tokens_ends_within_its_timeout_and_the_chat_answers_its_next_message() -> Result<()> {
    let fleet = spawn_fleet(|s| {
        s.idle_timeout_s = 1;
        s.count_tokens_timeout_s = 2;
    })
    .await?;
    fleet.grant(ADA, "5.00").await?;
    fleet.anthropic.set_count_tokens_stalled(true);
    // message_start, the text block's start and one delta; then silence, so
    // the idle timeout cuts the answer short and its output must be counted.
    let stalled = ScriptedResponse {
        stall_after_events: Some(3),
        ..ScriptedResponse::from_sse(sse::text_turn("Half an answer"))
    };
    fleet.anthropic.push([stalled, ScriptedResponse::from_sse(sse::text_turn("The second answer."))]);
    fleet.anthropic.set_default(None);

    let posted = Instant::now();
    fleet.post(&message(900_013_001, "Tell me a long story")).await?;
    let first = fleet.wait_for_message(ADA, "Half an answer").await?;
    let took = posted.elapsed();
    ensure!(first.contains("timed out"), "the cut answer is not marked: {first:?}");
    ensure!(fleet.anthropic.count_tokens_calls().len() == 1, "the count was not asked for");
    // Idle timeout (1 s) + count timeout (2 s) + delivery; far below the
    // lease-renewed forever of a count without a deadline.
    ensure!(took < Duration::from_secs(10), "the cut answer took {took:?}");
    wait_until("the first job to finish", WAIT, || async {
        Ok(fleet.db.count("SELECT count(*) FROM jobs WHERE status = 'done'").await? == 1)
    })
    .await?;
    let estimated = fleet.db.count("SELECT count(*) FROM api_calls WHERE estimated").await?;
    ensure!(estimated == 1, "the call billed on the stream's own count is not marked estimated");

    fleet.post(&message(900_013_002, "And now?")).await?;
    fleet.wait_for_message(ADA, "The second answer.").await?;
    fleet.cleanup().await
}
