//! Resume, don't redo (issue 15, part 4): a worker shut down (SIGTERM)
//! after a paid tool round was stored hands the job back, and the other
//! worker continues from the stored round — the round's Messages API call
//! is not made again, its paid tool neither runs nor is charged again, the
//! answer is delivered once and the history has the round once.

use crate::CHI_ESSAY;
use anyhow::{ensure, Result};
use fleet_tests::fake_anthropic::ScriptedResponse;
use fleet_tests::harness::lifecycle::{request_messages, summary, update_id_of, Lifecycle, Signal, CHI, WAIT};
use fleet_tests::harness::tools::sse;
use fleet_tests::harness::wait_until;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use shared::contracts::{abandoned_usage_event_id, tool_event_id, usage_event_id};

const TOOL_USE_ID: &str = "toolu_round_1";
const NOTE: &str = "Chi likes green tea.";
const ROUND_TEXT: &str = "Let me note that down.";
const ANSWER: &str = "Noted: you like green tea.";

/// The first call: some text, then `remember` (a paid tool), stopping for `tool_use`.
fn paid_round() -> String {
    let start = json!({"type": "message_start", "message": {"id": "msg_round_1", "type": "message",
        "role": "assistant", "model": "claude-sonnet-4-5-20250929", "content": [], "stop_reason": null,
        "stop_sequence": null, "usage": {"input_tokens": 600, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0, "output_tokens": 1}}});
    [
        start,
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": ROUND_TEXT}}),
        json!({"type": "content_block_stop", "index": 0}),
        json!({"type": "content_block_start", "index": 1,
            "content_block": {"type": "tool_use", "id": TOOL_USE_ID, "name": "remember", "input": {}}}),
        json!({"type": "content_block_delta", "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": json!({ "note": NOTE }).to_string()}}),
        json!({"type": "content_block_stop", "index": 1}),
        json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null},
            "usage": {"output_tokens": 60}}),
        json!({"type": "message_stop"}),
    ]
    .iter()
    .map(sse::event)
    .collect()
}

