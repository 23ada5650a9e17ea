//! Chat identity changes: a group that becomes a supergroup gets a new id
//! (`migrate_to_chat_id`, Bot API "Message"). Its history, jobs, settings,
//! and the files and notes its members sent or remembered there move to the
//! new id so the conversation (and the tools' view of it) continues there.

use sqlx::PgPool;

/// Moves chat `from` to `to` (idempotent).
///
/// # Errors
/// Database errors.
pub async fn migrate(db: &PgPool, from: i64, to: i64) -> Result<(), sqlx::Error> {
    crate::store::chats::migrate(db, from, to).await?;
    tracing::info!(from, to, "chat migrated to a supergroup");
    Ok(())
}
