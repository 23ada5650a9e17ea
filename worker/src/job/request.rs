//! `load` and `build_request`: the job row, and the Messages API request
//! built from the stored, validated conversation (P10).

use super::JobError;
use crate::context::WorkerContext;
use serde_json::{json, Value};
use uuid::Uuid;

pub use crate::store::jobs::JobRow;

/// Loads the job.
///
/// # Errors
/// Database errors (`RowNotFound` for an unknown id).
pub async fn load(ctx: &WorkerContext, job_id: Uuid) -> Result<JobRow, JobError> {
    Ok(crate::store::jobs::load(&ctx.db, job_id).await?)
}

/// The answer text stored by an earlier attempt of this job, if any.
///
/// # Errors
/// Database errors.
pub async fn stored_answer(ctx: &WorkerContext, job: &JobRow) -> Result<Option<String>, JobError> {
    let content = crate::store::conversation::last_answer(&ctx.db, job.job_id).await?;
    Ok(content.map(|c| text_of(&c)))
}

/// The visible text of content blocks.
pub fn text_of(content: &Value) -> String {
    content
        .as_array()
        .map(|blocks| {
            blocks
                .iter()
                .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
                .filter_map(|b| b.get("text").and_then(Value::as_str))
                .collect::<String>()
        })
        .unwrap_or_default()
}

/// Checks that stored content is a non-empty array of blocks that each have
/// a string `type`.
///
/// # Errors
/// A description of the first problem.
pub fn validate_content(content: &Value) -> Result<(), String> {
    let blocks = content.as_array().ok_or("content is not an array")?;
    if blocks.is_empty() {
        return Err("content is empty".into());
    }
    for (i, b) in blocks.iter().enumerate() {
        if b.get("type").and_then(Value::as_str).is_none() {
            return Err(format!("block {i} has no type"));
        }
        if b.get("type").and_then(Value::as_str) == Some("text") && b.get("text").and_then(Value::as_str).is_none() {
            return Err(format!("text block {i} has no text"));
        }
    }
    Ok(())
}

/// Builds the streaming request: system prompt, the chat's current
/// conversation (rows that fail validation are skipped and logged with
/// their id), then this job's user turn.
///
/// # Errors
/// Database errors, or `Invalid` when the job's own user turn is invalid.
pub async fn build_request(ctx: &WorkerContext, job: &JobRow) -> Result<Value, JobError> {
    let rows = crate::store::conversation::history(&ctx.db, job.chat_id, job.conversation_epoch).await?;
    validate_content(&job.user_content).map_err(|e| JobError::Invalid(format!("job {} user turn: {e}", job.job_id)))?;
    let mut history: Vec<(i64, String, Value)> = rows;
    history.push((0, "user".to_owned(), job.user_content.clone()));
    let messages = super::repair_history(history);
    let mut request = json!({
        "model": ctx.settings.model,
        "max_tokens": ctx.settings.max_tokens,
        "system": ctx.settings.system_prompt,
        "messages": messages,
        "stream": true,
    });
    let mut tools = ctx.tools.request_tools();
    if ctx.settings.web_search {
        // Server tool (Messages API "Web search tool"); results pass through unchanged.
        tools.push(json!({ "type": "web_search_20250305", "name": "web_search", "max_uses": 5 }));
    }
    if !tools.is_empty() {
        request["tools"] = Value::Array(tools);
    }
    if ctx.settings.thinking_budget_tokens > 0 {
        request["thinking"] = json!({ "type": "enabled", "budget_tokens": ctx.settings.thinking_budget_tokens });
    }
    Ok(request)
}

/// Appends a turn of `role` with `blocks`.
pub fn append_blocks(request: &mut Value, role: &str, blocks: Vec<Value>) {
    if let Some(messages) = request.get_mut("messages").and_then(Value::as_array_mut) {
        messages.push(json!({ "role": role, "content": blocks }));
    }
}

/// Appends the assistant's turn and, if given, a user turn, so that the
/// next call continues the answer.
pub fn append_turns(request: &mut Value, blocks: Vec<Value>, user_text: Option<&str>) {
    if let Some(messages) = request.get_mut("messages").and_then(Value::as_array_mut) {
        if !blocks.is_empty() {
            messages.push(json!({ "role": "assistant", "content": blocks }));
        }
        if let Some(text) = user_text {
            messages.push(json!({ "role": "user", "content": [{ "type": "text", "text": text }] }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_content_is_rejected_with_a_reason() {
        assert!(validate_content(&json!("text")).is_err());
        assert!(validate_content(&json!([])).is_err());
        assert!(validate_content(&json!([{"text": "no type"}])).is_err());
        assert!(validate_content(&json!([{"type": "text"}])).is_err());
        assert!(validate_content(&json!([{"type": "text", "text": "ok"}])).is_ok());
    }
}
