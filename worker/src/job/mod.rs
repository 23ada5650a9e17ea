//! One job, as a pipeline of named steps with typed state between them:
//! `load` → (`commands::run` | `check_balance` → `build_request` →
//! `stream_reply` (× continuations) → `finalize`) → `deliver` → `finish`.
//!
//! Every exit goes through [`run`]'s single `finish` call, so the lease is
//! released on every path; a panic is caught at the task boundary by the
//! consumer, and the lease expiry is the backstop for a crash.

mod finalize;
mod request;
mod stream;

pub use finalize::finalize;
pub use request::{build_request, load, JobRow};
pub use stream::{stream_reply, CallEnd, CallRecord};

use crate::context::WorkerContext;
use crate::delivery::{send_text, DeliveryError};
use crate::lease::{self, Lease};
use crate::progress::Progress;
use shared::anthropic::StopReason;
use tokio_util::sync::CancellationToken;

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobOutcome {
    /// Finished; the label says how (`answered`, `no_balance`, `command`, …).
    Done(&'static str),
    /// Failed with a reason (the user was told).
    Failed(String),
    /// The lease was lost: another worker owns the job now; nothing more was written.
    LeaseLost,
}

/// Errors inside a job step.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Database failure.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// The lease was lost (fenced write matched no row).
    #[error("lease lost")]
    LeaseLost,
    /// Stored state that does not validate (P10): the row id is in the text.
    #[error("invalid stored state: {0}")]
    Invalid(String),
    /// Pricing failed (unknown model): the usage is kept, the job fails loudly.
    #[error("pricing: {0}")]
    Pricing(#[from] shared::pricing::PricingError),
}

/// Notice for a user whose balance cannot pay for an answer.
pub const TOP_UP_NOTICE: &str = "Your balance is empty, so I can't ask Claude right now. Please top up your credit to continue.";

/// Runs a claimed job to its end and releases the lease.
pub async fn run(ctx: &WorkerContext, lease: Lease, cancel: CancellationToken) -> JobOutcome {
    let result = run_steps(ctx, &lease, &cancel).await;
    let (status, outcome, error) = match &result {
        Ok(label) => ("done", *label, None),
        Err(JobError::LeaseLost) => return JobOutcome::LeaseLost,
        Err(e) => ("failed", "error", Some(e.to_string())),
    };
    if let Some(err) = &error {
        tracing::error!(error.message = %err, "job failed");
        if let Ok(job) = load(ctx, lease.job_id).await {
            let _ = send_text(ctx, job.chat_id, "Sorry, something went wrong while answering. Please try again.", None).await;
        }
    }
    match lease::finish(&ctx.db, &lease, status, outcome, error.as_deref()).await {
        Ok(true) => match error {
            None => JobOutcome::Done(outcome),
            Some(e) => JobOutcome::Failed(e),
        },
        Ok(false) => JobOutcome::LeaseLost,
        Err(e) => {
            // The lease will expire and the job will be retried.
            tracing::error!(error.message = %e, "could not finish the job");
            JobOutcome::Failed(e.to_string())
        }
    }
}

async fn run_steps(ctx: &WorkerContext, lease: &Lease, cancel: &CancellationToken) -> Result<&'static str, JobError> {
    let job = load(ctx, lease.job_id).await?;
    if job.kind == "command" {
        let reply = crate::commands::run(ctx, &job).await?;
        deliver(ctx, &job, &reply, None).await?;
        return Ok("command");
    }
    if let Some(text) = request::stored_answer(ctx, &job).await? {
        // An earlier attempt stored the answer and died while delivering it.
        deliver(ctx, &job, &text, None).await?;
        return Ok("answered");
    }
    if crate::commands::available_balance(ctx, job.user_id).await? <= rust_decimal::Decimal::ZERO {
        deliver(ctx, &job, TOP_UP_NOTICE, None).await?;
        return Ok("no_balance");
    }
    let mut request = build_request(ctx, &job).await?;
    let progress = Progress::start(ctx, job.chat_id, job.is_private(), job.draft_id());
    let mut calls: Vec<CallRecord> = Vec::new();
    let mut content: Vec<serde_json::Value> = Vec::new();
    let mut text = String::new();
    let mut notices: Vec<&'static str> = Vec::new();
    loop {
        let seq = i32::try_from(calls.len() + 1).unwrap_or(i32::MAX);
        let call = stream_reply(ctx, &request, seq, cancel, &progress, &text).await;
        text.push_str(&call.state.text());
        let blocks = call.state.content_blocks();
        let end = call.end.clone();
        let stop = call.state.stop_reason.clone();
        content.extend(blocks.iter().cloned());
        calls.push(call);
        match end {
            CallEnd::Complete if stop == Some(StopReason::MaxTokens) => {
                if calls.len() > ctx.settings.max_continuations as usize {
                    notices.push("(The answer reached its length limit and was cut here.)");
                    break;
                }
                request::append_assistant(&mut request, blocks);
            }
            CallEnd::Complete => break,
            CallEnd::Cancelled => {
                notices.push("(Stopped.)");
                break;
            }
            CallEnd::IdleTimeout | CallEnd::Deadline => {
                notices.push("(The answer took too long and was cut short.)");
                break;
            }
            CallEnd::Failed(_) => {
                notices.push("(Claude is unavailable right now; please try again in a moment.)");
                break;
            }
        }
    }
    let progress_message = progress.finish().await;
    if cancel.is_cancelled() && !ctx_lease_alive(ctx, lease).await {
        return Err(JobError::LeaseLost);
    }
    let partial = !notices.is_empty();
    finalize(ctx, &job, lease, &calls, &content, partial).await?;
    let mut reply = text.trim().to_owned();
    for n in &notices {
        if !reply.is_empty() {
            reply.push_str("\n\n");
        }
        reply.push_str(n);
    }
    if reply.is_empty() {
        reply = if calls.iter().any(|c| c.state.stop_reason == Some(StopReason::Refusal)) {
            "Claude declined to answer this request.".to_owned()
        } else {
            "(Claude returned an empty answer.)".to_owned()
        };
    }
    deliver(ctx, &job, &reply, progress_message).await?;
    Ok("answered")
}

async fn ctx_lease_alive(ctx: &WorkerContext, lease: &Lease) -> bool {
    let visibility = std::time::Duration::from_secs(ctx.settings.visibility_timeout_s);
    lease::heartbeat(&ctx.db, lease, visibility).await.unwrap_or(false)
}

async fn deliver(ctx: &WorkerContext, job: &JobRow, text: &str, reuse: Option<i64>) -> Result<(), JobError> {
    match send_text(ctx, job.chat_id, text, reuse).await {
        Ok(ids) => {
            sqlx::query("UPDATE jobs SET reply_message_ids = reply_message_ids || $2 WHERE job_id = $1")
                .bind(job.job_id)
                .bind(&ids)
                .execute(&ctx.db)
                .await?;
            Ok(())
        }
        Err(DeliveryError::Blocked) => {
            sqlx::query("UPDATE users SET blocked_at = now() WHERE user_id = $1").bind(job.user_id).execute(&ctx.db).await?;
            Ok(())
        }
        // The answer is stored and billed; a delivery failure after retries
        // is logged with the job id and the job still finishes.
        Err(DeliveryError::Failed(e)) => {
            tracing::error!(error.message = %e, "answer could not be delivered");
            Ok(())
        }
    }
}
