//! Building and running the billing-worker, and its CLI commands.
//!
//! Shutdown phases:
//! 1. the token is cancelled (SIGTERM / ctrl-c in `main`);
//! 2. the consumer stops taking deliveries and waits up to 10 s for the
//!    ones in flight (each acks after its commit);
//! 3. unacked deliveries return to the queue when the channel closes.

use crate::config::{Command, Settings};
use crate::consumer::{self, BillingContext};
use crate::ledger::{self, Applied};
use anyhow::Context;
use rust_decimal::Decimal;
use shared::amqp::{ConfirmPublisher, Topology};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Runs the command given in `settings`.
///
/// # Errors
/// Start-up failures and CLI errors, with context.
pub async fn main_with(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let db =
        shared::db::pool(&settings.billing_database_url, settings.database_max_connections, Duration::from_secs(5))
            .context("BILLING_DATABASE_URL")?;
    match settings.command.clone().unwrap_or(Command::Run) {
        Command::Migrate => {
            shared::db::migrate_billing(&db).await.context("migrating the billing database")?;
            tracing::info!("billing migrations applied");
        }
        Command::Grant { user, usd, idempotency_key } => {
            let amount: Decimal =
                usd.trim().parse().with_context(|| format!("--usd {usd:?} is not a decimal amount"))?;
            let event_id = match &idempotency_key {
                Some(k) => shared::contracts::grant_event_id(k),
                None => uuid::Uuid::now_v7(),
            };
            let applied = ledger::grant(&db, user, amount, event_id).await?;
            let balance = ledger::balance(&db, user).await?;
            let what = if applied == Applied::Applied { "granted" } else { "already granted (same idempotency key)" };
            report(&format!("{what}: user {user} balance {balance} USD"));
        }
        Command::Balance { user } => {
            let balance = ledger::balance(&db, user).await?;
            report(&format!("{balance}"));
        }
        Command::Run => {
            let ctx = BillingContext {
                db,
                topology: Topology::new(settings.broker.amqp_prefix.clone()),
                publisher: Arc::new(ConfirmPublisher::new(
                    &settings.broker.amqp_url,
                    "billing-publisher",
                    Duration::from_secs(5),
                )),
                amqp_url: settings.broker.amqp_url.clone(),
                prefetch: settings.prefetch,
            };
            tracing::info!("billing-worker running");
            consumer::run(ctx, shutdown).await;
        }
    }
    Ok(())
}

#[expect(clippy::print_stdout, reason = "CLI output for operators")]
fn report(line: &str) {
    println!("{line}");
}
