//! `api_calls` (one row per Messages API call, per lease epoch: what was
//! used and what it cost) and `tool_calls` (one row per `tool_use` id of a
//! job: it runs once, its result is recorded).
//!
//! A call's row goes through [`CallState`]: written `open` before its HTTP
//! request leaves and updated at its `message_start` (fenced:
//! `ClaimedJob::open_call`), completed `recorded` by its attempt
//! ([`record_api_call`]; [`close_unserved`] for a request that got no
//! stream), or, when that attempt died first, `orphaned`: booked by a later
//! attempt or the reaper with the estimate of [`OpenCall::estimate`]
//! ([`book_orphan`]).

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::Value;
use shared::pricing::TokenCounts;
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

text_enum! {
    /// `api_calls.state` (the schema's CHECK list): how far a call's row got.
    pub enum CallState in "api_calls.state" {
        /// The request is on its way (`started` false: the input is an upper
        /// bound from the request's size) or its stream started
        /// (`message_start`: request id, model and input usage are
        /// recorded); the final usage is not, and nothing is in the outbox yet.
        Open = "open",
        /// Recorded by the attempt that made the call (its `finalize`, or its
        /// abandoned record) with the usage the stream reported, or counted
        /// for a call cut short; its event is in the outbox.
        Recorded = "recorded",
        /// Its attempt died with the row open: booked by a later attempt or
        /// the reaper with estimated tokens ([`OpenCall::estimate`]), as
        /// provider cost charged to nobody; its event is in the outbox.
        Orphaned = "orphaned",
    }
}

/// One Messages API call as recorded in `api_calls`.
#[derive(Debug)]
pub struct ApiCall<'a> {
    /// The job.
    pub job_id: Uuid,
    /// The call's number within the attempt.
    pub seq: i32,
    /// The epoch of the claim that made the call.
    pub lease_epoch: i64,
    /// Anthropic's `request-id` header, if the call got that far.
    pub request_id: Option<&'a str>,
    /// The `message_start` id, if the stream started.
    pub anthropic_message_id: Option<&'a str>,
    /// The model that answered (or was asked).
    pub model: &'a str,
    /// The stream's `stop_reason`, if it ended with one.
    pub stop_reason: Option<&'a str>,
    /// Tokens by class (each stored as BIGINT, saturated at `i64::MAX`).
    pub tokens: &'a TokenCounts,
    /// What Anthropic bills us, USD.
    pub provider_cost: Decimal,
    /// What the user is charged, USD (zero when not charged).
    pub user_charge: Decimal,
    /// True when the tokens are an estimate (a stream cut short).
    pub estimated: bool,
    /// True for the call of an attempt that will not finalize.
    pub abandoned: bool,
    /// True when the stream started (`message_start` was read).
    pub started: bool,
}

pub(crate) fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Records a call (state `recorded`), inside the caller's transaction: a new
/// row, or its `open` row completed with the final usage. `Ok(false)`:
/// nothing was written — it was recorded already under this epoch, or
/// booked as orphaned by a later attempt or the reaper (its event is in the
/// outbox already: writing another would book it twice).
///
/// # Errors
/// Database errors.
pub async fn record_api_call(tx: &mut PgConnection, call: &ApiCall<'_>) -> Result<bool, sqlx::Error> {
    let written = sqlx::query(
        "INSERT INTO api_calls (job_id, seq, lease_epoch, request_id, anthropic_message_id, model, stop_reason,
             input_tokens, output_tokens, cache_write_5m, cache_write_1h, cache_read, web_search_requests,
             provider_cost, user_charge, estimated, abandoned, state, started)
         VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,'recorded',$18)
         ON CONFLICT (job_id, lease_epoch, seq) DO UPDATE SET
             request_id = COALESCE(EXCLUDED.request_id, api_calls.request_id),
             anthropic_message_id = COALESCE(EXCLUDED.anthropic_message_id, api_calls.anthropic_message_id),
             model = EXCLUDED.model, stop_reason = EXCLUDED.stop_reason,
             input_tokens = EXCLUDED.input_tokens, output_tokens = EXCLUDED.output_tokens,
             cache_write_5m = EXCLUDED.cache_write_5m, cache_write_1h = EXCLUDED.cache_write_1h,
             cache_read = EXCLUDED.cache_read, web_search_requests = EXCLUDED.web_search_requests,
             provider_cost = EXCLUDED.provider_cost, user_charge = EXCLUDED.user_charge,
             estimated = EXCLUDED.estimated, abandoned = EXCLUDED.abandoned, state = 'recorded',
             started = EXCLUDED.started
           WHERE api_calls.state = 'open'",
    )
    .bind(call.job_id)
    .bind(call.seq)
    .bind(call.lease_epoch)
    .bind(call.request_id)
    .bind(call.anthropic_message_id)
    .bind(call.model)
    .bind(call.stop_reason)
    .bind(count(call.tokens.input))
    .bind(count(call.tokens.output))
    .bind(count(call.tokens.cache_write_5m))
    .bind(count(call.tokens.cache_write_1h))
    .bind(count(call.tokens.cache_read))
    .bind(count(call.tokens.web_search_requests))
    .bind(call.provider_cost)
    .bind(call.user_charge)
    .bind(call.estimated)
    .bind(call.abandoned)
    .bind(call.started)
    .execute(tx)
    .await?;
    Ok(written.rows_affected() == 1)
}

