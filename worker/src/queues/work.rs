//! The `updates` consumer. Each delivery is taken in (`intake`), its job
//! claimed (`store::jobs::claim`), and the outcome mapped to exactly one broker
//! action in [`settle`]: ack, delay (publish to a retry queue, then ack),
//! or dead-letter. The delivery is acked as soon as the claim commits: from
//! then on the job row holds the work (DESIGN §5.6).

use crate::cancel::{CancelReason, JobCancel};
use crate::context::WorkerContext;
use crate::intake::{intake, IntakeError, IntakeOutcome, JobRef};
use crate::job;
use crate::lease;
pub use crate::outcome::Settle;
use crate::outcome::{self, Disposition, JobEnd, Transition};
use crate::store::jobs::{self as store_jobs, Claim, ClaimedJob};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use shared::amqp::{self, attempt_of, Outgoing};
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

/// Publishes a minimal update (`{"update_id": N}`) for a job to `updates`:
/// intake sees a known update_id and resumes its job (used at hand-back and
/// by the reaper).
///
/// # Errors
/// Broker errors.
pub async fn republish_job(ctx: &WorkerContext, update_id: i64) -> Result<(), amqp::BrokerError> {
    republish_job_to(ctx, update_id, &ctx.topology.updates_queue()).await
}

/// As [`republish_job`], to `queue` (a delay queue that dead-letters to `updates`).
///
/// # Errors
/// Broker errors.
pub async fn republish_job_to(ctx: &WorkerContext, update_id: i64, queue: &str) -> Result<(), amqp::BrokerError> {
    ctx.publisher.send("", queue, &shared::contracts::WorkItem { update_id }).await
}

/// Grace period for running jobs at shutdown before they are handed back.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Consumes until `shutdown`, reconnecting with backoff when the broker goes away.
///
/// Shutdown phases:
/// 1. stop taking deliveries (unacked ones return to the queue when the channel closes);
/// 2. wait up to [`SHUTDOWN_GRACE`] for running jobs to finish;
/// 3. cancel the rest with `Shutdown`: each hands its lease back and republishes its job;
/// 4. wait for those hand-backs (10 s), then abort what is left (leases expire).
pub async fn run(ctx: WorkerContext, shutdown: CancellationToken) {
    let tasks = tokio::sync::Mutex::new(JoinSet::new());
    amqp::reconnecting("updates", &shutdown, || async {
        let mut tasks = tasks.lock().await;
        consume(&ctx, &shutdown, &mut tasks).await
    })
    .await;
    let mut tasks = tasks.into_inner();
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        ctx.running.cancel_all(CancelReason::Shutdown);
        let handed =
            tokio::time::timeout(Duration::from_secs(10), async { while tasks.join_next().await.is_some() {} }).await;
        if handed.is_err() {
            tasks.abort_all();
        }
    }
}

async fn consume(
    ctx: &WorkerContext,
    shutdown: &CancellationToken,
    tasks: &mut JoinSet<()>,
) -> Result<(), amqp::BrokerError> {
    let mut sub =
        amqp::Subscription::open(&ctx.settings.broker.amqp_url, "worker", ctx.settings.prefetch, &ctx.topology).await?;
    sub.consume(&ctx.topology.updates_queue()).await?;
    tracing::info!(queue = %ctx.topology.updates_queue(), "consuming updates");
    ctx.consuming.store(true, std::sync::atomic::Ordering::Relaxed);
    // Deliveries are read without waiting for a job slot (the broker's
    // prefetch bounds them), so `/stop`, buttons and duplicates are never
    // stuck behind running jobs; a slot is taken only to claim a job.
    let result = sub
        .for_each(shutdown, |d| {
            while tasks.try_join_next().is_some() {}
            let ctx = ctx.clone();
            tasks.spawn(async move { handle(&ctx, d).await });
        })
        .await;
    ctx.consuming.store(false, std::sync::atomic::Ordering::Relaxed);
    result
}

