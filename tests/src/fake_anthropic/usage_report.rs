//! `GET /v1/organizations/usage_report/messages` of the Admin API (docs:
//! "Usage and Cost API", "Get Messages Usage Report"), answered from the
//! usage of the calls the fake served (bucketed by the time each call was
//! received, UTC) plus the rows tests add.
//!
//! Query parameters understood: `starting_at` (RFC 3339, required; snapped
//! to the start of its bucket), `ending_at` (RFC 3339; buckets that end at
//! or before it; default: up to the bucket holding now), `bucket_width`
//! (`1d` default, `1h`, `1m`), `group_by[]` (`model` groups by model; other
//! values are accepted and leave their field `null`), `models[]` (filter),
//! `limit` (buckets per page: `1d` default 7, max 31; `1h` default 24, max
//! 168; `1m` default 60, max 1440) and `page` (the `next_page` token of the
//! previous page). Every bucket of the range is listed, with an empty
//! `results` when nothing was used. Requests without `x-api-key` get 401.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{json, Value};
use shared::pricing::TokenCounts;

use super::handlers::{request_id, ApiError};
use super::Shared;

/// Bucket width of the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Width {
    Minute,
    Hour,
    Day,
}

impl Width {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "1m" => Some(Self::Minute),
            "1h" => Some(Self::Hour),
            "1d" => Some(Self::Day),
            _ => None,
        }
    }

    /// Length of a bucket, seconds.
    fn seconds(self) -> i64 {
        match self {
            Self::Minute => 60,
            Self::Hour => 3_600,
            Self::Day => 86_400,
        }
    }

    fn delta(self) -> TimeDelta {
        TimeDelta::seconds(self.seconds())
    }

    /// `(default, max)` buckets per page, as documented.
    fn limits(self) -> (usize, usize) {
        match self {
            Self::Minute => (60, 1_440),
            Self::Hour => (24, 168),
            Self::Day => (7, 31),
        }
    }

    /// The start of the bucket holding `t`.
    fn snap(self, t: DateTime<Utc>) -> DateTime<Utc> {
        let secs = t.timestamp();
        DateTime::from_timestamp(secs - secs.rem_euclid(self.seconds()), 0).unwrap_or(t)
    }
}

/// A parsed, validated query.
struct Query {
    starting_at: DateTime<Utc>,
    ending_at: Option<DateTime<Utc>>,
    width: Width,
    group_by_model: bool,
    models: Vec<String>,
    limit: usize,
    page: Option<DateTime<Utc>>,
}

fn rfc3339(name: &str, value: &str) -> Result<DateTime<Utc>, ApiError> {
    DateTime::parse_from_rfc3339(value)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| ApiError::new(400, format!("{name}: invalid RFC 3339 timestamp {value:?}: {e}")))
}

/// The `next_page` token of a page that continues at `start`.
fn page_token(start: DateTime<Utc>) -> String {
    format!("page_{}", start.timestamp())
}

