//! Holds on a user's balance (two-phase spending, DESIGN §5.4): before the
//! first Claude call a job reserves what its answer can cost at most, so
//! concurrent chats of one user cannot overspend. Available balance =
//! ledger balance − active holds. A job's `hold_release` event settles its
//! hold ([`crate::ledger::apply_batch`]); a job that fails or is handed back
//! voids it ([`void`]); expired ones are swept ([`sweep_expired`]).
//!
//! The worker calls [`place`], [`void`] and [`available`] as the
//! `fleet_worker` role, which has no privilege on the billing tables: they
//! run the SECURITY DEFINER functions of
//! `migrations/billing/20261130950001_roles.sql` (issue 13, least privilege).

use rust_decimal::Decimal;
use sqlx::PgPool;
use std::time::Duration;
use uuid::Uuid;

/// What [`place`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// True when the hold is active now; false when the available balance
    /// does not cover it (nothing was reserved).
    pub placed: bool,
    /// The available balance the function saw, USD (ledger balance − the
    /// user's other active holds).
    pub available: Decimal,
}

/// Places (or re-activates) `job_id`'s hold of `amount` USD on `user_id`'s
/// balance if the available balance covers it; the hold expires after
/// `lifetime` unless settled or voided first. A settled hold stays settled.
///
/// # Errors
/// Database errors; a negative or NaN amount (SQLSTATE 22023).
pub async fn place(
    db: &PgPool,
    job_id: Uuid,
    user_id: i64,
    amount: Decimal,
    lifetime: Duration,
) -> Result<Placement, sqlx::Error> {
    let (placed, available): (bool, Decimal) =
        sqlx::query_as("SELECT placed, available FROM fleet_place_hold($1, $2, $3, $4)")
            .bind(job_id)
            .bind(user_id)
            .bind(amount)
            .bind(lifetime.as_secs_f64())
            .fetch_one(db)
            .await?;
    Ok(Placement { placed, available })
}

/// Voids `job_id`'s active hold (the job failed or was handed back);
/// harmless when there is none.
///
/// # Errors
/// Database errors.
pub async fn void(db: &PgPool, job_id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT fleet_void_hold($1)").bind(job_id).execute(db).await?;
    Ok(())
}

/// `user_id`'s available balance, USD: ledger balance − active holds (zero
/// balance without an account).
///
/// # Errors
/// Database errors.
pub async fn available(db: &PgPool, user_id: i64) -> Result<Decimal, sqlx::Error> {
    sqlx::query_scalar("SELECT fleet_available_balance($1)").bind(user_id).fetch_one(db).await
}

/// Voids holds whose job never released them (crashed, abandoned) once
/// they expired; returns how many. Runs as the billing-worker's role.
///
/// # Errors
/// Database errors.
pub async fn sweep_expired(db: &PgPool) -> Result<u64, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE holds SET status = 'voided', updated_at = now() WHERE status = 'active' AND expires_at < now()",
    )
    .execute(db)
    .await?;
    Ok(r.rows_affected())
}
