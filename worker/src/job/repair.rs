//! Checking and repairing the stored conversation before every request
//! (P10, audit #11): a bad row is logged with its id and left out instead
//! of making the Messages API answer 400 forever.
//!
//! Rules (Messages API docs, "Messages"): content is an array of blocks with
//! a `type`; text blocks are not empty or whitespace-only; thinking blocks
//! carry their signature; every `tool_use` is answered by a `tool_result` in
//! the next user turn and every `tool_result` answers one; roles alternate,
//! starting with the user.

use serde_json::{json, Value};
use std::collections::HashSet;

fn kind(b: &Value) -> &str {
    b.get("type").and_then(Value::as_str).unwrap_or("")
}

fn keep_block(b: &Value) -> bool {
    match kind(b) {
        "" => false,
        "text" => b.get("text").and_then(Value::as_str).is_some_and(|t| !t.trim().is_empty()),
        "thinking" => b.get("signature").and_then(Value::as_str).is_some_and(|s| !s.is_empty()),
        "redacted_thinking" => b.get("data").and_then(Value::as_str).is_some(),
        "tool_use" => b.get("id").and_then(Value::as_str).is_some() && b.get("input").is_some_and(Value::is_object),
        "tool_result" => b.get("tool_use_id").and_then(Value::as_str).is_some(),
        _ => true,
    }
}

/// Turns stored rows `(row id, role, content)`, oldest first, into valid
/// `messages` for the Messages API. Row id 0 is the current user turn.
pub fn repair_history(rows: Vec<(i64, String, Value)>) -> Vec<Value> {
    // 1. Clean each row's blocks.
    let mut turns: Vec<(String, Vec<Value>)> = Vec::new();
    for (id, role, content) in rows {
        if role != "user" && role != "assistant" {
            tracing::error!(message_row_id = id, role = %role, "stored message with an unknown role left out");
            continue;
        }
        let Some(blocks) = content.as_array() else {
            tracing::error!(message_row_id = id, "stored message content is not an array; left out");
            continue;
        };
        let kept: Vec<Value> = blocks.iter().filter(|b| keep_block(b)).cloned().collect();
        if kept.len() != blocks.len() {
            tracing::warn!(
                message_row_id = id,
                dropped = blocks.len() - kept.len(),
                "invalid blocks left out of a stored message"
            );
        }
        if kept.is_empty() {
            continue;
        }
        // 2. Merge consecutive turns of one role.
        match turns.last_mut() {
            Some((last_role, last)) if *last_role == role => last.extend(kept),
            _ => turns.push((role, kept)),
        }
    }
    // 3. Pair tool_use with tool_result across adjacent turns.
    for i in 0..turns.len() {
        if turns[i].0 != "assistant" {
            continue;
        }
        let answered: HashSet<String> = turns
            .get(i + 1)
            .filter(|(r, _)| r == "user")
            .map(|(_, blocks)| {
                blocks
                    .iter()
                    .filter(|b| kind(b) == "tool_result")
                    .filter_map(|b| b["tool_use_id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        turns[i].1.retain(|b| kind(b) != "tool_use" || b["id"].as_str().is_some_and(|id| answered.contains(id)));
    }
    for i in 0..turns.len() {
        if turns[i].0 != "user" {
            continue;
        }
        let asked: HashSet<String> = i
            .checked_sub(1)
            .and_then(|p| turns.get(p))
            .map(|(_, blocks)| {
                blocks
                    .iter()
                    .filter(|b| kind(b) == "tool_use")
                    .filter_map(|b| b["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        turns[i]
            .1
            .retain(|b| kind(b) != "tool_result" || b["tool_use_id"].as_str().is_some_and(|id| asked.contains(id)));
    }
    // 4. Drop turns emptied by pairing, merge again, start with the user.
    let mut out: Vec<(String, Vec<Value>)> = Vec::new();
    for (role, blocks) in turns.into_iter().filter(|(_, b)| !b.is_empty()) {
        match out.last_mut() {
            Some((r, last)) if *r == role => last.extend(blocks),
            _ => out.push((role, blocks)),
        }
    }
    while out.first().is_some_and(|(r, _)| r == "assistant") {
        out.remove(0);
    }
    out.into_iter().map(|(role, content)| json!({ "role": role, "content": content })).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(text: &str) -> Value {
        json!([{ "type": "text", "text": text }])
    }

    #[test]
    fn corrupt_rows_and_blocks_are_left_out() {
        let rows = vec![
            (1, "user".into(), t("hi")),
            (2, "assistant".into(), json!("not an array")),
            (3, "assistant".into(), json!([{ "type": "text", "text": "  " }, { "type": "text", "text": "hello" }])),
            (4, "user".into(), json!([{ "type": "thinking", "thinking": "x" }])),
            (0, "user".into(), t("next")),
        ];
        let m = repair_history(rows);
        assert_eq!(m.len(), 3);
        assert_eq!(m[1]["content"], json!([{ "type": "text", "text": "hello" }]));
        assert_eq!(m[2]["role"], "user");
    }

    #[test]
    fn unanswered_tool_use_and_orphan_tool_result_are_dropped() {
        let rows = vec![
            (1, "user".into(), t("compute")),
            (
                2,
                "assistant".into(),
                json!([{ "type": "text", "text": "ok" }, { "type": "tool_use", "id": "a", "name": "calculator", "input": {} }]),
            ),
            (
                3,
                "user".into(),
                json!([{ "type": "tool_result", "tool_use_id": "zzz", "content": "1" }, { "type": "text", "text": "and?" }]),
            ),
        ];
        let m = repair_history(rows);
        assert_eq!(m[1]["content"], json!([{ "type": "text", "text": "ok" }]));
        assert_eq!(m[2]["content"], json!([{ "type": "text", "text": "and?" }]));
    }

    #[test]
    fn roles_alternate_and_start_with_the_user() {
        let rows = vec![(1, "assistant".into(), t("orphan")), (2, "user".into(), t("a")), (3, "user".into(), t("b"))];
        let m = repair_history(rows);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0]["content"].as_array().unwrap().len(), 2);
    }
}
