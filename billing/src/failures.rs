//! Dead-lettered billing events (`billing_failures`), for finance: listed
//! by the id of the event (the id `reconcile` reports and `explain`,
//! `redrive` take), and discarded with a reason when they must never apply
//! (`migrations/billing/20261201400001_dead_letter_discards.sql`). A
//! redriven event that applies is resolved by [`crate::ledger::apply_batch`].

use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

/// Where a failure stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureStatus {
    /// Dead-lettered and waiting for finance: redrive it or discard it.
    Pending,
    /// Applied since (after a redrive).
    Applied,
    /// Discarded by finance with a reason; never applied.
    Discarded,
}

impl FailureStatus {
    /// `pending`, `applied` or `discarded`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Applied => "applied",
            Self::Discarded => "discarded",
        }
    }
}

/// One dead-lettered billing event.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// The event's id (for a body that was not a billing event, its
    /// `event_id` field when it has one, else an id derived from the bytes).
    pub event_id: Uuid,
    /// Deliveries tried.
    pub attempts: i32,
    /// The last error.
    pub last_error: String,
    /// The event as received (`None` when it was not JSON).
    pub payload: Option<Value>,
    /// When it was dead-lettered.
    pub dead_lettered_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Pending, applied or discarded.
    pub status: FailureStatus,
    /// When it was discarded.
    pub discarded_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Why it was discarded.
    pub discard_reason: Option<String>,
}

impl Failure {
    /// A string field of the payload (`type`, `job_id`, …).
    pub fn field(&self, key: &str) -> Option<String> {
        let v = self.payload.as_ref()?.get(key)?;
        Some(v.as_str().map_or_else(|| v.to_string(), str::to_owned))
    }
}

/// Dead-lettered events, oldest first: the pending ones, or with `all`
/// also those applied or discarded since.
///
/// # Errors
/// Database errors.
pub async fn list(db: &PgPool, all: bool) -> Result<Vec<Failure>, sqlx::Error> {
    type Row = (
        Uuid,
        i32,
        String,
        Option<Value>,
        Option<chrono::DateTime<chrono::Utc>>,
        Option<chrono::DateTime<chrono::Utc>>,
        Option<chrono::DateTime<chrono::Utc>>,
        Option<String>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT event_id, attempts, last_error, payload, dead_lettered_at, resolved_at, discarded_at, discard_reason
           FROM billing_failures
          WHERE $1 OR resolved_at IS NULL
          ORDER BY COALESCE(dead_lettered_at, updated_at), event_id",
    )
    .bind(all)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(event_id, attempts, last_error, payload, dead_lettered_at, resolved, discarded_at, discard_reason)| {
            let status = match (resolved, discarded_at) {
                (None, _) => FailureStatus::Pending,
                (Some(_), Some(_)) => FailureStatus::Discarded,
                (Some(_), None) => FailureStatus::Applied,
            };
            Failure { event_id, attempts, last_error, payload, dead_lettered_at, status, discarded_at, discard_reason }
        })
        .collect())
}

/// What [`discard`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discarded {
    /// Discarded now.
    Now,
    /// It had been discarded before (nothing changed), with this reason.
    Before {
        /// When.
        at: chrono::DateTime<chrono::Utc>,
        /// The reason given then.
        reason: String,
    },
}

/// Why a failure cannot be discarded.
#[derive(Debug, thiserror::Error)]
pub enum DiscardError {
    /// No dead letter has this id.
    #[error("no dead-lettered billing event with id {0}")]
    Unknown(Uuid),
    /// The event has been applied to the ledger: refund it instead.
    #[error("event {0} has been applied to the ledger; it cannot be discarded (refund it instead)")]
    Applied(Uuid),
    /// An empty reason.
    #[error("a reason is required")]
    NoReason,
    /// Database errors.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

/// Marks the pending failure of `event_id` resolved without applying it,
/// recording when and `reason`. Idempotent: a failure discarded before is
/// left as it was ([`Discarded::Before`]).
///
/// # Errors
/// [`DiscardError`]: unknown id, an event already applied, an empty reason.
pub async fn discard(db: &PgPool, event_id: Uuid, reason: &str) -> Result<Discarded, DiscardError> {
    let reason = reason.trim();
    if reason.is_empty() {
        return Err(DiscardError::NoReason);
    }
    let mut tx = shared::db::begin(db).await?;
    type At = Option<chrono::DateTime<chrono::Utc>>;
    let row: Option<(At, At, Option<String>)> = sqlx::query_as(
        "SELECT resolved_at, discarded_at, discard_reason FROM billing_failures WHERE event_id = $1 FOR UPDATE",
    )
    .bind(event_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((resolved, discarded_at, discard_reason)) = row else { return Err(DiscardError::Unknown(event_id)) };
    if let (Some(at), Some(reason)) = (discarded_at, discard_reason) {
        return Ok(Discarded::Before { at, reason });
    }
    let applied: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM applied_events WHERE event_id = $1)")
        .bind(event_id)
        .fetch_one(&mut *tx)
        .await?;
    if applied || resolved.is_some() {
        return Err(DiscardError::Applied(event_id));
    }
    sqlx::query(
        "UPDATE billing_failures SET discarded_at = now(), discard_reason = $2, resolved_at = now(), updated_at = now()
          WHERE event_id = $1",
    )
    .bind(event_id)
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Discarded::Now)
}
