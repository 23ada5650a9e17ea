//! `billing_outbox`: billing events written in the transaction that commits
//! what they charge for, and the relay's reads and marks (DESIGN §5.4).

use serde_json::Value;
use shared::contracts::BillingEvent;
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

/// Writes `event` to the outbox inside the caller's transaction (the one
/// that commits what the event charges for). Writing the same event id again
/// does nothing.
///
/// # Errors
/// Database errors (an event that does not serialize is a `Protocol` error).
pub async fn write(conn: &mut PgConnection, event: &BillingEvent, job_id: Option<Uuid>) -> Result<(), sqlx::Error> {
    let payload = serde_json::to_value(event)
        .map_err(|e| sqlx::Error::Protocol(format!("billing event does not serialize: {e}")))?;
    sqlx::query(
        "INSERT INTO billing_outbox (event_id, job_id, payload) VALUES ($1, $2, $3) ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(event.event_id())
    .bind(job_id)
    .bind(payload)
    .execute(conn)
    .await?;
    Ok(())
}

/// The job's usage and tool charges in the outbox (not the provider-cost
/// records of abandoned attempts), ordered by event id: what its hold
/// release waits for.
///
/// # Errors
/// Database errors.
pub async fn charge_event_ids(tx: &mut PgConnection, job_id: Uuid) -> Result<Vec<Uuid>, sqlx::Error> {
    // The kinds come from the type (`BillingEvent::kind()`), never spelled in SQL.
    let kinds = [shared::contracts::BillingEvent::USAGE_CHARGE, shared::contracts::BillingEvent::TOOL_CHARGE];
    sqlx::query_scalar(
        "SELECT event_id FROM billing_outbox
          WHERE job_id = $1 AND payload->>'type' = ANY($2)
            AND (payload->>'abandoned') IS DISTINCT FROM 'true' ORDER BY event_id",
    )
    .bind(job_id)
    .bind(&kinds[..])
    .fetch_all(tx)
    .await
}

/// True when the job has charges in the outbox that will be applied to the
/// user (usage not abandoned, tools not waived) and are not relayed yet:
/// what a handed-back job's hold must keep covering.
///
/// # Errors
/// Database errors.
pub async fn has_pending_charges<'e>(db: impl PgExecutor<'e>, job_id: Uuid) -> Result<bool, sqlx::Error> {
    let kinds = [shared::contracts::BillingEvent::USAGE_CHARGE, shared::contracts::BillingEvent::TOOL_CHARGE];
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM billing_outbox
          WHERE job_id = $1 AND published_at IS NULL AND payload->>'type' = ANY($2)
            AND (payload->>'abandoned') IS DISTINCT FROM 'true'
            AND (payload->>'waived') IS DISTINCT FROM 'true')",
    )
    .bind(job_id)
    .bind(&kinds[..])
    .fetch_one(db)
    .await
}

/// Waives the job's unpublished charges (the answer never reached the
/// user): each usage charge becomes provider cost charged to nobody
/// (`abandoned`, `user_charge` 0), each tool charge is marked `waived`
/// with `user_charge` 0. Event ids stay, so nothing is applied twice.
/// Returns how many events were waived. Charges already relayed (by a
/// worker older than this rule) cannot be, and are logged.
///
/// # Errors
/// Database errors; a stored event that does not parse (`Protocol`).
pub async fn waive_charges(tx: &mut PgConnection, job_id: Uuid) -> Result<u64, sqlx::Error> {
    waive_where(tx, job_id, |_| true).await
}

/// Waives the job's unpublished tool charges whose `tool_use` id is not in
/// `kept`: tools an earlier attempt ran in a round it never stored (it was
/// shut down, or lost its lease, before the round was stored). That round
/// is redone, Claude asks for its tools again under new ids and they are
/// charged then; the first runs are not charged (nobody pays twice).
/// Returns how many were waived.
///
/// # Errors
/// As [`waive_charges`].
pub async fn waive_tool_charges_except(
    tx: &mut PgConnection,
    job_id: Uuid,
    kept: &[String],
) -> Result<u64, sqlx::Error> {
    waive_where(tx, job_id, |e| matches!(e, BillingEvent::ToolCharge(c) if !kept.contains(&c.tool_use_id))).await
}

