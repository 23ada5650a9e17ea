//! `messages`: the stored conversation of each chat (user and assistant
//! turns, by `conversation_epoch`), read to build a request and written by
//! `finalize`.

use serde_json::Value;
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

/// The chat's conversation `epoch`, oldest first: `(id, role, content)`.
///
/// # Errors
/// Database errors.
pub async fn history<'e>(
    db: impl PgExecutor<'e>,
    chat_id: i64,
    epoch: i32,
) -> Result<Vec<(i64, String, Value)>, sqlx::Error> {
    sqlx::query_as("SELECT id, role, content FROM messages WHERE chat_id = $1 AND conversation_epoch = $2 ORDER BY id")
        .bind(chat_id)
        .bind(epoch)
        .fetch_all(db)
        .await
}

/// The content of the last assistant turn stored for job `job_id`, if any.
///
/// # Errors
/// Database errors.
pub async fn last_answer<'e>(db: impl PgExecutor<'e>, job_id: Uuid) -> Result<Option<Value>, sqlx::Error> {
    sqlx::query_scalar("SELECT content FROM messages WHERE job_id = $1 AND role = 'assistant' ORDER BY id DESC LIMIT 1")
        .bind(job_id)
        .fetch_optional(db)
        .await
}

/// Where a turn goes: the chat, its conversation, the job that wrote it.
#[derive(Debug, Clone, Copy)]
pub struct TurnOf {
    /// The chat.
    pub chat_id: i64,
    /// Its current conversation.
    pub conversation_epoch: i32,
    /// The job whose exchange it is.
    pub job_id: Uuid,
}

/// Stores the job's user turn, inside the caller's `finalize` transaction.
///
/// # Errors
/// Database errors.
pub async fn append_user_turn(tx: &mut PgConnection, of: TurnOf, content: &Value) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO messages (chat_id, conversation_epoch, job_id, role, content) VALUES ($1, $2, $3, 'user', $4)",
    )
    .bind(of.chat_id)
    .bind(of.conversation_epoch)
    .bind(of.job_id)
    .bind(content)
    .execute(tx)
    .await?;
    Ok(())
}

/// Stores one turn of the exchange (`role` `assistant` or `user` for tool
/// results), `partial` when the answer was cut short, inside the caller's
/// `finalize` transaction.
///
/// # Errors
/// Database errors.
pub async fn append_turn(
    tx: &mut PgConnection,
    of: TurnOf,
    role: &str,
    content: &Value,
    partial: bool,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO messages (chat_id, conversation_epoch, job_id, role, content, partial) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(of.chat_id)
    .bind(of.conversation_epoch)
    .bind(of.job_id)
    .bind(role)
    .bind(content)
    .bind(partial)
    .execute(tx)
    .await?;
    Ok(())
}
