//! Stars payments: a payment delivered twice credits once; the credit is the
//! pack of the server-side table, never what the payload says; a payment
//! that fails the check credits nothing, is recorded once for finance, and
//! is refunded with `refund-stars` (issue 13).

use anyhow::ensure;
use clap::Parser as _;
use fleet_tests::harness::{spawn_app, wait_until, TestApp, BOT_TOKEN, WAIT};
use serde_json::json;

const EVE: i64 = 100_000_004;
const ADA: i64 = 100_000_001;

fn payment(update_id: i64, user: i64, charge: &str, payload: &str, total_amount: i64) -> Vec<u8> {
    json!({"update_id": update_id, "message": {"message_id": 900 + update_id % 100, "date": 1764461300,
        "chat": {"id": user, "first_name": "Eve", "type": "private"},
        "from": {"id": user, "is_bot": false, "first_name": "Eve"},
        "successful_payment": {"currency": "XTR", "total_amount": total_amount,
            "invoice_payload": payload, "telegram_payment_charge_id": charge}}})
    .to_string()
    .into_bytes()
}

fn payment_update(update_id: i64, charge: &str) -> Vec<u8> {
    payment(update_id, EVE, charge, "stars:v1:100000004:500:5.5", 500)
}

fn pre_checkout(update_id: i64, user: i64, query_id: &str, payload: &str, total_amount: i64) -> Vec<u8> {
    json!({"update_id": update_id, "pre_checkout_query": {"id": query_id,
        "from": {"id": user, "is_bot": false, "first_name": "Ada"},
        "currency": "XTR", "total_amount": total_amount, "invoice_payload": payload}})
    .to_string()
    .into_bytes()
}

/// Waits until every delivery of `deliveries` updates was taken in and the outbox is drained.
async fn wait_taken_in(app: &TestApp, deliveries: i64) -> anyhow::Result<()> {
    let pool = app.db.pool.clone();
    wait_until("every delivery seen and the outbox drained", WAIT, || {
        let pool = pool.clone();
        async move {
            let seen: i64 = sqlx::query_scalar("SELECT COALESCE(sum(deliveries), 0)::int8 FROM processed_updates")
                .fetch_one(&pool)
                .await?;
            let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM billing_outbox WHERE published_at IS NULL")
                .fetch_one(&pool)
                .await?;
            Ok(seen >= deliveries && pending == 0)
        }
    })
    .await
}

#[tokio::test]
async fn a_successful_payment_delivered_twice_credits_once() -> anyhow::Result<()> {
    let app = spawn_app().await?;
    // The same update twice (webhook retry) and the same charge in another update.
    let first = payment_update(800_001_001, "stxCHARGE1");
    assert_eq!(app.post_update(&first).await?, 200);
    assert_eq!(app.post_update(&first).await?, 200);
    assert_eq!(app.post_update(&payment_update(800_001_002, "stxCHARGE1")).await?, 200);
    let pool = app.db.pool.clone();
    wait_until("the credit to be applied", WAIT, || {
        let pool = pool.clone();
        async move {
            let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger_entries WHERE kind = 'top_up'")
                .fetch_one(&pool)
                .await?;
            Ok(applied >= 1)
        }
    })
    .await?;
    wait_taken_in(&app, 3).await?;
    // Let the billing-worker drain anything still in flight before counting.
    let mut app = app;
    app.stop().await?;
    let entries: i64 = app.db.count("SELECT count(*) FROM ledger_entries WHERE kind = 'top_up'").await?;
    assert_eq!(entries, 1, "one credit for one charge");
    assert_eq!(app.db.balance(EVE).await?, "5.5".parse()?);
    app.cleanup().await
}

#[tokio::test]
async fn a_pack_payment_credits_the_pack_usd_of_the_table_once() -> anyhow::Result<()> {
    let app = spawn_app().await?;
    let paid = payment(800_002_001, EVE, "stxPACK2500", "stars:v2:100000004:2500", 2500);
    assert_eq!(app.post_update(&paid).await?, 200);
    assert_eq!(app.post_update(&payment(800_002_002, EVE, "stxPACK2500", "stars:v2:100000004:2500", 2500)).await?, 200);
    wait_taken_in(&app, 2).await?;
    let mut app = app;
    app.stop().await?;
    assert_eq!(app.db.count("SELECT count(*) FROM ledger_entries WHERE kind = 'top_up'").await?, 1);
    assert_eq!(app.db.balance(EVE).await?, "30.00".parse()?, "the 2500 Stars pack of STARS_PACKS");
    assert_eq!(app.db.count("SELECT count(*) FROM payment_anomalies").await?, 0);
    app.cleanup().await
}

