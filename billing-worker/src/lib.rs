//! The billing-worker: applies billing events to a double-entry ledger
//! exactly once (idempotent on the event id), retries transient failures
//! through delay queues and dead-letters what keeps failing, recording it for
//! finance (DESIGN §4, §7a, P7).
//!
//! # Layout
//! - [`config`]: settings and subcommands (`--help`).
//! - [`anomalies`]: Stars payments that credited nothing (bot database), for
//!   `payment-anomalies` and `refund-stars`.
//! - [`ledger`]: postings of each event kind, applied in one transaction.
//! - [`consumer`]: the `billing.events` consumer and its retry policy.
//! - [`finance`]: dead letters, reconciliation, explain, refunds.
//! - [`provider`]: the provider's usage report (Anthropic Admin API), for
//!   reconciliation.
//! - [`startup`]: building and running the app, and the CLI commands.

pub mod anomalies;
pub mod config;
pub mod consumer;
pub mod finance;
pub mod ledger;
pub mod provider;
pub mod startup;

pub use config::Settings;
