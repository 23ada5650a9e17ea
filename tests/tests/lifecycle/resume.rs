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
