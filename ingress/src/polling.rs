//! Long polling (`getUpdates`, Bot API "Getting updates"): the offset moves
//! past a batch only after every update of it was confirmed by the broker,
//! so a crash or a broker outage re-reads the batch instead of losing it
//! (the workers drop duplicates by `update_id`).

use crate::startup::Forwarder;
use shared::retry::{sleep_or_stopped, Policy};
use shared::telegram::{BotApi, RoutingInfo, TelegramError};
use tokio_util::sync::CancellationToken;

/// Runs the `getUpdates` loop until `shutdown`.
pub async fn run(bot: BotApi, forwarder: &Forwarder, timeout_s: u32, shutdown: CancellationToken) {
    let mut offset: i64 = 0;
    let mut backoff = Policy::BotApiPoll.backoff();
    loop {
        let batch = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = bot.get_updates_raw(offset, timeout_s) => r,
        };
        let updates = match batch {
            Ok(u) => u,
            Err(e) => {
                let wait = match &e {
                    TelegramError::RetryAfter(d) => *d,
                    _ => backoff.next_or_last(),
                };
                tracing::warn!(error.message = %e, wait_s = wait.as_secs_f64(), "getUpdates failed");
                if sleep_or_stopped(wait, &shutdown).await {
                    return;
                }
                continue;
            }
        };
        match forward_batch(forwarder, &updates).await {
            Ok(Some(next)) => {
                offset = next;
                backoff = Policy::BotApiPoll.backoff();
            }
            Ok(None) => {}
            Err(e) => {
                let wait = backoff.next_or_last();
                tracing::error!(error.message = %e, wait_s = wait.as_secs_f64(), "batch not confirmed; offset kept, retrying");
                if sleep_or_stopped(wait, &shutdown).await {
                    return;
                }
            }
        }
    }
}

/// Publishes every update of a batch; returns the next offset, or `None`
/// for an empty batch.
///
/// # Errors
/// The first publish that failed: the caller keeps the offset.
pub async fn forward_batch(
    forwarder: &Forwarder,
    updates: &[Box<serde_json::value::RawValue>],
) -> Result<Option<i64>, shared::amqp::BrokerError> {
    let mut max_id = None;
    for raw in updates {
        let bytes = raw.get().as_bytes();
        match RoutingInfo::from_bytes(bytes) {
            Ok(info) => {
                forwarder.forward(&info, bytes).await?;
                max_id = max_id.max(Some(info.update_id));
            }
            // Telegram never sends these; keep a trace rather than crash.
            Err(e) => {
                tracing::error!(error.message = %e, bytes = bytes.len(), "getUpdates returned a body without update_id")
            }
        }
    }
    Ok(max_id.map(|m| m + 1))
}
