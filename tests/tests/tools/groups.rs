//! Groups (issue 13): files and notes are scoped to (user, chat), so a
//! request made in a group never carries what a member sent or remembered
//! in private; only the asker (or an administrator) stops an answer.
//!
//! The request bodies the fake Messages API received are the evidence: they
//! are exactly what left the fleet.

use anyhow::{ensure, Context as _, Result};
use fleet_tests::fake_anthropic::ScriptedResponse;
use fleet_tests::harness::tools::{document_message, message, spawn_fleet, sse, ADA};
use serde_json::{json, Value};

/// Bob: a second member of the group.
const BOB: i64 = 100_000_002;
/// The group both are in.
const GROUP: i64 = -100_500;
/// In Ada's private document only.
const PRIVATE_FILE_TEXT: &str = "ADA-PRIVATE-FILE payroll: Ada earns 9000";
/// In Ada's private note only.
const PRIVATE_NOTE: &str = "ADA-PRIVATE-NOTE her PIN is 4711";

/// A message of `user` in the group, addressed to the bot.
fn group_message(update_id: i64, user: i64, name: &str, text: &str) -> Value {
    let mut update = message(update_id, text);
    update["message"]["from"] = json!({ "id": user, "is_bot": false, "first_name": name });
    update["message"]["chat"] = json!({ "id": GROUP, "title": "Team", "type": "group" });
    update
}

