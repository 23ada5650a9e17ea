//! Billing-worker settings and subcommands.

use crate::finance_output::Format;
use shared::config::{BrokerArgs, LogArgs};
use shared::config_source::{self as source, SourceError};
use shared::secret::Secret;

/// Flags that would carry a secret, refused (`ps` shows them), with the variable to use.
const SECRET_FLAGS: [(&str, &str); 2] =
    [("bot-token", "TELEGRAM_BOT_TOKEN"), ("anthropic-admin-key", "ANTHROPIC_ADMIN_API_KEY")];

/// Everything the billing-worker needs.
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "billing-worker", about = "Applies billing events to the double-entry ledger exactly once.")]
pub struct Settings {
    /// What to do (default: consume billing events).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// PostgreSQL URL of the billing database.
    #[arg(
        long,
        env = "BILLING_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/fleet",
        hide_env_values = true
    )]
    pub billing_database_url: String,
    /// Largest number of pooled connections.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 10)]
    pub database_max_connections: u32,
    /// Bot token (refund-stars; notices of dead-lettered charges):
    /// TELEGRAM_BOT_TOKEN or TELEGRAM_BOT_TOKEN_FILE only, never a flag.
    /// Optional for `run` (without it users get no such notices).
    #[arg(skip)]
    pub bot_token: Secret,
    /// Anthropic Admin API key (`sk-ant-admin…`) with which `reconcile`
    /// fetches the provider's usage report (GET
    /// /v1/organizations/usage_report/messages); ANTHROPIC_ADMIN_API_KEY or
    /// ANTHROPIC_ADMIN_API_KEY_FILE only. When unset, the comparison is skipped.
    #[arg(skip)]
    pub anthropic_admin_key: Option<Secret>,
    /// Bot API base URL (for refund-stars).
    #[arg(long, env = "TELEGRAM_API_URL", default_value = "https://api.telegram.org")]
    pub telegram_api_url: String,
    /// Address of the admin server (`/healthz`, `/readyz`, `/metrics`); port 0 picks one.
    #[arg(long, env = "ADMIN_BIND", default_value = "127.0.0.1:9092")]
    pub admin_bind: std::net::SocketAddr,
    /// Backoff between ledger attempts, ms, one per retry step (5 steps);
    /// after the last step an event is dead-lettered.
    #[arg(
        long,
        env = "BILLING_RETRY_DELAYS_MS",
        value_delimiter = ',',
        default_value = "1000,5000,30000,120000,600000"
    )]
    pub retry_delays_ms: Vec<u64>,
    /// Unacknowledged deliveries (AMQP prefetch).
    #[arg(long, env = "BILLING_PREFETCH", default_value_t = 128)]
    pub prefetch: u16,
    /// Most billing events applied in one transaction (at most the prefetch;
    /// 1 turns batching off).
    #[arg(long, env = "BILLING_BATCH_SIZE", default_value_t = 128)]
    pub batch_size: usize,
    /// Broker settings.
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Log settings.
    #[command(flatten)]
    pub log: LogArgs,
}

