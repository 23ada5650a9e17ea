//! Ingress settings: flags or environment variables (DESIGN §8).

use shared::config::{BrokerArgs, LogArgs};
use shared::config_source::{self as source, SourceError};
use shared::secret::Secret;
use std::net::SocketAddr;

/// Shortest webhook secret accepted, characters (Telegram allows 1–256 of
/// `A-Z a-z 0-9 _ -`, Bot API `setWebhook`; a short one is guessable).
pub const MIN_WEBHOOK_SECRET_CHARS: usize = 16;

/// Flags that would carry a secret, refused (`ps` shows them), with the variable to use.
const SECRET_FLAGS: [(&str, &str); 2] =
    [("webhook-secret", "TELEGRAM_WEBHOOK_SECRET"), ("bot-token", "TELEGRAM_BOT_TOKEN")];

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
    /// Address of the public HTTP server (the webhook, `/healthz`, `/readyz`); port 0 picks one.
    #[arg(long, env = "INGRESS_BIND", default_value = "0.0.0.0:8080")]
    pub bind: SocketAddr,
    /// Address of the admin server (`/metrics`, `/healthz`, `/readyz`), kept
    /// off the public port; port 0 picks one.
    #[arg(long, env = "ADMIN_BIND", default_value = "127.0.0.1:9090")]
    pub admin_bind: SocketAddr,
    /// Value Telegram sends in X-Telegram-Bot-Api-Secret-Token (setWebhook
    /// secret_token): TELEGRAM_WEBHOOK_SECRET or TELEGRAM_WEBHOOK_SECRET_FILE
    /// only, never a flag (see [`Settings::load`]).
    #[arg(skip)]
    pub webhook_secret: Secret,
    /// Bot token (polling mode): TELEGRAM_BOT_TOKEN or TELEGRAM_BOT_TOKEN_FILE only.
    #[arg(skip)]
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
    /// Reads flags and environment, then the secrets from the environment or
    /// their `*_FILE` (a secret given as a flag is refused).
    ///
    /// # Errors
    /// A secret flag, or an unreadable or doubly set secret; clap's own
    /// errors (and `--help`) exit the process as `Parser::parse` does.
    pub fn load() -> Result<Self, SourceError> {
        Self::load_from(std::env::args_os().collect(), &source::ProcessEnv)
    }

    /// [`Settings::load`] with the arguments and environment given.
    ///
    /// # Errors
    /// As [`Settings::load`].
    pub fn load_from(args: Vec<std::ffi::OsString>, env: &impl source::Env) -> Result<Self, SourceError> {
        source::reject_flags(&args, &SECRET_FLAGS)?;
        let matches = <Self as clap::CommandFactory>::command().get_matches_from(args);
        let mut settings = <Self as clap::FromArgMatches>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        source::url(env, &matches, "amqp_url", "AMQP_URL", &mut settings.broker.amqp_url)?;
        settings.webhook_secret = source::secret(env, "TELEGRAM_WEBHOOK_SECRET")?.unwrap_or_default();
        settings.bot_token = source::secret(env, "TELEGRAM_BOT_TOKEN")?.unwrap_or_default();
        Ok(settings)
    }

    /// Checks settings that clap cannot: fails fast naming the bad setting.
    ///
    /// # Errors
    /// A message naming the setting.
    pub fn validate(&self) -> Result<(), String> {
        match self.mode {
            Mode::Webhook => {
                source::check("TELEGRAM_WEBHOOK_SECRET", &self.webhook_secret, MIN_WEBHOOK_SECRET_CHARS)
                    .map_err(|e| e.to_string())?;
                let allowed = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
                if !self.webhook_secret.expose().chars().all(allowed) || self.webhook_secret.expose().len() > 256 {
                    return Err("TELEGRAM_WEBHOOK_SECRET may hold only A-Z a-z 0-9 _ - and at most 256 characters \
                                (Bot API setWebhook secret_token)"
                        .into());
                }
            }
            Mode::Polling => source::check("TELEGRAM_BOT_TOKEN", &self.bot_token, 8).map_err(|e| e.to_string())?,
        }
        if self.max_body_bytes == 0 {
            return Err("INGRESS_MAX_BODY_BYTES must be positive".into());
        }
        Ok(())
    }
}
