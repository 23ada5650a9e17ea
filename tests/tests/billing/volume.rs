//! Many events with duplicates and redeliveries: the ledger's totals are
//! exact to the last decimal place.

use fleet_tests::harness::billing::{grant, publish, usage, BillingWorker};
use fleet_tests::harness::{wait_until, Broker, TestDb};
use rust_decimal::Decimal;
use std::time::Duration;
use uuid::Uuid;

#[tokio::test]
async fn ten_thousand_events_with_a_fifth_duplicated_give_exact_totals() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let broker = Broker::new().await?;
    broker.declare().await?;
    for user in 1..=10 {
        grant(&db.pool, user, "1000").await?;
    }
    let job = Uuid::now_v7();
    let unique: Vec<_> =
        (0..8_000).map(|i| usage(job, i + 1, i64::from(i % 10 + 1), &format!("0.000{}", i % 97 + 1))).collect();
    // 2,000 duplicates (every fourth event again): 10,000 deliveries.
    let mut all = unique.clone();
    all.extend(unique.iter().step_by(4).cloned());
    let worker = BillingWorker::start(&broker, &db.url, &["--prefetch", "64"])?;
    publish(&broker, &all).await?;
    let pool = db.pool.clone();
    wait_until("8,000 events applied and the queue drained", Duration::from_secs(240), || {
        let pool = pool.clone();
        let broker = &broker;
        async move {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM applied_events WHERE kind = 'usage_charge.v1'")
                .fetch_one(&pool)
                .await?;
            Ok(n == 8_000 && broker.message_count(&broker.topology.billing_queue()).await? == 0)
        }
    })
    .await?;
    worker.stop().await?;
    let want_charged: Decimal = unique
        .iter()
        .map(|e| match e {
            shared::contracts::BillingEvent::UsageCharge(c) => c.user_charge.0,
            _ => Decimal::ZERO,
        })
        .sum();
    let charged: Decimal = sqlx::query_scalar("SELECT sum(amount) FROM ledger_entries WHERE kind = 'usage_charge'")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(charged, want_charged);
    let revenue: Decimal = sqlx::query_scalar("SELECT balance FROM accounts WHERE account_id = 'system:revenue'")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(revenue, want_charged);
    let users: Decimal =
        sqlx::query_scalar("SELECT sum(balance) FROM accounts WHERE kind = 'user'").fetch_one(&db.pool).await?;
    assert_eq!(users, Decimal::from(10_000) - want_charged);
    let total: Decimal = sqlx::query_scalar("SELECT sum(balance) FROM accounts").fetch_one(&db.pool).await?;
    assert_eq!(total, Decimal::ZERO, "double entry: balances sum to zero");
    broker.cleanup().await?;
    db.cleanup().await
}
