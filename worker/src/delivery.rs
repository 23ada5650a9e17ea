//! Sending text to a chat: split at 4,096 UTF-16 code units, paced per
//! chat, `retry_after` obeyed (waits accumulate across retries), 403 stops
//! the output, "message is not modified" is success (DESIGN §7).

use crate::context::WorkerContext;
use backon::{BackoffBuilder, ExponentialBuilder};
use shared::telegram::{split_message, TelegramError, MAX_MESSAGE_UTF16};
use std::time::Duration;

/// Why text could not be delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// The user blocked the bot (403): stop sending to this chat.
    #[error("the user blocked the bot")]
    Blocked,
    /// Every retry failed.
    #[error("delivery failed: {0}")]
    Failed(String),
}

const MAX_TRIES: usize = 6;

/// Sends `text` in as many parts as needed. With `reuse`, the first part
/// replaces the text of that message (the edited-in-place progress message)
/// instead of sending a new one. Returns the message ids.
///
/// # Errors
/// [`DeliveryError`].
pub async fn send_text(
    ctx: &WorkerContext,
    chat_id: i64,
    text: &str,
    reuse: Option<i64>,
) -> Result<Vec<i64>, DeliveryError> {
    let interval = Duration::from_millis(ctx.settings.chat_send_interval_ms);
    let mut ids = Vec::new();
    for (i, part) in split_message(text, MAX_MESSAGE_UTF16)
        .into_iter()
        .enumerate()
    {
        if i > 0 {
            tokio::time::sleep(interval).await;
        }
        let id = match (i, reuse) {
            (0, Some(message_id)) => {
                with_retries(|| async {
                    ctx.telegram
                        .edit_message_text(chat_id, message_id, &part)
                        .await
                        .map(|()| message_id)
                })
                .await?
            }
            _ => {
                with_retries(|| async {
                    ctx.telegram
                        .send_message(chat_id, &part, None)
                        .await
                        .map(|m| m.message_id)
                })
                .await?
            }
        };
        ids.push(id);
    }
    Ok(ids)
}

/// Runs one Bot API call with the retry policy: 429 waits `retry_after`,
/// transport errors back off with jitter, 403 and other API errors stop.
///
/// # Errors
/// [`DeliveryError`].
pub async fn with_retries<T, F, Fut>(mut call: F) -> Result<T, DeliveryError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, TelegramError>>,
    T: Default,
{
    let mut backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(300))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .with_max_times(MAX_TRIES)
        .build();
    let mut waited = Duration::ZERO;
    for _ in 0..MAX_TRIES {
        match call().await {
            Ok(v) => return Ok(v),
            Err(TelegramError::NotModified) => return Ok(T::default()),
            Err(TelegramError::Forbidden(_)) => return Err(DeliveryError::Blocked),
            Err(TelegramError::RetryAfter(d)) => {
                waited += d;
                tracing::warn!(
                    retry_after_s = d.as_secs(),
                    waited_s = waited.as_secs(),
                    "telegram flood control; waiting"
                );
                tokio::time::sleep(d).await;
            }
            Err(TelegramError::Transport(e)) => {
                let wait = backoff.next().unwrap_or(Duration::from_secs(10));
                tracing::warn!(error.message = %e, "telegram transport error; retrying");
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(DeliveryError::Failed(e.to_string())),
        }
    }
    Err(DeliveryError::Failed("retries exhausted".into()))
}