/// Handles one delivery end to end: [`decide`] says what to do with it; a
/// claimed job is acked (the job row holds the work from then on, DESIGN
/// §5.6), run, and its end applied ([`apply`]).
pub async fn handle(ctx: &WorkerContext, delivery: Delivery) {
    let span = tracing::info_span!(
        "update",
        update_id = tracing::field::Empty,
        chat_id = tracing::field::Empty,
        user_id = tracing::field::Empty,
        job_id = tracing::field::Empty,
        lease_epoch = tracing::field::Empty,
        anthropic_request_id = tracing::field::Empty
    );
    async move {
        match decide(ctx, &delivery).await {
            Decision::Settle(decision) => settle(ctx, &delivery, decision).await,
            Decision::Run { job, claimed, slot } => {
                settle_labelled(ctx, &delivery, Settle::Ack, "claimed").await;
                let end = run_claimed(ctx, &job, claimed).await;
                drop(slot);
                apply(ctx, &job, claimed, end).await;
            }
        }
    }
    .instrument(span)
    .await
}

/// What [`decide`] returns: it performs nothing on the broker itself.
enum Decision {
    /// Settle the delivery so.
    Settle(Settle),
    /// A job was claimed: ack the delivery, run the job, apply its end.
    Run {
        /// The job.
        job: JobRef,
        /// Its lease.
        claimed: ClaimedJob,
        /// The job slot, held while the job runs.
        slot: tokio::sync::OwnedSemaphorePermit,
    },
}

async fn decide(ctx: &WorkerContext, delivery: &Delivery) -> Decision {
    let job = match intake(ctx, &delivery.data).await {
        Ok(IntakeOutcome::Job(job) | IntakeOutcome::Queued { job, .. }) => job,
        Ok(other) => return Decision::Settle(without_job(ctx, other).await),
        Err(IntakeError::Poison(e)) => {
            tracing::error!(error.message = %e, "poison update");
            return Decision::Settle(Settle::DeadLetter);
        }
        Err(e) => {
            tracing::warn!(error.message = %e, "intake failed; retrying later");
            return Decision::Settle(Settle::Delay);
        }
    };
    let span = tracing::Span::current();
    span.record("update_id", job.update_id);
    span.record("chat_id", job.chat_id);
    span.record("user_id", job.user_id);
    span.record("job_id", tracing::field::display(job.job_id));
    let visibility = Duration::from_secs(ctx.settings.visibility_timeout_s);
    // A job whose answer could not be sent is not started: while the Bot
    // API refuses the bot token (401) the job waits in the delay queues
    // (not claimed, so no attempt is used and nothing is charged).
    if !ctx.telegram.token_accepted().load(std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!("the bot token is refused; the job waits");
        return Decision::Settle(Settle::Delay);
    }
    // A job slot bounds the jobs running here; it is held until the job
    // ends. Without a free slot the delivery goes to a delay queue at once,
    // so unacked deliveries never fill the prefetch window (a /stop must get through).
    let Ok(slot) = ctx.job_slots.clone().try_acquire_owned() else {
        return Decision::Settle(Settle::Delay);
    };
    match store_jobs::claim(&ctx.db, job.job_id, &ctx.worker_id, visibility, ctx.settings.max_attempts).await {
        Ok(Claim::Claimed(claimed)) => {
            span.record("lease_epoch", claimed.epoch());
            Decision::Run { job, claimed, slot }
        }
        Ok(claim) => {
            let (decision, notice) = outcome::on_claim(&claim);
            if let Some(notice) = notice {
                let _ = crate::telegram::delivery::send_text(ctx, job.chat_id, notice, &[]).await;
            }
            Decision::Settle(decision)
        }
        Err(e) => {
            tracing::warn!(error.message = %e, "claim failed; retrying later");
            Decision::Settle(Settle::Delay)
        }
    }
}

/// Finishes an update whose intake created no job to run: duplicates,
/// ignored kinds, `/stop` (broadcast on `control`, never waiting behind the
/// chat's lease) and immediate actions. `Job`/`Queued` outcomes are the
/// caller's; here they are acked (their job row holds the work).
pub async fn without_job(ctx: &WorkerContext, outcome: IntakeOutcome) -> Settle {
    match outcome {
        IntakeOutcome::Duplicate => {
            tracing::info!("duplicate update dropped");
            Settle::Ack
        }
        // Logged by intake, with the update's ids.
        IntakeOutcome::Ignored(_) => Settle::Ack,
        IntakeOutcome::Job(_) | IntakeOutcome::Queued { .. } => Settle::Ack,
        IntakeOutcome::Stop { chat_id, job_id, update_id, running, callback_id } => {
            tracing::Span::current().record("chat_id", chat_id);
            // Never waits behind the lease: the holder is told over `control`.
            let here = ctx.running.cancel_chat(chat_id, update_id, job_id, CancelReason::Stop);
            if let Err(e) = crate::queues::control::publish_stop(ctx, chat_id, update_id, job_id).await {
                tracing::warn!(error.message = %e, "stop broadcast failed; retrying later");
                return Settle::Delay;
            }
            if let Some(id) = callback_id {
                let _ = ctx.telegram.answer_callback_query(&id, Some("Stopping…")).await;
            } else if !running && !here {
                let _ =
                    crate::telegram::delivery::send_text(ctx, chat_id, "Nothing is being generated right now.", &[])
                        .await;
            }
            Settle::Ack
        }
        IntakeOutcome::Action(action) => crate::actions::perform(ctx, action).await,
    }
}