/// [`waive_charges`] for the events `which` selects.
async fn waive_where(
    tx: &mut PgConnection,
    job_id: Uuid,
    which: impl Fn(&BillingEvent) -> bool,
) -> Result<u64, sqlx::Error> {
    let rows: Vec<(Uuid, Value, bool)> = sqlx::query_as(
        "SELECT event_id, payload, published_at IS NOT NULL FROM billing_outbox WHERE job_id = $1 FOR UPDATE",
    )
    .bind(job_id)
    .fetch_all(&mut *tx)
    .await?;
    let mut waived = 0;
    for (event_id, payload, published) in rows {
        let mut event: BillingEvent = serde_json::from_value(payload)
            .map_err(|e| sqlx::Error::Protocol(format!("outbox event {event_id} does not parse: {e}")))?;
        if !which(&event) {
            continue;
        }
        let changed = match &mut event {
            BillingEvent::UsageCharge(c) if !c.abandoned => {
                c.abandoned = true;
                c.user_charge = shared::money::Usd(rust_decimal::Decimal::ZERO);
                true
            }
            BillingEvent::ToolCharge(c) if !c.waived => {
                c.waived = true;
                c.user_charge = shared::money::Usd(rust_decimal::Decimal::ZERO);
                true
            }
            _ => false,
        };
        if !changed {
            continue;
        }
        if published {
            tracing::error!(%event_id, "a charge of an undelivered answer was already relayed; it stands");
            continue;
        }
        let payload = serde_json::to_value(&event)
            .map_err(|e| sqlx::Error::Protocol(format!("billing event does not serialize: {e}")))?;
        sqlx::query("UPDATE billing_outbox SET payload = $2 WHERE event_id = $1")
            .bind(event_id)
            .bind(payload)
            .execute(&mut *tx)
            .await?;
        waived += 1;
    }
    Ok(waived)
}

/// Unpublished events: how many, and the age of the oldest (seconds; 0
/// when there is none).
///
/// # Errors
/// Database errors.
pub async fn backlog<'e>(db: impl PgExecutor<'e>) -> Result<(i64, f64), sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM (now() - min(created_at))), 0)::float8
           FROM billing_outbox WHERE published_at IS NULL",
    )
    .fetch_one(db)
    .await
}

/// Takes up to `limit` unpublished events, oldest first, locked in `tx`
/// (`SKIP LOCKED`: another relay takes the others): `(event_id, payload)`.
/// A job's events wait until the job is finished (not queued or running):
/// its charges are relayed only once it is known whether the answer reached
/// the user ([`waive_charges`] otherwise).
///
/// # Errors
/// Database errors.
pub async fn take_unpublished(tx: &mut PgConnection, limit: i64) -> Result<Vec<(Uuid, Value)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT o.event_id, o.payload FROM billing_outbox o
          WHERE o.published_at IS NULL
            AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.job_id = o.job_id AND j.status = ANY($2))
          ORDER BY o.seq LIMIT $1 FOR UPDATE OF o SKIP LOCKED",
    )
    .bind(limit)
    .bind([super::jobs::JobStatus::Queued.as_str(), super::jobs::JobStatus::Running.as_str()])
    .fetch_all(tx)
    .await
}

/// Marks the events published.
///
/// # Errors
/// Database errors.
pub async fn mark_published(tx: &mut PgConnection, event_ids: &[Uuid]) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE billing_outbox SET published_at = now() WHERE event_id = ANY($1)")
        .bind(event_ids)
        .execute(tx)
        .await?;
    Ok(())
}
