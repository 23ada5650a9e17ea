//! Admission (issue 15): nothing is spent that the user's balance does not
//! cover. Before **every** Messages API call (the first, each tool round,
//! each continuation or `pause_turn`) the job's hold is placed at
//!
//! > what the job has spent so far + that call's worst case
//!
//! and before a round of paid tools at what it has spent so far + the
//! prices of those tools, each time atomically against the available
//! balance ([`crate::holds::place`]). When the balance does not cover a
//! call at `ANTHROPIC_MAX_TOKENS`, the call is made with a lower
//! `max_tokens` the balance does cover, down to `MIN_MAX_TOKENS`; below
//! that the step is refused and the job stops calling.
//!
//! Why the balance cannot go below zero: a job's charges are its calls'
//! usage charges and its tool charges. A complete call is billed at most
//! its worst case ([`crate::holds::call_worst_case`]: its input bound at the
//! dearest input rate, `max_tokens` at the output rate, every allowed web
//! search); a call cut short is billed its input and the output counted on
//! what it generated, within `max_tokens`; a failed call is charged to
//! nobody; a tool is charged its table price. So at every moment the job's
//! charges so far are at most its hold, and the holds of one user together
//! never exceed their balance (the hold function checks the others under a
//! lock on the account row). Charges already applied to the ledger while
//! the job runs (its tool charges) are counted twice until the hold is
//! settled: conservative, never an overspend.

use super::{CallEnd, CallRecord, JobError, JobRow};
use crate::context::WorkerContext;
use crate::holds::{self, CallBound};
use rust_decimal::Decimal;
use serde_json::Value;
use shared::pricing::{ModelPrice, PricingError};

/// Placements tried with a lower `max_tokens` before a call is refused.
const REDUCED_ATTEMPTS: usize = 8;

/// The verdict on one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// The hold covers the step: go on (the request's `max_tokens` may have
    /// been lowered).
    Go,
    /// The balance does not cover the step; nothing was reserved for it.
    Refused {
        /// The least the step needs, USD (a call: at the smallest `max_tokens`).
        needed: Decimal,
        /// What the user's balance has free for it, USD: available balance
        /// (ledger balance − the user's other holds) − this job's spending so far.
        available: Decimal,
    },
}

/// What the job has spent so far, USD, as it will be charged: every
/// complete call at its reported usage, priced and marked up as `finalize`
/// prices it; a call cut short at its worst case (it is billed on a count
/// within its `max_tokens`); a failed call at nothing (charged to nobody);
/// and the tool charges. The calls of stored tool rounds are not in
/// `calls`: the caller adds what they charge (`rounds::Stored::calls_charge`;
/// their events wait in the outbox until the job ends, so the ledger
/// balance does not show them yet).
///
/// # Errors
/// `Pricing` when a call's model has no price row.
pub fn spent(
    ctx: &WorkerContext,
    calls: &[CallRecord],
    tool_charges: &[(String, Decimal)],
) -> Result<Decimal, JobError> {
    let today = chrono::Utc::now().date_naive();
    let mut total: Decimal = tool_charges.iter().map(|(_, price)| *price).sum();
    for call in calls.iter().filter(|c| c.state.started) {
        let model = call.state.model.clone().unwrap_or_else(|| ctx.settings.model.clone());
        total += match &call.end {
            CallEnd::Complete => ctx.prices.price_call(&model, today, &call.state.usage.token_counts())?.user_charge.0,
            CallEnd::Failed(_) => Decimal::ZERO,
            CallEnd::Cancelled | CallEnd::IdleTimeout | CallEnd::Deadline => {
                holds::call_worst_case(&ctx.prices, row(ctx, &model)?, &CallBound::of(&call.request))
            }
        };
    }
    Ok(total)
}

fn row<'a>(ctx: &'a WorkerContext, model: &str) -> Result<&'a ModelPrice, JobError> {
    let on = chrono::Utc::now().date_naive();
    ctx.prices
        .row_for(model, on)
        .ok_or_else(|| JobError::Pricing(PricingError::UnknownModel { model: model.to_owned(), on }))
}

