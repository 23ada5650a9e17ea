//! Batches: many deliveries applied per transaction, one bad event never
//! holding back the others; a hold release waits for its job's charges.

use billing_worker::ledger::{self, Applied, LedgerError};
use fleet_tests::harness::billing::{grant, publish, usage, BillingWorker};
use fleet_tests::harness::{wait_until, Broker, TestDb};
use rust_decimal::Decimal;
use shared::contracts::{hold_release_event_id, BillingEvent, HoldRelease};
use std::time::Duration;
use uuid::Uuid;

async fn applied(pool: &sqlx::PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM applied_events WHERE kind = 'usage_charge.v1'").fetch_one(pool).await?)
}

#[tokio::test]
async fn a_bad_event_in_a_batch_is_dead_lettered_and_the_rest_of_the_batch_applied() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let broker = Broker::new().await?;
    broker.declare().await?;
    grant(&db.pool, 7, "10").await?;
    let job = Uuid::now_v7();
    let mut events: Vec<_> = (1..=40).map(|i| usage(job, i, 7, "0.001")).collect();
    // A negative amount: permanent, dead-lettered at once.
    let bad = usage(job, 99, 7, "-0.001");
    events.insert(20, bad.clone());
    // Published before the worker starts, so its first deliveries arrive together.
    publish(&broker, &events).await?;
    let worker = BillingWorker::start(&broker, &db.url, &["--prefetch", "64", "--batch-size", "64"])?;
    let (pool, bad_id) = (db.pool.clone(), bad.event_id());
    wait_until("40 good events applied and the bad one recorded", Duration::from_secs(30), || {
        let pool = pool.clone();
        async move {
            let failed: i64 = sqlx::query_scalar("SELECT count(*) FROM billing_failures WHERE event_id = $1")
                .bind(bad_id)
                .fetch_one(&pool)
                .await?;
            Ok(applied(&pool).await? == 40 && failed == 1)
        }
    })
    .await?;
    worker.stop().await?;
    let charged: Decimal = sqlx::query_scalar("SELECT sum(amount) FROM ledger_entries WHERE kind = 'usage_charge'")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(charged, Decimal::new(60, 3), "40 × 0.0015");
    assert_eq!(broker.message_count(&broker.topology.billing_dead_queue()).await?, 1);
    let total: Decimal = sqlx::query_scalar("SELECT sum(balance) FROM accounts").fetch_one(&db.pool).await?;
    assert_eq!(total, Decimal::ZERO, "double entry: balances sum to zero");
    broker.cleanup().await?;
    db.cleanup().await
}

#[tokio::test]
async fn a_batch_with_repeated_events_applies_each_once() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    grant(&db.pool, 8, "10").await?;
    let job = Uuid::now_v7();
    let a = usage(job, 1, 8, "0.002");
    let b = usage(job, 2, 8, "0.003");
    let got = ledger::apply_batch(&db.pool, &[a.clone(), b.clone(), a.clone()]).await?;
    assert_eq!(got, [Applied::Applied, Applied::Applied, Applied::Duplicate]);
    let again = ledger::apply_batch(&db.pool, &[b, a]).await?;
    assert_eq!(again, [Applied::Duplicate, Applied::Duplicate]);
    let balance = ledger::balance(&db.pool, 8).await?;
    assert_eq!(balance, Decimal::new(10, 0) - Decimal::new(75, 4), "10 − 1.5 × 0.005");
    db.cleanup().await
}

async fn hold(pool: &sqlx::PgPool, job: Uuid, user: i64) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO holds (job_id, user_id, amount, status, expires_at)
         VALUES ($1, $2, 0.5, 'active', now() + interval '1 hour')",
    )
    .bind(job)
    .bind(user)
    .execute(pool)
    .await?;
    Ok(())
}

async fn hold_status(pool: &sqlx::PgPool, job: Uuid) -> anyhow::Result<String> {
    Ok(sqlx::query_scalar("SELECT status FROM holds WHERE job_id = $1").bind(job).fetch_one(pool).await?)
}

fn release(job: Uuid, user: i64, charges: &[&BillingEvent]) -> BillingEvent {
    BillingEvent::HoldRelease(HoldRelease {
        event_id: hold_release_event_id(job),
        job_id: job,
        user_id: user,
        charge_event_ids: charges.iter().map(|c| c.event_id()).collect(),
    })
}

#[tokio::test]
async fn a_hold_release_is_not_applied_before_the_jobs_charges() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    grant(&db.pool, 9, "10").await?;
    let job = Uuid::now_v7();
    hold(&db.pool, job, 9).await?;
    let charge = usage(job, 1, 9, "0.01");
    let rel = release(job, 9, &[&charge]);

    let early = ledger::apply_event(&db.pool, &rel).await;
    assert!(matches!(early, Err(LedgerError::ChargesPending(1))), "{early:?}");
    assert!(early.as_ref().is_err_and(LedgerError::is_transient), "retried, not dead-lettered");
    assert_eq!(hold_status(&db.pool, job).await?, "active", "the hold still covers the pending charge");

    assert_eq!(ledger::apply_event(&db.pool, &charge).await?, Applied::Applied);
    assert_eq!(ledger::apply_event(&db.pool, &rel).await?, Applied::Applied);
    assert_eq!(hold_status(&db.pool, job).await?, "settled");
    db.cleanup().await
}

#[tokio::test]
async fn a_hold_release_delivered_before_its_charge_settles_after_it_through_the_broker() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let broker = Broker::new().await?;
    broker.declare().await?;
    grant(&db.pool, 10, "10").await?;
    let job = Uuid::now_v7();
    hold(&db.pool, job, 10).await?;
    let charge = usage(job, 1, 10, "0.01");
    let worker = BillingWorker::start(&broker, &db.url, &["--retry-delays-ms", "100,200,400,800,1600"])?;
    // The release first, as when the charge sits in a retry queue.
    publish(&broker, &[release(job, 10, &[&charge])]).await?;
    let pool = db.pool.clone();
    wait_until("the early release to be sent for retry", Duration::from_secs(10), || {
        let broker = &broker;
        async move {
            let mut waiting = 0;
            for n in 0..broker.topology.billing_retry_delays_ms.len() {
                waiting += broker.message_count(&broker.topology.billing_retry_queue(n)).await?;
            }
            Ok(waiting == 1)
        }
    })
    .await?;
    assert_eq!(hold_status(&db.pool, job).await?, "active");
    publish(&broker, &[charge]).await?;
    wait_until("the hold to be settled after the charge", Duration::from_secs(30), || {
        let pool = pool.clone();
        async move { Ok(hold_status(&pool, job).await? == "settled") }
    })
    .await?;
    worker.stop().await?;
    let failures: i64 = sqlx::query_scalar("SELECT count(*) FROM billing_failures").fetch_one(&db.pool).await?;
    assert_eq!(failures, 0, "nothing was dead-lettered");
    // Waiting for a charge is no failure: deferred, never counted as retried.
    let text = shared::admin::metrics_handle().map(|h| h.render()).unwrap_or_default();
    let count = |line: &str| {
        text.lines()
            .filter(|l| l.starts_with(line))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    assert!(count("fleet_billing_deferred_total") >= 1.0, "{text}");
    assert_eq!(count("fleet_billing_events_total{result=\"retried\"}"), 0.0, "{text}");
    broker.cleanup().await?;
    db.cleanup().await
}
