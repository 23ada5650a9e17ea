//! Fixtures (`fixtures/`, the repo copy of `../shared/fixtures`) and updates derived from them.

use crate::fake_anthropic::ScriptedResponse;
use anyhow::{Context as _, Result};
use serde_json::Value;

pub use crate::harness::{fixture_bytes, fixtures_dir};

/// A fixture update as JSON.
pub fn fixture_json(rel: &str) -> Result<Value> {
    serde_json::from_slice(&fixture_bytes(rel)?).with_context(|| format!("parsing fixture {rel}"))
}

/// A scripted response replaying `rel` with `event_delay_ms` before each event.
pub fn sse(rel: &str, event_delay_ms: u64) -> Result<ScriptedResponse> {
    Ok(ScriptedResponse { event_delay_ms, ..ScriptedResponse::from_sse(fixture_bytes(rel)?) })
}

/// The answer text a fixture stream carries (its text deltas), trimmed as
/// the worker trims the reply.
pub fn answer_of(rel: &str) -> Result<String> {
    Ok(crate::demo::sse_text(&fixture_bytes(rel)?).trim().to_owned())
}

/// An update derived from a fixture: a new `update_id`, `message_id` and
/// text (a `bot_command` entity when the text starts with `/`).
pub fn derived_update(rel: &str, update_id: i64, message_id: i64, text: &str) -> Result<Value> {
    let mut u = fixture_json(rel)?;
    u["update_id"] = update_id.into();
    let msg = u.get_mut("message").context("fixture has no message")?;
    msg["message_id"] = message_id.into();
    msg["text"] = text.into();
    if let Some(cmd) = text.strip_prefix('/') {
        let len = 1 + cmd.split_whitespace().next().unwrap_or_default().len();
        msg["entities"] = serde_json::json!([{ "offset": 0, "length": len, "type": "bot_command" }]);
    } else if let Some(o) = msg.as_object_mut() {
        o.remove("entities");
    }
    Ok(u)
}

/// `update` moved to the private chat of user `user_id` (sender and chat).
pub fn in_private_chat(mut update: Value, user_id: i64) -> Value {
    update["message"]["from"]["id"] = user_id.into();
    update["message"]["chat"]["id"] = user_id.into();
    update
}

/// The update id of a fixture.
pub fn update_id_of(rel: &str) -> Result<i64> {
    fixture_json(rel)?["update_id"].as_i64().with_context(|| format!("{rel} has no update_id"))
}
