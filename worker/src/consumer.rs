//! The `updates` consumer. Each delivery is taken in (`intake`), its job
//! claimed (`store::jobs::claim`), and the outcome mapped to exactly one broker
//! action in [`settle`]: ack, delay (publish to a retry queue, then ack),
//! or dead-letter. The delivery is acked as soon as the claim commits: from
//! then on the job row holds the work (DESIGN §5.6).

use crate::context::WorkerContext;
use crate::control::{CancelReason, JobCancel};
use crate::intake::{intake, IntakeError, IntakeOutcome, JobRef};
use crate::job::{self, JobOutcome};
use crate::lease;
use crate::store::jobs::{self as store_jobs, Claim, ClaimedJob, Outcome};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use shared::amqp::{self, attempt_of, Outgoing};
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// What to do with a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    /// Done with it.
    Ack,
    /// Try again later through a delay queue.
    Delay,
    /// Poison: to `updates.dead`.
    DeadLetter,
    /// Back to its queue now (nack with requeue).
    Requeue,
    /// Already acked (after the claim committed); nothing more to send.
    Settled,
}

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
    let body = serde_json::json!({ "update_id": update_id }).to_string();
    ctx.publisher
        .publish(Outgoing {
            exchange: "",
            routing_key: queue,
            body: body.as_bytes(),
            message_id: None,
            content_type: "application/json",
            attempt: None,
        })
        .await
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
    let conn = amqp::connect(&ctx.settings.broker.amqp_url, "worker", Duration::from_secs(5)).await?;
    let ch = amqp::consumer_channel(&conn, ctx.settings.prefetch).await?;
    ctx.topology.declare(&ch).await?;
    let mut consumer = ch
        .basic_consume(
            ctx.topology.updates_queue().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(queue = %ctx.topology.updates_queue(), "consuming updates");
    ctx.consuming.store(true, std::sync::atomic::Ordering::Relaxed);
    let result = consume_loop(ctx, shutdown, tasks, &mut consumer).await;
    ctx.consuming.store(false, std::sync::atomic::Ordering::Relaxed);
    result
}

async fn consume_loop(
    ctx: &WorkerContext,
    shutdown: &CancellationToken,
    tasks: &mut JoinSet<()>,
    consumer: &mut lapin::Consumer,
) -> Result<(), amqp::BrokerError> {
    // Deliveries are read without waiting for a job slot (the broker's
    // prefetch bounds them), so `/stop`, buttons and duplicates are never
    // stuck behind running jobs; a slot is taken only to claim a job.
    loop {
        while tasks.try_join_next().is_some() {}
        let delivery = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            d = consumer.next() => d,
        };
        match delivery {
            Some(Ok(d)) => {
                let ctx = ctx.clone();
                let job_shutdown = shutdown.clone();
                tasks.spawn(async move {
                    handle(&ctx, d, job_shutdown).await;
                });
            }
            Some(Err(e)) => return Err(e.into()),
            None => return Err(amqp::BrokerError::Nacked),
        }
    }
}

/// Handles one delivery end to end.
pub async fn handle(ctx: &WorkerContext, delivery: Delivery, shutdown: CancellationToken) {
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
        let decision = decide(ctx, &delivery, &shutdown).await;
        settle(ctx, &delivery, decision).await;
    }
    .instrument(span)
    .await
}

