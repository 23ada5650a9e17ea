//! The billing database goes away for 20 s while events flow: every event is
//! retried with backoff and applied exactly once after it returns.

use fleet_tests::harness::billing::{grant, publish, usage, BillingWorker};
use fleet_tests::harness::{admin_database_url as admin_url, wait_until, Broker, TestDb};
use rust_decimal::Decimal;
use sqlx::Connection;
use std::time::Duration;
use uuid::Uuid;

async fn set_connections(db_name: &str, allow: bool) -> anyhow::Result<()> {
    let mut admin = sqlx::PgConnection::connect(&admin_url()).await?;
    sqlx::query(&format!(r#"ALTER DATABASE "{db_name}" ALLOW_CONNECTIONS {allow}"#)).execute(&mut admin).await?;
    if !allow {
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(db_name)
        .execute(&mut admin)
        .await?;
    }
    Ok(())
}

#[tokio::test]
async fn events_flowing_while_the_billing_database_is_down_are_applied_once_when_it_returns() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let broker = Broker::new().await?;
    broker.declare().await?;
    let name = db.url.rsplit('/').next().unwrap_or_default().to_owned();
    grant(&db.pool, 42, "100").await?;
    db.pool.close().await;
    // The retry budget (1 + 2 + 4 + 8 + 16 s, each ±20 %) outlasts the outage.
    let worker = BillingWorker::start(&broker, &db.url, &["--retry-delays-ms", "1000,2000,4000,8000,16000"])?;
    set_connections(&name, false).await?;
    let down_at = std::time::Instant::now();
    let job = Uuid::now_v7();
    let events: Vec<_> = (1..=40).map(|seq| usage(job, seq, 42, "0.001")).collect();
    // Events keep flowing during the outage: a burst every 4 s.
    for burst in events.chunks(10) {
        publish(&broker, burst).await?;
        tokio::time::sleep(Duration::from_secs(4)).await;
    }
    // Down for 20 s in all while the worker retries.
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(down_at.elapsed())).await;
    set_connections(&name, true).await?;
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&db.url).await?;
    let check = pool.clone();
    wait_until("all 40 events applied", Duration::from_secs(90), || {
        let pool = check.clone();
        async move {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM applied_events WHERE kind = 'usage_charge.v1'")
                .fetch_one(&pool)
                .await?;
            Ok(n == 40)
        }
    })
    .await?;
    worker.stop().await?;
    let entries: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ledger_entries WHERE kind = 'usage_charge'").fetch_one(&pool).await?;
    assert_eq!(entries, 40, "each event once");
    let balance: Decimal =
        sqlx::query_scalar("SELECT balance FROM accounts WHERE user_id = 42").fetch_one(&pool).await?;
    assert_eq!(balance, "99.94".parse::<Decimal>()?, "100 − 40 × 0.0015");
    let failures: i64 = sqlx::query_scalar("SELECT count(*) FROM billing_failures").fetch_one(&pool).await?;
    assert_eq!(failures, 0, "nothing was dead-lettered");
    pool.close().await;
    broker.cleanup().await?;
    db.cleanup().await
}
