//! Two chats of one user with credit for one first call: one runs, the
//! other gets the top-up notice, and the balance never goes below zero.

use fleet_tests::fake_anthropic::ScriptedResponse;
use fleet_tests::harness::billing::grant;
use fleet_tests::harness::{fixture, fixture_bytes, spawn_app, wait_until, WAIT};
use rust_decimal::Decimal;

#[tokio::test]
async fn two_chats_of_one_user_with_credit_for_one_hold_run_one_and_refuse_the_other() -> anyhow::Result<()> {
    let app = spawn_app().await?;
    // The first call's hold (issue 15: that call's worst case only) is
    // about 0.0516 USD at max_tokens 1024 and about 0.0343 at the smallest
    // max_tokens (256): 0.07 covers one first call, and leaves too little
    // for even the smallest second one.
    grant(&app.db.pool, 100_000_002, "0.07").await?;
    let mut slow = ScriptedResponse::from_file(fixture("anthropic/text_group_answer.sse"))?;
    slow.event_delay_ms = 300;
    app.anthropic.push([slow.clone(), slow]);
    let private = fixture_bytes("telegram/ben_cache_q1.json")?;
    let group = fixture_bytes("telegram/group_with_mention.json")?;
    let (a, b) = tokio::join!(app.post_update(&private), app.post_update(&group));
    assert_eq!((a?, b?), (reqwest::StatusCode::OK, reqwest::StatusCode::OK));
    let pool = app.db.pool.clone();
    wait_until("both jobs to finish and the billing to settle", WAIT, || {
        let pool = pool.clone();
        async move {
            let open: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')")
                .fetch_one(&pool)
                .await?;
            let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs").fetch_one(&pool).await?;
            let active: i64 =
                sqlx::query_scalar("SELECT count(*) FROM holds WHERE status = 'active'").fetch_one(&pool).await?;
            let unpublished: i64 = sqlx::query_scalar("SELECT count(*) FROM billing_outbox WHERE published_at IS NULL")
                .fetch_one(&pool)
                .await?;
            Ok(jobs == 2 && open == 0 && active == 0 && unpublished == 0)
        }
    })
    .await?;
    let mut app = app;
    app.stop().await?;
    assert_eq!(app.anthropic.call_count(), 1, "only one chat reached Claude");
    let notices = app.telegram.messages().iter().filter(|m| m.text.contains("top up")).count();
    assert_eq!(notices, 1, "the other chat got the top-up notice");
    let outcomes: Vec<String> =
        sqlx::query_scalar("SELECT outcome FROM jobs ORDER BY outcome").fetch_all(&app.db.pool).await?;
    assert_eq!(outcomes, ["answered", "no_balance"]);
    let balance = app.db.balance(100_000_002).await?;
    assert!(balance >= Decimal::ZERO, "balance {balance} went below zero");
    assert_eq!(balance, "0.06721".parse()?, "0.07 − 0.00279 (text_group_answer)");
    app.cleanup().await
}

#[tokio::test]
async fn usage_explains_each_charge_with_its_model_and_tokens() -> anyhow::Result<()> {
    let app = spawn_app().await?;
    grant(&app.db.pool, 100_000_001, "5").await?;
    app.anthropic.push([ScriptedResponse::from_file(fixture("anthropic/text_capital.sse"))?]);
    assert_eq!(app.post_update(&fixture_bytes("telegram/ada_capital.json")?).await?, reqwest::StatusCode::OK);
    let pool = app.db.pool.clone();
    wait_until("the charge to be applied", WAIT, || {
        let pool = pool.clone();
        async move {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger_entries WHERE kind = 'usage_charge'")
                .fetch_one(&pool)
                .await?;
            Ok(n == 1)
        }
    })
    .await?;
    let usage = serde_json::json!({"update_id": 800_000_990, "message": {"message_id": 99, "date": 1764461300,
        "chat": {"id": 100000001, "first_name": "Ada", "type": "private"},
        "from": {"id": 100000001, "is_bot": false, "first_name": "Ada"},
        "text": "/usage", "entities": [{"offset": 0, "length": 6, "type": "bot_command"}]}});
    assert_eq!(app.post_update(usage.to_string().as_bytes()).await?, reqwest::StatusCode::OK);
    assert!(
        app.telegram
            .wait_for_call(
                |c| c.method == "sendMessage"
                    && c.params["text"].as_str().is_some_and(|t| t.contains("recent charges")),
                WAIT
            )
            .await,
        "no /usage answer"
    );
    let answer = app
        .telegram
        .messages()
        .into_iter()
        .find(|m| m.text.contains("recent charges"))
        .map(|m| m.text)
        .unwrap_or_default();
    assert!(answer.contains("0.002124"), "{answer}");
    assert!(answer.contains("claude-sonnet-4-5"), "{answer}");
    assert!(answer.contains("in,") && answer.contains("out"), "tokens by class: {answer}");
    assert!(answer.contains("+$5"), "the grant is listed: {answer}");
    app.cleanup().await
}
