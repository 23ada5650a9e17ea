//! The ledger: every event becomes postings (debit account, credit account,
//! amount) applied in one transaction with the idempotency record, so an
//! event id is applied once or not at all. Balances are credit-normal
//! (credits − debits) and move in the same transaction; their sum stays zero.
//!
//! Accounts ([`Account`]): `user:<id>` (prepaid credit), `system:revenue`,
//! `system:provider_cost` (expense), `system:provider_payable` (owed to
//! Anthropic), `system:payments` (source of grants).

use crate::account::{Account, EntryKind};
use rust_decimal::Decimal;
use serde_json::Value;
use shared::contracts::BillingEvent;
use shared::money::format_usd;
use sqlx::{PgPool, Postgres, Transaction};
use std::collections::{BTreeMap, BTreeSet};
use uuid::Uuid;

/// `applied_events.kind` of an operator's grant ([`grant`]).
pub const GRANT_KIND: &str = "grant.v1";
/// `applied_events.kind` of a charge refunded by finance.
pub const REFUND_KIND: &str = "refund.v1";
/// `applied_events.kind` of a Stars payment refunded at Telegram.
pub const STARS_REFUND_KIND: &str = "stars_refund.v1";

/// Ledger failures, classified for retry.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// Database failure: transient unless it is a constraint violation.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// The event cannot be applied (negative amount, bad payload): permanent.
    #[error("invalid event: {0}")]
    Invalid(String),
    /// A hold release whose job still has charges not applied (they are in
    /// a retry queue): transient, retried until they are.
    #[error("{0} charge(s) of the job are not applied yet")]
    ChargesPending(usize),
    /// A grant's idempotency key was used before for a grant of another
    /// amount or to another user (as Stripe answers 409): permanent, nothing
    /// written. Both grants are named.
    #[error(
        "idempotency key already used for a grant of {} to user {existing_user}; this request: {} to user {requested_user} (nothing granted)",
        format_usd(*.existing_amount),
        format_usd(*.requested_amount)
    )]
    KeyReused {
        /// The user of the grant made with the key.
        existing_user: i64,
        /// Its amount, USD.
        existing_amount: Decimal,
        /// The user of this request.
        requested_user: i64,
        /// Its amount, USD.
        requested_amount: Decimal,
    },
}

impl LedgerError {
    /// True when retrying later may succeed (connection loss, serialization
    /// failure, deadlock, timeout); false for bad data.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Invalid(_) | Self::KeyReused { .. } => false,
            Self::ChargesPending(_) => true,
            Self::Db(e @ sqlx::Error::Database(_)) => shared::db::is_transient(e),
            Self::Db(_) => true,
        }
    }
}

/// Whether the event changed the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Postings written.
    Applied,
    /// Seen before: nothing changed.
    Duplicate,
}

/// One movement of money.
#[derive(Debug, Clone, PartialEq)]
pub struct Posting {
    /// Account debited.
    pub debit: Account,
    /// Account credited.
    pub credit: Account,
    /// USD, ≥ 0.
    pub amount: Decimal,
    /// What the entry records.
    pub kind: EntryKind,
}

/// Context stored on every entry of an event, for drill-down.
#[derive(Debug, Clone, Default)]
pub struct EntryMeta {
    /// User concerned.
    pub user_id: Option<i64>,
    /// Job concerned.
    pub job_id: Option<Uuid>,
    /// Anthropic `request-id`.
    pub provider_request_id: Option<String>,
    /// Output counted by us, not reported.
    pub estimated: bool,
    /// Free text.
    pub memo: Option<String>,
}

/// The account of a user.
pub fn user_account(user_id: i64) -> Account {
    Account::User(user_id)
}

