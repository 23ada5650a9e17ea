//! Messages of one chat posted back to back (P2): never generated at the
//! same time, answered in update order, and the later request carries the
//! earlier exchange.

use crate::ESSAY;
use anyhow::{ensure, Context as _, Result};
use fleet_tests::fake_anthropic::ScriptedResponse;
use fleet_tests::harness::lifecycle::{
    answer_of, derived_update, in_private_chat, request_messages, sse, update_id_of, Job, Lifecycle, ADA, WAIT,
};
use serde_json::Value;

const FIRST: &str = "telegram/ada_capital.json";
const SECOND: &str = "telegram/ada_after_stall.json";
const MOONS: &str = "anthropic/moons_ok.sse";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_messages_of_one_chat_are_never_generated_at_the_same_time() -> Result<()> {
    let t = Lifecycle::start("oneatatime", 2, &[]).await?;
    let result = one_at_a_time(&t).await;
    t.finish(result).await
}

async fn one_at_a_time(t: &Lifecycle) -> Result<()> {
    t.grant(ADA, "5.00").await?;
    // Whichever job runs first streams for ~4 s; the other answer is instant.
    t.anthropic.push([sse(ESSAY, 40)?, sse(MOONS, 0)?]);
    let (first_id, second_id) = (update_id_of(FIRST)?, update_id_of(SECOND)?);
    t.post_fixture(FIRST).await?;
    t.post_fixture(SECOND).await?;

    let a = t.wait_finished(first_id, WAIT * 2).await?;
    let b = t.wait_finished(second_id, WAIT * 2).await?;
    ensure!(a.status == "done" && b.status == "done", "jobs: {a:?} {b:?}");
    let (earlier, later) = by_start(a, b)?;
    let earlier_end = earlier.finished_at.context("no finished_at")?;
    let later_start = later.started_at.context("no started_at")?;
    ensure!(
        later_start >= earlier_end,
        "the jobs overlapped: one started at {later_start}, before the other finished at {earlier_end}"
    );

    let calls = t.anthropic.calls();
    ensure!(calls.len() == 2, "expected 2 Messages API calls, got {}", calls.len());
    let first_call_end = calls[0].ended_at.context("first stream still open")?;
    ensure!(calls[1].received_at >= first_call_end, "the second call started while the first streamed");

    // The second message waited, and its user was told so, before its answer.
    let (notices, messages): (Vec<_>, Vec<_>) =
        t.messages_to(ADA).into_iter().partition(|m| m.text == worker::notices::QUEUED);
    ensure!(notices.len() == 1, "expected one queued notice, got {notices:?}");
    ensure!(
        messages.len() == 2 && notices[0].message_id < messages[1].message_id,
        "the queued notice came after the answer it announces: {notices:?} {messages:?}"
    );
    let texts: Vec<&str> = messages.iter().map(|m| m.text.as_str()).collect();
    ensure!(
        texts == [answer_of(ESSAY)?.as_str(), answer_of(MOONS)?.as_str()],
        "answers interleaved or extra: {texts:#?}"
    );
    ensure!(
        earlier.reply_message_ids == [messages[0].message_id] && later.reply_message_ids == [messages[1].message_id],
        "each job has its own one answer: {earlier:?} {later:?}"
    );

    // The later request continues the conversation: user, assistant, user.
    let turns = request_messages(&calls[1]);
    let roles: Vec<&str> = turns.iter().map(|m| m["role"].as_str().unwrap_or_default()).collect();
    ensure!(roles == ["user", "assistant", "user"], "second request's roles: {roles:?}");
    let body = serde_json::to_string(&Value::Array(turns))?;
    ensure!(body.contains("Tea began as a medicine"), "the second request lacks the first answer: {body}");
    Ok(())
}

fn by_start(a: Job, b: Job) -> Result<(Job, Job)> {
    let (sa, sb) = (a.started_at.context("no started_at")?, b.started_at.context("no started_at")?);
    Ok(if sa <= sb { (a, b) } else { (b, a) })
}

