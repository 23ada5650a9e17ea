//! A third attack pass (issue 14, verification): the worker's new layers —
//! calls recorded `open` at their stream's start and booked when their
//! attempt dies, the outcome table, `/stop` through the auto-acked control
//! queue, unknown commands answered with the help text.
//!
//! Each test is one attack. A test marked `#[ignore = "finding: …"]` shows
//! a bug that is still there: its doc comment says what happens and what
//! should. A test that runs is a regression test for an attack that holds.

use anyhow::{ensure, Result};
use fleet_tests::fake_anthropic::ScriptedResponse;
use fleet_tests::harness::tools::{message, spawn_fleet, sse, ADA};
use fleet_tests::harness::{wait_until, WAIT};
use serde_json::{json, Value};
use std::time::Duration;

/// The model the fixtures' streams report (priced in `fixtures/prices.toml`).
const PRICED_MODEL: &str = "claude-sonnet-4-5-20250929";
/// A model the API may report (a new snapshot behind an alias) that the
/// price table does not list yet.
const UNPRICED_MODEL: &str = "claude-sonnet-5-20270101";

/// `state` of every `api_calls` row, oldest first.
async fn call_states(db: &fleet_tests::harness::TestDb) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar("SELECT state FROM api_calls ORDER BY created_at, seq").fetch_all(&db.pool).await?)
}

/// Attack (money, provider side): the stream's `message_start` reports a
/// model the price table does not list (Anthropic moved an alias to a new
/// snapshot before the operator updated `prices.toml`). What happens:
/// Claude answered and the provider bills us, but `finalize` fails on the
/// price (`JobError::Pricing` → `Failed`), so the user gets "something went
/// wrong" instead of the answer that was generated, and the call's row
/// stays `open` for ever: the reaper cannot price it either ("stays open"
/// and is retried each pass), so the call never reaches the outbox or the
/// ledger — provider cost missing from the books. Correct: an unknown
/// reported model is priced as the requested model (`MODEL`, which start-up
/// checks against the table) or at the table's highest rate, flagged for
/// finance; the call is booked and the answer delivered. Fixed: priced as
/// the configured model (`job::finalize::price_call`), counted in
/// `fleet_unpriced_calls_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_reported_model_has_no_price_is_still_booked_and_answered() -> Result<()> {
    let fleet = spawn_fleet(|s| s.visibility_timeout_s = 4).await?;
    let result = async {
        fleet.grant(ADA, "5.00").await?;
        let body = sse::text_turn("The answer Claude wrote.").replace(PRICED_MODEL, UNPRICED_MODEL);
        fleet.anthropic.push([ScriptedResponse::from_sse(body)]);
        fleet.anthropic.set_default(None);
        fleet.post(&message(940_000_001, "Hello")).await?;
        // The job ends one way or the other; the reaper passes every 2 s.
        wait_until("the job to end", WAIT, || async {
            Ok(fleet.db.count("SELECT count(*) FROM jobs WHERE status IN ('done', 'failed')").await? == 1)
        })
        .await?;
        let booked = wait_until("the call to leave `open`", Duration::from_secs(10), || async {
            Ok(call_states(&fleet.db).await?.iter().all(|s| s != "open"))
        })
        .await;
        let states = call_states(&fleet.db).await?;
        let events = fleet.db.count("SELECT count(*) FROM billing_outbox").await;
        let texts: Vec<String> = fleet.telegram.messages().into_iter().map(|m| m.text).collect();
        ensure!(booked.is_ok(), "the call is still {states:?} (usage events: {events:?}); the user got {texts:?}");
        ensure!(
            texts.iter().any(|t| t.contains("The answer Claude wrote.")),
            "the generated answer was never delivered: {texts:?}"
        );
        Ok(())
    }
    .await;
    fleet.cleanup().await?;
    result
}

/// Writes a finished job of Ada's (status `failed`, epoch 1) with one
/// `open` call of `model` per `seq` in `seqs`, created `age_s` seconds ago:
/// calls an attempt left open when it died.
async fn finished_job_with_open_calls(
    db: &fleet_tests::harness::TestDb,
    update_id: i64,
    model: &str,
    seqs: std::ops::RangeInclusive<i32>,
    age_s: i64,
) -> Result<()> {
    let job_id = uuid::Uuid::now_v7();
    sqlx::query(
        "INSERT INTO jobs (job_id, chat_id, user_id, update_id, kind, user_content, telegram_message_id, status,
                           lease_epoch, outcome)
         VALUES ($1, $2, $2, $3, 'chat', '[{\"type\":\"text\",\"text\":\"hi\"}]', 1, 'failed', 1, 'error')",
    )
    .bind(job_id)
    .bind(ADA)
    .bind(update_id)
    .execute(&db.pool)
    .await?;
    for seq in seqs {
        sqlx::query(
            "INSERT INTO api_calls (job_id, seq, lease_epoch, request_id, model, input_tokens, output_tokens,
                 cache_write_5m, cache_write_1h, cache_read, web_search_requests, provider_cost, user_charge,
                 max_tokens, state, created_at)
             VALUES ($1, $2, 1, 'req_' || $2, $3, 500, 1, 0, 0, 0, 0, 0, 0, 1024, 'open',
                     now() - make_interval(secs => $4))",
        )
        .bind(job_id)
        .bind(seq)
        .bind(model)
        .bind(age_s as f64)
        .execute(&db.pool)
        .await?;
    }
    Ok(())
}

