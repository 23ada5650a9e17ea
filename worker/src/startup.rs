//! Building and running the worker.
//!
//! Shutdown phases:
//! 1. the token is cancelled (SIGTERM / ctrl-c in `main`);
//! 2. the consumer stops taking deliveries and drains running jobs (30 s);
//! 3. the outbox relay makes a last pass; the reaper and the control listener stop;
//! 4. `run_until_stopped` returns.

use crate::config::{Command, Settings};
use crate::context::WorkerContext;
use anyhow::Context;
use shared::amqp::ConfirmPublisher;
use shared::anthropic::AnthropicClient;
use shared::pricing::PriceTable;
use shared::telegram::BotApi;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// A built worker.
pub struct App {
    ctx: WorkerContext,
    admin: tokio::net::TcpListener,
}

impl App {
    /// Validates settings, loads prices, opens pools and clients.
    ///
    /// # Errors
    /// A message naming the bad setting or the failing resource.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        settings.validate().map_err(anyhow::Error::msg)?;
        let prices = PriceTable::load(&settings.prices_file).with_context(|| "PRICES_FILE")?;
        if prices.row_for(&settings.model, chrono::Utc::now().date_naive()).is_none() {
            // Never call Claude with a model whose usage cannot be priced.
            anyhow::bail!("ANTHROPIC_MODEL {:?} has no price row in PRICES_FILE", settings.model);
        }
        let acquire = Duration::from_secs(5);
        let db = shared::db::pool(&settings.db.database_url, settings.db.database_max_connections, acquire)
            .context("DATABASE_URL")?;
        let billing_db = shared::db::pool(settings.db.billing_url(), settings.db.database_max_connections, acquire)
            .context("BILLING_DATABASE_URL")?;
        let anthropic = AnthropicClient::new(
            &settings.anthropic_base_url,
            settings.anthropic_api_key.clone(),
            Duration::from_secs(10),
        )
        .map_err(|e| anyhow::anyhow!("ANTHROPIC_BASE_URL: {e}"))?;
        // The client's own timeout bounds file downloads (their setting);
        // every method call gets TELEGRAM_TIMEOUT_S.
        let telegram = BotApi::new(
            &settings.telegram_api_url,
            settings.bot_token.clone(),
            Duration::from_secs(settings.document_download_timeout_s),
        )
        .map_err(|e| anyhow::anyhow!("TELEGRAM_API_URL: {e}"))?
        .with_call_timeout(Duration::from_secs(settings.telegram_timeout_s));
        let publisher = ConfirmPublisher::new(&settings.broker.amqp_url, "worker-publisher", Duration::from_secs(5));
        let worker_id = settings.worker_id.clone().unwrap_or_else(default_worker_id);
        let tools = crate::tools::Registry::new(&settings.tools).map_err(|e| anyhow::anyhow!("TOOLS: {e}"))?;
        let packs =
            crate::payments::parse_packs(&settings.stars_packs).map_err(|e| anyhow::anyhow!("STARS_PACKS: {e}"))?;
        let ctx = WorkerContext::new(
            db, billing_db, anthropic, telegram, prices, settings, publisher, worker_id, tools, packs,
        );
        let admin = tokio::net::TcpListener::bind(ctx.settings.admin_bind)
            .await
            .with_context(|| format!("ADMIN_BIND: cannot bind {}", ctx.settings.admin_bind))?;
        let _ = shared::admin::metrics_handle();
        Ok(Self { ctx, admin })
    }

    /// Port of the admin server (tests bind port 0).
    pub fn admin_port(&self) -> u16 {
        self.admin.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// The context (tests drive single steps with it).
    pub fn context(&self) -> &WorkerContext {
        &self.ctx
    }

    /// Runs the consumer and the outbox relay until `shutdown`.
    ///
    /// # Errors
    /// None at present; kept for symmetry with the other binaries.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tracing::info!(worker_id = %self.ctx.worker_id, "worker running");
        let readiness = shared::admin::Readiness {
            databases: vec![self.ctx.db.clone(), self.ctx.billing_db.clone()],
            consumers: vec![self.ctx.consuming.clone(), self.ctx.intake_consuming.clone()],
            conditions: vec![(TOKEN_REFUSED, self.ctx.telegram.token_accepted())],
        };
        let admin = shared::admin::serve(self.admin, readiness, shutdown.clone());
        let mut tasks = JoinSet::new();
        tasks.spawn(crate::queues::shards::run(self.ctx.clone(), shutdown.clone()));
        tasks.spawn(crate::queues::work::run(self.ctx.clone(), shutdown.clone()));
        tasks.spawn(crate::queues::relay::run(self.ctx.clone(), shutdown.clone()));
        tasks.spawn(crate::queues::reaper::run(self.ctx.clone(), shutdown.clone()));
        tasks.spawn(crate::queues::control::run(self.ctx.clone(), shutdown.clone()));
        tasks.spawn(watch_token(self.ctx.clone(), shutdown.clone()));
        while tasks.join_next().await.is_some() {}
        let _ = admin.await;
        Ok(())
    }
}

