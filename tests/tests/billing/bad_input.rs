//! Billing events with amounts that are not money: NaN, negative, beyond
//! the decimal range, more precise than 28 digits. Each is dead-lettered
//! with its reason (a `billing_failures` row) and nothing of it is applied;
//! a good event behind them still is.

use anyhow::Result;
use fleet_tests::harness::billing::{grant, publish, usage, BillingWorker};
use fleet_tests::harness::{wait_until, Broker, TestDb, WAIT};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use shared::amqp::{ConfirmPublisher, Outgoing, BILLING_ROUTING_KEY};
use shared::contracts::BillingEvent;
use std::time::Duration;
use uuid::Uuid;

/// Publishes raw bodies to the billing exchange with confirms.
async fn publish_raw(broker: &Broker, bodies: &[Vec<u8>]) -> Result<()> {
    let publisher = ConfirmPublisher::new(&broker.url, "test-billing-raw", Duration::from_secs(10));
    let exchange = broker.topology.billing_exchange();
    for body in bodies {
        publisher
            .publish(Outgoing {
                exchange: &exchange,
                routing_key: BILLING_ROUTING_KEY,
                body,
                message_id: None,
                content_type: "application/json",
                attempt: None,
            })
            .await?;
    }
    Ok(())
}

/// A usage charge of `user` as JSON with its amounts replaced.
fn usage_with(user: i64, provider_cost: Value, user_charge: Value) -> Result<(Uuid, Vec<u8>)> {
    let event = usage(Uuid::now_v7(), 1, user, "0.001");
    let mut v = serde_json::to_value(&event)?;
    v["provider_cost"] = provider_cost;
    v["user_charge"] = user_charge;
    Ok((event.event_id(), serde_json::to_vec(&v)?))
}

async fn dead_lettered(pool: &sqlx::PgPool) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM billing_failures WHERE dead_lettered_at IS NOT NULL")
        .fetch_one(pool)
        .await?)
}

async fn last_error(pool: &sqlx::PgPool, key: Uuid) -> Result<String> {
    Ok(sqlx::query_scalar(
        "SELECT last_error FROM billing_failures WHERE event_id = $1 AND dead_lettered_at IS NOT NULL",
    )
    .bind(key)
    .fetch_one(pool)
    .await?)
}

async fn applied(pool: &sqlx::PgPool, id: Uuid) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM applied_events WHERE event_id = $1)
              + (SELECT count(*) FROM ledger_entries WHERE event_id = $1)",
    )
    .bind(id)
    .fetch_one(pool)
    .await?)
}

#[tokio::test]
async fn nan_negative_and_overflowing_amounts_are_dead_lettered_with_their_reason_and_nothing_is_applied() -> Result<()>
{
    let db = TestDb::new().await?;
    let broker = Broker::new().await?;
    broker.declare().await?;
    grant(&db.pool, 42, "10").await?;
    let worker = BillingWorker::start(&broker, &db.url, &["--retry-delays-ms", "50,50,50,50,50"])?;

    // Bodies that are not a billing event (amounts that do not parse as Usd).
    let mut malformed = Vec::new();
    for (provider, charge) in [
        (json!("NaN"), json!("0.0015")),
        (json!("0.001"), json!("NaN")),
        (json!("-Infinity"), json!("0.0015")),
        (json!("1e40"), json!("1.5e40")),
        (json!("79228162514264337593543950336"), json!("0.0015")),
        (json!(1e40), json!("0.0015")),
        (json!(0.001), json!(0.0015)),
    ] {
        malformed.push(usage_with(42, provider, charge)?);
    }
    let bodies: Vec<Vec<u8>> = malformed.iter().map(|(_, b)| b.clone()).collect();
    publish_raw(&broker, &bodies).await?;
    // A well-formed event with negative amounts: refused by the ledger.
    let negative = usage(Uuid::now_v7(), 1, 42, "-0.002");
    // Negative user charge only, positive provider cost.
    let mut half_negative = usage(Uuid::now_v7(), 1, 42, "0.002");
    if let BillingEvent::UsageCharge(c) = &mut half_negative {
        c.user_charge = shared::money::Usd("-0.003".parse()?);
    }
    let good = usage(Uuid::now_v7(), 1, 42, "0.002");
    publish(&broker, &[negative.clone(), half_negative.clone(), good.clone()]).await?;

    let expected = i64::try_from(malformed.len())? + 2;
    let pool = db.pool.clone();
    wait_until("every bad event to be dead-lettered", WAIT, || {
        let pool = pool.clone();
        async move { Ok(dead_lettered(&pool).await? >= expected) }
    })
    .await?;
    wait_until("the good event to be applied", WAIT, || {
        let pool = pool.clone();
        let id = good.event_id();
        async move { Ok(applied(&pool, id).await? > 0) }
    })
    .await?;
    assert_eq!(dead_lettered(&db.pool).await?, expected, "exactly the bad events");

    for (id, body) in &malformed {
        // Listed under the event id its body names: the id reconcile reports.
        let error = last_error(&db.pool, *id).await?;
        assert!(error.contains("malformed billing event"), "{error}");
        assert_eq!(applied(&db.pool, *id).await?, 0, "nothing of {}", String::from_utf8_lossy(body));
    }
    for bad in [&negative, &half_negative] {
        let error = last_error(&db.pool, bad.event_id()).await?;
        assert!(error.contains("negative amount"), "{error}");
        assert_eq!(applied(&db.pool, bad.event_id()).await?, 0);
    }
    assert_eq!(broker.message_count(&broker.topology.billing_dead_queue()).await?, u32::try_from(expected)?);
    assert_eq!(db.balance(42).await?, "9.997".parse::<Decimal>()?, "10 − 1.5 × 0.002, the good event only");
    let negative_entries: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ledger_entries WHERE amount < 0 OR amount = 'NaN'")
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(negative_entries, 0);
    worker.stop().await?;
    broker.cleanup().await?;
    db.cleanup().await
}

