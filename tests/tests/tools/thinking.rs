//! The request after a thinking turn carries the thinking block byte for byte
//! (thinking text and signature), ahead of the `tool_use` it preceded, with
//! the tool result (scenario 12, through the in-process fleet).

use anyhow::{Context as _, Result};
use fleet_tests::fake_anthropic::ScriptedResponse;
use fleet_tests::harness::tools::spawn_fleet;
use fleet_tests::harness::{fixture, fixture_bytes};
use serde_json::{json, Value};

/// Ben, the sender of `ben_think.json`, in a private chat of the same id.
const BEN: i64 = 100_000_002;
const THINKING: &str = "To test 9973 for primality I need divisors up to its square root, which is a little under 100. Let me compute the square root first.";
const SIGNATURE: &str = "Eq2Saf3dgrJNgOHyMhzjYuvvYTdb3FAYuMS8yxX64mT6PWwMoF7napEEiee4epBQSpb9VGsghwlCSaIFWhNMDoyrCLi25SVRQWbP0od7fZ7wltnJLXNxGu5sI2hLSZcPE0Dso6D0T8vQqyZ1sazuxcyBMgaWPPyOWF74MguQG3JSr3lpxGut6V==";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_after_a_thinking_turn_carries_the_thinking_block_byte_identical() -> Result<()> {
    let fleet = spawn_fleet(|_| {}).await?;
    fleet.grant(BEN, "5.00").await?;
    fleet.anthropic.push([
        ScriptedResponse::from_file(fixture("anthropic/thinking_then_tool.sse"))?,
        ScriptedResponse::from_file(fixture("anthropic/thinking_followup.sse"))?,
    ]);
    fleet.anthropic.set_default(None);
    let update: Value = serde_json::from_slice(&fixture_bytes("telegram/ben_think.json")?)?;

    fleet.post(&update).await?;
    let reply = fleet.wait_for_message(BEN, "9973 is prime").await?;

    assert!(!reply.contains("square root first"), "thinking is never shown: {reply}");
    let calls = fleet.anthropic.calls();
    assert_eq!(calls.len(), 2);
    let raw = serde_json::to_string(&calls[1].body)?;
    assert!(raw.contains(SIGNATURE), "the signature is sent back verbatim");
    assert!(raw.contains(THINKING), "the thinking text is sent back verbatim");
    let messages = calls[1].body["messages"].as_array().context("no messages")?;
    let assistant = messages.iter().rev().find(|m| m["role"] == "assistant").context("no assistant turn")?;
    let blocks = assistant["content"].as_array().context("no content")?;
    assert_eq!(blocks[0], json!({ "type": "thinking", "thinking": THINKING, "signature": SIGNATURE }));
    assert_eq!(blocks[1]["type"], "tool_use");
    assert_eq!(blocks[1]["id"], "toolu_01kYi3EU5qFWjxOlHCsHO4b8gj");
    let last = messages.last().context("no last turn")?;
    assert_eq!(last["role"], "user");
    assert_eq!(last["content"][0]["type"], "tool_result");
    assert_eq!(last["content"][0]["tool_use_id"], "toolu_01kYi3EU5qFWjxOlHCsHO4b8gj");
    fleet.cleanup().await
}
