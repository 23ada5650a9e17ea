//! Stars payments: a payment delivered twice credits once.

use crate::helpers::{spawn_app, wait_until, WAIT};
use serde_json::json;

fn payment_update(update_id: i64, charge: &str) -> Vec<u8> {
    json!({"update_id": update_id, "message": {"message_id": 900 + update_id % 100, "date": 1764461300,
        "chat": {"id": 100000004, "first_name": "Eve", "type": "private"},
        "from": {"id": 100000004, "is_bot": false, "first_name": "Eve"},
        "successful_payment": {"currency": "XTR", "total_amount": 500,
            "invoice_payload": "stars:v1:100000004:500:5.5", "telegram_payment_charge_id": charge}}})
    .to_string()
    .into_bytes()
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
    wait_until("the credit to be applied and every delivery seen", WAIT, || {
        let pool = pool.clone();
        async move {
            let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger_entries WHERE kind = 'top_up'")
                .fetch_one(&pool)
                .await?;
            let seen: i64 = sqlx::query_scalar("SELECT COALESCE(sum(deliveries), 0)::int8 FROM processed_updates")
                .fetch_one(&pool)
                .await?;
            let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM billing_outbox WHERE published_at IS NULL")
                .fetch_one(&pool)
                .await?;
            Ok(applied >= 1 && seen >= 3 && pending == 0)
        }
    })
    .await?;
    // Let the billing-worker drain anything still in flight before counting.
    let mut app = app;
    app.stop().await?;
    let entries: i64 = app.db.count("SELECT count(*) FROM ledger_entries WHERE kind = 'top_up'").await?;
    assert_eq!(entries, 1, "one credit for one charge");
    assert_eq!(app.db.balance(100_000_004).await?, "5.5".parse()?);
    app.cleanup().await
}
