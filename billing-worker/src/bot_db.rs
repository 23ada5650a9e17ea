//! The bot database as reconciliation reads it (DESIGN §7a): the outbox's
//! events, decoded as [`BillingEvent`] in Rust, and the `api_calls` token
//! totals. The only statements of this crate on `billing_outbox` and
//! `api_calls` (SELECT is all the `fleet_billing` role may do there,
//! `migrations/bot/20261130900001_roles.sql`); no JSON path and no event tag
//! appears in their SQL.

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::Value;
use shared::contracts::BillingEvent;
use shared::pricing::TokenCounts;
use sqlx::PgPool;
use std::collections::BTreeMap;
use uuid::Uuid;

/// Token counts per `(UTC day, model)`.
pub type DailyTokens = BTreeMap<(NaiveDate, String), TokenCounts>;

/// One row of `billing_outbox`.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    /// The event's id (its idempotency key in the ledger).
    pub event_id: Uuid,
    /// When the worker wrote it.
    pub created_at: DateTime<Utc>,
    /// The event as stored, for drill-down.
    pub payload: Value,
    /// The event decoded; `None` when the payload is no [`BillingEvent`]
    /// this build knows (the ledger cannot have applied it either).
    pub event: Option<BillingEvent>,
}

fn decode(event_id: Uuid, created_at: DateTime<Utc>, payload: Value) -> OutboxRow {
    let event = match serde_json::from_value::<BillingEvent>(payload.clone()) {
        Ok(e) => Some(e),
        Err(e) => {
            tracing::warn!(%event_id, error.message = %e, "outbox event that is no known billing event");
            None
        }
    };
    OutboxRow { event_id, created_at, payload, event }
}

/// The outbox events created on `[from, to]` (dates in the session's time
/// zone, as `reconcile` has always compared them).
///
/// # Errors
/// Database errors.
pub async fn outbox_between(bot: &PgPool, from: NaiveDate, to: NaiveDate) -> Result<Vec<OutboxRow>, sqlx::Error> {
    let rows: Vec<(Uuid, Value, DateTime<Utc>)> = sqlx::query_as(
        "SELECT event_id, payload, created_at FROM billing_outbox WHERE created_at::date BETWEEN $1 AND $2",
    )
    .bind(from)
    .bind(to)
    .fetch_all(bot)
    .await?;
    Ok(rows.into_iter().map(|(id, payload, at)| decode(id, at, payload)).collect())
}

/// The tokens of the outbox's usage charges (abandoned calls included) per
/// UTC day of the row's `created_at` and model, for `[from, to]`.
///
/// # Errors
/// Database errors.
pub async fn outbox_usage_tokens(bot: &PgPool, from: NaiveDate, to: NaiveDate) -> Result<DailyTokens, sqlx::Error> {
    let rows: Vec<(Uuid, Value, DateTime<Utc>)> = sqlx::query_as(
        "SELECT event_id, payload, created_at FROM billing_outbox
          WHERE (created_at AT TIME ZONE 'UTC')::date BETWEEN $1 AND $2",
    )
    .bind(from)
    .bind(to)
    .fetch_all(bot)
    .await?;
    let mut out = DailyTokens::new();
    for (id, payload, at) in rows {
        if let Some(BillingEvent::UsageCharge(c)) = decode(id, at, payload).event {
            add(out.entry((at.date_naive(), c.model)).or_default(), &c.tokens);
        }
    }
    Ok(out)
}

/// The tokens of every recorded Messages API call (`api_calls`) per UTC day
/// of its `created_at` and model, for `[from, to]`.
///
/// # Errors
/// Database errors.
pub async fn api_call_tokens(bot: &PgPool, from: NaiveDate, to: NaiveDate) -> Result<DailyTokens, sqlx::Error> {
    /// `(day, model, input, output, cache_write_5m, cache_write_1h, cache_read, web_search_requests)`.
    type Row = (NaiveDate, String, i64, i64, i64, i64, i64, i64);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT (created_at AT TIME ZONE 'UTC')::date, model,
                sum(input_tokens)::bigint, sum(output_tokens)::bigint, sum(cache_write_5m)::bigint,
                sum(cache_write_1h)::bigint, sum(cache_read)::bigint, sum(web_search_requests)::bigint
           FROM api_calls
          WHERE (created_at AT TIME ZONE 'UTC')::date BETWEEN $1 AND $2
          GROUP BY 1, 2",
    )
    .bind(from)
    .bind(to)
    .fetch_all(bot)
    .await?;
    // A negative sum (never written) counts 0, as before.
    let n = |v: i64| u64::try_from(v).unwrap_or(0);
    Ok(rows
        .into_iter()
        .map(|(day, model, input, output, w5m, w1h, read, search)| {
            let counts = TokenCounts {
                input: n(input),
                output: n(output),
                cache_write_5m: n(w5m),
                cache_write_1h: n(w1h),
                cache_read: n(read),
                web_search_requests: n(search),
            };
            ((day, model), counts)
        })
        .collect())
}

/// Adds `b` to `a`, class by class (saturating: a count past `u64` is no
/// real usage).
fn add(a: &mut TokenCounts, b: &TokenCounts) {
    a.input = a.input.saturating_add(b.input);
    a.output = a.output.saturating_add(b.output);
    a.cache_write_5m = a.cache_write_5m.saturating_add(b.cache_write_5m);
    a.cache_write_1h = a.cache_write_1h.saturating_add(b.cache_write_1h);
    a.cache_read = a.cache_read.saturating_add(b.cache_read);
    a.web_search_requests = a.web_search_requests.saturating_add(b.web_search_requests);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_that_is_no_known_event_is_kept_undecoded_not_dropped() {
        let payload = serde_json::json!({ "type": "usage_charge.v2", "user_id": 1 });
        let row = decode(Uuid::nil(), Utc::now(), payload.clone());
        assert!(row.event.is_none());
        assert_eq!(row.payload, payload);
    }

    #[test]
    fn token_counts_add_class_by_class_and_saturate() {
        let mut a = TokenCounts { input: 1, output: u64::MAX, ..TokenCounts::default() };
        add(&mut a, &TokenCounts { input: 2, output: 5, cache_read: 7, ..TokenCounts::default() });
        assert_eq!(a, TokenCounts { input: 3, output: u64::MAX, cache_read: 7, ..TokenCounts::default() });
    }

    /// Issue 14: no serde tag and no JSON path in the SQL of the billing
    /// crates (tags are bound from `BillingEvent::kind`). Needles split so
    /// this file does not find itself.
    #[test]
    fn no_sql_of_the_billing_crates_spells_an_event_tag_or_a_json_path() {
        let needles = [concat!(".v1", "'"), concat!("payload", "->"), concat!("'usage", "_charge")];
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut found = Vec::new();
        for dir in [root.join("src"), root.join("../billing/src")] {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let text = std::fs::read_to_string(&path).unwrap();
                for (i, line) in text.lines().enumerate() {
                    if needles.iter().any(|n| line.contains(n)) {
                        found.push(format!("{}:{}: {line}", path.display(), i + 1));
                    }
                }
            }
        }
        assert!(found.is_empty(), "{}", found.join("\n"));
    }
}
