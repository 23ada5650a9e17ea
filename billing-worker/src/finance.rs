//! Finance commands: dead letters (list, redrive), reconciliation of the
//! outbox against the ledger with the ledger's invariants (and, with an
//! admin key, of our token counts against the provider's usage report), one
//! charge's trace, and refunds as correcting entries (DESIGN §7a).

use crate::bot_db::DailyTokens;
use crate::ledger::{self, Posting};
use crate::provider::{token_classes, ProviderTotals, UsageReportClient};
use billing::{Account, EntryKind};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use shared::amqp::{ConfirmPublisher, Outgoing, Topology, BILLING_ROUTING_KEY};
use shared::contracts::BillingEvent;
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
    /// Our token counts against the provider's usage report.
    pub provider: ProviderComparison,
}

/// Why the provider comparison was skipped when no admin key is set.
pub const PROVIDER_SKIPPED: &str = "ANTHROPIC_ADMIN_API_KEY not set";

/// The comparison with the provider's usage report (Usage and Cost API,
/// GET /v1/organizations/usage_report/messages).
#[derive(Debug, serde::Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ProviderComparison {
    /// Not compared (the default): no admin key.
    Skipped {
        /// Why, e.g. [`PROVIDER_SKIPPED`].
        reason: String,
    },
    /// Compared.
    Compared {
        /// Per `"{day} {model} {class}"` (UTC day; classes of
        /// [`crate::provider::TOKEN_CLASSES`]), the counts of each side.
        tokens: BTreeMap<String, TokenTotals>,
    },
}

impl Default for ProviderComparison {
    fn default() -> Self {
        Self::Skipped { reason: PROVIDER_SKIPPED.to_owned() }
    }
}

/// Tokens of one (day, model, class) on each side (tokens; web search
/// requests for the `web_search_requests` class).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenTotals {
    /// Sum of `tokens` of the `usage_charge.v1` events in `billing_outbox`
    /// (what users were charged for; failed calls are not).
    pub outbox: u64,
    /// Sum of the `api_calls` rows (every call the workers made, charged or
    /// not): the side compared with the provider.
    pub api_calls: u64,
    /// Sum of the provider's usage report.
    pub provider: u64,
}

impl TokenTotals {
    /// `provider − api_calls`: positive when the provider reports more than
    /// we recorded.
    pub fn variance(&self) -> i128 {
        i128::from(self.provider) - i128::from(self.api_calls)
    }
}

impl serde::Serialize for TokenTotals {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let mut st = s.serialize_struct("TokenTotals", 4)?;
        st.serialize_field("outbox", &self.outbox)?;
        st.serialize_field("api_calls", &self.api_calls)?;
        st.serialize_field("provider", &self.provider)?;
        st.serialize_field("variance", &self.variance())?;
        st.end()
    }
}

impl Reconciliation {
    /// True when nothing differs and every invariant holds.
    pub fn clean(&self) -> bool {
        self.missing_in_ledger.is_empty()
            && self.missing_in_outbox.is_empty()
            && self.invariant_failures.is_empty()
            && self.totals.values().all(|(a, b)| a == b)
            && self.provider_variances().is_empty()
    }

    /// Each (day, model, class) whose token counts differ from the
    /// provider's, one line each:
    /// `2025-11-30 claude-sonnet-4-5-20250929 input: provider 1234, api_calls 0, variance +1234`.
    pub fn provider_variances(&self) -> Vec<String> {
        let ProviderComparison::Compared { tokens } = &self.provider else { return Vec::new() };
        tokens
            .iter()
            .filter(|(_, t)| t.variance() != 0)
            .map(|(k, t)| {
                format!("{k}: provider {}, api_calls {}, variance {}", t.provider, t.api_calls, signed(t.variance()))
            })
            .collect()
    }

