//! One job, as a pipeline of named steps with typed state between them:
//! `load` → (`commands::run` | `check_balance` → `build_request` →
//! `stream_reply` (× continuations) → `finalize`) → `deliver` → `finish`.
//!
//! Every exit goes through [`run`]'s single `finish` (or `hand_back`) call,
//! so the lease is released on every path; a panic is caught at the task
//! boundary by the consumer, and the lease expiry is the backstop for a crash.

mod admission;
mod finalize;
mod privacy;
mod repair;
mod request;
mod rounds;
mod stream;

pub use admission::{before_call, before_tools, floor_max_tokens, spent, Admit};
pub use finalize::{book_orphaned_calls, finalize, record_abandoned};
pub use repair::repair_history;
pub use request::{build_request, load, validate_content, JobRow};
pub use stream::{stream_reply, CallEnd, CallRecord};

use crate::cancel::{CancelReason, JobCancel};
use crate::context::WorkerContext;
use crate::notices;
use crate::outcome::JobEnd;
use crate::store::jobs::{ClaimedJob, JobKind, Outcome};
use crate::telegram::delivery::DeliveryError;
use crate::telegram::progress::Progress;
use rust_decimal::Decimal;
use shared::anthropic::StopReason;
use shared::retry::Policy;

/// Errors inside a job step.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Database failure.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// The lease was lost (fenced write matched no row).
    #[error("lease lost")]
    LeaseLost,
    /// The process is shutting down before the answer was stored.
    #[error("shutting down")]
    Shutdown,
    /// Stored state that does not validate (P10): the row id is in the text.
    #[error("invalid stored state: {0}")]
    Invalid(String),
    /// Pricing failed (unknown model): the usage is kept, the job fails loudly.
    #[error("pricing: {0}")]
    Pricing(#[from] shared::pricing::PricingError),
    /// A transient failure outside the database (a document download on a
    /// broken network): handed back, the attempt counted, retried after a delay.
    #[error("transient: {0}")]
    Transient(String),
    /// The reply reached the user but its message ids could not be recorded
    /// (a lasting database error, or the lease ran out while retrying): the
    /// job ends without a failure notice and is never sent again.
    #[error("the answer was sent but not recorded: {0}")]
    SentNotRecorded(String),
    /// The reply could not be delivered after every retry of the Bot API
    /// (5xx, network): the user never got it, so nothing is charged.
    #[error("the answer could not be delivered: {0}")]
    Undelivered(String),
}

impl JobError {
    /// True when a later try may succeed: the database went away (a
    /// restart, a failover: [`shared::db::is_transient`]) or a
    /// [`JobError::Transient`] failure.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Db(e) => shared::db::is_transient(e),
            Self::Transient(_) => true,
            Self::LeaseLost
            | Self::Shutdown
            | Self::Invalid(_)
            | Self::Pricing(_)
            | Self::SentNotRecorded(_)
            | Self::Undelivered(_) => false,
        }
    }
}

/// Runs a claimed job's attempt to its end and says how it ended. It
/// performs no lease transition, broker action or failure notice itself:
/// [`crate::outcome::plan`] maps the end to those, and the work queue
/// applies the plan (a panic is mapped there, at the task boundary).
pub async fn run(ctx: &WorkerContext, lease: &ClaimedJob, cancel: JobCancel) -> JobEnd {
    match run_steps(ctx, lease, &cancel).await {
        Ok(outcome) => JobEnd::Finished(outcome),
        // The hold belongs to the new holder now: left alone.
        Err(JobError::LeaseLost) => JobEnd::LeaseLost,
        Err(e @ JobError::Db(_)) if e.is_transient() => {
            // The database went away (a restart, a failover) before
            // anything was sent (a sent answer is never handed back, see
            // `deliver`): not the user's failure. If even the hand-back
            // fails, the lease expires and the reaper republishes the job.
            tracing::warn!(error.message = %e, "job interrupted by a database error; handing it back");
            JobEnd::DatabaseDown(e.to_string())
        }
        Err(JobError::Transient(e)) => {
            tracing::warn!(error.message = %e, attempt = lease.attempts(), "job interrupted by a transient error; handing it back");
            JobEnd::Transient(e)
        }
        Err(JobError::Shutdown) => JobEnd::Shutdown,
        Err(JobError::Undelivered(e)) => {
            tracing::error!(error.message = %e, "the answer could not be delivered; its charges are waived");
            JobEnd::Undelivered(e)
        }
        Err(e @ JobError::SentNotRecorded(_)) => {
            tracing::error!(error.message = %e, "the answer was sent but not recorded");
            JobEnd::SentNotRecorded(e.to_string())
        }
        Err(e) => {
            tracing::error!(error.message = %e, "job failed");
            JobEnd::Failed { damaged: matches!(e, JobError::Invalid(_)), error: e.to_string() }
        }
    }
}

