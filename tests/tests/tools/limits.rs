//! A tool that hangs: `recall` blocked by a lock the test holds on
//! `user_notes` (`LOCK TABLE … IN ACCESS EXCLUSIVE MODE` in another
//! transaction), so the tool really waits in PostgreSQL. Its timeout cuts it
//! off, and `/stop` cancels it; either way it is answered with an error
//! result at once, its statement is cancelled on the server, and the other
//! tools of the turn are not held up.

use anyhow::{ensure, Result};
use fleet_tests::fake_anthropic::ScriptedResponse;
use fleet_tests::harness::tools::{lock_waiters, message, spawn_fleet, sse, tool_use, ClaimedJob, ADA};
use fleet_tests::harness::{wait_until, TestDb, WAIT};
use serde_json::json;
use sqlx::{Postgres, Transaction};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Holds an exclusive lock on `user_notes` until rolled back.
async fn lock_notes(db: &TestDb) -> Result<Transaction<'static, Postgres>> {
    let mut tx = db.pool.begin().await?;
    sqlx::query("LOCK TABLE user_notes IN ACCESS EXCLUSIVE MODE").execute(&mut *tx).await?;
    Ok(tx)
}

/// Waits until no statement of the database waits on the lock any more.
async fn no_statement_left_waiting(db: &TestDb) -> Result<()> {
    wait_until("the cut-off statement to be cancelled on the server", Duration::from_secs(5), || async {
        Ok(lock_waiters(db).await? == 0)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_tool_is_cut_off_by_its_timeout_and_answered_with_an_error() -> Result<()> {
    let claimed = ClaimedJob::new(1).await?;
    let lock = lock_notes(&claimed.db).await?;
    let uses = vec![
        tool_use("toolu_slow", "recall", json!({})),
        tool_use("toolu_quick", "calculator", json!({"expression": "6 * 7"})),
    ];
    let started = Instant::now();
    let outcomes = claimed.run(uses, &CancellationToken::new()).await??;
    let took = started.elapsed();

    // Still holding the lock: the tool was not waited for.
    ensure!(took < Duration::from_secs(3), "TOOL_TIMEOUT_S=1 but run_tools took {took:?}");
    assert!(outcomes[0].is_error, "{outcomes:?}");
    assert_eq!(outcomes[0].content, "the tool did not finish within 1 s");
    assert!(!outcomes[1].is_error && outcomes[1].content == "42", "the other tool is unaffected: {outcomes:?}");
    no_statement_left_waiting(&claimed.db).await?;
    assert_eq!(
        claimed.tool_calls().await?,
        [("toolu_quick".to_owned(), false), ("toolu_slow".to_owned(), true)],
        "the timed-out call is recorded as an error"
    );
    lock.rollback().await?;

    // The pool was not left with a broken connection: the next call works.
    let again = claimed.run(vec![tool_use("toolu_after", "recall", json!({}))], &CancellationToken::new()).await??;
    assert!(!again[0].is_error, "{again:?}");
    claimed.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_during_a_slow_tool_cancels_it_at_once() -> Result<()> {
    let claimed = ClaimedJob::new(30).await?;
    let lock = lock_notes(&claimed.db).await?;
    let cancel = CancellationToken::new();
    let run = claimed.run(vec![tool_use("toolu_slow", "recall", json!({}))], &cancel);
    let stop = async {
        wait_until("the tool to wait on the lock", WAIT, || async { Ok(lock_waiters(&claimed.db).await? == 1) })
            .await?;
        cancel.cancel();
        Ok::<Instant, anyhow::Error>(Instant::now())
    };
    let (outcomes, stopped_at) = tokio::join!(run, stop);
    let (outcomes, stopped_at) = (outcomes??, stopped_at?);
    let after_stop = stopped_at.elapsed();

    ensure!(after_stop < Duration::from_secs(2), "run_tools returned {after_stop:?} after the cancellation");
    assert!(outcomes[0].is_error, "{outcomes:?}");
    assert!(outcomes[0].content.starts_with("cancelled"), "{}", outcomes[0].content);
    no_statement_left_waiting(&claimed.db).await?;
    assert_eq!(claimed.tool_calls().await?, [("toolu_slow".to_owned(), true)]);
    lock.rollback().await?;
    claimed.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_sent_during_a_slow_tool_ends_the_answer_long_before_the_tool_timeout() -> Result<()> {
    let fleet = spawn_fleet(|s| s.tool_timeout_s = 20).await?;
    fleet.grant(ADA, "5.00").await?;
    fleet.anthropic.push([ScriptedResponse::from_sse(sse::tool_turn(&[("toolu_recall", "recall", json!({}))]))]);
    fleet.anthropic.set_default(Some(ScriptedResponse::from_sse(sse::text_turn("Nothing saved yet."))));
    let lock = lock_notes(&fleet.db).await?;

    fleet.post(&message(900_000_001, "What do you remember about me?")).await?;
    wait_until("the tool to wait on the lock", WAIT, || async { Ok(lock_waiters(&fleet.db).await? == 1) }).await?;
    let stop_posted = Instant::now();
    fleet.post(&message(900_000_002, "/stop")).await?;
    let reply = fleet.wait_for_message(ADA, "(Stopped.)").await?;
    let took = stop_posted.elapsed();

    ensure!(took < Duration::from_secs(5), "the answer ended {took:?} after /stop (TOOL_TIMEOUT_S=20)");
    assert!(!reply.contains("Nothing saved yet"), "no call after the stop: {reply}");
    let output: Option<serde_json::Value> =
        sqlx::query_scalar("SELECT output FROM tool_calls WHERE tool_use_id = 'toolu_recall'")
            .fetch_optional(&fleet.db.pool)
            .await?;
    let output = output.and_then(|o| o.as_str().map(str::to_owned)).unwrap_or_default();
    assert!(output.starts_with("cancelled"), "tool_calls.output: {output:?}");
    assert_eq!(fleet.anthropic.call_count(), 1, "Claude is not asked again after /stop");
    lock.rollback().await?;
    fleet.cleanup().await
}
