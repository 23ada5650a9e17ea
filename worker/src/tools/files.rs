//! `list_files` and `read_file`: the documents the user sent (stored by
//! [`crate::documents`] at intake), read in slices of characters so that a
//! long file never floods the context. A user sees only their own files, and
//! only those sent in the job's chat (a group never sees a private file).

use crate::store::documents;
use serde_json::{json, Value};
use sqlx::PgConnection;

/// Characters `read_file` returns when `max_chars` is not given.
pub const DEFAULT_READ_CHARS: i64 = 10_000;
/// Most characters one `read_file` call returns (also the schema's maximum).
pub const MAX_READ_CHARS: i64 = 20_000;
/// Most files `list_files` lists.
const MAX_LISTED: i64 = 50;

/// The user's files sent in `chat_id`, newest first.
///
/// # Errors
/// The database error, as a message for the model.
pub async fn list(conn: &mut PgConnection, user_id: i64, chat_id: i64) -> Result<String, String> {
    let rows = documents::list(conn, user_id, chat_id, MAX_LISTED)
        .await
        .map_err(|e| format!("could not list the files: {e}"))?;
    let files: Vec<Value> = rows
        .into_iter()
        .map(|f| {
            json!({ "id": f.id, "name": f.file_name, "mime_type": f.mime_type, "size_bytes": f.size_bytes,
                    "chars": f.chars, "sent_at": f.created_at.to_rfc3339() })
        })
        .collect();
    Ok(json!({ "files": files }).to_string())
}

/// A slice of a file's text: `max_chars` characters from `offset`, with the
/// total and where to continue (`next_offset`, `null` at the end).
///
/// # Errors
/// A message for the model: no such file (of this user, sent in this chat),
/// an offset past the end, or the database error.
pub async fn read(conn: &mut PgConnection, user_id: i64, chat_id: i64, input: &Value) -> Result<String, String> {
    let id = integer(input, "id").ok_or("id must be the integer id of a file (see list_files)")?;
    let offset = integer(input, "offset").unwrap_or(0);
    let max_chars = integer(input, "max_chars").unwrap_or(DEFAULT_READ_CHARS);
    if offset < 0 || !(1..=MAX_READ_CHARS).contains(&max_chars) {
        return Err(format!("offset must be at least 0 and max_chars between 1 and {MAX_READ_CHARS}"));
    }
    let start = offset.checked_add(1).and_then(|s| i32::try_from(s).ok()).ok_or("offset is too large")?;
    let len = i32::try_from(max_chars).unwrap_or(i32::MAX);
    let row = documents::read_slice(conn, id, user_id, chat_id, start, len)
        .await
        .map_err(|e| format!("could not read the file: {e}"))?;
    let Some((name, total, text)) = row else {
        return Err(format!("there is no file with id {id} in this chat: list_files shows the user's files here"));
    };
    if offset > total {
        return Err(format!("offset {offset} is past the end of {name} ({total} characters)"));
    }
    let end = offset + i64::try_from(text.chars().count()).unwrap_or(i64::MAX);
    let next = (end < total).then_some(end);
    Ok(json!({ "id": id, "name": name, "offset": offset, "total_chars": total, "next_offset": next, "text": text })
        .to_string())
}

/// An integer field; JSON Schema's `integer` also admits `7.0`.
fn integer(input: &Value, key: &str) -> Option<i64> {
    let v = input.get(key)?;
    v.as_i64().or_else(|| v.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9e15).map(|f| f as i64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_may_be_written_as_whole_floats() {
        assert_eq!(integer(&json!({"id": 7}), "id"), Some(7));
        assert_eq!(integer(&json!({"id": 7.0}), "id"), Some(7));
        assert_eq!(integer(&json!({"id": 7.5}), "id"), None);
        assert_eq!(integer(&json!({"id": "7"}), "id"), None);
        assert_eq!(integer(&json!({}), "id"), None);
    }
}
