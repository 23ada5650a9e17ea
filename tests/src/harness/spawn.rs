//! The fleet's processes in-process: each built from its real settings
//! (parsed by clap, as from the command line), run on a task with its own
//! cancellation token, and stopped by cancelling it.

use super::{
    fixture, init_logs, within, Broker, TestDb, BOT_TOKEN, BOT_USERNAME, INGRESS_MAX_BODY, WAIT, WEBHOOK_SECRET,
};
use crate::fake_anthropic::FakeAnthropic;
use crate::fake_telegram::FakeTelegram;
use anyhow::{anyhow, Context as _, Result};
use clap::Parser as _;
use reqwest::StatusCode;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Longest wait for a process to stop (the worker drains jobs for up to 30 s).
const STOP_WAIT: Duration = Duration::from_secs(45);

/// A process of the fleet running on a spawned task.
pub type Running = (CancellationToken, JoinHandle<Result<()>>);

/// Cancels a spawned process and waits for it to return.
pub async fn stop(name: &str, (token, handle): Running) -> Result<()> {
    token.cancel();
    let joined = tokio::time::timeout(STOP_WAIT, handle)
        .await
        .map_err(|_| anyhow!("{name} did not stop within {STOP_WAIT:?}"))?;
    joined.with_context(|| format!("{name} panicked"))?.with_context(|| format!("{name} failed"))
}

/// Builds the ingress (webhook mode, `127.0.0.1:0`, [`WEBHOOK_SECRET`],
/// [`INGRESS_MAX_BODY`]) and runs it on a task. Returns the bound port.
pub async fn spawn_ingress(prefix: &str, amqp_url: &str) -> Result<(u16, CancellationToken, JoinHandle<Result<()>>)> {
    let (ports, token, handle) = spawn_ingress_with_admin(prefix, amqp_url).await?;
    Ok((ports.public, token, handle))
}

/// The two ports of an in-process ingress.
pub struct IngressPorts {
    /// The webhook port.
    pub public: u16,
    /// The admin port (`/metrics`).
    pub admin: u16,
}

/// As [`spawn_ingress`], also returning the admin port.
pub async fn spawn_ingress_with_admin(
    prefix: &str,
    amqp_url: &str,
) -> Result<(IngressPorts, CancellationToken, JoinHandle<Result<()>>)> {
    let max_body = INGRESS_MAX_BODY.to_string();
    let mut settings = ingress::Settings::try_parse_from([
        "ingress",
        "--mode",
        "webhook",
        "--bind",
        "127.0.0.1:0",
        "--admin-bind",
        "127.0.0.1:0",
        "--max-body-bytes",
        &max_body,
        "--confirm-timeout-s",
        "5",
        "--amqp-url",
        amqp_url,
        "--amqp-prefix",
        prefix,
    ])?;
    // Secrets never come from flags: set as `Settings::load` would from the environment.
    settings.webhook_secret = shared::secret::Secret::new(WEBHOOK_SECRET);
    let app = within("building the ingress", ingress::App::build(settings)).await??;
    let ports = IngressPorts { public: app.port(), admin: app.admin_port() };
    let token = CancellationToken::new();
    let handle = tokio::spawn(app.run_until_stopped(token.clone()));
    Ok((ports, token, handle))
}

/// Where a worker finds its dependencies.
pub struct WorkerDeps<'a> {
    /// AMQP prefix of the test.
    pub prefix: &'a str,
    /// Broker URL.
    pub amqp_url: &'a str,
    /// The test database (bot and billing); the worker connects to it as
    /// its own role ([`crate::fleet::WORKER_ROLE`]).
    pub database_url: &'a str,
    /// The fake Bot API.
    pub telegram_api_url: &'a str,
    /// The fake Messages API.
    pub anthropic_base_url: &'a str,
}