fn is_tool_use(block: &Value) -> bool {
    block["type"] == "tool_use" && block["id"] == TOOL_USE_ID
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_terminated_after_a_paid_tool_round_hands_back_and_the_other_resumes_without_redoing_it() -> Result<()>
{
    let mut t = Lifecycle::start("rounds", 2, &[]).await?;
    let result = resumed_after_a_paid_round(&mut t).await;
    t.finish(result).await
}

async fn resumed_after_a_paid_round(t: &mut Lifecycle) -> Result<()> {
    t.grant(CHI, "5.00").await?;
    // 1: the paid round. 2: the call after it stalls after `message_start`
    // (connection open), so its worker is inside it when terminated. 3: the answer.
    let stalled = ScriptedResponse { stall_after_events: Some(1), ..ScriptedResponse::from_sse(sse::text_turn("x")) };
    t.anthropic.push([
        ScriptedResponse::from_sse(paid_round()),
        stalled,
        ScriptedResponse::from_sse(sse::text_turn(ANSWER)),
    ]);
    let update_id = update_id_of(CHI_ESSAY)?;
    t.post_fixture(CHI_ESSAY).await?;
    let job_id = t.wait_job(update_id, "claimed", WAIT, |j| j.lease_epoch >= 1).await?.job_id;

    // The round is stored before the next call is made; the next call streams.
    t.wait_streaming(1, 1).await?;
    let rounds: Vec<(i32, i64)> =
        sqlx::query_as("SELECT round, lease_epoch FROM job_rounds WHERE job_id = $1 ORDER BY round")
            .bind(job_id)
            .fetch_all(&t.dbs.bot)
            .await?;
    ensure!(rounds == vec![(1, 1)], "stored rounds (round, epoch) while the second call streams: {rounds:?}");
    let leaving = t.lease_holder(update_id).await?;
    t.fleet.signal(&leaving, Signal::Term).await?;

    let job = t.wait_finished(update_id, worker::queues::work::SHUTDOWN_GRACE + WAIT).await?;
    ensure!(
        job.status == "done" && job.outcome.as_deref() == Some("answered") && job.lease_epoch == 2,
        "the job did not end answered by the second claim: {job:?}"
    );
    let status = t.fleet.wait_exit(&leaving, WAIT).await?;
    ensure!(status.success(), "{leaving} exited with {status}");
    ensure!(t.fleet.log(&leaving).contains("job handed back at shutdown"), "{leaving} did not hand the job back");
    let resumer = t.other_worker(&leaving);
    ensure!(
        t.fleet.log(&resumer).contains("resuming after the rounds an earlier attempt stored"),
        "{resumer} did not resume from the stored round"
    );

    // The provider: the first round's request was sent once; the resumed
    // request continues from the stored round exactly as the first worker's did.
    let calls = t.anthropic.calls();
    ensure!(
        calls.len() == 3 && calls[0].completed && !calls[1].completed && calls[2].completed,
        "calls: {:?}",
        summary(&calls)
    );
    let fresh = calls.iter().filter(|c| request_messages(c).len() == 1).count();
    ensure!(fresh == 1, "{fresh} requests started the answer from the user's turn");
    let resumed = request_messages(&calls[2]);
    ensure!(resumed == request_messages(&calls[1]), "the resumed request differs: {resumed:#?}");
    ensure!(resumed.len() == 3, "user, stored assistant turn, tool results expected: {resumed:#?}");
    let tool_uses = resumed.iter().flat_map(|m| m["content"].as_array().cloned().unwrap_or_default());
    ensure!(tool_uses.filter(is_tool_use).count() == 1, "the round's tool_use is not in the request once");

    // The paid tool ran once and is charged once.
    let ran: i64 = sqlx::query_scalar("SELECT count(*) FROM tool_calls WHERE job_id = $1 AND NOT is_error")
        .bind(job_id)
        .fetch_one(&t.dbs.bot)
        .await?;
    let notes: i64 =
        sqlx::query_scalar("SELECT count(*) FROM user_notes WHERE note = $1").bind(NOTE).fetch_one(&t.dbs.bot).await?;
    ensure!(ran == 1 && notes == 1, "the tool ran {ran} times, {notes} notes stored");

    // Calls: seq 1 (the round, epoch 1) and seq 2 (the answer, epoch 2)
    // charged; the cut-off call of epoch 1 recorded as abandoned.
    let api: Vec<(i32, i64, bool, Decimal)> = sqlx::query_as(
        "SELECT seq, lease_epoch, abandoned, user_charge FROM api_calls WHERE job_id = $1 ORDER BY lease_epoch, seq",
    )
    .bind(job_id)
    .fetch_all(&t.dbs.bot)
    .await?;
    let shape: Vec<(i32, i64, bool)> = api.iter().map(|(s, e, a, _)| (*s, *e, *a)).collect();
    ensure!(shape == vec![(1, 1, false), (2, 1, true), (2, 2, false)], "api_calls: {api:?}");
    ensure!(api[1].3.is_zero() && !api[0].3.is_zero() && !api[2].3.is_zero(), "charges: {api:?}");

    t.wait_ledger_settled().await?;
    let mut charged = vec![usage_event_id(job_id, 1), usage_event_id(job_id, 2)];
    charged.sort();
    ensure!(t.outbox_usage(job_id).await? == charged, "usage events in the outbox");
    let usage = t.usage_charges(job_id).await?;
    let mut ids: Vec<_> = usage.iter().map(|(id, _)| *id).collect();
    ids.sort();
    ensure!(ids == charged, "usage charges in the ledger: {usage:?}");
    ensure!(usage.iter().map(|(_, a)| *a).sum::<Decimal>() == api[0].3 + api[2].3, "ledger {usage:?} ≠ calls {api:?}");
    let abandoned: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger_entries WHERE event_id = $1")
        .bind(abandoned_usage_event_id(job_id, 1, 2))
        .fetch_one(&t.dbs.billing)
        .await?;
    ensure!(abandoned > 0, "the cut-off call's provider cost is not in the ledger");
    let tools: Vec<uuid::Uuid> = sqlx::query_scalar(
        "SELECT event_id FROM ledger_entries WHERE kind = 'tool_charge' AND job_id = $1 ORDER BY entry_id",
    )
    .bind(job_id)
    .fetch_all(&t.dbs.billing)
    .await?;
    ensure!(tools == vec![tool_event_id(job_id, TOOL_USE_ID)], "tool charges in the ledger: {tools:?}");

    // One answer, with the round's text once and the tool's notice.
    let sent = t.messages_to(CHI);
    ensure!(sent.len() == 1, "expected one answer, got {sent:#?}");
    let text = &sent[0].text;
    ensure!(
        text.matches(ROUND_TEXT).count() == 1 && text.contains(ANSWER) && text.contains("Tools used: remember"),
        "the answer: {text:?}"
    );
    ensure!(job.reply_message_ids == vec![sent[0].message_id], "reply ids {:?}", job.reply_message_ids);

    // The history has the round once; the rounds are gone (the history has them).
    let turns: Vec<(String, Value)> =
        sqlx::query_as("SELECT role, content FROM messages WHERE job_id = $1 ORDER BY id")
            .bind(job_id)
            .fetch_all(&t.dbs.bot)
            .await?;
    let roles: Vec<&str> = turns.iter().map(|(r, _)| r.as_str()).collect();
    ensure!(roles == ["user", "assistant", "user", "assistant"], "stored turns: {turns:#?}");
    let uses = turns.iter().flat_map(|(_, c)| c.as_array().cloned().unwrap_or_default()).filter(is_tool_use).count();
    ensure!(uses == 1, "the round's tool_use is stored {uses} times");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM job_rounds WHERE job_id = $1")
        .bind(job_id)
        .fetch_one(&t.dbs.bot)
        .await?;
    ensure!(left == 0, "{left} rounds left after the answer was stored");

    // The balance: the grant less exactly the two calls and the tool.
    let tool_price: Decimal = "0.001".parse()?;
    let balance: Decimal = wait_balance(t).await?;
    let expected = Decimal::from(5) - api[0].3 - api[2].3 - tool_price;
    ensure!(balance == expected, "balance {balance}, expected {expected}");
    Ok(())
}

/// Chi's balance once no hold of the job is active.
async fn wait_balance(t: &Lifecycle) -> Result<Decimal> {
    wait_until("the job's hold to be settled", WAIT, || async {
        let active: i64 =
            sqlx::query_scalar("SELECT count(*) FROM holds WHERE status = 'active'").fetch_one(&t.dbs.billing).await?;
        Ok(active == 0)
    })
    .await?;
    Ok(billing_worker::ledger::balance(&t.dbs.billing, CHI).await?)
}

/// Attack (hold voided while stored charges wait): a job handed back at
/// shutdown after a paid tool round keeps that round's charges (its call's
/// usage event and the tool charge, in the outbox until the job ends) —
/// but `outcome::plan` voids the job's hold on every hand-back. Until the
/// job is claimed again (no worker here; a deploy, a delayed republish),
/// nothing reserves those charges: another chat of the same user can spend
/// the whole balance, and when this job finishes its stored charges land on
/// top (a negative balance; the resumed attempt's admission cannot undo
/// them). The available balance must stay below the grant less the pending
/// charges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_handed_back_after_a_paid_round_keeps_its_stored_charges_reserved() -> Result<()> {
    let mut t = Lifecycle::start("holdvoid", 1, &[]).await?;
    let result = handed_back_after_a_paid_round(&mut t).await;
    t.finish(result).await
}