/// Subcommands.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum Command {
    /// Consume billing events (the default).
    Run,
    /// Apply the billing migrations and exit.
    Migrate,
    /// Credit a user's account (payments → user), then print the balance.
    /// With an idempotency key used before: the same user and amount is
    /// "already granted" (exit 0); another amount or user is refused (exit
    /// 1, both grants named).
    Grant {
        /// Telegram user id.
        #[arg(long)]
        user: i64,
        /// Amount in USD, e.g. 5.00 (exact decimal).
        #[arg(long)]
        usd: String,
        /// Makes the grant idempotent: the same key grants once.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Refund a Telegram Stars payment (`refundStarPayment`) and book the
    /// correcting entry (user → payments). Safe to repeat.
    /// A payment recorded in the bot database's `payment_anomalies` (it
    /// credited nothing) is refunded without a ledger entry and marked refunded.
    RefundStars {
        /// `telegram_payment_charge_id` of the payment.
        #[arg(long)]
        charge: String,
        /// PostgreSQL URL of the bot database, to find a payment that
        /// credited nothing (`payment_anomalies`).
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        bot_database_url: Option<String>,
    },
    /// List the Stars payments that credited nothing (`payment_anomalies` of
    /// the bot database), oldest open first.
    PaymentAnomalies {
        /// PostgreSQL URL of the bot database (or DATABASE_URL_FILE); required.
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        bot_database_url: Option<String>,
    },
    /// Dead-lettered billing events: list them, or re-publish them after the cause is fixed.
    DeadLetters {
        /// What to do.
        #[command(subcommand)]
        action: DeadLetterAction,
    },
    /// Compare the outbox (what workers meant to charge) with the ledger (what
    /// was applied) and check the ledger's invariants; with
    /// ANTHROPIC_ADMIN_API_KEY set, also compare the tokens of every call
    /// (`api_calls`, beside the outbox's) with the provider's usage report
    /// (Usage and Cost API), per day, model and token class. Exit 1 on any
    /// variance, or when the report cannot be fetched.
    Reconcile {
        /// PostgreSQL URL of the bot database (the outbox and `api_calls`),
        /// or DATABASE_URL_FILE; required.
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        bot_database_url: Option<String>,
        /// First day (UTC), inclusive (default: 30 days ago).
        #[arg(long)]
        from: Option<chrono::NaiveDate>,
        /// Last day (UTC), inclusive (default: today).
        #[arg(long)]
        to: Option<chrono::NaiveDate>,
        /// Output: a table, CSV (a header and one row per day, model, class
        /// and unit; nothing else) or JSON (with totals, variance and `clean`).
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Base URL of the Anthropic API (for the usage report).
        #[arg(long, env = "ANTHROPIC_BASE_URL", default_value = "https://api.anthropic.com")]
        anthropic_base_url: String,
    },
    /// Show one charge's full trace for support: event, entries, job, request id.
    Explain {
        /// The event id.
        #[arg(long)]
        event: uuid::Uuid,
    },
    /// Refund one charge with a correcting entry (history is never edited).
    Refund {
        /// The event id of the charge.
        #[arg(long)]
        event: uuid::Uuid,
        /// Why (kept in the entry's memo).
        #[arg(long)]
        reason: String,
    },
    /// A user's statement: every ledger entry on their account in the
    /// period (event, job, model, tokens, amount, running balance) between
    /// the opening and the closing balance.
    Statement {
        /// Telegram user id.
        #[arg(long)]
        user: i64,
        /// First day (UTC), inclusive (default: the first entry; opening 0).
        #[arg(long)]
        from: Option<chrono::NaiveDate>,
        /// Last day (UTC), inclusive (default: the latest entry).
        #[arg(long)]
        to: Option<chrono::NaiveDate>,
        /// Output: a table, CSV (a header and one row per entry; nothing
        /// else) or JSON (with opening and closing balances).
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Print a user's balance in USD.
    Balance {
        /// Telegram user id.
        #[arg(long)]
        user: i64,
    },
}

/// `dead-letters` subcommands.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum DeadLetterAction {
    /// List pending dead letters by event id (the id `reconcile` reports):
    /// type, user, job, attempts, when, last error.
    List {
        /// Also those applied or discarded since (with a status column).
        #[arg(long)]
        all: bool,
        /// Output: table, csv or json.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Re-publish dead-lettered events to the billing exchange; idempotency
    /// makes repeating it safe. A discarded event is not redriven.
    Redrive {
        /// One event (its event id).
        #[arg(long, alias = "id", conflicts_with = "all")]
        event: Option<uuid::Uuid>,
        /// Every unresolved one.
        #[arg(long)]
        all: bool,
    },
    /// Resolve a pending dead letter without applying it, recording when
    /// and why (it is no longer listed as pending, nor redriven). An event
    /// already applied cannot be discarded: refund it instead.
    Discard {
        /// The event id.
        #[arg(long, alias = "event")]
        id: uuid::Uuid,
        /// Why (kept with the dead letter).
        #[arg(long)]
        reason: String,
    },
}

impl Settings {
    /// Reads flags and environment, then the secrets from the environment or
    /// their `*_FILE`, and the database and broker URLs from `*_FILE` when set
    /// (a secret, or a URL with a password, given as a flag is refused).
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
        let mut s = <Self as clap::FromArgMatches>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        source::url(env, &matches, "amqp_url", "AMQP_URL", &mut s.broker.amqp_url)?;
        source::url(env, &matches, "billing_database_url", "BILLING_DATABASE_URL", &mut s.billing_database_url)?;
        // Every subcommand that reads the bot database: DATABASE_URL_FILE
        // accepted, a password in the flag refused.
        if let (
            Some(
                Command::Reconcile { bot_database_url, .. }
                | Command::PaymentAnomalies { bot_database_url }
                | Command::RefundStars { bot_database_url, .. },
            ),
            Some((_, sub)),
        ) = (s.command.as_mut(), matches.subcommand())
        {
            let mut url = bot_database_url.take().unwrap_or_default();
            source::url(env, sub, "bot_database_url", "DATABASE_URL", &mut url)?;
            *bot_database_url = (!url.is_empty()).then_some(url);
        }
        s.bot_token = source::secret(env, "TELEGRAM_BOT_TOKEN")?.unwrap_or_default();
        s.anthropic_admin_key = source::secret(env, "ANTHROPIC_ADMIN_API_KEY")?.filter(|k| !k.is_empty());
        Ok(s)
    }

    /// Checks the secrets that are set: a placeholder is refused even where
    /// the secret is optional.
    ///
    /// # Errors
    /// A message naming the setting.
    pub fn validate(&self) -> Result<(), String> {
        if !self.bot_token.is_empty() {
            source::check("TELEGRAM_BOT_TOKEN", &self.bot_token, 8).map_err(|e| e.to_string())?;
        }
        if let Some(key) = &self.anthropic_admin_key {
            source::check("ANTHROPIC_ADMIN_API_KEY", key, 8).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}
