//! The worker holding a job's lease dies (SIGKILL), freezes past its lease
//! (SIGSTOP, then SIGCONT) or is shut down (SIGTERM) while Claude's answer
//! streams: the other worker finishes the job, the user gets exactly one
//! answer, and each completed Messages API call is charged exactly once.

use crate::{CHI_ESSAY, ESSAY};
use anyhow::{ensure, Context as _, Result};
use fleet_tests::fake_anthropic::ScriptedResponse;
use fleet_tests::harness::lifecycle::{answer_of, is_send_to, sse, update_id_of, Job, Lifecycle, Signal, CHI, WAIT};
use rust_decimal::Decimal;
use shared::contracts::usage_event_id;
use std::time::{Duration, Instant};

/// The end state every failover must reach: the job done by a second claim,
/// one final message with the whole essay, one `api_calls` row, one usage
/// event in the outbox and one ledger charge, all of the second epoch.
async fn answered_once_by_the_second_claim(t: &Lifecycle, job: &Job) -> Result<()> {
    let answer = answer_of(ESSAY)?;
    ensure!(job.status == "done" && job.outcome.as_deref() == Some("answered"), "job did not end answered: {job:?}");
    ensure!(job.attempts == 2 && job.lease_epoch == 2, "expected the second claim (epoch 2) to finish: {job:?}");

    let sends = t.telegram.calls().into_iter().filter(|c| is_send_to(c, CHI)).count();
    let messages = t.messages_to(CHI);
    ensure!(sends == 1 && messages.len() == 1, "expected one final message, got {sends} sends: {messages:#?}");
    ensure!(messages[0].text == answer, "the answer is not the whole essay: {:?}", messages[0].text);
    ensure!(job.reply_message_ids == vec![messages[0].message_id], "reply ids {:?}", job.reply_message_ids);

    let calls = t.api_calls(job.job_id).await?;
    ensure!(calls.len() == 1 && calls[0].0 == 1 && calls[0].1 == 2, "api_calls (seq, epoch, charge): {calls:?}");
    let event = usage_event_id(job.job_id, 1);
    let outbox = t.outbox_usage(job.job_id).await?;
    ensure!(outbox == vec![event], "usage events in the outbox {outbox:?}, expected only {event}");
    let stale: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM billing_outbox WHERE job_id = $1 AND (payload->>'lease_epoch')::bigint <> $2
           AND (payload->>'abandoned') IS DISTINCT FROM 'true'",
    )
    .bind(job.job_id)
    .bind(job.lease_epoch)
    .fetch_one(&t.dbs.bot)
    .await?;
    ensure!(stale == 0, "{stale} outbox events carry an older lease epoch");

    t.wait_ledger_settled().await?;
    let charges = t.usage_charges(job.job_id).await?;
    ensure!(charges.len() == 1, "expected one usage_charge, got {charges:?}");
    ensure!(charges[0].0 == event, "charged under event {}, expected {event}", charges[0].0);
    ensure!(charges[0].1 == calls[0].2, "charged {} but the call cost the user {}", charges[0].1, calls[0].2);
    // Nothing else was charged: one usage_charge in the whole ledger, under distinct ids.
    let all: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT event_id FROM ledger_entries WHERE kind = 'usage_charge'")
        .fetch_all(&t.dbs.billing)
        .await?;
    ensure!(all == vec![event], "usage_charge events in the ledger: {all:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_is_replaced_after_its_lease_and_the_user_is_answered_and_charged_once() -> Result<()>
{
    let mut t = Lifecycle::start("sigkill", 2, &[]).await?;
    let result = killed_mid_stream(&mut t).await;
    t.finish(result).await
}

async fn killed_mid_stream(t: &mut Lifecycle) -> Result<()> {
    t.grant(CHI, "5.00").await?;
    // The first call streams for ~10 s; the retry gets the same answer at once.
    t.anthropic.push([sse(ESSAY, 100)?, sse(ESSAY, 0)?]);
    let update_id = update_id_of(CHI_ESSAY)?;
    t.post_fixture(CHI_ESSAY).await?;
    t.wait_streaming(0, 10).await?;
    let victim = t.lease_holder(update_id).await?;
    let survivor = t.other_worker(&victim);

    t.fleet.signal(&victim, Signal::Kill).await?;
    t.fleet.wait_exit(&victim, WAIT).await?;

    // The lease expires (3 s), the survivor's reaper republishes the job and claims it.
    t.wait_for_calls(2, WAIT).await?;
    let job = t.wait_finished(update_id, WAIT).await?;
    let closed = t.anthropic.wait_for(|c| c[0].ended_at.is_some(), WAIT).await;
    ensure!(closed, "the killed worker's stream was never closed");
    let calls = t.anthropic.calls();
    ensure!(
        calls.len() == 2 && !calls[0].completed && calls[1].completed,
        "calls: {:?}",
        fleet_tests::harness::lifecycle::summary(&calls)
    );
    answered_once_by_the_second_claim(t, &job).await?;
    ensure!(t.fleet.exited() == vec![victim.clone()], "exited: {:?}", t.fleet.exited());
    ensure!(
        t.fleet.log(&survivor).contains("reaper republished jobs with expired leases"),
        "{survivor} did not reap the job"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_paused_past_its_lease_loses_the_job_and_writes_nothing_after_it_resumes() -> Result<()> {
    let mut t = Lifecycle::start("sigstop", 2, &[]).await?;
    let result = paused_past_lease(&mut t).await;
    t.finish(result).await
}

async fn paused_past_lease(t: &mut Lifecycle) -> Result<()> {
    t.grant(CHI, "5.00").await?;
    t.anthropic.push([sse(ESSAY, 100)?, sse(ESSAY, 0)?]);
    let update_id = update_id_of(CHI_ESSAY)?;
    t.post_fixture(CHI_ESSAY).await?;
    t.wait_streaming(0, 10).await?;
    let paused = t.lease_holder(update_id).await?;
    let first_epoch = t.job(update_id).await?.lease_epoch;

    t.fleet.signal(&paused, Signal::Stop).await?;
    t.wait_for_calls(2, WAIT).await?;
    let done = t.wait_finished(update_id, WAIT).await?;
    ensure!(done.lease_epoch == first_epoch + 1, "the job was not taken under a new epoch: {done:?}");

    t.fleet.signal(&paused, Signal::Cont).await?;
    // The resumed worker notices (heartbeat: zero rows, or a fenced write)
    // and abandons the job; wait for it to say so before looking.
    let abandoned = t.fleet.wait_for_log(&paused, &["job abandoned: lease lost"], WAIT).await;
    ensure!(abandoned, "{paused} never abandoned the job after SIGCONT");

    let after = t.job(update_id).await?;
    ensure!(
        after.finished_at == done.finished_at && after.status == done.status && after.lease_epoch == done.lease_epoch,
        "the job changed after the paused worker resumed: {done:?} → {after:?}"
    );
    // The only rows of the stale epoch: its call, recorded as abandoned and
    // charged to nobody (what the provider served it is still in the ledger).
    let stale: Vec<(bool, Decimal)> =
        sqlx::query_as("SELECT abandoned, user_charge FROM api_calls WHERE job_id = $1 AND lease_epoch = $2")
            .bind(done.job_id)
            .bind(first_epoch)
            .fetch_all(&t.dbs.bot)
            .await?;
    ensure!(
        stale.iter().all(|(abandoned, charge)| *abandoned && charge.is_zero()),
        "api_calls rows written under the stale epoch {first_epoch} that charge the user: {stale:?}"
    );
    answered_once_by_the_second_claim(t, &after).await?;
    ensure!(t.fleet.exited().is_empty(), "a process died: {:?}", t.fleet.exited());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_terminated_mid_stream_hands_its_job_back_and_the_other_worker_answers_once() -> Result<()> {
    let mut t = Lifecycle::start("sigterm", 2, &[]).await?;
    let result = terminated_mid_stream(&mut t).await;
    t.finish(result).await
}

async fn terminated_mid_stream(t: &mut Lifecycle) -> Result<()> {
    let grace = worker::queues::work::SHUTDOWN_GRACE;
    t.grant(CHI, "5.00").await?;
    // The first stream stalls (connection open) so it outlasts the shutdown grace.
    let stalled = ScriptedResponse { stall_after_events: Some(12), ..sse(ESSAY, 20)? };
    t.anthropic.push([stalled, sse(ESSAY, 0)?]);
    let update_id = update_id_of(CHI_ESSAY)?;
    t.post_fixture(CHI_ESSAY).await?;
    t.wait_streaming(0, 12).await?;
    let leaving = t.lease_holder(update_id).await?;

    let term_at = Instant::now();
    t.fleet.signal(&leaving, Signal::Term).await?;
    t.wait_for_calls(2, grace + WAIT).await?;
    let retry_at = t.anthropic.calls()[1].received_at;
    // The lease was held (heartbeats) through the grace: nobody else started early.
    ensure!(
        retry_at.duration_since(term_at) + Duration::from_secs(1) >= grace,
        "the job was retried {:?} after SIGTERM, before the {grace:?} grace ended",
        retry_at.duration_since(term_at)
    );
    let job = t.wait_finished(update_id, WAIT).await?;
    let status = t.fleet.wait_exit(&leaving, WAIT).await?;
    ensure!(status.success(), "{leaving} exited with {status}");
    ensure!(
        t.fleet.log(&leaving).contains("job handed back at shutdown"),
        "{leaving} did not hand the job back (its lease would have had to expire)"
    );
    let closed = t.anthropic.wait_for(|c| c[0].ended_at.is_some(), WAIT).await;
    ensure!(closed, "the leaving worker never closed its stream");
    let calls = t.anthropic.calls();
    ensure!(
        calls.len() == 2 && !calls[0].completed && calls[1].completed,
        "calls: {:?}",
        fleet_tests::harness::lifecycle::summary(&calls)
    );
    answered_once_by_the_second_claim(t, &job).await.context("after the hand-back")?;
    Ok(())
}

/// The window after the answer is stored: the holder is frozen while
/// Telegram makes it wait (429) to send the answer; the job is taken over,
/// the new holder sends the stored answer, and the frozen worker resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_paused_while_delivering_does_not_send_the_answer_again_after_it_resumes() -> Result<()> {
    let mut t = Lifecycle::start("deliverpause", 2, &[]).await?;
    let result = paused_while_delivering(&mut t).await;
    t.finish(result).await
}

async fn paused_while_delivering(t: &mut Lifecycle) -> Result<()> {
    use fleet_tests::fake_telegram::Fault;
    t.grant(CHI, "5.00").await?;
    t.anthropic.push([sse(ESSAY, 0)?]);
    // The first sendMessage is refused with retry_after 6 s: the holder
    // waits inside delivery, with the answer already stored and billed.
    t.telegram.add_fault(Fault {
        methods: vec!["sendMessage".into()],
        nth: 1,
        status: 429,
        retry_after: Some(6),
        ..Fault::default()
    });
    let update_id = update_id_of(CHI_ESSAY)?;
    t.post_fixture(CHI_ESSAY).await?;
    let refused = t.telegram.wait_for_call(|c| is_send_to(c, CHI) && c.status == 429, WAIT).await;
    ensure!(refused, "the first answer was never attempted");
    let frozen = t.lease_holder(update_id).await?;
    t.fleet.signal(&frozen, Signal::Stop).await?;

    let done =
        t.wait_job(update_id, "done under a new epoch", WAIT, |j| j.status == "done" && j.lease_epoch == 2).await?;
    t.wait_for_message(CHI, "Tea began as a medicine").await?;
    t.fleet.signal(&frozen, Signal::Cont).await?;
    let abandoned = t.fleet.wait_for_log(&frozen, &["job abandoned: lease lost"], WAIT).await;
    ensure!(abandoned, "{frozen} never gave the job up after SIGCONT");

    let sends = t.telegram.calls().into_iter().filter(|c| is_send_to(c, CHI) && c.status == 200).count();
    let after = t.job(update_id).await?;
    ensure!(sends == 1, "the answer was sent {sends} times; reply ids {:?}", after.reply_message_ids);
    ensure!(after.finished_at == done.finished_at, "the job changed after {frozen} resumed");
    Ok(())
}
