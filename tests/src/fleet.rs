//! Starting the fleet as separate processes (ingress, worker, billing-worker)
//! against a fresh pair of databases and a fresh broker prefix, for the demo,
//! the lifecycle tests and the chaos run. The fakes run in-process beside it.
//!
//! Processes are named `ingress`, `worker-<i>` (also its `WORKER_ID`, so the
//! name is what `jobs.lease_owner` says) and `billing-worker`; a [`Fleet`]
//! can signal one by name ([`Fleet::signal`]), wait for it to exit and read
//! or wait on its log.

use anyhow::{bail, Context};
use shared::amqp::Topology;
use sqlx::{Connection, PgConnection, PgPool};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};

/// Where the services are.
#[derive(Debug, Clone)]
pub struct Services {
    /// Admin URL of PostgreSQL (any database; used to create and drop ours).
    pub postgres_url: String,
    /// AMQP URL.
    pub amqp_url: String,
}

/// Fresh databases for one run.
pub struct Databases {
    /// Bot database URL.
    pub bot_url: String,
    /// Billing database URL.
    pub billing_url: String,
    /// Pool on the bot database.
    pub bot: PgPool,
    /// Pool on the billing database.
    pub billing: PgPool,
    names: Vec<String>,
    admin_url: String,
}

/// The database role of the worker, made by the migrations (docs/operations.md).
pub const WORKER_ROLE: &str = "fleet_worker";
/// The database role of the billing-worker, made by the migrations.
pub const BILLING_ROLE: &str = "fleet_billing";

/// `url` with its user replaced by `role` (one of the roles above) and the
/// role's password from `FLEET_WORKER_DB_PASSWORD` or
/// `FLEET_BILLING_DB_PASSWORD` when set (the compose demo); without one, as
/// locally, PostgreSQL must trust the connection.
///
/// # Errors
/// A URL that does not parse or cannot carry a user.
pub fn as_role(url: &str, role: &str) -> anyhow::Result<String> {
    let mut parsed = reqwest::Url::parse(url).context("postgres URL")?;
    let password_var = if role == WORKER_ROLE { "FLEET_WORKER_DB_PASSWORD" } else { "FLEET_BILLING_DB_PASSWORD" };
    let password = std::env::var(password_var).ok().filter(|p| !p.is_empty());
    parsed.set_username(role).map_err(|()| anyhow::anyhow!("cannot set the user of {url}"))?;
    parsed.set_password(password.as_deref()).map_err(|()| anyhow::anyhow!("cannot set the password of {url}"))?;
    Ok(parsed.to_string())
}

fn with_database(url: &str, db: &str) -> anyhow::Result<String> {
    let mut parsed = reqwest::Url::parse(url).context("postgres URL")?;
    parsed.set_path(&format!("/{db}"));
    Ok(parsed.to_string())
}

impl Databases {
    /// Creates `<stem>_bot` and `<stem>_billing` and migrates them.
    ///
    /// # Errors
    /// Connection, creation or migration failures.
    pub async fn create(services: &Services, stem: &str) -> anyhow::Result<Self> {
        let mut admin = PgConnection::connect(&services.postgres_url).await.context("connecting to PostgreSQL")?;
        let names = vec![format!("{stem}_bot"), format!("{stem}_billing")];
        for n in &names {
            sqlx::query(&format!("DROP DATABASE IF EXISTS \"{n}\" WITH (FORCE)")).execute(&mut admin).await?;
            sqlx::query(&format!("CREATE DATABASE \"{n}\"")).execute(&mut admin).await?;
        }
        let bot_url = with_database(&services.postgres_url, &names[0])?;
        let billing_url = with_database(&services.postgres_url, &names[1])?;
        let bot = shared::db::pool(&bot_url, 5, Duration::from_secs(5))?;
        let billing = shared::db::pool(&billing_url, 5, Duration::from_secs(5))?;
        shared::db::migrate_bot(&bot).await.context("migrating the bot database")?;
        shared::db::migrate_billing(&billing).await.context("migrating the billing database")?;
        Ok(Self { bot_url, billing_url, bot, billing, names, admin_url: services.postgres_url.clone() })
    }

    /// Closes the pools and drops the databases.
    ///
    /// # Errors
    /// Connection failures.
    pub async fn drop_all(self) -> anyhow::Result<()> {
        self.bot.close().await;
        self.billing.close().await;
        let mut admin = PgConnection::connect(&self.admin_url).await?;
        for n in &self.names {
            sqlx::query(&format!("DROP DATABASE IF EXISTS \"{n}\" WITH (FORCE)")).execute(&mut admin).await?;
        }
        Ok(())
    }
}

