//! `dead-letters list` and `dead-letters discard`: dead-lettered billing
//! events by event id (the id `reconcile` reports as missing in the
//! ledger), and their discard with a reason ([`billing::failures`]).

use crate::finance_output::{cell, csv_text, json_text, Format};
use billing::failures::{self, Discarded, Failure};
use serde_json::json;
use sqlx::PgPool;
use std::fmt::Write as _;
use uuid::Uuid;

/// The CSV header of `dead-letters list --format csv`, one row per dead letter.
pub const CSV_HEADER: [&str; 13] = [
    "event_id",
    "status",
    "type",
    "user_id",
    "job_id",
    "update_id",
    "lease_epoch",
    "attempts",
    "dead_lettered_at",
    "last_error",
    "discarded_at",
    "discard_reason",
    "payload_stored",
];

/// Pending dead letters (with `all`, also applied and discarded ones),
/// oldest first, rendered as `format`. JSON: `{"pending": n, "dead_letters":
/// [{"event_id", "status", "type", "user_id", "job_id", "update_id",
/// "lease_epoch", "attempts", "dead_lettered_at", "last_error",
/// "discarded_at", "discard_reason", "payload_stored"}]}` (absent values
/// `null`; ids and types as strings, numbers as numbers).
///
/// # Errors
/// Database errors.
pub async fn list(db: &PgPool, all: bool, format: Format) -> anyhow::Result<String> {
    let rows = failures::list(db, all).await?;
    let pending = rows.iter().filter(|f| f.status == failures::FailureStatus::Pending).count();
    match format {
        Format::Table => {
            let mut out = format!("{pending} pending dead letter(s)\n");
            for f in &rows {
                let _ = write!(
                    out,
                    "{}  {}  type={} user={} job={} attempts={} dead_lettered_at={} error={}",
                    f.event_id,
                    f.status.as_str(),
                    f.field("type").unwrap_or_else(|| "-".into()),
                    f.field("user_id").unwrap_or_else(|| "-".into()),
                    f.field("job_id").unwrap_or_else(|| "-".into()),
                    f.attempts,
                    cell(f.dead_lettered_at.map(|t| t.to_rfc3339())),
                    f.last_error
                );
                if let Some(reason) = &f.discard_reason {
                    let _ = write!(out, " discarded: {reason}");
                }
                out.push('\n');
            }
            Ok(out)
        }
        Format::Csv => csv_text(&CSV_HEADER, rows.iter().map(csv_row)),
        Format::Json => {
            let items: Vec<serde_json::Value> = rows.iter().map(json_row).collect();
            json_text(&json!({ "pending": pending, "dead_letters": items }))
        }
    }
}

fn csv_row(f: &Failure) -> Vec<String> {
    vec![
        f.event_id.to_string(),
        f.status.as_str().to_owned(),
        cell(f.field("type")),
        cell(f.field("user_id")),
        cell(f.field("job_id")),
        cell(f.field("update_id")),
        cell(f.field("lease_epoch")),
        f.attempts.to_string(),
        cell(f.dead_lettered_at.map(|t| t.to_rfc3339())),
        f.last_error.clone(),
        cell(f.discarded_at.map(|t| t.to_rfc3339())),
        cell(f.discard_reason.clone()),
        f.payload.is_some().to_string(),
    ]
}

fn json_row(f: &Failure) -> serde_json::Value {
    let num = |k: &str| f.payload.as_ref().and_then(|p| p.get(k)).and_then(serde_json::Value::as_i64);
    json!({
        "event_id": f.event_id,
        "status": f.status.as_str(),
        "type": f.field("type"),
        "user_id": num("user_id"),
        "job_id": f.field("job_id"),
        "update_id": num("update_id"),
        "lease_epoch": num("lease_epoch"),
        "attempts": f.attempts,
        "dead_lettered_at": f.dead_lettered_at.map(|t| t.to_rfc3339()),
        "last_error": f.last_error,
        "discarded_at": f.discarded_at.map(|t| t.to_rfc3339()),
        "discard_reason": f.discard_reason,
        "payload_stored": f.payload.is_some(),
    })
}

/// Discards the pending dead letter `id` with `reason`; one line saying so
/// (or that it had been discarded before, with the reason given then).
///
/// # Errors
/// An unknown id, an event already applied, an empty reason; database errors.
pub async fn discard(db: &PgPool, id: Uuid, reason: &str) -> anyhow::Result<String> {
    Ok(match failures::discard(db, id, reason).await? {
        Discarded::Now => format!("discarded: {id} ({})", reason.trim()),
        Discarded::Before { at, reason } => {
            format!("already discarded: {id} at {} ({reason})", at.to_rfc3339())
        }
    })
}
