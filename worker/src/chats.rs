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
    let mut tx = db.begin().await?;
    sqlx::query(
        "INSERT INTO chats (chat_id, kind, conversation_epoch)
         SELECT $2, 'supergroup', conversation_epoch FROM chats WHERE chat_id = $1
         ON CONFLICT (chat_id) DO UPDATE SET conversation_epoch = GREATEST(chats.conversation_epoch, EXCLUDED.conversation_epoch)",
    )
    .bind(from)
    .bind(to)
    .execute(&mut *tx)
    .await?;
    let moved = sqlx::query("SELECT 1 FROM chats WHERE chat_id = $1").bind(to).fetch_optional(&mut *tx).await?;
    if moved.is_some() {
        sqlx::query("UPDATE messages SET chat_id = $2 WHERE chat_id = $1")
            .bind(from)
            .bind(to)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE jobs SET chat_id = $2 WHERE chat_id = $1").bind(from).bind(to).execute(&mut *tx).await?;
        // Files and notes are scoped to (user, chat): they follow the group.
        sqlx::query(
            "UPDATE documents d SET chat_id = $2 WHERE chat_id = $1 AND NOT EXISTS (
                 SELECT 1 FROM documents n WHERE n.chat_id = $2 AND n.user_id = d.user_id AND n.file_unique_id = d.file_unique_id)",
        )
            .bind(from)
            .bind(to)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE user_notes SET chat_id = $2 WHERE chat_id = $1")
            .bind(from)
            .bind(to)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    tracing::info!(from, to, "chat migrated to a supergroup");
    Ok(())
}
