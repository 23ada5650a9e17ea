//! A transaction cancelled mid-statement never returns its connection to the
//! pool inside that transaction (issue 14, part 6), against the real
//! PostgreSQL (`TEST_DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`).
//!
//! The server is stalled with a TCP proxy between the pool and PostgreSQL
//! that holds the server's answers once the client sent a given statement:
//! the statement runs on the server, its answer does not arrive, and the
//! caller's timeout drops the future in between.
#![cfg(test)]

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A database of the test's own, dropped at the end.
struct TestDb {
    name: String,
    opts: PgConnectOptions,
}

impl TestDb {
    async fn create() -> Self {
        let admin = PgConnectOptions::from_str(&admin_url()).unwrap();
        let name = format!("tx_leak_{}", uuid::Uuid::now_v7().simple());
        let mut conn = admin.connect().await.unwrap();
        sqlx::raw_sql(&format!("CREATE DATABASE {name}")).execute(&mut conn).await.unwrap();
        conn.close().await.unwrap();
        Self { opts: admin.database(&name), name }
    }

    async fn drop_it(self) {
        let mut conn = PgConnectOptions::from_str(&admin_url()).unwrap().connect().await.unwrap();
        sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)).execute(&mut conn).await.unwrap();
    }
}

/// Forwards TCP to PostgreSQL; once armed with a trigger, the client's
/// first message that contains it stalls every answer of the server until
/// [`StallingProxy::release`].
struct StallingProxy {
    port: u16,
    /// The text that stalls the server's answers (empty: disarmed).
    trigger: Arc<watch::Sender<String>>,
    /// True while the server's answers are held.
    stalled: Arc<watch::Sender<bool>>,
    _tasks: JoinSet<()>,
}

impl StallingProxy {
    async fn start(upstream: (String, u16)) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let trigger = Arc::new(watch::channel(String::new()).0);
        let stalled = Arc::new(watch::channel(false).0);
        let mut tasks = JoinSet::new();
        let (trigger_tx, stalled_tx) = (trigger.clone(), stalled.clone());
        tasks.spawn(async move {
            let mut pipes = JoinSet::new();
            loop {
                let (client, _) = listener.accept().await.unwrap();
                let server = TcpStream::connect((upstream.0.as_str(), upstream.1)).await.unwrap();
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let (trigger, stalls) = (trigger_tx.subscribe(), stalled_tx.clone());
                pipes.spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = cr.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        let armed = trigger.borrow().clone();
                        if !armed.is_empty() && buf[..n].windows(armed.len()).any(|w| w == armed.as_bytes()) {
                            // Before the server can answer it.
                            stalls.send_replace(true);
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
                let mut stalled = stalled_tx.subscribe();
                pipes.spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = sr.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        if stalled.wait_for(|s| !*s).await.is_err() {
                            return;
                        }
                        if cw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self { port, trigger, stalled, _tasks: tasks }
    }

    /// Stalls the server's answers from the next client message containing `text`.
    fn stall_after(&self, text: &str) {
        self.trigger.send_replace(text.to_owned());
    }

    /// Disarms the trigger and lets the held answers through.
    fn release(&self) {
        self.trigger.send_replace(String::new());
        self.stalled.send_replace(false);
    }

    fn is_stalled(&self) -> bool {
        *self.stalled.borrow()
    }
}

/// A pool of one connection through `proxy`.
fn one_connection_pool(db: &TestDb, proxy: &StallingProxy) -> PgPool {
    let opts = db.opts.clone().host("127.0.0.1").port(proxy.port);
    PgPoolOptions::new().max_connections(1).acquire_timeout(Duration::from_secs(10)).connect_lazy_with(opts)
}

/// True when the connection the pool hands out next is inside a
/// transaction that began well before this statement (an earlier, cancelled
/// one: at least [`GIVE_UP`] ago). Not `now() = statement_timestamp()`: with
/// the extended protocol the implicit transaction starts a few microseconds
/// before the statement's timestamp.
async fn next_use_is_in_a_transaction(pool: &PgPool) -> bool {
    let old: bool = sqlx::query_scalar("SELECT statement_timestamp() - now() > interval '100 milliseconds'")
        .fetch_one(pool)
        .await
        .unwrap();
    old
}

async fn set_up() -> (TestDb, StallingProxy, PgPool) {
    let db = TestDb::create().await;
    let proxy = StallingProxy::start((db.opts.get_host().to_owned(), db.opts.get_port())).await;
    let pool = one_connection_pool(&db, &proxy);
    // The one connection, made before anything stalls.
    sqlx::query("SELECT 1").execute(&pool).await.unwrap();
    (db, proxy, pool)
}

/// How long the caller waits before it gives up (the answer is held far longer).
const GIVE_UP: Duration = Duration::from_millis(300);

#[tokio::test]
async fn a_begin_cancelled_before_its_answer_leaves_no_transaction_behind() {
    let (db, proxy, pool) = set_up().await;
    proxy.stall_after("BEGIN");
    let begun = tokio::time::timeout(GIVE_UP, fleet_shared::db::begin(&pool)).await;
    assert!(begun.is_err(), "the begin was cancelled while its answer was held");
    assert!(proxy.is_stalled(), "BEGIN reached the server");
    proxy.release();
    assert!(!next_use_is_in_a_transaction(&pool).await, "the pool handed out a connection inside the cancelled BEGIN");
    // And the pool still works for transactions.
    let mut tx = fleet_shared::db::begin(&pool).await.unwrap();
    sqlx::query("SELECT 1").execute(&mut *tx).await.unwrap();
    tx.commit().await.unwrap();
    assert!(!next_use_is_in_a_transaction(&pool).await);
    pool.close().await;
    db.drop_it().await;
}

#[tokio::test]
async fn a_statement_cancelled_inside_a_transaction_leaves_no_transaction_behind() {
    let (db, proxy, pool) = set_up().await;
    let mut tx = fleet_shared::db::begin(&pool).await.unwrap();
    proxy.stall_after("stalled_statement");
    let ran = tokio::time::timeout(GIVE_UP, sqlx::query("SELECT 1 AS stalled_statement").execute(&mut *tx)).await;
    assert!(ran.is_err(), "the statement was cancelled while its answer was held");
    assert!(proxy.is_stalled());
    drop(tx);
    proxy.release();
    assert!(
        !next_use_is_in_a_transaction(&pool).await,
        "the pool handed out a connection inside the dropped transaction"
    );
    pool.close().await;
    db.drop_it().await;
}

#[tokio::test]
async fn a_commit_cancelled_before_its_answer_leaves_no_transaction_behind() {
    let (db, proxy, pool) = set_up().await;
    let mut tx = fleet_shared::db::begin(&pool).await.unwrap();
    sqlx::query("SELECT 1").execute(&mut *tx).await.unwrap();
    proxy.stall_after("COMMIT");
    let committed = tokio::time::timeout(GIVE_UP, tx.commit()).await;
    assert!(committed.is_err(), "the commit was cancelled while its answer was held");
    proxy.release();
    assert!(!next_use_is_in_a_transaction(&pool).await);
    pool.close().await;
    db.drop_it().await;
}
