//! Bot API errors by class (issue 16 part 3): 5xx answers and timeouts on
//! every kind of call an answer makes — `sendChatAction`,
//! `sendMessageDraft`, `editMessageText` and `sendMessage` — are retried
//! with backoff (or, for progress, skipped until the next update); the
//! answer arrives exactly once and is charged exactly once.

use fleet_tests::fake_anthropic::ScriptedResponse;
use fleet_tests::fake_telegram::{Fault, TgCall};
use fleet_tests::harness::{fixture, wait_until, TestApp, TestDb, BOT_TOKEN, BOT_USERNAME, WAIT};
use serde_json::Value;
use shared::secret::Secret;
use shared::telegram::BotApi;
use std::time::Duration;
use uuid::Uuid;
use worker::telegram::pacer::Pacer;

const ADA: i64 = 100_000_001;
const BEN: i64 = 100_000_002;
const GROUP: i64 = -1_001_700_000_001;

fn fault(method: &str, nth: usize, status: u16, times: usize, stall: bool) -> Fault {
    Fault { methods: vec![method.into()], nth, status, retry_after: None, description: None, times, stall }
}

async fn post_and_finish(app: &TestApp, update: &str) -> anyhow::Result<(Uuid, String)> {
    app.post_fixture_and_finish(update).await
}

/// The job's user charges once the billing-worker applied them.
async fn usage_charges(app: &TestApp, job_id: Uuid) -> anyhow::Result<i64> {
    let pool = app.db.pool.clone();
    wait_until("the charge in the ledger", WAIT, || {
        let pool = pool.clone();
        async move {
            let n: i64 =
                sqlx::query_scalar("SELECT count(*) FROM ledger_entries WHERE job_id = $1 AND kind = 'usage_charge'")
                    .bind(job_id)
                    .fetch_one(&pool)
                    .await?;
            Ok(n >= 1)
        }
    })
    .await?;
    Ok(sqlx::query_scalar("SELECT count(*) FROM ledger_entries WHERE job_id = $1 AND kind = 'usage_charge'")
        .bind(job_id)
        .fetch_one(&app.db.pool)
        .await?)
}

fn of(calls: &[TgCall], method: &str, chat: i64) -> Vec<TgCall> {
    calls
        .iter()
        .filter(|c| c.method == method && c.params.get("chat_id").and_then(Value::as_i64) == Some(chat))
        .cloned()
        .collect()
}

/// Every call an answer makes goes through the pacer, which retries a 5xx
/// answer and a timeout (with backoff) until its delivery deadline.
#[tokio::test]
async fn the_pacer_retries_a_5xx_and_a_timeout_on_every_kind_of_answer_call() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let fake = fleet_tests::fake_telegram::FakeTelegram::start("127.0.0.1:0".parse()?, BOT_USERNAME).await?;
    let bot = BotApi::new(&fake.api_url(), Secret::new(BOT_TOKEN), Duration::from_secs(5))
        .map_err(anyhow::Error::msg)?
        .with_call_timeout(Duration::from_secs(1));
    let pacer = Pacer::new(db.pool.clone(), Duration::from_millis(1), Duration::from_millis(1), Duration::ZERO);
    let sent = pacer.call(ADA, || bot.send_message(ADA, "first", None)).await?;
    for method in ["sendChatAction", "sendMessageDraft", "editMessageText", "sendMessage"] {
        fake.add_fault(fault(method, 1, 502, 1, false));
        fake.add_fault(fault(method, 2, 200, 1, true));
        let r = match method {
            "sendChatAction" => pacer.call_action(ADA, || bot.send_typing_in(ADA, None)).await,
            "sendMessageDraft" => pacer.call(ADA, || bot.send_message_draft(ADA, 7, "so far", None)).await,
            "editMessageText" => pacer.call(ADA, || bot.edit_message_text(ADA, sent.message_id, "edited", None)).await,
            _ => pacer.call(ADA, || bot.send_message(ADA, "second", None)).await.map(|_| ()),
        };
        assert!(r.is_ok(), "{method}: {r:?}");
        let statuses: Vec<u16> = of(&fake.calls(), method, ADA).iter().map(|c| c.status).collect();
        let expected: &[u16] = if method == "sendMessage" { &[200, 502, 200, 200] } else { &[502, 200, 200] };
        assert_eq!(statuses, expected, "{method}: a 502, a stall (recorded with the fault's status), then success");
        fake.clear_faults();
    }
    let texts: Vec<String> = fake.messages().into_iter().map(|m| m.text).collect();
    assert_eq!(texts, ["edited", "second"], "each call took effect once");
    fake.shutdown().await;
    db.cleanup().await
}