/// Closes call `seq` of claim `lease_epoch` of job `job_id` as not served:
/// its HTTP request got no stream (an HTTP error after retries, a transport
/// error, the deadline or a cancel before the response), so the provider
/// generated nothing and bills nothing for it (DESIGN §6: an HTTP error is
/// charged to nobody). Its `open` row becomes `recorded` with no tokens and
/// no cost, as `finalize` records such a call, so that neither the reaper
/// nor a later attempt books it as an orphan. A row no longer `open` is
/// left as it is. Not fenced: it only settles this claim's own row.
///
/// # Errors
/// Database errors.
pub async fn close_unserved<'e>(
    db: impl PgExecutor<'e>,
    job_id: Uuid,
    lease_epoch: i64,
    seq: i32,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE api_calls SET state = 'recorded', input_tokens = 0, output_tokens = 0, cache_write_5m = 0,
                cache_write_1h = 0, cache_read = 0, web_search_requests = 0, provider_cost = 0, user_charge = 0,
                estimated = false, started = false
          WHERE job_id = $1 AND lease_epoch = $2 AND seq = $3 AND state = 'open'",
    )
    .bind(job_id)
    .bind(lease_epoch)
    .bind(seq)
    .execute(db)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// A call before its request leaves or as its stream starts, for its
/// `open` row (see `ClaimedJob::open_call`, which writes it under the
/// lease fence).
#[derive(Debug)]
pub struct OpenedCall<'a> {
    /// The call's number within the attempt.
    pub seq: i32,
    /// Anthropic's `request-id` header (`None` before the request).
    pub request_id: Option<&'a str>,
    /// The `message_start` id (`None` before the request).
    pub anthropic_message_id: Option<&'a str>,
    /// The model of `message_start`, or the request's before it.
    pub model: &'a str,
    /// The usage `message_start` reported (the input classes are final);
    /// before the request, the input's upper bound as uncached input.
    pub tokens: &'a TokenCounts,
    /// False before the request: `tokens` is the bound, not a report.
    pub started: bool,
    /// The request's `max_tokens`, if it had one.
    pub max_tokens: Option<u64>,
    /// The `max_uses` of the request's web search tool, if it had one.
    pub max_web_searches: Option<u64>,
}

/// An `open` row whose attempt is over, with what its booking needs of the
/// job (see `jobs::orphaned_calls`).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OpenCall {
    /// The job.
    pub job_id: Uuid,
    /// The call's number within its attempt.
    pub seq: i32,
    /// The epoch of the claim that made the call.
    pub lease_epoch: i64,
    /// Anthropic's `request-id`.
    pub request_id: Option<String>,
    /// The model of `message_start`.
    pub model: String,
    /// Uncached input tokens reported at `message_start`.
    pub input_tokens: i64,
    /// Output tokens reported at `message_start`.
    pub output_tokens: i64,
    /// 5-minute cache writes reported at `message_start`.
    pub cache_write_5m: i64,
    /// 1-hour cache writes reported at `message_start`.
    pub cache_write_1h: i64,
    /// Cache reads reported at `message_start`.
    pub cache_read: i64,
    /// Web searches reported at `message_start`.
    pub web_search_requests: i64,
    /// The request's `max_tokens` (NULL: unknown).
    pub max_tokens: Option<i64>,
    /// The `max_uses` of the request's web search tool (NULL: none).
    pub max_web_searches: Option<i64>,
    /// False when the worker died before it read `message_start`: the
    /// input columns hold the upper bound written before the request.
    pub started: bool,
    /// When the row was first written (just before the request left): its
    /// price is the one in effect that day.
    pub created_at: DateTime<Utc>,
    /// The job's user (named in the event; never charged for it).
    pub user_id: i64,
    /// The job's chat.
    pub chat_id: i64,
    /// The job's update.
    pub update_id: i64,
}

