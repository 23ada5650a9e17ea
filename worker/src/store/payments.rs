//! `payment_anomalies`: Stars payments that failed the server-side check
//! and credited nothing, kept once each for a refund.

use sqlx::PgConnection;

/// A payment that credited nothing.
#[derive(Debug)]
pub struct PaymentAnomaly<'a> {
    /// Telegram's charge id (one row per charge).
    pub telegram_payment_charge_id: &'a str,
    /// Who paid.
    pub user_id: i64,
    /// The chat of the payment.
    pub chat_id: i64,
    /// The invoice payload as Telegram returned it.
    pub invoice_payload: &'a str,
    /// The currency (`XTR` for Stars).
    pub currency: &'a str,
    /// The amount paid, in the currency's smallest unit (Stars).
    pub total_amount: i64,
    /// Why it was refused (the refusal's code).
    pub reason: &'a str,
}

/// Records the anomaly once. True when it is the first record of the charge.
///
/// # Errors
/// Database errors.
pub async fn record_anomaly(tx: &mut PgConnection, anomaly: &PaymentAnomaly<'_>) -> Result<bool, sqlx::Error> {
    let recorded = sqlx::query(
        "INSERT INTO payment_anomalies
             (telegram_payment_charge_id, user_id, chat_id, invoice_payload, currency, total_amount, reason)
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (telegram_payment_charge_id) DO NOTHING",
    )
    .bind(anomaly.telegram_payment_charge_id)
    .bind(anomaly.user_id)
    .bind(anomaly.chat_id)
    .bind(anomaly.invoice_payload)
    .bind(anomaly.currency)
    .bind(anomaly.total_amount)
    .bind(anomaly.reason)
    .execute(tx)
    .await?;
    Ok(recorded.rows_affected() == 1)
}
