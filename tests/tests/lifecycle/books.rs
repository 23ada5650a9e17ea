//! Every call the provider served is on the books, even when its worker dies
//! (issue 15, part 6): a worker SIGKILLed after its stream ended but before
//! `finalize` committed leaves the call's `open` row (written before the
//! request left, completed at `message_start`); the next attempt, or the reaper when there is none,
//! books it as estimated provider cost charged to nobody, and the user is
//! charged once, for the answer delivered.
//!
//! The window is held open without a hook in the worker: the test locks the
//! chat's row (`FOR UPDATE`), so `finalize`'s insert of the user's turn (a
//! foreign key to `chats`) waits inside its transaction once the stream has
//! ended; the test sees the wait in `pg_stat_activity`, kills the worker,
//! then lets go.
//!
//! The row is written before the request leaves: a worker killed while the
//! fake holds its request before `message_start` leaves the call on the
//! books too, estimated at the input bound of the request's size.

use crate::{CHI_ESSAY, ESSAY};
use anyhow::{ensure, Context as _, Result};
use fleet_tests::fake_anthropic::RecordedCall;
use fleet_tests::harness::lifecycle::{answer_of, is_send_to, sse, update_id_of, Lifecycle, CHI, WAIT};
use fleet_tests::harness::wait_until;
use rust_decimal::Decimal;
use shared::contracts::usage_event_id;
use uuid::Uuid;

/// An `api_calls` row as these tests read it.
#[derive(Debug, sqlx::FromRow)]
struct CallRow {
    lease_epoch: i64,
    seq: i32,
    state: String,
    request_id: Option<String>,
    input_tokens: i64,
    output_tokens: i64,
    provider_cost: Decimal,
    user_charge: Decimal,
    estimated: bool,
    abandoned: bool,
}

async fn call_rows(t: &Lifecycle, job_id: Uuid) -> Result<Vec<CallRow>> {
    Ok(sqlx::query_as(
        "SELECT lease_epoch, seq, state, request_id, input_tokens, output_tokens, provider_cost, user_charge,
                estimated, abandoned
           FROM api_calls WHERE job_id = $1 ORDER BY lease_epoch, seq",
    )
    .bind(job_id)
    .fetch_all(&t.dbs.bot)
    .await?)
}

/// `provider_cost` ledger entries of one Anthropic request: (amount, estimated).
async fn provider_costs(t: &Lifecycle, request_id: &str) -> Result<Vec<(Decimal, bool)>> {
    Ok(sqlx::query_as(
        "SELECT amount, estimated FROM ledger_entries WHERE kind = 'provider_cost' AND provider_request_id = $1",
    )
    .bind(request_id)
    .fetch_all(&t.dbs.billing)
    .await?)
}

/// Streams Chi's essay, holds the worker inside `finalize` after the stream
/// completed, checks that the call is `open` in `api_calls` then, kills
/// the worker and lets go. Returns the killed worker's name, the update id
/// and the first call as the fake served it.
async fn kill_between_stream_end_and_commit(t: &mut Lifecycle) -> Result<(String, i64, RecordedCall)> {
    t.grant(CHI, "5.00").await?;
    // ~3 s of stream for the first call; any retry is answered at once.
    t.anthropic.push([sse(ESSAY, 30)?, sse(ESSAY, 0)?]);
    let update_id = update_id_of(CHI_ESSAY)?;
    t.post_fixture(CHI_ESSAY).await?;
    t.wait_streaming(0, 10).await?;
    let victim = t.lease_holder(update_id).await?;
    let job = t.job(update_id).await?;

    // The chat's row, locked until the worker is dead: finalize's insert
    // of the user's turn checks its foreign key against it, and waits.
    let mut lock = t.dbs.bot.begin().await?;
    sqlx::query("SELECT 1 FROM chats WHERE chat_id = $1 FOR UPDATE").bind(CHI).execute(&mut *lock).await?;

    let ended = t.anthropic.wait_for(|c| c[0].completed && c[0].ended_at.is_some(), WAIT).await;
    ensure!(
        ended,
        "the first stream never completed: {:?}",
        fleet_tests::harness::lifecycle::summary(&t.anthropic.calls())
    );
    let db = t.dbs.bot.clone();
    wait_until("the worker's finalize waiting for the chat's row", WAIT, || {
        let db = db.clone();
        async move {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND wait_event_type = 'Lock'
                    AND query LIKE 'INSERT INTO messages%'",
            )
            .fetch_one(&db)
            .await?;
            Ok(waiting == 1)
        }
    })
    .await?;
    // Recorded at message_start, before the stream ended: open, not charged.
    let first = t.anthropic.calls()[0].clone();
    let rows = call_rows(t, job.job_id).await?;
    ensure!(
        rows.len() == 1
            && rows[0].state == "open"
            && rows[0].lease_epoch == 1
            && rows[0].request_id.as_deref() == Some(first.request_id.as_str())
            && rows[0].user_charge.is_zero(),
        "the call is not open in api_calls while finalize waits: {rows:?}"
    );

    t.fleet.signal(&victim, fleet_tests::harness::lifecycle::Signal::Kill).await?;
    t.fleet.wait_exit(&victim, WAIT).await?;
    lock.rollback().await?;
    Ok((victim, update_id, first))
}

