//! Finance commands: dead letters (list, redrive), reconciliation of the
//! outbox against the ledger with the ledger's invariants, one charge's
//! trace, and refunds as correcting entries (DESIGN §7a).

use crate::ledger::{self, Posting};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use shared::amqp::{ConfirmPublisher, Outgoing, Topology, BILLING_ROUTING_KEY};
use sqlx::PgPool;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use uuid::Uuid;

/// Unresolved failures, one line each.
///
/// # Errors
/// Database errors.
pub async fn list_dead_letters(db: &PgPool) -> Result<String, sqlx::Error> {
    let rows: Vec<(Uuid, i32, String, Option<chrono::DateTime<chrono::Utc>>)> = sqlx::query_as(
        "SELECT event_id, attempts, last_error, dead_lettered_at FROM billing_failures WHERE resolved_at IS NULL ORDER BY updated_at",
    )
    .fetch_all(db)
    .await?;
    let mut out = format!("{} unresolved billing failure(s)\n", rows.len());
    for (id, attempts, error, at) in rows {
        let at = at.map(|t| t.to_rfc3339()).unwrap_or_default();
        let _ = writeln!(out, "{id}  attempts={attempts}  dead_lettered_at={at}  error={error}");
    }
    Ok(out)
}

/// Re-publishes the payload of one (or every) unresolved failure to the
/// billing exchange; returns how many. The billing-worker marks each
/// resolved when it applies.
///
/// # Errors
/// Database or broker errors; an event without a stored payload.
pub async fn redrive(
    db: &PgPool,
    publisher: &ConfirmPublisher,
    topology: &Topology,
    event: Option<Uuid>,
) -> anyhow::Result<usize> {
    let rows: Vec<(Uuid, Option<Value>)> = match event {
        Some(id) => {
            sqlx::query_as("SELECT event_id, payload FROM billing_failures WHERE event_id = $1")
                .bind(id)
                .fetch_all(db)
                .await?
        }
        None => {
            sqlx::query_as("SELECT event_id, payload FROM billing_failures WHERE resolved_at IS NULL")
                .fetch_all(db)
                .await?
        }
    };
    if let (Some(id), true) = (event, rows.is_empty()) {
        anyhow::bail!("no billing failure with event id {id}");
    }
    let exchange = topology.billing_exchange();
    let mut n = 0;
    for (id, payload) in rows {
        let Some(payload) = payload else {
            anyhow::bail!("event {id} has no stored payload (it was not JSON); it cannot be redriven");
        };
        let body = payload.to_string();
        let message_id = id.to_string();
        publisher
            .publish(Outgoing {
                exchange: &exchange,
                routing_key: BILLING_ROUTING_KEY,
                body: body.as_bytes(),
                message_id: Some(&message_id),
                content_type: "application/json",
                attempt: None,
            })
            .await?;
        n += 1;
    }
    Ok(n)
}

/// One reconciliation run.
#[derive(Debug, Default, serde::Serialize)]
pub struct Reconciliation {
    /// Totals per day, model and class: `(outbox, ledger)` in USD.
    pub totals: BTreeMap<String, (Decimal, Decimal)>,
    /// Events in the outbox but not applied to the ledger.
    pub missing_in_ledger: Vec<String>,
    /// Events applied to the ledger with no outbox row.
    pub missing_in_outbox: Vec<String>,
    /// Broken invariants.
    pub invariant_failures: Vec<String>,
}

impl Reconciliation {
    /// True when nothing differs and every invariant holds.
    pub fn clean(&self) -> bool {
        self.missing_in_ledger.is_empty()
            && self.missing_in_outbox.is_empty()
            && self.invariant_failures.is_empty()
            && self.totals.values().all(|(a, b)| a == b)
    }
}

