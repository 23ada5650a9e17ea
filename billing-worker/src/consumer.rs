//! The `billing.events` consumer. Each delivery is applied in one
//! transaction and acked after the commit. Failures are classified once, in
//! [`decide`]: transient → the next `billing.retry.<n>` delay queue
//! (exponential backoff); permanent, or transient after the last delay →
//! `billing.dead` plus a `billing_failures` row. Never only a log line.
//!
//! A hold release waits for its job's charges without that counting as a
//! retry: the relay publishes them before it, so when they reached this
//! consumer first they are in this batch or an earlier one, which it waits
//! for ([`handle_batch`]); charges that are elsewhere (another
//! billing-worker, a retry queue) make it [`Decision::Defer`]red: put back
//! on the first delay queue with its `x-deferrals` header counted up, its
//! `x-attempt` unchanged, logged at DEBUG and counted in
//! `fleet_billing_deferred_total`, not as `retried`.

use crate::ledger::{self, Applied, LedgerError};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use shared::amqp::{self, attempt_of, deferrals_of, ConfirmPublisher, Outgoing, Topology, DEFERRALS_HEADER};
use shared::contracts::BillingEvent;
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Everything the consumer needs.
#[derive(Clone)]
pub struct BillingContext {
    /// Billing database.
    pub db: PgPool,
    /// Queue names and retry delays.
    pub topology: Topology,
    /// Publisher for delay and dead-letter queues.
    pub publisher: Arc<ConfirmPublisher>,
    /// AMQP URL.
    pub amqp_url: String,
    /// Prefetch.
    pub prefetch: u16,
    /// Most deliveries applied in one transaction (those already received
    /// when the first is taken: batching never waits for more).
    pub batch_size: usize,
    /// True while the consumer is connected and consuming (readiness).
    pub consuming: Arc<std::sync::atomic::AtomicBool>,
    /// Backoff of each retry step, ms (its length is the number of retries).
    pub retry_delays_ms: Vec<u64>,
    /// Bot API client, to tell a user that a charge is pending review.
    pub telegram: Option<shared::telegram::BotApi>,
}

/// What happens to a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Applied or duplicate: ack.
    Ack,
    /// Transient failure: to delay queue `n`, then ack.
    Retry(usize),
    /// Not a failure: the event waits for others (a hold release for its
    /// job's charges). To the first delay queue, attempt unchanged, then ack.
    Defer,
    /// Permanent failure or out of attempts: to `billing.dead`, record, ack.
    DeadLetter(String),
}

/// Maps a result to a decision; `attempt` counts earlier deliveries (0 first).
pub fn decide(result: &Result<Applied, LedgerError>, attempt: i64, retry_queues: usize) -> Decision {
    match result {
        Ok(_) => Decision::Ack,
        Err(e) if e.is_transient() => {
            let n = usize::try_from(attempt).unwrap_or(usize::MAX);
            if n < retry_queues {
                Decision::Retry(n)
            } else {
                Decision::DeadLetter(format!("failed after {} attempts: {e}", n + 1))
            }
        }
        Err(e) => Decision::DeadLetter(e.to_string()),
    }
}

/// As [`decide`], for a delivery deferred `deferrals` times before: a hold
/// release waiting for its job's charges is not failing, so it is
/// [`Decision::Defer`]red (the first, short, step, without walking the
/// backoff or counting an attempt) up to [`MAX_DEFERRALS`] times, about ten
/// minutes, landing right after charges that were themselves delayed (a
/// database restart, another billing-worker); after that it is a failure.
pub fn decide_delivery(
    result: &Result<Applied, LedgerError>,
    attempt: i64,
    deferrals: i64,
    retry_queues: usize,
) -> Decision {
    match result {
        Err(LedgerError::ChargesPending(_)) if deferrals < MAX_DEFERRALS => Decision::Defer,
        _ => decide(result, attempt, retry_queues),
    }
}

/// Consumes until `shutdown`, reconnecting with backoff.
pub async fn run(ctx: BillingContext, shutdown: CancellationToken) {
    amqp::reconnecting("billing", &shutdown, || consume(&ctx, &shutdown)).await;
}

