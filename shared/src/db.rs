//! PostgreSQL pools and the two migration sets: the bot database
//! (`migrations/bot`) and the billing database (`migrations/billing`). They
//! may be the same database: each set ignores the other's applied versions.

use sqlx::migrate::{MigrateError, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Transaction};
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};
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

/// Begins a transaction on a connection of `pool`: every transaction of
/// product code starts here, never with `Pool::begin` directly.
///
/// Cancellation safety (issue 14, part 6; `shared/tests/transactions.rs`
/// proves each case against PostgreSQL):
/// - **A begin cancelled before its answer** (a timeout around it, a
///   dropped future): sqlx 0.8 counts the transaction only once `BEGIN`
///   answered (`transaction_depth` is raised after the await, and the
///   guard that would roll back checks that depth), so the connection
///   went back to the pool *inside* the transaction; the next user's
///   statements ran in it and PostgreSQL warned "there is already a
///   transaction in progress". Here the begin is finished in the
///   background instead: the `Transaction` it yields is dropped at once,
///   which queues `ROLLBACK` before the connection is released.
/// - **A statement or `COMMIT` cancelled inside a transaction**: sqlx's own
///   guarantee. Dropping the `Transaction` queues `ROLLBACK`, and the pool
///   flushes it (and drains the cancelled statement's answer) before it
///   hands the connection out again.
///
/// # Errors
/// As `Pool::begin`: acquiring a connection, or `BEGIN` failing.
#[expect(clippy::disallowed_methods, reason = "the one call of Pool::begin, made cancellation-safe here")]
pub async fn begin(pool: &PgPool) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    let pool = pool.clone();
    FinishOnDrop(Some(Box::pin(async move { pool.begin().await }))).await
}

/// A future that, when dropped before it completed, is run to completion
/// in a task of its own (its output is dropped there).
struct FinishOnDrop<T: Send + 'static>(Option<Pin<Box<dyn Future<Output = T> + Send + 'static>>>);

impl<T: Send + 'static> Future for FinishOnDrop<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let Some(inner) = self.0.as_mut() else {
            // Polled after completion: never done by `begin`.
            return Poll::Pending;
        };
        let out = std::task::ready!(inner.as_mut().poll(cx));
        self.0 = None;
        Poll::Ready(out)
    }
}

impl<T: Send + 'static> Drop for FinishOnDrop<T> {
    fn drop(&mut self) {
        let Some(rest) = self.0.take() else { return };
        // Without a runtime (the process is ending) the pool goes too.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            #[expect(
                clippy::disallowed_methods,
                reason = "ends with the BEGIN's answer; owning it would bring the cancellation back"
            )]
            runtime.spawn(async move {
                drop(rest.await);
            });
        }
    }
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
