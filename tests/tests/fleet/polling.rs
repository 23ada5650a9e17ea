//! Polling mode (issue 16): at start the ingress calls `deleteWebhook`
//! (keeping pending updates), so a bot that still has a webhook set gets its
//! updates through `getUpdates`; a refused token makes it not ready, with
//! the reason in `/readyz`.

use anyhow::{ensure, Result};
use clap::Parser as _;
use fleet_tests::fake_telegram::FakeTelegram;
use fleet_tests::harness::{init_logs, stop, wait_until, within, Broker, BOT_TOKEN, BOT_USERNAME, WAIT};
use reqwest::StatusCode;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Starts an ingress in polling mode against `telegram` with `token`; the admin port.
async fn spawn_polling(
    broker: &Broker,
    telegram: &FakeTelegram,
    token: &str,
) -> Result<(u16, fleet_tests::harness::Running)> {
    let api = telegram.api_url();
    let mut settings = ingress::Settings::try_parse_from([
        "ingress",
        "--mode",
        "polling",
        "--bind",
        "127.0.0.1:0",
        "--admin-bind",
        "127.0.0.1:0",
        "--telegram-api-url",
        &api,
        "--poll-timeout-s",
        "1",
        "--amqp-url",
        &broker.url,
        "--amqp-prefix",
        broker.prefix(),
    ])?;
    settings.bot_token = shared::secret::Secret::new(token);
    let app = within("building the ingress", ingress::App::build(settings)).await??;
    let admin = app.admin_port();
    let cancel = CancellationToken::new();
    let handle = tokio::spawn(app.run_until_stopped(cancel.clone()));
    Ok((admin, (cancel, handle)))
}

async fn readyz(admin: u16) -> Result<(StatusCode, String)> {
    let response = reqwest::get(format!("http://127.0.0.1:{admin}/readyz")).await?;
    Ok((response.status(), response.text().await?))
}

/// Messages waiting in the intake shards.
async fn queued(broker: &Broker) -> Result<u32> {
    let t = &broker.topology;
    let mut total = 0;
    for shard in 0..t.intake_shards {
        total += broker.message_count(&t.intake_queue(shard)).await?;
    }
    Ok(total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_deletes_a_webhook_left_set_and_takes_the_updates_in() -> Result<()> {
    init_logs();
    let broker = Broker::new().await?;
    let telegram = FakeTelegram::start("127.0.0.1:0".parse()?, BOT_USERNAME).await?;
    // The bot still has a webhook: getUpdates answers 409 until it is deleted.
    let set = reqwest::Client::new()
        .post(format!("{}/bot{BOT_TOKEN}/setWebhook", telegram.api_url()))
        .json(&json!({ "url": "https://bot.example/telegram/webhook" }))
        .send()
        .await?;
    ensure!(set.status().is_success(), "setWebhook on the fake answered {}", set.status());
    telegram.push_update(json!({
        "update_id": 940_000_001,
        "message": {
            "message_id": 1,
            "from": { "id": 100_000_001, "is_bot": false, "first_name": "Ada" },
            "chat": { "id": 100_000_001, "first_name": "Ada", "type": "private" },
            "date": 1_764_460_800,
            "text": "hello by polling",
        }
    }));
    let (admin, ingress) = spawn_polling(&broker, &telegram, BOT_TOKEN).await?;
    let result = async {
        let reached = wait_until("the polled update to reach an intake shard", WAIT, || async {
            Ok(queued(&broker).await? == 1)
        })
        .await;
        if let Err(e) = reached {
            let calls: Vec<(String, u16)> = telegram.calls().into_iter().map(|c| (c.method, c.status)).collect();
            anyhow::bail!("{e}; Bot API calls: {calls:?}");
        }
        let calls = telegram.calls();
        ensure!(calls.iter().any(|c| c.method == "deleteWebhook" && c.params["drop_pending_updates"] == json!(false)));
        wait_until("readiness", WAIT, || async { Ok(readyz(admin).await?.0 == StatusCode::OK) }).await?;
        Ok(())
    }
    .await;
    stop("ingress", ingress).await?;
    telegram.shutdown().await;
    broker.cleanup().await?;
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_with_a_refused_token_is_not_ready_and_says_why() -> Result<()> {
    init_logs();
    let broker = Broker::new().await?;
    let telegram = FakeTelegram::start("127.0.0.1:0".parse()?, BOT_USERNAME).await?;
    let (admin, ingress) = spawn_polling(&broker, &telegram, "revoked:token").await?;
    let result = async {
        wait_until("not ready for the token", WAIT, || async {
            let (status, body) = readyz(admin).await?;
            Ok(status == StatusCode::SERVICE_UNAVAILABLE && body.contains("401"))
        })
        .await
    }
    .await;
    stop("ingress", ingress).await?;
    telegram.shutdown().await;
    broker.cleanup().await?;
    result
}