/// The postings of a billing event.
///
/// # Errors
/// `Invalid` for negative amounts.
pub fn postings(event: &BillingEvent) -> Result<(Vec<Posting>, EntryMeta), LedgerError> {
    let (postings, meta) = match event {
        BillingEvent::UsageCharge(c) => (
            {
                let provider = Posting {
                    debit: Account::PROVIDER_COST,
                    credit: Account::PROVIDER_PAYABLE,
                    amount: c.provider_cost.0,
                    kind: EntryKind::ProviderCost,
                };
                if c.abandoned {
                    // What the provider served an attempt that lost its lease: ours to bear.
                    vec![provider]
                } else {
                    let user = Posting {
                        debit: user_account(c.user_id),
                        credit: Account::REVENUE,
                        amount: c.user_charge.0,
                        kind: EntryKind::UsageCharge,
                    };
                    vec![user, provider]
                }
            },
            EntryMeta {
                user_id: Some(c.user_id),
                job_id: Some(c.job_id),
                provider_request_id: c.request_id.clone(),
                estimated: c.estimated,
                memo: Some(format!("{} call {}", c.model, c.api_call_seq)),
            },
        ),
        BillingEvent::TopUp(c) => (
            vec![Posting {
                debit: Account::PAYMENTS,
                credit: user_account(c.user_id),
                amount: c.credit.0,
                kind: EntryKind::TopUp,
            }],
            EntryMeta {
                user_id: Some(c.user_id),
                memo: Some(format!("{} Stars, charge {}", c.stars, c.telegram_payment_charge_id)),
                ..Default::default()
            },
        ),
        BillingEvent::HoldRelease(c) => {
            (Vec::new(), EntryMeta { user_id: Some(c.user_id), job_id: Some(c.job_id), ..Default::default() })
        }
        BillingEvent::ToolCharge(c) => (
            if c.waived {
                // The answer never reached the user: recorded, not charged.
                Vec::new()
            } else {
                vec![Posting {
                    debit: user_account(c.user_id),
                    credit: Account::REVENUE,
                    amount: c.user_charge.0,
                    kind: EntryKind::ToolCharge,
                }]
            },
            EntryMeta {
                user_id: Some(c.user_id),
                job_id: Some(c.job_id),
                memo: Some(format!("tool {}", c.tool_name)),
                ..Default::default()
            },
        ),
    };
    if postings.iter().any(|p| p.amount.is_sign_negative()) {
        return Err(LedgerError::Invalid(format!("negative amount in event {}", event.event_id())));
    }
    Ok((postings, meta))
}

/// Balance movements of one transaction, applied at its end ([`Deltas::flush`])
/// once per account and in account order, so that concurrent transactions
/// (batches on several billing-workers) lock the hot accounts
/// (`system:revenue`, …) in one order and never deadlock.
#[derive(Debug, Default)]
pub struct Deltas {
    /// USD per account id (ordered as the stored strings, the order the
    /// rows are locked in), credit-normal (credits − debits).
    balances: BTreeMap<String, Decimal>,
}

impl Deltas {
    /// Adds one posting's movement: debit − amount, credit + amount.
    ///
    /// # Errors
    /// `Invalid` when a sum leaves the range of `Decimal` (amounts near its
    /// maximum): refused, never a panic.
    fn move_amount(&mut self, p: &Posting) -> Result<(), LedgerError> {
        let overflow = || LedgerError::Invalid(format!("amount {} overflows a balance", p.amount));
        let debit = self.balances.entry(p.debit.to_string()).or_default();
        *debit = debit.checked_sub(p.amount).ok_or_else(overflow)?;
        let credit = self.balances.entry(p.credit.to_string()).or_default();
        *credit = credit.checked_add(p.amount).ok_or_else(overflow)?;
        Ok(())
    }

    /// Moves every balance by its delta, in account order.
    ///
    /// # Errors
    /// `Invalid` for an account that does not exist; database errors.
    pub async fn flush(self, tx: &mut Transaction<'_, Postgres>) -> Result<(), LedgerError> {
        for (account, delta) in self.balances {
            if delta.is_zero() {
                continue;
            }
            let moved = sqlx::query("UPDATE accounts SET balance = balance + $2 WHERE account_id = $1")
                .bind(&account)
                .bind(delta)
                .execute(&mut **tx)
                .await?;
            if moved.rows_affected() != 1 {
                return Err(LedgerError::Invalid(format!("unknown account {account}")));
            }
        }
        Ok(())
    }
}