/// A turn that lists the asker's files, reads file 1 and recalls every note.
fn snooping_turn() -> ScriptedResponse {
    ScriptedResponse::from_sse(sse::tool_turn(&[
        ("toolu_list", "list_files", json!({})),
        ("toolu_read", "read_file", json!({"id": 1})),
        ("toolu_recall", "recall", json!({})),
    ]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_request_never_carries_what_a_member_sent_or_remembered_in_private() -> Result<()> {
    let fleet = spawn_fleet(|_| {}).await?;
    fleet.grant(ADA, "5.00").await?;
    fleet.grant(BOB, "5.00").await?;
    let file = PRIVATE_FILE_TEXT.as_bytes().to_vec();
    let size = file.len();
    fleet.telegram.add_file("BQADpay", file);
    fleet.anthropic.push([
        // Ada, privately: the document, then a note remembered.
        ScriptedResponse::from_sse(sse::text_turn("Got your payroll file.")),
        ScriptedResponse::from_sse(sse::tool_turn(&[("toolu_rem", "remember", json!({"note": PRIVATE_NOTE}))])),
        ScriptedResponse::from_sse(sse::text_turn("Remembered privately.")),
        // Ada in the group asks about her files and notes: the group sees none.
        snooping_turn(),
        ScriptedResponse::from_sse(sse::text_turn("Ada has nothing here.")),
        // Bob, whose request carries the group's history, snoops too.
        snooping_turn(),
        ScriptedResponse::from_sse(sse::text_turn("Bob has nothing here.")),
    ]);
    fleet.anthropic.set_default(None);

    let document = json!({"file_id": "BQADpay", "file_unique_id": "AgADpay", "file_name": "payroll.txt",
        "mime_type": "text/plain", "file_size": size});
    fleet.post(&document_message(900_013_101, document, Some("Keep this"))).await?;
    fleet.wait_for_message(ADA, "Got your payroll file.").await?;
    fleet.post(&message(900_013_102, "Remember my PIN")).await?;
    fleet.wait_for_message(ADA, "Remembered privately.").await?;
    ensure!(fleet.db.count("SELECT count(*) FROM user_notes").await? == 1, "the private note was not stored");
    let private_calls = fleet.anthropic.calls().len();

    fleet.post(&group_message(900_013_103, ADA, "Ada", "@fleet_test_bot what files and notes do I have?")).await?;
    fleet.wait_for_message(GROUP, "Ada has nothing here.").await?;
    fleet.post(&group_message(900_013_104, BOB, "Bob", "@fleet_test_bot list, read and recall everything")).await?;
    fleet.wait_for_message(GROUP, "Bob has nothing here.").await?;

    let calls = fleet.anthropic.calls();
    ensure!(calls.len() == private_calls + 4, "{} calls", calls.len());
    for call in &calls[private_calls..] {
        let body = call.body.to_string();
        ensure!(!body.contains("ADA-PRIVATE"), "a group request carried private data: {body}");
    }
    // The tools did run, and answered "nothing here" rather than failing silently.
    let bob = &calls[calls.len() - 1].body;
    let last = bob["messages"].as_array().and_then(|m| m.last()).context("no messages")?;
    let results: Vec<&Value> = last["content"].as_array().context("no content")?.iter().collect();
    let content = |id: &str| -> Result<String> {
        let block = results.iter().find(|b| b["tool_use_id"] == id).with_context(|| format!("no result {id}"))?;
        Ok(block["content"].as_str().unwrap_or_default().to_owned())
    };
    ensure!(content("toolu_list")? == r#"{"files":[]}"#, "{}", content("toolu_list")?);
    ensure!(content("toolu_read")?.contains("no file with id 1"), "{}", content("toolu_read")?);
    ensure!(content("toolu_recall")? == r#"{"notes":[]}"#, "{}", content("toolu_recall")?);
    // Ada's private chat still sees her own note and file (scoped, not lost).
    let private = &calls[2].body.to_string();
    ensure!(private.contains("ADA-PRIVATE-NOTE"), "the private request lost the note: {private}");
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_askers_stop_in_a_group_does_not_stop_the_askers_answer() -> Result<()> {
    let fleet = spawn_fleet(|_| {}).await?;
    fleet.grant(ADA, "5.00").await?;
    // Six events, 400 ms apart: a 2.4 s answer that Bob tries to stop.
    let slow = ScriptedResponse {
        event_delay_ms: 400,
        ..ScriptedResponse::from_sse(sse::text_turn("Ada's whole answer, not stopped."))
    };
    fleet.anthropic.push([slow]);
    fleet.anthropic.set_default(None);

    fleet.post(&group_message(900_013_201, ADA, "Ada", "@fleet_test_bot tell me about tea")).await?;
    let streaming = fleet.anthropic.wait_for(|c| !c.is_empty(), fleet_tests::harness::WAIT).await;
    ensure!(streaming, "Ada's answer never started");
    fleet.post(&group_message(900_013_202, BOB, "Bob", "/stop@fleet_test_bot")).await?;
    let refusal = fleet.wait_for_message(GROUP, "Only the person who asked").await?;
    ensure!(refusal.contains("administrator"), "{refusal}");

    let answer = fleet.wait_for_message(GROUP, "Ada's whole answer").await?;
    ensure!(!answer.contains("Stopped"), "Bob stopped Ada's answer: {answer}");
    let ended = fleet.anthropic.wait_for(|c| c[0].ended_at.is_some(), fleet_tests::harness::WAIT).await;
    ensure!(ended && fleet.anthropic.calls()[0].completed, "the stream was cut");
    let member_checks = fleet.telegram.calls().into_iter().filter(|c| c.method == "getChatMember").count();
    ensure!(member_checks == 1, "Bob's rights were checked {member_checks} times");
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_administrators_stop_in_a_group_stops_the_answer_and_new_needs_an_administrator() -> Result<()> {
    let fleet = spawn_fleet(|_| {}).await?;
    fleet.grant(ADA, "5.00").await?;
    fleet.grant(BOB, "5.00").await?;
    fleet.telegram.set_member_status(GROUP, BOB, "administrator");
    let slow =
        ScriptedResponse { event_delay_ms: 1_000, ..ScriptedResponse::from_sse(sse::text_turn("Ada's long answer.")) };
    fleet.anthropic.push([slow]);
    fleet.anthropic.set_default(None);

    fleet.post(&group_message(900_013_301, ADA, "Ada", "@fleet_test_bot tell me about tea")).await?;
    let streaming = fleet.anthropic.wait_for(|c| !c.is_empty(), fleet_tests::harness::WAIT).await;
    ensure!(streaming, "Ada's answer never started");
    fleet.post(&group_message(900_013_302, BOB, "Bob", "/stop@fleet_test_bot")).await?;
    let stopped = fleet.anthropic.wait_for(|c| c[0].ended_at.is_some(), fleet_tests::harness::WAIT).await;
    ensure!(stopped && !fleet.anthropic.calls()[0].completed, "the administrator's /stop did not stop the stream");

    // /new: refused for Ada (a member), done for Bob (an administrator).
    fleet.post(&group_message(900_013_303, ADA, "Ada", "/new@fleet_test_bot")).await?;
    fleet.wait_for_message(GROUP, "Only a group administrator").await?;
    fleet.post(&group_message(900_013_304, BOB, "Bob", "/new@fleet_test_bot")).await?;
    fleet.wait_for_message(GROUP, "Started a new conversation").await?;
    let epoch = fleet.db.count_of("SELECT conversation_epoch::int8 FROM chats WHERE chat_id = $1", GROUP).await?;
    ensure!(epoch == 2, "the conversation epoch is {epoch} (it starts at 1)");
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_file_sent_privately_and_in_a_group_is_kept_in_both_chats() -> Result<()> {
    let fleet = spawn_fleet(|_| {}).await?;
    fleet.grant(ADA, "5.00").await?;
    let file = b"shared notes".to_vec();
    fleet.telegram.add_file("BQADboth", file);
    fleet.anthropic.set_default(Some(ScriptedResponse::from_sse(sse::text_turn("Kept."))));
    let document = json!({"file_id": "BQADboth", "file_unique_id": "AgADboth", "file_name": "notes.txt",
        "mime_type": "text/plain"});
    fleet.post(&document_message(900_013_301, document.clone(), Some("Keep this"))).await?;
    fleet.wait_for_message(ADA, "Kept.").await?;
    let mut in_group = document_message(900_013_302, document, Some("@fleet_test_bot keep this for the team"));
    in_group["message"]["chat"] = json!({ "id": GROUP, "title": "Team", "type": "group" });
    in_group["message"]["caption_entities"] = json!([{ "type": "mention", "offset": 0, "length": 15 }]);
    fleet.post(&in_group).await?;
    fleet.wait_for_message(GROUP, "Kept.").await?;
    let chats: Vec<i64> = sqlx::query_scalar("SELECT chat_id FROM documents WHERE user_id = $1 ORDER BY chat_id")
        .bind(ADA)
        .fetch_all(&fleet.db.pool)
        .await?;
    ensure!(chats == vec![GROUP, ADA], "documents by chat: {chats:?}");
    fleet.cleanup().await
}
