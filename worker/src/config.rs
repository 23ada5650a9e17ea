//! Worker settings: flags or environment variables (DESIGN §8).

use shared::config::{BrokerArgs, DatabaseArgs, LogArgs};
use shared::config_source::{self as source, SourceError};
use shared::secret::Secret;
use std::path::PathBuf;

/// Flags that would carry a secret, refused (`ps` shows them), with the variable to use.
const SECRET_FLAGS: [(&str, &str); 2] =
    [("bot-token", "TELEGRAM_BOT_TOKEN"), ("anthropic-api-key", "ANTHROPIC_API_KEY")];

/// Everything the worker needs.
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "worker",
    about = "Runs Claude jobs for Telegram updates under per-chat leases; relays the billing outbox."
)]
pub struct Settings {
    /// `migrate` applies the bot and billing migrations and exits.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Bot token: TELEGRAM_BOT_TOKEN or TELEGRAM_BOT_TOKEN_FILE only, never
    /// a flag (see [`Settings::load`]).
    #[arg(skip)]
    pub bot_token: Secret,
    /// Bot API base URL.
    #[arg(long, env = "TELEGRAM_API_URL", default_value = "https://api.telegram.org")]
    pub telegram_api_url: String,
    /// The bot's @username (without @); read with getMe when empty.
    #[arg(long, env = "TELEGRAM_BOT_USERNAME", default_value = "")]
    pub bot_username: String,
    /// Anthropic API key: ANTHROPIC_API_KEY or ANTHROPIC_API_KEY_FILE only.
    #[arg(skip)]
    pub anthropic_api_key: Secret,
    /// Messages API base URL.
    #[arg(long, env = "ANTHROPIC_BASE_URL", default_value = "https://api.anthropic.com")]
    pub anthropic_base_url: String,
    /// Model id sent to the Messages API.
    #[arg(long, env = "ANTHROPIC_MODEL", default_value = "claude-sonnet-4-5")]
    pub model: String,
    /// `max_tokens` of each Messages API call.
    #[arg(long, env = "ANTHROPIC_MAX_TOKENS", default_value_t = 1024)]
    pub max_tokens: u32,
    /// Smallest `max_tokens` a call is made with when the balance cannot
    /// cover `ANTHROPIC_MAX_TOKENS` (the call is then made with what the
    /// balance covers, down to this; below it the user is asked to top up).
    /// Capped at `ANTHROPIC_MAX_TOKENS`.
    #[arg(long, env = "MIN_MAX_TOKENS", default_value_t = 256)]
    pub min_max_tokens: u32,
    /// System prompt.
    #[arg(
        long,
        env = "SYSTEM_PROMPT",
        default_value = "You are a helpful assistant chatting on Telegram. Answer concisely."
    )]
    pub system_prompt: String,
    /// Price table (the format of fixtures/prices.toml).
    #[arg(long, env = "PRICES_FILE", default_value = "config/prices.toml")]
    pub prices_file: PathBuf,
    /// Lease length (visibility timeout) of a running job, seconds; heartbeats every third.
    #[arg(long, env = "VISIBILITY_TIMEOUT_S", default_value_t = 60)]
    pub visibility_timeout_s: u64,
    /// Overall deadline of one stream, seconds.
    #[arg(long, env = "STREAM_DEADLINE_S", default_value_t = 300)]
    pub stream_deadline_s: u64,
    /// Longest silence of a stream (no event at all, pings included), seconds.
    #[arg(long, env = "IDLE_TIMEOUT_S", default_value_t = 60)]
    pub idle_timeout_s: u64,
    /// Longest token-counting call (`count_tokens`, made for every answer cut
    /// short), seconds; on timeout the output the stream reported is billed,
    /// marked as estimated.
    #[arg(long, env = "COUNT_TOKENS_TIMEOUT_S", default_value_t = 10)]
    pub count_tokens_timeout_s: u64,
    /// Continuations after `max_tokens`.
    #[arg(long, env = "MAX_CONTINUATIONS", default_value_t = 2)]
    pub max_continuations: u32,
    /// Built-in tools offered to Claude (comma-separated; empty for none).
    #[arg(
        long,
        env = "TOOLS",
        value_delimiter = ',',
        default_value = "calculator,current_time,remember,recall,list_files,read_file"
    )]
    pub tools: Vec<String>,
    /// Largest document a user may send, bytes (at most 20 MiB, the Bot API's download limit).
    #[arg(long, env = "DOCUMENT_MAX_BYTES", default_value_t = 2 * 1024 * 1024)]
    pub document_max_bytes: u64,
    /// Longest download of one document, seconds.
    #[arg(long, env = "DOCUMENT_DOWNLOAD_TIMEOUT_S", default_value_t = 30)]
    pub document_download_timeout_s: u64,
    /// Most characters of text kept from one document (more is refused).
    #[arg(long, env = "DOCUMENT_MAX_CHARS", default_value_t = 500_000)]
    pub document_max_chars: u64,
    /// Most pages of one PDF (more is refused).
    #[arg(long, env = "DOCUMENT_MAX_PAGES", default_value_t = 500)]
    pub document_max_pages: u64,
    /// Most bytes a PDF's compressed streams may expand to, MiB (more is refused).
    #[arg(long, env = "DOCUMENT_MAX_DECOMPRESSED_MIB", default_value_t = 64)]
    pub document_max_decompressed_mib: u64,
    /// CPU time of one PDF extraction (the sandboxed child's RLIMIT_CPU), seconds.
    #[arg(long, env = "DOCUMENT_EXTRACT_CPU_S", default_value_t = 10)]
    pub document_extract_cpu_s: u64,
    /// Address space of one PDF extraction (the child's RLIMIT_AS), MiB.
    #[arg(long, env = "DOCUMENT_EXTRACT_MEMORY_MIB", default_value_t = 512)]
    pub document_extract_memory_mib: u64,
    /// Wall-clock limit of one PDF extraction, seconds; the child is killed when over.
    #[arg(long, env = "DOCUMENT_EXTRACT_TIMEOUT_S", default_value_t = 20)]
    pub document_extract_timeout_s: u64,
    /// Program run as the PDF sandbox (`<program> extract-document`); unset:
    /// this worker binary. Tests that run the worker in-process point it at
    /// the built `worker`.
    #[arg(long, env = "DOCUMENT_EXTRACTOR")]
    pub document_extractor: Option<PathBuf>,
    /// PDF extractions (sandbox children) running at once in one worker;
    /// more wait their turn (each child may use `DOCUMENT_EXTRACT_MEMORY_MIB`).
    #[arg(long, env = "DOCUMENT_EXTRACT_CONCURRENCY", default_value_t = 2)]
    pub document_extract_concurrency: u16,
    /// Most documents stored per user (a further one is refused).
    #[arg(long, env = "DOCUMENT_QUOTA_FILES", default_value_t = 50)]
    pub document_quota_files: u64,
    /// Most characters of document text stored per user, all documents together.
    #[arg(long, env = "DOCUMENT_QUOTA_CHARS", default_value_t = 2_000_000)]
    pub document_quota_chars: u64,
    /// Tool rounds (tool_use → tool_result) per answer before it is cut off.
    #[arg(long, env = "MAX_TOOL_ROUNDS", default_value_t = 5)]
    pub max_tool_rounds: u32,
    /// Tool calls run per round: further `tool_use` blocks of the same turn
    /// are answered with an error `tool_result` and not run.
    #[arg(long, env = "MAX_TOOL_CALLS_PER_ROUND", default_value_t = 8)]
    pub max_tool_calls_per_round: u32,
    /// Longest run of one tool call, seconds.
    #[arg(long, env = "TOOL_TIMEOUT_S", default_value_t = 15)]
    pub tool_timeout_s: u64,
    /// Offer Anthropic's server-side web search tool.
    #[arg(long, env = "WEB_SEARCH", default_value_t = false)]
    pub web_search: bool,
    /// Extended thinking budget in tokens (0 = off; must be below max_tokens).
    #[arg(long, env = "THINKING_BUDGET_TOKENS", default_value_t = 0)]
    pub thinking_budget_tokens: u32,
    /// Telegram Stars packs of `/buy`: `STARS:USD` pairs, comma-separated.
    #[arg(long, env = "STARS_PACKS", value_delimiter = ',', default_value = "100:1.00,500:5.50,2500:30.00")]
    pub stars_packs: Vec<String>,
    /// Attempts of a job before it fails with a notice.
    #[arg(long, env = "MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: i32,
    /// Unacknowledged deliveries per worker (AMQP prefetch) and concurrent jobs.
    #[arg(long, env = "PREFETCH", default_value_t = 16)]
    pub prefetch: u16,
    /// Interval between two Bot API calls to one private chat, ms (fleet-wide).
    #[arg(long, env = "PACE_PRIVATE_MS", default_value_t = 1000)]
    pub pace_private_ms: u64,
    /// Interval between two Bot API calls to one group, ms (fleet-wide; 20/min).
    #[arg(long, env = "PACE_GROUP_MS", default_value_t = 3000)]
    pub pace_group_ms: u64,
    /// Interval between any two Bot API calls of the bot, ms (fleet-wide; about 30/s).
    #[arg(long, env = "PACE_BOT_MS", default_value_t = 34)]
    pub pace_bot_ms: u64,
    /// Longest exchange of one Bot API call (file downloads excepted:
    /// `DOCUMENT_DOWNLOAD_TIMEOUT_S`), seconds; a timeout is retried like a 5xx.
    #[arg(long, env = "TELEGRAM_TIMEOUT_S", default_value_t = 10)]
    pub telegram_timeout_s: u64,
    /// How long one Bot API call is retried through 5xx answers, timeouts
    /// and connection failures (backoff with jitter) before it fails,
    /// seconds. An answer still undeliverable then is not charged.
    #[arg(long, env = "TELEGRAM_DELIVERY_DEADLINE_S", default_value_t = 30)]
    pub telegram_delivery_deadline_s: u64,
    /// Address of the admin server (`/healthz`, `/readyz`, `/metrics`); port 0 picks one.
    #[arg(long, env = "ADMIN_BIND", default_value = "127.0.0.1:9091")]
    pub admin_bind: std::net::SocketAddr,
    /// Id of this worker in leases (default: host-pid-random).
    #[arg(long, env = "WORKER_ID")]
    pub worker_id: Option<String>,
    /// Database settings.
    #[command(flatten)]
    pub db: DatabaseArgs,
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
    /// Apply the bot and billing migrations, then exit.
    Migrate,
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
        source::url(env, &matches, "database_url", "DATABASE_URL", &mut s.db.database_url)?;
        let mut billing = s.db.billing_database_url.clone().unwrap_or_default();
        source::url(env, &matches, "billing_database_url", "BILLING_DATABASE_URL", &mut billing)?;
        s.db.billing_database_url = Some(billing).filter(|url| !url.is_empty());
        s.bot_token = source::secret(env, "TELEGRAM_BOT_TOKEN")?.unwrap_or_default();
        s.anthropic_api_key = source::secret(env, "ANTHROPIC_API_KEY")?.unwrap_or_default();
        Ok(s)
    }

    /// Checks what clap cannot, naming the bad setting.
    ///
    /// # Errors
    /// A message naming the setting.
    pub fn validate(&self) -> Result<(), String> {
        source::check("TELEGRAM_BOT_TOKEN", &self.bot_token, 8).map_err(|e| e.to_string())?;
        source::check("ANTHROPIC_API_KEY", &self.anthropic_api_key, 8).map_err(|e| e.to_string())?;
        if self.visibility_timeout_s < 3 {
            return Err("VISIBILITY_TIMEOUT_S must be at least 3".into());
        }
        if self.idle_timeout_s == 0 || self.stream_deadline_s == 0 {
            return Err("IDLE_TIMEOUT_S and STREAM_DEADLINE_S must be positive".into());
        }
        if self.max_tokens == 0 {
            return Err("ANTHROPIC_MAX_TOKENS must be positive".into());
        }
        if self.min_max_tokens == 0 {
            return Err("MIN_MAX_TOKENS must be positive".into());
        }
        if self.max_tool_calls_per_round == 0 {
            return Err("MAX_TOOL_CALLS_PER_ROUND must be positive".into());
        }
        if self.max_attempts < 1 {
            return Err("MAX_ATTEMPTS must be at least 1".into());
        }
        if self.thinking_budget_tokens > 0
            && (self.thinking_budget_tokens < 1024 || self.thinking_budget_tokens >= self.max_tokens)
        {
            return Err("THINKING_BUDGET_TOKENS must be at least 1024 and below ANTHROPIC_MAX_TOKENS".into());
        }
        if self.tool_timeout_s == 0 {
            return Err("TOOL_TIMEOUT_S must be positive".into());
        }
        if self.telegram_timeout_s == 0 {
            return Err("TELEGRAM_TIMEOUT_S must be positive".into());
        }
        if self.document_max_bytes == 0 || self.document_max_bytes > shared::telegram::MAX_DOWNLOAD_BYTES {
            return Err("DOCUMENT_MAX_BYTES must be between 1 and 20971520 (the Bot API's download limit)".into());
        }
        if self.document_download_timeout_s == 0 {
            return Err("DOCUMENT_DOWNLOAD_TIMEOUT_S must be positive".into());
        }
        if [self.document_max_chars, self.document_max_pages, self.document_max_decompressed_mib].contains(&0)
            || [self.document_extract_cpu_s, self.document_extract_timeout_s, self.document_quota_files].contains(&0)
        {
            return Err(
                "DOCUMENT_MAX_CHARS, DOCUMENT_MAX_PAGES, DOCUMENT_MAX_DECOMPRESSED_MIB, DOCUMENT_EXTRACT_CPU_S, \
                        DOCUMENT_EXTRACT_TIMEOUT_S and DOCUMENT_QUOTA_FILES must be positive"
                    .into(),
            );
        }
        if self.document_extract_concurrency == 0 {
            return Err("DOCUMENT_EXTRACT_CONCURRENCY must be positive".into());
        }
        if self.document_extract_memory_mib < 64 {
            return Err("DOCUMENT_EXTRACT_MEMORY_MIB must be at least 64".into());
        }
        if self.prefetch == 0 {
            return Err("PREFETCH must be positive".into());
        }
        self.check_upper_bounds()
    }

    /// Upper bounds: every setting used in arithmetic (hold sizes and
    /// lifetimes, `setrlimit`, deadlines) stays far from overflow, and no
    /// limit is so large that it is no limit at all.
    fn check_upper_bounds(&self) -> Result<(), String> {
        let bounds: [(&str, u64, u64); 21] = [
            ("VISIBILITY_TIMEOUT_S", self.visibility_timeout_s, 3_600),
            ("STREAM_DEADLINE_S", self.stream_deadline_s, 3_600),
            ("IDLE_TIMEOUT_S", self.idle_timeout_s, 3_600),
            ("COUNT_TOKENS_TIMEOUT_S", self.count_tokens_timeout_s, 300),
            ("MAX_CONTINUATIONS", u64::from(self.max_continuations), 20),
            ("MAX_TOOL_ROUNDS", u64::from(self.max_tool_rounds), 50),
            ("MAX_TOOL_CALLS_PER_ROUND", u64::from(self.max_tool_calls_per_round), 64),
            ("MIN_MAX_TOKENS", u64::from(self.min_max_tokens), 1_000_000),
            ("MAX_ATTEMPTS", u64::try_from(self.max_attempts).unwrap_or(u64::MAX), 100),
            ("ANTHROPIC_MAX_TOKENS", u64::from(self.max_tokens), 1_000_000),
            ("TOOL_TIMEOUT_S", self.tool_timeout_s, 3_600),
            ("DOCUMENT_DOWNLOAD_TIMEOUT_S", self.document_download_timeout_s, 3_600),
            ("DOCUMENT_MAX_CHARS", self.document_max_chars, 100_000_000),
            ("DOCUMENT_MAX_PAGES", self.document_max_pages, 1_000_000),
            ("DOCUMENT_MAX_DECOMPRESSED_MIB", self.document_max_decompressed_mib, 16_384),
            ("DOCUMENT_EXTRACT_CPU_S", self.document_extract_cpu_s, 3_600),
            ("DOCUMENT_EXTRACT_MEMORY_MIB", self.document_extract_memory_mib, 65_536),
            ("DOCUMENT_EXTRACT_TIMEOUT_S", self.document_extract_timeout_s, 3_600),
            ("TELEGRAM_TIMEOUT_S", self.telegram_timeout_s, 600),
            ("TELEGRAM_DELIVERY_DEADLINE_S", self.telegram_delivery_deadline_s, 3_600),
            (
                "PACE_PRIVATE_MS, PACE_GROUP_MS or PACE_BOT_MS",
                self.pace_group_ms.max(self.pace_private_ms).max(self.pace_bot_ms),
                600_000,
            ),
        ];
        match bounds.iter().find(|(_, value, max)| value > max) {
            Some((name, value, max)) => Err(format!("{name} is {value}: at most {max}")),
            None => Ok(()),
        }
    }
}
