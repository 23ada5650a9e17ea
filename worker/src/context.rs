//! [`WorkerContext`]: the shared handles every step uses, instead of long
//! argument lists.

use crate::config::Settings;
use shared::amqp::{ConfirmPublisher, Topology};
use shared::anthropic::AnthropicClient;
use shared::pricing::PriceTable;
use shared::telegram::BotApi;
use sqlx::PgPool;
use std::sync::Arc;
use tokio::sync::{Notify, OnceCell};

/// Shared state of one worker process; cheap to clone.
#[derive(Clone)]
pub struct WorkerContext {
    /// Bot database: jobs, conversations, outbox.
    pub db: PgPool,
    /// Billing database, used only through the `billing` crate (holds, balances, statements): it owns the tables.
    pub billing_db: PgPool,
    /// Messages API client.
    pub anthropic: AnthropicClient,
    /// Bot API client.
    pub telegram: BotApi,
    /// Prices by model and tool.
    pub prices: Arc<PriceTable>,
    /// Settings.
    pub settings: Arc<Settings>,
    /// Publisher for delay queues and the outbox relay.
    pub publisher: Arc<ConfirmPublisher>,
    /// Queue names.
    pub topology: Topology,
    /// This worker's lease owner id.
    pub worker_id: Arc<str>,
    /// Wakes the outbox relay after a commit that wrote events.
    pub outbox_notify: Arc<Notify>,
    /// Stars packs offered by `/buy`.
    pub packs: Arc<Vec<crate::payments::Pack>>,
    /// The fleet-wide pacer of Bot API calls.
    pub pacer: crate::telegram::pacer::Pacer,
    /// Tools offered to Claude.
    pub tools: Arc<crate::tools::Registry>,
    /// Slots of concurrently running jobs (`PREFETCH`).
    pub job_slots: Arc<tokio::sync::Semaphore>,
    /// True while the updates consumer is connected and consuming (readiness).
    pub consuming: Arc<std::sync::atomic::AtomicBool>,
    /// True while the intake shard consumer is connected and consuming (readiness).
    pub intake_consuming: Arc<std::sync::atomic::AtomicBool>,
    /// Jobs running in this process, by chat (for `/stop`).
    pub running: crate::cancel::RunningJobs,
    /// The program run as the PDF sandbox (`<it> extract-document`): this
    /// worker binary (tests may point it elsewhere).
    pub extractor: std::path::PathBuf,
    /// Permits for sandbox children (`DOCUMENT_EXTRACT_CONCURRENCY`).
    pub extract_slots: Arc<tokio::sync::Semaphore>,
    /// The bot's @username, from settings or getMe (read when first needed).
    bot_username: Arc<OnceCell<String>>,
}

impl WorkerContext {
    /// Assembles a context.
    #[expect(
        clippy::too_many_arguments,
        reason = "each shared client and pool is built once in startup and passed here"
    )]
    pub fn new(
        db: PgPool,
        billing_db: PgPool,
        anthropic: AnthropicClient,
        telegram: BotApi,
        prices: PriceTable,
        settings: Settings,
        publisher: ConfirmPublisher,
        worker_id: String,
        tools: crate::tools::Registry,
        packs: Vec<crate::payments::Pack>,
    ) -> Self {
        let topology = Topology::new(settings.broker.amqp_prefix.clone());
        let username = Arc::new(OnceCell::new());
        if !settings.bot_username.is_empty() {
            let _ = username.set(settings.bot_username.trim_start_matches('@').to_owned());
        }
        let pacer = crate::telegram::pacer::Pacer::new(
            db.clone(),
            std::time::Duration::from_millis(settings.pace_private_ms),
            std::time::Duration::from_millis(settings.pace_group_ms),
            std::time::Duration::from_millis(settings.pace_bot_ms),
        )
        .with_delivery_deadline(std::time::Duration::from_secs(settings.telegram_delivery_deadline_s));
        // Without its own path the worker cannot sandbox PDFs: every PDF is
        // then refused with "the PDF reader could not be started".
        let extractor = settings
            .document_extractor
            .clone()
            .or_else(|| std::env::current_exe().ok())
            .unwrap_or_else(|| std::path::PathBuf::from("worker"));
        let settings_extract_slots = settings.document_extract_concurrency;
        let job_slots = Arc::new(tokio::sync::Semaphore::new(usize::from(settings.prefetch)));
        Self {
            db,
            billing_db,
            anthropic,
            telegram,
            prices: Arc::new(prices),
            settings: Arc::new(settings),
            publisher: Arc::new(publisher),
            topology,
            worker_id: worker_id.into(),
            outbox_notify: Arc::new(Notify::new()),
            running: crate::cancel::RunningJobs::default(),
            consuming: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            intake_consuming: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            job_slots,
            pacer,
            packs: Arc::new(packs),
            tools: Arc::new(tools),
            extractor,
            extract_slots: Arc::new(tokio::sync::Semaphore::new(usize::from(settings_extract_slots))),
            bot_username: username,
        }
    }

    /// The bot's username, asking getMe once if it was not configured.
    ///
    /// # Errors
    /// The Bot API error when getMe fails (the caller retries the update later).
    pub async fn bot_username(&self) -> Result<&str, shared::telegram::TelegramError> {
        let name = self
            .bot_username
            .get_or_try_init(|| async {
                let me = self.telegram.get_me().await?;
                Ok::<_, shared::telegram::TelegramError>(me.username.unwrap_or_default())
            })
            .await?;
        Ok(name.as_str())
    }
}
