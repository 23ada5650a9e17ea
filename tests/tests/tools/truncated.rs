//! A tool input cut off mid-stream is never executed: not when the stream
//! stops after a partial `input_json_delta` (the state has no tool use; end
//! to end the idle timeout ends the answer), not when `max_tokens` closes
//! the block on half a JSON object.

use anyhow::Result;
use fleet_tests::fake_anthropic::ScriptedResponse;
use fleet_tests::harness::tools::{message, spawn_fleet, sse, ADA};
use fleet_tests::harness::{wait_until, WAIT};
use shared::anthropic::events::parse_event;
use shared::anthropic::{MessageState, StopReason};

fn replay(body: &str) -> Result<MessageState> {
    let mut state = MessageState::default();
    for chunk in body.split("\n\n") {
        if let Some(data) = chunk.lines().find_map(|l| l.strip_prefix("data: ")) {
            state.apply(parse_event(data)?);
        }
    }
    Ok(state)
}

#[test]
fn a_stream_cut_after_a_partial_tool_input_yields_no_tool_use() -> Result<()> {
    let state = replay(&sse::cut_tool_input(None))?;
    assert!(state.tool_uses().is_empty());
    assert!(state.content_blocks().iter().all(|b| b["type"] != "tool_use"), "the cut block is not stored either");
    assert_eq!(state.text(), "Saving that.");

    let state = replay(&sse::cut_tool_input(Some("max_tokens")))?;
    assert_eq!(state.stop_reason, Some(StopReason::MaxTokens));
    let uses = state.tool_uses();
    assert!(uses.iter().all(|(_, _, input)| input.is_err()), "half a JSON object never parses: {uses:?}");
    Ok(())
}

async fn tool_calls(fleet: &fleet_tests::harness::TestApp) -> Result<i64> {
    fleet.db.count("SELECT count(*) FROM tool_calls").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_stalls_inside_a_tool_input_runs_no_tool() -> Result<()> {
    let fleet = spawn_fleet(|s| s.idle_timeout_s = 1).await?;
    fleet.grant(ADA, "5.00").await?;
    let body = sse::cut_tool_input(None);
    let stall_after = sse::event_count(&body);
    fleet
        .anthropic
        .push([ScriptedResponse { stall_after_events: Some(stall_after), ..ScriptedResponse::from_sse(body) }]);
    fleet.anthropic.set_default(None);

    fleet.post(&message(900_000_011, "Remember that I like tea.")).await?;
    let reply = fleet.wait_for_message(ADA, "timed out").await?;

    assert!(reply.starts_with("Saving that."), "{reply}");
    wait_until("the job to finish", WAIT, || async {
        Ok(fleet.db.count("SELECT count(*) FROM jobs WHERE status = 'done'").await? == 1)
    })
    .await?;
    assert_eq!(tool_calls(&fleet).await?, 0, "no tool call was recorded");
    assert_eq!(fleet.db.count("SELECT count(*) FROM user_notes").await?, 0, "nothing was remembered");
    assert_eq!(fleet.anthropic.call_count(), 1);
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_input_cut_by_max_tokens_is_never_executed() -> Result<()> {
    let fleet = spawn_fleet(|_| {}).await?;
    fleet.grant(ADA, "5.00").await?;
    fleet.anthropic.push([
        ScriptedResponse::from_sse(sse::cut_tool_input(Some("max_tokens"))),
        ScriptedResponse::from_sse(sse::text_turn(" I could not save it, sorry.")),
    ]);
    fleet.anthropic.set_default(None);

    fleet.post(&message(900_000_012, "Remember that I like tea.")).await?;
    let reply = fleet.wait_for_message(ADA, "sorry").await?;

    assert!(reply.starts_with("Saving that."), "{reply}");
    wait_until("the job to finish", WAIT, || async {
        Ok(fleet.db.count("SELECT count(*) FROM jobs WHERE status = 'done'").await? == 1)
    })
    .await?;
    assert_eq!(tool_calls(&fleet).await?, 0, "no tool call was recorded");
    assert_eq!(fleet.db.count("SELECT count(*) FROM user_notes").await?, 0, "nothing was remembered");
    let calls = fleet.anthropic.calls();
    assert_eq!(calls.len(), 2, "one continuation after max_tokens");
    let continuation = serde_json::to_string(&calls[1].body)?;
    assert!(!continuation.contains("\"tool_result\""), "no result for a tool that never ran: {continuation}");
    fleet.cleanup().await
}

/// Every `tool_use` of an assistant turn must be answered by a `tool_result`
/// in the next user turn, or the Messages API refuses the request (400).
fn unanswered_tool_uses(messages: &[serde_json::Value]) -> Vec<String> {
    let mut missing = Vec::new();
    for (i, turn) in messages.iter().enumerate().filter(|(_, m)| m["role"] == "assistant") {
        let results: Vec<&serde_json::Value> = messages
            .get(i + 1)
            .and_then(|next| next["content"].as_array())
            .map(|blocks| blocks.iter().filter(|b| b["type"] == "tool_result").map(|b| &b["tool_use_id"]).collect())
            .unwrap_or_default();
        for block in turn["content"].as_array().into_iter().flatten().filter(|b| b["type"] == "tool_use") {
            if !results.contains(&&block["id"]) {
                missing.push(block["id"].as_str().unwrap_or_default().to_owned());
            }
        }
    }
    missing
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_continuation_after_a_cut_tool_input_leaves_no_tool_use_unanswered() -> Result<()> {
    let fleet = spawn_fleet(|_| {}).await?;
    fleet.grant(ADA, "5.00").await?;
    fleet.anthropic.push([
        ScriptedResponse::from_sse(sse::cut_tool_input(Some("max_tokens"))),
        ScriptedResponse::from_sse(sse::text_turn(" I could not save it, sorry.")),
    ]);
    fleet.anthropic.set_default(None);

    fleet.post(&message(900_000_013, "Remember that I like tea.")).await?;
    fleet.wait_for_message(ADA, "sorry").await?;

    let calls = fleet.anthropic.calls();
    let messages = calls[1].body["messages"].as_array().cloned().unwrap_or_default();
    let missing = unanswered_tool_uses(&messages);
    fleet.cleanup().await?;
    assert!(missing.is_empty(), "tool_use blocks without a tool_result: {missing:?}");
    Ok(())
}
