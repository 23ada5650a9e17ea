//! Billing: usage charges applied exactly once by a real billing-worker
//! (in-process, its consumer batching deliveries into one transaction each),
//! against single-row `INSERT … ON CONFLICT DO NOTHING` autocommits and a
//! batched multi-row insert of the same events into a plain table.

use crate::{progress, Args, Row};
use anyhow::Context;
use clap::Parser as _;
use shared::amqp::{ConfirmPublisher, Outgoing, Topology, BILLING_ROUTING_KEY};
use shared::contracts::{usage_event_id, BillingEvent, UsageCharge};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Target of the billing-worker against single-row autocommits (issue).
const AUTOCOMMIT_TARGET: f64 = 5.0;
/// Target against the batched plain insert (kept from the first version of
/// this benchmark; the issue names none): the ledger writes several rows
/// per event (idempotency row, account upsert, entries) one statement at a
/// time, where the baseline writes one row per event, 1,000 per statement.
const BATCHED_TARGET: f64 = 0.01;
/// Publishers of the events before the worker starts.
const PUBLISHERS: usize = 16;
/// Longest wait for the worker to apply every event.
const APPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// `n` usage charges of one user, as the worker's outbox relay sends them.
fn events(n: usize) -> Vec<BillingEvent> {
    let job = Uuid::now_v7();
    (0..n)
        .map(|i| {
            let seq = i32::try_from(i + 1).unwrap_or(i32::MAX);
            BillingEvent::UsageCharge(UsageCharge {
                event_id: usage_event_id(job, seq),
                job_id: job,
                update_id: 1,
                lease_epoch: 1,
                api_call_seq: seq,
                user_id: 1,
                chat_id: 1,
                request_id: Some(format!("req_{seq}")),
                model: "claude-sonnet-4-5".into(),
                tokens: shared::pricing::TokenCounts { input: 10, output: 10, ..Default::default() },
                provider_cost: "0.001".parse().unwrap_or_default(),
                user_charge: "0.0015".parse().unwrap_or_default(),
                price_model: "claude-sonnet-4-5".into(),
                price_effective_from: chrono::NaiveDate::from_ymd_opt(2025, 10, 1).unwrap_or_default(),
                estimated: false,
                abandoned: false,
                occurred_at: chrono::Utc::now(),
            })
        })
        .collect()
}

