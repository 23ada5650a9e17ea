//! Ordered intake (P2, DESIGN §5 "per-chat order"). Raw updates arrive on
//! the intake shards `updates.intake.<n>` (the ingress routes a chat to
//! shard `chat_id mod n`). Each shard is a single-active-consumer quorum
//! queue, so exactly one worker reads it, in publish order; inside that
//! worker the updates of one chat are taken in strictly one after the other
//! (a chain per chat), while different chats proceed concurrently.
//!
//! Intake creates the job row; the claim then refuses a job while an older
//! job of its chat waits or runs, so once rows are created in update order
//! the answers come in update order. The job itself is handed off to the
//! competing `updates` queue (`{"update_id": N}`), so generation spreads
//! over every worker, not only the shard's active consumer.
//!
//! A transient intake failure is retried here with backoff (the delivery
//! stays unacked and the chat's later updates wait behind it): sending it
//! to a delay queue would let a later update of the chat be taken in first.
//! Each update tells the next of its chat whether it was taken in; one that
//! was not (shutdown) holds the rest back too, so they all return to the
//! shard, in order, when the channel closes. An update that still fails
//! after [`INTAKE_ATTEMPTS`] (minutes) is dead-lettered to `updates.dead`
//! with a notice to the user, and the chat moves on.

use crate::context::WorkerContext;
use crate::intake::{intake, IntakeError, IntakeOutcome, JobRef};
use crate::queues::work::{self, Settle};
use lapin::message::Delivery;
use shared::amqp;
use shared::retry::{self, Policy};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Unacknowledged intake deliveries per shard consumer.
const INTAKE_PREFETCH: u16 = 32;
/// In-process attempts of one update's intake (backoff 100 ms doubling to
/// 10 s: about three minutes) before it is dead-lettered to `updates.dead`.
pub const INTAKE_ATTEMPTS: u32 = 20;
/// Longest one intake attempt may take (a hung query, a stalled download).
const INTAKE_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// Deliveries of one raw update after which it is not taken in again but
/// dead-lettered to `updates.dead` with a notice: an update that killed or
/// hung its consumer this often is poison (quorum queues count every
/// return, [`amqp::delivery_count_of`]). Below the queue's own delivery
/// limit, so the user is told and nothing is dropped silently.
pub const POISON_DELIVERIES: i64 = 5;

/// Consumes every intake shard until `shutdown`, reconnecting with backoff.
/// On shutdown it stops reading, lets the intakes in progress finish (they
/// are short database transactions) and returns; unacked deliveries go
/// back to their shard, in order, when the channel closes.
pub async fn run(ctx: WorkerContext, shutdown: CancellationToken) {
    amqp::reconnecting("intake", &shutdown, || consume(&ctx, &shutdown)).await;
}

async fn consume(ctx: &WorkerContext, shutdown: &CancellationToken) -> Result<(), amqp::BrokerError> {
    let mut sub =
        amqp::Subscription::open(&ctx.settings.broker.amqp_url, "worker-intake", INTAKE_PREFETCH, &ctx.topology)
            .await?;
    for shard in 0..ctx.topology.intake_shards {
        sub.consume(&ctx.topology.intake_queue(shard)).await?;
    }
    // Pre-checkout queries: their own queue and consumer (their own
    // prefetch window), never behind a busy shard.
    sub.consume(&ctx.topology.payments_queue()).await?;
    tracing::info!(shards = ctx.topology.intake_shards, "consuming intake shards and pre-checkout queries");
    ctx.intake_consuming.store(true, Ordering::Relaxed);
    let mut tasks = JoinSet::new();
    let mut chains = Chains::default();
    let result = sub
        .for_each(shutdown, |d| {
            while tasks.try_join_next().is_some() {}
            let chat = shared::telegram::RoutingInfo::from_bytes(&d.data).ok().and_then(|r| r.chat_id);
            let (prev, done) = chains.next(chat);
            let (ctx, shutdown) = (ctx.clone(), shutdown.clone());
            tasks.spawn(async move { take_in(&ctx, d, prev, done, &shutdown).await });
        })
        .await;
    ctx.intake_consuming.store(false, Ordering::Relaxed);
    // Intakes in progress finish (or, at shutdown, give up between attempts).
    let _ = tokio::time::timeout(Duration::from_secs(10), async { while tasks.join_next().await.is_some() {} }).await;
    sub.close().await;
    result
}

/// One chain per chat: each update's intake waits for the previous
/// update of its chat, and learns whether it was taken in.
#[derive(Default)]
struct Chains {
    tails: HashMap<i64, oneshot::Receiver<bool>>,
}

impl Chains {
    /// The signal to wait for (the chat's previous intake) and the one to
    /// give when this intake is done: `true` taken in (or settled for
    /// good), `false` not (it goes back to the shard). A signal dropped
    /// unsent (a panic) counts as taken in: the chat is not stuck.
    fn next(&mut self, chat: Option<i64>) -> (Option<oneshot::Receiver<bool>>, oneshot::Sender<bool>) {
        let (done, tail) = oneshot::channel();
        let Some(chat) = chat else { return (None, done) };
        if self.tails.len() > 1_024 {
            // Forget chains whose last intake has finished.
            self.tails.retain(|_, rx| matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty)));
        }
        (self.tails.insert(chat, tail), done)
    }
}

