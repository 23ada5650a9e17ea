//! The billing-worker: a billing event moves money once however often it is
//! delivered, and a message that is not a billing event ends in
//! `billing.dead` and `billing_failures`, never only in a log line.

use anyhow::{Context as _, Result};
use billing_worker::ledger::{self, Applied};
use chrono::{NaiveDate, Utc};
use fleet_tests::harness::{init_logs, spawn_billing_worker, stop, wait_until, within, Broker, TestDb, WAIT};
use rust_decimal::Decimal;
use shared::amqp::{attempt_of, ConfirmPublisher, Outgoing, BILLING_ROUTING_KEY};
use shared::contracts::{usage_event_id, BillingEvent, UsageCharge};
use shared::pricing::TokenCounts;
use std::time::Duration;
use uuid::Uuid;

const USER: i64 = 100_000_003;

/// The usage charge of scenario 04's call (haiku, 398 in, 17 out).
fn usage_charge() -> Result<BillingEvent> {
    let job_id = Uuid::now_v7();
    Ok(BillingEvent::UsageCharge(UsageCharge {
        event_id: usage_event_id(job_id, 1),
        job_id,
        update_id: 800_000_020,
        lease_epoch: 1,
        api_call_seq: 1,
        user_id: USER,
        chat_id: USER,
        request_id: Some("req_fleet_test".into()),
        model: "claude-haiku-4-5-20251001".into(),
        tokens: TokenCounts { input: 398, output: 17, ..Default::default() },
        provider_cost: "0.000483".parse()?,
        user_charge: "0.0007245".parse()?,
        price_model: "claude-haiku-4-5".into(),
        price_effective_from: NaiveDate::from_ymd_opt(2025, 10, 1).context("a date")?,
        estimated: false,
        abandoned: false,
        occurred_at: Utc::now(),
    }))
}

fn usd(s: &str) -> Result<Decimal> {
    Ok(s.parse()?)
}

/// Checks that `event` (the usage charge above, after a 5 USD grant) moved
/// money exactly once.
async fn assert_applied_once(db: &TestDb, event: &BillingEvent) -> Result<()> {
    let id = event.event_id();
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM applied_events WHERE event_id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(applied, 1);
    let mut legs: Vec<(String, Decimal)> =
        sqlx::query_as("SELECT kind, amount FROM ledger_entries WHERE event_id = $1")
            .bind(id)
            .fetch_all(&db.pool)
            .await?;
    legs.sort();
    assert_eq!(legs, [("provider_cost".to_owned(), usd("0.000483")?), ("usage_charge".to_owned(), usd("0.0007245")?)]);
    assert_eq!(db.balance(USER).await?, usd("4.9992755")?);
    let account = |name: &'static str| async move {
        let b: Decimal = sqlx::query_scalar("SELECT balance FROM accounts WHERE account_id = $1")
            .bind(name)
            .fetch_one(&db.pool)
            .await?;
        Ok::<Decimal, anyhow::Error>(b)
    };
    assert_eq!(account("system:revenue").await?, usd("0.0007245")?);
    assert_eq!(account("system:provider_payable").await?, usd("0.000483")?);
    assert_eq!(account("system:provider_cost").await?, usd("-0.000483")?);
    let total: Decimal = sqlx::query_scalar("SELECT sum(balance) FROM accounts").fetch_one(&db.pool).await?;
    assert_eq!(total, Decimal::ZERO, "double entry: balances sum to zero");
    Ok(())
}