/// Compares the outbox with the ledger for `[from, to]` and checks the
/// ledger's invariants (all balances sum to zero; each balance equals its
/// entries; no negative amount).
///
/// # Errors
/// Database errors.
pub async fn reconcile(
    bot: &PgPool,
    billing: &PgPool,
    from: chrono::NaiveDate,
    to: chrono::NaiveDate,
) -> Result<Reconciliation, sqlx::Error> {
    let mut r = Reconciliation::default();
    let outbox: Vec<(Uuid, Value, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT event_id, payload, created_at FROM billing_outbox WHERE created_at::date BETWEEN $1 AND $2",
    )
    .bind(from)
    .bind(to)
    .fetch_all(bot)
    .await?;
    let applied: Vec<(Uuid, Value)> =
        sqlx::query_as("SELECT event_id, payload FROM applied_events WHERE kind IN ('usage_charge.v1', 'tool_charge.v1', 'top_up.v1', 'hold_release.v1') AND applied_at::date BETWEEN $1 AND $2 + 1")
            .bind(from)
            .bind(to)
            .fetch_all(billing)
            .await?;
    let applied_ids: BTreeMap<Uuid, &Value> = applied.iter().map(|(id, p)| (*id, p)).collect();
    let outbox_ids: BTreeMap<Uuid, &Value> = outbox.iter().map(|(id, p, _)| (*id, p)).collect();
    for (id, payload, at) in &outbox {
        let day = at.date_naive();
        for (class, amount) in amounts(payload) {
            let key = format!("{day} {} {class}", payload.get("model").and_then(Value::as_str).unwrap_or("-"));
            r.totals.entry(key.clone()).or_default().0 += amount;
            if applied_ids.contains_key(id) {
                r.totals.entry(key).or_default().1 += amount;
            }
        }
        if !applied_ids.contains_key(id) {
            r.missing_in_ledger.push(drill_down(*id, payload));
        }
    }
    for (id, payload) in &applied {
        if !outbox_ids.contains_key(id) && payload.get("type").and_then(Value::as_str) != Some("top_up.v1") {
            r.missing_in_outbox.push(drill_down(*id, payload));
        }
    }
    let sum: Decimal = sqlx::query_scalar("SELECT COALESCE(sum(balance), 0) FROM accounts").fetch_one(billing).await?;
    if !sum.is_zero() {
        r.invariant_failures.push(format!("account balances sum to {sum}, not 0"));
    }
    let drifted: Vec<(String, Decimal, Decimal)> = sqlx::query_as(
        "SELECT a.account_id, a.balance,
                COALESCE((SELECT sum(amount) FROM ledger_entries WHERE credit_account = a.account_id), 0)
              - COALESCE((SELECT sum(amount) FROM ledger_entries WHERE debit_account = a.account_id), 0)
           FROM accounts a",
    )
    .fetch_all(billing)
    .await?;
    for (account, balance, from_entries) in drifted {
        if balance != from_entries {
            r.invariant_failures.push(format!("{account}: balance {balance} but entries say {from_entries}"));
        }
    }
    let negative: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ledger_entries WHERE amount < 0").fetch_one(billing).await?;
    if negative > 0 {
        r.invariant_failures.push(format!("{negative} ledger entries with a negative amount"));
    }
    Ok(r)
}

fn amounts(payload: &Value) -> Vec<(&'static str, Decimal)> {
    let get =
        |k: &str| payload.get(k).and_then(Value::as_str).and_then(|s| s.parse::<Decimal>().ok()).unwrap_or_default();
    match payload.get("type").and_then(Value::as_str) {
        Some("usage_charge.v1") => vec![("provider_cost", get("provider_cost")), ("user_charge", get("user_charge"))],
        Some("tool_charge.v1") => vec![("tool_charge", get("user_charge"))],
        Some("top_up.v1") => vec![("top_up", get("credit"))],
        _ => Vec::new(),
    }
}

fn drill_down(id: Uuid, p: &Value) -> String {
    let f = |k: &str| p.get(k).map(|v| v.to_string().trim_matches('"').to_owned()).unwrap_or_else(|| "-".into());
    format!(
        "event {id} type={} update_id={} job={} lease_epoch={} request_id={} user={}",
        f("type"),
        f("update_id"),
        f("job_id"),
        f("lease_epoch"),
        f("request_id"),
        f("user_id")
    )
}

