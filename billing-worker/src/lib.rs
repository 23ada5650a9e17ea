//! The billing-worker: applies billing events to a double-entry ledger
//! exactly once (idempotent on the event id), retries transient failures
//! through delay queues and dead-letters what keeps failing, recording it for
//! finance (DESIGN §4, §7a, P7).
//!
//! # Layout
//! - [`config`]: settings and subcommands (`--help`).
//! - [`anomalies`]: Stars payments that credited nothing (bot database), for
//!   `payment-anomalies` and `refund-stars`.
//! - [`ledger`]: the `billing` crate's ledger (re-exported): the billing
//!   database's tables are written only by that crate.
//! - [`bot_db`]: the outbox and `api_calls` of the bot database, read for
//!   reconciliation as typed events (no JSON path, no tag in SQL).
//! - [`consumer`]: the `billing.events` consumer and its retry policy.
//! - [`finance`]: reconciliation, redrive, explain, refunds.
//! - [`finance_dead_letters`]: dead letters listed by event id, discarded with a reason.
//! - [`finance_output`]: the output formats (table, CSV, JSON).
//! - [`finance_statement`]: a user's statement for a period.
//! - [`provider`]: the provider's usage report (Anthropic Admin API), for
//!   reconciliation.
//! - [`startup`]: building and running the app, and the CLI commands.

pub mod anomalies;
pub mod bot_db;
pub mod config;
pub mod consumer;
pub mod finance;
pub mod finance_dead_letters;
pub mod finance_output;
pub mod finance_statement;
pub mod provider;
pub mod startup;

pub use billing::ledger;
pub use config::Settings;
