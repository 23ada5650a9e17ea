//! Finance commands: dead letters (redrive; list and discard in
//! [`crate::finance_dead_letters`]), reconciliation of the
//! outbox against the ledger with the ledger's invariants (and, with an
//! admin key, of our token counts against the provider's usage report), one
//! charge's trace, and refunds as correcting entries (DESIGN §7a).

use crate::bot_db::DailyTokens;
use crate::finance_output::{csv_text, json_text, Format};
use crate::ledger::{self, Posting};
use crate::provider::{token_classes, ProviderTotals, UsageReportClient};
use billing::{Account, EntryKind};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use shared::amqp::{ConfirmPublisher, Outgoing, Topology, BILLING_ROUTING_KEY};
use shared::contracts::BillingEvent;
use shared::money::{format_amount, format_usd};
use sqlx::PgPool;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use uuid::Uuid;

/// Re-publishes the payload of one (or every) unresolved failure to the
/// billing exchange; returns how many. The billing-worker marks each
/// resolved when it applies.
///
/// # Errors
/// Database or broker errors; an event without a stored payload; a
/// discarded event.
pub async fn redrive(
    db: &PgPool,
    publisher: &ConfirmPublisher,
    topology: &Topology,
    event: Option<Uuid>,
) -> anyhow::Result<usize> {
    let rows: Vec<(Uuid, Option<Value>)> = match event {
        Some(id) => {
            let discarded: Option<String> = sqlx::query_scalar(
                "SELECT discard_reason FROM billing_failures WHERE event_id = $1 AND discarded_at IS NOT NULL",
            )
            .bind(id)
            .fetch_optional(db)
            .await?
            .flatten();
            if let Some(reason) = discarded {
                anyhow::bail!("event {id} was discarded ({reason}); it is not redriven");
            }
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
#[derive(Debug, Default)]
pub struct Reconciliation {
    /// First day compared (UTC), inclusive.
    pub from: chrono::NaiveDate,
    /// Last day compared (UTC), inclusive.
    pub to: chrono::NaiveDate,
    /// Totals per `"{day} {model} {class}"` ([`split_key`]): `(outbox,
    /// ledger)` in USD.
    pub totals: BTreeMap<String, (Decimal, Decimal)>,
    /// Events in the outbox but not applied to the ledger.
    pub missing_in_ledger: Vec<String>,
    /// Events in the outbox whose dead letter finance discarded, with the
    /// reason (`dead-letters discard`): not applied, not in the totals, not
    /// a variance.
    pub discarded: Vec<String>,
    /// Events applied to the ledger with no outbox row.
    pub missing_in_outbox: Vec<String>,
    /// Broken invariants.
    pub invariant_failures: Vec<String>,
    /// User accounts whose balance is below zero at the time of the run
    /// (an invariant: a user never owes us; holds refuse answers that the
    /// balance does not cover), by account id.
    pub negative_balances: Vec<NegativeBalance>,
    /// Our token counts against the provider's usage report.
    pub provider: ProviderComparison,
}

/// A user account below zero.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NegativeBalance {
    /// The user.
    pub user_id: i64,
    /// The account id (`user:<id>`).
    pub account: String,
    /// Its balance, USD (< 0).
    pub balance: Decimal,
}

impl std::fmt::Display for NegativeBalance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (user {}): balance {}", self.account, self.user_id, format_usd(self.balance))
    }
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
            && self.negative_balances.is_empty()
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

    /// `(outbox, ledger)` USD per class, summed over days and models.
    pub fn class_totals(&self) -> BTreeMap<String, (Decimal, Decimal)> {
        let mut totals: BTreeMap<String, (Decimal, Decimal)> = BTreeMap::new();
        for (k, (outbox, ledger)) in &self.totals {
            let t = totals.entry(split_key(k).2.to_owned()).or_default();
            t.0 += outbox;
            t.1 += ledger;
        }
        totals
    }

    /// Sum of |outbox − ledger| over the rows, USD: 0 exactly when every
    /// row matches.
    pub fn usd_variance(&self) -> Decimal {
        self.totals.values().map(|(a, b)| (a - b).abs()).sum()
    }

    /// Sum of |provider − api_calls| over the provider rows, tokens (0
    /// without a report).
    pub fn token_variance(&self) -> u128 {
        let ProviderComparison::Compared { tokens } = &self.provider else { return 0 };
        tokens.values().map(|t| t.variance().unsigned_abs()).sum()
    }

    /// Every finding, one line each (missing events with their drill-down,
    /// broken invariants, provider variances), for where the output format
    /// has no place for them (CSV).
    pub fn findings(&self) -> Vec<String> {
        let mut lines = Vec::new();
        lines.extend(self.missing_in_ledger.iter().map(|m| format!("missing in ledger: {m}")));
        lines.extend(self.missing_in_outbox.iter().map(|m| format!("missing in outbox: {m}")));
        lines.extend(self.discarded.iter().map(|m| format!("discarded dead letter: {m}")));
        lines.extend(self.invariant_failures.iter().map(|m| format!("invariant: {m}")));
        lines.extend(self.negative_balances.iter().map(|n| format!("negative balance: {n}")));
        lines.extend(self.provider_variances().into_iter().map(|m| format!("provider variance: {m}")));
        lines
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
        if !self.negative_balances.is_empty() {
            parts.push(format!("{} user balance(s) below zero", self.negative_balances.len()));
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
/// entries; no negative amount; no user balance below zero, now, whatever
/// the period).
///
/// # Errors
/// Database errors.
pub async fn reconcile(
    bot: &PgPool,
    billing: &PgPool,
    from: chrono::NaiveDate,
    to: chrono::NaiveDate,
) -> Result<Reconciliation, sqlx::Error> {
    let mut r = Reconciliation { from, to, ..Reconciliation::default() };
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
    // Dead letters finance discarded with a reason: accounted for, not a variance.
    let discarded: BTreeMap<Uuid, String> = sqlx::query_as::<_, (Uuid, String)>(
        "SELECT event_id, discard_reason FROM billing_failures WHERE discarded_at IS NOT NULL",
    )
    .fetch_all(billing)
    .await?
    .into_iter()
    .collect();
    for o in &outbox {
        if let (false, Some(reason)) = (applied_ids.contains_key(&o.event_id), discarded.get(&o.event_id)) {
            r.discarded.push(format!("{} (discarded: {reason})", drill_down(o.event_id, &o.payload)));
            continue;
        }
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
    r.negative_balances = negative_balances(billing).await?;
    Ok(r)
}

/// User accounts below zero, by account id.
///
/// # Errors
/// Database errors.
pub async fn negative_balances(billing: &PgPool) -> Result<Vec<NegativeBalance>, sqlx::Error> {
    let rows: Vec<(String, Option<i64>, Decimal)> = sqlx::query_as(
        "SELECT account_id, user_id, balance FROM accounts WHERE kind = 'user' AND balance < 0 ORDER BY account_id",
    )
    .fetch_all(billing)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(account, user_id, balance)| NegativeBalance { user_id: user_id.unwrap_or_default(), account, balance })
        .collect())
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

/// `"{day} {model} {class}"` split into its parts (the model between the
/// first and the last space).
pub fn split_key(key: &str) -> (&str, &str, &str) {
    let (day, rest) = key.split_once(' ').unwrap_or((key, ""));
    let (model, class) = rest.rsplit_once(' ').unwrap_or(("", rest));
    (day, model, class)
}

/// The CSV header of `reconcile --format csv`: one row per day, model, class
/// and unit. `usd` rows fill `outbox`, `ledger` and `variance` (outbox −
/// ledger); `tokens` rows (with the provider report) fill `outbox`,
/// `api_calls`, `provider` and `variance` (provider − api_calls).
pub const RECONCILE_CSV_HEADER: [&str; 9] =
    ["day", "model", "class", "unit", "outbox", "ledger", "api_calls", "provider", "variance"];

/// Renders a reconciliation: a table (rows, totals by class, findings,
/// `reconcile: clean` or `reconcile: VARIANCE`), CSV (the rows only, see
/// [`RECONCILE_CSV_HEADER`]; the findings go to the exit error) or JSON
/// ([`to_json`]).
///
/// # Errors
/// Only from the CSV writer (none expected).
pub fn render(r: &Reconciliation, format: Format) -> anyhow::Result<String> {
    match format {
        Format::Table => Ok(render_table(r)),
        Format::Csv => render_csv(r),
        Format::Json => json_text(&to_json(r)),
    }
}

fn render_csv(r: &Reconciliation) -> anyhow::Result<String> {
    let mut rows: Vec<Vec<String>> = Vec::new();
    for (k, (outbox, ledger)) in &r.totals {
        let (day, model, class) = split_key(k);
        rows.push(vec![
            day.into(),
            model.into(),
            class.into(),
            "usd".into(),
            format_amount(*outbox),
            format_amount(*ledger),
            String::new(),
            String::new(),
            format_amount(outbox - ledger),
        ]);
    }
    if let ProviderComparison::Compared { tokens } = &r.provider {
        for (k, t) in tokens {
            let (day, model, class) = split_key(k);
            rows.push(vec![
                day.into(),
                model.into(),
                class.into(),
                "tokens".into(),
                t.outbox.to_string(),
                String::new(),
                t.api_calls.to_string(),
                t.provider.to_string(),
                t.variance().to_string(),
            ]);
        }
    }
    csv_text(&RECONCILE_CSV_HEADER, rows)
}

/// The JSON document of `reconcile --format json`:
///
/// ```json
/// { "from": "2026-11-01", "to": "2026-11-30", "clean": true,
///   "variance": { "usd": "0.00", "tokens": 0, "missing_in_ledger": 0,
///                 "missing_in_outbox": 0, "invariant_failures": 0, "negative_balances": 0 },
///   "totals": [ { "class": "user_charge", "outbox_usd": "0.045",
///                 "ledger_usd": "0.045", "variance_usd": "0.00" } ],
///   "rows": [ { "day": "2026-11-30", "model": "…", "class": "user_charge",
///               "outbox_usd": "0.045", "ledger_usd": "0.045", "variance_usd": "0.00" } ],
///   "missing_in_ledger": ["event … type=… update_id=… job=…"], "missing_in_outbox": [],
///   "discarded": ["event … (discarded: <reason>)"], "invariant_failures": [],
///   "negative_balances": [ { "user_id": 7, "account": "user:7", "balance_usd": "-0.01" } ],
///   "provider": { "status": "skipped", "reason": "…" } }
/// ```
///
/// Amounts are strings (exact decimals, two places at least); `variance.usd`
/// is the sum of |outbox − ledger| over the rows and `variance.tokens` of
/// |provider − api_calls|, so both are 0 exactly when the sides match;
/// `provider` is `{"status": "compared", "tokens": {"<day> <model> <class>":
/// {"outbox", "api_calls", "provider", "variance"}}}` with a report.
pub fn to_json(r: &Reconciliation) -> Value {
    let usd = |d: Decimal| Value::String(format_amount(d));
    let rows: Vec<Value> = r
        .totals
        .iter()
        .map(|(k, (outbox, ledger))| {
            let (day, model, class) = split_key(k);
            json!({
                "day": day, "model": model, "class": class,
                "outbox_usd": usd(*outbox), "ledger_usd": usd(*ledger), "variance_usd": usd(outbox - ledger),
            })
        })
        .collect();
    let totals: Vec<Value> = r
        .class_totals()
        .into_iter()
        .map(|(class, (outbox, ledger))| {
            json!({ "class": class, "outbox_usd": usd(outbox), "ledger_usd": usd(ledger), "variance_usd": usd(outbox - ledger) })
        })
        .collect();
    json!({
        "from": r.from.to_string(),
        "to": r.to.to_string(),
        "clean": r.clean(),
        "variance": {
            "usd": usd(r.usd_variance()),
            "tokens": r.token_variance(),
            "missing_in_ledger": r.missing_in_ledger.len(),
            "missing_in_outbox": r.missing_in_outbox.len(),
            "invariant_failures": r.invariant_failures.len(),
            "negative_balances": r.negative_balances.len(),
        },
        "totals": totals,
        "rows": rows,
        "missing_in_ledger": r.missing_in_ledger,
        "missing_in_outbox": r.missing_in_outbox,
        "discarded": r.discarded,
        "invariant_failures": r.invariant_failures,
        "negative_balances": r.negative_balances.iter().map(|n| json!({
            "user_id": n.user_id, "account": n.account, "balance_usd": usd(n.balance),
        })).collect::<Vec<Value>>(),
        "provider": serde_json::to_value(&r.provider).unwrap_or(Value::Null),
    })
}

fn render_table(r: &Reconciliation) -> String {
    let mut out = format!("reconcile {} to {} (UTC days)\n", r.from, r.to);
    let _ = writeln!(out, "{:<56} {:>14} {:>14} {:>12}", "day model class", "outbox USD", "ledger USD", "variance");
    for (k, (a, b)) in &r.totals {
        let _ = writeln!(out, "{k:<56} {:>14} {:>14} {:>12}", format_usd(*a), format_usd(*b), format_usd(a - b));
    }
    for (class, (a, b)) in r.class_totals() {
        let label = format!("total {class}");
        let _ = writeln!(out, "{label:<56} {:>14} {:>14} {:>12}", format_usd(a), format_usd(b), format_usd(a - b));
    }
    for m in &r.missing_in_ledger {
        let _ = writeln!(out, "missing in ledger: {m}");
    }
    for m in &r.missing_in_outbox {
        let _ = writeln!(out, "missing in outbox: {m}");
    }
    for m in &r.discarded {
        let _ = writeln!(out, "discarded dead letter: {m}");
    }
    for m in &r.invariant_failures {
        let _ = writeln!(out, "invariant: {m}");
    }
    for n in &r.negative_balances {
        let _ = writeln!(out, "negative balance: {n}");
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
    let _ = writeln!(
        out,
        "variance: {} USD, {} tokens, {} event(s) missing in the ledger, {} missing in the outbox, {} broken invariant(s)",
        format_usd(r.usd_variance()),
        r.token_variance(),
        r.missing_in_ledger.len(),
        r.missing_in_outbox.len(),
        r.invariant_failures.len()
    );
    let _ = writeln!(out, "{}", if r.clean() { "reconcile: clean" } else { "reconcile: VARIANCE" });
    out
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
            "entry {id}: {kind} {} {debit} → {credit}{est} {}",
            format_usd(amount),
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
            format!("refunded {} of {event} (refund event {refund_id})", format_usd(amount))
        }
        ledger::Applied::Duplicate => format!("already refunded: {event} (refund event {refund_id})"),
    })
}