/// Records `postings` under `event_id` in `tx`: the idempotency row, the
/// user's account if new, and the entries; the balance moves go to
/// `deltas` (the caller flushes them, then commits).
///
/// # Errors
/// Database errors.
pub async fn record_postings(
    tx: &mut Transaction<'_, Postgres>,
    event_id: Uuid,
    kind: &str,
    payload: &Value,
    postings: &[Posting],
    meta: &EntryMeta,
    deltas: &mut Deltas,
) -> Result<Applied, LedgerError> {
    let first = sqlx::query(
        "INSERT INTO applied_events (event_id, kind, payload) VALUES ($1, $2, $3) ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(event_id)
    .bind(kind)
    .bind(payload)
    .execute(&mut **tx)
    .await?;
    if first.rows_affected() == 0 {
        return Ok(Applied::Duplicate);
    }
    if let Some(user) = meta.user_id {
        // ON CONFLICT DO NOTHING takes no row lock on an existing account.
        sqlx::query("INSERT INTO accounts (account_id, kind, user_id) VALUES ($1, 'user', $2) ON CONFLICT DO NOTHING")
            .bind(user_account(user).to_string())
            .bind(user)
            .execute(&mut **tx)
            .await?;
    }
    for (leg, p) in postings.iter().enumerate() {
        sqlx::query(
            "INSERT INTO ledger_entries (event_id, leg, debit_account, credit_account, amount, kind, user_id, job_id,
                 provider_request_id, estimated, memo)
             VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11)",
        )
        .bind(event_id)
        .bind(i16::try_from(leg).unwrap_or(i16::MAX))
        .bind(p.debit.to_string())
        .bind(p.credit.to_string())
        .bind(p.amount)
        .bind(p.kind.as_str())
        .bind(meta.user_id)
        .bind(meta.job_id)
        .bind(&meta.provider_request_id)
        .bind(meta.estimated)
        .bind(&meta.memo)
        .execute(&mut **tx)
        .await?;
        deltas.move_amount(p)?;
    }
    Ok(Applied::Applied)
}

/// Applies `postings` under `event_id` in `tx`, balances included (the
/// caller commits).
///
/// # Errors
/// Database errors; `Invalid` for an unknown account.
pub async fn apply_postings(
    tx: &mut Transaction<'_, Postgres>,
    event_id: Uuid,
    kind: &str,
    payload: &Value,
    postings: &[Posting],
    meta: &EntryMeta,
) -> Result<Applied, LedgerError> {
    let mut deltas = Deltas::default();
    let applied = record_postings(tx, event_id, kind, payload, postings, meta, &mut deltas).await?;
    deltas.flush(tx).await?;
    Ok(applied)
}

/// Applies one billing event in its own transaction.
///
/// # Errors
/// [`LedgerError`].
pub async fn apply_event(db: &PgPool, event: &BillingEvent) -> Result<Applied, LedgerError> {
    let applied = apply_batch(db, std::slice::from_ref(event)).await?;
    Ok(applied.first().copied().unwrap_or(Applied::Duplicate))
}