/// Chats of this test: private chats of users that exist only here.
const CHATS: [i64; 4] = [200_000_001, 200_000_002, 200_000_003, 200_000_004];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_of_one_chat_posted_back_to_back_are_answered_in_update_order() -> Result<()> {
    let t = Lifecycle::start("updateorder", 2, &[]).await?;
    let result = in_update_order(&t).await;
    t.finish(result).await
}

async fn in_update_order(t: &Lifecycle) -> Result<()> {
    t.anthropic.set_default(Some(ScriptedResponse { event_delay_ms: 50, ..sse(MOONS, 0)? }));
    let mut pairs = Vec::new();
    for (i, &chat) in CHATS.iter().enumerate() {
        t.grant(chat, "5.00").await?;
        let base = 800_100_000 + 10 * i64::try_from(i)?;
        let first = in_private_chat(derived_update(FIRST, base, 1, "First question.")?, chat);
        let second = in_private_chat(derived_update(SECOND, base + 1, 2, "Second question.")?, chat);
        t.post(&first).await?;
        t.post(&second).await?;
        pairs.push((chat, base, base + 1));
    }
    let mut wrong = Vec::new();
    for (chat, first, second) in pairs {
        let a = t.wait_finished(first, WAIT * 2).await?;
        let b = t.wait_finished(second, WAIT * 2).await?;
        let (a_end, b_start) = (a.finished_at.context("no finished_at")?, b.started_at.context("no started_at")?);
        let a_reply = a.reply_message_ids.first().copied().with_context(|| format!("no answer to {first}"))?;
        let b_reply = b.reply_message_ids.first().copied().with_context(|| format!("no answer to {second}"))?;
        if b_start < a_end || a_reply >= b_reply {
            wrong.push(format!(
                "chat {chat}: update {second} started at {b_start} (answer #{b_reply}), update {first} finished at {a_end} (answer #{a_reply})"
            ));
        }
    }
    ensure!(wrong.is_empty(), "answered out of update order:\n{}", wrong.join("\n"));
    Ok(())
}

/// One "queued" notice per busy period (issue 16 part 14): three messages
/// posted while an answer streams get one notice, a reply to the first
/// message that waits, not one per message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_waiting_behind_an_answer_get_one_queued_notice_replying_to_the_first() -> Result<()> {
    let t = Lifecycle::start("queuednotice", 2, &[]).await?;
    let result = one_notice(&t).await;
    t.finish(result).await
}

async fn one_notice(t: &Lifecycle) -> Result<()> {
    const CHAT: i64 = 200_000_011;
    t.grant(CHAT, "5.00").await?;
    t.anthropic.push([sse(ESSAY, 40)?, sse(MOONS, 0)?, sse(MOONS, 0)?]);
    let base = 800_200_000;
    for (n, text) in [(1, "Tell me about tea."), (2, "And moons?"), (3, "And again?")] {
        let update = in_private_chat(derived_update(FIRST, base + n, 500 + n, text)?, CHAT);
        t.post(&update).await?;
    }
    for n in 1..=3 {
        let job = t.wait_finished(base + n, WAIT * 2).await?;
        ensure!(job.status == "done", "job {n}: {job:?}");
    }
    let notices: Vec<_> = t
        .telegram
        .calls()
        .into_iter()
        .filter(|c| {
            c.method == "sendMessage"
                && c.params["chat_id"].as_i64() == Some(CHAT)
                && c.params["text"].as_str() == Some(worker::notices::QUEUED)
        })
        .collect();
    ensure!(notices.len() == 1, "expected one queued notice, got {}: {notices:#?}", notices.len());
    let reply = &notices[0].params["reply_parameters"];
    ensure!(reply["message_id"].as_i64() == Some(502), "the notice replies to the first waiting message: {reply}");
    Ok(())
}
