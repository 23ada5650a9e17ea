//! A user's statement: their latest ledger movements, for `/usage` ("why
//! was I charged"). Read through `fleet_user_entries`
//! (`migrations/billing/20261130950001_roles.sql`), so the worker's role
//! needs no privilege on the ledger tables.

use crate::account::{Account, EntryKind};
use rust_decimal::Decimal;
use serde_json::Value;
use shared::pricing::TokenCounts;
use sqlx::PgPool;

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
