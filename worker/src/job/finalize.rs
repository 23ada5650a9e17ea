//! `finalize`: one transaction that stores the user turn and the answer,
//! one `api_calls` row per call, and the billing events in the outbox —
//! fenced on the lease epoch, so a stale worker writes nothing (P3, P7).
//! The calls of stored tool rounds were recorded with their round
//! (`job::rounds`, through [`write_call`]): finalize records only the calls
//! after the last stored round, stores the rounds' turns with the answer's
//! (each once) and deletes the rounds (the conversation has them).
//! `record_abandoned` records the calls of an attempt that will not
//! finalize, and `book_orphaned_calls` those of an attempt that died with
//! them `open`: every call the provider served is on the books.

use super::{CallEnd, CallRecord, JobError, JobRow};
use crate::context::WorkerContext;
use crate::store::calls::{self, ApiCall};
use crate::store::conversation::{self, TurnOf};
use crate::store::jobs::ClaimedJob;
use chrono::Utc;
use serde_json::{json, Value};
use shared::contracts::{
    abandoned_usage_event_id, hold_release_event_id, usage_event_id, BillingEvent, HoldRelease, UsageCharge,
};
use shared::pricing::TokenCounts;
use uuid::Uuid;

/// Orphaned calls booked per transaction.
const ORPHAN_BATCH: i64 = 50;

/// How a call is accounted: the tokens, whether they are an estimate, and
/// whether the user is charged for them.
struct Billing {
    tokens: TokenCounts,
    estimated: bool,
    charged: bool,
}

/// A call priced for its record: what [`write_call`] writes.
pub(super) struct PricedCall<'a> {
    call: &'a CallRecord,
    model: String,
    billing: Option<Billing>,
    price: Option<shared::pricing::Priced>,
}

impl PricedCall<'_> {
    /// What the call charges the user, USD, when recorded by the attempt
    /// that answers (zero for a call charged to nobody).
    pub(super) fn user_charge(&self) -> rust_decimal::Decimal {
        match (&self.billing, &self.price) {
            (Some(b), Some(p)) if b.charged => p.user_charge.0,
            _ => rust_decimal::Decimal::ZERO,
        }
    }
}

/// Prices `call` as it is recorded (token counting of a call cut short is a
/// network call: done before any transaction opens).
///
/// # Errors
/// `Pricing` when neither the call's model nor the configured one is priced.
pub(super) async fn price<'a>(ctx: &WorkerContext, call: &'a CallRecord) -> Result<PricedCall<'a>, JobError> {
    let billing = billable_tokens(ctx, call).await;
    let model = call.state.model.clone().unwrap_or_else(|| ctx.settings.model.clone());
    let price = match &billing {
        Some(b) => Some(price_call(ctx, &model, Utc::now().date_naive(), &b.tokens)?),
        None => None,
    };
    Ok(PricedCall { call, model, billing, price })
}

/// What one call is billed at, or `None` when it never started (an HTTP
/// error: nothing was generated). A stream that failed with an `error`
/// event is not charged to the user (fixtures README) but its provider
/// cost, as far as the stream reported usage, is recorded for finance.
async fn billable_tokens(ctx: &WorkerContext, call: &CallRecord) -> Option<Billing> {
    if !call.state.started {
        return None;
    }
    match &call.end {
        CallEnd::Complete => Some(Billing { tokens: call.state.usage.token_counts(), estimated: false, charged: true }),
        CallEnd::Failed(_) => {
            Some(Billing { tokens: call.state.usage.token_counts(), estimated: true, charged: false })
        }
        CallEnd::Cancelled | CallEnd::IdleTimeout | CallEnd::Deadline => {
            // Cut short: input from message_start, output counted by the
            // token-counting endpoint on what was generated (DESIGN §6):
            // visible text, and also thinking and partial tool input, which
            // are output tokens too.
            let mut tokens = call.state.usage.token_counts();
            let text = call.state.generated_text();
            tokens.output = if text.is_empty() {
                0
            } else {
                let body = json!({
                    "model": call.request.get("model").cloned().unwrap_or(Value::Null),
                    "messages": [{ "role": "user", "content": text }],
                });
                // Bounded: a count that never answers must not hold the job
                // (its lease is renewed meanwhile, so nothing else would end it).
                let limit = std::time::Duration::from_secs(ctx.settings.count_tokens_timeout_s);
                match ctx.anthropic.count_tokens(&body, limit).await {
                    Ok(n) => n,
                    Err(e) => {
                        let reason =
                            if matches!(e, shared::anthropic::ApiError::TimedOut(_)) { "timeout" } else { "error" };
                        metrics::counter!("fleet_count_tokens_fallbacks_total", "reason" => reason).increment(1);
                        tracing::warn!(error.message = %e, reason, "count_tokens failed; billing the output the stream reported, as an estimate");
                        tokens.output
                    }
                }
            };
            // The provider never bills more output than `max_tokens`; a count
            // of the text as a user message can be a few tokens over it.
            // Admission held `max_tokens` for this call, no more.
            if let Some(max_tokens) = call.request.get("max_tokens").and_then(Value::as_u64) {
                tokens.output = tokens.output.min(max_tokens);
            }
            Some(Billing { tokens, estimated: true, charged: true })
        }
    }
}