    /// One line naming what differs (for the exit error of the CLI); empty
    /// when clean.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        let usd = self.totals.values().filter(|(a, b)| a != b).count();
        if usd > 0 {
            parts.push(format!("{usd} USD total(s) differ between outbox and ledger"));
        }
        if !self.missing_in_ledger.is_empty() {
            parts.push(format!("{} event(s) missing in the ledger", self.missing_in_ledger.len()));
        }
        if !self.missing_in_outbox.is_empty() {
            parts.push(format!("{} event(s) missing in the outbox", self.missing_in_outbox.len()));
        }
        if !self.invariant_failures.is_empty() {
            parts.push(format!("{} broken invariant(s)", self.invariant_failures.len()));
        }
        let tokens = self.provider_variances();
        if !tokens.is_empty() {
            parts.push(format!("provider token variance: {}", tokens.join("; ")));
        }
        parts.join(", ")
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
    let outbox = crate::bot_db::outbox_between(bot, from, to).await?;
    // The kinds bound from the type: a new event version is compared too.
    let applied: Vec<(Uuid, Value)> = sqlx::query_as(
        "SELECT event_id, payload FROM applied_events WHERE kind = ANY($3) AND applied_at::date BETWEEN $1 AND $2 + 1",
    )
    .bind(from)
    .bind(to)
    .bind(BillingEvent::KINDS)
    .fetch_all(billing)
    .await?;
    let applied_ids: BTreeMap<Uuid, &Value> = applied.iter().map(|(id, p)| (*id, p)).collect();
    let outbox_ids: BTreeMap<Uuid, &Value> = outbox.iter().map(|o| (o.event_id, &o.payload)).collect();
    for o in &outbox {
        let day = o.created_at.date_naive();
        let model = match &o.event {
            Some(BillingEvent::UsageCharge(c)) => c.model.as_str(),
            _ => "-",
        };
        for (class, amount) in amounts(o.event.as_ref()) {
            let key = format!("{day} {model} {class}");
            r.totals.entry(key.clone()).or_default().0 += amount;
            if applied_ids.contains_key(&o.event_id) {
                r.totals.entry(key).or_default().1 += amount;
            }
        }
        if !applied_ids.contains_key(&o.event_id) {
            r.missing_in_ledger.push(drill_down(o.event_id, &o.payload));
        }
    }
    for (id, payload) in &applied {
        let top_up = payload.get("type").and_then(Value::as_str) == Some(BillingEvent::TOP_UP);
        if !outbox_ids.contains_key(id) && !top_up {
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

/// [`reconcile`], then, when `provider` is given, the comparison of our
/// token counts with the provider's usage report for the same days
/// ([`compare_provider`]). Without `provider` the comparison is
/// [`ProviderComparison::Skipped`].
///
/// # Errors
/// Database errors, and any failure to fetch the report: a report that
/// cannot be read is an error, never a clean comparison.
pub async fn reconcile_with_provider(
    bot: &PgPool,
    billing: &PgPool,
    from: chrono::NaiveDate,
    to: chrono::NaiveDate,
    provider: Option<&UsageReportClient>,
) -> anyhow::Result<Reconciliation> {
    let mut r = reconcile(bot, billing, from, to).await?;
    if let Some(client) = provider {
        let report = client.daily_tokens(from, to).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot fetch the provider's usage report (GET /v1/organizations/usage_report/messages): {e}"
            )
        })?;
        r.provider = ProviderComparison::Compared { tokens: compare_provider(bot, from, to, &report).await? };
    }
    Ok(r)
}

/// Our token counts beside the provider's, per `"{day} {model} {class}"`
/// for `[from, to]` (UTC days), from the bot database: the outbox's
/// `usage_charge.v1` `tokens` (by the outbox row's `created_at` day) and the
/// `api_calls` rows (by their `created_at` day); keys where every side is 0
/// are left out.
///
/// The side compared with the provider is `api_calls`, not the outbox:
/// `worker/src/job/finalize.rs` writes one `api_calls` row for every call a
/// job made, in the same transaction as the outbox events, but an outbox
/// `usage_charge.v1` only for the calls the user is charged for. A stream
/// that failed with an `error` event (e.g. `overloaded_error` mid-stream,
/// then retried) was served, and billed to us, up to the error: its tokens
/// are in `api_calls` (user_charge 0, provider_cost recorded) and in the
/// provider's report, but in no outbox event. An HTTP error before the
/// stream served nothing: its `api_calls` row has 0 tokens, and the report
/// nothing. So `api_calls` is what matches what the provider served; the
/// outbox column is shown beside it, and differs from it by exactly the
/// uncharged calls. Known, reported differences: a call cut short (cancel,
/// idle timeout, deadline) is recorded with its output estimated by token
/// counting, which may differ from what the provider generated; a call
/// whose job never finalized (lease lost, crash) has no row; and a call
/// received just before midnight UTC but finalized after it is on the next
/// day in `api_calls` (the report buckets by the time the call was made).
///
/// # Errors
/// Database errors.
pub async fn compare_provider(
    bot: &PgPool,
    from: chrono::NaiveDate,
    to: chrono::NaiveDate,
    provider: &ProviderTotals,
) -> Result<BTreeMap<String, TokenTotals>, sqlx::Error> {
    let outbox = crate::bot_db::outbox_usage_tokens(bot, from, to).await?;
    let api_calls = crate::bot_db::api_call_tokens(bot, from, to).await?;
    fn add_rows(tokens: &mut BTreeMap<String, TokenTotals>, rows: &DailyTokens, add: impl Fn(&mut TokenTotals, u64)) {
        for ((day, model), counts) in rows {
            for (class, n) in token_classes(counts) {
                if n > 0 {
                    add(tokens.entry(format!("{day} {model} {class}")).or_default(), n);
                }
            }
        }
    }
    let mut tokens: BTreeMap<String, TokenTotals> = BTreeMap::new();
    add_rows(&mut tokens, &outbox, |t, n| t.outbox += n);
    add_rows(&mut tokens, &api_calls, |t, n| t.api_calls += n);
    for ((day, model, class), n) in provider {
        if *n > 0 && (from..=to).contains(day) {
            tokens.entry(format!("{day} {model} {class}")).or_default().provider += n;
        }
    }
    Ok(tokens)
}

