//! The reaper (every worker runs one): finds jobs whose lease expired (a
//! crashed or hung holder) or that sat queued with no message in flight,
//! and republishes them so the next worker claims them with a new epoch.
//! `FOR UPDATE SKIP LOCKED` and `reaped_at` keep reapers from colliding and
//! from republishing one job again and again. It also books the calls
//! that dead attempts left `open` ([`crate::job::book_orphaned_calls`]).

use crate::context::WorkerContext;
use crate::queues::work::republish_job;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Republishes the jobs due now; returns how many.
///
/// # Errors
/// Database errors.
pub async fn reap_once(ctx: &WorkerContext) -> Result<usize, sqlx::Error> {
    let visibility = ctx.settings.visibility_timeout_s as f64;
    let mut tx = shared::db::begin(&ctx.db).await?;
    let due = crate::store::jobs::due_for_reaping(&mut tx, visibility).await?;
    let mut done = Vec::new();
    for (job_id, update_id) in &due {
        match republish_job(ctx, *update_id).await {
            Ok(()) => done.push(*job_id),
            Err(e) => {
                tracing::warn!(error.message = %e, "reaper could not republish; will retry");
                break;
            }
        }
    }
    crate::store::jobs::mark_reaped(&mut tx, &done).await?;
    tx.commit().await?;
    metrics::counter!("fleet_reaper_rescues_total").increment(done.len() as u64);
    if !done.is_empty() {
        tracing::info!(jobs = done.len(), "reaper republished jobs with expired leases");
    }
    Ok(done.len())
}

/// Runs the reaper every half visibility timeout until `shutdown`.
pub async fn run(ctx: WorkerContext, shutdown: CancellationToken) {
    let period = Duration::from_secs(ctx.settings.visibility_timeout_s.max(2) / 2);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        if let Err(e) = reap_once(&ctx).await {
            tracing::warn!(error.message = %e, "reaper pass failed");
        }
        // A job that ended without its calls recorded (failed, attempts
        // used up) gets no next attempt to book them: the reaper does.
        if let Err(e) = crate::job::book_orphaned_calls(&ctx, None).await {
            tracing::warn!(error.message = %e, "booking orphaned calls failed");
        }
    }
}