#[tokio::test]
async fn an_amount_more_precise_than_28_digits_is_dead_lettered_not_rounded() -> Result<()> {
    let db = TestDb::new().await?;
    let broker = Broker::new().await?;
    broker.declare().await?;
    grant(&db.pool, 44, "10").await?;
    let worker = BillingWorker::start(&broker, &db.url, &["--retry-delays-ms", "50,50,50,50,50"])?;
    let (id, body) =
        usage_with(44, json!("0.00000000000000000000000000001"), json!("0.000000000000000000000000000015"))?;
    publish_raw(&broker, &[body]).await?;
    let good = usage(Uuid::now_v7(), 1, 44, "0.002");
    publish(&broker, std::slice::from_ref(&good)).await?;
    let pool = db.pool.clone();
    // Malformed bodies are handled after the batch they arrived in: wait for both.
    wait_until("the good event applied and the over-precise one dead-lettered", WAIT, || {
        let pool = pool.clone();
        let id = good.event_id();
        async move { Ok(applied(&pool, id).await? > 0 && dead_lettered(&pool).await? == 1) }
    })
    .await?;
    assert_eq!(applied(&db.pool, id).await?, 0, "the over-precise event was applied (rounded)");
    worker.stop().await?;
    broker.cleanup().await?;
    db.cleanup().await
}

#[tokio::test]
async fn amounts_at_the_decimal_maximum_do_not_crash_the_worker() -> Result<()> {
    let db = TestDb::new().await?;
    let broker = Broker::new().await?;
    broker.declare().await?;
    let worker = BillingWorker::start(&broker, &db.url, &["--retry-delays-ms", "50,50,50,50,50"])?;
    let max = json!(Decimal::MAX.to_string());
    let mut bodies = Vec::new();
    for _ in 0..3 {
        bodies.push(usage_with(45, max.clone(), max.clone())?.1);
    }
    publish_raw(&broker, &bodies).await?;
    let good = usage(Uuid::now_v7(), 1, 46, "0.002");
    publish(&broker, std::slice::from_ref(&good)).await?;
    let pool = db.pool.clone();
    wait_until("the good event behind them to be applied", WAIT, || {
        let pool = pool.clone();
        let id = good.event_id();
        async move { Ok(applied(&pool, id).await? > 0) }
    })
    .await?;
    worker.stop().await?;
    broker.cleanup().await?;
    db.cleanup().await
}

/// NUMERIC admits 'NaN', and in PostgreSQL `'NaN' >= 0` is true: a
/// `CHECK (amount >= 0)` alone does not forbid it.
#[tokio::test]
async fn the_schema_refuses_nan_and_negative_amounts() -> Result<()> {
    let db = TestDb::new().await?;
    grant(&db.pool, 47, "1").await?;
    let event: Uuid = sqlx::query_scalar("SELECT event_id FROM ledger_entries LIMIT 1").fetch_one(&db.pool).await?;
    for amount in ["-1", "NaN"] {
        let inserted = sqlx::query(
            "INSERT INTO ledger_entries (event_id, leg, debit_account, credit_account, amount, kind)
             VALUES ($1, 9, 'system:payments', 'user:47', $2::numeric, 'grant')",
        )
        .bind(event)
        .bind(amount)
        .execute(&db.pool)
        .await;
        assert!(inserted.is_err(), "an entry of {amount} was accepted");
    }
    db.cleanup().await
}
