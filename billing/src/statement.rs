//! A user's statement: their latest ledger movements, for `/usage` ("why
//! was I charged"), read through `fleet_user_entries`
//! (`migrations/billing/20261130950001_roles.sql`), so the worker's role
//! needs no privilege on the ledger tables; and, for finance
//! (`billing-worker statement`), every movement of a period with its event,
//! job, model and tokens between an opening and a closing balance
//! ([`period`], as the billing-worker's role).

use crate::account::{Account, EntryKind};
use rust_decimal::Decimal;
use serde_json::Value;
use shared::contracts::BillingEvent;
use shared::pricing::TokenCounts;
use sqlx::PgPool;
use uuid::Uuid;

/// The most entries [`recent`] returns (the SQL function caps at 100 too).
pub const MAX_ENTRIES: u8 = 100;

/// One movement on a user's account.
#[derive(Debug, Clone, PartialEq)]
pub struct StatementEntry {
    /// When the entry was written.
    pub at: chrono::DateTime<chrono::Utc>,
    /// What it records (charges, top-ups, grants, refunds).
    pub kind: EntryKind,
    /// USD, ≥ 0; the direction is [`Self::is_credit`].
    pub amount: Decimal,
    /// Output counted by us, not reported (the answer was cut short).
    pub estimated: bool,
    /// The entry's memo (`"<model> call <n>"`, `"tool <name>"`, …).
    pub memo: Option<String>,
    /// Tokens of the call, for usage charges (from the applied event).
    pub tokens: Option<TokenCounts>,
    /// The account credited.
    pub credit: Account,
}

impl StatementEntry {
    /// True when the user's account was credited (money in).
    pub fn is_credit(&self) -> bool {
        matches!(self.credit, Account::User(_))
    }
}

/// `user_id`'s last `limit` (at most [`MAX_ENTRIES`]) ledger entries,
/// newest first.
///
/// # Errors
/// Database errors; a stored account or kind this crate does not know
/// (`sqlx::Error::ColumnDecode` naming it).
pub async fn recent(db: &PgPool, user_id: i64, limit: u8) -> Result<Vec<StatementEntry>, sqlx::Error> {
    type Row = (chrono::DateTime<chrono::Utc>, EntryKind, Decimal, bool, Option<String>, Option<Value>, Account);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT created_at, kind, amount, estimated, memo, tokens, credit_account FROM fleet_user_entries($1, $2)",
    )
    .bind(user_id)
    .bind(i32::from(limit.min(MAX_ENTRIES)))
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(at, kind, amount, estimated, memo, tokens, credit)| StatementEntry {
            at,
            kind,
            amount,
            estimated,
            memo,
            tokens: tokens.filter(|_| kind == EntryKind::UsageCharge).map(|t| token_counts(&t)),
            credit,
        })
        .collect())
}

/// One movement of a user's account in a finance statement ([`period`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PeriodEntry {
    /// `ledger_entries.entry_id`: the order entries were written in.
    pub entry_id: i64,
    /// When the entry was written (UTC).
    pub at: chrono::DateTime<chrono::Utc>,
    /// The event that wrote it: the id `reconcile`, `explain` and
    /// `refund --event` use.
    pub event_id: Uuid,
    /// What it records.
    pub kind: EntryKind,
    /// The job, for charges.
    pub job_id: Option<Uuid>,
    /// The model, for usage charges (from the applied event).
    pub model: Option<String>,
    /// The tool, for tool charges.
    pub tool: Option<String>,
    /// Anthropic's `request-id`, for usage charges.
    pub request_id: Option<String>,
    /// Tokens of the call, for usage charges.
    pub tokens: Option<TokenCounts>,
    /// Output counted by us, not reported (the call was cut short).
    pub estimated: bool,
    /// USD, signed: positive credits the user (top-up, grant, refund),
    /// negative debits them (charges).
    pub amount: Decimal,
    /// The user's balance after this entry, USD.
    pub balance: Decimal,
    /// The entry's memo.
    pub memo: Option<String>,
}

/// A user's movements in `[from, until)` with the balance before and after.
#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    /// The Telegram user id.
    pub user_id: i64,
    /// Balance before the first entry of the period (sum of every earlier
    /// entry; 0 without `from`), USD.
    pub opening: Decimal,
    /// `opening` + the period's entries, USD.
    pub closing: Decimal,
    /// The period's entries, oldest first.
    pub entries: Vec<PeriodEntry>,
}

impl Statement {
    /// Sum of the period's credits to the user, USD (≥ 0).
    pub fn credits(&self) -> Decimal {
        self.entries.iter().map(|e| e.amount).filter(|a| a.is_sign_positive()).sum()
    }

    /// Sum of the period's debits of the user, USD (≥ 0).
    pub fn debits(&self) -> Decimal {
        -self.entries.iter().map(|e| e.amount).filter(|a| a.is_sign_negative()).sum::<Decimal>()
    }
}