/// Runs a claimed job with its heartbeat. Both are owned here: the job and
/// the heartbeat are aborted when this future is dropped (shutdown's
/// `abort_all`), never left running detached. A panic inside the job is
/// caught at its task boundary and becomes [`JobEnd::Panicked`].
async fn run_claimed(ctx: &WorkerContext, job: &JobRef, claimed: ClaimedJob) -> JobEnd {
    let visibility = Duration::from_secs(ctx.settings.visibility_timeout_s);
    let cancel = JobCancel::default();
    let _registration = ctx.running.register(job.chat_id, job.job_id, job.update_id, cancel.clone());
    let stop_heartbeat = CancellationToken::new();
    #[expect(clippy::disallowed_methods, reason = "owned: aborted when this future is dropped")]
    let heartbeat = AbortOnDropHandle::new(tokio::spawn(lease::keep_alive(
        ctx.db.clone(),
        claimed,
        visibility,
        stop_heartbeat.clone(),
        cancel.clone(),
    )));
    let task_ctx = ctx.clone();
    let span = tracing::Span::current();
    let started = std::time::Instant::now();
    metrics::gauge!("fleet_leases_active").increment(1.0);
    #[expect(
        clippy::disallowed_methods,
        reason = "owned: aborted when this future is dropped; a task of its own so a panic is caught at its boundary"
    )]
    let task = AbortOnDropHandle::new(tokio::spawn(
        async move { job::run(&task_ctx, &claimed, cancel).await }.instrument(span),
    ));
    let end = match task.await {
        Ok(end) => end,
        Err(join) => {
            tracing::error!(error.message = %join, "job panicked");
            JobEnd::Panicked(format!("the job panicked: {join}"))
        }
    };
    metrics::gauge!("fleet_leases_active").decrement(1.0);
    metrics::histogram!("fleet_job_duration_seconds").record(started.elapsed().as_secs_f64());
    stop_heartbeat.cancel();
    let _ = heartbeat.await;
    end
}

