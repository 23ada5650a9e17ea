//! Logs of the fleet as separate processes: every line inside a job carries
//! its ids (P12), and no secret appears anywhere even when every Bot API
//! call fails (the Bot API URL points at a closed port).

use fleet_tests::fake_anthropic::{FakeAnthropic, ScriptedResponse};
use fleet_tests::fake_telegram::FakeTelegram;
use fleet_tests::fleet::{delete_topology, Databases, Fleet, FleetConfig, Services};
use fleet_tests::harness::fixture_bytes;
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;

const TOKEN: &str = "7000000001:LEAKCHECK-do-not-log";
const SECRET: &str = "webhook-secret-LEAKCHECK";

fn bin_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/debug"))
}

fn services() -> Services {
    Services {
        postgres_url: std::env::var("TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into()),
        amqp_url: std::env::var("TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
    }
}

/// Plays `updates` and waits until `processed` of them were taken in and no job is open.
async fn run_fleet(
    stem: &str,
    telegram_api_url: &str,
    anthropic: &FakeAnthropic,
    updates: &[&str],
    processed: i64,
) -> anyhow::Result<(Vec<String>, Databases)> {
    let services = services();
    let dbs = Databases::create(&services, stem).await?;
    billing_worker::ledger::grant(&dbs.billing, 100_000_001, "5".parse()?, uuid::Uuid::now_v7()).await?;
    let log_dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/test-logs")).join(stem);
    let cfg = FleetConfig::for_test(
        bin_dir(),
        log_dir,
        services.clone(),
        &format!("{stem}_"),
        &dbs,
        telegram_api_url.to_owned(),
        anthropic.base_url(),
    )
    .secrets(TOKEN, SECRET)
    .worker_env([("PACE_PRIVATE_MS", "10"), ("PACE_BOT_MS", "1"), ("TELEGRAM_DELIVERY_DEADLINE_S", "2")]);
    let fleet = Fleet::start(&cfg).await?;
    let http = reqwest::Client::new();
    for u in updates {
        let status = http
            .post(fleet.webhook_url())
            .header("x-telegram-bot-api-secret-token", SECRET)
            .body(fixture_bytes(u)?)
            .send()
            .await?
            .status();
        assert_eq!(status, 200);
    }
    let pool = dbs.bot.clone();
    fleet_tests::harness::wait_until("every job to end", Duration::from_secs(60), || {
        let pool = pool.clone();
        let n = processed;
        async move {
            let done: i64 = sqlx::query_scalar("SELECT count(*) FROM processed_updates").fetch_one(&pool).await?;
            let open: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')")
                .fetch_one(&pool)
                .await?;
            Ok(done >= n && open == 0)
        }
    })
    .await?;
    let names = fleet.names();
    let logs: Vec<String> = names.iter().map(|n| fleet.log(n)).collect();
    fleet.stop().await;
    delete_topology(&services.amqp_url, &format!("{stem}_")).await?;
    Ok((logs, dbs))
}

#[tokio::test]
async fn every_log_line_of_a_job_carries_its_ids() -> anyhow::Result<()> {
    let telegram = FakeTelegram::start("127.0.0.1:0".parse()?, "fleet_test_bot").await?;
    let anthropic = FakeAnthropic::start("127.0.0.1:0".parse()?).await?;
    anthropic.push([ScriptedResponse::from_file(fleet_tests::harness::fixture("anthropic/text_capital.sse"))?]);
    let stem = format!("logs_{}", &uuid::Uuid::now_v7().simple().to_string()[20..]);
    let (logs, dbs) = run_fleet(&stem, &telegram.api_url(), &anthropic, &["telegram/ada_capital.json"], 1).await?;
    let worker_log = logs.iter().find(|l| l.contains("job done")).expect("a worker logged the job");
    let line: Value = worker_log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v.pointer("/fields/message").and_then(Value::as_str) == Some("job done"))
        .expect("the job done line is JSON");
    let span = line.get("span").expect("the line carries its span");
    for field in ["update_id", "chat_id", "user_id", "job_id", "lease_epoch", "anthropic_request_id"] {
        assert!(span.get(field).is_some(), "span field {field} missing in {line}");
    }
    assert_eq!(span["user_id"], 100_000_001);
    dbs.drop_all().await?;
    telegram.shutdown().await;
    anthropic.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn no_log_line_contains_a_secret_when_every_bot_api_call_fails() -> anyhow::Result<()> {
    let anthropic = FakeAnthropic::start("127.0.0.1:0".parse()?).await?;
    anthropic
        .set_default(Some(ScriptedResponse::from_file(fleet_tests::harness::fixture("anthropic/text_capital.sse"))?));
    let stem = format!("leak_{}", &uuid::Uuid::now_v7().simple().to_string()[20..]);
    // Closed port: every Bot API call fails with a transport error.
    let updates = [
        "telegram/ada_start.json",
        "telegram/ada_capital.json",
        "telegram/ada_balance.json",
        "telegram/group_with_mention.json",
    ];
    // The group message needs getMe (to see the mention), which keeps
    // failing: it waits in the delay queues; the three private ones end.
    let (logs, dbs) = run_fleet(&stem, "http://127.0.0.1:1", &anthropic, &updates, 3).await?;
    let all = logs.join("\n");
    assert!(all.contains("telegram transport error"), "the Bot API failures were logged");
    assert!(all.contains("intake failed"), "the getMe failure was logged");
    for secret in [TOKEN, "LEAKCHECK-do-not-log", SECRET, "demo-key"] {
        assert!(!all.contains(secret), "a log line contains {secret:?}");
    }
    dbs.drop_all().await?;
    anthropic.shutdown().await;
    Ok(())
}
