//! An event that keeps failing walks every retry step, is dead-lettered,
//! recorded and told to the user; after the fix a redrive applies it once.

use fleet_tests::fake_telegram::FakeTelegram;
use fleet_tests::harness::billing::{grant, publish, usage, BillingWorker};
use fleet_tests::harness::{wait_until, Broker, TestDb, BOT_TOKEN, BOT_USERNAME};
use shared::amqp::ConfirmPublisher;
use std::time::Duration;
use uuid::Uuid;

#[tokio::test]
async fn an_event_that_always_fails_is_dead_lettered_recorded_told_and_redriven_once_fixed() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let broker = Broker::new().await?;
    broker.declare().await?;
    let telegram = FakeTelegram::start("127.0.0.1:0".parse()?, BOT_USERNAME).await?;
    grant(&db.pool, 42, "10").await?;
    let job = Uuid::now_v7();
    let bad = usage(job, 1, 42, "0.002");
    let good = usage(job, 2, 42, "0.001");
    // A bug that fails this one event with a transient-looking error, every time.
    sqlx::query(&format!(
        "CREATE FUNCTION fail_one() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
           IF NEW.event_id = '{}' THEN RAISE EXCEPTION 'simulated bug' USING ERRCODE = '40001'; END IF;
           RETURN NEW; END $$",
        bad.event_id()
    ))
    .execute(&db.pool)
    .await?;
    sqlx::query("CREATE TRIGGER fail_one BEFORE INSERT ON applied_events FOR EACH ROW EXECUTE FUNCTION fail_one()")
        .execute(&db.pool)
        .await?;
    let api = telegram.api_url();
    let worker = BillingWorker::start_notifying(
        &broker,
        &db.url,
        Some(BOT_TOKEN),
        &["--retry-delays-ms", "50,50,50,50,50", "--telegram-api-url", &api],
    )?;
    publish(&broker, &[bad.clone(), good.clone()]).await?;
    let pool = db.pool.clone();
    wait_until("the failure to be recorded", Duration::from_secs(30), || {
        let pool = pool.clone();
        async move {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM billing_failures WHERE dead_lettered_at IS NOT NULL")
                .fetch_one(&pool)
                .await?;
            Ok(n == 1)
        }
    })
    .await?;
    let (attempts, error): (i32, String) =
        sqlx::query_as("SELECT attempts, last_error FROM billing_failures WHERE event_id = $1")
            .bind(bad.event_id())
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(attempts, 6, "the first delivery and five retries");
    assert!(error.contains("simulated bug"), "{error}");
    assert_eq!(broker.message_count(&broker.topology.billing_dead_queue()).await?, 1);
    assert!(
        telegram
            .wait_for_call(|c| c.method == "sendMessage" && c.params["chat_id"] == 42, Duration::from_secs(10))
            .await,
        "the user was told the charge is pending review"
    );
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM applied_events WHERE event_id = $1")
        .bind(good.event_id())
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(applied, 1, "the other event was not blocked");
    // The fix, then a redrive — twice, to show a repeat is harmless.
    sqlx::query("DROP TRIGGER fail_one ON applied_events").execute(&db.pool).await?;
    let publisher = ConfirmPublisher::new(&broker.url, "test-redrive", Duration::from_secs(10));
    for _ in 0..2 {
        let n = billing_worker::finance::redrive(&db.pool, &publisher, &broker.topology, Some(bad.event_id())).await?;
        assert_eq!(n, 1);
    }
    wait_until("the redriven event to be applied", Duration::from_secs(30), || {
        let pool = pool.clone();
        let id = bad.event_id();
        async move {
            let resolved: Option<bool> =
                sqlx::query_scalar("SELECT resolved_at IS NOT NULL FROM billing_failures WHERE event_id = $1")
                    .bind(id)
                    .fetch_optional(&pool)
                    .await?;
            Ok(resolved == Some(true))
        }
    })
    .await?;
    worker.stop().await?;
    let entries: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger_entries WHERE event_id = $1")
        .bind(bad.event_id())
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(entries, 2, "applied once: user charge and provider cost");
    assert_eq!(db.balance(42).await?, "9.9955".parse()?, "10 − 1.5 × (0.002 + 0.001)");
    telegram.shutdown().await;
    broker.cleanup().await?;
    db.cleanup().await
}