/// Applies the end of an attempt as [`outcome::plan`] says: the fenced
/// transition first; then, only when it was written (the lease was still
/// ours), the hold, the notice and the broker action.
async fn apply(ctx: &WorkerContext, job: &JobRef, claimed: ClaimedJob, end: JobEnd) {
    let plan = outcome::plan(&end);
    metrics::counter!("fleet_jobs_total", "outcome" => plan.label).increment(1);
    let error = match &end {
        JobEnd::Failed { error, .. }
        | JobEnd::Panicked(error)
        | JobEnd::SentNotRecorded(error)
        | JobEnd::Undelivered(error) => Some(error.as_str()),
        _ => None,
    };
    let written = match plan.transition {
        Transition::Finish(outcome) => claimed.finish(&ctx.db, outcome, error).await,
        Transition::HandBack { count_attempt } => claimed.hand_back(&ctx.db, !count_attempt).await,
        Transition::Nothing => Ok(false),
    };
    let lost = match &written {
        Ok(true) => false,
        Ok(false) => true,
        Err(e) => {
            // The lease will expire and the reaper republishes the job.
            tracing::error!(error.message = %e, "could not end the job; its lease will expire");
            false
        }
    };
    if lost {
        metrics::counter!("fleet_lease_losses_total").increment(1);
        tracing::warn!("job abandoned: lease lost");
        return;
    }
    if matches!(written, Ok(true)) {
        // The job's events (held back while it ran) may be relayed now.
        ctx.outbox_notify.notify_one();
    }
    if plan.void_hold && written.is_ok() {
        // A job handed back with charges waiting in the outbox (its stored
        // rounds, its paid tools) keeps its hold: they are applied when the
        // job ends, and meanwhile another chat of the user must not spend
        // what they will take. The next attempt's admission re-sizes it.
        let keep = matches!(plan.transition, Transition::HandBack { .. })
            && match crate::store::outbox::has_pending_charges(&ctx.db, claimed.job_id()).await {
                Ok(pending) => pending,
                Err(e) => {
                    tracing::warn!(error.message = %e, "could not look for pending charges; keeping the hold");
                    true
                }
            };
        if !keep {
            // Nothing was charged: the reservation goes. Only after the
            // fenced transition, so a newer holder's hold is safe.
            crate::holds::void(ctx, claimed.job_id()).await;
        }
    }
    if let Some(notice) = plan.notice {
        let _ = crate::telegram::delivery::send_text(ctx, job.chat_id, notice, &[]).await;
    }
    match plan.disposition {
        Disposition::Done => match &end {
            JobEnd::Finished(outcome) => tracing::info!(outcome = outcome.as_str(), "job done"),
            _ => tracing::warn!(error.message = error.unwrap_or_default(), "job failed"),
        },
        Disposition::RepublishDelayed if written.is_ok() => {
            // Through the longest delay queue: the database gets time to return.
            let delay = ctx.topology.update_retry_delays_ms.iter().copied().max().unwrap_or(5_000);
            let queue = ctx.topology.updates_retry_queue(delay);
            if let Err(e) = republish_job_to(ctx, job.update_id, &queue).await {
                tracing::warn!(error.message = %e, "delayed republish failed; the reaper will find the job");
            }
            tracing::info!(delay_ms = delay, "job handed back; retried later");
        }
        Disposition::RepublishNow if written.is_ok() => {
            // Visible again at once for another worker.
            if let Err(e) = republish_job(ctx, job.update_id).await {
                tracing::warn!(error.message = %e, "hand-back republish failed; the reaper will find the job");
            }
            tracing::info!("job handed back at shutdown");
        }
        Disposition::RepublishDelayed | Disposition::RepublishNow => {}
    }
}

/// Applies the decision to the delivery. A delay publishes the same body to
/// a retry queue (confirmed) before acking; if that fails the delivery is
/// nacked back to the queue, so nothing is lost.
pub async fn settle(ctx: &WorkerContext, delivery: &Delivery, decision: Settle) {
    let label = match decision {
        Settle::Ack => "ack",
        Settle::Delay => "delay",
        Settle::DeadLetter => "dead_letter",
        Settle::Requeue => "requeue",
    };
    settle_labelled(ctx, delivery, decision, label).await;
}

/// As [`settle`], counted in `fleet_updates_settled_total` under `label`
/// (`claimed` for the ack of a delivery whose job was claimed).
async fn settle_labelled(ctx: &WorkerContext, delivery: &Delivery, decision: Settle, label: &'static str) {
    metrics::counter!("fleet_updates_settled_total", "action" => label).increment(1);
    let result = match decision {
        Settle::Ack => delivery.acker.ack(BasicAckOptions::default()).await.map(|_| ()),
        Settle::DeadLetter => delivery.acker.reject(BasicRejectOptions { requeue: false }).await.map(|_| ()),
        Settle::Requeue => {
            delivery.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await.map(|_| ())
        }
        Settle::Delay => {
            let attempt = attempt_of(&delivery.properties) + 1;
            let delays = &ctx.topology.update_retry_delays_ms;
            let idx = usize::try_from(attempt - 1).unwrap_or(0).min(delays.len().saturating_sub(1));
            let queue = ctx.topology.updates_retry_queue(delays.get(idx).copied().unwrap_or(1_000));
            let published = ctx
                .publisher
                .publish(Outgoing {
                    exchange: "",
                    routing_key: &queue,
                    body: &delivery.data,
                    message_id: None,
                    content_type: "application/json",
                    attempt: Some(attempt),
                })
                .await;
            match published {
                Ok(()) => delivery.acker.ack(BasicAckOptions::default()).await.map(|_| ()),
                Err(e) => {
                    tracing::warn!(error.message = %e, "delay publish failed; requeueing");
                    delivery.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await.map(|_| ())
                }
            }
        }
    };
    if let Err(e) = result {
        // The channel is gone: the broker redelivers the message.
        tracing::warn!(error.message = %e, "could not settle delivery");
    }
}
