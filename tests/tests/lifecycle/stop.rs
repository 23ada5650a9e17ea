//! `/stop` while an answer streams (P6): whichever worker takes the `/stop`
//! update in, the stream of the worker holding the job is closed within a
//! second of the post, and the partial answer is delivered marked stopped.

use crate::{CHI_ESSAY, CHI_STOP, ESSAY};
use anyhow::{ensure, Result};
use fleet_tests::harness::lifecycle::{is_send_to, ms_between, sse, update_id_of, Lifecycle, CHI, WAIT};

/// The bound of P6.
const STOP_WITHIN_MS: i128 = 1_000;

async fn stop_closes_the_stream_within_a_second(t: &Lifecycle) -> Result<()> {
    t.grant(CHI, "5.00").await?;
    // ~10 s of stream: long enough that only /stop can end it in time.
    t.anthropic.push([sse(ESSAY, 100)?]);
    t.anthropic.set_count_tokens(37);
    let update_id = update_id_of(CHI_ESSAY)?;
    t.post_fixture(CHI_ESSAY).await?;
    t.wait_streaming(0, 5).await?;
    // As the demo does: post once progress reached the chat.
    let drafted = t
        .telegram
        .wait_for_call(|c| c.method == "sendMessageDraft" && c.params["chat_id"].as_i64() == Some(CHI), WAIT)
        .await;
    ensure!(drafted, "no progress reached the chat");
    let holder = t.lease_holder(update_id).await?;

    let posted_at = t.post_fixture(CHI_STOP).await?;
    let closed = t.anthropic.wait_for(|c| c[0].ended_at.is_some(), WAIT).await;
    ensure!(closed, "the stream was never closed");
    let call = &t.anthropic.calls()[0];
    let ended_at = call.ended_at.unwrap_or(posted_at);
    let took = ms_between(posted_at, ended_at);
    eprintln!("/stop posted → {holder}'s stream closed in {took} ms");
    ensure!(!call.completed, "the stream ran to its end: /stop had no effect");
    ensure!(
        took <= STOP_WITHIN_MS,
        "{holder}'s stream closed {took} ms after /stop was posted (bound {STOP_WITHIN_MS} ms)"
    );

    let job = t.wait_finished(update_id, WAIT).await?;
    ensure!(job.status == "done", "job {job:?}");
    let messages = t.messages_to(CHI);
    ensure!(messages.len() == 1, "expected one final message: {messages:#?}");
    ensure!(
        messages[0].text.starts_with("Tea began as a medicine") && messages[0].text.ends_with("(Stopped.)"),
        "the partial answer is not marked stopped: {:?}",
        messages[0].text
    );
    let sends = t.telegram.calls().into_iter().filter(|c| is_send_to(c, CHI)).count();
    ensure!(sends == 1, "{sends} sendMessage calls to the chat (\"Nothing is being generated\" must not be sent)");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_posted_while_another_worker_streams_closes_the_stream_within_a_second() -> Result<()> {
    let t = Lifecycle::start("stop", 2, &[]).await?;
    let result = stop_closes_the_stream_within_a_second(&t).await;
    t.finish(result).await
}

/// With every job slot of the holder taken (here `PREFETCH=1` and one
/// running job), the `/stop` update routed to that worker must still be
/// taken in at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_reaches_a_worker_whose_job_slots_are_all_taken_within_a_second() -> Result<()> {
    let t = Lifecycle::start("stopfull", 1, &[("PREFETCH", "1")]).await?;
    let result = stop_closes_the_stream_within_a_second(&t).await;
    t.finish(result).await
}
