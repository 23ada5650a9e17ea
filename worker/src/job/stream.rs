//! `stream_reply`: one Messages API call, streamed, under the job's
//! cancellation token, an overall deadline and an idle timeout (P5, P6).
//! Cancellation is raced against every await, so `/stop` or a lost lease
//! takes effect inside an event, not only between events.

use crate::context::WorkerContext;
use crate::store::calls::OpenedCall;
use crate::store::jobs::ClaimedJob;
use crate::telegram::progress::Progress;
use futures_util::StreamExt;
use serde_json::Value;
use shared::anthropic::state::Applied;
use shared::anthropic::{ApiError, MessageState};
use shared::pricing::TokenCounts;
use shared::retry::Policy;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How one call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallEnd {
    /// `message_stop` arrived.
    Complete,
    /// The job was cancelled (`/stop`, lost lease, shutdown).
    Cancelled,
    /// No event at all for the idle timeout.
    IdleTimeout,
    /// The overall stream deadline passed.
    Deadline,
    /// An HTTP error (after retries), a transport error, or an `error` event.
    Failed(String),
}

/// One Messages API call and its result.
#[derive(Debug, Clone)]
pub struct CallRecord {
    /// 1-based number of the call in the job.
    pub seq: i32,
    /// Everything the stream said.
    pub state: MessageState,
    /// Anthropic's `request-id`.
    pub request_id: Option<String>,
    /// How it ended.
    pub end: CallEnd,
    /// The request that was sent (for counting tokens of a cut-short answer).
    pub request: Value,
    /// The call failed on the provider's side after its stream opened, in a
    /// way another try may not repeat: a restartable `error` event, a
    /// transport error, or a stream that ended without `message_stop`
    /// (connection closed or clean EOF). [`stream_reply`] retries it.
    pub retryable: bool,
    /// Seconds the Messages API asked to wait (`retry-after` of a 429 or
    /// 529) when that wait would have passed the stream deadline and the
    /// call gave up instead: the user is told the wait.
    pub retry_after_s: Option<u64>,
}

/// Longest wait for a call's `open` row: the stream is not held up longer
/// by a slow database (the call is then recorded at its end only).
const OPEN_ROW_TIMEOUT: Duration = Duration::from_secs(2);

/// Error types of an `error` event worth retrying the call for (API docs, "Errors").
fn restartable(kind: &str) -> bool {
    matches!(kind, "overloaded_error" | "api_error" | "rate_limit_error")
}

