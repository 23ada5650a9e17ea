//! PostgreSQL pools and the two migration sets: the bot database
//! (`migrations/bot`) and the billing database (`migrations/billing`). They
//! may be the same database: each set ignores the other's applied versions.

use sqlx::migrate::{MigrateError, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use std::str::FromStr;
use std::time::Duration;

/// Opens a pool of at most `max` connections; connections are made lazily
/// and each acquire waits at most `acquire_timeout`.
///
/// # Errors
/// `sqlx::Error::Configuration` when the URL does not parse.
pub fn pool(url: &str, max: u32, acquire_timeout: Duration) -> Result<PgPool, sqlx::Error> {
    let opts = PgConnectOptions::from_str(url)?.application_name("claude-fleet");
    Ok(PgPoolOptions::new().max_connections(max).acquire_timeout(acquire_timeout).connect_lazy_with(opts))
}

fn bot_migrator() -> Migrator {
    let mut m = sqlx::migrate!("../migrations/bot");
    m.set_ignore_missing(true);
    m
}

fn billing_migrator() -> Migrator {
    let mut m = sqlx::migrate!("../migrations/billing");
    m.set_ignore_missing(true);
    m
}

/// Applies the bot database's migrations.
///
/// # Errors
/// [`MigrateError`].
pub async fn migrate_bot(pool: &PgPool) -> Result<(), MigrateError> {
    bot_migrator().run(pool).await
}

/// Applies the billing database's migrations.
///
/// # Errors
/// [`MigrateError`].
pub async fn migrate_billing(pool: &PgPool) -> Result<(), MigrateError> {
    billing_migrator().run(pool).await
}

/// True when retrying later may succeed: connection loss, pool timeouts,
/// serialization failure, deadlock, lock timeout, a database not accepting
/// connections, and the SQLSTATE classes connection exception (08),
/// insufficient resources (53) and operator intervention (57: a restart's
/// "terminating connection due to administrator command"). False for
/// constraint violations, bad data and programming errors (PostgreSQL
/// docs, Appendix A "Error Codes").
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(e) => e.code().is_some_and(|c| {
            matches!(c.as_ref(), "40001" | "40P01" | "55P03" | "55000")
                || ["08", "53", "57"].iter().any(|class| c.starts_with(class))
        }),
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Tls(_) | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}
