//! In-process fake of the Anthropic Messages API: replays scripted SSE bodies
//! to `POST /v1/messages` (`"stream": true`) and records every call; and of
//! the Admin API's usage report (`GET /v1/organizations/usage_report/messages`,
//! docs: "Usage and Cost API"), computed from the calls it actually served.
//!
//! # Layout
//! - [`ScriptedResponse`]: what one call is answered with (an SSE file to
//!   replay, pacing, a stall, or an HTTP error).
//! - [`FakeAnthropic`]: the server, its FIFO queue of scripted responses and
//!   the log of [`RecordedCall`]s.
//! - `handlers` (private): the HTTP endpoints and Anthropic's error body.
//! - `replay` (private): splitting an SSE body into events and the paced
//!   stream that sends them, notes the usage they carry and notices when the
//!   client goes away.
//! - `usage_report` (private): the usage report endpoint: hourly (or daily,
//!   or per-minute) buckets by model of the served usage, plus the rows a
//!   test adds with [`FakeAnthropic::add_report_usage`].

mod handlers;
mod replay;
#[cfg(test)]
mod tests;
mod usage_report;

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use chrono::{DateTime, Utc};
use serde_json::Value;
use shared::anthropic::UsageReport;
use shared::pricing::TokenCounts;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The largest request body accepted, as documented for the real API (32 MB).
const MAX_REQUEST_BYTES: usize = 32 * 1024 * 1024;

/// How long [`FakeAnthropic::shutdown`] waits for open connections to close.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What the fake answers to one `POST /v1/messages`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScriptedResponse {
    /// Raw SSE body (a fixture file's bytes) replayed event by event. `None`
    /// with no `http_status` answers an empty `200` stream.
    pub sse: Option<Bytes>,
    /// Pause before each event, in milliseconds (an event is the text up to
    /// and including a blank line).
    pub event_delay_ms: u64,
    /// Extra pause before the first event, in milliseconds (time to first
    /// token on top of `event_delay_ms`).
    pub first_event_delay_ms: u64,
    /// Send this many events, then nothing while keeping the connection open
    /// until the client disconnects or the fake shuts down.
    pub stall_after_events: Option<usize>,
    /// Answer with this HTTP status and an Anthropic error body instead of a
    /// stream.
    pub http_status: Option<u16>,
    /// Sent as the `retry-after` header (seconds) along with `http_status`.
    pub retry_after_s: Option<u64>,
}

impl ScriptedResponse {
    /// A response replaying the SSE file at `path`, with no delay or stall.
    ///
    /// # Errors
    /// Any I/O error reading the file.
    pub fn from_file(path: impl AsRef<Path>) -> std::io::Result<Self> {
        Ok(Self::from_sse(std::fs::read(path)?))
    }

    /// A response replaying `sse` (raw SSE body bytes), with no delay or stall.
    pub fn from_sse(sse: impl Into<Bytes>) -> Self {
        Self { sse: Some(sse.into()), ..Self::default() }
    }

    /// A response that is an HTTP error with Anthropic's error body, and a
    /// `retry-after` header when `retry_after_s` is given.
    pub fn http_error(status: u16, retry_after_s: Option<u64>) -> Self {
        Self { http_status: Some(status), retry_after_s, ..Self::default() }
    }
}

/// One request the fake received on `POST /v1/messages`.
#[derive(Debug, Clone)]
pub struct RecordedCall {
    /// 0-based position among all message calls over the fake's life.
    pub index: usize,
    /// The `request-id` header answered (what the client records).
    pub request_id: String,
    /// When the request arrived.
    pub received_at: Instant,
    /// When the request arrived, UTC wall clock: the usage report buckets
    /// the call's usage by it.
    pub received_utc: DateTime<Utc>,
    /// The request's JSON body (`Null` when it was not JSON).
    pub body: Value,
    /// Whether a non-empty `x-api-key` header was sent.
    pub api_key_present: bool,
    /// The `anthropic-version` header, if sent.
    pub anthropic_version: Option<String>,
    /// The HTTP status answered.
    pub status: u16,
    /// How many SSE events were handed to the connection.
    pub events_sent: usize,
    /// When the response finished or the client dropped the connection;
    /// `None` while a stream is still open.
    pub ended_at: Option<Instant>,
    /// Whether the whole scripted response was sent: every SSE event, or the
    /// complete error body of an HTTP error.
    pub completed: bool,
    /// Model id of the `message_start` event sent, if one was sent.
    pub model: Option<String>,
    /// Usage (tokens) of the events sent so far, accumulated as the client
    /// does (`shared::anthropic::MessageState`: `message_start`'s usage,
    /// overlaid by each `message_delta`'s). `None` until a `message_start`
    /// was sent, and for HTTP errors: nothing was served. What the usage
    /// report counts for this call.
    pub usage: Option<UsageReport>,
}