fn default_worker_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".to_owned());
    format!("{host}-{}-{}", std::process::id(), &uuid::Uuid::now_v7().simple().to_string()[24..])
}

/// Runs the process: `migrate` or the worker.
///
/// # Errors
/// Start-up failures, with context.
pub async fn main_with(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    if let Some(Command::Migrate) = settings.command {
        let acquire = Duration::from_secs(10);
        let db = shared::db::pool(&settings.db.database_url, 2, acquire).context("DATABASE_URL")?;
        shared::db::migrate_bot(&db).await.context("migrating the bot database")?;
        let billing = shared::db::pool(settings.db.billing_url(), 2, acquire).context("BILLING_DATABASE_URL")?;
        shared::db::migrate_billing(&billing).await.context("migrating the billing database")?;
        tracing::info!("migrations applied");
        return Ok(());
    }
    App::build(settings).await?.run_until_stopped(shutdown).await
}

/// What `/readyz` says while the Bot API refuses the bot token.
const TOKEN_REFUSED: &str = "the Bot API refuses the bot token (401): check TELEGRAM_BOT_TOKEN";

/// How often a refused token is checked again with `getMe`, seconds.
const TOKEN_RECHECK: std::time::Duration = std::time::Duration::from_secs(30);

/// Checks the bot token with `getMe` at start (Bot API "getMe"), sets the
/// command menu once it is accepted, and while the token is refused (a 401
/// from any call: the worker is then not ready and takes no job) checks it
/// again every [`TOKEN_RECHECK`] until `shutdown`.
async fn watch_token(ctx: WorkerContext, shutdown: CancellationToken) {
    let accepted = ctx.telegram.token_accepted();
    let mut announced = false;
    loop {
        // Checked at start, and again while refused (a 401 from any call
        // clears the flag at once: readiness and claims follow it).
        if !announced || !accepted.load(std::sync::atomic::Ordering::Relaxed) {
            match ctx.telegram.get_me().await {
                Ok(me) if !announced => {
                    tracing::info!(username = ?me.username, "bot token accepted (getMe)");
                    announce_commands(&ctx).await;
                    announced = true;
                }
                Ok(_) => tracing::info!("bot token accepted again (getMe)"),
                Err(e) if !accepted.load(std::sync::atomic::Ordering::Relaxed) => {
                    tracing::error!(error.message = %e, "the Bot API refuses the bot token: not ready, taking no job");
                }
                Err(e) => tracing::warn!(error.message = %e, "getMe failed; checking again later"),
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(TOKEN_RECHECK) => {}
        }
    }
}

/// Sets the bot's command menu (`setMyCommands`, [`crate::notices::COMMAND_MENU`])
/// once at start, so users see the commands the bot answers. A failure is
/// logged and changes nothing else: the menu is a convenience.
async fn announce_commands(ctx: &WorkerContext) {
    let menu = crate::notices::COMMAND_MENU
        .iter()
        .map(|(command, description)| shared::telegram::BotCommand {
            command: (*command).to_owned(),
            description: (*description).to_owned(),
        })
        .collect();
    match ctx.telegram.set_my_commands(menu, None).await {
        Ok(()) => tracing::info!("command menu set"),
        Err(e) => tracing::warn!(error.message = %e, "setMyCommands failed; the command menu is unchanged"),
    }
}
