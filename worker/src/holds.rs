//! Holds on the user's balance (two-phase spending, DESIGN §5.4): before the
//! first Claude call a job reserves what its answer can cost at most, so
//! concurrent chats of one user cannot overspend. Available balance =
//! ledger balance − active holds. The job's `hold_release` event, relayed
//! after its charges, settles the hold in the billing-worker; a job that
//! fails or is handed back voids it here; the billing-worker sweeps expired ones.
//!
//! The holds themselves belong to the `billing` crate ([`billing::holds`]):
//! this module sizes them and calls its API.

use crate::context::WorkerContext;
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

/// Places (or re-activates) the hold of job `job_id` (user `user_id`, amount in USD) if the available balance covers
/// it. `Ok(false)`: it does not; nothing was reserved.
///
/// Through [`billing::holds::place`]: the worker's role may not touch the
/// billing tables itself (issue 13, least privilege).
///
/// # Errors
/// Database errors (billing database).
pub async fn place(ctx: &WorkerContext, job_id: Uuid, user_id: i64, amount: Decimal) -> Result<bool, sqlx::Error> {
    let lifetime =
        Duration::from_secs(ctx.settings.stream_deadline_s * u64::from(2 + ctx.settings.max_continuations) + 600);
    let placement = billing::holds::place(&ctx.billing_db, job_id, user_id, amount, lifetime).await?;
    if !placement.placed {
        tracing::info!(available = %placement.available, hold = %amount, "balance does not cover the hold");
    }
    Ok(placement.placed)
}

/// Voids the job's hold (failure, hand-back); harmless when there is none.
pub async fn void(ctx: &WorkerContext, job_id: Uuid) {
    if let Err(e) = billing::holds::void(&ctx.billing_db, job_id).await {
        // The billing-worker's sweeper voids it when it expires.
        tracing::warn!(error.message = %e, "could not void the hold");
    }
}

/// The user's available balance: ledger balance − active holds.
///
/// # Errors
/// Database errors (billing database).
pub async fn available(ctx: &WorkerContext, user_id: i64) -> Result<Decimal, sqlx::Error> {
    billing::holds::available(&ctx.billing_db, user_id).await
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// Issue 14: the billing database has one owner, the `billing` crate.
    /// The needles are split so this file does not find itself.
    #[test]
    fn no_worker_source_runs_sql_on_the_billing_database() {
        let query = concat!("sqlx", "::query");
        let pool = concat!("billing", "_db");
        let billing_sql = [
            concat!("fleet_", "place_hold"),
            concat!("fleet_", "void_hold"),
            concat!("fleet_", "available_balance"),
            concat!("fleet_", "user_entries"),
            concat!("ledger", "_entries"),
            concat!("applied", "_events"),
            concat!("billing", "_failures"),
            concat!("FROM ", "holds"),
            concat!("UPDATE ", "holds"),
            concat!("INTO ", "holds"),
        ];
        let mut files = Vec::new();
        rust_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut files);
        assert!(files.len() > 20, "scanned {} files", files.len());
        let mut found = Vec::new();
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            let lines: Vec<&str> = text.lines().collect();
            for (i, line) in lines.iter().enumerate() {
                let at = format!("{}:{}", file.display(), i + 1);
                if let Some(name) = billing_sql.iter().find(|n| line.contains(*n)) {
                    found.push(format!("{at}: {name}"));
                }
                if line.contains(pool) {
                    let near = &lines[i.saturating_sub(5)..(i + 6).min(lines.len())];
                    if near.iter().any(|l| l.contains(query)) {
                        found.push(format!("{at}: a query near the billing pool"));
                    }
                }
            }
        }
        assert!(found.is_empty(), "billing-database SQL in the worker (call the billing crate):\n{}", found.join("\n"));
    }
}
