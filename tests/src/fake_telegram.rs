//! In-process fake of the Telegram Bot API (`POST {api_url}/bot{TOKEN}/{method}`):
//! keeps the messages the bot sent, serves pushed updates to `getUpdates`,
//! fails calls on purpose (faults) and records every call.
//!
//! # Layout
//! - [`FakeTelegram`]: the server and what tests read back ([`TgCall`],
//!   [`TgMessage`]); [`Fault`]: a scripted failure.
//! - `params` (private): request parameters (query, JSON or form body) and
//!   the Bot API's error answer.
//! - `text` (private): checks of text, `parse_mode` and `entities`.
//! - `server` (private): the HTTP handler: routing, faults, long polls,
//!   the call log, file downloads.
//! - `bot` (private): the bot's state and the methods that change it.
//!
//! Text sent with a `parse_mode` is kept and measured verbatim: the fake does
//! not parse HTML or Markdown.

mod bot;
mod params;
mod server;
#[cfg(test)]
mod tests;
mod text;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use self::bot::BotState;
use self::params::ApiError;

/// The user id of the fake bot, as `getMe` and the `from` of its messages say.
pub const BOT_USER_ID: i64 = bot::BOT_ID;

/// The largest request body accepted (the Bot API's upload limit).
const MAX_REQUEST_BYTES: usize = 50 * 1024 * 1024;

/// How long [`FakeTelegram::shutdown`] waits for open connections to close.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// One Bot API request the fake answered.
#[derive(Debug, Clone)]
pub struct TgCall {
    /// 0-based position among all calls over the fake's life.
    pub index: usize,
    /// When the request arrived.
    pub at: Instant,
    /// The bot token from the URL.
    pub token: String,
    /// The method, spelled as documented (`sendMessage`) when the fake knows
    /// it, else as requested.
    pub method: String,
    /// Query and body parameters merged into one JSON object (form values
    /// are strings); `Null` when the body could not be parsed.
    pub params: Value,
    /// The HTTP status answered: 200, or the error code (a fault's status).
    pub status: u16,
    /// The JSON body answered.
    pub response: Value,
}

/// A message the bot sent with `sendMessage`, as it is now.
#[derive(Debug, Clone, PartialEq)]
pub struct TgMessage {
    /// The chat it was sent to.
    pub chat_id: i64,
    /// Its id, counted per chat from 1.
    pub message_id: i64,
    /// Its current text (after edits).
    pub text: String,
    /// Its current `entities` array, or `Null`.
    pub entities: Value,
    /// The `parse_mode` of its last send or edit.
    pub parse_mode: Option<String>,
    /// Index of the `sendMessage` call that created it.
    pub sent_call: usize,
    /// How many successful edits (text or reply markup) it had.
    pub edits: usize,
    /// Whether `deleteMessage` removed it.
    pub deleted: bool,
}

/// A scripted failure: the `nth` call matching `methods` (counted from when
/// the fault was added) and the `times - 1` matching calls after it are
/// answered with this error and change nothing.
///
/// Deserializes from a scenario's `[[step.telegram_faults]]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Fault {
    /// Methods it applies to (case-insensitive); `"*"` matches any.
    pub methods: Vec<String>,
    /// 1-based position, among matching calls, of the first failing one.
    pub nth: usize,
    /// HTTP status and `error_code`.
    pub status: u16,
    /// Sent as `parameters.retry_after`.
    pub retry_after: Option<u64>,
    /// `description`; by default the Bot API's text for `status`.
    pub description: Option<String>,
    /// How many consecutive matching calls fail (at least 1).
    pub times: usize,
    /// The matching calls are never answered (the connection is held open
    /// until the client gives up: a timeout); `status` is then unused.
    pub stall: bool,
}

impl Default for Fault {
    /// A single `429` on the first call of any method.
    fn default() -> Self {
        Self {
            methods: vec!["*".to_owned()],
            nth: 1,
            status: 429,
            retry_after: None,
            description: None,
            times: 1,
            stall: false,
        }
    }
}

impl Fault {
    fn matches(&self, method: &str) -> bool {
        self.methods.iter().any(|m| m == "*" || m.eq_ignore_ascii_case(method))
    }

    fn to_error(&self) -> ApiError {
        let description = self.description.clone().unwrap_or_else(|| match self.status {
            429 => format!("Too Many Requests: retry after {}", self.retry_after.unwrap_or(1)),
            403 => "Forbidden: bot was blocked by the user".to_owned(),
            400 => "Bad Request".to_owned(),
            401 => "Unauthorized".to_owned(),
            409 => "Conflict".to_owned(),
            502 => "Bad Gateway".to_owned(),
            _ => "Internal Server Error".to_owned(),
        });
        ApiError { status: self.status, description, retry_after: self.retry_after }
    }
}

