-- Stars payments that credited nothing because they failed the payment
-- check (worker/src/payments.rs `check`: unknown pack, wrong amount or
-- currency, another payer, a malformed payload). Finance reviews them and
-- refunds with `billing-worker refund-stars --charge <id>`. One row per
-- charge: a payment delivered twice is recorded once.
CREATE TABLE payment_anomalies (
    telegram_payment_charge_id  TEXT PRIMARY KEY,
    -- The payer (Telegram user id) and the chat the payment arrived in.
    user_id                     BIGINT NOT NULL,
    chat_id                     BIGINT NOT NULL,
    invoice_payload             TEXT NOT NULL,
    currency                    TEXT NOT NULL,
    -- Amount paid in the smallest unit of `currency` (Stars for XTR).
    total_amount                BIGINT NOT NULL,
    -- payments::Refusal::code: malformed_payload, other_payer, unknown_pack,
    -- price_mismatch, wrong_currency, wrong_amount.
    reason                      TEXT NOT NULL,
    created_at                  TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Set by `billing-worker refund-stars` once Telegram refunded it.
    refunded_at                 TIMESTAMPTZ
);
CREATE INDEX payment_anomalies_open ON payment_anomalies (created_at) WHERE refunded_at IS NULL;
