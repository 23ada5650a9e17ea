//! A corrupt row in a chat's stored conversation (P10): it is left out of
//! the next request with an error naming the row in the log, the chat keeps
//! working, and after `/new` the request carries only the new turn.

use anyhow::{ensure, Result};
use fleet_tests::fleet::worker_name;
use fleet_tests::harness::lifecycle::{derived_update, request_messages, sse, update_id_of, Lifecycle, ADA, WAIT};
use serde_json::{json, Value};

const CAPITAL: &str = "telegram/ada_capital.json";
const FOLLOW_UP: &str = "telegram/ada_after_stall.json";
/// Text that exists only in the corrupt block.
const CORRUPT_MARKER: &str = "CORRUPT-BLOCK-MARKER";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_stored_row_is_left_out_with_an_error_and_the_chat_starts_afresh_after_new() -> Result<()> {
    let t = Lifecycle::start("repair", 1, &[]).await?;
    let result = corrupt_row(&t).await;
    t.finish(result).await
}

async fn corrupt_row(t: &Lifecycle) -> Result<()> {
    t.grant(ADA, "5.00").await?;
    t.anthropic.push([sse("anthropic/text_capital.sse", 0)?]);
    t.post_fixture(CAPITAL).await?;
    t.wait_for_message(ADA, "The capital of France is Paris.").await?;
    t.wait_finished(update_id_of(CAPITAL)?, WAIT).await?;

    // Damage the stored conversation: content that is not an array, and a
    // user turn whose only block is invalid (thinking without a signature).
    let epoch: i32 = sqlx::query_scalar("SELECT conversation_epoch FROM chats WHERE chat_id = $1")
        .bind(ADA)
        .fetch_one(&t.dbs.bot)
        .await?;
    let insert =
        "INSERT INTO messages (chat_id, conversation_epoch, role, content) VALUES ($1, $2, $3, $4) RETURNING id";
    let not_array: i64 = sqlx::query_scalar(insert)
        .bind(ADA)
        .bind(epoch)
        .bind("assistant")
        .bind(json!("not an array"))
        .fetch_one(&t.dbs.bot)
        .await?;
    let bad_block: i64 = sqlx::query_scalar(insert)
        .bind(ADA)
        .bind(epoch)
        .bind("user")
        .bind(json!([{ "type": "thinking", "thinking": CORRUPT_MARKER }]))
        .fetch_one(&t.dbs.bot)
        .await?;

    t.anthropic.push([sse("anthropic/text_four.sse", 0)?]);
    t.post_fixture(FOLLOW_UP).await?;
    t.wait_for_message(ADA, "2 + 2 = 4.").await?;
    let job = t.wait_finished(update_id_of(FOLLOW_UP)?, WAIT).await?;
    ensure!(job.status == "done", "the chat did not keep working: {job:?}");

    let calls = t.anthropic.calls();
    ensure!(calls.len() == 2, "expected 2 calls so far, got {}", calls.len());
    let body = serde_json::to_string(&calls[1].body)?;
    ensure!(!body.contains("not an array") && !body.contains(CORRUPT_MARKER), "corrupt content was sent: {body}");
    let turns = request_messages(&calls[1]);
    let roles: Vec<&str> = turns.iter().map(|m| m["role"].as_str().unwrap_or_default()).collect();
    ensure!(roles == ["user", "assistant", "user"], "the good history was not kept around the bad rows: {roles:?}");

    // The error is clear: it names the bad rows.
    let log = t.fleet.log(&worker_name(0));
    let names_row =
        |id: i64, what: &str| log.lines().any(|l| l.contains(what) && l.contains(&format!("\"message_row_id\":{id}")));
    ensure!(
        names_row(not_array, "stored message content is not an array"),
        "no error naming row {not_array} in the worker log"
    );
    ensure!(names_row(bad_block, "invalid blocks left out"), "no warning naming row {bad_block} in the worker log");

    // /new, then a message: the request holds only the new turn.
    t.post(&derived_update(CAPITAL, 800_000_901, 901, "/new")?).await?;
    t.wait_for_message(ADA, "Started a new conversation").await?;
    t.wait_finished(800_000_901, WAIT).await?;
    let question = "Which moons of Jupiter are the largest?";
    t.anthropic.push([sse("anthropic/moons_ok.sse", 0)?]);
    t.post(&derived_update(FOLLOW_UP, 800_000_902, 902, question)?).await?;
    t.wait_for_message(ADA, "Io, Europa and Ganymede.").await?;
    let calls = t.anthropic.calls();
    ensure!(calls.len() == 3, "expected 3 calls, got {}", calls.len());
    let turns = request_messages(&calls[2]);
    ensure!(
        turns == vec![json!({ "role": "user", "content": [{ "type": "text", "text": question }] })],
        "after /new the request carried more than the new turn: {}",
        Value::Array(turns.clone())
    );
    Ok(())
}