impl OpenCall {
    /// The tokens an orphaned call is booked at: an upper bound of what the
    /// provider can have billed for it, so finance never under-records a
    /// call whose final usage was lost with its worker.
    ///
    /// - Input, cache writes and cache reads: as `message_start` reported
    ///   them (the API reports the whole input of a call there); for a call
    ///   whose `message_start` was never read, the bound written before
    ///   the request, as uncached input: the request's size in bytes plus
    ///   an allowance (`holds::input_token_bound`: a token is at least one
    ///   byte), at the uncached input rate — the rate all of our input is
    ///   billed at, since no request of ours sets `cache_control` (no cache
    ///   write or read can happen).
    /// - Output: the request's `max_tokens` (the most the call can have
    ///   generated), or what `message_start` reported if that is larger or
    ///   `max_tokens` is unknown.
    /// - Web searches: the `max_uses` of the request's web search tool, or
    ///   what `message_start` reported if that is larger or there was none.
    ///
    /// The booking is marked `estimated`; `reconcile` against the
    /// provider's usage report shows what the estimate missed.
    pub fn estimate(&self) -> TokenCounts {
        let n = |v: i64| u64::try_from(v).unwrap_or(0);
        let bound = |reported: i64, limit: Option<i64>| n(reported).max(limit.map_or(0, n));
        TokenCounts {
            input: n(self.input_tokens),
            output: bound(self.output_tokens, self.max_tokens),
            cache_write_5m: n(self.cache_write_5m),
            cache_write_1h: n(self.cache_write_1h),
            cache_read: n(self.cache_read),
            web_search_requests: bound(self.web_search_requests, self.max_web_searches),
        }
    }
}

/// Books an open call as orphaned (state `orphaned`): `tokens` (the
/// estimate), `provider_cost` (USD), charged to nobody, marked `estimated`
/// and `abandoned`, inside the caller's transaction (the one that writes
/// its outbox event). `Ok(false)`: the row is no longer open (its attempt
/// or another booker recorded it first): nothing was written.
///
/// # Errors
/// Database errors.
pub async fn book_orphan(
    tx: &mut PgConnection,
    call: &OpenCall,
    tokens: &TokenCounts,
    provider_cost: Decimal,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE api_calls SET state = 'orphaned', input_tokens = $4, output_tokens = $5, cache_write_5m = $6,
                cache_write_1h = $7, cache_read = $8, web_search_requests = $9, provider_cost = $10,
                user_charge = 0, estimated = true, abandoned = true
          WHERE job_id = $1 AND lease_epoch = $2 AND seq = $3 AND state = 'open'",
    )
    .bind(call.job_id)
    .bind(call.lease_epoch)
    .bind(call.seq)
    .bind(count(tokens.input))
    .bind(count(tokens.output))
    .bind(count(tokens.cache_write_5m))
    .bind(count(tokens.cache_write_1h))
    .bind(count(tokens.cache_read))
    .bind(count(tokens.web_search_requests))
    .bind(provider_cost)
    .execute(tx)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// The recorded result of tool call `tool_use_id` of the job, if it ran
/// before: `(output, is_error)`.
///
/// # Errors
/// Database errors.
pub async fn previous_tool_call<'e>(
    db: impl PgExecutor<'e>,
    job_id: Uuid,
    tool_use_id: &str,
) -> Result<Option<(Option<Value>, bool)>, sqlx::Error> {
    sqlx::query_as("SELECT output, is_error FROM tool_calls WHERE job_id = $1 AND tool_use_id = $2")
        .bind(job_id)
        .bind(tool_use_id)
        .fetch_optional(db)
        .await
}

/// Inserts the tool call's row first thing in its transaction, so that the
/// same id running at the same time waits for this one. `Ok(false)`: the
/// id ran already and committed (nothing written).
///
/// # Errors
/// Database errors.
pub async fn begin_tool_call(
    tx: &mut PgConnection,
    job_id: Uuid,
    tool_use_id: &str,
    name: &str,
    input: &Value,
) -> Result<bool, sqlx::Error> {
    let claimed = sqlx::query(
        "INSERT INTO tool_calls (job_id, tool_use_id, name, input) VALUES ($1, $2, $3, $4)
         ON CONFLICT (job_id, tool_use_id) DO NOTHING",
    )
    .bind(job_id)
    .bind(tool_use_id)
    .bind(name)
    .bind(input)
    .execute(tx)
    .await?;
    Ok(claimed.rows_affected() == 1)
}

/// Records the tool's `output` and how long it ran (`duration_ms`,
/// milliseconds), inside its transaction.
///
/// # Errors
/// Database errors.
pub async fn finish_tool_call(
    tx: &mut PgConnection,
    job_id: Uuid,
    tool_use_id: &str,
    output: &str,
    duration_ms: i32,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE tool_calls SET output = $3, duration_ms = $4 WHERE job_id = $1 AND tool_use_id = $2")
        .bind(job_id)
        .bind(tool_use_id)
        .bind(Value::String(output.to_owned()))
        .bind(duration_ms)
        .execute(tx)
        .await?;
    Ok(())
}

