//! `processed_updates`: every Telegram update taken in, once (dedup).

use sqlx::PgConnection;

/// Records update `update_id` (its Telegram `kind`, its chat, and the intake
/// `outcome` label); on a redelivery counts the delivery instead. True when
/// the update is new.
///
/// # Errors
/// Database errors.
pub async fn record(
    tx: &mut PgConnection,
    update_id: i64,
    kind: &str,
    chat_id: Option<i64>,
    outcome: &str,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO processed_updates (update_id, kind, chat_id, outcome) VALUES ($1, $2, $3, $4)
         ON CONFLICT (update_id) DO UPDATE SET deliveries = processed_updates.deliveries + 1
         RETURNING (xmax = 0)",
    )
    .bind(update_id)
    .bind(kind)
    .bind(chat_id)
    .bind(outcome)
    .fetch_one(tx)
    .await
}