/// Publishes `events` to the billing exchange of `topo` with confirms,
/// [`PUBLISHERS`] at a time.
async fn publish(amqp_url: &str, topo: &Topology, events: &[BillingEvent]) -> anyhow::Result<()> {
    let publisher = Arc::new(ConfirmPublisher::new(amqp_url, "bench-billing", Duration::from_secs(10)));
    let ch = publisher.ensure_connected().await?;
    topo.declare(&ch).await?;
    let per = events.len().div_ceil(PUBLISHERS).max(1);
    let mut tasks = Vec::new();
    for part in events.chunks(per) {
        let (publisher, exchange, part) = (publisher.clone(), topo.billing_exchange(), part.to_vec());
        tasks.push(tokio::spawn(async move {
            for e in &part {
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
            Ok::<(), anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Usage charges in the ledger so far.
async fn applied(pool: &sqlx::PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM applied_events WHERE kind = 'usage_charge.v1'").fetch_one(pool).await?)
}

/// Starts a billing-worker on `prefix` and times it from its start until
/// all `n` queued events are applied; its events/s.
async fn worker_rate(args: &Args, db_url: &str, pool: &sqlx::PgPool, prefix: &str, n: usize) -> anyhow::Result<f64> {
    let db_url = &fleet_tests::fleet::as_role(db_url, fleet_tests::fleet::BILLING_ROLE)?;
    let settings = billing_worker::Settings::try_parse_from([
        "billing-worker",
        "--billing-database-url",
        db_url,
        "--admin-bind",
        "127.0.0.1:0",
        "--amqp-url",
        &args.amqp_url,
        "--amqp-prefix",
        prefix,
        "run",
    ])?;
    let token = tokio_util::sync::CancellationToken::new();
    let start = Instant::now();
    let worker = tokio::spawn(billing_worker::startup::main_with(settings, token.clone()));
    let want = i64::try_from(n)?;
    let mut done = applied(pool).await?;
    while done < want && start.elapsed() < APPLY_TIMEOUT && !worker.is_finished() {
        tokio::time::sleep(Duration::from_millis(10)).await;
        done = applied(pool).await?;
    }
    let took = start.elapsed();
    token.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(30), worker).await;
    anyhow::ensure!(done == want, "the billing-worker applied {done} of {n} events in {took:?}");
    stopped.context("the billing-worker did not stop")???;
    Ok(n as f64 / took.as_secs_f64())
}

/// The billing rows.
///
/// # Errors
/// Database or broker failures.
pub async fn bench_billing(args: &Args) -> anyhow::Result<Vec<Row>> {
    let services =
        fleet_tests::fleet::Services { postgres_url: args.postgres_url.clone(), amqp_url: args.amqp_url.clone() };
    let stem = format!("bench_{}", &Uuid::now_v7().simple().to_string()[20..]);
    let prefix = format!("{stem}_");
    let dbs = fleet_tests::fleet::Databases::create(&services, &stem).await?;
    let result = measure(args, &dbs, &prefix).await;
    let topology = fleet_tests::fleet::delete_topology(&args.amqp_url, &prefix).await;
    let dropped = dbs.drop_all().await;
    let rows = result?;
    topology?;
    dropped?;
    Ok(rows)
}

async fn measure(args: &Args, dbs: &fleet_tests::fleet::Databases, prefix: &str) -> anyhow::Result<Vec<Row>> {
    let pool = dbs.billing.clone();
    billing_worker::ledger::grant(&pool, 1, "1000000".parse()?, Uuid::now_v7()).await?;
    let n = args.billing_events;
    let events = events(n);
    progress(&format!("billing: publishing {n} usage charges"));
    publish(&args.amqp_url, &Topology::new(prefix), &events).await?;
    progress("billing: billing-worker applying them");
    let applied = worker_rate(args, &dbs.billing_url, &pool, prefix, n).await?;
    // `applied_at` is the transaction's start (`now()`): one value per batch.
    let transactions: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT applied_at) FROM applied_events WHERE kind = 'usage_charge.v1'")
            .fetch_one(&pool)
            .await?;
    progress("billing: plain inserts");
    sqlx::query("CREATE TABLE bench_plain (id uuid PRIMARY KEY, payload jsonb NOT NULL)").execute(&pool).await?;
    let start = Instant::now();
    for e in &events {
        sqlx::query("INSERT INTO bench_plain (id, payload) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(e.event_id())
            .bind(serde_json::to_value(e)?)
            .execute(&pool)
            .await?;
    }
    let plain = n as f64 / start.elapsed().as_secs_f64();
    sqlx::query("TRUNCATE bench_plain").execute(&pool).await?;
    let start = Instant::now();
    for chunk in events.chunks(1000) {
        let ids: Vec<Uuid> = chunk.iter().map(BillingEvent::event_id).collect();
        let payloads = chunk.iter().map(serde_json::to_value).collect::<Result<Vec<_>, _>>()?;
        sqlx::query(
            "INSERT INTO bench_plain (id, payload) SELECT * FROM UNNEST($1::uuid[], $2::jsonb[]) ON CONFLICT DO NOTHING",
        )
        .bind(&ids)
        .bind(&payloads)
        .execute(&pool)
        .await?;
    }
    let batched = n as f64 / start.elapsed().as_secs_f64();
    let name = "billing-worker apply (exactly once, batched)";
    let note = format!(
        "{n} usage charges of one user, queued before an in-process billing-worker (defaults: batch 128, prefetch 128, two batches in flight) starts; timed from its start; {transactions} transactions, {:.1} events each",
        n as f64 / transactions.max(1) as f64
    );
    Ok(vec![
        Row::ratio(name, applied, "events/s", "single-row INSERT … ON CONFLICT autocommit", plain, AUTOCOMMIT_TARGET)
            .with_note(note),
        Row::ratio(name, applied, "events/s", "batched multi-row INSERT (1000/stmt)", batched, BATCHED_TARGET),
    ])
}
