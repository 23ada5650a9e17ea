//! Resume, don't redo (issue 15, part 4): each completed tool round of a
//! job — the assistant turn with its `tool_use` blocks, and the tool results
//! sent back — is stored as it completes ([`store_round`]), in one fenced
//! transaction with the round's Messages API calls (`api_calls` recorded,
//! their usage events in the outbox, exactly as `finalize` writes them). A
//! later attempt [`resume`]s from the last stored round instead of calling
//! Claude from the start: the round's tools do not run again, and the
//! provider is not paid again for the round's calls.
//!
//! What a resumed attempt carries over (see [`Stored`]): the closed turns
//! (the history gets each round once, from `finalize`), the visible text,
//! the tool charges (for the notice), the tool rounds (they count towards
//! `MAX_TOOL_ROUNDS`), the calls' charges (admission counts them as spent:
//! their events are in the outbox, applied to the ledger only once the job
//! ends) and the call numbers (the next call is numbered after the last
//! stored one, so its usage event id, of job and seq, is new). Not carried
//! over: the continuation count of the round being written when the
//! attempt ended (that round is redone from its start).
//!
//! A round that cannot be stored (a database error) is not fatal: its calls
//! stay with the attempt (recorded by `finalize`, as without rounds), and
//! the attempt stores no later round, so the stored rounds never have a gap.

use super::finalize::{self, write_call};
use super::{request, Answer, JobError, JobRow};
use crate::context::WorkerContext;
use crate::store::jobs::ClaimedJob;
use crate::store::rounds::Round;
use rust_decimal::Decimal;
use serde_json::{json, Value};

/// What the stored rounds of the job cover: the parts of an [`Answer`]
/// that are no longer the attempt's to record.
#[derive(Debug, Default, Clone, PartialEq)]
pub(super) struct Stored {
    /// Tool rounds stored.
    pub rounds: u32,
    /// The highest call `seq` stored (0: none): the next call is `last_seq + 1`.
    pub last_seq: i32,
    /// What the stored rounds' calls charge the user, USD.
    pub calls_charge: Decimal,
    /// Bytes of `Answer::text` the stored rounds wrote.
    pub text_len: usize,
    /// Entries of `Answer::tool_charges` of the stored rounds.
    pub charges_len: usize,
    /// A round of this attempt could not be stored: no later one is.
    pub broken: bool,
}

/// Loads the job's stored rounds and appends them to `request` (assistant
/// turn with its `tool_use` blocks, user turn with the `tool_result`s), and
/// returns the answer they make so far (empty without rounds).
///
/// # Errors
/// Database errors; `Invalid` for a stored round that does not validate (P10).
pub(super) async fn resume(ctx: &WorkerContext, job: &JobRow, request: &mut Value) -> Result<Answer, JobError> {
    let rounds = crate::store::rounds::load(&ctx.db, job.job_id).await?;
    let answer = answer_of(job, &rounds)?;
    // Tools an earlier attempt ran in a round it never stored are run again
    // (under new ids) when that round is redone: their first charges go.
    let kept: Vec<String> = rounds
        .iter()
        .filter_map(|r| r.tool_results.as_array())
        .flatten()
        .filter_map(|b| b.get("tool_use_id").and_then(Value::as_str).map(str::to_owned))
        .collect();
    let mut tx = shared::db::begin(&ctx.db).await?;
    let waived = crate::store::outbox::waive_tool_charges_except(&mut tx, job.job_id, &kept).await?;
    tx.commit().await?;
    if waived > 0 {
        tracing::info!(
            waived,
            "tool charges of a round an earlier attempt never stored are waived; the round is redone"
        );
        metrics::counter!("fleet_tool_charges_waived_total").increment(waived);
    }
    for (role, blocks) in &answer.closed {
        request::append_blocks(request, role, blocks.clone());
    }
    if answer.stored.rounds > 0 {
        tracing::info!(
            rounds = answer.stored.rounds,
            last_seq = answer.stored.last_seq,
            "resuming after the rounds an earlier attempt stored"
        );
        metrics::counter!("fleet_rounds_resumed_total").increment(u64::from(answer.stored.rounds));
    }
    Ok(answer)
}