async fn consume(ctx: &BillingContext, shutdown: &CancellationToken) -> Result<(), amqp::BrokerError> {
    let mut sub = amqp::Subscription::open(&ctx.amqp_url, "billing-worker", ctx.prefetch, &ctx.topology).await?;
    sub.consume(&ctx.topology.billing_queue()).await?;
    tracing::info!(queue = %ctx.topology.billing_queue(), "consuming billing events");
    ctx.consuming.store(true, std::sync::atomic::Ordering::Relaxed);
    let _flag = ResetOnDrop(ctx.consuming.clone());
    let mut tasks = JoinSet::new();
    // A few batches in flight at once: while they commit, deliveries pile
    // up in the prefetch window and the next batch takes them all.
    let lanes = Arc::new(tokio::sync::Semaphore::new(BATCH_LANES));
    // One token per batch in flight, cancelled when it is done: a batch's
    // hold releases wait for the batches taken before it.
    let mut in_flight: Vec<CancellationToken> = Vec::new();
    let result = loop {
        while tasks.try_join_next().is_some() {}
        in_flight.retain(|t| !t.is_cancelled());
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            p = lanes.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break Ok(()),
            },
        };
        let first = match sub.next(shutdown).await {
            Ok(Some(d)) => d,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        // Whatever else has already arrived joins the batch; nothing waits.
        let mut batch = vec![first];
        let mut lost = None;
        while batch.len() < ctx.batch_size.max(1) {
            match sub.next_ready() {
                Ok(Some(d)) => batch.push(d),
                Ok(None) => break,
                Err(e) => {
                    lost = Some(e);
                    break;
                }
            }
        }
        let task_ctx = ctx.clone();
        let before = in_flight.clone();
        let done = CancellationToken::new();
        in_flight.push(done.clone());
        tasks.spawn(async move {
            // Cancelled however the batch ends, a panic included.
            let _done = done.drop_guard();
            handle_batch(&task_ctx, batch, &before).await;
            drop(permit);
        });
        if let Some(e) = lost {
            break Err(e);
        }
    };
    // Batches in flight finish their database work (a dead-lettered event
    // gets its `billing_failures` row) even when the channel is gone; their
    // acks then fail and the broker redelivers, which is harmless (idempotent).
    let _ = tokio::time::timeout(Duration::from_secs(10), async { while tasks.join_next().await.is_some() {} }).await;
    sub.close().await;
    result
}

/// Deferrals of a hold release whose charges are not all applied yet
/// (each one step of the first delay queue: about ten minutes at the
/// default 1 s); after them it is retried as a failure, then dead-lettered.
pub const MAX_DEFERRALS: i64 = 600;

/// Batches applied concurrently by one consumer.
const BATCH_LANES: usize = 2;

