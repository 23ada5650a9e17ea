//! Connection recovery: the worker's broker connection goes through a TCP
//! proxy that can black-hole it (sockets stay open, no byte passes: what a
//! dead peer or a partition looks like). With a 1 s AMQP heartbeat the
//! worker notices within two intervals, reports not-ready, reconnects once
//! the path is back, and answers the next update.

use fleet_tests::fake_anthropic::{FakeAnthropic, ScriptedResponse};
use fleet_tests::fake_telegram::FakeTelegram;
use fleet_tests::harness::{
    fixture, fixture_bytes, post_webhook, spawn_ingress, spawn_worker, stop, wait_until, Broker, TestDb, WorkerDeps,
    BOT_USERNAME, WAIT,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A TCP proxy to RabbitMQ that can stall every connection.
#[derive(Clone)]
struct Proxy {
    stalled: Arc<AtomicBool>,
    /// Cancelled to close every connection of the current generation.
    generation: Arc<Mutex<CancellationToken>>,
    resumed: Arc<tokio::sync::Notify>,
}

impl Proxy {
    async fn start(upstream: &'static str) -> anyhow::Result<(Self, u16)> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let proxy = Self {
            stalled: Arc::new(AtomicBool::new(false)),
            generation: Arc::new(Mutex::new(CancellationToken::new())),
            resumed: Arc::new(tokio::sync::Notify::new()),
        };
        let p = proxy.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else { continue };
                let token = p.generation.lock().map(|g| g.clone()).unwrap_or_default();
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(p.clone().pipe(cr, sw, token.clone()));
                tokio::spawn(p.clone().pipe(sr, cw, token));
            }
        });
        Ok((proxy, port))
    }

    /// Copies bytes one way; while stalled, holds them back.
    async fn pipe(
        self,
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        token: CancellationToken,
    ) {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = tokio::select! {
                () = token.cancelled() => return,
                r = from.read(&mut buf) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
            };
            while self.stalled.load(Ordering::SeqCst) {
                tokio::select! {
                    () = token.cancelled() => return,
                    () = self.resumed.notified() => {}
                }
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    /// Black-holes every connection: open, silent.
    fn stall(&self) {
        self.stalled.store(true, Ordering::SeqCst);
    }

    /// Closes the stalled connections and lets new ones through.
    fn restore(&self) {
        if let Ok(mut g) = self.generation.lock() {
            g.cancel();
            *g = CancellationToken::new();
        }
        self.stalled.store(false, Ordering::SeqCst);
        self.resumed.notify_waiters();
    }
}

async fn ready(http: &reqwest::Client, admin: u16) -> anyhow::Result<bool> {
    Ok(http.get(format!("http://127.0.0.1:{admin}/readyz")).send().await?.status().is_success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_broker_is_noticed_within_two_heartbeats_and_the_worker_reconnects_and_resumes() -> anyhow::Result<()>
{
    fleet_tests::harness::init_logs();
    let telegram = FakeTelegram::start("127.0.0.1:0".parse()?, BOT_USERNAME).await?;
    let anthropic = FakeAnthropic::start("127.0.0.1:0".parse()?).await?;
    let db = TestDb::new().await?;
    let broker = Broker::new().await?;
    broker.declare().await?;
    let (proxy, proxy_port) = Proxy::start("127.0.0.1:5672").await?;
    let (port, ingress_token, ingress) = spawn_ingress(broker.prefix(), &broker.url).await?;
    let via_proxy = format!("amqp://guest:guest@127.0.0.1:{proxy_port}/%2f?heartbeat=1");
    let (telegram_api_url, anthropic_base_url) = (telegram.api_url(), anthropic.base_url());
    let deps = WorkerDeps {
        prefix: broker.prefix(),
        amqp_url: &via_proxy,
        database_url: &db.url,
        telegram_api_url: &telegram_api_url,
        anthropic_base_url: &anthropic_base_url,
    };
    let worker = spawn_worker(&deps, |_| {}).await?;
    let admin = worker.admin_port;
    let (token, worker) = worker.running;
    let http = fleet_tests::harness::http_client()?;
    wait_until("the worker to be ready", WAIT, || async { ready(&http, admin).await }).await?;

    proxy.stall();
    let stalled_at = Instant::now();
    wait_until("the worker to report not-ready", WAIT, || async { Ok(!ready(&http, admin).await?) }).await?;
    let noticed = stalled_at.elapsed();
    // Two 1 s heartbeat intervals, plus the readiness flag and the poll.
    assert!(noticed <= Duration::from_millis(3_500), "a silent broker was noticed after {noticed:?}");

    proxy.restore();
    wait_until("the worker to reconnect", WAIT, || async { ready(&http, admin).await }).await?;
    billing_worker::ledger::grant(&db.pool, 100_000_001, "5".parse()?, uuid::Uuid::now_v7()).await?;
    anthropic.push([ScriptedResponse::from_file(fixture("anthropic/text_capital.sse"))?]);
    let body = fixture_bytes("telegram/ada_capital.json")?;
    assert_eq!(post_webhook(&http, port, Some(fleet_tests::harness::WEBHOOK_SECRET), body).await?, 200);
    wait_until("the update to be answered after the reconnect", WAIT, || async {
        Ok(telegram.messages().iter().any(|m| m.chat_id == 100_000_001 && m.text.contains("Paris")))
    })
    .await?;

    token.cancel();
    let _ = tokio::time::timeout(WAIT, worker).await;
    stop("ingress", (ingress_token, ingress)).await?;
    telegram.shutdown().await;
    anthropic.shutdown().await;
    broker.cleanup().await?;
    db.cleanup().await
}