/// Attack (money, follows from the one above): the reaper books orphaned
/// calls oldest first, at most 50 a pass (`ORPHAN_BATCH`), and a call it
/// cannot price "stays open" — and is selected again, first, on every
/// pass. Fifty such calls (one busy hour after a model snapshot the price
/// table lacks) block the reaper for good: a priced call orphaned later (a
/// worker SIGKILLed mid-stream, on a job with no attempt left) is never
/// booked, so its provider cost never reaches the books. Correct: an
/// unpriceable call does not hold back the others (it is skipped past, e.g.
/// ordered after priceable ones or marked so the next pass moves on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpriceable_open_calls_do_not_stop_the_reaper_booking_the_others() -> Result<()> {
    let fleet = spawn_fleet(|s| s.visibility_timeout_s = 4).await?;
    let result = async {
        sqlx::query("INSERT INTO users (user_id, first_name) VALUES ($1, 'Ada')")
            .bind(ADA)
            .execute(&fleet.db.pool)
            .await?;
        sqlx::query("INSERT INTO chats (chat_id, kind) VALUES ($1, 'private')")
            .bind(ADA)
            .execute(&fleet.db.pool)
            .await?;
        // Older: 50 calls of a model the table lacks; newer: one priced call.
        finished_job_with_open_calls(&fleet.db, 940_001_001, UNPRICED_MODEL, 1..=50, 600).await?;
        finished_job_with_open_calls(&fleet.db, 940_001_002, PRICED_MODEL, 1..=1, 60).await?;
        let booked = wait_until("the priced orphan to be booked", Duration::from_secs(12), || async {
            Ok(fleet
                .db
                .count(&format!("SELECT count(*) FROM api_calls WHERE model = '{PRICED_MODEL}' AND state = 'orphaned'"))
                .await?
                == 1)
        })
        .await;
        let open = fleet.db.count("SELECT count(*) FROM api_calls WHERE state = 'open'").await?;
        ensure!(booked.is_ok(), "the priced orphan was never booked ({open} calls still open)");
        Ok(())
    }
    .await;
    fleet.cleanup().await?;
    result
}

/// The fixtures' 20-event answer that stalls after its third event (the
/// stream stays open): a job that is generating until it is stopped.
fn stalled_answer() -> ScriptedResponse {
    let mut r = ScriptedResponse::from_sse(sse::text_turn("Partial words of a long answer"));
    r.stall_after_events = Some(3);
    r
}

/// Attack (a `/stop` storm): while an answer streams, Ada sends 60 `/stop`
/// updates at once (each a new update id, so none is deduplicated). Holds:
/// the job stops once; its call is on the books once (one `api_calls` row,
/// recorded, at most one usage event for it) and Ada is charged once;
/// one answer marked "(Stopped.)" is sent; the control consumer (now
/// auto-acked) and the intake keep working: the next message is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_storm_stops_the_answer_once_and_charges_once() -> Result<()> {
    let fleet = spawn_fleet(|_| {}).await?;
    let result = async {
        fleet.grant(ADA, "5.00").await?;
        fleet.anthropic.push([stalled_answer(), ScriptedResponse::from_sse(sse::text_turn("Still here."))]);
        fleet.anthropic.set_default(None);
        fleet.post(&message(940_002_000, "Write a long essay")).await?;
        ensure!(fleet.anthropic.wait_for_calls(1, WAIT).await, "the first call never came");
        wait_until("the call to be recorded open", WAIT, || async {
            Ok(fleet.db.count("SELECT count(*) FROM api_calls WHERE state = 'open'").await? == 1)
        })
        .await?;
        let stops: Vec<Value> = (1..=60).map(|i| message(940_002_000 + i, "/stop")).collect();
        for r in futures_util::future::join_all(stops.iter().map(|u| fleet.post(u))).await {
            r?;
        }
        fleet.wait_for_message(ADA, worker::notices::STOPPED).await?;
        fleet.post(&message(940_002_100, "Are you there?")).await?;
        fleet.wait_for_message(ADA, "Still here.").await?;
        wait_until("every update to be taken in", WAIT, || async {
            Ok(fleet.db.count("SELECT count(*) FROM processed_updates").await? == 62)
        })
        .await?;
        wait_until("both chat jobs to end", WAIT, || async {
            Ok(fleet.db.count("SELECT count(*) FROM jobs WHERE status = 'running'").await? == 0)
        })
        .await?;
        let stopped =
            fleet.telegram.messages().into_iter().filter(|m| m.text.contains(worker::notices::STOPPED)).count();
        ensure!(stopped == 1, "{stopped} stopped answers");
        let rows: Vec<(i64, String, bool)> =
            sqlx::query_as("SELECT lease_epoch, state, abandoned FROM api_calls ORDER BY created_at, seq")
                .fetch_all(&fleet.db.pool)
                .await?;
        ensure!(rows.len() == 2, "calls on the books: {rows:?}");
        ensure!(rows.iter().all(|(_, state, abandoned)| state == "recorded" && !abandoned), "{rows:?}");
        let jobs: Vec<(String, Option<String>, i32)> =
            sqlx::query_as("SELECT status, outcome, attempts FROM jobs WHERE kind = 'chat' ORDER BY update_id")
                .fetch_all(&fleet.db.pool)
                .await?;
        ensure!(jobs.len() == 2 && jobs.iter().all(|(s, _, a)| s == "done" && *a == 1), "{jobs:?}");
        // One usage charge per call, one hold release per chat job.
        let usage: Vec<Value> = sqlx::query_scalar("SELECT payload FROM billing_outbox ORDER BY created_at")
            .fetch_all(&fleet.db.pool)
            .await?;
        let charges: Vec<&Value> = usage.iter().filter(|p| p.get("user_charge").is_some()).collect();
        ensure!(charges.len() == 2, "usage events: {usage:?}");
        Ok(())
    }
    .await;
    fleet.cleanup().await?;
    result
}