/// Appends `--flag value` for each pair the parser of `C` knows. Only for
/// flags that make tests fast (pacing, progress interval): the product
/// renames those as it evolves, and a missing one costs time, not meaning.
fn push_known_flags<C: clap::CommandFactory>(args: &mut Vec<String>, flags: &[(&str, &str)]) {
    let command = C::command();
    for &(flag, value) in flags {
        if command.get_arguments().any(|a| a.get_long() == Some(flag)) {
            args.extend([format!("--{flag}"), value.to_owned()]);
        }
    }
}

/// Builds a worker (fixture prices, no pacing of Bot API calls, progress
/// every 200 ms) and runs it on a task.
pub async fn spawn_worker(deps: &WorkerDeps<'_>) -> Result<Running> {
    let database_url = &crate::fleet::as_role(deps.database_url, crate::fleet::WORKER_ROLE)?;
    let prices = fixture("prices.toml");
    let prices = prices.to_str().context("fixtures path is not UTF-8")?;
    let mut args: Vec<String> = [
        "worker",
        "--telegram-api-url",
        deps.telegram_api_url,
        "--bot-username",
        BOT_USERNAME,
        "--anthropic-base-url",
        deps.anthropic_base_url,
        "--prices-file",
        prices,
        "--worker-id",
        "fleet-test-worker",
        "--database-url",
        database_url,
        "--billing-database-url",
        database_url,
        "--database-max-connections",
        "4",
        "--amqp-url",
        deps.amqp_url,
        "--amqp-prefix",
        deps.prefix,
    ]
    .map(str::to_owned)
    .to_vec();
    push_known_flags::<worker::Settings>(
        &mut args,
        &[
            ("chat-send-interval-ms", "0"),
            ("progress-interval-ms", "200"),
            ("pace-private-ms", "0"),
            ("pace-group-ms", "0"),
            ("pace-bot-ms", "0"),
            ("admin-bind", "127.0.0.1:0"),
        ],
    );
    // PDFs are read by `worker extract-document`, not by this test binary.
    args.extend(["--document-extractor".to_owned(), crate::worker_binary().to_string_lossy().into_owned()]);
    let settings = with_worker_secrets(worker::Settings::try_parse_from(args)?);
    let app = within("building the worker", worker::App::build(settings)).await??;
    let token = CancellationToken::new();
    let handle = tokio::spawn(app.run_until_stopped(token.clone()));
    Ok((token, handle))
}

/// `settings` with the test bot token and API key (secrets never come from
/// flags; `Settings::load` reads them from the environment).
pub fn with_worker_secrets(mut settings: worker::Settings) -> worker::Settings {
    settings.bot_token = shared::secret::Secret::new(BOT_TOKEN);
    settings.anthropic_api_key = shared::secret::Secret::new("sk-ant-test-key");
    settings
}

/// Runs the billing-worker (the `run` command) on a task, connected to
/// `database_url` as its own role ([`crate::fleet::BILLING_ROLE`]).
pub fn spawn_billing_worker(prefix: &str, amqp_url: &str, database_url: &str) -> Result<Running> {
    let database_url = &crate::fleet::as_role(database_url, crate::fleet::BILLING_ROLE)?;
    let settings = billing_worker::Settings::try_parse_from([
        "billing-worker",
        "--billing-database-url",
        database_url,
        "--database-max-connections",
        "4",
        "--amqp-url",
        amqp_url,
        "--amqp-prefix",
        prefix,
        "--admin-bind",
        "127.0.0.1:0",
    ])?;
    let token = CancellationToken::new();
    let handle = tokio::spawn(billing_worker::startup::main_with(settings, token.clone()));
    Ok((token, handle))
}

/// A plain HTTP client whose every request times out.
pub fn http_client() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder().timeout(WAIT).build()?)
}