#[tokio::test]
async fn five_hundreds_on_the_chat_action_the_drafts_and_the_answer_are_retried_and_it_arrives_once(
) -> anyhow::Result<()> {
    let app = TestApp::builder().spawn().await?;
    app.grant(BEN, "5").await?;
    let mut slow = ScriptedResponse::from_file(fixture("anthropic/markdown_mixed.sse"))?;
    slow.event_delay_ms = 50;
    app.anthropic.push([slow]);
    app.telegram.add_fault(fault("sendChatAction", 1, 502, 1, false));
    app.telegram.add_fault(fault("sendMessageDraft", 1, 500, 2, false));
    app.telegram.add_fault(fault("sendMessage", 1, 502, 2, false));
    let (job_id, outcome) = post_and_finish(&app, "telegram/ben_markdown.json").await?;
    assert_eq!(outcome, "answered");
    let calls = app.telegram.calls();
    let sends = of(&calls, "sendMessage", BEN);
    assert_eq!(sends.iter().map(|c| c.status).collect::<Vec<_>>(), [502, 502, 200], "retried after two 502s");
    let received: Vec<_> = app.telegram.messages().into_iter().filter(|m| m.chat_id == BEN).collect();
    assert_eq!(received.len(), 1, "one copy of the answer: {received:#?}");
    assert_eq!(usage_charges(&app, job_id).await?, 1, "charged once");
    app.cleanup().await
}

#[tokio::test]
async fn timeouts_on_the_chat_action_a_draft_and_the_answer_are_retried_and_it_arrives_once() -> anyhow::Result<()> {
    let app = TestApp::builder().worker(|s| s.telegram_timeout_s = 1).spawn().await?;
    app.grant(ADA, "5").await?;
    app.anthropic.push([ScriptedResponse::from_file(fixture("anthropic/text_group_answer.sse"))?]);
    app.telegram.add_fault(fault("sendChatAction", 1, 200, 1, true));
    app.telegram.add_fault(fault("sendMessageDraft", 1, 200, 1, true));
    app.telegram.add_fault(fault("sendMessage", 1, 200, 1, true));
    let (job_id, outcome) = post_and_finish(&app, "telegram/ada_capital.json").await?;
    assert_eq!(outcome, "answered");
    let sends = of(&app.telegram.calls(), "sendMessage", ADA);
    assert_eq!(sends.len(), 2, "one stalled send, one retry: {sends:#?}");
    let received: Vec<_> = app.telegram.messages().into_iter().filter(|m| m.chat_id == ADA).collect();
    assert_eq!(received.len(), 1, "one copy of the answer: {received:#?}");
    assert!(received[0].text.contains("backon"), "{}", received[0].text);
    assert_eq!(usage_charges(&app, job_id).await?, 1, "charged once");
    app.cleanup().await
}