/// Deletes every queue and exchange of `prefix`.
///
/// # Errors
/// Broker failures.
pub async fn delete_topology(amqp_url: &str, prefix: &str) -> anyhow::Result<()> {
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    let topo = Topology::new(prefix);
    let conn = shared::amqp::connect(amqp_url, "cleanup", Duration::from_secs(5)).await?;
    let ch = conn.create_channel().await?;
    for q in topo.all_queues() {
        ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await?;
    }
    for x in [topo.updates_exchange(), topo.billing_exchange(), topo.control_exchange()] {
        ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default()).await?;
    }
    let _ = conn.close(200, "bye".into()).await;
    Ok(())
}

/// Everything the processes are configured with.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Folder of the `ingress`, `worker` and `billing-worker` binaries.
    pub bin_dir: PathBuf,
    /// Folder for process logs.
    pub log_dir: PathBuf,
    /// Services.
    pub services: Services,
    /// Broker prefix.
    pub prefix: String,
    /// Bot database URL (the owner's: processes connect as their roles, see [`as_role`]).
    pub bot_db_url: String,
    /// Billing database URL (the owner's).
    pub billing_db_url: String,
    /// Fake (or real) Bot API URL.
    pub telegram_api_url: String,
    /// Fake (or real) Messages API URL.
    pub anthropic_base_url: String,
    /// Price file.
    pub prices_file: PathBuf,
    /// Bot token.
    pub bot_token: String,
    /// Webhook secret.
    pub webhook_secret: String,
    /// Extra environment of the worker (scenario `[config]`).
    pub worker_env: BTreeMap<String, String>,
    /// Number of worker processes.
    pub workers: usize,
}

impl FleetConfig {
    /// A test's fleet of one worker on `dbs` under `prefix`, against the
    /// fakes at `telegram_api_url` and `anthropic_base_url`: fixture prices,
    /// the harness's bot token and webhook secret, no extra worker
    /// environment. Change it with the methods below (or the public fields).
    pub fn for_test(
        bin_dir: PathBuf,
        log_dir: PathBuf,
        services: Services,
        prefix: &str,
        dbs: &Databases,
        telegram_api_url: String,
        anthropic_base_url: String,
    ) -> Self {
        Self {
            bin_dir,
            log_dir,
            services,
            prefix: prefix.to_owned(),
            bot_db_url: dbs.bot_url.clone(),
            billing_db_url: dbs.billing_url.clone(),
            telegram_api_url,
            anthropic_base_url,
            prices_file: crate::harness::fixture("prices.toml"),
            bot_token: crate::harness::BOT_TOKEN.to_owned(),
            webhook_secret: crate::harness::WEBHOOK_SECRET.to_owned(),
            worker_env: BTreeMap::new(),
            workers: 1,
        }
    }

    /// With `workers` worker processes.
    #[must_use]
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }

    /// With this bot token and webhook secret.
    #[must_use]
    pub fn secrets(mut self, bot_token: &str, webhook_secret: &str) -> Self {
        self.bot_token = bot_token.to_owned();
        self.webhook_secret = webhook_secret.to_owned();
        self
    }

    /// With the workers' environment variable `key` set to `value` (later
    /// pairs win); [`Fleet::start`] refuses a variable the worker does not read.
    #[must_use]
    pub fn worker_env<'a>(mut self, pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        self.worker_env.extend(pairs.into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())));
        self
    }
}

/// Refuses a variable of `env` that the worker binary does not read (a
/// renamed or mistyped setting would otherwise be ignored silently): the
/// environment names of `worker::Settings`, their `*_FILE` forms, and the
/// secrets read from the environment only.
///
/// # Errors
/// The first unknown variable, named.
pub fn check_worker_env(env: &BTreeMap<String, String>) -> anyhow::Result<()> {
    let command = <worker::Settings as clap::CommandFactory>::command();
    let mut known: Vec<String> = command
        .get_arguments()
        .filter_map(clap::Arg::get_env)
        .map(|name| name.to_string_lossy().into_owned())
        .chain(["TELEGRAM_BOT_TOKEN".to_owned(), "ANTHROPIC_API_KEY".to_owned()])
        .collect();
    known.extend(known.iter().map(|name| format!("{name}_FILE")).collect::<Vec<_>>());
    // The environment of the process as a whole, not a setting.
    known.push("RUST_LOG".to_owned());
    match env.keys().find(|key| !known.contains(key)) {
        Some(key) => bail!("the worker reads no environment variable {key} (a renamed or mistyped setting?)"),
        None => Ok(()),
    }
}

/// A running fleet; processes are killed when it is dropped.
pub struct Fleet {
    /// Port of the ingress.
    pub ingress_port: u16,
    /// Processes by name, in start order.
    children: Vec<(String, Child)>,
    /// How each process was started, by name (for [`Fleet::restart`]).
    specs: BTreeMap<String, ProcessSpec>,
    /// Where each process writes `<name>.log`.
    log_dir: PathBuf,
}