/// The USD amounts of an outbox event by class; none for a hold release or
/// an event this build cannot decode.
fn amounts(event: Option<&BillingEvent>) -> Vec<(&'static str, Decimal)> {
    match event {
        Some(BillingEvent::UsageCharge(c)) => {
            vec![("provider_cost", c.provider_cost.0), ("user_charge", c.user_charge.0)]
        }
        Some(BillingEvent::ToolCharge(c)) => vec![("tool_charge", c.user_charge.0)],
        Some(BillingEvent::TopUp(c)) => vec![("top_up", c.credit.0)],
        Some(BillingEvent::HoldRelease(_)) | None => Vec::new(),
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
            // A second table after a blank line: the provider comparison.
            match &r.provider {
                ProviderComparison::Skipped { reason } => {
                    let _ = writeln!(out, "\nprovider report: skipped ({reason})");
                }
                ProviderComparison::Compared { tokens } => {
                    out.push_str("\nday_model_class,outbox_tokens,api_calls_tokens,provider_tokens,variance_tokens\n");
                    for (k, t) in tokens {
                        let _ = writeln!(out, "{k},{},{},{},{}", t.outbox, t.api_calls, t.provider, t.variance());
                    }
                }
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
            match &r.provider {
                ProviderComparison::Skipped { reason } => {
                    let _ = writeln!(out, "provider report: skipped ({reason})");
                }
                ProviderComparison::Compared { tokens } => {
                    let _ = writeln!(
                        out,
                        "provider report (Usage and Cost API), tokens; variance = provider − api_calls:\n{:<60} {:>14} {:>14} {:>14} {:>12}",
                        "day model class", "outbox", "api_calls", "provider", "variance"
                    );
                    for (k, t) in tokens {
                        let _ = writeln!(
                            out,
                            "{k:<60} {:>14} {:>14} {:>14} {:>12}",
                            t.outbox,
                            t.api_calls,
                            t.provider,
                            signed(t.variance())
                        );
                    }
                    for m in r.provider_variances() {
                        let _ = writeln!(out, "provider variance: {m}");
                    }
                }
            }
            let _ = writeln!(out, "{}", if r.clean() { "reconcile: clean" } else { "reconcile: VARIANCE" });
            out
        }
    }
}

/// `n` with its sign (`+3`, `-3`), `0` without one.
fn signed(n: i128) -> String {
    if n == 0 {
        "0".to_owned()
    } else {
        format!("{n:+}")
    }
}

/// `(entry_id, kind, debit, credit, amount, estimated, memo)`.
type EntryRow = (i64, String, String, String, Decimal, bool, Option<String>);
/// `(kind, debit account, amount, user, job)` of a charge's entries.
type ChargeRow = (EntryKind, Account, Decimal, Option<i64>, Option<Uuid>);

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
          WHERE event_id = $1 AND kind = ANY($2)",
    )
    .bind(event)
    .bind([EntryKind::UsageCharge.as_str(), EntryKind::ToolCharge.as_str()])
    .fetch_all(db)
    .await?;
    let Some((_, account, _, user, job)) = rows.first().cloned() else {
        anyhow::bail!("event {event} has no charge to refund");
    };
    let amount: Decimal = rows.iter().map(|r| r.2).sum();
    let refund_id = Uuid::new_v5(&shared::contracts::EVENT_NAMESPACE, format!("refund:{event}").as_bytes());
    let postings = [Posting { debit: Account::REVENUE, credit: account, amount, kind: EntryKind::Refund }];
    let meta = ledger::EntryMeta {
        user_id: user,
        job_id: job,
        memo: Some(format!("refund of {event}: {reason}")),
        ..Default::default()
    };
    let payload =
        json!({ "type": ledger::REFUND_KIND, "refunds": event, "reason": reason, "amount": amount.to_string() });
    let mut tx = shared::db::begin(db).await?;
    let applied = ledger::apply_postings(&mut tx, refund_id, ledger::REFUND_KIND, &payload, &postings, &meta).await?;
    tx.commit().await?;
    Ok(match applied {
        ledger::Applied::Applied => {
            format!("refunded {} USD of {event} (refund event {refund_id})", amount.normalize())
        }
        ledger::Applied::Duplicate => format!("already refunded: {event} (refund event {refund_id})"),
    })
}
