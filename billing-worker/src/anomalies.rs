//! Stars payments that credited nothing: the worker records them in the bot
//! database's `payment_anomalies` when they fail its payment check (a
//! forged payload, a wrong amount or currency). Finance lists them here and
//! refunds them with `refund-stars`, which marks the row.

use sqlx::PgPool;
use std::fmt::Write as _;

/// One open or refunded anomaly, as listed.
#[derive(sqlx::FromRow)]
struct Row {
    telegram_payment_charge_id: String,
    user_id: i64,
    chat_id: i64,
    invoice_payload: String,
    currency: String,
    total_amount: i64,
    reason: String,
    created_at: chrono::DateTime<chrono::Utc>,
    refunded_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// The anomalies as a table, open ones first, oldest first.
///
/// # Errors
/// Database errors (a bot database without the table is an error too).
pub async fn list(bot: &PgPool) -> Result<String, sqlx::Error> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT telegram_payment_charge_id, user_id, chat_id, invoice_payload, currency, total_amount, reason,
                created_at, refunded_at
           FROM payment_anomalies ORDER BY refunded_at IS NOT NULL, created_at",
    )
    .fetch_all(bot)
    .await?;
    let mut out = String::from("charge\tuser\tchat\tamount\treason\tpayload\tcreated_at\trefunded_at");
    for r in &rows {
        let refunded = r.refunded_at.map(|t| t.to_rfc3339()).unwrap_or_else(|| "open".to_owned());
        let _ = write!(
            out,
            "\n{}\t{}\t{}\t{} {}\t{}\t{}\t{}\t{refunded}",
            r.telegram_payment_charge_id,
            r.user_id,
            r.chat_id,
            r.total_amount,
            r.currency,
            r.reason,
            r.invoice_payload,
            r.created_at.to_rfc3339()
        );
    }
    let open = rows.iter().filter(|r| r.refunded_at.is_none()).count();
    let _ = write!(out, "\n{} anomalies, {open} open", rows.len());
    Ok(out)
}

/// The payer of the open anomaly with this charge id, if there is one.
///
/// # Errors
/// Database errors.
pub async fn open_payer(bot: &PgPool, charge: &str) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT user_id FROM payment_anomalies WHERE telegram_payment_charge_id = $1 AND refunded_at IS NULL",
    )
    .bind(charge)
    .fetch_optional(bot)
    .await
}

/// Marks the anomaly refunded (after `refundStarPayment` succeeded).
///
/// # Errors
/// Database errors.
pub async fn mark_refunded(bot: &PgPool, charge: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE payment_anomalies SET refunded_at = now() WHERE telegram_payment_charge_id = $1 AND refunded_at IS NULL",
    )
    .bind(charge)
    .execute(bot)
    .await?;
    Ok(())
}
