//! Ledger accounts and entry kinds as types: the strings stored in
//! `accounts.account_id`, `ledger_entries.{debit,credit}_account` and
//! `ledger_entries.kind` (migrations/billing/20261129500001_billing_schema.sql)
//! are written and read only through [`Account`] and [`EntryKind`].

use std::fmt;
use std::str::FromStr;

/// An account of the ledger: a user's prepaid credit or one of the system
/// accounts the schema migration creates. Stored as `user:<id>` or
/// `system:<name>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Account {
    /// A user's prepaid credit, USD (Telegram user id).
    User(i64),
    /// One of the bot's own accounts.
    System(SystemAccount),
}

/// The system accounts (rows inserted by the billing schema migration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SystemAccount {
    /// `system:payments`: the source of top-ups and grants.
    Payments,
    /// `system:revenue`: what users paid for answers and tools.
    Revenue,
    /// `system:provider_cost`: what Anthropic's usage cost us (expense).
    ProviderCost,
    /// `system:provider_payable`: what we owe Anthropic.
    ProviderPayable,
}

impl SystemAccount {
    /// Every system account, in schema order.
    pub const ALL: [Self; 4] = [Self::Revenue, Self::ProviderCost, Self::ProviderPayable, Self::Payments];

    /// The name after `system:`, also the account's `accounts.kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Payments => "payments",
            Self::Revenue => "revenue",
            Self::ProviderCost => "provider_cost",
            Self::ProviderPayable => "provider_payable",
        }
    }
}

impl Account {
    /// `system:payments`.
    pub const PAYMENTS: Self = Self::System(SystemAccount::Payments);
    /// `system:revenue`.
    pub const REVENUE: Self = Self::System(SystemAccount::Revenue);
    /// `system:provider_cost`.
    pub const PROVIDER_COST: Self = Self::System(SystemAccount::ProviderCost);
    /// `system:provider_payable`.
    pub const PROVIDER_PAYABLE: Self = Self::System(SystemAccount::ProviderPayable);

    /// The user whose credit this is; `None` for a system account.
    pub fn user_id(self) -> Option<i64> {
        match self {
            Self::User(id) => Some(id),
            Self::System(_) => None,
        }
    }
}

impl fmt::Display for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::User(id) => write!(f, "user:{id}"),
            Self::System(s) => write!(f, "system:{}", s.as_str()),
        }
    }
}

/// A stored account id that is not `user:<i64>` or a known `system:<name>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown ledger account {0:?} (expected user:<id> or system:<payments|revenue|provider_cost|provider_payable>)"
)]
pub struct UnknownAccount(pub String);

impl FromStr for Account {
    type Err = UnknownAccount;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let unknown = || UnknownAccount(s.to_owned());
        if let Some(id) = s.strip_prefix("user:") {
            // Exactly the form Display writes: no sign, no leading zeros.
            let user: i64 = id.parse().map_err(|_| unknown())?;
            return if user.to_string() == id { Ok(Self::User(user)) } else { Err(unknown()) };
        }
        let name = s.strip_prefix("system:").ok_or_else(unknown)?;
        SystemAccount::ALL.into_iter().find(|a| a.as_str() == name).map(Self::System).ok_or_else(unknown)
    }
}

/// What a ledger entry records (`ledger_entries.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EntryKind {
    /// A user paid for one Messages API call.
    UsageCharge,
    /// What Anthropic charged us for one call.
    ProviderCost,
    /// A user paid for one call of our own tools.
    ToolCharge,
    /// Credit bought with Telegram Stars.
    TopUp,
    /// Credit given by an operator.
    Grant,
    /// A correcting entry: a charge or a Stars payment returned.
    Refund,
}

impl EntryKind {
    /// Every kind.
    pub const ALL: [Self; 6] =
        [Self::UsageCharge, Self::ProviderCost, Self::ToolCharge, Self::TopUp, Self::Grant, Self::Refund];

    /// The stored string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UsageCharge => "usage_charge",
            Self::ProviderCost => "provider_cost",
            Self::ToolCharge => "tool_charge",
            Self::TopUp => "top_up",
            Self::Grant => "grant",
            Self::Refund => "refund",
        }
    }
}

impl fmt::Display for EntryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stored entry kind this crate does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown ledger entry kind {0:?}")]
pub struct UnknownEntryKind(pub String);

impl FromStr for EntryKind {
    type Err = UnknownEntryKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| UnknownEntryKind(s.to_owned()))
    }
}

/// Read from a TEXT column: a stored string that is no known value is a
/// decode error naming it (never a panic, never a default).
macro_rules! decode_text {
    ($t:ty) => {
        impl sqlx::Type<sqlx::Postgres> for $t {
            fn type_info() -> sqlx::postgres::PgTypeInfo {
                <String as sqlx::Type<sqlx::Postgres>>::type_info()
            }

            fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
                <String as sqlx::Type<sqlx::Postgres>>::compatible(ty)
            }
        }

        impl<'r> sqlx::Decode<'r, sqlx::Postgres> for $t {
            fn decode(value: sqlx::postgres::PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
                let s = <&str as sqlx::Decode<'r, sqlx::Postgres>>::decode(value)?;
                Ok(s.parse()?)
            }
        }
    };
}

decode_text!(Account);
decode_text!(EntryKind);

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &str = include_str!("../../migrations/billing/20261129500001_billing_schema.sql");
    const ROLES: &str = include_str!("../../migrations/billing/20261130950001_roles.sql");

    #[test]
    fn every_account_round_trips_through_its_stored_string() {
        let accounts = [Account::User(0), Account::User(-42), Account::User(i64::MAX), Account::User(100_000_001)]
            .into_iter()
            .chain(SystemAccount::ALL.map(Account::System));
        for a in accounts {
            assert_eq!(a.to_string().parse::<Account>(), Ok(a), "{a}");
        }
        assert_eq!(Account::REVENUE.to_string(), "system:revenue");
        assert_eq!(Account::User(7).to_string(), "user:7");
    }

    #[test]
    fn malformed_account_strings_are_refused_with_the_string_named() {
        for bad in [
            "",
            "user:",
            "user:x",
            "user: 1",
            "system:",
            "system:bank",
            "revenue",
            "User:1",
            "user:1:2",
            "user:+5",
            "user:007",
        ] {
            let err = bad.parse::<Account>().err();
            assert_eq!(err, Some(UnknownAccount(bad.to_owned())), "{bad:?}");
        }
    }

    #[test]
    fn the_system_accounts_are_exactly_those_the_schema_inserts() {
        for a in SystemAccount::ALL {
            let row = format!("('{}', '{}')", Account::System(a), a.as_str());
            assert!(SCHEMA.contains(&row), "schema lacks {row}");
        }
        assert_eq!(SCHEMA.matches("('system:").count(), SystemAccount::ALL.len());
    }

    #[test]
    fn entry_kinds_round_trip_and_the_statement_function_lists_known_kinds() {
        for k in EntryKind::ALL {
            assert_eq!(k.as_str().parse::<EntryKind>(), Ok(k));
        }
        assert!("usage_charge.v1".parse::<EntryKind>().is_err());
        // `fleet_user_entries` filters on these: each must be a kind we write.
        let listed = ROLES.split("e.kind IN (").nth(1).and_then(|s| s.split(')').next()).unwrap_or_default();
        let kinds: Vec<&str> = listed.split(',').map(|s| s.trim().trim_matches('\'')).collect();
        assert_eq!(kinds.len(), 5, "{listed}");
        for k in kinds {
            assert!(k.parse::<EntryKind>().is_ok(), "{k}");
        }
    }
}