/// Clears a readiness flag when the consumer stops, on every path.
struct ResetOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Applies the deliveries of a batch in one transaction and acks them; when
/// the batch fails (one bad or not-yet-applicable event, a deadlock, the
/// database gone) each delivery is handled on its own with [`handle`], so
/// one bad event never holds back the others. Malformed bodies and hold
/// releases are always handled on their own, after the charges, and hold
/// releases only once the batches taken `before` this one are done (the
/// job's charges, published before its release, are in one of them when
/// this consumer received them).
pub async fn handle_batch(ctx: &BillingContext, deliveries: Vec<Delivery>, before: &[CancellationToken]) {
    metrics::histogram!("fleet_billing_batch_size").record(deliveries.len() as f64);
    // Each body is decoded once, here; `handle_decoded` takes the result.
    let mut charges = Vec::new();
    let mut alone = Vec::new();
    for d in deliveries {
        match decode(&d) {
            Ok(event @ BillingEvent::HoldRelease(_)) => alone.push((d, Ok(event))),
            Err(e) => alone.push((d, Err(e))),
            Ok(event) => charges.push((d, event)),
        }
    }
    if charges.len() == 1 {
        let (d, event) = charges.remove(0);
        alone.insert(0, (d, Ok(event)));
    }
    if !charges.is_empty() {
        let events: Vec<BillingEvent> = charges.iter().map(|(_, e)| e.clone()).collect();
        match ledger::apply_batch(&ctx.db, &events).await {
            Ok(results) => {
                for ((d, event), applied) in charges.iter().zip(results) {
                    let label = if applied == Applied::Applied { "applied" } else { "duplicate" };
                    tracing::info!(event_id = %event.event_id(), result = label, "billing event applied in a batch");
                    metrics::counter!("fleet_billing_events_total", "result" => label).increment(1);
                    if let Err(e) = d.acker.ack(BasicAckOptions::default()).await {
                        tracing::warn!(error.message = %e, "could not ack; the broker will redeliver (a duplicate then)");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(events = charges.len(), error.message = %e, "batch failed; applying one by one");
                for (d, event) in charges {
                    handle_decoded(ctx, d, Ok(event)).await;
                }
            }
        }
    }
    if alone.iter().any(|(_, p)| matches!(p, Ok(BillingEvent::HoldRelease(_)))) {
        for batch in before {
            batch.cancelled().await;
        }
    }
    for (d, parsed) in alone {
        handle_decoded(ctx, d, parsed).await;
    }
}

/// A delivery's body as a billing event; the error names why it is malformed.
fn decode(d: &Delivery) -> Result<BillingEvent, String> {
    serde_json::from_slice(&d.data).map_err(|e| e.to_string())
}

/// Applies one delivery and settles it.
pub async fn handle(ctx: &BillingContext, d: Delivery) {
    let parsed = decode(&d);
    handle_decoded(ctx, d, parsed).await;
}

/// As [`handle`], for a body already decoded (`parsed`).
async fn handle_decoded(ctx: &BillingContext, d: Delivery, parsed: Result<BillingEvent, String>) {
    let attempt = attempt_of(&d.properties);
    let deferrals = deferrals_of(&d.properties);
    let (event_id, result) = match &parsed {
        Ok(event) => (Some(event.event_id()), ledger::apply_event(&ctx.db, event).await),
        Err(e) => (None, Err(LedgerError::Invalid(format!("malformed billing event: {e}")))),
    };
    let decision = decide_delivery(&result, attempt, deferrals, ctx.retry_delays_ms.len());
    match (&result, &decision) {
        (Ok(Applied::Applied), _) => tracing::info!(event_id = ?event_id, "billing event applied"),
        (Ok(Applied::Duplicate), _) => {
            tracing::info!(event_id = ?event_id, "duplicate billing event ignored")
        }
        (Err(e), Decision::Defer) => {
            tracing::debug!(event_id = ?event_id, deferrals, reason = %e, "billing event deferred")
        }
        (Err(e), _) => {
            tracing::warn!(event_id = ?event_id, attempt, error.message = %e, "billing event failed")
        }
    }
    let label = match (&result, &decision) {
        (Ok(Applied::Applied), _) => Some("applied"),
        (Ok(Applied::Duplicate), _) => Some("duplicate"),
        (_, Decision::Defer) => None,
        (_, Decision::Retry(_)) => Some("retried"),
        _ => Some("dead_lettered"),
    };
    match label {
        Some(label) => metrics::counter!("fleet_billing_events_total", "result" => label).increment(1),
        None => metrics::counter!("fleet_billing_deferred_total").increment(1),
    }
    let settled = match decision {
        Decision::Ack => Ok(()),
        Decision::Retry(n) => {
            let delay = jittered(ctx.retry_delays_ms.get(n).copied().unwrap_or(1_000));
            let queue = ctx.topology.billing_retry_queue(n);
            // A release past its deferrals keeps the count, so it stays a failure.
            let kept = [(DEFERRALS_HEADER, deferrals)];
            let headers = if deferrals > 0 { &kept[..] } else { &[] };
            republish_after(ctx, &d, &queue, attempt + 1, Some(delay), headers).await
        }
        Decision::Defer => {
            let delay = jittered(ctx.retry_delays_ms.first().copied().unwrap_or(1_000));
            let queue = ctx.topology.billing_retry_queue(0);
            republish_after(ctx, &d, &queue, attempt, Some(delay), &[(DEFERRALS_HEADER, deferrals + 1)]).await
        }
        Decision::DeadLetter(reason) => dead_letter(ctx, &d, event_id, attempt + 1, &reason).await,
    };
    let acked = match settled {
        Ok(()) => d.acker.ack(BasicAckOptions::default()).await,
        Err(e) => {
            tracing::warn!(error.message = %e, "could not move the event; requeueing");
            d.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await
        }
    };
    if let Err(e) = acked {
        tracing::warn!(error.message = %e, "could not settle delivery; the broker will redeliver");
    }
}

/// `base_ms` ± 20 % (jitter spreads a burst of failures over time).
fn jittered(base_ms: u64) -> u64 {
    let jitter = base_ms / 5;
    let spread = if jitter == 0 { 0 } else { u64::from(uuid::Uuid::now_v7().as_bytes()[15]) * 2 * jitter / 255 };
    base_ms - jitter + spread
}

async fn republish(ctx: &BillingContext, d: &Delivery, queue: &str, attempt: i64) -> Result<(), amqp::BrokerError> {
    republish_after(ctx, d, queue, attempt, None, &[]).await
}

async fn republish_after(
    ctx: &BillingContext,
    d: &Delivery,
    queue: &str,
    attempt: i64,
    delay_ms: Option<u64>,
    headers: &[(&str, i64)],
) -> Result<(), amqp::BrokerError> {
    let id = d.properties.message_id().as_ref().map(|m| m.to_string());
    ctx.publisher
        .publish_with_headers(
            Outgoing {
                exchange: "",
                routing_key: queue,
                body: &d.data,
                message_id: id.as_deref(),
                content_type: "application/json",
                attempt: Some(attempt),
            },
            delay_ms,
            headers,
        )
        .await
}

async fn dead_letter(
    ctx: &BillingContext,
    d: &Delivery,
    event_id: Option<uuid::Uuid>,
    attempts: i64,
    reason: &str,
) -> Result<(), amqp::BrokerError> {
    republish(ctx, d, &ctx.topology.billing_dead_queue(), attempts).await?;
    let payload: Option<serde_json::Value> = serde_json::from_slice(&d.data).ok();
    let key = event_id.unwrap_or_else(|| failure_key(payload.as_ref(), d));
    let recorded = sqlx::query(
        "INSERT INTO billing_failures (event_id, attempts, last_error, payload, dead_lettered_at)
         VALUES ($1, $2, $3, $4, now())
         ON CONFLICT (event_id) DO UPDATE SET attempts = EXCLUDED.attempts, last_error = EXCLUDED.last_error,
             dead_lettered_at = now(), resolved_at = NULL, updated_at = now()",
    )
    .bind(key)
    .bind(i32::try_from(attempts).unwrap_or(i32::MAX))
    .bind(reason)
    .bind(&payload)
    .execute(&ctx.db)
    .await;
    if let Err(e) = recorded {
        // The event is safe in billing.dead; the row is what finance reads.
        tracing::error!(event_id = %key, error.message = %e, "dead-lettered event could not be recorded in billing_failures");
    }
    tracing::error!(event_id = %key, reason, "billing event dead-lettered");
    notify_user(ctx, payload.as_ref()).await;
    Ok(())
}

/// The `billing_failures` id of a delivery that is not a billing event: the
/// `event_id` its body names (the id of its outbox row, which `reconcile`
/// reports as missing in the ledger), else its AMQP `message_id` (the relay
/// sets it to the event id), else an id derived from the bytes.
fn failure_key(payload: Option<&serde_json::Value>, d: &Delivery) -> uuid::Uuid {
    let named = payload.and_then(|p| p.get("event_id")).and_then(serde_json::Value::as_str);
    let message_id = d.properties.message_id().as_ref().map(|m| m.to_string());
    named
        .and_then(|s| uuid::Uuid::parse_str(s).ok())
        .or_else(|| message_id.and_then(|s| uuid::Uuid::parse_str(&s).ok()))
        .unwrap_or_else(|| uuid::Uuid::new_v5(&shared::contracts::EVENT_NAMESPACE, &d.data))
}

/// Tells the user a charge is pending review (never only a log line).
async fn notify_user(ctx: &BillingContext, payload: Option<&serde_json::Value>) {
    let (Some(bot), Some(p)) = (&ctx.telegram, payload) else { return };
    let Some(user) = p.get("user_id").and_then(serde_json::Value::as_i64) else { return };
    let what = match p.get("type").and_then(serde_json::Value::as_str) {
        Some(BillingEvent::TOP_UP) => {
            "A top-up of yours could not be booked yet; it is pending review and will be credited."
        }
        Some(BillingEvent::HOLD_RELEASE) => return,
        _ => "A charge for one of your recent answers is pending review. You will not be charged twice.",
    };
    if let Err(e) = bot.send_message(user, what, None).await {
        tracing::warn!(error.message = %e, user_id = user, "could not tell the user about the pending charge");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_errors_walk_the_delay_queues_then_dead_letter() {
        let transient: Result<Applied, LedgerError> = Err(LedgerError::Db(sqlx::Error::PoolTimedOut));
        assert_eq!(decide(&transient, 0, 5), Decision::Retry(0));
        assert_eq!(decide(&transient, 4, 5), Decision::Retry(4));
        assert!(matches!(decide(&transient, 5, 5), Decision::DeadLetter(_)));
        let permanent: Result<Applied, LedgerError> = Err(LedgerError::Invalid("bad".into()));
        assert!(matches!(decide(&permanent, 0, 5), Decision::DeadLetter(_)));
        assert_eq!(decide(&Ok(Applied::Duplicate), 0, 5), Decision::Ack);
    }

    #[test]
    fn a_release_waiting_for_its_charges_is_deferred_without_an_attempt_then_fails() {
        let pending: Result<Applied, LedgerError> = Err(LedgerError::ChargesPending(1));
        // However many real attempts it had, waiting is no failure.
        assert_eq!(decide_delivery(&pending, 0, 0, 5), Decision::Defer);
        assert_eq!(decide_delivery(&pending, 5, MAX_DEFERRALS - 1, 5), Decision::Defer);
        // Charges missing for the whole window: retried, then dead-lettered.
        assert_eq!(decide_delivery(&pending, 0, MAX_DEFERRALS, 5), Decision::Retry(0));
        assert!(matches!(decide_delivery(&pending, 5, MAX_DEFERRALS, 5), Decision::DeadLetter(_)));
        // Other failures are as before.
        let transient: Result<Applied, LedgerError> = Err(LedgerError::Db(sqlx::Error::PoolTimedOut));
        assert_eq!(decide_delivery(&transient, 1, 3, 5), Decision::Retry(1));
    }
}