/// A message of `user` in the group `-100_940`, with `entities` as given.
fn group_command(update_id: i64, text: &str, entities: Value) -> Value {
    let mut update = message(update_id, text);
    update["message"]["chat"] = json!({ "id": -100_940, "title": "Team", "type": "group" });
    update["message"]["entities"] = entities;
    update
}

/// Attack (hostile bytes on the unknown-command path): unknown commands
/// with a 4,000-character argument; a `bot_command` entity whose length
/// runs past the text and one that ends inside a surrogate pair (UTF-16);
/// an unknown command addressed to this bot in a group; one of zero
/// length. Holds: each addressed one gets the help text (the zero-length
/// one is an empty, unknown command), nothing reaches the Messages API,
/// nothing is charged, no job fails; the `@`-less one in
/// the group is not addressed and is ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_unknown_commands_get_the_help_text_and_cost_nothing() -> Result<()> {
    let fleet = spawn_fleet(|_| {}).await?;
    let result = async {
        fleet.grant(ADA, "1.00").await?;
        let huge = format!("/frobnicate {}", "🦀x".repeat(2_000));
        fleet.post(&message(940_003_001, &huge)).await?;
        let mut past_end = message(940_003_002, "/zz");
        past_end["message"]["entities"] = json!([{ "type": "bot_command", "offset": 0, "length": 1_000_000 }]);
        fleet.post(&past_end).await?;
        let mut mid_pair = message(940_003_003, "/🦀 rest");
        mid_pair["message"]["entities"] = json!([{ "type": "bot_command", "offset": 0, "length": 2 }]);
        fleet.post(&mid_pair).await?;
        let mut zero = message(940_003_004, "/x");
        zero["message"]["entities"] = json!([{ "type": "bot_command", "offset": 0, "length": 0 }]);
        fleet.post(&zero).await?;
        let addressed = format!("/frobnicate@fleet_test_bot {}", "a".repeat(4_000));
        fleet
            .post(&group_command(
                940_003_005,
                &addressed,
                json!([{ "type": "bot_command", "offset": 0, "length": 26 }]),
            ))
            .await?;
        fleet
            .post(&group_command(
                940_003_006,
                "/frobnicate",
                json!([{ "type": "bot_command", "offset": 0, "length": 11 }]),
            ))
            .await?;
        wait_until("every update to be taken in", WAIT, || async {
            Ok(fleet.db.count("SELECT count(*) FROM processed_updates").await? == 6)
        })
        .await?;
        wait_until("every job to end", WAIT, || async {
            Ok(fleet.db.count("SELECT count(*) FROM jobs WHERE status NOT IN ('done')").await? == 0)
        })
        .await?;
        let helps: Vec<i64> = fleet
            .telegram
            .messages()
            .into_iter()
            .filter(|m| m.text == worker::notices::HELP)
            .map(|m| m.chat_id)
            .collect();
        // Four private ones (a zero-length entity is an empty command:
        // unknown, so the help text too) and one in the group.
        let calls = fleet.anthropic.calls().len();
        ensure!(calls == 0, "{calls} call(s) reached the Messages API");
        ensure!(helps.iter().filter(|c| **c == -100_940).count() == 1, "group help texts: {helps:?}");
        ensure!(helps.iter().filter(|c| **c == ADA).count() == 4, "private help texts: {helps:?}");
        let charged = fleet.db.count("SELECT count(*) FROM billing_outbox").await?;
        let failed = fleet.db.count("SELECT count(*) FROM jobs WHERE outcome IN ('error', 'panic')").await?;
        ensure!(failed == 0 && charged == 0, "{failed} job(s) failed, {charged} billing event(s)");
        Ok(())
    }
    .await;
    fleet.cleanup().await?;
    result
}