/// Applies `events` in one transaction, all or none (the caller falls back
/// to one event per transaction when a batch fails, so one bad event never
/// blocks the others). Returns what happened to each, in order. Hold
/// releases should come after the charges they wait for (a charge earlier
/// in the same batch counts as applied).
///
/// # Errors
/// [`LedgerError`] of the first event that failed; nothing is written then.
pub async fn apply_batch(db: &PgPool, events: &[BillingEvent]) -> Result<Vec<Applied>, LedgerError> {
    // Everything that can be refused is refused before the transaction.
    let mut ids = Vec::with_capacity(events.len());
    let mut kinds = Vec::with_capacity(events.len());
    let mut payloads = Vec::with_capacity(events.len());
    let mut prepared = Vec::with_capacity(events.len());
    for event in events {
        let (postings, meta) = postings(event)?;
        let payload = serde_json::to_value(event).map_err(|e| LedgerError::Invalid(e.to_string()))?;
        ids.push(event.event_id());
        kinds.push(event.kind().to_owned());
        payloads.push(payload);
        prepared.push((postings, meta));
    }
    let mut tx = shared::db::begin(db).await?;
    // One statement for the idempotency rows of the whole batch: the ids it
    // returns are the events applied now (a repeated id in the batch is
    // returned once, for its first occurrence).
    let fresh: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO applied_events (event_id, kind, payload)
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::jsonb[])
         ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
    )
    .bind(&ids)
    .bind(&kinds)
    .bind(&payloads)
    .fetch_all(&mut *tx)
    .await?;
    let mut fresh: BTreeSet<Uuid> = fresh.into_iter().collect();
    let mut results = Vec::with_capacity(events.len());
    let mut settled_jobs = BTreeSet::new();
    let mut users = BTreeSet::new();
    let mut legs = LegColumns::default();
    let mut deltas = Deltas::default();
    for (event, (postings, meta)) in events.iter().zip(&prepared) {
        if !fresh.remove(&event.event_id()) {
            results.push(Applied::Duplicate);
            continue;
        }
        if let BillingEvent::HoldRelease(r) = event {
            // The job's charges, earlier in this batch included, must all be in.
            let pending: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM unnest($1::uuid[]) AS c(id)
                  WHERE NOT EXISTS (SELECT 1 FROM applied_events a WHERE a.event_id = c.id)",
            )
            .bind(&r.charge_event_ids)
            .fetch_one(&mut *tx)
            .await?;
            if pending > 0 {
                return Err(LedgerError::ChargesPending(usize::try_from(pending).unwrap_or(usize::MAX)));
            }
            settled_jobs.insert(r.job_id);
        }
        users.extend(meta.user_id);
        for (leg, p) in postings.iter().enumerate() {
            legs.push(event.event_id(), i16::try_from(leg).unwrap_or(i16::MAX), p, meta);
            deltas.move_amount(p)?;
        }
        results.push(Applied::Applied);
    }
    if !users.is_empty() {
        // In account order; ON CONFLICT DO NOTHING takes no row lock on an existing account.
        let users: Vec<i64> = users.into_iter().collect();
        let accounts: Vec<String> = users.iter().map(|u| user_account(*u).to_string()).collect();
        sqlx::query(
            "INSERT INTO accounts (account_id, kind, user_id)
             SELECT a, 'user', u FROM unnest($1::text[], $2::bigint[]) AS t(a, u) ORDER BY a
             ON CONFLICT DO NOTHING",
        )
        .bind(&accounts)
        .bind(&users)
        .execute(&mut *tx)
        .await?;
    }
    legs.insert(&mut tx).await?;
    deltas.flush(&mut tx).await?;
    let settled: Vec<Uuid> = settled_jobs.into_iter().collect();
    if !settled.is_empty() {
        sqlx::query(
            "UPDATE holds SET status = 'settled', updated_at = now() WHERE job_id = ANY($1) AND status = 'active'",
        )
        .bind(&settled)
        .execute(&mut *tx)
        .await?;
    }
    let applied_ids: Vec<Uuid> =
        events.iter().zip(&results).filter(|(_, a)| **a == Applied::Applied).map(|(e, _)| e.event_id()).collect();
    if !applied_ids.is_empty() {
        // A redriven event that now applies closes its failure record.
        sqlx::query(
            "UPDATE billing_failures SET resolved_at = now(), updated_at = now()
              WHERE event_id = ANY($1) AND resolved_at IS NULL",
        )
        .bind(&applied_ids)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
    }
    Ok(results)
}

/// Ledger entries of a batch, column by column, for one multi-row insert.
#[derive(Default)]
struct LegColumns {
    event_id: Vec<Uuid>,
    leg: Vec<i16>,
    debit: Vec<String>,
    credit: Vec<String>,
    amount: Vec<Decimal>,
    kind: Vec<String>,
    user_id: Vec<Option<i64>>,
    job_id: Vec<Option<Uuid>>,
    request_id: Vec<Option<String>>,
    estimated: Vec<bool>,
    memo: Vec<Option<String>>,
}