/// A row of usage the usage report adds to the calls the fake served (see
/// [`FakeAnthropic::add_report_usage`]), or one served call's usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportUsage {
    /// Model id, as the report's `model` (grouped by `group_by[]=model`).
    pub model: String,
    /// When the usage happened (UTC); its bucket is the one containing it.
    pub at: DateTime<Utc>,
    /// Tokens by price class.
    pub tokens: TokenCounts,
}

/// A running fake of the Anthropic Messages API.
///
/// The server runs on a spawned task and stops when this value is dropped or
/// [`FakeAnthropic::shutdown`] is called; open streams (stalled ones too) end
/// at that moment.
#[derive(Debug)]
pub struct FakeAnthropic {
    /// State shared with the request handlers.
    shared: Arc<Shared>,
    /// The address the listener is bound to (the real port when bound to 0).
    local_addr: SocketAddr,
    /// The server task, taken by `shutdown` to wait for it.
    server: Option<JoinHandle<()>>,
}

/// State shared between the handle and the server's handlers.
#[derive(Debug)]
struct Shared {
    /// Script and call log; held only for short, non-async sections.
    script: Mutex<Script>,
    /// Bumped after every change to the call logs, so waits are event-driven.
    changed: watch::Sender<u64>,
    /// Cancelled on shutdown: stops the server and ends open streams.
    shutdown: CancellationToken,
}