/// A failed tool call as recorded: its input, its `error` as output.
#[derive(Debug)]
pub struct FailedToolCall<'a> {
    /// The job.
    pub job_id: Uuid,
    /// The model's `tool_use` id.
    pub tool_use_id: &'a str,
    /// The tool's name.
    pub name: &'a str,
    /// The input as the model sent it (`null` when it did not parse).
    pub input: &'a Value,
    /// The error message given to the model.
    pub error: &'a str,
    /// How long it ran, milliseconds.
    pub duration_ms: i32,
}

/// Records a failed tool call (outside the undone transaction of the
/// tool); an id recorded already is left as it is.
///
/// # Errors
/// Database errors.
pub async fn record_failed_tool_call<'e>(
    db: impl PgExecutor<'e>,
    call: &FailedToolCall<'_>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO tool_calls (job_id, tool_use_id, name, input, output, is_error, duration_ms)
         VALUES ($1, $2, $3, $4, $5, true, $6) ON CONFLICT (job_id, tool_use_id) DO NOTHING",
    )
    .bind(call.job_id)
    .bind(call.tool_use_id)
    .bind(call.name)
    .bind(call.input)
    .bind(Value::String(call.error.to_owned()))
    .bind(call.duration_ms)
    .execute(db)
    .await?;
    Ok(())
}

/// Asks the server to cancel the running statement of backend `pid` (a
/// tool cut off by its timeout or by `/stop`). True when the signal was sent.
///
/// # Errors
/// Database errors.
pub async fn cancel_backend<'e>(db: impl PgExecutor<'e>, pid: i32) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_cancel_backend($1)").bind(pid).fetch_one(db).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(output: i64, max_tokens: Option<i64>, searches: i64, max_searches: Option<i64>) -> OpenCall {
        OpenCall {
            job_id: Uuid::nil(),
            seq: 1,
            lease_epoch: 1,
            request_id: Some("req_1".into()),
            model: "claude-sonnet-4-5".into(),
            input_tokens: 1_200,
            output_tokens: output,
            cache_write_5m: 300,
            cache_write_1h: 40,
            cache_read: 5_000,
            web_search_requests: searches,
            max_tokens,
            max_web_searches: max_searches,
            started: true,
            created_at: Utc::now(),
            user_id: 1,
            chat_id: 1,
            update_id: 1,
        }
    }

    #[test]
    fn call_states_are_the_schemas_check_list() {
        let states: Vec<String> = CallState::ALL.iter().map(ToString::to_string).collect();
        assert_eq!(states, crate::store::check_list("state"));
    }

    #[test]
    fn an_orphan_is_estimated_at_its_reported_input_and_max_tokens_of_output() {
        let t = open(1, Some(4_096), 0, None).estimate();
        assert_eq!(
            t,
            TokenCounts {
                input: 1_200,
                output: 4_096,
                cache_write_5m: 300,
                cache_write_1h: 40,
                cache_read: 5_000,
                web_search_requests: 0
            }
        );
    }

    #[test]
    fn a_reported_output_above_max_tokens_wins_and_unknown_max_tokens_keeps_the_report() {
        assert_eq!(open(5_000, Some(4_096), 0, None).estimate().output, 5_000);
        assert_eq!(open(3, None, 0, None).estimate().output, 3);
    }

    #[test]
    fn web_searches_are_estimated_at_the_tools_max_uses() {
        assert_eq!(open(1, Some(10), 0, Some(5)).estimate().web_search_requests, 5);
        assert_eq!(open(1, Some(10), 2, None).estimate().web_search_requests, 2);
        assert_eq!(open(1, Some(10), 7, Some(5)).estimate().web_search_requests, 7);
    }

    #[test]
    fn a_call_never_started_is_estimated_at_its_input_bound_and_max_tokens() {
        let mut call = open(0, Some(4_096), 0, Some(3));
        call.started = false;
        (call.input_tokens, call.cache_write_5m, call.cache_write_1h, call.cache_read) = (9_000, 0, 0, 0);
        let t = call.estimate();
        assert_eq!((t.input, t.output, t.web_search_requests), (9_000, 4_096, 3));
        assert_eq!((t.cache_write_5m, t.cache_write_1h, t.cache_read), (0, 0, 0));
    }

    #[test]
    fn negative_counts_read_back_as_zero() {
        let mut call = open(-1, Some(-5), -2, Some(-1));
        call.input_tokens = -10;
        let t = call.estimate();
        assert_eq!((t.input, t.output, t.web_search_requests), (0, 0, 0));
    }
}
