//! The integration tests' harness: a fresh database and a unique AMQP
//! prefix per test, the fleet's processes spawned in-process on port 0, the
//! fakes, and waits that always end (every one under a timeout).
//!
//! - `db`: [`TestDb`], a migrated database of its own per test.
//! - `broker`: [`Broker`], a queue prefix of its own per test and a channel to inspect it.
//! - `spawn`: the ingress, worker and billing-worker in-process, and [`TestApp`].
//! - [`wait_until`]: the one polling wait, for state that has no event.
//! - [`tools`]: the tools suite's rigs (a claimed job, the fleet with tool
//!   settings, inline updates, SSE bodies and PDFs).
//! - [`billing`]: the billing suite's rigs (a billing-worker with chosen
//!   settings, events, the reconcile command).
//! - [`lifecycle`]: the fleet's real binaries as processes, for the
//!   lifecycle suite (signals, look-ups, clean-up passed or not).

pub mod billing;
mod broker;
mod db;
pub mod lifecycle;
mod spawn;
pub mod tools;

pub use broker::Broker;
pub use db::TestDb;
pub use spawn::{
    http_client, post_webhook, spawn_app, spawn_billing_worker, spawn_ingress, spawn_ingress_with_admin, spawn_worker,
    stop, worker_settings, IngressPorts, Running, SpawnedWorker, TestApp, TestAppBuilder, WorkerDeps,
};

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};

/// The webhook secret the test ingress expects.
pub const WEBHOOK_SECRET: &str = "fleet-test-webhook-secret";
/// The test ingress's body cap, bytes (smaller than the default, so the
/// test of the cap posts little).
pub const INGRESS_MAX_BODY: usize = 64 * 1024;
/// The bot token the worker calls the fake Bot API with.
pub const BOT_TOKEN: &str = "7000000001:TEST";
/// The username the fake Bot API reports.
pub const BOT_USERNAME: &str = "fleet_test_bot";
/// Longest wait for anything a test waits for.
pub const WAIT: Duration = Duration::from_secs(30);
/// Interval of the waits that poll (database rows, queue depths, log files:
/// no event exists there).
pub const POLL: Duration = Duration::from_millis(50);

/// Installs a test-writer subscriber when `TEST_LOG=1`; otherwise logs are off.
pub fn init_logs() {
    if std::env::var("TEST_LOG").is_ok_and(|v| v == "1") {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,lapin=warn"));
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    }
}

/// The shared fixtures folder.
pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures"))
}

/// A fixture's path, `rel` relative to the fixtures folder.
pub fn fixture(rel: &str) -> PathBuf {
    fixtures_dir().join(rel)
}

/// A fixture's bytes.
pub fn fixture_bytes(rel: &str) -> Result<Vec<u8>> {
    std::fs::read(fixture(rel)).with_context(|| format!("reading fixture {rel}"))
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| default.to_owned())
}

/// `TEST_AMQP_URL`, or the local broker.
pub fn amqp_url() -> String {
    env_or("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
}

/// `TEST_DATABASE_URL`, or the local PostgreSQL (any database: used to
/// create and drop the tests' own).
pub fn admin_database_url() -> String {
    env_or("TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
}

/// Runs `fut` to its end on a runtime of its own on a thread of its own,
/// and waits for it: the clean-up of a value dropped while its test's
/// runtime unwinds or is blocked. Errors are logged, never raised (a panic
/// in a `Drop` during unwinding would abort).
fn block_on_own_thread<F>(fut: F)
where
    F: Future<Output = Result<Result<()>>> + Send + 'static,
{
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(fut)?
    });
    match thread.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %format!("{e:#}"), "clean-up after a failed test"),
        Err(_) => tracing::warn!("the clean-up thread panicked"),
    }
}

/// `fut`, failing with `what` if it takes longer than [`WAIT`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> Result<T> {
    tokio::time::timeout(WAIT, fut).await.map_err(|_| anyhow!("timed out after {WAIT:?}: {what}"))
}

/// Re-runs `check` every [`POLL`] until it says true; an error naming `what`
/// after `timeout`, or the first error `check` returns. The one polling wait
/// of the harness: only for state that has no event to wait on (database
/// rows, queue depths, log files).
///
/// # Errors
/// A timeout, or an error of `check`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let polled = tokio::time::timeout(timeout, async {
        loop {
            if check().await? {
                return Ok::<(), anyhow::Error>(());
            }
            tokio::time::sleep(POLL).await;
        }
    })
    .await;
    match polled {
        Ok(result) => result,
        Err(_) => bail!("timed out after {timeout:?} waiting for {what}"),
    }
}
