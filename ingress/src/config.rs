//! Ingress settings: flags or environment variables (DESIGN §8).

use shared::config::{BrokerArgs, LogArgs};
use shared::secret::Secret;
use std::net::SocketAddr;

/// How updates arrive from Telegram.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Telegram posts updates to `POST /telegram/webhook`.
    Webhook,
    /// We call `getUpdates` (hosts without a public URL).
    Polling,
}

/// Everything the ingress needs.
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "ingress", about = "Telegram updates in, RabbitMQ messages out (publisher confirms).")]
pub struct Settings {
    /// webhook or polling.
    #[arg(long, env = "INGRESS_MODE", value_enum, default_value = "webhook")]
    pub mode: Mode,
    /// Address of the HTTP server (webhook, /healthz, /readyz); port 0 picks one.
    #[arg(long, env = "INGRESS_BIND", default_value = "0.0.0.0:8080")]
    pub bind: SocketAddr,
    /// Value Telegram sends in X-Telegram-Bot-Api-Secret-Token (setWebhook secret_token).
    #[arg(long, env = "TELEGRAM_WEBHOOK_SECRET", default_value = "", hide_env_values = true)]
    pub webhook_secret: Secret,
    /// Bot token (polling mode).
    #[arg(long, env = "TELEGRAM_BOT_TOKEN", default_value = "", hide_env_values = true)]
    pub bot_token: Secret,
    /// Bot API base URL.
    #[arg(long, env = "TELEGRAM_API_URL", default_value = "https://api.telegram.org")]
    pub telegram_api_url: String,
    /// Largest accepted webhook body, bytes (larger → 413).
    #[arg(long, env = "INGRESS_MAX_BODY_BYTES", default_value_t = 1_048_576)]
    pub max_body_bytes: usize,
    /// Seconds to wait for the broker's confirm before answering 503.
    #[arg(long, env = "INGRESS_CONFIRM_TIMEOUT_S", default_value_t = 5)]
    pub confirm_timeout_s: u64,
    /// getUpdates long-poll timeout, seconds.
    #[arg(long, env = "INGRESS_POLL_TIMEOUT_S", default_value_t = 25)]
    pub poll_timeout_s: u32,
    /// Broker settings.
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Log settings.
    #[command(flatten)]
    pub log: LogArgs,
}

impl Settings {
    /// Checks settings that clap cannot: fails fast naming the bad setting.
    ///
    /// # Errors
    /// A message naming the setting.
    pub fn validate(&self) -> Result<(), String> {
        match self.mode {
            Mode::Webhook if self.webhook_secret.expose().len() < 8 => {
                Err("TELEGRAM_WEBHOOK_SECRET must be set (at least 8 characters) in webhook mode".into())
            }
            Mode::Polling if self.bot_token.is_empty() => Err("TELEGRAM_BOT_TOKEN must be set in polling mode".into()),
            _ if self.max_body_bytes == 0 => Err("INGRESS_MAX_BODY_BYTES must be positive".into()),
            _ => Ok(()),
        }
    }
}