/// Streams one logical call. A call that fails on the provider's side once
/// its stream has opened ([`CallRecord::retryable`]: a restartable `error`
/// event such as `overloaded_error`, a transport error, a stream that ends
/// without `message_stop`) is retried with backoff, its partial text
/// dropped from the progress display, as long as the retry can start before
/// the call's stream deadline (one deadline for every try of the call, P5)
/// and the job is not cancelled. Every try is appended to `calls` (failed
/// ones are recorded, not charged: DESIGN §6); the last one is returned.
/// `shown_before` is the text of earlier calls of the job (continuations),
/// so progress shows the whole answer.
/// Each try is recorded `open` under `lease` before its request leaves and
/// again at its `message_start` (see [`open_row`]); a try that got no
/// stream is closed as not served ([`close_unserved`]).
/// Calls are numbered after `seq_after` (the last call of the job's stored
/// rounds, 0 without) and those in `calls`.
#[expect(clippy::too_many_arguments, reason = "one call's whole context; each is a different borrow")]
pub async fn stream_reply(
    ctx: &WorkerContext,
    lease: &ClaimedJob,
    request: &Value,
    seq_after: i32,
    calls: &mut Vec<CallRecord>,
    cancel: &CancellationToken,
    progress: &Progress,
    shown_before: &str,
) -> CallRecord {
    let mut backoff = Policy::AnthropicRestart.backoff();
    let deadline = Instant::now() + Duration::from_secs(ctx.settings.stream_deadline_s);
    loop {
        let seq = seq_after.saturating_add(i32::try_from(calls.len() + 1).unwrap_or(i32::MAX));
        let record = stream_once(ctx, lease, request, seq, cancel, progress, shown_before, deadline).await;
        if !record.state.started {
            close_unserved(ctx, lease, seq).await;
        }
        let end = match &record.end {
            CallEnd::Complete => "complete",
            CallEnd::Cancelled => "cancelled",
            CallEnd::IdleTimeout => "idle_timeout",
            CallEnd::Deadline => "deadline",
            CallEnd::Failed(_) => "failed",
        };
        metrics::counter!("fleet_claude_calls_total", "end" => end).increment(1);
        if let Some(e) = &record.state.error {
            let kind = if restartable(&e.kind) || e.kind == "invalid_request_error" {
                e.kind.clone()
            } else {
                "other".to_owned()
            };
            metrics::counter!("fleet_claude_errors_total", "type" => kind).increment(1);
        } else if record.retryable {
            metrics::counter!("fleet_claude_errors_total", "type" => "stream_broken").increment(1);
        }
        calls.push(record.clone());
        if !record.retryable {
            return record;
        }
        let Some(wait) = backoff.next() else {
            return record;
        };
        let reason = match &record.end {
            CallEnd::Failed(reason) => reason.as_str(),
            _ => "",
        };
        if Instant::now() + wait >= deadline {
            tracing::warn!(
                reason,
                "the call failed on the provider's side and a retry would pass the stream deadline; giving up"
            );
            return record;
        }
        tracing::warn!(
            reason,
            wait_ms = wait.as_millis() as u64,
            "the call failed on the provider's side; retrying it without its partial output"
        );
        progress.update(shown_before.to_owned());
        tokio::select! {
            _ = cancel.cancelled() => return record,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Records the call `open`, fenced by the lease, so that a worker dying
/// before `finalize` commits leaves it on the books: a later attempt or the
/// reaper books it (`finalize::book_orphaned_calls`). Written twice:
/// before the HTTP request leaves (`started` false: the model asked, the
/// input as its upper bound from the request's size,
/// [`crate::holds::input_token_bound`], and the request's limits), so that
/// a worker killed after the request reached the provider but before it
/// read `message_start` still leaves a row; then at `message_start` with
/// the request id, message id, model and reported input usage.
/// Best effort, bounded by [`OPEN_ROW_TIMEOUT`]: a failure is logged and
/// counted, and the call is still recorded by its own attempt at its end.
async fn open_row(ctx: &WorkerContext, lease: &ClaimedJob, request: &Value, record: &CallRecord) {
    let started = record.state.started;
    let tokens = if started {
        record.state.usage.token_counts()
    } else {
        TokenCounts { input: crate::holds::input_token_bound(request), ..TokenCounts::default() }
    };
    let model = record
        .state
        .model
        .clone()
        .or_else(|| request.get("model").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| ctx.settings.model.clone());
    let call = OpenedCall {
        seq: record.seq,
        request_id: record.request_id.as_deref(),
        anthropic_message_id: record.state.message_id.as_deref(),
        model: &model,
        tokens: &tokens,
        started,
        max_tokens: request.get("max_tokens").and_then(Value::as_u64),
        max_web_searches: max_web_searches(request),
    };
    let outcome = match tokio::time::timeout(OPEN_ROW_TIMEOUT, lease.open_call(&ctx.db, &call)).await {
        Ok(Ok(_)) => return,
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer within {OPEN_ROW_TIMEOUT:?}"),
    };
    metrics::counter!("fleet_open_call_failures_total").increment(1);
    tracing::warn!(error.message = %outcome, seq = record.seq, started, "could not record the call as open; it is recorded at its end only");
}

/// Closes the `open` row of a call whose request got no stream
/// (`message_start` never read: an HTTP error after retries, a transport
/// error, the deadline or a cancel before the response) as not served:
/// [`crate::store::calls::close_unserved`]. Bounded by
/// [`OPEN_ROW_TIMEOUT`]; a failure leaves the row open, and it is then
/// booked as an orphan at its estimate (over-recorded, never lost).
async fn close_unserved(ctx: &WorkerContext, lease: &ClaimedJob, seq: i32) {
    let closed = crate::store::calls::close_unserved(&ctx.db, lease.job_id(), lease.epoch(), seq);
    let outcome = match tokio::time::timeout(OPEN_ROW_TIMEOUT, closed).await {
        Ok(Ok(_)) => return,
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer within {OPEN_ROW_TIMEOUT:?}"),
    };
    metrics::counter!("fleet_open_call_failures_total").increment(1);
    tracing::warn!(error.message = %outcome, seq, "could not close an unserved call's open row; it will be booked as an estimate");
}

/// The sum of the `max_uses` of the request's web search tools, if it has any.
fn max_web_searches(request: &Value) -> Option<u64> {
    let tools = request.get("tools")?.as_array()?;
    let searches: Vec<u64> = tools
        .iter()
        .filter(|t| t.get("type").and_then(Value::as_str).is_some_and(|k| k.starts_with("web_search")))
        .filter_map(|t| t.get("max_uses").and_then(Value::as_u64))
        .collect();
    (!searches.is_empty()).then(|| searches.iter().sum())
}

/// One try of a call, ended at the latest at `deadline` (the call's
/// stream deadline, shared by its tries).
#[expect(clippy::too_many_arguments, reason = "one try of a call: each part is needed")]
async fn stream_once(
    ctx: &WorkerContext,
    lease: &ClaimedJob,
    request: &Value,
    seq: i32,
    cancel: &CancellationToken,
    progress: &Progress,
    shown_before: &str,
    deadline: Instant,
) -> CallRecord {
    let call_started = std::time::Instant::now();
    let idle = Duration::from_secs(ctx.settings.idle_timeout_s);
    let mut record = CallRecord {
        seq,
        state: MessageState::default(),
        request_id: None,
        end: CallEnd::Complete,
        request: request.clone(),
        retryable: false,
        retry_after_s: None,
    };
    // On the books before the request leaves (`/stop` is not kept waiting).
    tokio::select! {
        biased;
        _ = cancel.cancelled() => { record.end = CallEnd::Cancelled; return record; }
        () = open_row(ctx, lease, request, &record) => {}
    }
    let mut backoff = Policy::AnthropicOpen.backoff();
    let mut stream = loop {
        let opened = tokio::select! {
            _ = cancel.cancelled() => { record.end = CallEnd::Cancelled; return record; }
            _ = tokio::time::sleep_until(deadline) => { record.end = CallEnd::Deadline; return record; }
            r = ctx.anthropic.stream(request) => r,
        };
        match opened {
            Ok(s) => break s,
            Err(e) if e.is_retryable() => {
                let Some(mut wait) = backoff.next() else {
                    record.end = CallEnd::Failed(e.to_string());
                    return record;
                };
                if let ApiError::Http { retry_after_s: Some(s), .. } = &e {
                    wait = wait.max(Duration::from_secs(*s));
                }
                if Instant::now() + wait >= deadline {
                    // A retry-after past the deadline (429 with `retry-after:
                    // 3600`): the user is told now, not in an hour.
                    tracing::warn!(error.message = %e, wait_s = wait.as_secs_f64(), "Messages API retry would pass the stream deadline; giving up");
                    record.end = CallEnd::Failed(format!("{e} (retry after {} s, past the deadline)", wait.as_secs()));
                    record.retry_after_s = Some(wait.as_secs());
                    return record;
                }
                let status = match &e {
                    ApiError::Http { status, .. } => status.to_string(),
                    _ => "transport".to_owned(),
                };
                metrics::counter!("fleet_claude_errors_total", "type" => format!("http_{status}")).increment(1);
                tracing::warn!(error.message = %e, wait_s = wait.as_secs_f64(), "Messages API call failed; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => { record.end = CallEnd::Cancelled; return record; }
                    _ = tokio::time::sleep_until(deadline) => { record.end = CallEnd::Deadline; return record; }
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            Err(e) => {
                record.end = CallEnd::Failed(e.to_string());
                return record;
            }
        }
    };
    record.request_id = stream.request_id.clone();
    if let Some(id) = &stream.request_id {
        tracing::Span::current().record("anthropic_request_id", id.as_str());
    }
    let mut warned_unknown = false;
    let mut first_token_seen = false;
    // Whether the call's `open` row was updated at `message_start`.
    let mut opened = false;
    loop {
        let next = tokio::select! {
            biased;
            _ = cancel.cancelled() => { record.end = CallEnd::Cancelled; break; }
            _ = tokio::time::sleep_until(deadline) => { record.end = CallEnd::Deadline; break; }
            n = tokio::time::timeout(idle, stream.events.next()) => n,
        };
        match next {
            Err(_) => {
                record.end = CallEnd::IdleTimeout;
                break;
            }
            Ok(None) => {
                if !record.state.stopped {
                    record.end = CallEnd::Failed("stream ended before message_stop".into());
                    record.retryable = true;
                }
                break;
            }
            Ok(Some(Err(e))) => {
                // A broken connection is worth another try; a body that
                // does not parse is not (it would be the same again).
                record.retryable = e.is_retryable();
                record.end = CallEnd::Failed(e.to_string());
                break;
            }
            Ok(Some(Ok(event))) => match record.state.apply(event) {
                Applied::Quiet if record.state.started && !opened => {
                    opened = true;
                    // `/stop` is not kept waiting by the write (P6).
                    tokio::select! {
                        biased;
                        _ = cancel.cancelled() => { record.end = CallEnd::Cancelled; break; }
                        () = open_row(ctx, lease, request, &record) => {}
                    }
                }
                Applied::Text => {
                    if !first_token_seen {
                        first_token_seen = true;
                        metrics::histogram!("fleet_time_to_first_token_seconds")
                            .record(call_started.elapsed().as_secs_f64());
                    }
                    progress.update(format!("{shown_before}{}", record.state.text()))
                }
                Applied::Quiet => {}
                Applied::Unknown(what) => {
                    if !warned_unknown {
                        tracing::warn!(what, "unknown stream element tolerated");
                        warned_unknown = true;
                    }
                }
            },
        }
        if let Some(err) = &record.state.error {
            record.end = CallEnd::Failed(format!("{}: {}", err.kind, err.message));
            record.retryable = restartable(&err.kind);
            break;
        }
        if record.state.stopped {
            break;
        }
    }
    record
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn web_search_limits_are_the_sum_of_the_search_tools_max_uses() {
        let request = json!({ "tools": [
            { "name": "calculator", "input_schema": {} },
            { "type": "web_search_20250305", "name": "web_search", "max_uses": 5 },
        ]});
        assert_eq!(max_web_searches(&request), Some(5));
        assert_eq!(max_web_searches(&json!({ "tools": [{ "name": "calculator" }] })), None);
        assert_eq!(max_web_searches(&json!({ "max_tokens": 1024 })), None);
    }
}
