//! Settings shared by every binary, read by clap from flags or environment
//! variables (DESIGN §8). Each binary flattens the groups it needs.

use crate::telemetry::LogFormat;

/// Broker settings.
#[derive(Clone, Debug, clap::Args)]
pub struct BrokerArgs {
    /// AMQP URL of RabbitMQ (may contain a password; never logged).
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f", hide_env_values = true)]
    pub amqp_url: String,
    /// Prefix of every exchange and queue name (isolates tests and demo runs).
    #[arg(long, env = "AMQP_PREFIX", default_value = "")]
    pub amqp_prefix: String,
}

/// Logging settings.
#[derive(Clone, Debug, clap::Args)]
pub struct LogArgs {
    /// Log format: auto (JSON unless on a terminal), json or pretty.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "auto")]
    pub log_format: LogFormat,
}

/// Database settings.
#[derive(Clone, Debug, clap::Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL of the bot database.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/fleet",
        hide_env_values = true
    )]
    pub database_url: String,
    /// PostgreSQL URL of the billing database (defaults to DATABASE_URL).
    #[arg(long, env = "BILLING_DATABASE_URL", hide_env_values = true)]
    pub billing_database_url: Option<String>,
    /// Largest number of pooled connections per database.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 10)]
    pub database_max_connections: u32,
}

impl DatabaseArgs {
    /// The billing database URL, falling back to the bot database.
    pub fn billing_url(&self) -> &str {
        self.billing_database_url.as_deref().unwrap_or(&self.database_url)
    }
}
