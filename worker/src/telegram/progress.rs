//! Progress while an answer streams (DESIGN §7): `typing` first, then a
//! native draft (`sendMessageDraft`, Bot API 9.3, private chats) or, in
//! groups, one message edited in place and rolled over to a new message
//! before 4,096 UTF-16 units. Every call goes through the pacer; only the
//! newest text is sent when a slot comes (coalescing), identical text is
//! never sent twice, and a 403 cancels the job at once.

use crate::cancel::{CancelReason, JobCancel};
use crate::context::WorkerContext;
use crate::telegram::delivery::{render, Shown};
use shared::telegram::TelegramError;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

/// A running progress display; [`Progress::finish`] stops it.
pub struct Progress {
    text: watch::Sender<String>,
    stop: CancellationToken,
    /// The display task: aborted if the job is dropped before [`Progress::finish`].
    task: AbortOnDropHandle<Vec<Shown>>,
}

impl Progress {
    /// Starts showing progress in `chat_id` (forum topic `thread`); in a
    /// group the progress message replies to message `reply_to`.
    pub fn start(
        ctx: &WorkerContext,
        chat_id: i64,
        thread: Option<i64>,
        reply_to: Option<i64>,
        private: bool,
        draft_id: i64,
        job: JobCancel,
    ) -> Self {
        let (tx, rx) = watch::channel(String::new());
        let stop = CancellationToken::new();
        #[expect(clippy::disallowed_methods, reason = "owned: an AbortOnDropHandle held by this Progress")]
        let task = AbortOnDropHandle::new(tokio::spawn(show(
            ctx.clone(),
            chat_id,
            thread,
            reply_to,
            private,
            draft_id,
            rx,
            stop.clone(),
            job,
        )));
        Self { text: tx, stop, task }
    }

    /// The whole answer so far, Markdown (only the newest value is ever sent).
    pub fn update(&self, text: String) {
        self.text.send_replace(text);
    }

    /// Stops and returns the group progress messages, in order, with what
    /// each is known to show.
    pub async fn finish(self) -> Vec<Shown> {
        self.stop.cancel();
        self.task.await.unwrap_or_default()
    }
}

#[expect(clippy::too_many_arguments, reason = "one task's whole state, passed once at spawn")]
async fn show(
    ctx: WorkerContext,
    chat_id: i64,
    thread: Option<i64>,
    reply_to: Option<i64>,
    private: bool,
    draft_id: i64,
    mut rx: watch::Receiver<String>,
    stop: CancellationToken,
    job: JobCancel,
) -> Vec<Shown> {
    let mut messages: Vec<Shown> = Vec::new();
    let mut last_sent = String::new();
    // Drafts until Telegram refuses them (older clients, chats without
    // drafts); then one message edited in place, as in groups.
    let mut drafts = private;
    let typing = tokio::select! {
        _ = stop.cancelled() => return messages,
        r = ctx.pacer.call_action(chat_id, || ctx.telegram.send_typing_in(chat_id, thread)) => r,
    };
    if let Err(TelegramError::Forbidden(_)) = typing {
        job.cancel(CancelReason::Blocked);
        return messages;
    }
    loop {
        tokio::select! {
            _ = stop.cancelled() => return messages,
            changed = rx.changed() => if changed.is_err() { return messages; },
        }
        // Wait for the slot first, then send the newest text (coalescing).
        tokio::select! {
            _ = stop.cancelled() => return messages,
            () = ctx.pacer.wait_turn(chat_id) => {}
        }
        let full = rx.borrow_and_update().clone();
        let parts = render(&full);
        let Some(current) = parts.last() else { continue };
        if current.text == last_sent {
            continue;
        }
        let mut sent = if drafts {
            ctx.telegram.send_message_draft(chat_id, draft_id, &current.text, current.entities_json()).await
        } else {
            update_group(&ctx, chat_id, thread, reply_to, &mut messages, &parts).await
        };
        if drafts && matches!(sent, Err(TelegramError::Api(_))) {
            tracing::info!("drafts refused; editing one message in place instead");
            drafts = false;
            sent = update_group(&ctx, chat_id, thread, reply_to, &mut messages, &parts).await;
        }
        match sent {
            Ok(()) | Err(TelegramError::NotModified) => last_sent = current.text.clone(),
            Err(TelegramError::RetryAfter(d)) => ctx.pacer.pause(chat_id, d).await,
            Err(TelegramError::Forbidden(e)) => {
                tracing::warn!(error.message = %e, "user blocked the bot; stopping the answer");
                job.cancel(CancelReason::Blocked);
                return messages;
            }
            Err(e) => tracing::debug!(error.message = %e, "progress update failed"),
        }
    }
}

/// Group progress: the last message shows the last part; when a new part
/// starts, the previous message gets its final part text and a new message
/// is sent for the new part.
async fn update_group(
    ctx: &WorkerContext,
    chat_id: i64,
    thread: Option<i64>,
    reply_to: Option<i64>,
    messages: &mut Vec<Shown>,
    parts: &[shared::telegram::Formatted],
) -> Result<(), TelegramError> {
    while messages.len() < parts.len() {
        let index = messages.len();
        if let (Some(prev), Some(p)) = (messages.last_mut(), index.checked_sub(1).and_then(|i| parts.get(i))) {
            edit(ctx, chat_id, prev, p).await.ok();
        }
        let part = &parts[index];
        // Only the first message replies to the question.
        let reply = if index == 0 { reply_to } else { None };
        let m = ctx.telegram.send_message_in(chat_id, thread, reply, &part.text, part.entities_json()).await?;
        messages.push(Shown { message_id: m.message_id, part: Some(part.clone()) });
        if index + 1 < parts.len() {
            continue;
        }
        return Ok(());
    }
    match (messages.last_mut(), parts.last()) {
        (Some(shown), Some(p)) => edit(ctx, chat_id, shown, p).await,
        _ => Ok(()),
    }
}

/// Edits `shown` to `part` and records what it shows: `part` on success
/// (or "not modified"), unknown on any other error.
async fn edit(
    ctx: &WorkerContext,
    chat_id: i64,
    shown: &mut Shown,
    part: &shared::telegram::Formatted,
) -> Result<(), TelegramError> {
    let r = ctx.telegram.edit_message_text(chat_id, shown.message_id, &part.text, part.entities_json()).await;
    shown.part = match &r {
        Ok(()) | Err(TelegramError::NotModified) => Some(part.clone()),
        Err(_) => None,
    };
    r
}
