//! The fleet's processes in-process: each built from its real settings
//! (parsed by clap, as from the command line), run on a task with its own
//! cancellation token, and stopped by cancelling it.

use super::{
    fixture, init_logs, within, Broker, TestDb, BOT_TOKEN, BOT_USERNAME, INGRESS_MAX_BODY, WAIT, WEBHOOK_SECRET,
};
use crate::fake_anthropic::FakeAnthropic;
use crate::fake_telegram::{FakeTelegram, TgCall};
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
    /// The test database (bot and billing), the owner's URL; the worker
    /// connects to it as its own role ([`crate::fleet::WORKER_ROLE`]).
    pub database_url: &'a str,
    /// The fake Bot API.
    pub telegram_api_url: &'a str,
    /// The fake Messages API.
    pub anthropic_base_url: &'a str,
}

/// The worker's settings for a test, built as the struct (no argv): the
/// defaults of `worker::Settings` (as its parser gives them), then `deps`,
/// fixture prices, [`BOT_USERNAME`], [`BOT_TOKEN`] and a test API key (as
/// if from the environment), worker id `fleet-test-worker`, 4 database
/// connections, no pacing of Bot API calls, the admin listener on port 0,
/// and PDFs read by the built `worker extract-document` (not by the test
/// binary). Change a field after this, or pass an override to
/// [`spawn_worker`]: a renamed setting is a compile error, not a flag
/// silently dropped.
///
/// # Errors
/// A database URL that cannot carry the worker's role.
pub fn worker_settings(deps: &WorkerDeps<'_>) -> Result<worker::Settings> {
    // The defaults, as the binary would get them without flags.
    let mut s = worker::Settings::try_parse_from(["worker"])?;
    let database_url = crate::fleet::as_role(deps.database_url, crate::fleet::WORKER_ROLE)?;
    s.telegram_api_url = deps.telegram_api_url.to_owned();
    s.bot_username = BOT_USERNAME.to_owned();
    s.anthropic_base_url = deps.anthropic_base_url.to_owned();
    s.prices_file = fixture("prices.toml");
    s.worker_id = Some("fleet-test-worker".to_owned());
    s.db.billing_database_url = Some(database_url.clone());
    s.db.database_url = database_url;
    s.db.database_max_connections = 4;
    s.broker.amqp_url = deps.amqp_url.to_owned();
    s.broker.amqp_prefix = deps.prefix.to_owned();
    s.pace_private_ms = 0;
    s.pace_group_ms = 0;
    s.pace_bot_ms = 0;
    s.admin_bind = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    s.document_extractor = Some(crate::worker_binary());
    // Secrets never come from flags; `Settings::load` reads them from the environment.
    s.bot_token = shared::secret::Secret::new(BOT_TOKEN);
    s.anthropic_api_key = shared::secret::Secret::new("sk-ant-test-key");
    Ok(s)
}

/// A worker running on a task.
pub struct SpawnedWorker {
    /// Its admin port (`/metrics`, `/readyz`).
    pub admin_port: u16,
    /// Its token and task, for [`stop`].
    pub running: Running,
}