/// The mutable part of the fake.
#[derive(Debug, Default)]
struct Script {
    /// Scripted responses, popped one per message call.
    queue: VecDeque<ScriptedResponse>,
    /// Used when `queue` is empty.
    default: Option<ScriptedResponse>,
    /// What `count_tokens` answers.
    count_tokens: u64,
    /// `count_tokens` records the call and never answers (a stalled endpoint).
    count_tokens_stalled: bool,
    /// Every message call, in arrival order.
    calls: Vec<RecordedCall>,
    /// Bodies of the token-counting calls, in arrival order.
    count_tokens_calls: Vec<Value>,
    /// Usage rows added by tests to the usage report, beyond the served calls.
    extra_report_usage: Vec<ReportUsage>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Script> {
        // A panic while holding the lock cannot leave the script half-updated
        // in a way that matters to a test double: keep serving.
        self.script.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies `change` to the call at `index` and wakes the waiters.
    fn update_call(&self, index: usize, change: impl FnOnce(&mut RecordedCall)) {
        if let Some(call) = self.lock().calls.get_mut(index) {
            change(call);
        }
        self.notify();
    }

    fn notify(&self) {
        self.changed.send_modify(|version| *version = version.wrapping_add(1));
    }

    /// Everything the usage report counts: each served call's usage at the
    /// time it was received, then the rows added by tests.
    fn report_usage(&self) -> Vec<ReportUsage> {
        let script = self.lock();
        let served = script.calls.iter().filter_map(|call| {
            let usage = call.usage.as_ref()?;
            let model = call
                .model
                .clone()
                .or_else(|| call.body.get("model").and_then(Value::as_str).map(str::to_owned))
                .unwrap_or_default();
            Some(ReportUsage { model, at: call.received_utc, tokens: usage.token_counts() })
        });
        served.chain(script.extra_report_usage.iter().cloned()).collect()
    }
}

impl FakeAnthropic {
    /// Binds `bind` (port 0 picks a free port) and serves on a spawned task.
    ///
    /// # Errors
    /// Any I/O error binding the listener.
    pub async fn start(bind: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(bind).await?;
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            script: Mutex::new(Script::default()),
            changed: watch::channel(0).0,
            shutdown: CancellationToken::new(),
        });
        let app = Router::new()
            .route("/v1/messages", post(handlers::messages))
            .route("/v1/messages/count_tokens", post(handlers::count_tokens))
            .route("/v1/organizations/usage_report/messages", get(usage_report::messages_usage_report))
            .fallback(handlers::not_found)
            .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
            .with_state(Arc::clone(&shared));
        let stop = shared.shutdown.clone();
        let server = tokio::spawn(async move {
            let served = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await;
            if let Err(error) = served {
                tracing::error!(error.message = %error, "fake Anthropic server failed");
            }
        });
        tracing::debug!(%local_addr, "fake Anthropic listening");
        Ok(Self { shared, local_addr, server: Some(server) })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `http://127.0.0.1:PORT` (the bound address, or loopback when bound to
    /// an unspecified address); clients call `{base_url}/v1/messages`.
    pub fn base_url(&self) -> String {
        format!("http://{}", connectable(self.local_addr))
    }

    /// Appends responses to the FIFO queue; each message call pops one.
    pub fn push(&self, responses: impl IntoIterator<Item = ScriptedResponse>) {
        self.shared.lock().queue.extend(responses);
    }

    /// Sets the response used when the queue is empty. With none, an empty
    /// queue answers `500 api_error "no scripted response"`.
    pub fn set_default(&self, response: Option<ScriptedResponse>) {
        self.shared.lock().default = response;
    }

    /// Sets what `POST /v1/messages/count_tokens` answers as `input_tokens`.
    pub fn set_count_tokens(&self, input_tokens: u64) {
        self.shared.lock().count_tokens = input_tokens;
    }

    /// Makes `POST /v1/messages/count_tokens` record each call and then never
    /// answer (the connection stays open), or answer again.
    pub fn set_count_tokens_stalled(&self, stalled: bool) {
        self.shared.lock().count_tokens_stalled = stalled;
    }

    /// Every message call so far, in arrival order.
    pub fn calls(&self) -> Vec<RecordedCall> {
        self.shared.lock().calls.clone()
    }

    /// How many message calls have arrived.
    pub fn call_count(&self) -> usize {
        self.shared.lock().calls.len()
    }

    /// Bodies of the token-counting calls so far, in arrival order.
    pub fn count_tokens_calls(&self) -> Vec<Value> {
        self.shared.lock().count_tokens_calls.clone()
    }

    /// Adds a row to the usage report (`GET
    /// /v1/organizations/usage_report/messages`) beside the calls actually
    /// served: `tokens` of `model` at `at` (UTC), as if the provider had
    /// served a call we never recorded.
    pub fn add_report_usage(&self, model: &str, at: DateTime<Utc>, tokens: TokenCounts) {
        self.shared.lock().extra_report_usage.push(ReportUsage { model: model.to_owned(), at, tokens });
    }

    /// Everything the usage report counts so far: the usage of each served
    /// call (at the time it was received), then the rows added with
    /// [`FakeAnthropic::add_report_usage`].
    pub fn report_usage(&self) -> Vec<ReportUsage> {
        self.shared.report_usage()
    }

    /// Waits until at least `n` message calls have arrived; `false` on timeout.
    pub async fn wait_for_calls(&self, n: usize, timeout: Duration) -> bool {
        self.wait_for(|calls| calls.len() >= n, timeout).await
    }

    /// Waits until `pred` holds over the calls so far (re-checked after every
    /// change: a new call, an event sent, a stream ended); `false` on timeout.
    pub async fn wait_for(&self, pred: impl Fn(&[RecordedCall]) -> bool, timeout: Duration) -> bool {
        // Subscribing before the first check means no change is missed.
        let mut changes = self.shared.changed.subscribe();
        let wait = async {
            loop {
                let done = pred(&self.shared.lock().calls);
                if done {
                    return true;
                }
                if changes.changed().await.is_err() {
                    return false;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.unwrap_or(false)
    }

    /// Stops the server, ends open streams and waits (up to 5 s) for the
    /// server task to finish.
    pub async fn shutdown(mut self) {
        self.shared.shutdown.cancel();
        if let Some(server) = self.server.take() {
            if tokio::time::timeout(SHUTDOWN_GRACE, server).await.is_err() {
                tracing::warn!("fake Anthropic did not stop within the grace period");
            }
        }
    }
}

impl Drop for FakeAnthropic {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

/// The address a client on this machine should connect to for `addr`.
fn connectable(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}
