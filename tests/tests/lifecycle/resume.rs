//! An attempt that stored its answer and died before delivering it (P1,
//! P3): the next attempt delivers the stored reply as it is — no second
//! Messages API call, no second copy of the user's turn, no second charge.

use anyhow::{ensure, Result};
use fleet_tests::harness::lifecycle::{Lifecycle, ADA, WAIT};
use uuid::Uuid;

const UPDATE_ID: i64 = 800_200_001;
const STORED_REPLY: &str = "Half an answer, kept. (Stopped.)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_stored_by_a_crashed_attempt_is_delivered_without_a_second_call_or_user_turn() -> Result<()> {
    let t = Lifecycle::start("storedreply", 1, &[]).await?;
    let result = stored_reply(&t).await;
    t.finish(result).await
}

async fn stored_reply(t: &Lifecycle) -> Result<()> {
    // What a worker leaves behind when it dies right after `finalize`
    // committed (here with no assistant text: it was stopped before any):
    // the user's turn stored, `answer_stored_at` and the reply set, and a
    // lease that has expired.
    let db = &t.dbs.bot;
    let job_id = Uuid::now_v7();
    sqlx::query("INSERT INTO users (user_id, first_name) VALUES ($1, 'Ada')").bind(ADA).execute(db).await?;
    sqlx::query("INSERT INTO chats (chat_id, kind) VALUES ($1, 'private')").bind(ADA).execute(db).await?;
    sqlx::query("INSERT INTO processed_updates (update_id, kind, chat_id, outcome) VALUES ($1, 'message', $2, 'job')")
        .bind(UPDATE_ID)
        .bind(ADA)
        .execute(db)
        .await?;
    sqlx::query(
        "INSERT INTO jobs (job_id, chat_id, user_id, update_id, kind, user_content, telegram_message_id, status,
                           attempts, lease_owner, lease_epoch, lease_expires_at, answer_stored_at, stored_reply, started_at)
         VALUES ($1, $2, $2, $3, 'chat', '[{\"type\":\"text\",\"text\":\"Tell me about tea.\"}]', 7, 'running',
                 1, 'a-crashed-worker', 1, now() - interval '1 second', now(), $4, now())",
    )
    .bind(job_id)
    .bind(ADA)
    .bind(UPDATE_ID)
    .bind(STORED_REPLY)
    .execute(db)
    .await?;
    sqlx::query(
        "INSERT INTO messages (chat_id, conversation_epoch, job_id, role, content)
         VALUES ($1, 1, $2, 'user', '[{\"type\":\"text\",\"text\":\"Tell me about tea.\"}]')",
    )
    .bind(ADA)
    .bind(job_id)
    .execute(db)
    .await?;

    // The reaper finds the expired lease and republishes the job.
    t.wait_for_message(ADA, STORED_REPLY).await?;
    let job = t.wait_finished(UPDATE_ID, WAIT).await?;
    ensure!(job.status == "done", "the resumed job did not finish: {job:?}");
    ensure!(job.reply_message_ids.len() == 1, "one reply expected: {job:?}");
    ensure!(t.anthropic.calls().is_empty(), "the resumed attempt called Claude again");
    let turns: Vec<String> = sqlx::query_scalar("SELECT role FROM messages WHERE job_id = $1 ORDER BY id")
        .bind(job_id)
        .fetch_all(db)
        .await?;
    ensure!(turns == ["user"], "the stored turns changed: {turns:?}");
    let sent = t.messages_to(ADA);
    ensure!(sent.len() == 1, "expected exactly the stored reply, got {sent:?}");
    Ok(())
}

/// What a crashed worker leaves behind for Ada's job of `update_id`: the
/// job `running` under an expired lease of epoch `attempts`, after
/// `attempts` attempts; with `stored` the reply stored and the user turn in
/// the history. The job's id.
async fn crashed_job(t: &Lifecycle, update_id: i64, attempts: i32, stored: Option<&str>) -> Result<Uuid> {
    let db = &t.dbs.bot;
    let job_id = Uuid::now_v7();
    sqlx::query("INSERT INTO users (user_id, first_name) VALUES ($1, 'Ada')").bind(ADA).execute(db).await?;
    sqlx::query("INSERT INTO chats (chat_id, kind) VALUES ($1, 'private')").bind(ADA).execute(db).await?;
    sqlx::query("INSERT INTO processed_updates (update_id, kind, chat_id, outcome) VALUES ($1, 'message', $2, 'job')")
        .bind(update_id)
        .bind(ADA)
        .execute(db)
        .await?;
    sqlx::query(
        "INSERT INTO jobs (job_id, chat_id, user_id, update_id, kind, user_content, telegram_message_id, status,
                           attempts, lease_owner, lease_epoch, lease_expires_at, answer_stored_at, stored_reply, started_at)
         VALUES ($1, $2, $2, $3, 'chat', '[{\"type\":\"text\",\"text\":\"Tell me about tea.\"}]', 7, 'running',
                 $4, 'a-crashed-worker', $4, now() - interval '1 second',
                 CASE WHEN $5::text IS NULL THEN NULL ELSE now() END, $5, now())",
    )
    .bind(job_id)
    .bind(ADA)
    .bind(update_id)
    .bind(attempts)
    .bind(stored)
    .execute(db)
    .await?;
    if stored.is_some() {
        sqlx::query(
            "INSERT INTO messages (chat_id, conversation_epoch, job_id, role, content)
             VALUES ($1, 1, $2, 'user', '[{\"type\":\"text\",\"text\":\"Tell me about tea.\"}]')",
        )
        .bind(ADA)
        .bind(job_id)
        .execute(db)
        .await?;
    }
    Ok(job_id)
}

