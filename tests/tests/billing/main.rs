//! Billing that finance can audit: outages retried and applied once, dead
//! letters recorded, told and redriven, exact totals under duplicates,
//! holds against overspending, reconciliation, least-privilege database roles.

mod bad_input;
mod batching;
mod dead_letters;
mod finance_cli;
mod holds;
mod outage;
mod reconcile;
mod releases;
mod roles;
mod roles_attacks;
mod volume;
