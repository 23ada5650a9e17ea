//! Ingress: updates accepted per second through `POST /telegram/webhook`
//! (in-process ingress, publisher confirms on), against raw confirming
//! publishers sending the same body to the same intake shard queue (a
//! quorum queue) with the routing key the ingress uses, at the same
//! concurrency.

use crate::{Args, Row};
use anyhow::Context;
use lapin::options::QueuePurgeOptions;
use shared::amqp::{ConfirmPublisher, Outgoing, Topology};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Target of the webhook against the raw publisher (issue "Benchmarks": ≥ 0.8).
const TARGET: f64 = 0.8;
/// Target of the webhook's p99 latency, milliseconds.
const P99_TARGET_MS: f64 = 50.0;
/// The webhook secret of the bench ingress.
const SECRET: &str = "bench-secret-123";

/// Empties the intake shard `queue` between the two phases, so that both
/// publish into an empty queue.
async fn purge(amqp_url: &str, queue: &str) -> anyhow::Result<()> {
    let conn = shared::amqp::connect(amqp_url, "bench-purge", Duration::from_secs(5)).await?;
    let ch = conn.create_channel().await?;
    ch.queue_purge(queue.into(), QueuePurgeOptions::default()).await?;
    let _ = conn.close(200, "bye".into()).await;
    Ok(())
}

/// The ingress rows.
///
/// # Errors
/// Broker failures or an ingress that does not start.
pub async fn bench_ingress(args: &Args) -> anyhow::Result<Vec<Row>> {
    let prefix = format!("bench{}_", &uuid::Uuid::now_v7().simple().to_string()[20..]);
    let result = measure(args, &prefix).await;
    let cleaned = fleet_tests::fleet::delete_topology(&args.amqp_url, &prefix).await;
    let rows = result?;
    cleaned?;
    Ok(rows)
}

async fn measure(args: &Args, prefix: &str) -> anyhow::Result<Vec<Row>> {
    use clap::Parser as _;
    let mut settings = ingress::Settings::try_parse_from([
        "ingress",
        "--bind",
        "127.0.0.1:0",
        "--admin-bind",
        "127.0.0.1:0",
        "--amqp-url",
        &args.amqp_url,
        "--amqp-prefix",
        prefix,
    ])?;
    // Secrets never come from flags.
    settings.webhook_secret = shared::secret::Secret::new(SECRET);
    let app = ingress::App::build(settings).await?;
    let port = app.port();
    let token = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(app.run_until_stopped(token.clone()));
    let body = std::fs::read(args.fixtures.join("telegram/ada_capital.json")).context("fixture update")?;
    let update: serde_json::Value = serde_json::from_slice(&body)?;
    let chat = update.pointer("/message/chat/id").and_then(serde_json::Value::as_i64);
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/telegram/webhook");
    let seconds = args.ingress_seconds.max(1);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (client, url, body) = (client.clone(), url.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut ok = 0u64;
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                let r =
                    client.post(&url).header("x-telegram-bot-api-secret-token", SECRET).body(body.clone()).send().await;
                if r.is_ok_and(|r| r.status().is_success()) {
                    ok += 1;
                    lat.push(t.elapsed());
                }
            }
            (ok, lat)
        }));
    }
    let mut ok = 0;
    let mut lat = Vec::new();
    for t in tasks {
        let (n, l) = t.await?;
        ok += n;
        lat.extend(l);
    }
    let webhook = ok as f64 / seconds as f64;
    token.cancel();
    let _ = server.await;
    // Baseline: raw publishers with confirms, same body, same concurrency,
    // same routing key, hence the same intake shard (a quorum queue).
    let topo = Topology::new(prefix);
    let key = topo.update_routing_key(chat);
    purge(&args.amqp_url, &topo.intake_queue(topo.shard_of(chat))).await?;
    let publisher = Arc::new(ConfirmPublisher::new(&args.amqp_url, "bench", Duration::from_secs(5)));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (publisher, body, exchange, key) = (publisher.clone(), body.clone(), topo.updates_exchange(), key.clone());
        tasks.push(tokio::spawn(async move {
            let mut ok = 0u64;
            let mut failed = 0u64;
            while Instant::now() < deadline {
                let sent = publisher
                    .publish(Outgoing {
                        exchange: &exchange,
                        routing_key: &key,
                        body: &body,
                        message_id: Some("800000002"),
                        content_type: "application/json",
                        attempt: None,
                    })
                    .await;
                if sent.is_ok() {
                    ok += 1;
                } else {
                    failed += 1;
                }
            }
            (ok, failed)
        }));
    }
    let (mut raw, mut failed) = (0, 0);
    for t in tasks {
        let (o, f) = t.await?;
        raw += o;
        failed += f;
    }
    anyhow::ensure!(raw > 0, "the raw publisher got no confirm ({failed} failures; routing key {key})");
    let raw = raw as f64 / seconds as f64;
    Ok(vec![
        Row::ratio(
            "ingress webhook accepted (confirms on)",
            webhook,
            "updates/s",
            "lapin publisher with confirms",
            raw,
            TARGET,
        )
        .with_note(format!(
            "{} clients/publishers, {seconds} s each, routing key {key} → {}",
            args.concurrency,
            topo.intake_queue(topo.shard_of(chat))
        )),
        Row::latency("ingress webhook latency p50 / p99", &mut lat, Some(P99_TARGET_MS)),
    ])
}
