//! `bench`: figures beside baselines measured in the same run (issue
//! "Benchmarks"). Rows so far: SSE stream parsing, billing events applied,
//! ingress webhook throughput. Prints one table; `--json FILE` writes
//! `{"rows": [{"name","value","unit","baseline_name","baseline","ratio","target","met"}]}`.

use anyhow::Context;
use clap::Parser;
use futures_util::StreamExt;
use serde::Serialize;
use shared::anthropic::events::parse_event;
use shared::anthropic::MessageState;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
#[command(name = "bench", about = "Benchmarks of the fleet beside same-run baselines.")]
struct Args {
    /// Fixtures folder.
    #[arg(long, default_value = "../shared/fixtures")]
    fixtures: PathBuf,
    /// Write the rows as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// PostgreSQL admin URL.
    #[arg(long, env = "DEMO_POSTGRES_URL", default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    postgres_url: String,
    /// RabbitMQ URL.
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    /// Megabytes of SSE to parse.
    #[arg(long, default_value_t = 50)]
    sse_mb: usize,
    /// Billing events to apply.
    #[arg(long, default_value_t = 3000)]
    billing_events: usize,
    /// Seconds of webhook load.
    #[arg(long, default_value_t = 5)]
    ingress_seconds: u64,
    /// Concurrent webhook clients / publishers.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
}

#[derive(Debug, Serialize)]
struct Row {
    name: String,
    value: f64,
    unit: String,
    baseline_name: String,
    baseline: f64,
    ratio: f64,
    target: String,
    met: bool,
}

fn row(name: &str, value: f64, unit: &str, baseline_name: &str, baseline: f64, target_ratio: f64) -> Row {
    let ratio = if baseline > 0.0 { value / baseline } else { 0.0 };
    Row {
        name: name.into(),
        value,
        unit: unit.into(),
        baseline_name: baseline_name.into(),
        baseline,
        ratio,
        target: format!("≥ {target_ratio} × baseline"),
        met: ratio >= target_ratio,
    }
}

/// SSE bytes: every fixture stream, repeated to `mb` megabytes.
fn sse_corpus(fixtures: &std::path::Path, mb: usize) -> anyhow::Result<Vec<u8>> {
    let mut one = Vec::new();
    for entry in std::fs::read_dir(fixtures.join("anthropic"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "sse") {
            one.extend(std::fs::read(&path)?);
            one.extend(b"\n");
        }
    }
    let mut all = Vec::with_capacity(mb * 1_048_576 + one.len());
    while all.len() < mb * 1_048_576 {
        all.extend_from_slice(&one);
    }
    Ok(all)
}

async fn bench_sse(args: &Args) -> anyhow::Result<Vec<Row>> {
    let corpus = sse_corpus(&args.fixtures, args.sse_mb)?;
    let mb = corpus.len() as f64 / 1_048_576.0;
    // Product: SSE framing (eventsource-stream, as the client uses it) + serde enum + state machine.
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> =
        corpus.chunks(16 * 1024).map(|c| Ok(bytes::Bytes::copy_from_slice(c))).collect();
    let start = Instant::now();
    let mut events = 0u64;
    let mut state = MessageState::default();
    let mut stream = eventsource_stream::Eventsource::eventsource(futures_util::stream::iter(chunks));
    while let Some(ev) = stream.next().await {
        let ev = ev.map_err(|e| anyhow::anyhow!("{e}"))?;
        if ev.data.is_empty() {
            continue;
        }
        let parsed = parse_event(&ev.data)?;
        if matches!(parsed, shared::anthropic::StreamEvent::MessageStart { .. }) {
            state = MessageState::default();
        }
        state.apply(parsed);
        events += 1;
    }
    let product = start.elapsed();
    // Ceiling: a bare line splitter over the same bytes.
    let start = Instant::now();
    let mut data_lines = 0u64;
    for line in corpus.split(|b| *b == b'\n') {
        if line.starts_with(b"data: ") {
            data_lines += 1;
        }
    }
    let ceiling = start.elapsed();
    std::hint::black_box((data_lines, state.text().len()));
    Ok(vec![
        row(
            "sse parse + state machine",
            mb / product.as_secs_f64(),
            "MB/s",
            "bare line splitter",
            mb / ceiling.as_secs_f64(),
            0.01,
        ),
        row(
            "sse events",
            events as f64 / product.as_secs_f64(),
            "events/s",
            "bare line splitter",
            data_lines as f64 / ceiling.as_secs_f64(),
            0.01,
        ),
    ])
}