#[tokio::test]
async fn a_billing_event_applied_twice_moves_money_once() -> Result<()> {
    init_logs();
    let db = TestDb::new().await?;
    ledger::grant(&db.pool, USER, usd("5")?, Uuid::now_v7()).await?;
    let event = usage_charge()?;

    assert_eq!(ledger::apply_event(&db.pool, &event).await?, Applied::Applied);
    assert_eq!(ledger::apply_event(&db.pool, &event).await?, Applied::Duplicate);

    assert_applied_once(&db, &event).await?;
    db.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_billing_event_delivered_twice_through_the_broker_moves_money_once() -> Result<()> {
    init_logs();
    let db = TestDb::new().await?;
    let broker = Broker::new().await?;
    broker.declare().await?;
    ledger::grant(&db.pool, USER, usd("5")?, Uuid::now_v7()).await?;
    let event = usage_charge()?;
    let body = serde_json::to_vec(&event)?;
    let id = event.event_id().to_string();
    let t = &broker.topology;

    // Both copies wait in the queue before the worker starts, so it may take
    // them at the same time.
    let publisher = ConfirmPublisher::new(&broker.url, "fleet-tests", Duration::from_secs(5));
    let exchange = t.billing_exchange();
    for _ in 0..2 {
        let msg = Outgoing {
            exchange: &exchange,
            routing_key: BILLING_ROUTING_KEY,
            body: &body,
            message_id: Some(&id),
            content_type: "application/json",
            attempt: None,
        };
        within("publishing a billing event", publisher.publish(msg)).await??;
    }
    assert_eq!(broker.message_count(&t.billing_queue()).await?, 2);

    let billing = spawn_billing_worker(broker.prefix(), &broker.url, &db.url)?;
    wait_until("the event applied and the queue drained", WAIT, || async {
        let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM applied_events WHERE event_id = $1")
            .bind(event.event_id())
            .fetch_one(&db.pool)
            .await?;
        Ok(applied == 1 && broker.message_count(&t.billing_queue()).await? == 0)
    })
    .await?;
    // Stopping waits for deliveries in flight; unacked ones would return to the queue.
    stop("billing-worker", billing).await?;

    assert_eq!(broker.message_count(&t.billing_queue()).await?, 0, "both copies were acked");
    assert_eq!(broker.message_count(&t.billing_dead_queue()).await?, 0, "the duplicate is not an error");
    for n in 0..t.billing_retry_delays_ms.len() {
        assert_eq!(broker.message_count(&t.billing_retry_queue(n)).await?, 0);
    }
    assert_eq!(db.count("SELECT count(*) FROM billing_failures").await?, 0);
    assert_applied_once(&db, &event).await?;
    broker.cleanup().await?;
    db.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_billing_message_is_dead_lettered_and_recorded() -> Result<()> {
    init_logs();
    let db = TestDb::new().await?;
    let broker = Broker::new().await?;
    broker.declare().await?;
    let t = &broker.topology;
    let not_json: &[u8] = b"this is not a billing event";
    let wrong_shape: &[u8] = br#"{"type":"usage_charge.v1","event_id":"not-a-uuid","user_charge":"1"}"#;

    let publisher = ConfirmPublisher::new(&broker.url, "fleet-tests", Duration::from_secs(5));
    let exchange = t.billing_exchange();
    for body in [not_json, wrong_shape] {
        let msg = Outgoing {
            exchange: &exchange,
            routing_key: BILLING_ROUTING_KEY,
            body,
            message_id: None,
            content_type: "application/json",
            attempt: None,
        };
        within("publishing a malformed message", publisher.publish(msg)).await??;
    }

    let billing = spawn_billing_worker(broker.prefix(), &broker.url, &db.url)?;
    wait_until("both messages dead-lettered and recorded", WAIT, || async {
        let failures = db.count("SELECT count(*) FROM billing_failures WHERE dead_lettered_at IS NOT NULL").await?;
        Ok(failures == 2 && broker.message_count(&t.billing_dead_queue()).await? == 2)
    })
    .await?;
    stop("billing-worker", billing).await?;

    assert_eq!(broker.message_count(&t.billing_queue()).await?, 0);
    for n in 0..t.billing_retry_delays_ms.len() {
        assert_eq!(broker.message_count(&t.billing_retry_queue(n)).await?, 0, "a malformed message is not retried");
    }
    let mut dead = Vec::new();
    while let Some(m) = broker.get(&t.billing_dead_queue()).await? {
        assert_eq!(attempt_of(&m.delivery.properties), 1);
        dead.push(m.delivery.data);
    }
    dead.sort();
    let mut published = vec![not_json.to_vec(), wrong_shape.to_vec()];
    published.sort();
    assert_eq!(dead, published, "billing.dead holds the messages as published");

    let rows: Vec<(i32, String, Option<serde_json::Value>)> =
        sqlx::query_as("SELECT attempts, last_error, payload FROM billing_failures ORDER BY payload IS NULL")
            .fetch_all(&db.pool)
            .await?;
    assert_eq!(rows.len(), 2);
    for (attempts, last_error, _) in &rows {
        assert_eq!(*attempts, 1);
        assert!(last_error.contains("malformed"), "last_error: {last_error}");
    }
    assert_eq!(rows[0].2, Some(serde_json::from_slice(wrong_shape)?), "a JSON body is kept for finance");
    assert_eq!(rows[1].2, None, "a body that is not JSON has no payload");
    assert_eq!(db.count("SELECT count(*) FROM applied_events").await?, 0, "nothing reached the ledger");
    broker.cleanup().await?;
    db.cleanup().await
}
