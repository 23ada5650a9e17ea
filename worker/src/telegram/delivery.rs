//! Sending an answer or a notice to a chat (DESIGN §7): Markdown rendered to
//! entities (never `parse_mode`), split at 4,096 UTF-16 code units, every
//! call through the fleet-wide [`Pacer`](crate::telegram::pacer::Pacer). Error
//! classes: "message is not modified" is success; entities rejected → the
//! part is sent again once as plain text; "message to edit not found" /
//! "can't be edited" → sent as a new message; 403 → [`DeliveryError::Blocked`].

use crate::context::WorkerContext;
use shared::telegram::{split_formatted, to_entities, Formatted, TelegramError, MAX_MESSAGE_UTF16};

/// Why text could not be delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// The user blocked the bot (403): stop sending to this chat.
    #[error("the user blocked the bot")]
    Blocked,
    /// Every retry failed, or Telegram refused the message.
    #[error("delivery failed: {0}")]
    Failed(String),
    /// The first parts reached the chat (`sent`: their message ids, in
    /// order) and a later one failed after every retry: the user has the
    /// beginning of the text.
    #[error("delivery failed after {} part(s) were sent: {error}", sent.len())]
    PartlyDelivered {
        /// Ids of the parts that were sent.
        sent: Vec<i64>,
        /// Why the next part failed.
        error: String,
    },
    /// The job's lease was lost before a part was sent: another worker
    /// delivers now; nothing more is sent from here.
    #[error("lease lost before delivery")]
    LeaseLost,
}

impl From<TelegramError> for DeliveryError {
    fn from(e: TelegramError) -> Self {
        match e {
            TelegramError::Forbidden(_) => Self::Blocked,
            TelegramError::Aborted(_) => Self::LeaseLost,
            other => Self::Failed(other.to_string()),
        }
    }
}

/// A message the job already shows (a group's progress message), reused
/// for a part of the answer: edited into it, or left alone when it shows
/// that part already (no edit that would change nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shown {
    /// The message.
    pub message_id: i64,
    /// What it shows, when known for sure (its last edit succeeded).
    pub part: Option<Formatted>,
}

/// The parts of `markdown` as Telegram messages.
pub fn render(markdown: &str) -> Vec<Formatted> {
    split_formatted(&to_entities(markdown), MAX_MESSAGE_UTF16)
}

/// Sends `markdown` in as many messages as needed. Parts go into the
/// messages of `reuse` first (the progress messages of a group, edited in
/// place), then into new messages; extra progress messages are deleted.
/// Returns the message ids, in order.
///
/// # Errors
/// [`DeliveryError`].
pub async fn send_text(
    ctx: &WorkerContext,
    chat_id: i64,
    markdown: &str,
    reuse: &[Shown],
) -> Result<Vec<i64>, DeliveryError> {
    send_fenced(ctx, chat_id, markdown, reuse, None).await
}

/// As [`send_text`] for a job's answer: every Bot API call (retries after
/// a 429 included) first checks the lease with a heartbeat, so a worker
/// that lost its lease while sending (paused, long 429 waits) never sends
/// the answer a second time.
///
/// # Errors
/// [`DeliveryError`], `LeaseLost` included.
pub async fn send_fenced(
    ctx: &WorkerContext,
    chat_id: i64,
    markdown: &str,
    reuse: &[Shown],
    lease: Option<&crate::store::jobs::ClaimedJob>,
) -> Result<Vec<i64>, DeliveryError> {
    send_fenced_in(ctx, chat_id, None, None, markdown, reuse, lease).await
}

/// As [`send_fenced`], into forum topic `thread` (`None`: the chat itself);
/// the first new message replies to message `reply_to` (groups: the
/// message the answer is for; it is sent even if that one is gone).
///
/// # Errors
/// [`DeliveryError`], `LeaseLost` included.
pub async fn send_fenced_in(
    ctx: &WorkerContext,
    chat_id: i64,
    thread: Option<i64>,
    reply_to: Option<i64>,
    markdown: &str,
    reuse: &[Shown],
    lease: Option<&crate::store::jobs::ClaimedJob>,
) -> Result<Vec<i64>, DeliveryError> {
    let out = Outgoing { ctx, lease, thread, reply_to: std::sync::Mutex::new(reply_to) };
    let mut ids = Vec::new();
    let parts = render(markdown);
    for (i, part) in parts.iter().enumerate() {
        let id = match reuse.get(i) {
            Some(shown) if shown.part.as_ref() == Some(part) => {
                metrics::counter!("fleet_telegram_edits_skipped_total").increment(1);
                Ok(shown.message_id)
            }
            Some(&Shown { message_id, .. }) => match out.edit(chat_id, message_id, part).await {
                Ok(()) => Ok(message_id),
                Err(TelegramError::Api(d))
                    if d.contains("message to edit not found") || d.contains("can't be edited") =>
                {
                    out.send(chat_id, part).await
                }
                Err(e) => Err(e.into()),
            },
            None => out.send(chat_id, part).await,
        };
        match id {
            Ok(id) => ids.push(id),
            // What reached the chat is not nothing: the caller records it.
            Err(DeliveryError::Failed(error)) if !ids.is_empty() => {
                return Err(DeliveryError::PartlyDelivered { sent: ids, error });
            }
            Err(e) => return Err(e),
        }
    }
    for extra in reuse.iter().skip(parts.len()).map(|s| s.message_id) {
        let _ = ctx.pacer.call(chat_id, || ctx.telegram.delete_message(chat_id, extra)).await;
    }
    Ok(ids)
}