#[tokio::test]
async fn the_forged_payload_credits_nothing_leaves_one_anomaly_and_is_refunded_with_refund_stars() -> anyhow::Result<()>
{
    let app = spawn_app().await?;
    let forged = "stars:v1:100000001:1:1000000";
    // The pre-checkout of the forged invoice is refused.
    assert_eq!(app.post_update(&pre_checkout(800_003_001, ADA, "pcq-forged", forged, 1)).await?, 200);
    let refused = app
        .telegram
        .wait_for_call(
            |c| c.method == "answerPreCheckoutQuery" && c.params["pre_checkout_query_id"] == "pcq-forged",
            WAIT,
        )
        .await;
    ensure!(refused, "the pre-checkout query was not answered");
    let answer = app.telegram.calls().into_iter().find(|c| c.method == "answerPreCheckoutQuery");
    let answer = answer.map(|c| c.params).unwrap_or_default();
    ensure!(answer["ok"] == false || answer["ok"] == "false", "the forged pre-checkout was accepted: {answer}");

    // Telegram delivers the payment anyway (say, a client bypassing the
    // pre-checkout), twice.
    let paid = payment(800_003_002, ADA, "stxFORGED", forged, 1);
    assert_eq!(app.post_update(&paid).await?, 200);
    assert_eq!(app.post_update(&payment(800_003_003, ADA, "stxFORGED", forged, 1)).await?, 200);
    wait_taken_in(&app, 3).await?;
    let mut app = app;
    app.stop().await?;
    assert_eq!(app.db.count("SELECT count(*) FROM ledger_entries WHERE kind = 'top_up'").await?, 0);
    assert_eq!(app.db.count("SELECT count(*) FROM billing_outbox").await?, 0, "no credit was even written");
    assert_eq!(app.db.balance(ADA).await?, rust_decimal::Decimal::ZERO);
    let rows: Vec<(String, i64, String, String, i64, String)> = sqlx::query_as(
        "SELECT telegram_payment_charge_id, user_id, invoice_payload, currency, total_amount, reason FROM payment_anomalies",
    )
    .fetch_all(&app.db.pool)
    .await?;
    assert_eq!(
        rows,
        [("stxFORGED".to_owned(), ADA, forged.to_owned(), "XTR".to_owned(), 1, "unknown_pack".to_owned())],
        "one row for two deliveries"
    );

    // Finance refunds it with the existing command.
    // Secrets never come as flags: the token is set as `Settings::load` would from the environment.
    let mut settings = billing_worker::Settings::try_parse_from([
        "billing-worker",
        "--billing-database-url",
        &app.db.url,
        "--telegram-api-url",
        &app.telegram.api_url(),
        "refund-stars",
        "--charge",
        "stxFORGED",
        "--bot-database-url",
        &app.db.url,
    ])?;
    settings.bot_token = shared::secret::Secret::new(BOT_TOKEN);
    billing_worker::startup::main_with(settings, tokio_util::sync::CancellationToken::new()).await?;
    let refunds: Vec<i64> = app
        .telegram
        .calls()
        .into_iter()
        .filter(|c| c.method == "refundStarPayment" && c.params["telegram_payment_charge_id"] == "stxFORGED")
        .filter_map(|c| c.params["user_id"].as_i64().or_else(|| c.params["user_id"].as_str()?.parse().ok()))
        .collect();
    assert_eq!(refunds, [ADA]);
    assert_eq!(app.db.count("SELECT count(*) FROM payment_anomalies WHERE refunded_at IS NOT NULL").await?, 1);
    assert_eq!(app.db.count("SELECT count(*) FROM ledger_entries").await?, 0, "nothing to correct in the ledger");
    app.cleanup().await
}