/// `user_id`'s statement for entries written in `[from, until)` (either
/// bound open when `None`): every ledger entry that debits or credits the
/// user's account, with its event, job, model, tool, request id and tokens,
/// the running balance, and the opening and closing balances. Reads the
/// ledger tables directly (the billing-worker's role); a user without
/// entries has an empty statement at 0.
///
/// # Errors
/// Database errors; a stored kind this crate does not know.
pub async fn period(
    db: &PgPool,
    user_id: i64,
    from: Option<chrono::DateTime<chrono::Utc>>,
    until: Option<chrono::DateTime<chrono::Utc>>,
) -> Result<Statement, sqlx::Error> {
    type Row = (
        i64,
        chrono::DateTime<chrono::Utc>,
        Uuid,
        EntryKind,
        Option<Uuid>,
        Option<String>,
        Value,
        bool,
        Decimal,
        bool,
        Option<String>,
    );
    let account = Account::User(user_id).to_string();
    let opening: Decimal = match from {
        None => Decimal::ZERO,
        Some(from) => {
            sqlx::query_scalar(
                "SELECT COALESCE(sum(CASE WHEN credit_account = $1 THEN amount ELSE -amount END), 0)
                   FROM ledger_entries
                  WHERE (credit_account = $1 OR debit_account = $1) AND created_at < $2",
            )
            .bind(&account)
            .bind(from)
            .fetch_one(db)
            .await?
        }
    };
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT e.entry_id, e.created_at, e.event_id, e.kind, e.job_id,
                e.provider_request_id, a.payload, e.estimated, e.amount, e.credit_account = $1, e.memo
           FROM ledger_entries e JOIN applied_events a USING (event_id)
          WHERE (e.credit_account = $1 OR e.debit_account = $1)
            AND ($2::timestamptz IS NULL OR e.created_at >= $2)
            AND ($3::timestamptz IS NULL OR e.created_at < $3)
          ORDER BY e.entry_id",
    )
    .bind(&account)
    .bind(from)
    .bind(until)
    .fetch_all(db)
    .await?;
    let mut balance = opening;
    let mut entries = Vec::with_capacity(rows.len());
    for (entry_id, at, event_id, kind, job_id, request_id, payload, estimated, amount, credit, memo) in rows {
        let amount = if credit { amount } else { -amount };
        balance += amount;
        let (model, tool, tokens) = call_details(kind, &payload);
        entries.push(PeriodEntry {
            entry_id,
            at,
            event_id,
            kind,
            job_id,
            model,
            tool,
            request_id,
            tokens,
            estimated,
            amount,
            balance,
            memo,
        });
    }
    Ok(Statement { user_id, opening, closing: balance, entries })
}

/// Model and tokens of a usage charge, tool of a tool charge, from the
/// applied event: decoded as a [`BillingEvent`]; an event of an older build
/// (a token class it did not have yet) is read field by field.
fn call_details(kind: EntryKind, payload: &Value) -> (Option<String>, Option<String>, Option<TokenCounts>) {
    match (kind, serde_json::from_value::<BillingEvent>(payload.clone())) {
        (EntryKind::UsageCharge, Ok(BillingEvent::UsageCharge(c))) => (Some(c.model), None, Some(c.tokens)),
        (EntryKind::ToolCharge, Ok(BillingEvent::ToolCharge(c))) => (None, Some(c.tool_name), None),
        (EntryKind::UsageCharge, Err(_)) => (
            payload.get("model").and_then(Value::as_str).map(str::to_owned),
            None,
            payload.get("tokens").map(token_counts),
        ),
        (EntryKind::ToolCharge, Err(_)) => {
            (None, payload.get("tool_name").and_then(Value::as_str).map(str::to_owned), None)
        }
        _ => (None, None, None),
    }
}

/// The token counts of a stored event's `tokens`; a class missing (events
/// written before it existed) counts 0.
fn token_counts(t: &Value) -> TokenCounts {
    let n = |k: &str| t.get(k).and_then(Value::as_u64).unwrap_or(0);
    TokenCounts {
        input: n("input"),
        output: n("output"),
        cache_write_5m: n("cache_write_5m"),
        cache_write_1h: n("cache_write_1h"),
        cache_read: n("cache_read"),
        web_search_requests: n("web_search_requests"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_classes_missing_from_an_old_event_count_zero() {
        let t = token_counts(&serde_json::json!({ "input": 5, "output": 7, "cache_read": 2 }));
        assert_eq!(t, TokenCounts { input: 5, output: 7, cache_read: 2, ..TokenCounts::default() });
    }

    #[test]
    fn only_entries_crediting_a_user_are_money_in() {
        let entry = |credit| StatementEntry {
            at: chrono::Utc::now(),
            kind: EntryKind::UsageCharge,
            amount: Decimal::ONE,
            estimated: false,
            memo: None,
            tokens: None,
            credit,
        };
        assert!(entry(Account::User(3)).is_credit());
        assert!(!entry(Account::REVENUE).is_credit());
    }
}
