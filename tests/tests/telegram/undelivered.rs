//! Pay for what was delivered (issue 15 part 3): an answer the Bot API
//! refuses with 5xx on every retry is not charged. Its provider cost is
//! still on the books (charged to nobody), its hold is voided, and the job
//! ends `undelivered`.

use fleet_tests::fake_anthropic::ScriptedResponse;
use fleet_tests::fake_telegram::Fault;
use fleet_tests::harness::{fixture, fixture_bytes, spawn_app, wait_until, WAIT};
use serde_json::Value;
use std::time::Duration;
use uuid::Uuid;

const BEN: i64 = 100_000_002;

#[tokio::test]
async fn an_answer_refused_with_5xx_on_every_retry_is_not_charged_and_its_cost_is_still_booked() -> anyhow::Result<()> {
    let app = spawn_app().await?;
    billing_worker::ledger::grant(&app.db.pool, BEN, "5".parse()?, Uuid::now_v7()).await?;
    app.anthropic.push([ScriptedResponse::from_file(fixture("anthropic/markdown_mixed.sse"))?]);
    app.telegram.add_fault(Fault {
        methods: vec!["sendMessage".into()],
        nth: 1,
        status: 500,
        retry_after: None,
        description: None,
        times: 1_000,
        stall: false,
    });
    let update = fixture_bytes("telegram/ben_markdown.json")?;
    let update_id = serde_json::from_slice::<Value>(&update)?["update_id"].as_i64().unwrap_or(0);
    assert_eq!(app.post_update(&update).await?, 200);
    // The pacer retries 5xx answers with backoff until its delivery
    // deadline (`TELEGRAM_DELIVERY_DEADLINE_S`, 30 s by default).
    let (job_id, outcome) = app.job_outcome(update_id, Duration::from_secs(120)).await?;
    let pool = app.db.pool.clone();
    assert_eq!(outcome, "undelivered");
    assert!(app.telegram.messages().iter().all(|m| m.chat_id != BEN), "nothing reached Ben");
    // The provider's cost reaches the ledger, charged to nobody.
    wait_until("the call's provider cost in the ledger", WAIT, || {
        let pool = pool.clone();
        async move {
            let n: i64 =
                sqlx::query_scalar("SELECT count(*) FROM ledger_entries WHERE job_id = $1 AND kind = 'provider_cost'")
                    .bind(job_id)
                    .fetch_one(&pool)
                    .await?;
            Ok(n >= 1)
        }
    })
    .await?;
    let user_entries: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ledger_entries WHERE job_id = $1 AND kind IN ('usage_charge', 'tool_charge')",
    )
    .bind(job_id)
    .fetch_one(&pool)
    .await?;
    assert_eq!(user_entries, 0, "Ben was charged for an answer he never got");
    let balance: rust_decimal::Decimal =
        sqlx::query_scalar("SELECT fleet_available_balance($1)").bind(BEN).fetch_one(&pool).await?;
    assert_eq!(balance, "5".parse()?, "the balance is whole and no hold is left on it");
    let hold: Option<String> =
        sqlx::query_scalar("SELECT status FROM holds WHERE job_id = $1").bind(job_id).fetch_optional(&pool).await?;
    assert_ne!(hold.as_deref(), Some("active"), "the hold was left active");
    app.cleanup().await
}

/// Attack (a partly delivered answer is waived): an answer of two messages
/// whose first part reached the user and whose second the Bot API refuses
/// with 5xx until the delivery deadline. `send_fenced_in` returns
/// `DeliveryError::Failed` without the id of the part it sent, so the job
/// ends `undelivered` and `waive_charges` makes the whole answer free, while
/// the user has read its first 4,096 characters — and the job records no
/// reply, as if nothing had been sent. What reached the user must not be
/// recorded as nothing.
#[tokio::test]
async fn an_answer_whose_first_part_was_delivered_is_not_recorded_as_undelivered() -> anyhow::Result<()> {
    use fleet_tests::harness::tools::{message, spawn_fleet, sse, ADA};
    let app = spawn_fleet(|s| s.telegram_delivery_deadline_s = 2).await?;
    app.grant(ADA, "5.00").await?;
    // Two parts: 6,000 characters of plain words.
    let long = "All work and no play makes a dull answer. ".repeat(143);
    app.anthropic.push([ScriptedResponse::from_sse(sse::text_turn(&long))]);
    app.anthropic.set_default(None);
    app.telegram.add_fault(Fault {
        methods: vec!["sendMessage".into()],
        nth: 2,
        status: 502,
        retry_after: None,
        description: None,
        times: 1_000,
        stall: false,
    });
    let update_id = 900_777_001;
    app.post(&message(update_id, "Write me something long.")).await?;
    app.job_outcome(update_id, Duration::from_secs(60)).await?;
    let pool = app.db.pool.clone();
    let (outcome, replies): (String, Vec<i64>) =
        sqlx::query_as("SELECT outcome, reply_message_ids FROM jobs WHERE update_id = $1")
            .bind(update_id)
            .fetch_one(&pool)
            .await?;
    let delivered: Vec<i64> =
        app.telegram.messages().iter().filter(|m| m.chat_id == ADA).map(|m| m.message_id).collect();
    anyhow::ensure!(!delivered.is_empty(), "the first part should have reached Ada");
    anyhow::ensure!(
        outcome != "undelivered" && replies == delivered,
        "part {delivered:?} reached Ada, but the job ended {outcome:?} with reply ids {replies:?} \
         (its charges waived)"
    );
    app.cleanup().await
}
