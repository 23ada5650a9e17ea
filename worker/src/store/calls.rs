//! `api_calls` (one row per Messages API call, per lease epoch: what was
//! used and what it cost) and `tool_calls` (one row per `tool_use` id of a
//! job: it runs once, its result is recorded).

use rust_decimal::Decimal;
use serde_json::Value;
use shared::pricing::TokenCounts;
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

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
}

fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Records a call, inside the caller's transaction. `Ok(false)`: it was
/// recorded already under this epoch (nothing written).
///
/// # Errors
/// Database errors.
pub async fn insert_api_call(tx: &mut PgConnection, call: &ApiCall<'_>) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO api_calls (job_id, seq, lease_epoch, request_id, anthropic_message_id, model, stop_reason,
             input_tokens, output_tokens, cache_write_5m, cache_write_1h, cache_read, web_search_requests,
             provider_cost, user_charge, estimated, abandoned)
         VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17)
         ON CONFLICT (job_id, lease_epoch, seq) DO NOTHING",
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
    .execute(tx)
    .await?;
    Ok(inserted.rows_affected() == 1)
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
