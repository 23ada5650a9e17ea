//! Running the tool calls of one turn: concurrently, each on its own pooled
//! connection and in its own transaction.
//!
//! One call, as named steps:
//! 1. `previous`: a `tool_use` id already recorded for the job answers with
//!    the recorded result and runs nothing.
//! 2. validation against the tool's schema (an invalid input is an error result).
//! 3. `begin`: a connection of its own, a transaction with a server-side
//!    `statement_timeout`, and the `tool_calls` row inserted first, so that
//!    the same id running at the same time waits for this one and then
//!    answers with its result (it runs once).
//! 4. the tool, raced against `TOOL_TIMEOUT_S` and the job's cancellation.
//! 5. `commit`: result, billing event of a priced tool, the lease fence
//!    (`FOR SHARE` on the job row, held only for the commit, so that `/stop`
//!    and heartbeats never wait behind a running tool), commit.
//! 6. On failure only this call's writes are undone and the error is
//!    recorded on another connection. A call cut off by its timeout or by
//!    cancellation has its statement cancelled on the server
//!    (`pg_cancel_backend`) and its connection closed, never waited for.

use super::{calculator, clock, files, notes, ToolOutcome};
use crate::context::WorkerContext;
use crate::job::JobError;
use crate::store::calls::{self, FailedToolCall};
use crate::store::jobs::ClaimedJob;
use crate::store::jobs::JobRow;
use chrono::Utc;
use serde_json::Value;
use shared::contracts::{tool_event_id, BillingEvent, ToolCharge};
use sqlx::pool::PoolConnection;
use sqlx::{Connection as _, PgConnection, Postgres};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// A requested call: `(tool_use id, name, parsed input or why it did not parse)`.
pub type ToolUse = (String, String, Result<Value, String>);

/// Extra time the server gives a statement beyond `TOOL_TIMEOUT_S`: the
/// client gives up first and cancels it; this ends it if the cancel is lost.
const SERVER_GRACE_MS: u64 = 1_000;

/// Runs every call of one turn concurrently; outcomes in the order of `uses`.
///
/// # Errors
/// `LeaseLost` when the job's lease is gone (nothing of the tools is kept),
/// database errors.
pub async fn run_tools(
    ctx: &WorkerContext,
    job: &JobRow,
    lease: &ClaimedJob,
    uses: Vec<ToolUse>,
    cancel: &CancellationToken,
) -> Result<Vec<ToolOutcome>, JobError> {
    let runs = uses.into_iter().map(|u| run_one(ctx, job, lease, u, cancel));
    futures_util::future::join_all(runs).await.into_iter().collect()
}

/// How step 4 ended.
enum Ran {
    /// The tool finished: its output or its error message.
    Finished(Result<String, String>),
    /// Cut off (timeout or cancellation): the error message.
    CutOff(String),
}

async fn run_one(
    ctx: &WorkerContext,
    job: &JobRow,
    lease: &ClaimedJob,
    (id, name, input): ToolUse,
    cancel: &CancellationToken,
) -> Result<ToolOutcome, JobError> {
    if let Some(outcome) = previous(&mut *ctx.db.acquire().await?, job, &id, &name).await? {
        return Ok(outcome);
    }
    let input_value = input.clone().unwrap_or(Value::Null);
    let started = Instant::now();
    let error = match input.and_then(|i| ctx.tools.validate(&name, &i).map(|()| i)) {
        Err(e) => e,
        Ok(input) => match run_checked(ctx, job, lease, &id, &name, &input, cancel, started).await? {
            Ok(outcome) => return Ok(outcome),
            Err(e) => e,
        },
    };
    tracing::warn!(tool = %name, tool_use_id = %id, error.message = %error, "tool call failed");
    let mut conn = ctx.db.acquire().await?;
    record_error(&mut conn, job, &id, &name, &input_value, &error, started).await?;
    Ok(ToolOutcome { tool_use_id: id, name, content: error, is_error: true, charged: Default::default() })
}

