//! Least privilege in PostgreSQL (issue 13): the worker, which parses
//! untrusted documents, cannot rewrite or erase the ledger; the billing-worker
//! applies events but cannot erase history either; each reads in the other's
//! database only what it needs. Checked on one shared database (as most tests
//! run) and on a separate pair (as production runs).

use anyhow::{Context as _, Result};
use fleet_tests::fleet::{as_role, Databases, Services, BILLING_ROLE, WORKER_ROLE};
use fleet_tests::harness::billing::usage;
use fleet_tests::harness::TestDb;
use rust_decimal::Decimal;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use std::time::Duration;
use uuid::Uuid;

const ADA: i64 = 100_000_001;

async fn pool_as(url: &str, role: &str) -> Result<PgPool> {
    let url = as_role(url, role)?;
    PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&url)
        .await
        .with_context(|| format!("connecting as {role}"))
}

/// The SQLSTATE of `sql`'s failure on `pool`; `None` when it succeeded.
async fn refusal(pool: &PgPool, sql: &str) -> Option<String> {
    match sqlx::query(sql).execute(pool).await {
        Ok(_) => None,
        Err(sqlx::Error::Database(e)) => Some(e.code().map(|c| c.into_owned()).unwrap_or_default()),
        Err(e) => Some(format!("{e}")),
    }
}

/// Ada with 5 USD and one usage charge in the ledger, applied as the billing role.
async fn ledger_with_entries(billing_url: &str) -> Result<PgPool> {
    let billing = pool_as(billing_url, BILLING_ROLE).await?;
    billing_worker::ledger::grant(&billing, ADA, "5".parse()?, Uuid::now_v7()).await?;
    let applied = billing_worker::ledger::apply_event(&billing, &usage(Uuid::now_v7(), 1, ADA, "0.01")).await?;
    assert_eq!(applied, billing_worker::ledger::Applied::Applied, "the billing role applies events");
    assert_eq!(billing_worker::ledger::balance(&billing, ADA).await?, "4.985".parse::<Decimal>()?);
    Ok(billing)
}

/// What the worker's role must never do to the ledger, each refused for lack
/// of privilege (42501) whatever the database layout.
async fn assert_worker_cannot_touch_the_ledger(billing_url: &str) -> Result<()> {
    let worker = pool_as(billing_url, WORKER_ROLE).await?;
    for sql in [
        "TRUNCATE ledger_entries",
        "TRUNCATE ledger_entries, applied_events, accounts CASCADE",
        "UPDATE ledger_entries SET amount = 0",
        "DELETE FROM ledger_entries",
        "UPDATE accounts SET balance = 1000000 WHERE user_id = 100000001",
        "INSERT INTO ledger_entries (event_id, leg, debit_account, credit_account, amount, kind)
         SELECT event_id, 9, 'system:payments', 'user:100000001', 1000000, 'grant' FROM applied_events LIMIT 1",
        "ALTER TABLE ledger_entries DISABLE TRIGGER ledger_entries_no_update",
        "ALTER TABLE ledger_entries DISABLE TRIGGER ALL",
        "DROP TRIGGER ledger_entries_no_update ON ledger_entries",
        "SELECT * FROM ledger_entries",
        "UPDATE holds SET amount = 0",
    ] {
        assert_eq!(refusal(&worker, sql).await.as_deref(), Some("42501"), "the worker role ran: {sql}");
    }
    // What it needs, through the functions: balance, /usage, a hold placed and voided.
    let available: Decimal =
        sqlx::query_scalar("SELECT fleet_available_balance($1)").bind(ADA).fetch_one(&worker).await?;
    assert_eq!(available, "4.985".parse::<Decimal>()?);
    let entries: i64 =
        sqlx::query_scalar("SELECT count(*) FROM fleet_user_entries($1, 10)").bind(ADA).fetch_one(&worker).await?;
    assert_eq!(entries, 2, "the grant and the charge");
    let job = Uuid::now_v7();
    let (placed,): (bool,) = sqlx::query_as("SELECT placed FROM fleet_place_hold($1, $2, $3, 600)")
        .bind(job)
        .bind(ADA)
        .bind(Decimal::new(1, 0))
        .fetch_one(&worker)
        .await?;
    assert!(placed);
    let (too_much,): (bool,) = sqlx::query_as("SELECT placed FROM fleet_place_hold($1, $2, $3, 600)")
        .bind(Uuid::now_v7())
        .bind(ADA)
        .bind(Decimal::new(4, 0))
        .fetch_one(&worker)
        .await?;
    assert!(!too_much, "4 USD more is not covered next to the 1 USD hold");
    sqlx::query("SELECT fleet_void_hold($1)").bind(job).execute(&worker).await?;
    let available: Decimal =
        sqlx::query_scalar("SELECT fleet_available_balance($1)").bind(ADA).fetch_one(&worker).await?;
    assert_eq!(available, "4.985".parse::<Decimal>()?, "the voided hold no longer counts");
    worker.close().await;
    Ok(())
}