/// The smallest `max_tokens` a call is made with: `MIN_MAX_TOKENS`, at most
/// `ANTHROPIC_MAX_TOKENS`, and above the thinking budget when thinking is on
/// (the API requires `budget_tokens < max_tokens`).
pub fn floor_max_tokens(ctx: &WorkerContext) -> u64 {
    let floor = u64::from(ctx.settings.min_max_tokens.min(ctx.settings.max_tokens));
    if ctx.settings.thinking_budget_tokens > 0 {
        floor.max(u64::from(ctx.settings.thinking_budget_tokens) + 1)
    } else {
        floor
    }
}

/// Admits the next Messages API call of `request` for a job that has spent
/// `spent` USD: sets the request's `max_tokens` to `ANTHROPIC_MAX_TOKENS`,
/// or lower (down to [`floor_max_tokens`]) when the balance covers only
/// that, and places the hold at `spent` + the call's worst case.
///
/// # Errors
/// Billing-database errors; `Pricing` for a model without a price row.
pub async fn before_call(
    ctx: &WorkerContext,
    job: &JobRow,
    request: &mut Value,
    spent: Decimal,
) -> Result<Admit, JobError> {
    let row = row(ctx, &ctx.settings.model)?;
    let configured = u64::from(ctx.settings.max_tokens);
    request["max_tokens"] = Value::from(configured);
    let bound = CallBound::of(request);
    let worst = holds::call_worst_case(&ctx.prices, row, &bound);
    let placement = holds::place(ctx, job.job_id, job.user_id, spent + worst).await?;
    if placement.placed {
        metrics::counter!("fleet_admissions_total", "step" => "call", "verdict" => "full").increment(1);
        return Ok(Admit::Go);
    }
    let floor = floor_max_tokens(ctx);
    let least = holds::call_worst_case(&ctx.prices, row, &CallBound { max_tokens: floor, ..bound });
    let mut available = placement.available - spent;
    // The balance can move between two placements (another chat's hold, a
    // charge applied): the lower max_tokens is recomputed from what the
    // last placement saw, up to [`REDUCED_ATTEMPTS`] times (a user's tool
    // charges are applied one by one while the job runs).
    for _ in 0..REDUCED_ATTEMPTS {
        let Some(affordable) = holds::affordable_max_tokens(&ctx.prices, row, &bound, available) else { break };
        if affordable < floor {
            break;
        }
        let max_tokens = affordable.min(configured);
        let worst = holds::call_worst_case(&ctx.prices, row, &CallBound { max_tokens, ..bound });
        let placement = holds::place(ctx, job.job_id, job.user_id, spent + worst).await?;
        if placement.placed {
            request["max_tokens"] = Value::from(max_tokens);
            tracing::info!(max_tokens, configured, "the balance covers a shorter answer: max_tokens lowered");
            metrics::counter!("fleet_admissions_total", "step" => "call", "verdict" => "reduced").increment(1);
            return Ok(Admit::Go);
        }
        available = placement.available - spent;
    }
    request["max_tokens"] = Value::from(configured);
    metrics::counter!("fleet_admissions_total", "step" => "call", "verdict" => "refused").increment(1);
    tracing::info!(%spent, needed = %least, %available, "the balance does not cover the next call");
    Ok(Admit::Refused { needed: least, available })
}

/// Admits a round of tools whose prices add up to `price` USD for a job
/// that has spent `spent` USD: places the hold at `spent + price`.
///
/// # Errors
/// Billing-database errors.
pub async fn before_tools(
    ctx: &WorkerContext,
    job: &JobRow,
    spent: Decimal,
    price: Decimal,
) -> Result<Admit, JobError> {
    let placement = holds::place(ctx, job.job_id, job.user_id, spent + price).await?;
    if placement.placed {
        metrics::counter!("fleet_admissions_total", "step" => "tools", "verdict" => "full").increment(1);
        return Ok(Admit::Go);
    }
    metrics::counter!("fleet_admissions_total", "step" => "tools", "verdict" => "refused").increment(1);
    tracing::info!(%spent, needed = %price, available = %placement.available, "the balance does not cover the round's tools");
    Ok(Admit::Refused { needed: price, available: placement.available - spent })
}