/// The answer the stored `rounds` make.
fn answer_of(job: &JobRow, rounds: &[Round]) -> Result<Answer, JobError> {
    let mut answer = Answer::default();
    for (i, r) in rounds.iter().enumerate() {
        let invalid = |e: String| JobError::Invalid(format!("job {} round {}: {e}", job.job_id, r.round));
        if usize::try_from(r.round).ok() != Some(i + 1) {
            return Err(invalid(format!("expected round {}", i + 1)));
        }
        request::validate_content(&r.assistant).map_err(|e| invalid(format!("assistant turn: {e}")))?;
        request::validate_content(&r.tool_results).map_err(|e| invalid(format!("tool results: {e}")))?;
        let charges = parse_charges(&r.tool_charges).ok_or_else(|| invalid("tool charges do not parse".into()))?;
        let blocks = |v: &Value| v.as_array().cloned().unwrap_or_default();
        answer.closed.push(("assistant", blocks(&r.assistant)));
        answer.closed.push(("user", blocks(&r.tool_results)));
        answer.text.push_str(&r.text);
        answer.tool_charges.extend(charges);
        answer.stored.rounds += 1;
        answer.stored.last_seq = answer.stored.last_seq.max(r.last_call_seq);
        answer.stored.calls_charge += r.calls_charge;
    }
    answer.stored.text_len = answer.text.len();
    answer.stored.charges_len = answer.tool_charges.len();
    Ok(answer)
}

fn charges_json(charges: &[(String, Decimal)]) -> Value {
    Value::Array(charges.iter().map(|(name, usd)| json!([name, usd.to_string()])).collect())
}

fn parse_charges(v: &Value) -> Option<Vec<(String, Decimal)>> {
    v.as_array()?
        .iter()
        .map(|pair| {
            let name = pair.get(0)?.as_str()?.to_owned();
            let usd = pair.get(1)?.as_str()?.parse::<Decimal>().ok()?;
            Some((name, usd))
        })
        .collect()
}

/// Stores round `round` of the job — the last closed assistant turn
/// (`assistant`) and the tool results sent back (`results`) — with the
/// calls the attempt made since the last stored round, in one transaction
/// fenced on the lease; then those calls are the round's, no longer the
/// attempt's (`answer.calls` is emptied, [`Stored`] grows).
///
/// # Errors
/// `LeaseLost` when the fence finds a newer claim (nothing written). Any
/// other failure is logged and counted, and the round stays the attempt's.
pub(super) async fn store_round(
    ctx: &WorkerContext,
    job: &JobRow,
    lease: &ClaimedJob,
    answer: &mut Answer,
    assistant: &[Value],
    results: &[Value],
) -> Result<(), JobError> {
    if answer.stored.broken {
        return Ok(());
    }
    let round = answer.stored.rounds + 1;
    let stored = write(ctx, job, lease, answer, round, assistant, results).await;
    match stored {
        Ok((calls_charge, last_seq)) => {
            answer.calls.clear();
            answer.stored.rounds = round;
            answer.stored.last_seq = last_seq;
            answer.stored.calls_charge += calls_charge;
            answer.stored.text_len = answer.text.len();
            answer.stored.charges_len = answer.tool_charges.len();
            metrics::counter!("fleet_rounds_stored_total").increment(1);
            Ok(())
        }
        Err(JobError::LeaseLost) => Err(JobError::LeaseLost),
        Err(e) => {
            metrics::counter!("fleet_round_store_failures_total").increment(1);
            tracing::warn!(error.message = %e, round, "a tool round could not be stored; a later attempt would redo it");
            answer.stored.broken = true;
            Ok(())
        }
    }
}