async fn handed_back_after_a_paid_round(t: &mut Lifecycle) -> Result<()> {
    t.grant(CHI, "5.00").await?;
    let stalled = ScriptedResponse { stall_after_events: Some(1), ..ScriptedResponse::from_sse(sse::text_turn("x")) };
    t.anthropic.push([ScriptedResponse::from_sse(paid_round()), stalled]);
    let update_id = update_id_of(CHI_ESSAY)?;
    t.post_fixture(CHI_ESSAY).await?;
    let job_id = t.wait_job(update_id, "claimed", WAIT, |j| j.lease_epoch >= 1).await?.job_id;
    t.wait_streaming(1, 1).await?;
    let stored: Decimal = sqlx::query_scalar("SELECT COALESCE(sum(calls_charge), 0) FROM job_rounds WHERE job_id = $1")
        .bind(job_id)
        .fetch_one(&t.dbs.bot)
        .await?;
    ensure!(stored > Decimal::ZERO, "the paid round is not stored with its charge");
    let leaving = t.lease_holder(update_id).await?;
    t.fleet.signal(&leaving, Signal::Term).await?;
    let status = t.fleet.wait_exit(&leaving, worker::queues::work::SHUTDOWN_GRACE + WAIT).await?;
    ensure!(status.success(), "{leaving} exited with {status}");
    ensure!(t.fleet.log(&leaving).contains("job handed back at shutdown"), "{leaving} did not hand the job back");
    let job = t.job(update_id).await?;
    ensure!(job.status == "queued", "the job is not waiting to be resumed: {job:?}");

    let tool_price: Decimal = "0.001".parse()?;
    let pending = stored + tool_price;
    let available: Decimal =
        sqlx::query_scalar("SELECT fleet_available_balance($1)").bind(CHI).fetch_one(&t.dbs.billing).await?;
    let hold: Option<String> = sqlx::query_scalar("SELECT status FROM holds WHERE job_id = $1")
        .bind(job_id)
        .fetch_optional(&t.dbs.billing)
        .await?;
    ensure!(
        available <= Decimal::from(5) - pending,
        "available {available} although {pending} of the handed-back job's stored charges are pending \
         (hold {hold:?}): another chat could spend it"
    );
    Ok(())
}