impl LegColumns {
    fn push(&mut self, event_id: Uuid, leg: i16, p: &Posting, meta: &EntryMeta) {
        self.event_id.push(event_id);
        self.leg.push(leg);
        self.debit.push(p.debit.to_string());
        self.credit.push(p.credit.to_string());
        self.amount.push(p.amount);
        self.kind.push(p.kind.as_str().to_owned());
        self.user_id.push(meta.user_id);
        self.job_id.push(meta.job_id);
        self.request_id.push(meta.provider_request_id.clone());
        self.estimated.push(meta.estimated);
        self.memo.push(meta.memo.clone());
    }

    async fn insert(self, tx: &mut Transaction<'_, Postgres>) -> Result<(), LedgerError> {
        if self.event_id.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO ledger_entries (event_id, leg, debit_account, credit_account, amount, kind, user_id, job_id,
                 provider_request_id, estimated, memo)
             SELECT * FROM unnest($1::uuid[], $2::int2[], $3::text[], $4::text[], $5::numeric[], $6::text[],
                                  $7::bigint[], $8::uuid[], $9::text[], $10::bool[], $11::text[])",
        )
        .bind(&self.event_id)
        .bind(&self.leg)
        .bind(&self.debit)
        .bind(&self.credit)
        .bind(&self.amount)
        .bind(&self.kind)
        .bind(&self.user_id)
        .bind(&self.job_id)
        .bind(&self.request_id)
        .bind(&self.estimated)
        .bind(&self.memo)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

/// Credits `amount` USD to `user_id` from [`Account::PAYMENTS`] under
/// `event_id` (from the idempotency key: [`shared::contracts::grant_event_id`]).
/// A repeat with the same user and amount (equal as numbers: `5` = `5.00`)
/// is [`Applied::Duplicate`].
///
/// # Errors
/// `Invalid` for a non-positive amount; [`LedgerError::KeyReused`] when
/// `event_id` was applied before as another grant (another amount or
/// user) or as anything else; database errors.
pub async fn grant(db: &PgPool, user_id: i64, amount: Decimal, event_id: Uuid) -> Result<Applied, LedgerError> {
    if amount <= Decimal::ZERO {
        return Err(LedgerError::Invalid("a grant must be positive".into()));
    }
    let payload = serde_json::json!({ "type": GRANT_KIND, "user_id": user_id, "amount": amount.to_string() });
    let postings =
        [Posting { debit: Account::PAYMENTS, credit: user_account(user_id), amount, kind: EntryKind::Grant }];
    let meta = EntryMeta { user_id: Some(user_id), memo: Some("grant".into()), ..Default::default() };
    let mut tx = shared::db::begin(db).await?;
    let applied = apply_postings(&mut tx, event_id, GRANT_KIND, &payload, &postings, &meta).await?;
    if applied == Applied::Applied {
        tx.commit().await?;
        return Ok(applied);
    }
    let (kind, prior): (String, Value) = sqlx::query_as("SELECT kind, payload FROM applied_events WHERE event_id = $1")
        .bind(event_id)
        .fetch_one(&mut *tx)
        .await?;
    let existing_user = prior.get("user_id").and_then(Value::as_i64);
    let existing_amount = prior.get("amount").and_then(Value::as_str).and_then(|a| a.parse::<Decimal>().ok());
    if kind == GRANT_KIND && existing_user == Some(user_id) && existing_amount == Some(amount) {
        return Ok(Applied::Duplicate);
    }
    Err(LedgerError::KeyReused {
        existing_user: existing_user.unwrap_or_default(),
        existing_amount: existing_amount.unwrap_or_default(),
        requested_user: user_id,
        requested_amount: amount,
    })
}

/// A user's balance (zero without an account).
///
/// # Errors
/// Database errors.
pub async fn balance(db: &PgPool, user_id: i64) -> Result<Decimal, sqlx::Error> {
    let b: Option<Decimal> =
        sqlx::query_scalar("SELECT balance FROM accounts WHERE user_id = $1").bind(user_id).fetch_optional(db).await?;
    Ok(b.unwrap_or_default())
}