/// Steps 3 to 5 for a valid input: `Ok(Err(message))` when the tool failed
/// and its transaction was undone.
#[expect(clippy::too_many_arguments, reason = "one tool call's whole state; each argument is a different borrow")]
async fn run_checked(
    ctx: &WorkerContext,
    job: &JobRow,
    lease: &ClaimedJob,
    id: &str,
    name: &str,
    input: &Value,
    cancel: &CancellationToken,
    started: Instant,
) -> Result<Result<ToolOutcome, String>, JobError> {
    let mut conn = ctx.db.acquire().await?;
    let mut tx = conn.begin().await?;
    let timeout = Duration::from_secs(ctx.settings.tool_timeout_s);
    let server_timeout = format!("{}ms", timeout.as_millis() + u128::from(SERVER_GRACE_MS));
    let Some(pid) = lease.begin_tool(&mut tx, &server_timeout).await? else {
        return Err(JobError::LeaseLost);
    };
    if !calls::begin_tool_call(&mut tx, job.job_id, id, name, input).await? {
        // The same id ran at the same time and committed: its result stands.
        tx.rollback().await?;
        let outcome = previous(&mut conn, job, id, name).await?;
        return Ok(outcome.ok_or_else(|| format!("tool_use id {id} is being run already")));
    }
    let ran = tokio::select! {
        () = cancel.cancelled() => Ran::CutOff("cancelled: the user stopped the answer".to_owned()),
        r = tokio::time::timeout(timeout, execute(&mut tx, job, name, input)) => match r {
            Ok(r) => Ran::Finished(r),
            Err(_) => Ran::CutOff(format!("the tool did not finish within {} s", timeout.as_secs())),
        },
    };
    match ran {
        Ran::Finished(Ok(output)) => {
            let price = ctx.prices.tool_price(name);
            calls::finish_tool_call(&mut tx, job.job_id, id, &output, elapsed_ms(started)).await?;
            if price.0 > rust_decimal::Decimal::ZERO {
                let event = BillingEvent::ToolCharge(ToolCharge {
                    event_id: tool_event_id(job.job_id, id),
                    job_id: job.job_id,
                    user_id: job.user_id,
                    chat_id: job.chat_id,
                    tool_use_id: id.to_owned(),
                    tool_name: name.to_owned(),
                    user_charge: price,
                    waived: false,
                    occurred_at: Utc::now(),
                });
                crate::queues::relay::write(&mut tx, &event, Some(job.job_id)).await?;
            }
            // Fence: the tool's writes commit only under the live lease.
            if !lease.fence(&mut tx).await? {
                return Err(JobError::LeaseLost);
            }
            tx.commit().await?;
            ctx.outbox_notify.notify_one();
            Ok(Ok(ToolOutcome {
                tool_use_id: id.to_owned(),
                name: name.to_owned(),
                content: output,
                is_error: false,
                charged: price.0,
            }))
        }
        Ran::Finished(Err(e)) => {
            // Only this tool's writes are undone.
            tx.rollback().await?;
            Ok(Err(e))
        }
        Ran::CutOff(e) => {
            drop(tx);
            abandon(ctx, conn, pid).await;
            Ok(Err(e))
        }
    }
}

/// Ends a connection whose statement may still run: the server cancels the
/// statement, the queued `ROLLBACK` undoes the transaction, and the
/// connection is closed instead of being waited for or reused.
async fn abandon(ctx: &WorkerContext, mut conn: PoolConnection<Postgres>, pid: i32) {
    if let Err(e) = calls::cancel_backend(&ctx.db, pid).await {
        // The server-side statement_timeout ends it instead.
        tracing::warn!(error.message = %e, "could not cancel the statement of a cut-off tool");
    }
    conn.close_on_drop();
}

/// The recorded result of `id` in this job, if it ran before.
async fn previous(
    conn: &mut PgConnection,
    job: &JobRow,
    id: &str,
    name: &str,
) -> Result<Option<ToolOutcome>, JobError> {
    let previous = calls::previous_tool_call(conn, job.job_id, id).await?;
    Ok(previous.map(|(output, is_error)| {
        tracing::info!(tool_use_id = %id, "tool_use id seen before in this job; not run again");
        let content = output.and_then(|o| o.as_str().map(str::to_owned)).unwrap_or_default();
        ToolOutcome {
            tool_use_id: id.to_owned(),
            name: name.to_owned(),
            content,
            is_error,
            charged: Default::default(),
        }
    }))
}

async fn record_error(
    conn: &mut PgConnection,
    job: &JobRow,
    id: &str,
    name: &str,
    input: &Value,
    error: &str,
    started: Instant,
) -> Result<(), sqlx::Error> {
    let call =
        FailedToolCall { job_id: job.job_id, tool_use_id: id, name, input, error, duration_ms: elapsed_ms(started) };
    calls::record_failed_tool_call(conn, &call).await
}

fn elapsed_ms(started: Instant) -> i32 {
    i32::try_from(started.elapsed().as_millis()).unwrap_or(i32::MAX)
}

/// Runs one tool for the job's asker. Notes and files are scoped to the
/// asker *and* the job's chat (issue 13): in a group a tool sees only what
/// the asker sent or remembered in that group, in a private chat only what
/// was sent or remembered there, so a group's shared history never carries
/// a member's private files or notes.
async fn execute(tx: &mut PgConnection, job: &JobRow, name: &str, input: &Value) -> Result<String, String> {
    let (user_id, chat_id) = (job.user_id, job.chat_id);
    match name {
        "calculator" => calculator::evaluate(input.get("expression").and_then(Value::as_str).unwrap_or_default()),
        "current_time" => clock::now(input),
        "remember" => notes::remember(tx, user_id, chat_id, input).await,
        "recall" => notes::recall(tx, user_id, chat_id, input).await,
        "list_files" => files::list(tx, user_id, chat_id).await,
        "read_file" => files::read(tx, user_id, chat_id, input).await,
        other => Err(format!("unknown tool {other:?}")),
    }
}