/// Builds a worker from [`worker_settings`] changed by `overrides` (e.g.
/// `|s| s.visibility_timeout_s = 3`) and runs it on a task.
///
/// # Errors
/// Settings the worker refuses, or a build that fails or takes longer than [`WAIT`].
pub async fn spawn_worker(
    deps: &WorkerDeps<'_>,
    overrides: impl FnOnce(&mut worker::Settings),
) -> Result<SpawnedWorker> {
    let mut settings = worker_settings(deps)?;
    overrides(&mut settings);
    let app = within("building the worker", worker::App::build(settings)).await??;
    let admin_port = app.admin_port();
    let token = CancellationToken::new();
    let handle = tokio::spawn(app.run_until_stopped(token.clone()));
    Ok(SpawnedWorker { admin_port, running: (token, handle) })
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

/// The whole fleet for one test: database, prefix, fakes, billing-worker
/// (unless left out), worker and ingress.
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
    /// The worker's admin port (`/metrics`, `/readyz`).
    pub worker_admin_port: u16,
    /// Client for the webhook.
    http: reqwest::Client,
    /// Running processes, in the order they are stopped.
    processes: Vec<(&'static str, Running)>,
}

/// Starts the whole fleet for one test ([`TestApp::builder`] with nothing changed).
///
/// # Errors
/// A fake, the database, the broker or a process that does not start
/// (what was created is removed again).
pub async fn spawn_app() -> Result<TestApp> {
    TestApp::builder().spawn().await
}

/// A change to a worker's settings (`|s| s.tool_timeout_s = 20`).
pub type WorkerOverride = Box<dyn FnOnce(&mut worker::Settings) + Send>;

/// What a [`TestApp`] starts with: worker settings changed from
/// [`worker_settings`], and whether a billing-worker runs.
#[must_use]
pub struct TestAppBuilder {
    /// Changes to the worker's settings, applied in order.
    worker: Vec<WorkerOverride>,
    /// Whether a billing-worker runs (events then stay in its queue).
    billing_worker: bool,
}

impl TestAppBuilder {
    /// Changes the worker's settings (typed: `|s| s.tool_timeout_s = 20`).
    pub fn worker(mut self, overrides: impl FnOnce(&mut worker::Settings) + Send + 'static) -> Self {
        self.worker.push(Box::new(overrides));
        self
    }

    /// Runs no billing-worker: billing events stay in the billing queue.
    pub fn without_billing_worker(mut self) -> Self {
        self.billing_worker = false;
        self
    }

    /// Starts everything: fakes, database, prefix, then the processes. What
    /// was created is cleaned up again when a later step fails.
    ///
    /// # Errors
    /// As [`spawn_app`].
    pub async fn spawn(self) -> Result<TestApp> {
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
        let mut app = TestApp {
            db,
            broker,
            telegram,
            anthropic,
            port: 0,
            worker_admin_port: 0,
            http: http_client()?,
            processes: Vec::new(),
        };
        match app.start_processes(self).await {
            Ok(()) => Ok(app),
            Err(e) => {
                let _ = app.cleanup().await;
                Err(e)
            }
        }
    }
}

impl TestApp {
    /// A fleet to start: [`worker_settings`] and a billing-worker unless changed.
    pub fn builder() -> TestAppBuilder {
        TestAppBuilder { worker: Vec::new(), billing_worker: true }
    }

    /// Starts the ingress (it declares the topology), the worker and the
    /// billing-worker, in the order they are stopped.
    async fn start_processes(&mut self, with: TestAppBuilder) -> Result<()> {
        let (port, token, handle) = spawn_ingress(self.broker.prefix(), &self.broker.url).await?;
        self.port = port;
        self.processes.push(("ingress", (token, handle)));
        let deps = WorkerDeps {
            prefix: self.broker.prefix(),
            amqp_url: &self.broker.url,
            database_url: &self.db.url,
            telegram_api_url: &self.telegram.api_url(),
            anthropic_base_url: &self.anthropic.base_url(),
        };
        let worker = spawn_worker(&deps, |s| with.worker.into_iter().for_each(|change| change(s))).await?;
        self.worker_admin_port = worker.admin_port;
        self.processes.push(("worker", worker.running));
        if with.billing_worker {
            let billing = spawn_billing_worker(self.broker.prefix(), &self.broker.url, &self.db.url)?;
            self.processes.push(("billing-worker", billing));
        }
        Ok(())
    }

    /// Posts an update to the webhook with the right secret.
    ///
    /// # Errors
    /// The post failing (not a status other than 200).
    pub async fn post_update(&self, body: &[u8]) -> Result<StatusCode> {
        post_webhook(&self.http, self.port, Some(WEBHOOK_SECRET), body.to_vec()).await
    }

    /// Posts `update` to the webhook; it must be accepted (200).
    ///
    /// # Errors
    /// The post failing, or another status.
    pub async fn post(&self, update: &serde_json::Value) -> Result<()> {
        let status = self.post_update(&serde_json::to_vec(update)?).await?;
        anyhow::ensure!(status == StatusCode::OK, "the webhook answered {status}");
        Ok(())
    }

    /// Waits up to `within` for the job of `update_id` to end; its id and
    /// outcome (`answered`, `undelivered`, …).
    ///
    /// # Errors
    /// No ended job in time, or the database failing.
    pub async fn job_outcome(&self, update_id: i64, within: Duration) -> Result<(uuid::Uuid, String)> {
        let pool = self.db.pool.clone();
        super::wait_until("the job to finish", within, || {
            let pool = pool.clone();
            async move {
                let outcome: Option<Option<String>> =
                    sqlx::query_scalar("SELECT outcome FROM jobs WHERE update_id = $1")
                        .bind(update_id)
                        .fetch_optional(&pool)
                        .await?;
                Ok(outcome.flatten().is_some())
            }
        })
        .await?;
        Ok(sqlx::query_as("SELECT job_id, outcome FROM jobs WHERE update_id = $1")
            .bind(update_id)
            .fetch_one(&self.db.pool)
            .await?)
    }

    /// Posts the fixture update `rel` (e.g. `telegram/ada_capital.json`)
    /// and waits up to [`WAIT`] for its job to end: [`TestApp::job_outcome`].
    ///
    /// # Errors
    /// A missing fixture, a refused post, or no ended job in time.
    pub async fn post_fixture_and_finish(&self, rel: &str) -> Result<(uuid::Uuid, String)> {
        let update = super::fixture_bytes(rel)?;
        let update_id = serde_json::from_slice::<serde_json::Value>(&update)?["update_id"]
            .as_i64()
            .with_context(|| format!("{rel} has no update_id"))?;
        let status = self.post_update(&update).await?;
        anyhow::ensure!(status == StatusCode::OK, "the webhook answered {status}");
        self.job_outcome(update_id, WAIT).await
    }

    /// Grants `usd` (a decimal string) of credit to `user`, directly on the ledger.
    ///
    /// # Errors
    /// A bad amount, or the database failing.
    pub async fn grant(&self, user: i64, usd: &str) -> Result<()> {
        billing_worker::ledger::grant(&self.db.pool, user, usd.parse()?, uuid::Uuid::now_v7()).await?;
        Ok(())
    }

    /// Waits up to [`WAIT`] for a delivered `sendMessage` to `chat` whose
    /// text contains `needle`; its text.
    ///
    /// # Errors
    /// No such message in time (the error lists what was sent).
    pub async fn wait_for_message(&self, chat: i64, needle: &str) -> Result<String> {
        let matches = |c: &TgCall| {
            c.method == "sendMessage"
                && c.status == 200
                && c.params["chat_id"].as_i64() == Some(chat)
                && c.params["text"].as_str().is_some_and(|t| t.contains(needle))
        };
        if !self.telegram.wait_for_call(matches, WAIT).await {
            let sent: Vec<_> = self.telegram.messages().into_iter().map(|m| m.text).collect();
            anyhow::bail!("no message containing {needle:?} reached chat {chat}; sent: {sent:#?}");
        }
        let call = self.telegram.calls().into_iter().find(|c| matches(c)).context("the call vanished")?;
        Ok(call.params["text"].as_str().unwrap_or_default().to_owned())
    }

    /// Stops the ingress, then the worker (it drains its jobs and makes a
    /// last outbox pass), then the billing-worker (it drains its deliveries).
    ///
    /// # Errors
    /// A process that fails, panics or does not stop in time.
    pub async fn stop(&mut self) -> Result<()> {
        for (name, running) in self.processes.drain(..) {
            stop(name, running).await?;
        }
        Ok(())
    }

    /// Stops what still runs and deletes the test's database and queues.
    ///
    /// # Errors
    /// As [`TestApp::stop`], or the clean-up failing.
    pub async fn cleanup(mut self) -> Result<()> {
        self.stop().await?;
        self.telegram.shutdown().await;
        self.anthropic.shutdown().await;
        self.broker.cleanup().await?;
        self.db.cleanup().await
    }
}
