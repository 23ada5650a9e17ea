//! Building and running the billing-worker, and its CLI commands.
//!
//! Shutdown phases:
//! 1. the token is cancelled (SIGTERM / ctrl-c in `main`);
//! 2. the consumer stops taking deliveries and waits up to 10 s for the
//!    ones in flight (each acks after its commit);
//! 3. unacked deliveries return to the queue when the channel closes.

use crate::config::{Command, DeadLetterAction, Settings};
use crate::consumer::{self, BillingContext};
use crate::finance;
use crate::finance_output::Format;
use crate::ledger::{self, Applied};
use anyhow::Context;
use rust_decimal::Decimal;
use shared::amqp::{ConfirmPublisher, Topology};
use shared::money::format_usd;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Runs the command given in `settings`.
///
/// # Errors
/// Start-up failures and CLI errors, with context.
pub async fn main_with(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    settings.validate().map_err(anyhow::Error::msg)?;
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
            report(&format!("{what}: {} to user {user}, balance {}", format_usd(amount), format_usd(balance)));
        }
        Command::RefundStars { charge, bot_database_url } => {
            let bot = match bot_database_url.filter(|u| !u.is_empty()) {
                Some(url) => Some(shared::db::pool(&url, 2, Duration::from_secs(5)).context("DATABASE_URL")?),
                None => None,
            };
            let line = refund_stars(&settings, &db, bot.as_ref(), &charge).await?;
            report(&line);
        }
        Command::PaymentAnomalies { bot_database_url } => {
            let bot = shared::db::pool(&required_bot_url(bot_database_url)?, 2, Duration::from_secs(5))
                .context("DATABASE_URL")?;
            report(&crate::anomalies::list(&bot).await?);
        }
        Command::DeadLetters { action } => match action {
            DeadLetterAction::List { all, format } => {
                report_raw(&crate::finance_dead_letters::list(&db, all, format).await?);
            }
            DeadLetterAction::Discard { id, reason } => {
                report(&crate::finance_dead_letters::discard(&db, id, &reason).await?);
            }
            DeadLetterAction::Redrive { event, all } => {
                if event.is_none() && !all {
                    anyhow::bail!("say --event ID or --all");
                }
                let publisher =
                    ConfirmPublisher::new(&settings.broker.amqp_url, "billing-redrive", Duration::from_secs(5));
                let topology = Topology::new(settings.broker.amqp_prefix.clone());
                let ch = publisher.ensure_connected().await?;
                topology.declare(&ch).await?;
                let n = finance::redrive(&db, &publisher, &topology, event).await?;
                report(&format!("redriven: {n} event(s)"));
            }
        },
        Command::Reconcile { bot_database_url, from, to, format, anthropic_base_url } => {
            let bot = shared::db::pool(&required_bot_url(bot_database_url)?, 2, Duration::from_secs(5))
                .context("DATABASE_URL")?;
            let today = chrono::Utc::now().date_naive();
            let (from, to) = (from.unwrap_or(today - chrono::Days::new(30)), to.unwrap_or(today));
            let provider = match settings.anthropic_admin_key.clone() {
                Some(key) => Some(
                    crate::provider::UsageReportClient::new(&anthropic_base_url, key, Duration::from_secs(60))
                        .context("building the usage report client")?,
                ),
                None => None,
            };
            let r = finance::reconcile_with_provider(&bot, &db, from, to, provider.as_ref()).await?;
            report_raw(&finance::render(&r, format)?);
            if format == Format::Csv {
                // CSV holds the rows only: the findings go beside it.
                for line in r.findings() {
                    report_err(&line);
                }
            }
            if !r.clean() {
                // An error, so that the exit status is 1 (and tests see it).
                anyhow::bail!("reconcile: variance from {from} to {to}: {}", r.summary());
            }
        }
        Command::Explain { event } => report(&finance::explain(&db, event).await?),
        Command::Refund { event, reason } => report(&finance::refund(&db, event, &reason).await?),
        Command::Statement { user, from, to, format } => {
            report_raw(&crate::finance_statement::statement(&db, user, from, to, format).await?);
        }
        Command::Balance { user } => {
            let balance = ledger::balance(&db, user).await?;
            report(&format_usd(balance));
        }
        Command::Run => {
            let steps = Topology::new("").billing_retry_delays_ms.len();
            if settings.retry_delays_ms.len() != steps {
                anyhow::bail!("BILLING_RETRY_DELAYS_MS must list {steps} delays, one per retry queue");
            }
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
                batch_size: settings.batch_size.clamp(1, usize::from(settings.prefetch.max(1))),
                retry_delays_ms: settings.retry_delays_ms.clone(),
                consuming: Arc::new(std::sync::atomic::AtomicBool::new(false)),
                telegram: if settings.bot_token.is_empty() {
                    None
                } else {
                    shared::telegram::BotApi::new(
                        &settings.telegram_api_url,
                        settings.bot_token.clone(),
                        Duration::from_secs(10),
                    )
                    .ok()
                },
            };
            let admin_listener = tokio::net::TcpListener::bind(settings.admin_bind)
                .await
                .with_context(|| format!("ADMIN_BIND: cannot bind {}", settings.admin_bind))?;
            let _ = shared::admin::metrics_handle();
            let readiness = shared::admin::Readiness {
                databases: vec![ctx.db.clone()],
                consumers: vec![ctx.consuming.clone()],
                conditions: Vec::new(),
            };
            let admin = shared::admin::serve(admin_listener, readiness, shutdown.clone());
            tracing::info!("billing-worker running");
            #[expect(clippy::disallowed_methods, reason = "owned: stops on `shutdown` and is awaited below")]
            let sweeper = tokio::spawn(sweep_holds(ctx.db.clone(), shutdown.clone()));
            consumer::run(ctx, shutdown).await;
            let _ = sweeper.await;
            let _ = admin.await;
        }
    }
    Ok(())
}