async fn decide(ctx: &WorkerContext, delivery: &Delivery, shutdown: &CancellationToken) -> Settle {
    let job = match intake(ctx, &delivery.data).await {
        Ok(IntakeOutcome::Job(job) | IntakeOutcome::Queued(job)) => job,
        Ok(other) => return without_job(ctx, other).await,
        Err(IntakeError::Poison(e)) => {
            tracing::error!(error.message = %e, "poison update");
            return Settle::DeadLetter;
        }
        Err(e) => {
            tracing::warn!(error.message = %e, "intake failed; retrying later");
            return Settle::Delay;
        }
    };
    let span = tracing::Span::current();
    span.record("update_id", job.update_id);
    span.record("chat_id", job.chat_id);
    span.record("user_id", job.user_id);
    span.record("job_id", tracing::field::display(job.job_id));
    let visibility = Duration::from_secs(ctx.settings.visibility_timeout_s);
    // A job slot bounds the jobs running here; it is held until the job
    // ends. Without a free slot the delivery goes to a delay queue at once,
    // so unacked deliveries never fill the prefetch window (a /stop must get through).
    let Ok(_slot) = ctx.job_slots.clone().try_acquire_owned() else {
        return Settle::Delay;
    };
    match store_jobs::claim(&ctx.db, job.job_id, &ctx.worker_id, visibility, ctx.settings.max_attempts).await {
        Ok(Claim::Claimed(l)) => {
            span.record("lease_epoch", l.epoch());
            // The job row holds the work from now on.
            settle(ctx, delivery, Settle::Ack).await;
            run_claimed(ctx, &job, l, shutdown).await;
            Settle::Settled
        }
        Ok(Claim::ChatBusy) => Settle::Delay,
        Ok(Claim::NotClaimable) => Settle::Ack,
        Ok(Claim::AttemptsExhausted) => {
            let _ = crate::delivery::send_text(
                ctx,
                job.chat_id,
                "Sorry, I could not answer this message after several attempts.",
                &[],
            )
            .await;
            Settle::Ack
        }
        Err(e) => {
            tracing::warn!(error.message = %e, "claim failed; retrying later");
            Settle::Delay
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
        IntakeOutcome::Ignored(why) => {
            tracing::info!(reason = %why, "update ignored");
            Settle::Ack
        }
        IntakeOutcome::Job(_) | IntakeOutcome::Queued(_) => Settle::Ack,
        IntakeOutcome::Stop { chat_id, job_id, update_id, running, callback_id } => {
            tracing::Span::current().record("chat_id", chat_id);
            // Never waits behind the lease: the holder is told over `control`.
            let here = ctx.running.cancel_chat(chat_id, update_id, job_id, CancelReason::Stop);
            if let Err(e) = crate::control::publish_stop(ctx, chat_id, update_id, job_id).await {
                tracing::warn!(error.message = %e, "stop broadcast failed; retrying later");
                return Settle::Delay;
            }
            if let Some(id) = callback_id {
                let _ = ctx.telegram.answer_callback_query(&id, Some("Stopping…")).await;
            } else if !running && !here {
                let _ = crate::delivery::send_text(ctx, chat_id, "Nothing is being generated right now.", &[]).await;
            }
            Settle::Ack
        }
        IntakeOutcome::Action(action) => crate::actions::perform(ctx, action).await,
    }
}

async fn run_claimed(ctx: &WorkerContext, job: &JobRef, l: ClaimedJob, _shutdown: &CancellationToken) {
    let visibility = Duration::from_secs(ctx.settings.visibility_timeout_s);
    let cancel = JobCancel::default();
    let _registration = ctx.running.register(job.chat_id, job.job_id, job.update_id, cancel.clone());
    let stop_heartbeat = CancellationToken::new();
    let heartbeat =
        tokio::spawn(lease::keep_alive(ctx.db.clone(), l, visibility, stop_heartbeat.clone(), cancel.clone()));
    let task_ctx = ctx.clone();
    let task_cancel = cancel.clone();
    let span = tracing::Span::current();
    let started = std::time::Instant::now();
    metrics::gauge!("fleet_leases_active").increment(1.0);
    let outcome = tokio::spawn(async move { job::run(&task_ctx, l, task_cancel).await }.instrument(span)).await;
    metrics::gauge!("fleet_leases_active").decrement(1.0);
    metrics::histogram!("fleet_job_duration_seconds").record(started.elapsed().as_secs_f64());
    let label = match &outcome {
        Ok(JobOutcome::Done(l)) => l.as_str(),
        Ok(JobOutcome::Failed(_)) => "failed",
        Ok(JobOutcome::LeaseLost) => "lease_lost",
        Ok(JobOutcome::HandedBack) => "handed_back",
        Ok(JobOutcome::RetryLater) => "retry_later",
        Err(_) => "panic",
    };
    metrics::counter!("fleet_jobs_total", "outcome" => label).increment(1);
    if label == "lease_lost" {
        metrics::counter!("fleet_lease_losses_total").increment(1);
    }
    stop_heartbeat.cancel();
    let _ = heartbeat.await;
    match outcome {
        Ok(JobOutcome::Done(outcome)) => tracing::info!(outcome = outcome.as_str(), "job done"),
        Ok(JobOutcome::Failed(e)) => tracing::warn!(error.message = %e, "job failed"),
        Ok(JobOutcome::LeaseLost) => tracing::warn!("job abandoned: lease lost"),
        Ok(JobOutcome::RetryLater) => {
            // Through the longest delay queue: the database gets time to return.
            let delay = ctx.topology.update_retry_delays_ms.iter().copied().max().unwrap_or(5_000);
            let queue = ctx.topology.updates_retry_queue(delay);
            if let Err(e) = republish_job_to(ctx, job.update_id, &queue).await {
                tracing::warn!(error.message = %e, "delayed republish failed; the reaper will find the job");
            }
            tracing::info!(delay_ms = delay, "job handed back after a database error; retried later");
        }
        Ok(JobOutcome::HandedBack) => {
            // Make it visible again at once for another worker.
            if let Err(e) = republish_job(ctx, job.update_id).await {
                tracing::warn!(error.message = %e, "hand-back republish failed; the reaper will find the job");
            }
            tracing::info!("job handed back at shutdown");
        }
        Err(join) => {
            // A panic inside the job: release the lease and tell the user (P3).
            tracing::error!(error.message = %join, "job panicked");
            let _ = l.finish(&ctx.db, Outcome::Panic, Some("the job panicked")).await;
            let _ = crate::delivery::send_text(
                ctx,
                job.chat_id,
                "Sorry, something went wrong while answering. Please try again.",
                &[],
            )
            .await;
        }
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
        Settle::Settled => "claimed",
        Settle::Requeue => "requeue",
    };
    metrics::counter!("fleet_updates_settled_total", "action" => label).increment(1);
    let result = match decision {
        Settle::Settled => Ok(()),
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