/// The first call's row, once booked: orphaned, estimated at `max_tokens`
/// of output, charged to nobody, and in the ledger once as estimated
/// provider cost.
async fn booked_as_orphan(t: &Lifecycle, job_id: Uuid, first: &RecordedCall) -> Result<()> {
    let rows = call_rows(t, job_id).await?;
    let row = rows.iter().find(|r| r.lease_epoch == 1 && r.seq == 1).context("no row of the first call")?;
    let max_tokens = first.body["max_tokens"].as_i64().context("the request had no max_tokens")?;
    let input = first.usage.as_ref().context("the fake recorded no usage")?.input_tokens;
    ensure!(
        row.state == "orphaned" && row.estimated && row.abandoned && row.user_charge.is_zero(),
        "the first call is not booked as an orphan charged to nobody: {row:?}"
    );
    ensure!(
        row.output_tokens == max_tokens && u64::try_from(row.input_tokens).ok() == input,
        "the first call is not estimated at its input ({input:?}) and max_tokens ({max_tokens}): {row:?}"
    );
    ensure!(row.provider_cost > Decimal::ZERO, "the orphan has no provider cost: {row:?}");
    let open = rows.iter().filter(|r| r.state == "open").count();
    ensure!(open == 0, "{open} calls still open: {rows:?}");

    t.wait_ledger_settled().await?;
    let costs = provider_costs(t, &first.request_id).await?;
    ensure!(
        costs == vec![(row.provider_cost, true)],
        "the first call's provider cost in the ledger: {costs:?}, expected once, estimated, {}",
        row.provider_cost
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_after_its_stream_ended_leaves_the_call_on_the_books_and_the_user_is_charged_once() -> Result<()>
{
    let mut t = Lifecycle::start("orphannext", 2, &[]).await?;
    let result = booked_by_the_next_attempt(&mut t).await;
    t.finish(result).await
}

async fn booked_by_the_next_attempt(t: &mut Lifecycle) -> Result<()> {
    let (victim, update_id, first) = kill_between_stream_end_and_commit(t).await?;

    // The lease expires (3 s); the other worker reaps and claims the job,
    // books the open call and answers with a call of its own.
    let job = t.wait_finished(update_id, WAIT).await?;
    ensure!(job.status == "done" && job.outcome.as_deref() == Some("answered"), "job: {job:?}");
    ensure!(job.lease_epoch == 2, "the second claim did not finish the job: {job:?}");
    let calls = t.anthropic.calls();
    ensure!(
        calls.len() == 2 && calls.iter().all(|c| c.completed),
        "calls: {:?}",
        fleet_tests::harness::lifecycle::summary(&calls)
    );
    let messages = t.messages_to(CHI);
    let sends = t.telegram.calls().into_iter().filter(|c| is_send_to(c, CHI)).count();
    ensure!(sends == 1 && messages.len() == 1, "expected one answer, got {sends} sends: {messages:#?}");
    ensure!(messages[0].text == answer_of(ESSAY)?, "the answer is not the essay: {:?}", messages[0].text);

    booked_as_orphan(t, job.job_id, &first).await?;
    let rows = call_rows(t, job.job_id).await?;
    let second = rows.iter().find(|r| r.lease_epoch == 2).context("no row of the answering call")?;
    ensure!(
        rows.len() == 2
            && second.state == "recorded"
            && !second.estimated
            && !second.abandoned
            && second.user_charge > Decimal::ZERO
            && second.request_id.as_deref() == Some(calls[1].request_id.as_str()),
        "the answering call is not recorded and charged: {rows:?}"
    );
    let costs = provider_costs(t, &calls[1].request_id).await?;
    ensure!(costs == vec![(second.provider_cost, false)], "the answering call's provider cost: {costs:?}");
    // The user pays once, for the answer delivered.
    let event = usage_event_id(job.job_id, 1);
    let charges = t.usage_charges(job.job_id).await?;
    ensure!(charges == vec![(event, second.user_charge)], "usage charges {charges:?}, expected one under {event}");
    let all: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger_entries WHERE kind = 'usage_charge'")
        .fetch_one(&t.dbs.billing)
        .await?;
    ensure!(all == 1, "{all} usage charges in the ledger");
    ensure!(t.fleet.exited() == vec![victim.clone()], "exited: {:?}", t.fleet.exited());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_left_open_by_a_job_with_no_attempt_left_is_booked_by_the_reaper_and_charged_to_nobody() -> Result<()> {
    let mut t = Lifecycle::start("orphanreaper", 2, &[("MAX_ATTEMPTS", "1")]).await?;
    let result = booked_by_the_reaper(&mut t).await;
    t.finish(result).await
}

async fn booked_by_the_reaper(t: &mut Lifecycle) -> Result<()> {
    let (_victim, update_id, first) = kill_between_stream_end_and_commit(t).await?;

    // No attempt is left: the claim after the lease expires fails the job,
    // and the reaper books the open call.
    let job = t.wait_finished(update_id, WAIT).await?;
    ensure!(
        job.status == "failed" && job.outcome.as_deref() == Some("attempts_exhausted"),
        "the job did not run out of attempts: {job:?}"
    );
    let db = t.dbs.bot.clone();
    wait_until("the reaper booking the open call", WAIT, || {
        let db = db.clone();
        async move {
            let open: i64 =
                sqlx::query_scalar("SELECT count(*) FROM api_calls WHERE state = 'open'").fetch_one(&db).await?;
            Ok(open == 0)
        }
    })
    .await?;
    ensure!(
        t.anthropic.calls().len() == 1,
        "a second call was made: {:?}",
        fleet_tests::harness::lifecycle::summary(&t.anthropic.calls())
    );
    booked_as_orphan(t, job.job_id, &first).await?;
    ensure!(t.usage_charges(job.job_id).await?.is_empty(), "the user was charged for a job that did not answer");
    Ok(())
}

/// `api_calls` of a job with what the pre-request row adds: (epoch, seq,
/// state, started, request id, input, output, cache writes and reads,
/// provider cost, user charge, estimated, abandoned).
type FullRow = (i64, i32, String, bool, Option<String>, i64, i64, i64, Decimal, Decimal, bool, bool);

async fn full_rows(t: &Lifecycle, job_id: Uuid) -> Result<Vec<FullRow>> {
    Ok(sqlx::query_as(
        "SELECT lease_epoch, seq, state, started, request_id, input_tokens, output_tokens,
                cache_write_5m + cache_write_1h + cache_read, provider_cost, user_charge, estimated, abandoned
           FROM api_calls WHERE job_id = $1 ORDER BY lease_epoch, seq",
    )
    .bind(job_id)
    .fetch_all(&t.dbs.bot)
    .await?)
}

/// Issue 15 part 6 tail: the `open` row is written before the request
/// leaves. The fake holds the first request (its response headers sent, no
/// event: `stall_after_events = 0`); once the fake has the request, the row
/// is there — open, not started, no request id, its input the bound from
/// the request's size. The worker is SIGKILLed before it reads
/// `message_start`; the next attempt books the call as estimated provider
/// cost charged to nobody (input at the bound, output at `max_tokens`) and
/// answers, charging the user once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_before_message_start_leaves_the_call_on_the_books_at_its_input_bound() -> Result<()> {
    let mut t = Lifecycle::start("orphanbefore", 2, &[]).await?;
    let result = booked_before_message_start(&mut t).await;
    t.finish(result).await
}

async fn booked_before_message_start(t: &mut Lifecycle) -> Result<()> {
    t.grant(CHI, "5.00").await?;
    let held = fleet_tests::fake_anthropic::ScriptedResponse { stall_after_events: Some(0), ..sse(ESSAY, 0)? };
    t.anthropic.push([held, sse(ESSAY, 0)?]);
    let update_id = update_id_of(CHI_ESSAY)?;
    t.post_fixture(CHI_ESSAY).await?;
    // The request has reached the provider: its row must be on the books.
    t.wait_for_calls(1, WAIT).await?;
    let victim = t.lease_holder(update_id).await?;
    let job = t.job(update_id).await?;
    let first = t.anthropic.calls()[0].clone();
    let body_bytes = i64::try_from(serde_json::to_vec(&first.body)?.len())?;
    let rows = full_rows(t, job.job_id).await?;
    ensure!(
        rows.len() == 1 && rows[0].2 == "open" && !rows[0].3 && rows[0].4.is_none() && rows[0].9.is_zero(),
        "the call is not open, unstarted and unidentified when its request reaches the provider: {rows:?}"
    );
    ensure!(rows[0].5 >= body_bytes, "the input bound {} is below the request's {body_bytes} bytes", rows[0].5);
    ensure!(first.events_sent == 0 && first.usage.is_none(), "the fake sent events: {first:?}");

    t.fleet.signal(&victim, fleet_tests::harness::lifecycle::Signal::Kill).await?;
    t.fleet.wait_exit(&victim, WAIT).await?;

    let job = t.wait_finished(update_id, WAIT).await?;
    ensure!(job.status == "done" && job.outcome.as_deref() == Some("answered") && job.lease_epoch == 2, "{job:?}");
    let messages = t.messages_to(CHI);
    ensure!(messages.len() == 1 && messages[0].text == answer_of(ESSAY)?, "answers: {messages:#?}");

    let rows = full_rows(t, job.job_id).await?;
    let max_tokens = first.body["max_tokens"].as_i64().context("the request had no max_tokens")?;
    let orphan = rows.iter().find(|r| r.0 == 1 && r.1 == 1).context("no row of the first call")?;
    ensure!(
        orphan.2 == "orphaned" && !orphan.3 && orphan.10 && orphan.11 && orphan.9.is_zero(),
        "the killed call is not booked as an estimated orphan charged to nobody: {orphan:?}"
    );
    ensure!(
        orphan.5 >= body_bytes && orphan.6 == max_tokens && orphan.7 == 0 && orphan.8 > Decimal::ZERO,
        "the orphan is not estimated at its input bound and max_tokens ({max_tokens}): {orphan:?}"
    );
    let second = rows.iter().find(|r| r.0 == 2).context("no row of the answering call")?;
    let calls = t.anthropic.calls();
    ensure!(
        rows.len() == 2
            && second.2 == "recorded"
            && second.3
            && second.4.as_deref() == Some(calls[1].request_id.as_str())
            && !second.10
            && second.9 > Decimal::ZERO,
        "the answering call is not recorded and charged: {rows:?}"
    );

    t.wait_ledger_settled().await?;
    // The orphan has no request id: its provider cost is in the ledger once,
    // estimated, under the job.
    let unidentified: Vec<(Decimal, bool)> = sqlx::query_as(
        "SELECT amount, estimated FROM ledger_entries
          WHERE kind = 'provider_cost' AND provider_request_id IS NULL AND job_id = $1",
    )
    .bind(job.job_id)
    .fetch_all(&t.dbs.billing)
    .await?;
    ensure!(unidentified == vec![(orphan.8, true)], "the orphan's provider cost in the ledger: {unidentified:?}");
    let charges = t.usage_charges(job.job_id).await?;
    ensure!(charges == vec![(usage_event_id(job.job_id, 1), second.9)], "usage charges {charges:?}");
    Ok(())
}