/// A program and its environment: enough to start a process again.
#[derive(Debug, Clone)]
struct ProcessSpec {
    program: PathBuf,
    env: Vec<(String, String)>,
}

impl ProcessSpec {
    fn command(&self) -> Command {
        let mut c = Command::new(&self.program);
        c.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        c
    }
}

/// The name (and `WORKER_ID`) of the `i`-th worker process.
pub fn worker_name(i: usize) -> String {
    format!("worker-{i}")
}

/// A signal for [`Fleet::signal`], sent with the `kill` command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGKILL: dies at once, no clean-up (a crash).
    Kill,
    /// SIGSTOP: frozen until SIGCONT (a long GC pause, a hung host).
    Stop,
    /// SIGCONT: resumes a stopped process.
    Cont,
    /// SIGTERM: graceful shutdown.
    Term,
}

impl Signal {
    /// The name `kill -s` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Kill => "KILL",
            Self::Stop => "STOP",
            Self::Cont => "CONT",
            Self::Term => "TERM",
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

impl Fleet {
    /// Starts ingress, workers and a billing-worker, and waits until the
    /// ingress is ready (broker reachable, topology declared).
    ///
    /// # Errors
    /// A process that does not start or an ingress that never gets ready.
    pub async fn start(cfg: &FleetConfig) -> anyhow::Result<Self> {
        Self::start_sized(cfg, 1).await
    }

    /// As [`Fleet::start`], with `billing_workers` billing-worker processes
    /// (`billing-worker-<i>`; a single one is named `billing-worker`).
    ///
    /// # Errors
    /// A process that does not start or an ingress that never gets ready.
    pub async fn start_sized(cfg: &FleetConfig, billing_workers: usize) -> anyhow::Result<Self> {
        check_worker_env(&cfg.worker_env)?;
        std::fs::create_dir_all(&cfg.log_dir)?;
        let ingress_port = free_port()?;
        let common = || -> Vec<(String, String)> {
            vec![
                ("AMQP_URL".into(), cfg.services.amqp_url.clone()),
                ("AMQP_PREFIX".into(), cfg.prefix.clone()),
                ("LOG_FORMAT".into(), "json".into()),
                ("RUST_LOG".into(), "info,sqlx=warn,lapin=warn".into()),
            ]
        };
        let mut specs = Vec::new();
        let mut env = common();
        env.push(("INGRESS_BIND".into(), format!("127.0.0.1:{ingress_port}")));
        env.push(("ADMIN_BIND".into(), "127.0.0.1:0".into()));
        env.push(("TELEGRAM_WEBHOOK_SECRET".into(), cfg.webhook_secret.clone()));
        specs.push(("ingress".to_owned(), ProcessSpec { program: cfg.bin_dir.join("ingress"), env }));
        for i in 0..cfg.workers {
            let name = worker_name(i);
            let mut env = common();
            let path = |p: &Path| p.to_string_lossy().into_owned();
            env.extend([
                ("DATABASE_URL".into(), as_role(&cfg.bot_db_url, WORKER_ROLE)?),
                ("BILLING_DATABASE_URL".into(), as_role(&cfg.billing_db_url, WORKER_ROLE)?),
                ("TELEGRAM_BOT_TOKEN".into(), cfg.bot_token.clone()),
                ("TELEGRAM_API_URL".into(), cfg.telegram_api_url.clone()),
                ("ANTHROPIC_API_KEY".into(), "demo-key".into()),
                ("ANTHROPIC_BASE_URL".into(), cfg.anthropic_base_url.clone()),
                ("PRICES_FILE".into(), path(&cfg.prices_file)),
                ("WORKER_ID".into(), name.clone()),
                // Each worker's admin listener on a port of its own (several share the host).
                ("ADMIN_BIND".into(), "127.0.0.1:0".into()),
            ]);
            env.extend(cfg.worker_env.iter().map(|(k, v)| (k.clone(), v.clone())));
            specs.push((name, ProcessSpec { program: cfg.bin_dir.join("worker"), env }));
        }
        for i in 0..billing_workers.max(1) {
            let name = if billing_workers <= 1 { "billing-worker".to_owned() } else { format!("billing-worker-{i}") };
            let mut env = common();
            env.push(("BILLING_DATABASE_URL".into(), as_role(&cfg.billing_db_url, BILLING_ROLE)?));
            env.push(("ADMIN_BIND".into(), "127.0.0.1:0".into()));
            specs.push((name, ProcessSpec { program: cfg.bin_dir.join("billing-worker"), env }));
        }
        let mut children = Vec::new();
        for (name, spec) in &specs {
            let log = cfg.log_dir.join(format!("{name}.log"));
            children.push((name.clone(), spawn(&mut spec.command(), &log, false)?));
        }
        let fleet = Self { ingress_port, children, specs: specs.into_iter().collect(), log_dir: cfg.log_dir.clone() };
        fleet.wait_ready().await?;
        Ok(fleet)
    }

