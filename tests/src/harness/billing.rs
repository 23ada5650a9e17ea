//! The billing suite's rigs: a billing-worker with chosen settings, event builders, a publisher, the reconcile command, the settled wait.

use crate::harness::Broker;
use anyhow::Result;
use clap::Parser as _;
use rust_decimal::Decimal;
use shared::amqp::{ConfirmPublisher, Outgoing, BILLING_ROUTING_KEY};
use shared::contracts::{usage_event_id, BillingEvent, UsageCharge};
use shared::pricing::TokenCounts;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A running in-process billing-worker.
pub struct BillingWorker {
    token: CancellationToken,
    handle: JoinHandle<Result<()>>,
}

impl BillingWorker {
    /// Starts one with `extra` flags (e.g. `--retry-delays-ms 50,50,50,50,50`).
    pub fn start(broker: &Broker, db_url: &str, extra: &[&str]) -> Result<Self> {
        Self::start_notifying(broker, db_url, None, extra)
    }

    /// As [`BillingWorker::start`], with a bot token (as if from
    /// TELEGRAM_BOT_TOKEN) for the notices to users.
    pub fn start_notifying(broker: &Broker, db_url: &str, bot_token: Option<&str>, extra: &[&str]) -> Result<Self> {
        // As its own role, as in production.
        let db_url = &crate::fleet::as_role(db_url, crate::fleet::BILLING_ROLE)?;
        let mut args = vec![
            "billing-worker",
            "--billing-database-url",
            db_url,
            "--database-max-connections",
            "8",
            "--admin-bind",
            "127.0.0.1:0",
        ];
        args.extend(["--amqp-url", &broker.url, "--amqp-prefix", broker.prefix()]);
        args.extend(extra);
        args.push("run");
        let mut settings = billing_worker::Settings::try_parse_from(args)?;
        settings.bot_token = bot_token.map(shared::secret::Secret::new).unwrap_or_default();
        let token = CancellationToken::new();
        let handle = tokio::spawn(billing_worker::startup::main_with(settings, token.clone()));
        Ok(Self { token, handle })
    }

    /// Stops it and waits.
    pub async fn stop(self) -> Result<()> {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.handle).await???;
        Ok(())
    }
}

/// A usage charge of `user` for call `seq` of `job`, costing `cost` (user pays 1.5×).
pub fn usage(job: Uuid, seq: i32, user: i64, cost: &str) -> BillingEvent {
    let cost: Decimal = cost.parse().unwrap_or_default();
    BillingEvent::UsageCharge(UsageCharge {
        event_id: usage_event_id(job, seq),
        job_id: job,
        update_id: 1,
        lease_epoch: 1,
        api_call_seq: seq,
        user_id: user,
        chat_id: user,
        request_id: Some(format!("req_{seq}")),
        model: "claude-sonnet-4-5".into(),
        tokens: TokenCounts { input: 10, output: 10, ..Default::default() },
        provider_cost: shared::money::Usd(cost),
        user_charge: shared::money::Usd(cost * Decimal::new(15, 1)),
        price_model: "claude-sonnet-4-5".into(),
        price_effective_from: chrono::NaiveDate::from_ymd_opt(2025, 10, 1).unwrap_or_default(),
        estimated: false,
        abandoned: false,
        occurred_at: chrono::Utc::now(),
    })
}

/// Publishes events to the billing exchange with confirms.
pub async fn publish(broker: &Broker, events: &[BillingEvent]) -> Result<()> {
    let publisher = ConfirmPublisher::new(&broker.url, "test-billing", Duration::from_secs(10));
    let exchange = broker.topology.billing_exchange();
    for e in events {
        let body = serde_json::to_vec(e)?;
        let id = e.event_id().to_string();
        publisher
            .publish(Outgoing {
                exchange: &exchange,
                routing_key: BILLING_ROUTING_KEY,
                body: &body,
                message_id: Some(&id),
                content_type: "application/json",
                attempt: None,
            })
            .await?;
    }
    Ok(())
}

/// Grants `usd` to `user` directly in the ledger.
pub async fn grant(pool: &sqlx::PgPool, user: i64, usd: &str) -> Result<()> {
    billing_worker::ledger::grant(pool, user, usd.parse()?, Uuid::now_v7()).await?;
    Ok(())
}

/// The admin key the reconcile tests give for the fake's usage report.
pub const ADMIN_KEY: &str = "sk-ant-admin-test";

/// Runs the `billing-worker reconcile` command as from the command line, on
/// the test database (bot and billing in one, as the billing-worker's role)
/// for `[from, to]`, with `admin_key` as if from ANTHROPIC_ADMIN_API_KEY and
/// `extra` flags (`--anthropic-base-url …`). `Err` is a non-zero exit.
pub async fn reconcile_cli(
    db_url: &str,
    from: chrono::NaiveDate,
    to: chrono::NaiveDate,
    admin_key: Option<&str>,
    extra: &[&str],
) -> Result<()> {
    let db_url = &crate::fleet::as_role(db_url, crate::fleet::BILLING_ROLE)?;
    let (from, to) = (from.to_string(), to.to_string());
    let mut args = vec![
        "billing-worker",
        "--billing-database-url",
        db_url,
        "--database-max-connections",
        "2",
        "reconcile",
        "--bot-database-url",
        db_url,
        "--from",
        &from,
        "--to",
        &to,
    ];
    args.extend(extra);
    let mut settings = billing_worker::Settings::try_parse_from(args)?;
    settings.anthropic_admin_key = admin_key.map(shared::secret::Secret::new);
    billing_worker::startup::main_with(settings, CancellationToken::new()).await
}

/// Waits until the fleet of `pool` has finished `jobs` jobs and the ledger
/// has applied every event of the outbox.
pub async fn wait_settled(pool: &sqlx::PgPool, jobs: i64) -> Result<()> {
    crate::harness::wait_until("the jobs to finish and every outbox event to be applied", crate::harness::WAIT, || {
        let pool = pool.clone();
        async move {
            let done: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status NOT IN ('queued', 'running')")
                .fetch_one(&pool)
                .await?;
            let unapplied: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM billing_outbox o
                  WHERE NOT EXISTS (SELECT 1 FROM applied_events a WHERE a.event_id = o.event_id)",
            )
            .fetch_one(&pool)
            .await?;
            Ok(done == jobs && unapplied == 0)
        }
    })
    .await
}
