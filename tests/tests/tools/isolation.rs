//! Two tools of one turn writing at the same time, each in its own
//! transaction (P4, audit #1): the one forced to fail leaves none of its
//! rows, the other's rows stay.

use anyhow::{ensure, Result};
use fleet_tests::harness::tools::{tool_use, ClaimedJob};
use serde_json::json;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Every note insert takes `seconds`; a note containing `poison` is refused.
async fn slow_notes_refusing_poison(claimed: &ClaimedJob, seconds: f64) -> Result<()> {
    sqlx::query(&format!(
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             PERFORM pg_sleep({seconds});
             IF NEW.note LIKE '%poison%' THEN RAISE EXCEPTION 'poisoned note refused'; END IF;
             RETURN NEW;
         END $$"
    ))
    .execute(&claimed.db.pool)
    .await?;
    sqlx::query(
        "CREATE TRIGGER refuse_poison BEFORE INSERT ON user_notes FOR EACH ROW EXECUTE FUNCTION refuse_poison()",
    )
    .execute(&claimed.db.pool)
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_failing_in_the_database_leaves_no_rows_while_the_concurrent_one_commits() -> Result<()> {
    let claimed = ClaimedJob::new(10).await?;
    slow_notes_refusing_poison(&claimed, 1.0).await?;
    let uses = vec![
        tool_use("toolu_good", "remember", json!({"note": "likes green tea"})),
        tool_use("toolu_bad", "remember", json!({"note": "poison pill"})),
    ];
    let started = Instant::now();
    let outcomes = claimed.run(uses, &CancellationToken::new()).await??;
    let took = started.elapsed();

    // Both inserts sleep 1 s inside their own transactions: together, not one after the other.
    ensure!(took < Duration::from_millis(1_900), "the two tools ran one after the other: {took:?}");
    assert_eq!(outcomes.len(), 2);
    assert!(!outcomes[0].is_error, "{outcomes:?}");
    assert!(outcomes[0].content.contains("\"stored\":true"), "{}", outcomes[0].content);
    assert_eq!(outcomes[0].charged, "0.001".parse()?);
    assert!(outcomes[1].is_error, "{outcomes:?}");
    assert!(outcomes[1].content.contains("poisoned note refused"), "{}", outcomes[1].content);
    assert!(outcomes[1].charged.is_zero());

    assert_eq!(claimed.notes().await?, ["likes green tea"]);
    let calls = claimed.tool_calls().await?;
    assert_eq!(calls, [("toolu_bad".to_owned(), true), ("toolu_good".to_owned(), false)]);
    assert_eq!(claimed.charged_tool_uses().await?, ["toolu_good"], "a failed call is free");
    claimed.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_whose_charge_cannot_be_written_rolls_back_its_note_and_call_while_the_other_commits() -> Result<()> {
    let claimed = ClaimedJob::new(10).await?;
    // The failing call has already written its note and its tool_calls row
    // when its billing event is refused: the transaction must undo both.
    sqlx::query(
        "CREATE FUNCTION refuse_charge() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.payload->>'tool_use_id' = 'toolu_bad' THEN RAISE EXCEPTION 'charge refused'; END IF;
             RETURN NEW;
         END $$",
    )
    .execute(&claimed.db.pool)
    .await?;
    sqlx::query(
        "CREATE TRIGGER refuse_charge BEFORE INSERT ON billing_outbox FOR EACH ROW EXECUTE FUNCTION refuse_charge()",
    )
    .execute(&claimed.db.pool)
    .await?;
    slow_notes_refusing_poison(&claimed, 0.3).await?;
    let uses = vec![
        tool_use("toolu_good", "remember", json!({"note": "birthday in May"})),
        tool_use("toolu_bad", "remember", json!({"note": "lives in Lyon"})),
    ];
    let ran = claimed.run(uses, &CancellationToken::new()).await?;

    let err = ran.expect_err("a charge that cannot be written is a database error of the turn");
    assert!(err.to_string().contains("charge refused"), "{err}");
    assert_eq!(claimed.notes().await?, ["birthday in May"], "the failed call's note was rolled back");
    assert_eq!(claimed.tool_calls().await?, [("toolu_good".to_owned(), false)]);
    assert_eq!(claimed.charged_tool_uses().await?, ["toolu_good"]);
    claimed.cleanup().await
}