/// Stores the exchange, the reply to deliver (`reply`, so that a later
/// attempt delivers it instead of generating again) and its charges in one
/// fenced transaction.
///
/// # Errors
/// `LeaseLost` when the lease epoch no longer matches (nothing written),
/// database or pricing errors.
pub async fn finalize(
    ctx: &WorkerContext,
    job: &JobRow,
    lease: &ClaimedJob,
    calls: &[CallRecord],
    turns: &[(&'static str, Vec<Value>)],
    partial: bool,
    reply: &str,
) -> Result<(), JobError> {
    // Token counting is a network call: done before the transaction opens.
    let mut priced = Vec::with_capacity(calls.len());
    for call in calls {
        priced.push(price(ctx, call).await?);
    }
    let mut tx = shared::db::begin(&ctx.db).await?;
    if !lease.store_answer(&mut tx, reply).await? {
        drop(tx);
        // A retry after a commit whose answer was lost (the connection
        // died during COMMIT): stored already, by this very lease.
        return if lease.answer_stored(&ctx.db).await? { Ok(()) } else { Err(JobError::LeaseLost) };
    }
    let of = TurnOf { chat_id: job.chat_id, conversation_epoch: job.conversation_epoch, job_id: job.job_id };
    conversation::append_user_turn(&mut tx, of, &job.user_content).await?;
    // In a group the stored history is replayed to every member: one
    // member's file and note results are stored withheld.
    let shared_turns;
    let turns = if job.is_private() {
        turns
    } else {
        shared_turns = super::privacy::withhold_private_tool_results(turns);
        shared_turns.as_slice()
    };
    for (i, (role, blocks)) in turns.iter().enumerate() {
        if blocks.is_empty() {
            continue;
        }
        conversation::append_turn(&mut tx, of, role, &Value::Array(blocks.clone()), partial && i + 1 == turns.len())
            .await?;
    }
    for call in priced {
        write_call(&mut tx, job, lease, call, false).await?;
    }
    // The stored rounds are in the conversation now (`turns` has them).
    crate::store::rounds::delete(&mut tx, job.job_id).await?;
    // After the charges, in the same transaction: settles the job's hold.
    // Tool charges were written when their tools committed; usage charges above.
    let charge_event_ids = crate::store::outbox::charge_event_ids(&mut tx, job.job_id).await?;
    let release = BillingEvent::HoldRelease(HoldRelease {
        event_id: hold_release_event_id(job.job_id),
        job_id: job.job_id,
        user_id: job.user_id,
        charge_event_ids,
    });
    crate::queues::relay::write(&mut tx, &release, Some(job.job_id)).await?;
    tx.commit().await?;
    ctx.outbox_notify.notify_one();
    Ok(())
}

/// Writes one call: its `api_calls` row and its usage event (the user's
/// charge, or for an `abandoned` attempt the provider cost alone).
pub(super) async fn write_call(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    job: &JobRow,
    lease: &ClaimedJob,
    priced: PricedCall<'_>,
    abandoned: bool,
) -> Result<(), JobError> {
    let PricedCall { call, model, billing, price } = priced;
    let charged = billing.as_ref().is_some_and(|b| b.charged);
    let estimated = billing.as_ref().is_some_and(|b| b.estimated);
    let tokens = billing.map(|b| b.tokens).unwrap_or_default();
    let (cost, charge) = match &price {
        Some(p) if charged && !abandoned => (p.provider_cost, p.user_charge),
        // A failed stream: what it cost us, charged to nobody.
        Some(p) => (p.provider_cost, Default::default()),
        None => Default::default(),
    };
    let row = ApiCall {
        job_id: job.job_id,
        seq: call.seq,
        lease_epoch: lease.epoch(),
        request_id: call.request_id.as_deref(),
        anthropic_message_id: call.state.message_id.as_deref(),
        model: &model,
        stop_reason: call.state.stop_reason.as_ref().map(|s| s.as_str()),
        tokens: &tokens,
        provider_cost: cost.0,
        user_charge: charge.0,
        estimated,
        abandoned,
        started: call.state.started,
    };
    if !calls::record_api_call(tx, &row).await? {
        // Recorded already under this epoch (a finalize whose commit
        // looked failed had in fact succeeded), or booked as orphaned by a
        // later attempt or the reaper (its event is in the outbox): nothing
        // more to record, and no second event.
        return Ok(());
    }
    if abandoned {
        // Every call the provider served is in the ledger, charged to nobody.
        let Some(price) = price else { return Ok(()) };
        let event = BillingEvent::UsageCharge(UsageCharge {
            event_id: abandoned_usage_event_id(job.job_id, lease.epoch(), call.seq),
            job_id: job.job_id,
            update_id: job.update_id,
            lease_epoch: lease.epoch(),
            api_call_seq: call.seq,
            user_id: job.user_id,
            chat_id: job.chat_id,
            request_id: call.request_id.clone(),
            model,
            tokens,
            provider_cost: price.provider_cost,
            user_charge: shared::money::Usd(rust_decimal::Decimal::ZERO),
            price_model: price.price_model,
            price_effective_from: price.price_effective_from,
            estimated,
            abandoned: true,
            occurred_at: Utc::now(),
        });
        return crate::queues::relay::write(tx, &event, Some(job.job_id)).await.map_err(JobError::from);
    }
    let Some(price) = price.filter(|_| charged) else { return Ok(()) };
    for (class, n) in [
        ("input", tokens.input),
        ("output", tokens.output),
        ("cache_write_5m", tokens.cache_write_5m),
        ("cache_write_1h", tokens.cache_write_1h),
        ("cache_read", tokens.cache_read),
        ("web_search", tokens.web_search_requests),
    ] {
        metrics::counter!("fleet_tokens_total", "model" => price.price_model.clone(), "class" => class).increment(n);
    }
    let usd = |d: rust_decimal::Decimal| d.to_string().parse::<f64>().unwrap_or(0.0);
    // USD per call: the histograms' `_sum` is the total by model and kind.
    metrics::histogram!("fleet_call_cost_usd", "model" => price.price_model.clone(), "kind" => "provider_cost")
        .record(usd(price.provider_cost.0));
    metrics::histogram!("fleet_call_cost_usd", "model" => price.price_model.clone(), "kind" => "user_charge")
        .record(usd(price.user_charge.0));
    let event = BillingEvent::UsageCharge(UsageCharge {
        event_id: usage_event_id(job.job_id, call.seq),
        job_id: job.job_id,
        update_id: job.update_id,
        lease_epoch: lease.epoch(),
        api_call_seq: call.seq,
        user_id: job.user_id,
        chat_id: job.chat_id,
        request_id: call.request_id.clone(),
        model,
        tokens,
        provider_cost: price.provider_cost,
        user_charge: price.user_charge,
        price_model: price.price_model,
        price_effective_from: price.price_effective_from,
        estimated,
        abandoned: false,
        occurred_at: Utc::now(),
    });
    crate::queues::relay::write(tx, &event, Some(job.job_id)).await?;
    Ok(())
}

/// Records the calls of an attempt that will not finalize (its lease was
/// lost, or it was handed back): what the provider served is in the ledger
/// as provider cost, under ids of this lease epoch, and the user is not
/// charged (the attempt that answers is). Not fenced on purpose: it touches
/// no state of the job, only adds finance records no other attempt writes.
/// Best effort: a failure is logged (the reconcile against the provider's
/// usage report shows what is missing).
pub async fn record_abandoned(ctx: &WorkerContext, job: &JobRow, lease: &ClaimedJob, calls: &[CallRecord]) {
    let result = async {
        let mut priced = Vec::new();
        for call in calls.iter().filter(|c| c.state.started) {
            priced.push(price(ctx, call).await?);
        }
        if priced.is_empty() {
            return Ok(());
        }
        let mut tx = shared::db::begin(&ctx.db).await?;
        for call in priced {
            write_call(&mut tx, job, lease, call, true).await?;
        }
        tx.commit().await?;
        ctx.outbox_notify.notify_one();
        Ok::<(), JobError>(())
    }
    .await;
    if let Err(e) = result {
        tracing::error!(error.message = %e, "the calls of an abandoned attempt could not be recorded");
    }
}

/// Books the `open` calls whose attempt is over (its worker died between
/// the moment the call's request was about to leave and the commit that
/// records it — before or after `message_start`): each as provider
/// cost charged to nobody, at the estimate of
/// [`OpenCall::estimate`](crate::store::calls::OpenCall::estimate), priced
/// on the day its stream started, marked `estimated` and `abandoned` — in
/// `api_calls` (state `orphaned`) and in the outbox, under the abandoned
/// event id of its epoch and seq, in one transaction. The user is never
/// charged for it: the attempt that answers charges its own calls. Only job
/// `job_id`'s calls when given (the next attempt, just after its claim);
/// all of them otherwise (the reaper), at most [`ORPHAN_BATCH`]. Returns how
/// many were booked. A call whose model has no price stays open and is
/// logged as an error (the next pass tries again).
///
/// # Errors
/// Database errors.
pub async fn book_orphaned_calls(ctx: &WorkerContext, job_id: Option<Uuid>) -> Result<usize, JobError> {
    let mut tx = shared::db::begin(&ctx.db).await?;
    let open = crate::store::jobs::orphaned_calls(&mut tx, job_id, ORPHAN_BATCH).await?;
    let mut booked = 0;
    for call in &open {
        let tokens = call.estimate();
        let price = match price_call(ctx, &call.model, call.created_at.date_naive(), &tokens) {
            Ok(price) => price,
            Err(e) => {
                tracing::error!(error.message = %e, job_id = %call.job_id, lease_epoch = call.lease_epoch, seq = call.seq, "an orphaned call cannot be priced; it stays open");
                continue;
            }
        };
        if !calls::book_orphan(&mut tx, call, &tokens, price.provider_cost.0).await? {
            continue;
        }
        let event = BillingEvent::UsageCharge(UsageCharge {
            event_id: abandoned_usage_event_id(call.job_id, call.lease_epoch, call.seq),
            job_id: call.job_id,
            update_id: call.update_id,
            lease_epoch: call.lease_epoch,
            api_call_seq: call.seq,
            user_id: call.user_id,
            chat_id: call.chat_id,
            request_id: call.request_id.clone(),
            model: call.model.clone(),
            tokens,
            provider_cost: price.provider_cost,
            user_charge: shared::money::Usd(rust_decimal::Decimal::ZERO),
            price_model: price.price_model,
            price_effective_from: price.price_effective_from,
            estimated: true,
            abandoned: true,
            occurred_at: Utc::now(),
        });
        crate::queues::relay::write(&mut tx, &event, Some(call.job_id)).await?;
        tracing::info!(job_id = %call.job_id, lease_epoch = call.lease_epoch, seq = call.seq, request_id = call.request_id.as_deref().unwrap_or("-"), "orphaned call booked as estimated provider cost, charged to nobody");
        booked += 1;
    }
    tx.commit().await?;
    if booked > 0 {
        metrics::counter!("fleet_orphaned_calls_booked_total").increment(booked as u64);
        ctx.outbox_notify.notify_one();
    }
    Ok(booked)
}
/// Prices a call of `model` on day `on`. A model the price table does not
/// know (the API reported a snapshot newer than the table, say) is priced
/// as the configured `MODEL`, which start-up checks is priced: the call is
/// answered and booked, never lost; the error log and
/// `fleet_unpriced_calls_total{model}` tell finance which rows to check
/// (the charge's `price_model` names the row used).
///
/// # Errors
/// [`shared::pricing::PricingError`] when neither is priced on `on`.
pub fn price_call(
    ctx: &WorkerContext,
    model: &str,
    on: chrono::NaiveDate,
    tokens: &shared::pricing::TokenCounts,
) -> Result<shared::pricing::Priced, shared::pricing::PricingError> {
    match ctx.prices.price_call(model, on, tokens) {
        Ok(price) => Ok(price),
        Err(e) => {
            metrics::counter!("fleet_unpriced_calls_total", "model" => model.to_owned()).increment(1);
            tracing::error!(error.message = %e, model, fallback = %ctx.settings.model, "a call's model has no price; priced as the configured model");
            ctx.prices.price_call(&ctx.settings.model, on, tokens)
        }
    }
}
