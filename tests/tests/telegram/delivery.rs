//! Delivery paths end to end: entities rejected → plain text once; 403 →
//! the Claude stream stops; a migrated group continues in its new chat.

use fleet_tests::fake_anthropic::ScriptedResponse;
use fleet_tests::fake_telegram::Fault;
use fleet_tests::harness::{fixture_bytes, spawn_app, wait_until, TestApp, WAIT};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

async fn grant(app: &TestApp, user: i64) -> anyhow::Result<()> {
    billing_worker::ledger::grant(&app.db.pool, user, "5".parse()?, uuid::Uuid::now_v7()).await?;
    Ok(())
}

async fn job_done(app: &TestApp, update_id: i64) -> anyhow::Result<()> {
    let pool = app.db.pool.clone();
    wait_until("the job to finish", WAIT, || {
        let pool = pool.clone();
        async move {
            let status: Option<String> = sqlx::query_scalar("SELECT status FROM jobs WHERE update_id = $1")
                .bind(update_id)
                .fetch_optional(&pool)
                .await?;
            Ok(matches!(status.as_deref(), Some("done" | "failed")))
        }
    })
    .await
}

fn sse(name: &str) -> anyhow::Result<ScriptedResponse> {
    Ok(ScriptedResponse::from_file(fleet_tests::harness::fixture(&format!("anthropic/{name}")))?)
}

#[tokio::test]
async fn an_answer_whose_entities_are_rejected_arrives_as_plain_text_exactly_once() -> anyhow::Result<()> {
    let app = spawn_app().await?;
    grant(&app, 100_000_002).await?;
    app.anthropic.push([sse("markdown_mixed.sse")?]);
    app.telegram.add_fault(Fault {
        methods: vec!["sendMessage".into()],
        nth: 1,
        status: 400,
        retry_after: None,
        description: Some("Bad Request: can't parse entities: Unsupported start tag at byte offset 3".into()),
        times: 1,
        stall: false,
    });
    let update = fixture_bytes("telegram/ben_markdown.json")?;
    let update_id = serde_json::from_slice::<Value>(&update)?["update_id"].as_i64().unwrap_or(0);
    assert_eq!(app.post_update(&update).await?, 200);
    job_done(&app, update_id).await?;
    let sends: Vec<_> = app.telegram.calls().into_iter().filter(|c| c.method == "sendMessage").collect();
    assert_eq!(sends.len(), 2, "one refused formatted send, one plain resend: {sends:#?}");
    assert_eq!(sends[0].status, 400);
    assert!(sends[0].params.get("entities").is_some());
    assert_eq!(sends[1].status, 200);
    assert!(sends[1].params.get("entities").is_none(), "the resend is plain text");
    assert!(sends.iter().all(|c| c.params.get("parse_mode").is_none()));
    app.cleanup().await
}

#[tokio::test]
async fn a_bot_blocked_error_stops_the_claude_stream_within_a_second() -> anyhow::Result<()> {
    let app = spawn_app().await?;
    grant(&app, 100_000_003).await?;
    let mut slow = sse("essay_slow.sse")?;
    slow.event_delay_ms = 100;
    app.anthropic.push([slow]);
    // The block answers the chat's second Bot API call (the first is the
    // typing action sent as the job starts; the second a draft of streamed
    // text, or a later typing action): the stream is under way by then. A
    // block on the very first call can come before the request leaves
    // (its `open` row is written first), and then no stream is made at all.
    app.telegram.add_fault(Fault {
        methods: vec!["*".into()],
        nth: 2,
        status: 403,
        retry_after: None,
        description: Some("Forbidden: bot was blocked by the user".into()),
        times: 1000,
        stall: false,
    });
    let update = fixture_bytes("telegram/chi_essay.json")?;
    let update_id = serde_json::from_slice::<Value>(&update)?["update_id"].as_i64().unwrap_or(0);
    assert_eq!(app.post_update(&update).await?, 200);
    assert!(app.telegram.wait_for_call(|c| c.status == 403, WAIT).await, "no 403 was answered");
    let blocked_at = Instant::now();
    assert!(app.anthropic.wait_for(|calls| calls.first().is_some_and(|c| c.ended_at.is_some()), WAIT).await);
    let ended = app.anthropic.calls()[0].ended_at.expect("ended");
    let took = ended.saturating_duration_since(blocked_at);
    assert!(took <= Duration::from_secs(1), "the stream ran {took:?} after the 403");
    assert!(!app.anthropic.calls()[0].completed, "the stream was cut, not finished");
    job_done(&app, update_id).await?;
    // Calls to the chat from the block on (the worker's start-up getMe and
    // setMyCommands are not).
    let calls = app
        .telegram
        .calls()
        .into_iter()
        .filter(|c| !matches!(c.method.as_str(), "getMe" | "setMyCommands"))
        .skip_while(|c| c.status != 403)
        .count();
    assert!(calls <= 2, "{calls} Bot API calls after the user blocked the bot");
    let blocked: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT blocked_at FROM users WHERE user_id = 100000003").fetch_one(&app.db.pool).await?;
    assert!(blocked.is_some(), "the user is marked blocked");
    app.cleanup().await
}

