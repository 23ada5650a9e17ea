//! `remember` and `recall`: notes per user and chat in PostgreSQL (a note
//! remembered in a group is recalled only in that group, one remembered in
//! private only in private). They run inside the tool's own transaction, so
//! a failed call leaves no row behind.

use serde_json::{json, Value};
use sqlx::PgConnection;

/// Longest note, characters.
pub const MAX_NOTE_CHARS: usize = 2_000;

/// Stores a note for `user_id` in `chat_id`.
///
/// # Errors
/// A message for the model, or the database error.
pub async fn remember(conn: &mut PgConnection, user_id: i64, chat_id: i64, input: &Value) -> Result<String, String> {
    let note = input.get("note").and_then(Value::as_str).map(str::trim).unwrap_or_default();
    if note.is_empty() {
        return Err("the note is empty".into());
    }
    if note.chars().count() > MAX_NOTE_CHARS {
        return Err(format!("the note is longer than {MAX_NOTE_CHARS} characters"));
    }
    let id = crate::store::notes::insert(conn, user_id, chat_id, note)
        .await
        .map_err(|e| format!("could not store the note: {e}"))?;
    Ok(json!({ "stored": true, "note_id": id }).to_string())
}

/// Returns the user's notes of `chat_id`, newest first, optionally filtered by `query`.
///
/// # Errors
/// The database error, as a message.
pub async fn recall(conn: &mut PgConnection, user_id: i64, chat_id: i64, input: &Value) -> Result<String, String> {
    let query = input.get("query").and_then(Value::as_str).unwrap_or_default();
    let notes = crate::store::notes::recall(conn, user_id, chat_id, query)
        .await
        .map_err(|e| format!("could not read notes: {e}"))?;
    let list: Vec<Value> = notes.into_iter().map(|(n, at)| json!({ "note": n, "saved_at": at.to_rfc3339() })).collect();
    Ok(json!({ "notes": list }).to_string())
}
