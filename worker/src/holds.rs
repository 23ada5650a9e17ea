//! Holds on the user's balance (two-phase spending, DESIGN §5.4): before the
//! first Claude call a job reserves what its answer can cost at most, so
//! concurrent chats of one user cannot overspend. Available balance =
//! ledger balance − active holds. The job's `hold_release` event, relayed
//! after its charges, settles the hold in the billing-worker; a job that
//! fails or is handed back voids it here; the billing-worker sweeps expired ones.

use crate::context::WorkerContext;
use crate::job::JobRow;
use rust_decimal::Decimal;
use serde_json::Value;
use std::time::Duration;
use uuid::Uuid;

/// Characters per token assumed for the input part of a hold (a
/// reservation, not a charge: charges come from reported usage, P8).
const CHARS_PER_TOKEN: u64 = 3;

/// What the job may cost at most, USD: the request's input (estimated from
/// its size) and `max_tokens` of output for every call the job may make
/// (first call + continuations), marked up, plus the priciest tool for every
/// tool round.
pub fn hold_amount(ctx: &WorkerContext, request: &Value) -> Decimal {
    let on = chrono::Utc::now().date_naive();
    let Some(row) = ctx.prices.row_for(&ctx.settings.model, on) else {
        // Unknown model: pricing will fail loudly later; hold nothing extra.
        return Decimal::ZERO;
    };
    let input_tokens = Decimal::from(request.to_string().len() as u64 / CHARS_PER_TOKEN + 1);
    let output_tokens = Decimal::from(ctx.settings.max_tokens);
    let calls = Decimal::from(1 + ctx.settings.max_continuations);
    let per_call = (input_tokens * row.input + output_tokens * row.output) / Decimal::from(1_000_000);
    let tools =
        ctx.prices.tools.values().copied().max().unwrap_or_default() * Decimal::from(ctx.settings.max_tool_rounds);
    (per_call * calls * ctx.prices.markup + tools).round_dp(6)
}

/// Places (or re-activates) the job's hold if the available balance covers
/// it. `Ok(false)`: it does not; nothing was reserved.
///
/// Runs as the billing database's `fleet_place_hold` function: the worker's
/// role may not touch the billing tables itself (issue 13, least privilege).
///
/// # Errors
/// Database errors (billing database).
pub async fn place(ctx: &WorkerContext, job: &JobRow, amount: Decimal) -> Result<bool, sqlx::Error> {
    let lifetime =
        Duration::from_secs(ctx.settings.stream_deadline_s * u64::from(2 + ctx.settings.max_continuations) + 600);
    let (placed, available): (bool, Decimal) =
        sqlx::query_as("SELECT placed, available FROM fleet_place_hold($1, $2, $3, $4)")
            .bind(job.job_id)
            .bind(job.user_id)
            .bind(amount)
            .bind(lifetime.as_secs_f64())
            .fetch_one(&ctx.billing_db)
            .await?;
    if !placed {
        tracing::info!(%available, hold = %amount, "balance does not cover the hold");
    }
    Ok(placed)
}

/// Voids the job's hold (failure, hand-back); harmless when there is none.
pub async fn void(ctx: &WorkerContext, job_id: Uuid) {
    let r = sqlx::query("SELECT fleet_void_hold($1)").bind(job_id).execute(&ctx.billing_db).await;
    if let Err(e) = r {
        // The billing-worker's sweeper voids it when it expires.
        tracing::warn!(error.message = %e, "could not void the hold");
    }
}

/// The user's available balance: ledger balance − active holds.
///
/// # Errors
/// Database errors (billing database).
pub async fn available(ctx: &WorkerContext, user_id: i64) -> Result<Decimal, sqlx::Error> {
    sqlx::query_scalar("SELECT fleet_available_balance($1)").bind(user_id).fetch_one(&ctx.billing_db).await
}