    /// Starts process `name` again as it was started first (after it was
    /// killed), appending to its log.
    ///
    /// # Errors
    /// An unknown process, or one that is still running.
    pub async fn restart(&mut self, name: &str) -> anyhow::Result<()> {
        let spec = self.specs.get(name).with_context(|| format!("no process {name}"))?.clone();
        let log = self.log_path(name);
        let slot = self.children.iter_mut().find(|(n, _)| n == name).with_context(|| format!("no process {name}"))?;
        if slot.1.try_wait()?.is_none() {
            bail!("{name} is still running");
        }
        slot.1 = spawn(&mut spec.command(), &log, true)?;
        Ok(())
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{}/readyz", self.ingress_port);
        crate::harness::wait_until("the ingress to be ready (see its log)", Duration::from_secs(20), || async {
            Ok(client.get(&url).send().await.is_ok_and(|r| r.status().is_success()))
        })
        .await
    }

    /// The webhook URL.
    pub fn webhook_url(&self) -> String {
        format!("http://127.0.0.1:{}/telegram/webhook", self.ingress_port)
    }

    /// Sends SIGTERM (and SIGCONT, for a stopped process) to every process
    /// and waits up to 10 s each, then kills.
    pub async fn stop(mut self) {
        for (_, child) in &mut self.children {
            if let Some(pid) = child.id() {
                let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await;
                let _ = Command::new("kill").arg("-CONT").arg(pid.to_string()).status().await;
            }
        }
        for (name, child) in &mut self.children {
            if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
                tracing::warn!(process = %name, "did not stop in 10 s; killing");
                let _ = child.kill().await;
            }
        }
    }

    /// Names of processes that exited already (crashed).
    pub fn exited(&mut self) -> Vec<String> {
        self.children.iter_mut().filter_map(|(n, c)| matches!(c.try_wait(), Ok(Some(_))).then(|| n.clone())).collect()
    }

    /// Names of the processes, in start order.
    pub fn names(&self) -> Vec<String> {
        self.children.iter().map(|(n, _)| n.clone()).collect()
    }

    fn child(&self, name: &str) -> anyhow::Result<&Child> {
        self.children.iter().find(|(n, _)| n == name).map(|(_, c)| c).with_context(|| format!("no process {name}"))
    }

    /// The pid of process `name`, while it has not been reaped.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.child(name).ok().and_then(Child::id)
    }

    /// Sends `signal` to process `name`.
    ///
    /// # Errors
    /// An unknown or already reaped process, or `kill` failing.
    pub async fn signal(&self, name: &str, signal: Signal) -> anyhow::Result<()> {
        let pid = self.pid(name).with_context(|| format!("{name} has exited"))?;
        let status = Command::new("kill")
            .args(["-s", signal.name(), &pid.to_string()])
            .status()
            .await
            .context("running kill")?;
        if !status.success() {
            bail!("kill -s {} {pid} ({name}) failed: {status}", signal.name());
        }
        Ok(())
    }

    /// Waits up to `timeout` for process `name` to exit; its exit status.
    ///
    /// # Errors
    /// An unknown process, or one still running after `timeout`.
    pub async fn wait_exit(&mut self, name: &str, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let child = self
            .children
            .iter_mut()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c)
            .with_context(|| format!("no process {name}"))?;
        tokio::time::timeout(timeout, child.wait())
            .await
            .map_err(|_| anyhow::anyhow!("{name} still runs after {timeout:?}"))?
            .with_context(|| format!("waiting for {name}"))
    }

    /// The log file of process `name`.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.log_dir.join(format!("{name}.log"))
    }

    /// The log of process `name` so far (empty when there is none).
    pub fn log(&self, name: &str) -> String {
        std::fs::read(self.log_path(name)).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// Waits until the log of process `name` has a line containing every
    /// one of `needles`; `false` after `timeout`. Polls the file
    /// ([`crate::harness::wait_until`]: a log has no event to wait on).
    pub async fn wait_for_log(&self, name: &str, needles: &[&str], timeout: Duration) -> bool {
        crate::harness::wait_until("a log line", timeout, || async {
            Ok(self.log(name).lines().any(|l| needles.iter().all(|n| l.contains(n))))
        })
        .await
        .is_ok()
    }
}

fn spawn(cmd: &mut Command, log: &Path, append: bool) -> anyhow::Result<Child> {
    let file = std::fs::OpenOptions::new().create(true).write(true).append(append).truncate(!append).open(log)?;
    let err = file.try_clone()?;
    cmd.stdin(Stdio::null()).stdout(file).stderr(err).kill_on_drop(true);
    cmd.spawn().with_context(|| format!("starting {:?}", cmd.as_std().get_program()))
}