async fn run_steps(ctx: &WorkerContext, lease: &ClaimedJob, cancel: &JobCancel) -> Result<Outcome, JobError> {
    // Calls an earlier attempt left open (it died before recording them)
    // are booked now, charged to nobody; the reaper books them otherwise.
    if let Err(e) = book_orphaned_calls(ctx, Some(lease.job_id())).await {
        tracing::warn!(error.message = %e, "could not book the calls an earlier attempt left open; the reaper will");
    }
    let job = load(ctx, lease.job_id()).await?;
    if !job.reply_message_ids.is_empty() {
        // An earlier attempt delivered the answer and died before finishing:
        // finish without sending anything again (P1).
        return Ok(Outcome::Answered);
    }
    let job = if job.kind == JobKind::Document {
        match crate::documents::prepare(ctx, &job, lease).await? {
            crate::documents::Prepared::Ready(job) => *job,
            crate::documents::Prepared::Refused(notice) => {
                deliver(ctx, &job, lease, &notice, &[]).await?;
                return Ok(Outcome::DocumentRefused);
            }
        }
    } else {
        job
    };
    if job.kind == JobKind::Command {
        let reply = crate::commands::run(ctx, &job).await?;
        deliver(ctx, &job, lease, &reply, &[]).await?;
        return Ok(Outcome::Command);
    }
    if job.answer_stored {
        // An earlier attempt stored the answer (and its charges) and died
        // before delivering it: deliver what it stored, nothing more (P1).
        let text = match &job.stored_reply {
            Some(reply) => reply.clone(),
            // Stored before `stored_reply` existed: the assistant text.
            None => request::stored_answer(ctx, &job).await?.unwrap_or_default(),
        };
        if !text.trim().is_empty() {
            deliver(ctx, &job, lease, &text, &[]).await?;
        }
        return Ok(Outcome::Answered);
    }
    let mut request = build_request(ctx, &job).await?;
    // The rounds an earlier attempt stored: continued from, not redone.
    let answer = rounds::resume(ctx, &job, &mut request).await?;
    // Admission of the first call of a fresh job (the later ones, and the
    // first of a resumed job, whose stored rounds are charged already and
    // end with a notice if the balance stops it: in `generate`).
    let admitted = answer.stored.rounds == 0;
    if admitted {
        if let Admit::Refused { needed, available } = before_call(ctx, &job, &mut request, Decimal::ZERO).await? {
            deliver(ctx, &job, lease, &notices::needs_credit(needed, available), &[]).await?;
            return Ok(Outcome::NoBalance);
        }
    }
    let progress = Progress::start(
        ctx,
        job.chat_id,
        job.message_thread_id,
        job.reply_to(),
        job.is_private(),
        job.draft_id(),
        cancel.clone(),
    );
    let generated = generate(ctx, &job, lease, &mut request, cancel, &progress, answer, admitted).await;
    let progress_message = progress.finish().await;
    let answer = generated?;
    match cancel.reason() {
        Some(CancelReason::LeaseLost) => {
            finalize::record_abandoned(ctx, &job, lease, &answer.calls).await;
            return Err(JobError::LeaseLost);
        }
        Some(CancelReason::Shutdown) => {
            finalize::record_abandoned(ctx, &job, lease, &answer.calls).await;
            return Err(JobError::Shutdown);
        }
        Some(CancelReason::Stop | CancelReason::Blocked) | None => {}
    }
    let reply = answer.reply();
    // The answer and its charges must not be lost to a database restart:
    // finalize is retried on transient errors while the lease holds (the
    // heartbeat cancels the job once it has failed for a whole visibility
    // timeout). It is idempotent for one lease.
    let mut backoff = Policy::DbWrite.backoff();
    loop {
        match finalize(ctx, &job, lease, &answer.calls, &answer.turns(), !answer.notices.is_empty(), &reply).await {
            Err(e) if e.is_transient() => {
                let wait = backoff.next_or_last();
                tracing::warn!(error.message = %e, wait_ms = wait.as_millis() as u64, "storing the answer failed; retrying");
                tokio::time::sleep(wait).await;
                let gone = match cancel.reason() {
                    Some(CancelReason::LeaseLost) => Some(JobError::LeaseLost),
                    Some(CancelReason::Shutdown) => Some(JobError::Shutdown),
                    Some(CancelReason::Stop | CancelReason::Blocked) | None => None,
                };
                if let Some(e) = gone {
                    finalize::record_abandoned(ctx, &job, lease, &answer.calls).await;
                    return Err(e);
                }
            }
            Err(e @ (JobError::LeaseLost | JobError::Shutdown)) => {
                finalize::record_abandoned(ctx, &job, lease, &answer.calls).await;
                return Err(e);
            }
            Err(JobError::Db(e)) => {
                // Neither stored nor charged: the next attempt answers; what
                // this one cost is recorded if the database lets us.
                finalize::record_abandoned(ctx, &job, lease, &answer.calls).await;
                return Err(JobError::Db(e));
            }
            other => break other?,
        }
    }
    if cancel.reason() == Some(CancelReason::Blocked) {
        // 403: nothing more is sent; usage incurred so far is billed above.
        mark_blocked(ctx, job.user_id).await?;
        return Ok(Outcome::UserBlocked);
    }
    deliver(ctx, &job, lease, &reply, &progress_message).await?;
    Ok(Outcome::Answered)
}