/// A round of `remember` (paid, id `remember_id`) and, with `list_files`,
/// also `list_files` (free), stopping for `tool_use`.
fn round_with(remember_id: &str, list_files: bool) -> String {
    let start = json!({"type": "message_start", "message": {"id": format!("msg_{remember_id}"), "type": "message",
        "role": "assistant", "model": "claude-sonnet-4-5-20250929", "content": [], "stop_reason": null,
        "stop_sequence": null, "usage": {"input_tokens": 600, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0, "output_tokens": 1}}});
    let mut events = vec![
        start,
        json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "tool_use", "id": remember_id, "name": "remember", "input": {}}}),
        json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "input_json_delta", "partial_json": json!({ "note": NOTE }).to_string()}}),
        json!({"type": "content_block_stop", "index": 0}),
    ];
    if list_files {
        events.extend([
            json!({"type": "content_block_start", "index": 1,
                "content_block": {"type": "tool_use", "id": "toolu_list", "name": "list_files", "input": {}}}),
            json!({"type": "content_block_delta", "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": "{}"}}),
            json!({"type": "content_block_stop", "index": 1}),
        ]);
    }
    events.extend([
        json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null},
            "usage": {"output_tokens": 60}}),
        json!({"type": "message_stop"}),
    ]);
    events.iter().map(sse::event).collect()
}

/// Attack (a paid tool charged twice): a round's paid tool commits (its
/// charge is in the outbox) while another tool of the round is still
/// running; the worker is shut down (SIGTERM) before the round is stored,
/// so `generate` returns on the cancellation without `store_round`, and the
/// job is handed back. The next attempt cannot resume from the round and
/// asks Claude again, which asks for the tool again under a new id: the
/// tool runs again and the user is charged for it twice, since the first
/// run's charge is neither waived nor abandoned (it stays in the job's
/// `charge_event_ids` and is applied with the hold release). Nor does
/// admission count it (`spent` knows only this attempt's tools).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paid_tool_that_ran_before_a_shutdown_is_not_charged_again_when_the_round_is_redone() -> Result<()> {
    let mut t = Lifecycle::start("toolagain", 2, &[("TOOL_TIMEOUT_S", "120")]).await?;
    let result = tool_charged_again(&mut t).await;
    t.finish(result).await
}

async fn tool_charged_again(t: &mut Lifecycle) -> Result<()> {
    t.grant(CHI, "5.00").await?;
    t.anthropic.push([
        ScriptedResponse::from_sse(round_with("toolu_first", true)),
        // The redone round: Claude names its tool_use anew.
        ScriptedResponse::from_sse(round_with("toolu_again", false)),
        ScriptedResponse::from_sse(sse::text_turn(ANSWER)),
    ]);
    // `list_files` waits for this lock: the round cannot complete.
    let mut lock = t.dbs.bot.begin().await?;
    sqlx::query("LOCK TABLE documents IN ACCESS EXCLUSIVE MODE").execute(&mut *lock).await?;
    let update_id = update_id_of(CHI_ESSAY)?;
    t.post_fixture(CHI_ESSAY).await?;
    let job_id = t.wait_job(update_id, "claimed", WAIT, |j| j.lease_epoch >= 1).await?.job_id;
    wait_until("remember to commit", WAIT, || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM tool_calls WHERE job_id = $1 AND tool_use_id = 'toolu_first' AND output IS NOT NULL",
        )
        .bind(job_id)
        .fetch_one(&t.dbs.bot)
        .await?;
        Ok(n == 1)
    })
    .await?;
    let leaving = t.lease_holder(update_id).await?;
    t.fleet.signal(&leaving, Signal::Term).await?;
    let status = t.fleet.wait_exit(&leaving, worker::queues::work::SHUTDOWN_GRACE + WAIT).await?;
    ensure!(status.success(), "{leaving} exited with {status}");
    lock.rollback().await?;
    let job = t.wait_finished(update_id, WAIT).await?;
    ensure!(job.status == "done", "the job did not end answered: {job:?}");
    t.wait_ledger_settled().await?;
    let tools: Vec<uuid::Uuid> = sqlx::query_scalar(
        "SELECT event_id FROM ledger_entries WHERE kind = 'tool_charge' AND job_id = $1 ORDER BY entry_id",
    )
    .bind(job_id)
    .fetch_all(&t.dbs.billing)
    .await?;
    let notes: i64 =
        sqlx::query_scalar("SELECT count(*) FROM user_notes WHERE note = $1").bind(NOTE).fetch_one(&t.dbs.bot).await?;
    ensure!(
        tools.len() == 1,
        "one request for `remember` charged {} times ({notes} notes stored): {tools:?}",
        tools.len()
    );
    Ok(())
}
