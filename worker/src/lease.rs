//! Leases on jobs (DESIGN §5): a claim sets the owner, an expiry (now +
//! visibility timeout) and a new, larger `lease_epoch`; every later write of
//! the job matches `(job_id, status 'running', lease_epoch)` — zero rows
//! means a newer holder exists and this worker must stop (fencing).

use crate::control::{CancelReason, JobCancel};
use crate::intake::JobRef;
use sqlx::PgPool;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A held lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The job.
    pub job_id: Uuid,
    /// Fencing token: larger than every earlier claim of the job.
    pub epoch: i64,
    /// Attempts so far, this one included.
    pub attempts: i32,
}

/// Result of a claim.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// The lease is ours.
    Claimed(Lease),
    /// Another job of the chat runs, or an older one waits: try later.
    ChatBusy,
    /// The job is finished or held by a live lease elsewhere: nothing to do.
    NotClaimable,
    /// The job used up its attempts and was marked failed now.
    AttemptsExhausted,
}

/// Claims `job` for `owner` if it is queued (or its lease expired), no other
/// job of the chat runs and no older job of the chat waits.
///
/// # Errors
/// Database errors (a unique violation of the one-running-job index is `ChatBusy`).
pub async fn claim(
    db: &PgPool,
    job: &JobRef,
    owner: &str,
    visibility: Duration,
    max_attempts: i32,
) -> Result<Claim, sqlx::Error> {
    let exhausted = sqlx::query(
        "UPDATE jobs SET status = 'failed', outcome = 'attempts_exhausted', lease_owner = NULL,
                lease_expires_at = NULL, finished_at = now()
          WHERE job_id = $1 AND attempts >= $2
            AND (status = 'queued' OR (status = 'running' AND lease_expires_at < now()))",
    )
    .bind(job.job_id)
    .bind(max_attempts)
    .execute(db)
    .await?;
    if exhausted.rows_affected() == 1 {
        return Ok(Claim::AttemptsExhausted);
    }
    let claimed: Result<Option<(i64, i32)>, sqlx::Error> = sqlx::query_as(
        "UPDATE jobs SET status = 'running', lease_owner = $2, lease_epoch = lease_epoch + 1,
                lease_expires_at = now() + make_interval(secs => $3), attempts = attempts + 1,
                started_at = COALESCE(started_at, now())
          WHERE job_id = $1
            AND (status = 'queued' OR (status = 'running' AND lease_expires_at < now()))
            AND NOT EXISTS (
                SELECT 1 FROM jobs o
                 WHERE o.chat_id = jobs.chat_id AND o.job_id <> jobs.job_id
                   AND ((o.status = 'running' AND o.lease_expires_at >= now())
                        OR (o.status = 'queued' AND o.update_id < jobs.update_id)))
          RETURNING lease_epoch, attempts",
    )
    .bind(job.job_id)
    .bind(owner)
    .bind(visibility.as_secs_f64())
    .fetch_optional(db)
    .await;
    match claimed {
        Ok(Some((epoch, attempts))) => Ok(Claim::Claimed(Lease { job_id: job.job_id, epoch, attempts })),
        Ok(None) => {
            let waiting: bool = sqlx::query_scalar(
                "SELECT status = 'queued' OR (status = 'running' AND lease_expires_at < now()) FROM jobs WHERE job_id = $1",
            )
            .bind(job.job_id)
            .fetch_optional(db)
            .await?
            .unwrap_or(false);
            Ok(if waiting { Claim::ChatBusy } else { Claim::NotClaimable })
        }
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Ok(Claim::ChatBusy),
        Err(e) => Err(e),
    }
}

/// What a heartbeat found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// Extended.
    Held,
    /// Extended, and `/stop` was requested for the job.
    StopRequested,
    /// Lost: a newer epoch exists, or the job left `running`.
    Lost,
}

/// Extends the lease.
///
/// # Errors
/// Database errors.
pub async fn heartbeat(db: &PgPool, lease: &Lease, visibility: Duration) -> Result<Beat, sqlx::Error> {
    let r: Option<bool> = sqlx::query_scalar(
        "UPDATE jobs SET lease_expires_at = now() + make_interval(secs => $3)
          WHERE job_id = $1 AND status = 'running' AND lease_epoch = $2
          RETURNING cancel_requested_at IS NOT NULL",
    )
    .bind(lease.job_id)
    .bind(lease.epoch)
    .bind(visibility.as_secs_f64())
    .fetch_optional(db)
    .await?;
    Ok(match r {
        None => Beat::Lost,
        Some(true) => Beat::StopRequested,
        Some(false) => Beat::Held,
    })
}

/// Heartbeats every third of `visibility` until `stop` is cancelled;
/// cancels the job the moment the lease is found lost or a stop requested.
pub async fn keep_alive(db: PgPool, lease: Lease, visibility: Duration, stop: CancellationToken, job: JobCancel) {
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
        match heartbeat(&db, &lease, visibility).await {
            Ok(Beat::Held) => last_good = tokio::time::Instant::now(),
            Ok(Beat::StopRequested) => {
                last_good = tokio::time::Instant::now();
                job.cancel(CancelReason::Stop);
            }
            Ok(Beat::Lost) => {
                tracing::warn!(job_id = %lease.job_id, epoch = lease.epoch, "lease lost; stopping the job");
                job.cancel(CancelReason::LeaseLost);
                return;
            }
            // The database is unreachable: keep trying while the lease may
            // still be ours; once it must have expired, another worker may
            // hold the job, so this one stops.
            Err(e) => {
                tracing::warn!(error.message = %e, "heartbeat failed");
                if last_good.elapsed() >= visibility {
                    tracing::warn!(job_id = %lease.job_id, "no heartbeat for a whole visibility timeout; stopping the job");
                    job.cancel(CancelReason::LeaseLost);
                    return;
                }
            }
        }
    }
}

/// Ends the job: terminal `status` and `outcome`, lease cleared. Fenced:
/// `Ok(false)` means the lease was lost and nothing was written.
///
/// # Errors
/// Database errors.
pub async fn finish(
    db: &PgPool,
    lease: &Lease,
    status: &str,
    outcome: &str,
    error: Option<&str>,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE jobs SET status = $3, outcome = $4, last_error = $5, lease_owner = NULL,
                lease_expires_at = NULL, finished_at = now()
          WHERE job_id = $1 AND status = 'running' AND lease_epoch = $2",
    )
    .bind(lease.job_id)
    .bind(lease.epoch)
    .bind(status)
    .bind(outcome)
    .bind(error)
    .execute(db)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Hands the job back: `queued` again with no owner, so the next worker
/// that sees it claims it (graceful shutdown, a database that went away).
/// With `refund_attempt` the attempt is not counted: the job was
/// interrupted by the infrastructure, not by something about it. Fenced.
///
/// # Errors
/// Database errors.
pub async fn hand_back(db: &PgPool, lease: &Lease, refund_attempt: bool) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE jobs SET status = 'queued', lease_owner = NULL, lease_expires_at = NULL,
                attempts = CASE WHEN $3 THEN greatest(attempts - 1, 0) ELSE attempts END
          WHERE job_id = $1 AND status = 'running' AND lease_epoch = $2",
    )
    .bind(lease.job_id)
    .bind(lease.epoch)
    .bind(refund_attempt)
    .execute(db)
    .await?;
    Ok(r.rows_affected() == 1)
}
