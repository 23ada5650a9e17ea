//! Progress while an answer streams: a native draft (`sendMessageDraft`,
//! Bot API 9.3, private chats) or, in groups, one message edited in place.
//! Only the newest text is sent, at most once per `PROGRESS_INTERVAL_MS`;
//! a 429 pauses progress for `retry_after`.

use crate::context::WorkerContext;
use shared::telegram::{split_message, TelegramError, MAX_MESSAGE_UTF16};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A running progress display; [`Progress::finish`] stops it.
pub struct Progress {
    text: watch::Sender<String>,
    stop: CancellationToken,
    task: JoinHandle<Option<i64>>,
}

impl Progress {
    /// Starts showing progress in `chat_id` (typing first).
    pub fn start(ctx: &WorkerContext, chat_id: i64, private: bool, draft_id: i64) -> Self {
        let (tx, rx) = watch::channel(String::new());
        let stop = CancellationToken::new();
        let task = tokio::spawn(show(
            ctx.clone(),
            chat_id,
            private,
            draft_id,
            rx,
            stop.clone(),
        ));
        Self {
            text: tx,
            stop,
            task,
        }
    }

    /// The whole answer so far (only the newest value is ever sent).
    pub fn update(&self, text: String) {
        self.text.send_replace(text);
    }

    /// Stops and returns the id of the group progress message, if one was sent.
    pub async fn finish(self) -> Option<i64> {
        self.stop.cancel();
        self.task.await.ok().flatten()
    }
}

async fn show(
    ctx: WorkerContext,
    chat_id: i64,
    private: bool,
    draft_id: i64,
    mut rx: watch::Receiver<String>,
    stop: CancellationToken,
) -> Option<i64> {
    let interval = Duration::from_millis(ctx.settings.progress_interval_ms);
    let mut message_id: Option<i64> = None;
    let _ = ctx.telegram.send_typing(chat_id).await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return message_id,
            changed = rx.changed() => if changed.is_err() { return message_id; },
        }
        let full = rx.borrow_and_update().clone();
        // Show the part being written now.
        let Some(text) = split_message(&full, MAX_MESSAGE_UTF16).pop() else {
            continue;
        };
        let sent = if private {
            ctx.telegram
                .send_message_draft(chat_id, draft_id, &text)
                .await
        } else if let Some(id) = message_id {
            ctx.telegram.edit_message_text(chat_id, id, &text).await
        } else {
            match ctx.telegram.send_message(chat_id, &text, None).await {
                Ok(m) => {
                    message_id = Some(m.message_id);
                    Ok(())
                }
                Err(e) => Err(e),
            }
        };
        let pause = match sent {
            Ok(()) | Err(TelegramError::NotModified) => interval,
            Err(TelegramError::RetryAfter(d)) => d.max(interval),
            Err(e) => {
                tracing::debug!(error.message = %e, "progress update failed");
                interval
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return message_id,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}