async fn bench_billing(args: &Args) -> anyhow::Result<Vec<Row>> {
    let services =
        fleet_tests::fleet::Services { postgres_url: args.postgres_url.clone(), amqp_url: args.amqp_url.clone() };
    let stem = format!("bench_{}", &uuid::Uuid::now_v7().simple().to_string()[20..]);
    let dbs = fleet_tests::fleet::Databases::create(&services, &stem).await?;
    let pool = dbs.billing.clone();
    billing_worker::ledger::grant(&pool, 1, "1000000".parse()?, uuid::Uuid::now_v7()).await?;
    let job = uuid::Uuid::now_v7();
    let n = args.billing_events;
    let events: Vec<_> = (0..n)
        .map(|i| {
            let seq = i32::try_from(i + 1).unwrap_or(i32::MAX);
            shared::contracts::BillingEvent::UsageCharge(shared::contracts::UsageCharge {
                event_id: shared::contracts::usage_event_id(job, seq),
                job_id: job,
                update_id: 1,
                lease_epoch: 1,
                api_call_seq: seq,
                user_id: 1,
                chat_id: 1,
                request_id: None,
                model: "claude-sonnet-4-5".into(),
                tokens: Default::default(),
                provider_cost: "0.001".parse().unwrap_or_default(),
                user_charge: "0.0015".parse().unwrap_or_default(),
                price_model: "claude-sonnet-4-5".into(),
                price_effective_from: chrono::NaiveDate::default(),
                estimated: false,
                occurred_at: chrono::Utc::now(),
            })
        })
        .collect();
    let start = Instant::now();
    for e in &events {
        billing_worker::ledger::apply_event(&pool, e).await?;
    }
    let applied = n as f64 / start.elapsed().as_secs_f64();
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
        let ids: Vec<uuid::Uuid> = chunk.iter().map(shared::contracts::BillingEvent::event_id).collect();
        let payloads: Vec<serde_json::Value> = chunk.iter().filter_map(|e| serde_json::to_value(e).ok()).collect();
        sqlx::query("INSERT INTO bench_plain (id, payload) SELECT * FROM UNNEST($1::uuid[], $2::jsonb[]) ON CONFLICT DO NOTHING")
            .bind(&ids)
            .bind(&payloads)
            .execute(&pool)
            .await?;
    }
    let batched = n as f64 / start.elapsed().as_secs_f64();
    dbs.drop_all().await?;
    Ok(vec![
        row(
            "billing apply (ledger, exactly once)",
            applied,
            "events/s",
            "single-row INSERT … ON CONFLICT autocommit",
            plain,
            0.25,
        ),
        row(
            "billing apply (ledger, exactly once)",
            applied,
            "events/s",
            "batched multi-row INSERT (1000/stmt)",
            batched,
            0.01,
        ),
    ])
}

async fn bench_ingress(args: &Args) -> anyhow::Result<Vec<Row>> {
    use clap::Parser as _;
    let prefix = format!("bench{}_", &uuid::Uuid::now_v7().simple().to_string()[20..]);
    let settings = ingress::Settings::try_parse_from([
        "ingress",
        "--bind",
        "127.0.0.1:0",
        "--webhook-secret",
        "bench-secret-123",
        "--amqp-url",
        &args.amqp_url,
        "--amqp-prefix",
        &prefix,
    ])?;
    let app = ingress::App::build(settings).await?;
    let port = app.port();
    let token = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(app.run_until_stopped(token.clone()));
    let body = std::fs::read(args.fixtures.join("telegram/ada_capital.json")).context("fixture update")?;
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/telegram/webhook");
    let deadline = Instant::now() + Duration::from_secs(args.ingress_seconds);
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (client, url, body) = (client.clone(), url.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut ok = 0u64;
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                let r = client
                    .post(&url)
                    .header("x-telegram-bot-api-secret-token", "bench-secret-123")
                    .body(body.clone())
                    .send()
                    .await;
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
    let webhook = ok as f64 / args.ingress_seconds as f64;
    lat.sort();
    let p = |q: f64| {
        lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    token.cancel();
    let _ = server.await;
    // Baseline: raw lapin publishers with confirms, same bodies, same concurrency, same queue kind.
    let publisher =
        std::sync::Arc::new(shared::amqp::ConfirmPublisher::new(&args.amqp_url, "bench", Duration::from_secs(5)));
    let topo = shared::amqp::Topology::new(prefix.clone());
    let deadline = Instant::now() + Duration::from_secs(args.ingress_seconds);
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (publisher, body, exchange) = (publisher.clone(), body.clone(), topo.updates_exchange());
        tasks.push(tokio::spawn(async move {
            let mut ok = 0u64;
            while Instant::now() < deadline {
                let sent = publisher
                    .publish(shared::amqp::Outgoing {
                        exchange: &exchange,
                        routing_key: "1.1",
                        body: &body,
                        message_id: None,
                        content_type: "application/json",
                        attempt: None,
                    })
                    .await;
                if sent.is_ok() {
                    ok += 1;
                }
            }
            ok
        }));
    }
    let mut raw = 0;
    for t in tasks {
        raw += t.await?;
    }
    let raw = raw as f64 / args.ingress_seconds as f64;
    fleet_tests::fleet::delete_topology(&args.amqp_url, &prefix).await?;
    Ok(vec![
        row("ingress webhook accepted (confirms on)", webhook, "updates/s", "lapin publisher with confirms", raw, 0.3),
        Row {
            name: "ingress webhook latency p50 / p99".into(),
            value: p(0.5),
            unit: "ms (p50)".into(),
            baseline_name: "p99".into(),
            baseline: p(0.99),
            ratio: 0.0,
            target: "p99 < 50 ms".into(),
            met: p(0.99) < 50.0,
        },
    ])
}

#[expect(clippy::print_stdout, reason = "the benchmark's table")]
fn print_rows(rows: &[Row]) {
    println!(
        "{:<40} {:>14} {:<10} {:<44} {:>14} {:>8} {:<22} met",
        "figure", "value", "unit", "baseline", "baseline", "ratio", "target"
    );
    for r in rows {
        println!(
            "{:<40} {:>14.1} {:<10} {:<44} {:>14.1} {:>8.3} {:<22} {}",
            r.name,
            r.value,
            r.unit,
            r.baseline_name,
            r.baseline,
            r.ratio,
            r.target,
            if r.met { "yes" } else { "NO" }
        );
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut rows = bench_sse(&args).await?;
    rows.extend(bench_billing(&args).await?);
    rows.extend(bench_ingress(&args).await?);
    print_rows(&rows);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&serde_json::json!({ "rows": rows }))?)?;
    }
    Ok(())
}
