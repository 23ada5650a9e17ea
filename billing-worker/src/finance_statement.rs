//! `statement --user ID [--from D --to D] --format table|csv|json`: every
//! ledger entry on a user's account in a period, with its event, job,
//! model and tokens, between the opening and the closing balance
//! ([`billing::statement::period`]).

use crate::finance_output::{cell, csv_text, json_text, Format};
use billing::statement::{PeriodEntry, Statement};
use serde_json::json;
use shared::money::{format_amount, format_usd};
use sqlx::PgPool;
use std::fmt::Write as _;

/// The CSV header of `statement --format csv`, one row per entry. Amounts
/// are USD, signed (credits to the user positive); `balance_usd` is the
/// balance after the entry, so the opening balance is the first row's
/// `balance_usd − amount_usd` and the closing one the last row's
/// `balance_usd`.
pub const CSV_HEADER: [&str; 18] = [
    "entry_id",
    "at",
    "event_id",
    "kind",
    "job_id",
    "model",
    "tool",
    "request_id",
    "input_tokens",
    "output_tokens",
    "cache_write_5m_tokens",
    "cache_write_1h_tokens",
    "cache_read_tokens",
    "web_search_requests",
    "estimated",
    "amount_usd",
    "balance_usd",
    "memo",
];

/// The period `[from, to]` (UTC days, inclusive) as the half-open instants
/// [`billing::statement::period`] takes.
pub fn bounds(
    from: Option<chrono::NaiveDate>,
    to: Option<chrono::NaiveDate>,
) -> (Option<chrono::DateTime<chrono::Utc>>, Option<chrono::DateTime<chrono::Utc>>) {
    let start = |d: chrono::NaiveDate| d.and_time(chrono::NaiveTime::MIN).and_utc();
    (from.map(start), to.and_then(|d| d.succ_opt()).map(start))
}

/// `user`'s statement for `[from, to]` rendered as `format`.
///
/// JSON: `{"user_id", "from", "to", "opening_usd", "closing_usd",
/// "credits_usd", "debits_usd", "entries": [{"entry_id", "at", "event_id",
/// "kind", "job_id", "model", "tool", "request_id", "tokens": {"input",
/// "output", "cache_write_5m", "cache_write_1h", "cache_read",
/// "web_search_requests"} | null, "estimated", "amount_usd", "balance_usd",
/// "memo"}]}`; amounts are strings (exact, two decimals at least), days
/// `null` when open.
///
/// # Errors
/// Database errors; `--from` after `--to`.
pub async fn statement(
    db: &PgPool,
    user: i64,
    from: Option<chrono::NaiveDate>,
    to: Option<chrono::NaiveDate>,
    format: Format,
) -> anyhow::Result<String> {
    if let (Some(f), Some(t)) = (from, to) {
        if f > t {
            anyhow::bail!("--from {f} is after --to {t}");
        }
    }
    let (start, until) = bounds(from, to);
    let s = billing::statement::period(db, user, start, until).await?;
    match format {
        Format::Table => Ok(table(&s, from, to)),
        Format::Csv => csv_text(&CSV_HEADER, s.entries.iter().map(csv_row)),
        Format::Json => json_text(&to_json(&s, from, to)),
    }
}

fn csv_row(e: &PeriodEntry) -> Vec<String> {
    let t = e.tokens;
    vec![
        e.entry_id.to_string(),
        e.at.to_rfc3339(),
        e.event_id.to_string(),
        e.kind.to_string(),
        cell(e.job_id),
        cell(e.model.clone()),
        cell(e.tool.clone()),
        cell(e.request_id.clone()),
        cell(t.map(|t| t.input)),
        cell(t.map(|t| t.output)),
        cell(t.map(|t| t.cache_write_5m)),
        cell(t.map(|t| t.cache_write_1h)),
        cell(t.map(|t| t.cache_read)),
        cell(t.map(|t| t.web_search_requests)),
        e.estimated.to_string(),
        format_amount(e.amount),
        format_amount(e.balance),
        cell(e.memo.clone()),
    ]
}

fn to_json(s: &Statement, from: Option<chrono::NaiveDate>, to: Option<chrono::NaiveDate>) -> serde_json::Value {
    let entries: Vec<serde_json::Value> = s
        .entries
        .iter()
        .map(|e| {
            json!({
                "entry_id": e.entry_id,
                "at": e.at.to_rfc3339(),
                "event_id": e.event_id,
                "kind": e.kind.as_str(),
                "job_id": e.job_id,
                "model": e.model,
                "tool": e.tool,
                "request_id": e.request_id,
                "tokens": e.tokens.map(|t| json!({
                    "input": t.input,
                    "output": t.output,
                    "cache_write_5m": t.cache_write_5m,
                    "cache_write_1h": t.cache_write_1h,
                    "cache_read": t.cache_read,
                    "web_search_requests": t.web_search_requests,
                })),
                "estimated": e.estimated,
                "amount_usd": format_amount(e.amount),
                "balance_usd": format_amount(e.balance),
                "memo": e.memo,
            })
        })
        .collect();
    json!({
        "user_id": s.user_id,
        "from": from.map(|d| d.to_string()),
        "to": to.map(|d| d.to_string()),
        "opening_usd": format_amount(s.opening),
        "closing_usd": format_amount(s.closing),
        "credits_usd": format_amount(s.credits()),
        "debits_usd": format_amount(s.debits()),
        "entries": entries,
    })
}

fn table(s: &Statement, from: Option<chrono::NaiveDate>, to: Option<chrono::NaiveDate>) -> String {
    let day = |d: Option<chrono::NaiveDate>, open: &str| d.map_or_else(|| open.to_owned(), |d| d.to_string());
    let mut out = format!(
        "statement of user {} from {} to {} (UTC days)\n",
        s.user_id,
        day(from, "the first entry"),
        day(to, "the latest entry")
    );
    let _ = writeln!(out, "opening balance {}", format_usd(s.opening));
    let _ = writeln!(
        out,
        "{:<20} {:<36} {:<12} {:>14} {:>14}  {:<36} details",
        "at (UTC)", "event", "kind", "amount", "balance", "job"
    );
    for e in &s.entries {
        let mut details = Vec::new();
        if let Some(m) = &e.model {
            details.push(m.clone());
        }
        if let Some(t) = &e.tool {
            details.push(format!("tool {t}"));
        }
        if let Some(t) = e.tokens {
            details.push(format!(
                "{} in, {} out, {} cache write, {} cache read, {} web searches",
                t.input,
                t.output,
                t.cache_write_5m.saturating_add(t.cache_write_1h),
                t.cache_read,
                t.web_search_requests
            ));
        }
        if e.estimated {
            details.push("output estimated".into());
        }
        if e.model.is_none() && e.tool.is_none() {
            if let Some(m) = &e.memo {
                details.push(m.clone());
            }
        }
        let _ = writeln!(
            out,
            "{:<20} {:<36} {:<12} {:>14} {:>14}  {:<36} {}",
            e.at.format("%Y-%m-%d %H:%M:%S"),
            e.event_id,
            e.kind.as_str(),
            format_usd(e.amount),
            format_usd(e.balance),
            cell(e.job_id),
            details.join("; ")
        );
    }
    let _ = writeln!(
        out,
        "{} entr{}: credits {}, debits {}",
        s.entries.len(),
        if s.entries.len() == 1 { "y" } else { "ies" },
        format_usd(s.credits()),
        format_usd(s.debits())
    );
    let _ = writeln!(out, "closing balance {}", format_usd(s.closing));
    out
}
