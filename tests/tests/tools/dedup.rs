//! A `tool_use` id seen twice in a job runs once (unique `(job, tool_use_id)`):
//! the second sighting is answered with the first result and writes nothing.

use anyhow::Result;
use fleet_tests::harness::tools::{tool_use, ClaimedJob};
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_use_id_repeated_in_a_later_turn_runs_once() -> Result<()> {
    let claimed = ClaimedJob::new(10).await?;
    let cancel = CancellationToken::new();
    let first = claimed.run(vec![tool_use("toolu_same", "remember", json!({"note": "first"}))], &cancel).await??;
    let second = claimed.run(vec![tool_use("toolu_same", "remember", json!({"note": "second"}))], &cancel).await??;

    assert!(!first[0].is_error, "{first:?}");
    assert_eq!(second[0].content, first[0].content, "answered with the recorded result");
    assert!(!second[0].is_error);
    assert!(second[0].charged.is_zero(), "charged once");
    assert_eq!(claimed.notes().await?, ["first"]);
    assert_eq!(claimed.tool_calls().await?, [("toolu_same".to_owned(), false)]);
    assert_eq!(claimed.charged_tool_uses().await?, ["toolu_same"]);
    claimed.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_use_id_repeated_within_one_turn_runs_once() -> Result<()> {
    let claimed = ClaimedJob::new(10).await?;
    // Both calls start together: the second waits for the first's row.
    sqlx::query(
        "CREATE FUNCTION slow_note() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_sleep(0.3); RETURN NEW; END $$",
    )
    .execute(&claimed.db.pool)
    .await?;
    sqlx::query("CREATE TRIGGER slow_note BEFORE INSERT ON user_notes FOR EACH ROW EXECUTE FUNCTION slow_note()")
        .execute(&claimed.db.pool)
        .await?;
    let uses = vec![
        tool_use("toolu_twin", "remember", json!({"note": "twin"})),
        tool_use("toolu_twin", "remember", json!({"note": "twin"})),
    ];
    let outcomes = claimed.run(uses, &CancellationToken::new()).await??;

    assert_eq!(outcomes.len(), 2, "every tool_use is answered");
    assert!(!outcomes[0].is_error && !outcomes[1].is_error, "{outcomes:?}");
    assert_eq!(outcomes[0].content, outcomes[1].content);
    assert_eq!(claimed.notes().await?, ["twin"]);
    assert_eq!(claimed.tool_calls().await?, [("toolu_twin".to_owned(), false)]);
    assert_eq!(claimed.charged_tool_uses().await?, ["toolu_twin"]);
    claimed.cleanup().await
}