impl Query {
    fn parse(raw: &str) -> Result<Self, ApiError> {
        let mut starting_at = None;
        let mut ending_at = None;
        let mut width = Width::Day;
        let mut group_by_model = false;
        let mut models = Vec::new();
        let mut limit = None;
        let mut page = None;
        for (key, value) in form_urlencoded::parse(raw.as_bytes()) {
            match key.as_ref() {
                "starting_at" => starting_at = Some(rfc3339("starting_at", &value)?),
                "ending_at" => ending_at = Some(rfc3339("ending_at", &value)?),
                "bucket_width" => {
                    width = Width::parse(&value)
                        .ok_or_else(|| ApiError::new(400, format!("bucket_width: unknown value {value:?}")))?;
                }
                "group_by[]" | "group_by" => group_by_model |= value == "model",
                "models[]" | "models" => models.push(value.into_owned()),
                "limit" => {
                    let n = value.parse::<usize>().map_err(|_| ApiError::new(400, "limit: not a number"))?;
                    limit = Some(n);
                }
                "page" => {
                    let start = value
                        .strip_prefix("page_")
                        .and_then(|s| s.parse::<i64>().ok())
                        .and_then(|s| DateTime::from_timestamp(s, 0))
                        .ok_or_else(|| ApiError::new(400, format!("page: invalid token {value:?}")))?;
                    page = Some(start);
                }
                _ => {}
            }
        }
        let starting_at = starting_at.ok_or_else(|| ApiError::new(400, "starting_at: field required"))?;
        if ending_at.is_some_and(|end| end <= starting_at) {
            return Err(ApiError::new(400, "ending_at must be after starting_at"));
        }
        let (default_limit, max_limit) = width.limits();
        let limit = limit.unwrap_or(default_limit);
        if limit == 0 || limit > max_limit {
            return Err(ApiError::new(400, format!("limit: must be between 1 and {max_limit} for this bucket_width")));
        }
        Ok(Self { starting_at, ending_at, width, group_by_model, models, limit, page })
    }
}

/// `GET /v1/organizations/usage_report/messages`: one page of buckets.
pub(super) async fn messages_usage_report(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let request_id = request_id();
    if headers.get("x-api-key").is_none_or(|key| key.as_bytes().is_empty()) {
        return ApiError::new(401, "x-api-key header is required").into_response(request_id);
    }
    let query = match Query::parse(raw.as_deref().unwrap_or_default()) {
        Ok(query) => query,
        Err(error) => return error.into_response(request_id),
    };
    let usage = shared.report_usage();
    let width = query.width.delta();
    let end = query.ending_at.unwrap_or_else(|| query.width.snap(Utc::now()) + width);
    let mut start = query.page.unwrap_or_else(|| query.width.snap(query.starting_at));
    let mut data = Vec::new();
    while start + width <= end && data.len() < query.limit {
        let bucket_end = start + width;
        // model (None when not grouped) → tokens.
        let mut rows: BTreeMap<Option<&str>, TokenCounts> = BTreeMap::new();
        for row in usage.iter().filter(|u| u.at >= start && u.at < bucket_end) {
            if !query.models.is_empty() && !query.models.contains(&row.model) {
                continue;
            }
            let key = query.group_by_model.then_some(row.model.as_str());
            add(rows.entry(key).or_default(), &row.tokens);
        }
        let results: Vec<Value> = rows.into_iter().map(|(model, tokens)| result_row(model, &tokens)).collect();
        data.push(json!({
            "starting_at": start.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "ending_at": bucket_end.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "results": results,
        }));
        start = bucket_end;
    }
    let has_more = start + width <= end;
    let next_page = has_more.then(|| page_token(start));
    let body = json!({ "data": data, "has_more": has_more, "next_page": next_page });
    ([("request-id", request_id)], Json(body)).into_response()
}

fn add(total: &mut TokenCounts, t: &TokenCounts) {
    total.input += t.input;
    total.output += t.output;
    total.cache_write_5m += t.cache_write_5m;
    total.cache_write_1h += t.cache_write_1h;
    total.cache_read += t.cache_read;
    total.web_search_requests += t.web_search_requests;
}

/// One entry of a bucket's `results`, in the documented shape.
fn result_row(model: Option<&str>, t: &TokenCounts) -> Value {
    json!({
        "uncached_input_tokens": t.input,
        "cache_creation": {
            "ephemeral_1h_input_tokens": t.cache_write_1h,
            "ephemeral_5m_input_tokens": t.cache_write_5m,
        },
        "cache_read_input_tokens": t.cache_read,
        "output_tokens": t.output,
        "server_tool_use": { "web_search_requests": t.web_search_requests },
        "api_key_id": null,
        "workspace_id": null,
        "model": model,
        "service_tier": null,
        "context_window": null,
    })
}