/// The result of the generation step.
#[derive(Default)]
struct Answer {
    /// Every Messages API call since the last stored round (failed attempts
    /// included): the calls `finalize` (or `record_abandoned`) records.
    calls: Vec<CallRecord>,
    /// Closed turns after the user's: assistant (with tool_use), user
    /// (tool_result), … (the stored rounds' included).
    closed: Vec<(&'static str, Vec<serde_json::Value>)>,
    /// Blocks of the assistant turn being written.
    content: Vec<serde_json::Value>,
    /// Visible text, all calls.
    text: String,
    /// Notices appended to the reply (cut short, stopped, limits).
    notices: Vec<String>,
    /// Tools that cost something: (name, USD), the stored rounds' included.
    tool_charges: Vec<(String, rust_decimal::Decimal)>,
    /// What the stored rounds (of this attempt or an earlier one) cover.
    stored: rounds::Stored,
}

impl Answer {
    fn turns(&self) -> Vec<(&'static str, Vec<serde_json::Value>)> {
        let mut turns = self.closed.clone();
        if !self.content.is_empty() {
            turns.push(("assistant", self.content.clone()));
        }
        turns
    }

    fn reply(&self) -> String {
        let mut reply = self.text.trim().to_owned();
        if !self.tool_charges.is_empty() {
            self.notices_push(&mut reply, &notices::tools_used(&self.tool_charges));
        }
        for n in &self.notices {
            self.notices_push(&mut reply, n);
        }
        if reply.is_empty() {
            reply = if self.calls.iter().any(|c| c.state.stop_reason == Some(StopReason::Refusal)) {
                notices::DECLINED.to_owned()
            } else {
                notices::EMPTY_ANSWER.to_owned()
            };
        }
        reply
    }

