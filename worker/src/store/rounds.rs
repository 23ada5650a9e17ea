//! `job_rounds`: the completed tool rounds of a running job (issue 15,
//! part 4, "resume, don't redo"). A round is written fenced, with its calls,
//! by `ClaimedJob::store_round`; a later attempt [`load`]s the rounds and
//! continues after the last one; `finalize` stores them in the conversation
//! and [`delete`]s them in its transaction.

use rust_decimal::Decimal;
use serde_json::Value;
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

/// One stored round, as written and read.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Round {
    /// 1-based number of the tool round in the job.
    pub round: i32,
    /// The assistant turn's content blocks (with its `tool_use` blocks).
    pub assistant: Value,
    /// The `tool_result` blocks sent back (the next user turn).
    pub tool_results: Value,
    /// The visible text the round added to the answer.
    pub text: String,
    /// The round's paid tools: `[[name, "USD"], …]`.
    pub tool_charges: Value,
    /// What the round's calls charge the user, USD.
    pub calls_charge: Decimal,
    /// The highest `api_calls.seq` among the round's calls.
    pub last_call_seq: i32,
    /// The epoch of the claim that stored it.
    pub lease_epoch: i64,
}

/// Inserts `round` under `epoch` inside the caller's transaction (the
/// caller holds the lease fence: `ClaimedJob::store_round`). `Ok(false)`:
/// the round is stored already (a retried commit), nothing was written.
///
/// # Errors
/// Database errors.
pub(crate) async fn insert(tx: &mut PgConnection, job_id: Uuid, round: &Round) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "INSERT INTO job_rounds (job_id, round, assistant, tool_results, text, tool_charges, calls_charge,
                                 last_call_seq, lease_epoch)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (job_id, round) DO NOTHING",
    )
    .bind(job_id)
    .bind(round.round)
    .bind(&round.assistant)
    .bind(&round.tool_results)
    .bind(&round.text)
    .bind(&round.tool_charges)
    .bind(round.calls_charge)
    .bind(round.last_call_seq)
    .bind(round.lease_epoch)
    .execute(tx)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// The job's stored rounds, in order.
///
/// # Errors
/// Database errors.
pub async fn load<'e>(db: impl PgExecutor<'e>, job_id: Uuid) -> Result<Vec<Round>, sqlx::Error> {
    sqlx::query_as(
        "SELECT round, assistant, tool_results, text, tool_charges, calls_charge, last_call_seq, lease_epoch
           FROM job_rounds WHERE job_id = $1 ORDER BY round",
    )
    .bind(job_id)
    .fetch_all(db)
    .await
}

/// Deletes the job's rounds inside the caller's `finalize` transaction
/// (the conversation has them from then on). Returns how many there were.
///
/// # Errors
/// Database errors.
pub async fn delete(tx: &mut PgConnection, job_id: Uuid) -> Result<u64, sqlx::Error> {
    let r = sqlx::query("DELETE FROM job_rounds WHERE job_id = $1").bind(job_id).execute(tx).await?;
    Ok(r.rows_affected())
}