async fn take_in(
    ctx: &WorkerContext,
    delivery: Delivery,
    prev: Option<oneshot::Receiver<bool>>,
    done: oneshot::Sender<bool>,
    shutdown: &CancellationToken,
) {
    let span = tracing::info_span!(
        "intake",
        update_id = tracing::field::Empty,
        chat_id = tracing::field::Empty,
        job_id = tracing::field::Empty
    );
    async move {
        if let Some(prev) = prev {
            if prev.await == Ok(false) {
                // The chat's previous update goes back to the shard: so does
                // this one (left unacked until the channel closes), behind it.
                let _ = done.send(false);
                return;
            }
        }
        let deliveries = amqp::delivery_count_of(&delivery.properties);
        let outcome = if deliveries >= POISON_DELIVERIES {
            tracing::error!(deliveries, "an update returned this often is poison: dead-lettered with a notice");
            metrics::counter!("fleet_poison_updates_total").increment(1);
            Taken::GiveUp
        } else {
            intake_with_retries(ctx, &delivery, shutdown).await
        };
        // The job row exists (or nothing will): the chat's next update may go.
        let _ = done.send(!matches!(outcome, Taken::Shutdown));
        let decision = match outcome {
            Taken::Outcome(IntakeOutcome::Job(job)) => hand_off(ctx, &job).await,
            Taken::Outcome(IntakeOutcome::Queued { job, announce }) => {
                let decision = hand_off(ctx, &job).await;
                if let Some(a) = announce {
                    let sent = crate::telegram::delivery::send_fenced_in(
                        ctx,
                        job.chat_id,
                        a.thread,
                        Some(a.message_id),
                        crate::notices::QUEUED,
                        &[],
                        None,
                    )
                    .await;
                    if let Err(e) = sent {
                        tracing::warn!(error.message = %e, "queued notice not sent");
                    }
                }
                decision
            }
            Taken::Outcome(other) => work::without_job(ctx, other).await,
            Taken::Poison => Settle::DeadLetter,
            Taken::GiveUp => {
                // Kept in `updates.dead` for inspection and redrive; the user is told.
                if let Some(chat) =
                    shared::telegram::RoutingInfo::from_bytes(&delivery.data).ok().and_then(|r| r.chat_id)
                {
                    let _ = crate::telegram::delivery::send_text(ctx, chat, crate::notices::NOT_TAKEN, &[]).await;
                }
                Settle::DeadLetter
            }
            Taken::Shutdown => return,
        };
        work::settle(ctx, &delivery, decision).await;
    }
    .instrument(span)
    .await;
}

enum Taken {
    Outcome(IntakeOutcome),
    Poison,
    GiveUp,
    Shutdown,
}

async fn intake_with_retries(ctx: &WorkerContext, delivery: &Delivery, shutdown: &CancellationToken) -> Taken {
    let mut backoff = Policy::Intake.backoff();
    for attempt in 1..=INTAKE_ATTEMPTS {
        if shutdown.is_cancelled() {
            return Taken::Shutdown;
        }
        let attempted = match tokio::time::timeout(INTAKE_ATTEMPT_TIMEOUT, intake(ctx, &delivery.data)).await {
            Ok(result) => result,
            Err(_) => Err(IntakeError::TimedOut(INTAKE_ATTEMPT_TIMEOUT)),
        };
        match attempted {
            Ok(outcome) => {
                if let IntakeOutcome::Job(j) | IntakeOutcome::Queued { job: j, .. } = &outcome {
                    let span = tracing::Span::current();
                    span.record("update_id", j.update_id);
                    span.record("chat_id", j.chat_id);
                    span.record("job_id", tracing::field::display(j.job_id));
                }
                return Taken::Outcome(outcome);
            }
            Err(IntakeError::Poison(e)) => {
                tracing::error!(error.message = %e, "poison update");
                return Taken::Poison;
            }
            Err(e) => {
                let wait = backoff.next_or_last();
                tracing::warn!(error.message = %e, attempt, wait_ms = wait.as_millis() as u64, "intake failed; retrying");
                if retry::sleep_or_stopped(wait, shutdown).await {
                    return Taken::Shutdown;
                }
            }
        }
    }
    tracing::error!(attempts = INTAKE_ATTEMPTS, "intake kept failing; dead-lettering the update");
    Taken::GiveUp
}

/// Publishes the job to the competing `updates` queue (confirmed); the
/// shard delivery is acked only after that, so a failure leaves it to be
/// taken in again (a duplicate then, which resumes the same job).
async fn hand_off(ctx: &WorkerContext, job: &JobRef) -> Settle {
    // One attempt per delay of the policy; the last failure waits too, so
    // a requeued delivery does not come straight back.
    for wait in Policy::HandOff.backoff() {
        match work::republish_job(ctx, job.update_id).await {
            Ok(()) => return Settle::Ack,
            Err(e) => {
                tracing::warn!(error.message = %e, "job hand-off failed; retrying");
                tokio::time::sleep(wait).await;
            }
        }
    }
    Settle::Requeue
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_chats_intakes_wait_for_each_other_and_other_chats_do_not() {
        let mut chains = Chains::default();
        let (first_prev, first_done) = chains.next(Some(1));
        assert!(first_prev.is_none(), "the first update of a chat waits for nothing");
        let (second_prev, _second_done) = chains.next(Some(1));
        let (other_prev, _) = chains.next(Some(2));
        assert!(other_prev.is_none(), "another chat does not wait");
        let (none_prev, _) = chains.next(None);
        assert!(none_prev.is_none(), "updates without a chat do not wait");
        let mut second_prev = second_prev.expect("the second update waits for the first");
        assert!(matches!(second_prev.try_recv(), Err(oneshot::error::TryRecvError::Empty)));
        first_done.send(false).expect("the second waits");
        assert_eq!(second_prev.await, Ok(false), "the second learns the first was not taken in");
        let (third_prev, third_done) = chains.next(Some(1));
        drop(third_done);
        let (fourth_prev, _) = chains.next(Some(1));
        assert!(third_prev.is_some());
        assert!(fourth_prev.expect("waits for the third").await.is_err(), "a dropped signal releases the next");
    }
}
