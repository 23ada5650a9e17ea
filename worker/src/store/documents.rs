//! `documents`: the files users sent, stored with their extracted text per
//! (user, chat, file); the document job's quota reads and lock, and the
//! `list_files`/`read_file` tools' reads.

use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

/// A document to store.
#[derive(Debug)]
pub struct NewDocumentRow<'a> {
    /// Telegram's stable id of the file.
    pub file_unique_id: &'a str,
    /// The file name, cleaned for display.
    pub file_name: &'a str,
    /// The sender's MIME type.
    pub mime_type: Option<&'a str>,
    /// Bytes downloaded.
    pub size_bytes: i64,
    /// How the text was obtained (`documents.extraction`).
    pub extraction: &'a str,
    /// The extracted text.
    pub text: &'a str,
}

/// Stores the document for `user_id` in `chat_id` and returns its id; the
/// same file sent again in the same chat keeps its id and gets the new name.
///
/// # Errors
/// Database errors.
pub async fn insert(
    tx: &mut PgConnection,
    user_id: i64,
    chat_id: i64,
    doc: &NewDocumentRow<'_>,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO documents (user_id, chat_id, file_unique_id, file_name, mime_type, size_bytes, extraction, text)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (user_id, chat_id, file_unique_id) DO UPDATE SET file_name = EXCLUDED.file_name
         RETURNING id",
    )
    .bind(user_id)
    .bind(chat_id)
    .bind(doc.file_unique_id)
    .bind(doc.file_name)
    .bind(doc.mime_type)
    .bind(doc.size_bytes)
    .bind(doc.extraction)
    .bind(doc.text)
    .fetch_one(tx)
    .await
}

/// The document job's poison marker: the epoch of the claim that began
/// reading it, if one did. Read unfenced on purpose: an earlier claim's
/// marker is what it looks for.
///
/// # Errors
/// Database errors (`RowNotFound` for an unknown job).
pub async fn started_epoch<'e>(db: impl PgExecutor<'e>, job_id: Uuid) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT document_started_epoch FROM jobs WHERE job_id = $1").bind(job_id).fetch_one(db).await
}

/// Documents and characters of text the user has stored, in every chat.
///
/// # Errors
/// Database errors.
pub async fn totals<'e>(db: impl PgExecutor<'e>, user_id: i64) -> Result<(i64, i64), sqlx::Error> {
    sqlx::query_as("SELECT count(*), COALESCE(sum(char_length(text)), 0)::bigint FROM documents WHERE user_id = $1")
        .bind(user_id)
        .fetch_one(db)
        .await
}

/// Takes the user's document-quota lock until the end of `tx`: two
/// documents of one user read at once cannot both pass the quota.
///
/// # Errors
/// Database errors.
pub async fn lock_quota(tx: &mut PgConnection, user_id: i64) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('fleet.documents.' || $1::text, 0))")
        .bind(user_id)
        .execute(tx)
        .await?;
    Ok(())
}

/// As [`totals`], without the file `file_unique_id` of `chat_id` (it is
/// about to be stored again, replacing itself).
///
/// # Errors
/// Database errors.
pub async fn totals_without(
    tx: &mut PgConnection,
    user_id: i64,
    chat_id: i64,
    file_unique_id: &str,
) -> Result<(i64, i64), sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*), COALESCE(sum(char_length(text)), 0)::bigint FROM documents
          WHERE user_id = $1 AND NOT (chat_id = $2 AND file_unique_id = $3)",
    )
    .bind(user_id)
    .bind(chat_id)
    .bind(file_unique_id)
    .fetch_one(tx)
    .await
}

/// One row of `list_files`.
#[derive(Debug, sqlx::FromRow)]
pub struct ListedFile {
    /// The document's id.
    pub id: i64,
    /// Its name.
    pub file_name: String,
    /// The sender's MIME type.
    pub mime_type: Option<String>,
    /// Bytes downloaded.
    pub size_bytes: i64,
    /// Characters of extracted text.
    pub chars: i64,
    /// When it was stored.
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// The user's files sent in `chat_id`, newest first, at most `limit`.
///
/// # Errors
/// Database errors.
pub async fn list(
    conn: &mut PgConnection,
    user_id: i64,
    chat_id: i64,
    limit: i64,
) -> Result<Vec<ListedFile>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, file_name, mime_type, size_bytes, char_length(text)::bigint AS chars, created_at
           FROM documents WHERE user_id = $1 AND chat_id = $2 ORDER BY id DESC LIMIT $3",
    )
    .bind(user_id)
    .bind(chat_id)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// A slice of document `id` (only if it is the user's, sent in `chat_id`):
/// `(file_name, total characters, up to len characters from the 1-based
/// character position start)`.
///
/// # Errors
/// Database errors.
pub async fn read_slice(
    conn: &mut PgConnection,
    id: i64,
    user_id: i64,
    chat_id: i64,
    start: i32,
    len: i32,
) -> Result<Option<(String, i64, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT file_name, char_length(text)::bigint, substr(text, $4, $5) FROM documents
          WHERE id = $1 AND user_id = $2 AND chat_id = $3",
    )
    .bind(id)
    .bind(user_id)
    .bind(chat_id)
    .bind(start)
    .bind(len)
    .fetch_optional(conn)
    .await
}