/// Posts `body` to the webhook of the ingress on `port`, with the secret
/// header when `secret` is given; returns the status.
pub async fn post_webhook(
    http: &reqwest::Client,
    port: u16,
    secret: Option<&str>,
    body: Vec<u8>,
) -> Result<StatusCode> {
    let mut request = http
        .post(format!("http://127.0.0.1:{port}/telegram/webhook"))
        .header("content-type", "application/json")
        .body(body);
    if let Some(secret) = secret {
        request = request.header("x-telegram-bot-api-secret-token", secret);
    }
    Ok(request.send().await.context("posting to the webhook")?.status())
}

/// The whole fleet for one test: database, prefix, fakes, billing-worker,
/// worker and ingress.
pub struct TestApp {
    /// The test database.
    pub db: TestDb,
    /// The test's prefix and inspection channel.
    pub broker: Broker,
    /// The fake Bot API the worker talks to.
    pub telegram: FakeTelegram,
    /// The fake Messages API the worker talks to.
    pub anthropic: FakeAnthropic,
    /// The ingress's HTTP port.
    pub port: u16,
    /// Client for the webhook.
    http: reqwest::Client,
    /// Running processes, in the order they are stopped.
    processes: Vec<(&'static str, Running)>,
}

/// Starts the whole fleet for one test.
pub async fn spawn_app() -> Result<TestApp> {
    TestApp::spawn().await
}

impl TestApp {
    /// Starts everything: fakes, database, prefix, then the processes. What
    /// was created is cleaned up again when a later step fails.
    async fn spawn() -> Result<Self> {
        init_logs();
        let telegram = FakeTelegram::start("127.0.0.1:0".parse()?, BOT_USERNAME).await?;
        let anthropic = FakeAnthropic::start("127.0.0.1:0".parse()?).await?;
        let db = TestDb::new().await?;
        let broker = match Broker::new().await {
            Ok(broker) => broker,
            Err(e) => {
                let _ = db.cleanup().await;
                return Err(e);
            }
        };
        let mut app = Self { db, broker, telegram, anthropic, port: 0, http: http_client()?, processes: Vec::new() };
        match app.start_processes().await {
            Ok(()) => Ok(app),
            Err(e) => {
                let _ = app.cleanup().await;
                Err(e)
            }
        }
    }

    /// Starts the ingress (it declares the topology), the worker and the
    /// billing-worker, in the order they are stopped.
    async fn start_processes(&mut self) -> Result<()> {
        let (port, token, handle) = spawn_ingress(self.broker.prefix(), &self.broker.url).await?;
        self.port = port;
        self.processes.push(("ingress", (token, handle)));
        let worker = spawn_worker(&WorkerDeps {
            prefix: self.broker.prefix(),
            amqp_url: &self.broker.url,
            database_url: &self.db.url,
            telegram_api_url: &self.telegram.api_url(),
            anthropic_base_url: &self.anthropic.base_url(),
        })
        .await?;
        self.processes.push(("worker", worker));
        let billing = spawn_billing_worker(self.broker.prefix(), &self.broker.url, &self.db.url)?;
        self.processes.push(("billing-worker", billing));
        Ok(())
    }

    /// Posts an update to the webhook with the right secret.
    pub async fn post_update(&self, body: &[u8]) -> Result<StatusCode> {
        post_webhook(&self.http, self.port, Some(WEBHOOK_SECRET), body.to_vec()).await
    }

    /// Stops the ingress, then the worker (it drains its jobs and makes a
    /// last outbox pass), then the billing-worker (it drains its deliveries).
    pub async fn stop(&mut self) -> Result<()> {
        for (name, running) in self.processes.drain(..) {
            stop(name, running).await?;
        }
        Ok(())
    }

    /// Stops what still runs and deletes the test's database and queues.
    pub async fn cleanup(mut self) -> Result<()> {
        self.stop().await?;
        self.telegram.shutdown().await;
        self.anthropic.shutdown().await;
        self.broker.cleanup().await?;
        self.db.cleanup().await
    }
}