/// The transaction of [`store_round`]: `(what the calls charge, their last seq)`.
async fn write(
    ctx: &WorkerContext,
    job: &JobRow,
    lease: &ClaimedJob,
    answer: &Answer,
    round: u32,
    assistant: &[Value],
    results: &[Value],
) -> Result<(Decimal, i32), JobError> {
    let mut priced = Vec::with_capacity(answer.calls.len());
    for call in &answer.calls {
        priced.push(finalize::price(ctx, call).await?);
    }
    let calls_charge: Decimal = priced.iter().map(finalize::PricedCall::user_charge).sum();
    let last_seq = answer.calls.iter().map(|c| c.seq).max().unwrap_or(answer.stored.last_seq);
    let text = answer.text.get(answer.stored.text_len..).unwrap_or_default().to_owned();
    let charges = answer.tool_charges.get(answer.stored.charges_len..).unwrap_or_default();
    let row = Round {
        round: i32::try_from(round).unwrap_or(i32::MAX),
        assistant: Value::Array(assistant.to_vec()),
        tool_results: Value::Array(results.to_vec()),
        text,
        tool_charges: charges_json(charges),
        calls_charge,
        last_call_seq: last_seq,
        lease_epoch: lease.epoch(),
    };
    let mut tx = shared::db::begin(&ctx.db).await?;
    if lease.store_round(&mut tx, &row).await?.is_none() {
        return Err(JobError::LeaseLost);
    }
    for call in priced {
        write_call(&mut tx, job, lease, call, false).await?;
    }
    tx.commit().await?;
    Ok((calls_charge, last_seq))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::jobs::JobKind;

    fn job() -> JobRow {
        JobRow {
            job_id: uuid::Uuid::nil(),
            chat_id: 1,
            user_id: 1,
            update_id: 1,
            kind: JobKind::Chat,
            user_content: json!([{ "type": "text", "text": "hi" }]),
            chat_kind: "private".into(),
            conversation_epoch: 1,
            message_thread_id: None,
            telegram_message_id: 1,
            reply_message_ids: Vec::new(),
            answer_stored: false,
            stored_reply: None,
        }
    }

    fn round(n: i32, text: &str, charges: Value, seq: i32) -> Round {
        Round {
            round: n,
            assistant: json!([{ "type": "text", "text": text }, { "type": "tool_use", "id": format!("t{n}"), "name": "remember", "input": {} }]),
            tool_results: json!([{ "type": "tool_result", "tool_use_id": format!("t{n}"), "content": "ok" }]),
            text: text.to_owned(),
            tool_charges: charges,
            calls_charge: "0.01".parse().unwrap_or_default(),
            last_call_seq: seq,
            lease_epoch: 1,
        }
    }

    #[test]
    fn stored_rounds_make_the_answer_so_far() -> Result<(), JobError> {
        let rounds = [round(1, "One.\n\n", json!([["remember", "0.001"]]), 1), round(2, "Two.\n\n", json!([]), 3)];
        let answer = answer_of(&job(), &rounds)?;
        assert_eq!(answer.closed.len(), 4);
        assert_eq!(
            answer.closed.iter().map(|(r, _)| *r).collect::<Vec<_>>(),
            ["assistant", "user", "assistant", "user"]
        );
        assert_eq!(answer.text, "One.\n\nTwo.\n\n");
        assert_eq!(answer.tool_charges, vec![("remember".to_owned(), "0.001".parse().unwrap_or_default())]);
        assert_eq!(
            answer.stored,
            Stored {
                rounds: 2,
                last_seq: 3,
                calls_charge: "0.02".parse().unwrap_or_default(),
                text_len: answer.text.len(),
                charges_len: 1,
                broken: false,
            }
        );
        assert!(answer.calls.is_empty() && answer.content.is_empty());
        Ok(())
    }

    #[test]
    fn a_gap_or_a_damaged_round_is_refused_with_the_round_named() {
        let gap = [round(2, "x", json!([]), 1)];
        assert!(matches!(answer_of(&job(), &gap), Err(JobError::Invalid(e)) if e.contains("round 2")));
        let mut bad = round(1, "x", json!([]), 1);
        bad.tool_results = json!([]);
        assert!(matches!(answer_of(&job(), &[bad]), Err(JobError::Invalid(e)) if e.contains("tool results")));
        let charges = round(1, "x", json!([["remember", 3]]), 1);
        assert!(matches!(answer_of(&job(), &[charges]), Err(JobError::Invalid(e)) if e.contains("charges")));
    }

    #[test]
    fn tool_charges_round_trip_exactly() {
        let charges = vec![("remember".to_owned(), "0.0010".parse().unwrap_or_default())];
        assert_eq!(parse_charges(&charges_json(&charges)), Some(charges));
    }
}
