//! Long polling (`getUpdates`, Bot API "Getting updates"): the offset moves
//! past a batch only after every update of it was confirmed by the broker,
//! so a crash or a broker outage re-reads the batch instead of losing it
//! (the workers drop duplicates by `update_id`).

use crate::forwarder::Forwarder;
use shared::retry::{sleep_or_stopped, Policy};
use shared::telegram::{BotApi, RoutingInfo, TelegramError};
use tokio_util::sync::CancellationToken;

/// Why polling cannot take updates now (`None`: it can), for `/readyz`.
#[derive(Debug, Default)]
pub struct PollStatus {
    problem: std::sync::Mutex<Option<String>>,
}

impl PollStatus {
    /// The reason polling is not ready, if it is not.
    pub fn problem(&self) -> Option<String> {
        self.problem.lock().ok().and_then(|p| p.clone())
    }

    fn set(&self, problem: Option<String>) {
        if let Ok(mut p) = self.problem.lock() {
            *p = problem;
        }
    }
}

/// What a failed `getUpdates` means for readiness (Bot API "Making
/// requests": 401 is a wrong or revoked token; 409 is a webhook set on the
/// bot, or another `getUpdates` consumer of the same token).
fn not_ready_reason(e: &TelegramError) -> Option<String> {
    let TelegramError::Api(description) = e else { return None };
    if description.starts_with("Unauthorized") || description.contains("Invalid bot token") {
        Some(format!("getUpdates: the bot token is refused (401 {description})"))
    } else if description.starts_with("Conflict") {
        Some(format!("getUpdates: 409 {description}"))
    } else {
        None
    }
}

/// Runs the `getUpdates` loop until `shutdown`. First it calls
/// `deleteWebhook` (keeping pending updates): `getUpdates` answers 409
/// while a webhook is set. A 401 or 409 makes the ingress not ready
/// (`status`) until a `getUpdates` succeeds again.
pub async fn run(bot: BotApi, forwarder: &Forwarder, timeout_s: u32, status: &PollStatus, shutdown: CancellationToken) {
    match bot.delete_webhook().await {
        Ok(()) => tracing::info!("polling mode: deleteWebhook called (pending updates kept)"),
        Err(e) => tracing::warn!(error.message = %e, "polling mode: deleteWebhook failed; getUpdates may answer 409"),
    }
    let mut offset: i64 = 0;
    let mut backoff = Policy::BotApiPoll.backoff();
    loop {
        let batch = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = bot.get_updates_raw(offset, timeout_s) => r,
        };
        let updates = match batch {
            Ok(u) => {
                status.set(None);
                u
            }
            Err(e) => {
                let wait = match &e {
                    TelegramError::RetryAfter(d) => *d,
                    _ => backoff.next_or_last(),
                };
                let reason = not_ready_reason(&e);
                if reason.is_some() && status.problem().is_none() {
                    // Said once per episode, not on every retry.
                    tracing::error!(error.message = %e, "polling is not ready");
                } else {
                    tracing::warn!(error.message = %e, wait_s = wait.as_secs_f64(), "getUpdates failed");
                }
                if reason.as_deref().is_some_and(|r| r.contains("webhook")) {
                    // Someone set a webhook after we started: take the bot back.
                    let _ = bot.delete_webhook().await;
                }
                status.set(reason);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_token_and_a_conflict_make_polling_not_ready_and_other_errors_do_not() {
        let conflict = TelegramError::Api(
            "Conflict: can't use getUpdates method while webhook is active; use deleteWebhook to delete the webhook first"
                .into(),
        );
        assert!(not_ready_reason(&conflict).is_some_and(|r| r.contains("409") && r.contains("webhook")));
        assert!(not_ready_reason(&TelegramError::Api("Unauthorized".into())).is_some_and(|r| r.contains("401")));
        assert_eq!(not_ready_reason(&TelegramError::Transport("reset".into())), None);
        assert_eq!(not_ready_reason(&TelegramError::Api("Bad Gateway".into())), None);
    }
}