    fn notices_push(&self, reply: &mut String, notice: &str) {
        if !reply.is_empty() {
            reply.push_str("\n\n");
        }
        reply.push_str(notice);
    }
}

/// Streams calls until the turn ends: runs tools and sends their results
/// back (up to `MAX_TOOL_ROUNDS`, at most `MAX_TOOL_CALLS_PER_ROUND` calls
/// run per round), continues after `max_tokens` (with a user turn asking to
/// continue, so models without prefill work) and after `pause_turn`, up to
/// `MAX_CONTINUATIONS`. The first call has been admitted by the caller;
/// every later call and every round of paid tools is admitted here
/// ([`admission`]), and a step the balance does not cover ends the answer
/// with what it has and a notice.
///
/// `answer` is what stored rounds made so far ([`rounds::resume`]; empty
/// for a fresh job), and `request` ends with them; each round completed
/// here is stored as it completes ([`rounds::store_round`]). `admitted`:
/// the caller admitted the first call.
#[expect(clippy::too_many_arguments, reason = "the job's whole generation state; each is a different borrow")]
async fn generate(
    ctx: &WorkerContext,
    job: &JobRow,
    lease: &ClaimedJob,
    request: &mut serde_json::Value,
    cancel: &JobCancel,
    progress: &Progress,
    mut answer: Answer,
    mut admitted: bool,
) -> Result<Answer, JobError> {
    let mut continuations = 0;
    // Stored rounds count towards the limit.
    let mut tool_rounds = answer.stored.rounds;
    loop {
        if !admitted {
            let spent = spent(ctx, &answer.calls, &answer.tool_charges)? + answer.stored.calls_charge;
            if let Admit::Refused { needed, available } = before_call(ctx, job, request, spent).await? {
                answer.notices.push(notices::balance_stops_answer(needed, available));
                return Ok(answer);
            }
        }
        admitted = false;
        let call = stream_reply(
            ctx,
            lease,
            request,
            answer.stored.last_seq,
            &mut answer.calls,
            cancel.token(),
            progress,
            &answer.text,
        )
        .await;
        // A call that failed on the provider's side (its retries too) is
        // neither shown nor kept in the history: its partial output is
        // dropped (DESIGN §6); it ends the answer below.
        let failed = matches!(call.end, CallEnd::Failed(_));
        let blocks = if failed { Vec::new() } else { call.state.content_blocks() };
        if !failed {
            answer.text.push_str(&call.state.text());
        }
        answer.content.extend(blocks.iter().cloned());
        match (&call.end, call.state.stop_reason.clone()) {
            (CallEnd::Complete, Some(StopReason::ToolUse)) => {
                let uses = call.state.tool_uses();
                if uses.is_empty() {
                    return Ok(answer);
                }
                if tool_rounds >= ctx.settings.max_tool_rounds {
                    answer.notices.push(notices::tool_round_limit(tool_rounds));
                    return Ok(answer);
                }
                tool_rounds += 1;
                let mut uses = uses;
                let limit = ctx.settings.max_tool_calls_per_round;
                let extra = uses.split_off(uses.len().min(usize::try_from(limit).unwrap_or(usize::MAX)));
                let price: Decimal = uses.iter().map(|(_, name, _)| ctx.prices.tool_price(name).0).sum();
                if price > Decimal::ZERO {
                    let spent = spent(ctx, &answer.calls, &answer.tool_charges)? + answer.stored.calls_charge;
                    if let Admit::Refused { needed, available } = before_tools(ctx, job, spent, price).await? {
                        answer.notices.push(notices::balance_stops_answer(needed, available));
                        return Ok(answer);
                    }
                }
                let mut outcomes = crate::tools::run_tools(ctx, job, lease, uses, cancel.token()).await?;
                if !extra.is_empty() {
                    tracing::warn!(
                        extra = extra.len(),
                        limit,
                        "tool calls beyond the per-round limit answered with an error, not run"
                    );
                }
                outcomes.extend(extra.into_iter().map(|(id, name, _)| crate::tools::ToolOutcome {
                    tool_use_id: id,
                    name,
                    content: notices::too_many_tool_calls(limit),
                    is_error: true,
                    charged: Decimal::ZERO,
                }));
                if cancel.token().is_cancelled() {
                    answer.notices.push(notices::STOPPED.to_owned());
                    return Ok(answer);
                }
                for o in &outcomes {
                    let outcome = if o.is_error { "error" } else { "ok" };
                    metrics::counter!("fleet_tool_calls_total", "tool" => o.name.clone(), "outcome" => outcome)
                        .increment(1);
                }
                answer
                    .tool_charges
                    .extend(outcomes.iter().filter(|o| !o.charged.is_zero()).map(|o| (o.name.clone(), o.charged)));
                let results: Vec<serde_json::Value> = outcomes.iter().map(crate::tools::ToolOutcome::block).collect();
                let assistant = std::mem::take(&mut answer.content);
                answer.closed.push(("assistant", assistant.clone()));
                answer.closed.push(("user", results.clone()));
                request::append_turns(request, blocks, None);
                request::append_blocks(request, "user", results.clone());
                if !answer.text.is_empty() && !answer.text.ends_with('\n') {
                    answer.text.push_str("\n\n");
                }
                // The round is complete: stored before the next call, so a
                // later attempt continues from here.
                rounds::store_round(ctx, job, lease, &mut answer, &assistant, &results).await?;
            }
            (CallEnd::Complete, Some(StopReason::MaxTokens)) => {
                if continuations >= ctx.settings.max_continuations {
                    answer.notices.push(notices::LIMIT.to_owned());
                    return Ok(answer);
                }
                continuations += 1;
                // A tool_use cut off by max_tokens is never run, and is not
                // sent back either (it would need a tool_result).
                let blocks: Vec<serde_json::Value> = blocks.into_iter().filter(|b| b["type"] != "tool_use").collect();
                answer.content.retain(|b| b["type"] != "tool_use");
                request::append_turns(
                    request,
                    blocks,
                    Some("Continue exactly where you stopped, without repeating anything."),
                );
            }
            (CallEnd::Complete, Some(StopReason::PauseTurn)) if continuations < ctx.settings.max_continuations => {
                continuations += 1;
                request::append_turns(request, blocks, None);
            }
            (CallEnd::Complete, Some(StopReason::Other(reason))) if reason == "model_context_window_exceeded" => {
                answer.notices.push(notices::CONTEXT_FULL.to_owned());
                return Ok(answer);
            }
            (CallEnd::Complete, other) => {
                if let Some(StopReason::Other(reason)) = other {
                    tracing::warn!(stop_reason = %reason, "unknown stop_reason treated as end of turn");
                }
                return Ok(answer);
            }
            (CallEnd::Cancelled, _) => {
                if cancel.reason() == Some(CancelReason::Stop) {
                    answer.notices.push(notices::STOPPED.to_owned());
                }
                return Ok(answer);
            }
            (CallEnd::IdleTimeout | CallEnd::Deadline, _) => {
                answer.notices.push(notices::TIMEOUT.to_owned());
                return Ok(answer);
            }
            (CallEnd::Failed(_), _) => {
                // A `retry-after` (429, 529) past the deadline: the user
                // hears the wait now, rounded, instead of waiting for it.
                let notice = match call.retry_after_s {
                    Some(s) => notices::busy_for(s),
                    None => notices::UNAVAILABLE.to_owned(),
                };
                answer.notices.push(notice);
                return Ok(answer);
            }
        }
    }
}

async fn mark_blocked(ctx: &WorkerContext, user_id: i64) -> Result<(), JobError> {
    Ok(crate::store::chats::mark_blocked(&ctx.db, user_id).await?)
}

async fn deliver(
    ctx: &WorkerContext,
    job: &JobRow,
    lease: &ClaimedJob,
    text: &str,
    reuse: &[crate::telegram::delivery::Shown],
) -> Result<(), JobError> {
    match crate::telegram::delivery::send_fenced_in(
        ctx,
        job.chat_id,
        job.message_thread_id,
        job.reply_to(),
        text,
        reuse,
        Some(lease),
    )
    .await
    {
        Ok(ids) => record_sent(ctx, lease, &ids).await,
        Err(DeliveryError::PartlyDelivered { sent, error }) => {
            // The user has the beginning of the answer: it is recorded as
            // sent (never sent again) and charged like a delivered answer.
            tracing::error!(error.message = %error, parts_sent = sent.len(), "the rest of the answer could not be delivered");
            metrics::counter!("fleet_answers_partly_delivered_total").increment(1);
            record_sent(ctx, lease, &sent).await
        }
        Err(DeliveryError::Blocked) => mark_blocked(ctx, job.user_id).await,
        Err(DeliveryError::LeaseLost) => Err(JobError::LeaseLost),
        // Every retry failed (5xx, network, within the delivery's
        // deadline): the user has nothing, so they pay nothing.
        Err(DeliveryError::Failed(e)) => Err(JobError::Undelivered(e)),
    }
}

/// Records the ids of the messages sent for the job. The user has them
/// now: recording that must not fail on a database blip (a later attempt
/// would send them again), so it is retried for as long as the lease can
/// still be ours; after that the job fails rather than being handed back
/// to send again ([`JobError::SentNotRecorded`]).
async fn record_sent(ctx: &WorkerContext, lease: &ClaimedJob, ids: &[i64]) -> Result<(), JobError> {
    let mut backoff = Policy::DbWrite.backoff();
    let started = tokio::time::Instant::now();
    let visibility = std::time::Duration::from_secs(ctx.settings.visibility_timeout_s);
    loop {
        match lease.record_reply(&ctx.db, ids).await.map_err(JobError::from) {
            Ok(_) => return Ok(()),
            Err(e) if e.is_transient() && started.elapsed() < visibility => {
                tracing::warn!(error.message = %e, "recording the sent answer failed; retrying");
                tokio::time::sleep(backoff.next_or_last()).await;
            }
            Err(e) => return Err(JobError::SentNotRecorded(e.to_string())),
        }
    }
}