#[tokio::test]
async fn a_migrated_groups_next_message_is_answered_in_the_new_chat_with_the_old_history() -> anyhow::Result<()> {
    let app = spawn_app().await?;
    grant(&app, 100_000_002).await?;
    app.anthropic.push([sse("text_group_answer.sse")?, sse("text_four.sse")?]);
    let first = fixture_bytes("telegram/group_with_mention.json")?;
    assert_eq!(app.post_update(&first).await?, 200);
    job_done(&app, 800_000_041).await?;
    let old_chat = -1_001_700_000_001_i64;
    let new_chat = -1_001_700_000_999_i64;
    let migrate = json!({"update_id": 800_000_900, "message": {"message_id": 500, "date": 1764461100,
        "chat": {"id": old_chat, "title": "Rust Learners", "type": "group"},
        "from": {"id": 100000002, "is_bot": false, "first_name": "Ben"}, "migrate_to_chat_id": new_chat}});
    assert_eq!(app.post_update(migrate.to_string().as_bytes()).await?, 200);
    let pool = app.db.pool.clone();
    wait_until("the chat to move", WAIT, || {
        let pool = pool.clone();
        async move {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM messages WHERE chat_id = $1")
                .bind(new_chat)
                .fetch_one(&pool)
                .await?;
            Ok(n > 0)
        }
    })
    .await?;
    let next = json!({"update_id": 800_000_901, "message": {"message_id": 1, "date": 1764461200,
        "chat": {"id": new_chat, "title": "Rust Learners", "type": "supergroup"},
        "from": {"id": 100000002, "is_bot": false, "first_name": "Ben"},
        "text": "@fleet_test_bot and what is 2 + 2?", "entities": [{"offset": 0, "length": 15, "type": "mention"}]}});
    assert_eq!(app.post_update(next.to_string().as_bytes()).await?, 200);
    job_done(&app, 800_000_901).await?;
    let calls = app.anthropic.calls();
    assert_eq!(calls.len(), 2);
    let body = calls[1].body.to_string();
    assert!(body.contains("which crate handles retries"), "the old history is sent: {body}");
    assert!(body.contains("backon"), "the old answer is sent");
    let answered_in_new = app.telegram.messages().iter().any(|m| m.chat_id == new_chat && m.text.contains("2 + 2 = 4"));
    assert!(answered_in_new, "the answer goes to the new chat");
    app.cleanup().await
}

#[tokio::test]
async fn when_drafts_are_refused_progress_edits_one_message_that_becomes_the_answer() -> anyhow::Result<()> {
    let app = spawn_app().await?;
    grant(&app, 100_000_001).await?;
    let mut slow = sse("text_group_answer.sse")?;
    slow.event_delay_ms = 100;
    app.anthropic.push([slow]);
    app.telegram.add_fault(Fault {
        methods: vec!["sendMessageDraft".into()],
        nth: 1,
        status: 400,
        retry_after: None,
        description: Some("Bad Request: TEXTDRAFT_PEER_INVALID".into()),
        times: 1000,
        stall: false,
    });
    let update = fixture_bytes("telegram/ada_capital.json")?;
    let update_id = serde_json::from_slice::<Value>(&update)?["update_id"].as_i64().unwrap_or(0);
    assert_eq!(app.post_update(&update).await?, 200);
    job_done(&app, update_id).await?;
    let drafts = app.telegram.calls().iter().filter(|c| c.method == "sendMessageDraft").count();
    assert_eq!(drafts, 1, "after the first refusal no draft is tried again");
    let messages: Vec<_> = app.telegram.messages().into_iter().filter(|m| m.chat_id == 100_000_001).collect();
    assert_eq!(messages.len(), 1, "one message, edited in place, is the answer: {messages:#?}");
    assert!(messages[0].text.contains("backon") && messages[0].text.contains("full jitter."), "{}", messages[0].text);
    assert!(messages[0].edits >= 1, "the progress message was edited into the answer");
    app.cleanup().await
}