#[tokio::test]
async fn a_5xx_and_a_timeout_on_group_edits_leave_one_answer_charged_once() -> anyhow::Result<()> {
    let app = TestApp::builder().worker(|s| s.telegram_timeout_s = 1).spawn().await?;
    app.grant(BEN, "5").await?;
    let mut slow = ScriptedResponse::from_file(fixture("anthropic/text_group_answer.sse"))?;
    slow.event_delay_ms = 100;
    app.anthropic.push([slow]);
    app.telegram.add_fault(fault("editMessageText", 1, 502, 1, false));
    app.telegram.add_fault(fault("editMessageText", 2, 200, 1, true));
    let (job_id, outcome) = post_and_finish(&app, "telegram/group_with_mention.json").await?;
    assert_eq!(outcome, "answered");
    let edits = of(&app.telegram.calls(), "editMessageText", GROUP);
    assert!(edits.len() >= 3, "edits went on after a 502 and a timeout: {edits:#?}");
    let received: Vec<_> = app.telegram.messages().into_iter().filter(|m| m.chat_id == GROUP).collect();
    assert_eq!(received.len(), 1, "one message, edited into the answer: {received:#?}");
    assert!(received[0].text.contains("backon") && received[0].text.contains("full jitter."), "{}", received[0].text);
    assert_eq!(usage_charges(&app, job_id).await?, 1, "charged once");
    app.cleanup().await
}

/// In a group the answer replies to the question it answers (issue 16 part
/// 1), allowing the original to be gone; in a private chat it does not.
#[tokio::test]
async fn a_group_answer_replies_to_its_question_and_a_private_one_does_not() -> anyhow::Result<()> {
    let app = TestApp::builder().spawn().await?;
    app.grant(BEN, "5").await?;
    app.grant(ADA, "5").await?;
    app.anthropic.push([ScriptedResponse::from_file(fixture("anthropic/text_group_answer.sse"))?]);
    let (_, outcome) = post_and_finish(&app, "telegram/group_with_mention.json").await?;
    assert_eq!(outcome, "answered");
    app.anthropic.push([ScriptedResponse::from_file(fixture("anthropic/text_group_answer.sse"))?]);
    let (_, outcome) = post_and_finish(&app, "telegram/ada_capital.json").await?;
    assert_eq!(outcome, "answered");
    let calls = app.telegram.calls();
    let group_sends = of(&calls, "sendMessage", GROUP);
    assert!(!group_sends.is_empty());
    let reply = &group_sends[0].params["reply_parameters"];
    assert_eq!(reply["message_id"].as_i64(), Some(402), "the question's message id: {reply}");
    assert_eq!(reply["allow_sending_without_reply"].as_bool(), Some(true));
    assert!(
        group_sends[1..].iter().all(|c| c.params.get("reply_parameters").is_none()),
        "only the first message replies"
    );
    assert!(of(&calls, "sendMessage", ADA).iter().all(|c| c.params.get("reply_parameters").is_none()));
    app.cleanup().await
}

/// No-op edits are coalesced away (issue 16 part 14): when the group's
/// progress message already shows the answer, delivery does not edit it
/// again (Telegram would answer "message is not modified").
#[tokio::test]
async fn a_group_answer_makes_no_edit_that_changes_nothing() -> anyhow::Result<()> {
    let app = TestApp::builder().spawn().await?;
    app.grant(BEN, "5").await?;
    let mut slow = ScriptedResponse::from_file(fixture("anthropic/text_group_answer.sse"))?;
    slow.event_delay_ms = 100;
    app.anthropic.push([slow]);
    let (_, outcome) = post_and_finish(&app, "telegram/group_with_mention.json").await?;
    assert_eq!(outcome, "answered");
    let edits = of(&app.telegram.calls(), "editMessageText", GROUP);
    let no_ops: Vec<_> = edits.iter().filter(|c| c.status != 200).collect();
    assert!(no_ops.is_empty(), "edits that changed nothing: {no_ops:#?}");
    let received: Vec<_> = app.telegram.messages().into_iter().filter(|m| m.chat_id == GROUP).collect();
    assert_eq!(received.len(), 1, "{received:#?}");
    assert!(received[0].text.contains("full jitter."), "{}", received[0].text);
    app.cleanup().await
}
