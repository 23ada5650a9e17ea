//! Keeping a claimed job's lease alive (DESIGN §5): heartbeats while the
//! job runs, and the job cancelled the moment the lease is lost or `/stop`
//! is requested. The claim and the fenced writes are in
//! [`crate::store::jobs`].

use crate::cancel::{CancelReason, JobCancel};
use crate::store::jobs::{Beat, ClaimedJob};
use sqlx::PgPool;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Heartbeats every third of `visibility` until `stop` is cancelled;
/// cancels the job the moment the lease is found lost or a stop requested.
pub async fn keep_alive(db: PgPool, lease: ClaimedJob, visibility: Duration, stop: CancellationToken, job: JobCancel) {
    let period = visibility / 3;
    let mut first = true;
    let mut last_good = tokio::time::Instant::now();
    loop {
        // The first beat is immediate: a /stop that raced the claim is seen at once.
        let wait = if first { Duration::ZERO } else { period };
        first = false;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        match lease.heartbeat(&db, visibility).await {
            Ok(Beat::Held) => last_good = tokio::time::Instant::now(),
            Ok(Beat::StopRequested) => {
                last_good = tokio::time::Instant::now();
                job.cancel(CancelReason::Stop);
            }
            Ok(Beat::Lost) => {
                tracing::warn!(job_id = %lease.job_id(), epoch = lease.epoch(), "lease lost; stopping the job");
                job.cancel(CancelReason::LeaseLost);
                return;
            }
            // The database is unreachable: keep trying while the lease may
            // still be ours; once it must have expired, another worker may
            // hold the job, so this one stops.
            Err(e) => {
                tracing::warn!(error.message = %e, "heartbeat failed");
                if last_good.elapsed() >= visibility {
                    tracing::warn!(job_id = %lease.job_id(), "no heartbeat for a whole visibility timeout; stopping the job");
                    job.cancel(CancelReason::LeaseLost);
                    return;
                }
            }
        }
    }
}