/// The billing role writes entries but cannot erase or rewrite them, nor
/// switch the guard off; even the owner's TRUNCATE meets the guard.
async fn assert_history_cannot_be_erased(billing: &PgPool, owner: &PgPool) -> Result<()> {
    for (sql, code) in [
        ("TRUNCATE ledger_entries", "42501"),
        ("DELETE FROM ledger_entries", "42501"),
        ("ALTER TABLE ledger_entries DISABLE TRIGGER ALL", "42501"),
        // It inserts entries; it has no UPDATE on them (and the row trigger stands behind that).
        ("UPDATE ledger_entries SET amount = 0", "42501"),
    ] {
        assert_eq!(refusal(billing, sql).await.as_deref(), Some(code), "the billing role ran: {sql}");
    }
    let guard = refusal(owner, "TRUNCATE ledger_entries").await;
    assert_eq!(guard.as_deref(), Some("P0001"), "the BEFORE TRUNCATE guard raises even for the owner");
    let entries: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger_entries").fetch_one(owner).await?;
    assert!(entries >= 3, "history intact: {entries} entries");
    Ok(())
}

#[tokio::test]
async fn on_one_shared_database_the_worker_role_cannot_rewrite_or_erase_the_ledger() -> Result<()> {
    let db = TestDb::new().await?;
    let billing = ledger_with_entries(&db.url).await?;
    assert_worker_cannot_touch_the_ledger(&db.url).await?;
    assert_history_cannot_be_erased(&billing, &db.pool).await?;
    // The worker still writes the bot tables.
    let worker = pool_as(&db.url, WORKER_ROLE).await?;
    sqlx::query("INSERT INTO users (user_id, first_name) VALUES ($1, 'Ada')").bind(ADA).execute(&worker).await?;
    worker.close().await;
    billing.close().await;
    db.cleanup().await
}

#[tokio::test]
async fn on_separate_databases_each_role_has_only_what_its_process_needs() -> Result<()> {
    let services = Services {
        postgres_url: fleet_tests::harness::admin_database_url(),
        amqp_url: fleet_tests::harness::amqp_url(),
    };
    let stem = format!("roles_{}", Uuid::now_v7().simple());
    let dbs = Databases::create(&services, &stem).await?;
    let billing = ledger_with_entries(&dbs.billing_url).await?;
    assert_worker_cannot_touch_the_ledger(&dbs.billing_url).await?;
    assert_history_cannot_be_erased(&billing, &dbs.billing).await?;

    // The bot database: the worker writes it; the billing role reads the
    // outbox and api_calls (reconcile), the payment anomalies (refund-stars)
    // and nothing else.
    let worker = pool_as(&dbs.bot_url, WORKER_ROLE).await?;
    sqlx::query("INSERT INTO users (user_id, first_name) VALUES ($1, 'Ada')").bind(ADA).execute(&worker).await?;
    let reader = pool_as(&dbs.bot_url, BILLING_ROLE).await?;
    for sql in [
        "SELECT count(*) FROM billing_outbox",
        "SELECT count(*) FROM api_calls",
        // `payment-anomalies` and `refund-stars`.
        "SELECT count(*) FROM payment_anomalies",
        "UPDATE payment_anomalies SET refunded_at = now() WHERE refunded_at IS NULL",
    ] {
        assert_eq!(refusal(&reader, sql).await, None, "the billing role cannot read: {sql}");
    }
    for sql in [
        "SELECT count(*) FROM users",
        "SELECT count(*) FROM messages",
        "UPDATE billing_outbox SET published_at = now()",
        "DELETE FROM billing_outbox",
        "UPDATE payment_anomalies SET user_id = 0",
        "DELETE FROM payment_anomalies",
        "TRUNCATE api_calls",
    ] {
        assert_eq!(refusal(&reader, sql).await.as_deref(), Some("42501"), "the billing role ran: {sql}");
    }
    worker.close().await;
    reader.close().await;
    billing.close().await;
    dbs.drop_all().await
}

#[tokio::test]
async fn migrations_of_several_databases_at_once_create_the_roles_without_a_conflict() -> Result<()> {
    let dbs = futures_util::future::join_all((0..4).map(|_| TestDb::new())).await;
    let mut made = Vec::new();
    for db in dbs {
        made.push(db.context("a migration failed while others ran")?);
    }
    for db in made {
        db.cleanup().await?;
    }
    Ok(())
}
