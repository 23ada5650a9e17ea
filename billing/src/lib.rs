//! The billing database's one owner: a double-entry ledger applied exactly
//! once per event id, holds on users' balances, and users' statements
//! (DESIGN §4, §5.4, §7a; issue 14). The worker calls [`holds`] and
//! [`statement`]; the billing-worker binary applies events with [`ledger`].
//! No other crate writes SQL against the billing tables.
//!
//! # Layout
//! - [`account`]: [`Account`] and [`EntryKind`], the typed forms of the
//!   stored account ids and entry kinds.
//! - [`ledger`]: postings of each event kind, applied in one transaction.
//! - [`holds`]: place, void, available balance, sweep.
//! - [`statement`]: a user's latest entries, for `/usage`; a period's
//!   entries with opening and closing balances, for finance.
//! - [`failures`]: dead-lettered events: list, discard with a reason.

pub mod account;
pub mod failures;
pub mod holds;
pub mod ledger;
pub mod statement;

pub use account::{Account, EntryKind, SystemAccount};
