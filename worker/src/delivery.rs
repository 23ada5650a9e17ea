//! Sending an answer or a notice to a chat (DESIGN §7): Markdown rendered to
//! entities (never `parse_mode`), split at 4,096 UTF-16 code units, every
//! call through the fleet-wide [`Pacer`](crate::pacer::Pacer). Error
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
}

impl From<TelegramError> for DeliveryError {
    fn from(e: TelegramError) -> Self {
        match e {
            TelegramError::Forbidden(_) => Self::Blocked,
            other => Self::Failed(other.to_string()),
        }
    }
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
    reuse: &[i64],
) -> Result<Vec<i64>, DeliveryError> {
    let mut ids = Vec::new();
    let parts = render(markdown);
    for (i, part) in parts.iter().enumerate() {
        let id = match reuse.get(i) {
            Some(&message_id) => match edit(ctx, chat_id, message_id, part).await {
                Ok(()) => message_id,
                Err(TelegramError::Api(d))
                    if d.contains("message to edit not found") || d.contains("can't be edited") =>
                {
                    send(ctx, chat_id, part).await?
                }
                Err(e) => return Err(e.into()),
            },
            None => send(ctx, chat_id, part).await?,
        };
        ids.push(id);
    }
    for &extra in reuse.iter().skip(parts.len()) {
        let _ = ctx.pacer.call(chat_id, || ctx.telegram.delete_message(chat_id, extra)).await;
    }
    Ok(ids)
}

/// Sends one part; entities rejected → once more as plain text.
async fn send(ctx: &WorkerContext, chat_id: i64, part: &Formatted) -> Result<i64, DeliveryError> {
    let formatted =
        ctx.pacer.call(chat_id, || ctx.telegram.send_message(chat_id, &part.text, part.entities_json())).await;
    match formatted {
        Ok(m) => Ok(m.message_id),
        Err(TelegramError::BadEntities(e)) => {
            tracing::warn!(error.message = %e, "entities rejected; sending as plain text");
            Ok(ctx.pacer.call(chat_id, || ctx.telegram.send_message(chat_id, &part.text, None)).await?.message_id)
        }
        Err(TelegramError::Migrated(to)) => {
            // The group became a supergroup: move the chat, resend once there.
            crate::chats::migrate(&ctx.db, chat_id, to).await.map_err(|e| DeliveryError::Failed(e.to_string()))?;
            Ok(ctx.pacer.call(to, || ctx.telegram.send_message(to, &part.text, part.entities_json())).await?.message_id)
        }
        Err(e) => Err(e.into()),
    }
}

/// Edits one message to `part`; entities rejected → once more as plain text.
///
/// # Errors
/// The classified error ("not modified" is success).
pub async fn edit(ctx: &WorkerContext, chat_id: i64, message_id: i64, part: &Formatted) -> Result<(), TelegramError> {
    let r = ctx
        .pacer
        .call(chat_id, || ctx.telegram.edit_message_text(chat_id, message_id, &part.text, part.entities_json()))
        .await;
    match r {
        Ok(()) | Err(TelegramError::NotModified) => Ok(()),
        Err(TelegramError::BadEntities(_)) => {
            match ctx
                .pacer
                .call(chat_id, || ctx.telegram.edit_message_text(chat_id, message_id, &part.text, None))
                .await
            {
                Ok(()) | Err(TelegramError::NotModified) => Ok(()),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}
