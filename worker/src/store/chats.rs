//! `users` and `chats`: who talks to the bot and where, upserted at intake;
//! a chat's conversation epoch (`/new`); and a group's move to a new id
//! when it becomes a supergroup.

use sqlx::{PgConnection, PgExecutor, PgPool};

/// A Telegram user as intake records them.
#[derive(Debug, Clone, Copy)]
pub struct UserRow<'a> {
    /// Telegram user id.
    pub user_id: i64,
    /// First name.
    pub first_name: &'a str,
    /// `@username`, if any.
    pub username: Option<&'a str>,
    /// IETF language tag, if Telegram sent one (a missing one keeps the stored one).
    pub language_code: Option<&'a str>,
}

/// Upserts the user: names refreshed, unblocked (they are talking to the bot).
///
/// # Errors
/// Database errors.
pub async fn upsert_user(tx: &mut PgConnection, user: &UserRow<'_>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO users (user_id, first_name, username, language_code) VALUES ($1, $2, $3, $4)
         ON CONFLICT (user_id) DO UPDATE SET first_name = EXCLUDED.first_name, username = EXCLUDED.username,
             language_code = COALESCE(EXCLUDED.language_code, users.language_code), blocked_at = NULL, updated_at = now()",
    )
    .bind(user.user_id)
    .bind(user.first_name)
    .bind(user.username)
    .bind(user.language_code)
    .execute(tx)
    .await?;
    Ok(())
}

/// Sets or clears the user's `blocked_at` (they blocked or unblocked the bot).
///
/// # Errors
/// Database errors.
pub async fn set_blocked<'e>(db: impl PgExecutor<'e>, user_id: i64, blocked: bool) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE users SET blocked_at = CASE WHEN $2 THEN now() ELSE NULL END, updated_at = now() WHERE user_id = $1",
    )
    .bind(user_id)
    .bind(blocked)
    .execute(db)
    .await?;
    Ok(())
}

/// Marks the user as having blocked the bot (a 403 on a send).
///
/// # Errors
/// Database errors.
pub async fn mark_blocked<'e>(db: impl PgExecutor<'e>, user_id: i64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE users SET blocked_at = now() WHERE user_id = $1").bind(user_id).execute(db).await?;
    Ok(())
}

/// The user's first name, if they are known.
///
/// # Errors
/// Database errors.
pub async fn first_name<'e>(db: impl PgExecutor<'e>, user_id: i64) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT first_name FROM users WHERE user_id = $1").bind(user_id).fetch_optional(db).await
}

/// Records the chat (`kind`: Telegram's `private`, `group`, …) if it is new.
///
/// # Errors
/// Database errors.
pub async fn insert_chat(tx: &mut PgConnection, chat_id: i64, kind: &str) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO chats (chat_id, kind) VALUES ($1, $2) ON CONFLICT (chat_id) DO NOTHING")
        .bind(chat_id)
        .bind(kind)
        .execute(tx)
        .await?;
    Ok(())
}

/// Starts a new conversation in the chat (`/new`): earlier messages stay
/// stored but are no longer sent.
///
/// # Errors
/// Database errors.
pub async fn new_conversation<'e>(db: impl PgExecutor<'e>, chat_id: i64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE chats SET conversation_epoch = conversation_epoch + 1 WHERE chat_id = $1")
        .bind(chat_id)
        .execute(db)
        .await?;
    Ok(())
}

/// Moves chat `from` to `to` in one transaction (idempotent): the chat row
/// (as a supergroup, keeping the later conversation epoch), its messages,
/// jobs, and the files and notes sent or remembered there (a file already
/// stored under `to` stays where it is).
///
/// # Errors
/// Database errors.
pub async fn migrate(db: &PgPool, from: i64, to: i64) -> Result<(), sqlx::Error> {
    let mut tx = shared::db::begin(db).await?;
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
    tx.commit().await
}
