//! Telegram delivers the same update twice (a webhook retry): through the
//! real ingress, worker and billing-worker it is answered once, Claude is
//! called once and the user is charged once (scenario 04).

use anyhow::{ensure, Result};
use fleet_tests::fake_anthropic::ScriptedResponse;
use fleet_tests::fake_telegram::TgCall;
use fleet_tests::harness::{fixture, fixture_bytes, spawn_app, wait_until, TestApp, WAIT};
use reqwest::StatusCode;
use rust_decimal::Decimal;
use uuid::Uuid;

/// Chi, the sender of `chi_duplicate.json`, in a private chat of the same id.
const CHI: i64 = 100_000_003;
/// `update_id` of `chi_duplicate.json`.
const UPDATE_ID: i64 = 800_000_020;

fn is_send_to_chi(call: &TgCall) -> bool {
    call.method == "sendMessage" && call.params["chat_id"].as_i64() == Some(CHI)
}

/// How the two posts of the same update are made.
#[derive(Clone, Copy)]
enum Posting {
    OneAfterTheOther,
    AtTheSameTime,
}

async fn post_twice(app: &TestApp, how: Posting) -> Result<()> {
    let body = fixture_bytes("telegram/chi_duplicate.json")?;
    let (first, second) = match how {
        Posting::OneAfterTheOther => {
            let first = app.post_update(&body).await?;
            (first, app.post_update(&body).await?)
        }
        Posting::AtTheSameTime => {
            let (a, b) = tokio::join!(app.post_update(&body), app.post_update(&body));
            (a?, b?)
        }
    };
    ensure!(first == StatusCode::OK && second == StatusCode::OK, "webhook answered {first} and {second}");
    Ok(())
}

async fn a_duplicated_update_is_answered_and_charged_once(how: Posting) -> Result<()> {
    let mut app = spawn_app().await?;
    // One answer scripted; any further call would get a 500.
    app.anthropic.push([ScriptedResponse::from_file(fixture("anthropic/text_octopus_haiku.sse"))?]);
    app.anthropic.set_default(None);
    billing_worker::ledger::grant(&app.db.pool, CHI, "5".parse()?, Uuid::now_v7()).await?;

    post_twice(&app, how).await?;

    ensure!(app.telegram.wait_for_call(is_send_to_chi, WAIT).await, "no answer reached the chat");
    wait_until("the job done, its charge relayed and applied, both deliveries taken in", WAIT, || async {
        let done =
            app.db.count_of("SELECT count(*) FROM jobs WHERE update_id = $1 AND status = 'done'", UPDATE_ID).await?;
        let unpublished = app.db.count("SELECT count(*) FROM billing_outbox WHERE published_at IS NULL").await?;
        let published = app.db.count("SELECT count(*) FROM billing_outbox WHERE published_at IS NOT NULL").await?;
        let charged = app
            .db
            .count_of("SELECT count(*) FROM ledger_entries WHERE kind = 'usage_charge' AND user_id = $1", CHI)
            .await?;
        let deliveries = app
            .db
            .count_of(
                "SELECT COALESCE(max(deliveries), 0)::bigint FROM processed_updates WHERE update_id = $1",
                UPDATE_ID,
            )
            .await?;
        let queued = app.broker.pending_updates().await?;
        Ok(done == 1 && unpublished == 0 && published >= 1 && charged >= 1 && deliveries >= 2 && queued == 0)
    })
    .await?;
    // Stopping drains what is in flight: nothing can happen after this.
    app.stop().await?;

    assert_eq!(app.broker.pending_updates().await?, 0, "no update is left to redo");
    assert_eq!(app.anthropic.call_count(), 1, "Claude was called once");
    let sends: Vec<TgCall> = app.telegram.calls().into_iter().filter(is_send_to_chi).collect();
    assert_eq!(sends.len(), 1, "one sendMessage to the chat: {sends:#?}");
    let messages: Vec<_> = app.telegram.messages().into_iter().filter(|m| m.chat_id == CHI).collect();
    assert_eq!(messages.len(), 1);
    assert!(messages[0].text.contains("three hearts"), "answer: {}", messages[0].text);

    assert_eq!(app.db.count_of("SELECT count(*) FROM jobs WHERE update_id = $1", UPDATE_ID).await?, 1);
    assert_eq!(app.db.count("SELECT count(*) FROM api_calls").await?, 1);
    assert_eq!(
        app.db.count("SELECT count(*) FROM billing_outbox WHERE payload->>'type' = 'usage_charge.v1'").await?,
        1
    );
    assert_eq!(
        app.db
            .count_of("SELECT count(*) FROM ledger_entries WHERE kind = 'usage_charge' AND user_id = $1", CHI)
            .await?,
        1
    );
    let charged: Decimal =
        sqlx::query_scalar("SELECT amount FROM ledger_entries WHERE kind = 'usage_charge' AND user_id = $1")
            .bind(CHI)
            .fetch_one(&app.db.pool)
            .await?;
    assert_eq!(charged, "0.0007245".parse::<Decimal>()?);
    assert_eq!(app.db.balance(CHI).await?, "4.9992755".parse::<Decimal>()?);
    app.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_update_posted_twice_in_a_row_is_answered_and_charged_once() -> Result<()> {
    a_duplicated_update_is_answered_and_charged_once(Posting::OneAfterTheOther).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_update_posted_twice_at_once_is_answered_and_charged_once() -> Result<()> {
    a_duplicated_update_is_answered_and_charged_once(Posting::AtTheSameTime).await
}
