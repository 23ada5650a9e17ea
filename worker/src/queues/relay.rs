//! The billing outbox relay: publishes events written by `finalize` to the
//! `billing` exchange with confirms, then marks them published. Rows are
//! taken with `FOR UPDATE SKIP LOCKED`, so every worker can run a relay;
//! an event published but not yet marked (crash in between) is published
//! again, which the ledger's unique event id makes harmless.

use crate::context::WorkerContext;
use crate::store::outbox as store;
use shared::amqp::{Outgoing, BILLING_ROUTING_KEY};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub use crate::store::outbox::write;

/// Events relayed per transaction.
const BATCH: i64 = 100;

/// Relays one batch; returns how many events were published.
///
/// # Errors
/// Database errors; a publish failure ends the batch early (the rest stays
/// unpublished and is retried).
pub async fn relay_batch(ctx: &WorkerContext) -> Result<usize, sqlx::Error> {
    let (backlog, age) = store::backlog(&ctx.db).await?;
    metrics::gauge!("fleet_outbox_backlog").set(backlog as f64);
    metrics::gauge!("fleet_outbox_oldest_age_seconds").set(age);
    let mut tx = shared::db::begin(&ctx.db).await?;
    let rows = store::take_unpublished(&mut tx, BATCH).await?;
    let exchange = ctx.topology.billing_exchange();
    let mut published = Vec::with_capacity(rows.len());
    for (event_id, payload) in &rows {
        let body = payload.to_string();
        let id = event_id.to_string();
        let sent = ctx
            .publisher
            .publish(Outgoing {
                exchange: &exchange,
                routing_key: BILLING_ROUTING_KEY,
                body: body.as_bytes(),
                message_id: Some(&id),
                content_type: "application/json",
                attempt: None,
            })
            .await;
        match sent {
            Ok(()) => published.push(*event_id),
            Err(e) => {
                tracing::warn!(event_id = %event_id, error.message = %e, "outbox publish failed; will retry");
                break;
            }
        }
    }
    store::mark_published(&mut tx, &published).await?;
    tx.commit().await?;
    metrics::counter!("fleet_outbox_published_total").increment(published.len() as u64);
    Ok(published.len())
}

/// Runs the relay until `shutdown`: after every notify, and every second.
pub async fn run(ctx: WorkerContext, shutdown: CancellationToken) {
    loop {
        let more = match relay_batch(&ctx).await {
            Ok(n) => n as i64 == BATCH,
            Err(e) => {
                tracing::warn!(error.message = %e, "outbox relay failed");
                false
            }
        };
        if more {
            continue;
        }
        tokio::select! {
            _ = shutdown.cancelled() => {
                // Last pass so that finished jobs' events leave with us.
                let _ = relay_batch(&ctx).await;
                return;
            }
            _ = ctx.outbox_notify.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
