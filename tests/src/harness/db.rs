//! [`TestDb`]: a database of its own per test, migrated like production.

use super::{admin_database_url, within};
use anyhow::{Context as _, Result};
use rust_decimal::Decimal;
use sqlx::postgres::{PgConnection, PgPoolOptions};
use sqlx::{Connection as _, PgPool};
use std::time::Duration;
use uuid::Uuid;

/// A database of its own for one test, with the bot and billing migrations
/// applied (one database serves both, as the product allows). Dropped
/// without [`TestDb::cleanup`] (a failed assertion, an early `?`), it still
/// drops the database.
pub struct TestDb {
    /// A pool on the test database.
    pub pool: PgPool,
    /// Its URL, for the processes under test.
    pub url: String,
    /// Its name, to drop it; empty once dropped.
    name: String,
}

impl TestDb {
    /// Creates `t_<uuid>` and migrates it.
    pub async fn new() -> Result<Self> {
        let admin_url = admin_database_url();
        let name = format!("t_{}", Uuid::now_v7().simple());
        within("creating the test database", async {
            let mut admin = PgConnection::connect(&admin_url).await.context("connecting to TEST_DATABASE_URL")?;
            sqlx::query(&format!(r#"CREATE DATABASE "{name}""#)).execute(&mut admin).await?;
            admin.close().await?;
            Ok::<(), anyhow::Error>(())
        })
        .await??;
        let mut url = reqwest::Url::parse(&admin_url).context("TEST_DATABASE_URL is not a URL")?;
        url.set_path(&format!("/{name}"));
        let url = url.to_string();
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect(&url)
            .await
            .with_context(|| format!("connecting to {name}"))?;
        within("migrating the bot schema", shared::db::migrate_bot(&pool)).await??;
        within("migrating the billing schema", shared::db::migrate_billing(&pool)).await??;
        Ok(Self { pool, url, name })
    }

    /// A user's balance in USD (zero without an account).
    pub async fn balance(&self, user_id: i64) -> Result<Decimal> {
        Ok(billing_worker::ledger::balance(&self.pool, user_id).await?)
    }

    /// The `bigint` a query (`SELECT count(*) …`) returns.
    pub async fn count(&self, sql: &str) -> Result<i64> {
        Ok(sqlx::query_scalar(sql).fetch_one(&self.pool).await?)
    }

    /// The `bigint` a query with one `i64` parameter (`$1`) returns.
    pub async fn count_of(&self, sql: &str, id: i64) -> Result<i64> {
        Ok(sqlx::query_scalar(sql).bind(id).fetch_one(&self.pool).await?)
    }

    /// Closes the pool and drops the database (connections of stopped
    /// processes may linger: `FORCE` ends them).
    pub async fn cleanup(mut self) -> Result<()> {
        self.pool.close().await;
        let name = std::mem::take(&mut self.name);
        within("dropping the test database", drop_database(&name)).await?
    }
}

/// `DROP DATABASE … WITH (FORCE)` of `name`, if it exists.
async fn drop_database(name: &str) -> Result<()> {
    let mut admin = PgConnection::connect(&admin_database_url()).await?;
    sqlx::query(&format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#)).execute(&mut admin).await?;
    admin.close().await?;
    Ok(())
}

impl Drop for TestDb {
    /// The clean-up of a test that ended early: drops the database (best
    /// effort, on a thread of its own, since the test's runtime may be
    /// unwinding).
    fn drop(&mut self) {
        if self.name.is_empty() {
            return;
        }
        let name = std::mem::take(&mut self.name);
        super::block_on_own_thread(async move { within("dropping the test database", drop_database(&name)).await });
    }
}