/// Renders a reconciliation as `table`, `csv` or `json`.
pub fn render(r: &Reconciliation, format: &str) -> String {
    match format {
        "json" => serde_json::to_string_pretty(r).unwrap_or_default(),
        "csv" => {
            let mut out = String::from("day_model_class,outbox_usd,ledger_usd,variance_usd\n");
            for (k, (a, b)) in &r.totals {
                let _ = writeln!(out, "{k},{a},{b},{}", a - b);
            }
            out
        }
        _ => {
            let mut out =
                format!("{:<48} {:>14} {:>14} {:>12}\n", "day model class", "outbox USD", "ledger USD", "variance");
            for (k, (a, b)) in &r.totals {
                let _ =
                    writeln!(out, "{k:<48} {:>14} {:>14} {:>12}", a.normalize(), b.normalize(), (a - b).normalize());
            }
            for m in &r.missing_in_ledger {
                let _ = writeln!(out, "missing in ledger: {m}");
            }
            for m in &r.missing_in_outbox {
                let _ = writeln!(out, "missing in outbox: {m}");
            }
            for m in &r.invariant_failures {
                let _ = writeln!(out, "invariant: {m}");
            }
            let _ = writeln!(out, "{}", if r.clean() { "reconcile: clean" } else { "reconcile: VARIANCE" });
            out
        }
    }
}

/// `(entry_id, kind, debit, credit, amount, estimated, memo)`.
type EntryRow = (i64, String, String, String, Decimal, bool, Option<String>);
/// `(kind, debit account, amount, user, job)` of a charge's entries.
type ChargeRow = (String, String, Decimal, Option<i64>, Option<Uuid>);

/// One charge's trace: the event, its entries and their accounts.
///
/// # Errors
/// Database errors; an unknown event.
pub async fn explain(db: &PgPool, event: Uuid) -> anyhow::Result<String> {
    let payload: Option<Value> = sqlx::query_scalar("SELECT payload FROM applied_events WHERE event_id = $1")
        .bind(event)
        .fetch_optional(db)
        .await?;
    let Some(payload) = payload else { anyhow::bail!("no applied event {event}") };
    let entries: Vec<EntryRow> = sqlx::query_as(
        "SELECT entry_id, kind, debit_account, credit_account, amount, estimated, memo FROM ledger_entries WHERE event_id = $1 ORDER BY leg",
    )
    .bind(event)
    .fetch_all(db)
    .await?;
    let mut out = format!("{}\n{}\n", drill_down(event, &payload), serde_json::to_string_pretty(&payload)?);
    for (id, kind, debit, credit, amount, estimated, memo) in entries {
        let est = if estimated { " (estimated)" } else { "" };
        let _ = writeln!(
            out,
            "entry {id}: {kind} {} USD {debit} → {credit}{est} {}",
            amount.normalize(),
            memo.unwrap_or_default()
        );
    }
    Ok(out)
}

/// Refunds a charge: a correcting entry revenue → user for what the user
/// paid (the provider cost stays: it was incurred). Idempotent.
///
/// # Errors
/// Database errors; an unknown or non-charge event.
pub async fn refund(db: &PgPool, event: Uuid, reason: &str) -> anyhow::Result<String> {
    let rows: Vec<ChargeRow> = sqlx::query_as(
        "SELECT kind, debit_account, amount, user_id, job_id FROM ledger_entries
          WHERE event_id = $1 AND kind IN ('usage_charge', 'tool_charge')",
    )
    .bind(event)
    .fetch_all(db)
    .await?;
    let Some((_, account, _, user, job)) = rows.first().cloned() else {
        anyhow::bail!("event {event} has no charge to refund");
    };
    let amount: Decimal = rows.iter().map(|r| r.2).sum();
    let refund_id = Uuid::new_v5(&shared::contracts::EVENT_NAMESPACE, format!("refund:{event}").as_bytes());
    let postings = [Posting { debit: "system:revenue".into(), credit: account, amount, kind: "refund" }];
    let meta = ledger::EntryMeta {
        user_id: user,
        job_id: job,
        memo: Some(format!("refund of {event}: {reason}")),
        ..Default::default()
    };
    let payload = json!({ "type": "refund.v1", "refunds": event, "reason": reason, "amount": amount.to_string() });
    let mut tx = db.begin().await?;
    let applied = ledger::apply_postings(&mut tx, refund_id, "refund.v1", &payload, &postings, &meta).await?;
    tx.commit().await?;
    Ok(match applied {
        ledger::Applied::Applied => {
            format!("refunded {} USD of {event} (refund event {refund_id})", amount.normalize())
        }
        ledger::Applied::Duplicate => format!("already refunded: {event} (refund event {refund_id})"),
    })
}