/// Part 3's last item: the job's attempts are used up, but an earlier
/// attempt stored the answer: the answer is delivered, the job ends
/// answered, and the user is not told it failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_stored_by_the_last_attempt_is_delivered_not_failed() -> Result<()> {
    let t = Lifecycle::start("exhaustedstored", 1, &[]).await?;
    let result = exhausted_with_stored_answer(&t).await;
    t.finish(result).await
}

async fn exhausted_with_stored_answer(t: &Lifecycle) -> Result<()> {
    const UPDATE: i64 = 800_200_002;
    // MAX_ATTEMPTS is 3 in the lifecycle fleet: all of them used.
    crashed_job(t, UPDATE, 3, Some(STORED_REPLY)).await?;
    t.wait_for_message(ADA, STORED_REPLY).await?;
    let job = t.wait_finished(UPDATE, WAIT).await?;
    ensure!(
        job.status == "done" && job.outcome.as_deref() == Some("answered") && job.attempts == 4,
        "the job did not end answered by one attempt more: {job:?}"
    );
    ensure!(t.anthropic.calls().is_empty(), "the last attempt called Claude again");
    let sent: Vec<String> = t.messages_to(ADA).into_iter().map(|m| m.text).collect();
    ensure!(sent == [STORED_REPLY], "expected the stored reply alone, got {sent:?}");
    Ok(())
}

/// Attempts used up with nothing sent: the job fails with the notice, and
/// the charges of its earlier attempts (a stored round's call, a paid tool)
/// are waived — the user got no answer (P14).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_used_up_without_an_answer_waive_the_stored_rounds_charges() -> Result<()> {
    let t = Lifecycle::start("exhaustedwaive", 1, &[]).await?;
    let result = exhausted_without_answer(&t).await;
    t.finish(result).await
}

async fn exhausted_without_answer(t: &Lifecycle) -> Result<()> {
    use shared::contracts::{tool_event_id, usage_event_id, BillingEvent, ToolCharge, UsageCharge};
    use shared::money::Usd;
    const UPDATE: i64 = 800_200_003;
    let job_id = crashed_job(t, UPDATE, 3, None).await?;
    let now = chrono::Utc::now();
    let usage = BillingEvent::UsageCharge(UsageCharge {
        event_id: usage_event_id(job_id, 1),
        job_id,
        update_id: UPDATE,
        lease_epoch: 2,
        api_call_seq: 1,
        user_id: ADA,
        chat_id: ADA,
        request_id: Some("req_round_1".into()),
        model: "claude-sonnet-4-5-20250929".into(),
        tokens: shared::pricing::TokenCounts { input: 600, output: 60, ..Default::default() },
        provider_cost: Usd("0.0027".parse()?),
        user_charge: Usd("0.00405".parse()?),
        price_model: "claude-sonnet-4-5".into(),
        price_effective_from: chrono::NaiveDate::from_ymd_opt(2025, 9, 29).unwrap_or_default(),
        estimated: false,
        abandoned: false,
        occurred_at: now,
    });
    let tool = BillingEvent::ToolCharge(ToolCharge {
        event_id: tool_event_id(job_id, "toolu_1"),
        job_id,
        user_id: ADA,
        chat_id: ADA,
        tool_use_id: "toolu_1".into(),
        tool_name: "remember".into(),
        user_charge: Usd("0.001".parse()?),
        waived: false,
        occurred_at: now,
    });
    for event in [&usage, &tool] {
        sqlx::query("INSERT INTO billing_outbox (event_id, job_id, payload) VALUES ($1, $2, $3)")
            .bind(event.event_id())
            .bind(job_id)
            .bind(serde_json::to_value(event)?)
            .execute(&t.dbs.bot)
            .await?;
    }
    t.wait_for_message(ADA, "after several attempts").await?;
    let job = t.wait_finished(UPDATE, WAIT).await?;
    ensure!(job.outcome.as_deref() == Some("attempts_exhausted"), "{job:?}");
    let payloads: Vec<serde_json::Value> =
        sqlx::query_scalar("SELECT payload FROM billing_outbox WHERE job_id = $1 ORDER BY event_id")
            .bind(job_id)
            .fetch_all(&t.dbs.bot)
            .await?;
    ensure!(payloads.len() == 2, "{payloads:#?}");
    for p in &payloads {
        let waived = p["abandoned"] == true || p["waived"] == true;
        ensure!(waived && p["user_charge"] == "0", "a charge of an unanswered job stands: {p}");
    }
    Ok(())
}