/// Refunds a Stars payment: Telegram first (the money), then the correcting
/// entry, each idempotent, so a repeat after a failure in between completes it.
/// A payment that credited nothing (`payment_anomalies` of `bot`) is refunded
/// without a ledger entry.
async fn refund_stars(
    settings: &Settings,
    db: &sqlx::PgPool,
    bot_db: Option<&sqlx::PgPool>,
    charge: &str,
) -> anyhow::Result<String> {
    use shared::contracts::{refund_event_id, top_up_event_id};
    let paid: Option<serde_json::Value> = sqlx::query_scalar("SELECT payload FROM applied_events WHERE event_id = $1")
        .bind(top_up_event_id(charge))
        .fetch_optional(db)
        .await?;
    let Some(paid) = paid else {
        let Some(bot_db) = bot_db else {
            anyhow::bail!(
                "no applied Stars payment with charge id {charge} (set DATABASE_URL to look in payment_anomalies)"
            )
        };
        let Some(user) = crate::anomalies::open_payer(bot_db, charge).await? else {
            anyhow::bail!("no applied Stars payment and no open payment anomaly with charge id {charge}")
        };
        refund_at_telegram(settings, user, charge).await?;
        crate::anomalies::mark_refunded(bot_db, charge).await?;
        return Ok(format!("refunded: charge {charge}, user {user}, nothing had been credited"));
    };
    let user = paid.get("user_id").and_then(serde_json::Value::as_i64).context("payment without user_id")?;
    let credit: Decimal = paid.get("credit").and_then(serde_json::Value::as_str).unwrap_or("0").parse()?;
    let refund_id = refund_event_id(charge);
    let done: Option<uuid::Uuid> = sqlx::query_scalar("SELECT event_id FROM applied_events WHERE event_id = $1")
        .bind(refund_id)
        .fetch_optional(db)
        .await?;
    if done.is_some() {
        return Ok(format!("already refunded: charge {charge}"));
    }
    refund_at_telegram(settings, user, charge).await?;
    let postings = [ledger::Posting {
        debit: ledger::user_account(user),
        credit: billing::Account::PAYMENTS,
        amount: credit,
        kind: billing::EntryKind::Refund,
    }];
    let meta = ledger::EntryMeta {
        user_id: Some(user),
        memo: Some(format!("refund of Stars charge {charge}")),
        ..Default::default()
    };
    let payload = serde_json::json!({ "type": ledger::STARS_REFUND_KIND, "charge": charge, "user_id": user, "amount": credit.to_string() });
    let mut tx = shared::db::begin(db).await?;
    ledger::apply_postings(&mut tx, refund_id, ledger::STARS_REFUND_KIND, &payload, &postings, &meta).await?;
    tx.commit().await?;
    Ok(format!("refunded: charge {charge}, user {user}, {}", format_usd(credit)))
}

/// `refundStarPayment` (idempotent: an already refunded charge counts as done).
async fn refund_at_telegram(settings: &Settings, user: i64, charge: &str) -> anyhow::Result<()> {
    if settings.bot_token.is_empty() {
        anyhow::bail!("TELEGRAM_BOT_TOKEN must be set to refund");
    }
    let bot =
        shared::telegram::BotApi::new(&settings.telegram_api_url, settings.bot_token.clone(), Duration::from_secs(30))
            .map_err(|e| anyhow::anyhow!("TELEGRAM_API_URL: {e}"))?;
    let refunded = bot
        .call(shared::telegram::bot::RefundStarPayment { user_id: user, telegram_payment_charge_id: charge.to_owned() })
        .await;
    match refunded {
        Ok(_) => Ok(()),
        Err(shared::telegram::TelegramError::Api(d)) if d.contains("CHARGE_ALREADY_REFUNDED") => Ok(()),
        Err(e) => anyhow::bail!("refundStarPayment failed: {e}"),
    }
}

/// Voids expired holds every minute until `shutdown`.
async fn sweep_holds(db: sqlx::PgPool, shutdown: CancellationToken) {
    loop {
        match billing::holds::sweep_expired(&db).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(holds = n, "expired holds voided"),
            Err(e) => tracing::warn!(error.message = %e, "hold sweep failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
    }
}

#[expect(clippy::print_stdout, reason = "CLI output for operators")]
fn report(line: &str) {
    println!("{line}");
}

/// Writes `text` as it is (a CSV or JSON document ends with its own newline
/// or gets one).
#[expect(clippy::print_stdout, reason = "CLI output for operators")]
fn report_raw(text: &str) {
    if text.ends_with('\n') {
        print!("{text}");
    } else {
        println!("{text}");
    }
}

/// A line for the operator beside the output (stderr).
fn report_err(line: &str) {
    eprintln!("{line}");
}

/// The bot database URL a subcommand needs, or an error naming its sources.
fn required_bot_url(url: Option<String>) -> anyhow::Result<String> {
    url.filter(|u| !u.is_empty()).ok_or_else(|| {
        anyhow::anyhow!("the bot database is needed: set DATABASE_URL or DATABASE_URL_FILE (or --bot-database-url)")
    })
}