/// A running fake of the Telegram Bot API.
///
/// The server runs on a spawned task and stops when this value is dropped or
/// [`FakeTelegram::shutdown`] is called.
#[derive(Debug)]
pub struct FakeTelegram {
    /// State shared with the request handler.
    shared: Arc<Shared>,
    /// The address the listener is bound to (the real port when bound to 0).
    local_addr: SocketAddr,
    /// The server task, taken by `shutdown` to wait for it.
    server: Option<JoinHandle<()>>,
}

/// State shared between the handle and the server's handler.
#[derive(Debug)]
struct Shared {
    /// The bot; held only for short, non-async sections.
    bot: Mutex<BotState>,
    /// Bumped after every recorded call and pushed update, so waits and long
    /// polls are event-driven.
    changed: watch::Sender<u64>,
    /// Cancelled on shutdown: stops the server and ends long polls.
    shutdown: CancellationToken,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, BotState> {
        // A panic while holding the lock leaves nothing a test double must
        // protect: keep serving.
        self.bot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn notify(&self) {
        self.changed.send_modify(|version| *version = version.wrapping_add(1));
    }
}

impl FakeTelegram {
    /// Binds `bind` (port 0 picks a free port) and serves on a spawned task;
    /// `getMe` reports `bot_username`.
    ///
    /// # Errors
    /// Any I/O error binding the listener.
    pub async fn start(bind: SocketAddr, bot_username: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind(bind).await?;
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            bot: Mutex::new(BotState::new(bot_username)),
            changed: watch::channel(0).0,
            shutdown: CancellationToken::new(),
        });
        let app = Router::new()
            .route("/file/{*file_path}", get(server::download))
            .fallback(server::handle)
            .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
            .with_state(Arc::clone(&shared));
        let stop = shared.shutdown.clone();
        let server = tokio::spawn(async move {
            let served = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await;
            if let Err(error) = served {
                tracing::error!(error.message = %error, "fake Telegram server failed");
            }
        });
        tracing::debug!(%local_addr, "fake Telegram listening");
        Ok(Self { shared, local_addr, server: Some(server) })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `http://127.0.0.1:PORT` (the bound address, or loopback when bound to
    /// an unspecified address); clients call `{api_url}/bot{TOKEN}/{method}`.
    pub fn api_url(&self) -> String {
        let ip = match self.local_addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        format!("http://{}", SocketAddr::new(ip, self.local_addr.port()))
    }

    /// Adds a fault; its matching calls are counted from now.
    pub fn add_fault(&self, fault: Fault) {
        self.shared.lock().add_fault(fault);
    }

    /// Removes every fault.
    pub fn clear_faults(&self) {
        self.shared.lock().clear_faults();
    }

    /// Queues an update for `getUpdates` (given the next `update_id` when it
    /// has none) and wakes waiting long polls.
    pub fn push_update(&self, update: Value) {
        self.shared.lock().push_update(update);
        self.shared.notify();
    }

    /// Registers `bytes` as the file `file_id` (what `getFile` describes,
    /// with its `file_size`, and `GET /file/bot{TOKEN}/{file_path}` serves);
    /// gives its `file_path` (`documents/file_<n>`).
    pub fn add_file(&self, file_id: &str, bytes: impl Into<bytes::Bytes>) -> String {
        self.shared.lock().add_file(file_id, bytes.into())
    }

    /// Makes `getChatMember` answer `status` (`administrator`, `creator`,
    /// `member`, …) for `user_id` in `chat_id`; unset members are `member`.
    pub fn set_member_status(&self, chat_id: i64, user_id: i64, status: &str) {
        self.shared.lock().set_member_status(chat_id, user_id, status);
    }

    /// Every call so far, in the order answered.
    pub fn calls(&self) -> Vec<TgCall> {
        self.shared.lock().calls.clone()
    }

    /// Every message the bot sent, in send order, as it is now.
    pub fn messages(&self) -> Vec<TgMessage> {
        self.shared.lock().messages()
    }

    /// Waits until some call (earlier ones included) satisfies `pred`;
    /// `false` on timeout.
    pub async fn wait_for_call(&self, pred: impl Fn(&TgCall) -> bool, timeout: Duration) -> bool {
        // Subscribing before the first check means no call is missed.
        let mut changes = self.shared.changed.subscribe();
        let wait = async {
            loop {
                let found = self.shared.lock().calls.iter().any(&pred);
                if found {
                    return true;
                }
                if changes.changed().await.is_err() {
                    return false;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.unwrap_or(false)
    }

    /// Stops the server, ends long polls and waits (up to 5 s) for the server
    /// task to finish.
    pub async fn shutdown(mut self) {
        self.shared.shutdown.cancel();
        if let Some(server) = self.server.take() {
            if tokio::time::timeout(SHUTDOWN_GRACE, server).await.is_err() {
                tracing::warn!("fake Telegram did not stop within the grace period");
            }
        }
    }
}

impl Drop for FakeTelegram {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}
