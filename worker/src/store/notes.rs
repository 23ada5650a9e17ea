//! `user_notes`: what the `remember` tool stored, per user and chat.

use sqlx::PgConnection;

/// Stores `note` for `user_id` in `chat_id`; its id.
///
/// # Errors
/// Database errors.
pub async fn insert(conn: &mut PgConnection, user_id: i64, chat_id: i64, note: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("INSERT INTO user_notes (user_id, chat_id, note) VALUES ($1, $2, $3) RETURNING id")
        .bind(user_id)
        .bind(chat_id)
        .bind(note)
        .fetch_one(conn)
        .await
}

/// The user's notes of `chat_id` that contain `query` (case-insensitive;
/// every note when it is empty), newest first, at most 50: `(note, saved at)`.
///
/// # Errors
/// Database errors.
pub async fn recall(
    conn: &mut PgConnection,
    user_id: i64,
    chat_id: i64,
    query: &str,
) -> Result<Vec<(String, chrono::DateTime<chrono::Utc>)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT note, created_at FROM user_notes
          WHERE user_id = $1 AND chat_id = $2 AND ($3 = '' OR note ILIKE '%' || $3 || '%')
          ORDER BY id DESC LIMIT 50",
    )
    .bind(user_id)
    .bind(chat_id)
    .bind(query)
    .fetch_all(conn)
    .await
}