/// Bot API calls of one delivery, fenced on the job's lease when there is one.
struct Outgoing<'a> {
    ctx: &'a WorkerContext,
    lease: Option<&'a crate::store::jobs::ClaimedJob>,
    /// Forum topic of new messages (edits keep their message's topic).
    thread: Option<i64>,
    /// The message the first new message replies to; taken by the first send.
    reply_to: std::sync::Mutex<Option<i64>>,
}

impl Outgoing<'_> {
    /// `Err(Aborted)` when the lease is gone.
    async fn fence(&self) -> Result<(), TelegramError> {
        let Some(lease) = self.lease else { return Ok(()) };
        let visibility = std::time::Duration::from_secs(self.ctx.settings.visibility_timeout_s);
        match lease.heartbeat(&self.ctx.db, visibility).await {
            Ok(crate::store::jobs::Beat::Lost) => Err(TelegramError::Aborted("the job's lease was lost".into())),
            Ok(_) => Ok(()),
            // Not known to be lost: the pacer retries the call (and this check).
            Err(e) => Err(TelegramError::Transport(format!("lease check failed: {e}"))),
        }
    }

    async fn send_once(
        &self,
        chat_id: i64,
        text: &str,
        entities: Option<Vec<serde_json::Value>>,
    ) -> Result<i64, TelegramError> {
        // Poisoned only by a panic while holding it, which nothing here can do.
        let reply_to = self.reply_to.lock().ok().and_then(|r| *r);
        let sent = self
            .ctx
            .pacer
            .call(chat_id, || async {
                self.fence().await?;
                self.ctx.telegram.send_message_in(chat_id, self.thread, reply_to, text, entities.clone()).await
            })
            .await
            .map(|m| m.message_id)?;
        if let Ok(mut r) = self.reply_to.lock() {
            *r = None;
        }
        Ok(sent)
    }

    /// Sends one part; entities rejected → once more as plain text.
    async fn send(&self, chat_id: i64, part: &Formatted) -> Result<i64, DeliveryError> {
        match self.send_once(chat_id, &part.text, part.entities_json()).await {
            Ok(id) => Ok(id),
            Err(TelegramError::BadEntities(e)) => {
                tracing::warn!(error.message = %e, "entities rejected; sending as plain text");
                Ok(self.send_once(chat_id, &part.text, None).await?)
            }
            Err(TelegramError::Migrated(to)) => {
                // The group became a supergroup: move the chat, resend once there.
                crate::chats::migrate(&self.ctx.db, chat_id, to)
                    .await
                    .map_err(|e| DeliveryError::Failed(e.to_string()))?;
                Ok(self.send_once(to, &part.text, part.entities_json()).await?)
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn edit_once(
        &self,
        chat_id: i64,
        message_id: i64,
        part: &Formatted,
        entities: bool,
    ) -> Result<(), TelegramError> {
        let r = self
            .ctx
            .pacer
            .call(chat_id, || async {
                self.fence().await?;
                let e = if entities { part.entities_json() } else { None };
                self.ctx.telegram.edit_message_text(chat_id, message_id, &part.text, e).await
            })
            .await;
        match r {
            Err(TelegramError::NotModified) => Ok(()),
            other => other,
        }
    }

    /// Edits one message to `part`; entities rejected → once more as plain text.
    async fn edit(&self, chat_id: i64, message_id: i64, part: &Formatted) -> Result<(), TelegramError> {
        match self.edit_once(chat_id, message_id, part, true).await {
            Err(TelegramError::BadEntities(_)) => self.edit_once(chat_id, message_id, part, false).await,
            other => other,
        }
    }
}

/// Edits one message to `part` (no lease); entities rejected → once more as plain text.
///
/// # Errors
/// The classified error ("not modified" is success).
pub async fn edit(ctx: &WorkerContext, chat_id: i64, message_id: i64, part: &Formatted) -> Result<(), TelegramError> {
    Outgoing { ctx, lease: None, thread: None, reply_to: std::sync::Mutex::new(None) }
        .edit(chat_id, message_id, part)
        .await
}
