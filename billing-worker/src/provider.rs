//! The provider's own account of what it served: Anthropic's Admin API
//! usage report, summed per UTC day, model and token class for `reconcile`.
//! Source: Anthropic API docs,
//! "Usage and Cost API, GET /v1/organizations/usage_report/messages".
//!
//! Request: `GET {base}/v1/organizations/usage_report/messages` with
//! `starting_at`, `ending_at` (RFC 3339), `bucket_width=1h`,
//! `group_by[]=model`, `limit=168` (the documented maximum for hourly
//! buckets) and `page` (the previous `next_page`, followed while
//! `has_more`); headers `x-api-key: <admin key>` and
//! `anthropic-version: 2023-06-01`. Response:
//! `{"data":[{"starting_at","ending_at","results":[{"model",
//! "uncached_input_tokens","cache_creation":{"ephemeral_5m_input_tokens",
//! "ephemeral_1h_input_tokens"},"cache_read_input_tokens","output_tokens",
//! "server_tool_use":{"web_search_requests"},…}]}],"has_more","next_page"}`.
//! Parsing is lenient: absent or `null` counts are 0, unknown fields are
//! ignored, and flat `cache_creation_5m_input_tokens` /
//! `cache_creation_1h_input_tokens` are accepted too. Errors never contain
//! the admin key.

use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
use serde::Deserialize;
use shared::anthropic::client::ANTHROPIC_VERSION;
use shared::anthropic::events::ErrorBody;
use shared::pricing::TokenCounts;
use shared::secret::{scrub, Secret};
use std::collections::BTreeMap;
use std::time::Duration;

/// Path of the messages usage report; source:
/// "Usage and Cost API, GET /v1/organizations/usage_report/messages".
pub const USAGE_REPORT_PATH: &str = "/v1/organizations/usage_report/messages";

/// Bucket width requested: one hour (the report's buckets are UTC-aligned,
/// so each falls within one UTC day).
pub const BUCKET_WIDTH: &str = "1h";

/// Buckets per page: the documented maximum for `bucket_width=1h` (168 hours).
pub const BUCKETS_PER_PAGE: u32 = 168;

/// Most pages followed before giving up (a report that keeps saying
/// `has_more` is an error, not an endless loop): 1,000 pages of 168 hours
/// is about 19 years.
const MAX_PAGES: usize = 1_000;

/// Token classes compared by `reconcile`, named as the fields of
/// [`TokenCounts`] (the `tokens` object of `usage_charge.v1` and the columns
/// of `api_calls`, where `input` is `input_tokens` and `output` is
/// `output_tokens`).
pub const TOKEN_CLASSES: [&str; 6] =
    ["input", "output", "cache_write_5m", "cache_write_1h", "cache_read", "web_search_requests"];

/// `tokens` by class, in the order of [`TOKEN_CLASSES`] (tokens; web search
/// requests for `web_search_requests`).
pub fn token_classes(tokens: &TokenCounts) -> [(&'static str, u64); 6] {
    [
        (TOKEN_CLASSES[0], tokens.input),
        (TOKEN_CLASSES[1], tokens.output),
        (TOKEN_CLASSES[2], tokens.cache_write_5m),
        (TOKEN_CLASSES[3], tokens.cache_write_1h),
        (TOKEN_CLASSES[4], tokens.cache_read),
        (TOKEN_CLASSES[5], tokens.web_search_requests),
    ]
}

/// Totals of the report: `(UTC day, model, class)` → count (tokens, or web
/// search requests). Counts of 0 are left out. `model` is `-` when the
/// report did not name one.
pub type ProviderTotals = BTreeMap<(NaiveDate, String, &'static str), u64>;

/// Failures fetching the usage report.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The API answered with an HTTP error (401: not an admin key, 429, …).
    #[error("usage report: HTTP {status} {}: {}", body.kind, body.message)]
    Http {
        /// HTTP status.
        status: u16,
        /// The error object of the body, or the start of the body.
        body: ErrorBody,
    },
    /// Connecting or reading failed (admin key scrubbed).
    #[error("usage report: transport error: {0}")]
    Transport(String),
    /// The body is not a usage report, or the pages do not end.
    #[error("usage report: unexpected answer: {0}")]
    Decode(String),
}

/// One page of the report.
#[derive(Debug, Default, Deserialize)]
struct ReportPage {
    /// Time buckets.
    #[serde(default)]
    data: Vec<Bucket>,
    /// More pages follow.
    #[serde(default)]
    has_more: Option<bool>,
    /// Token of the next page.
    #[serde(default)]
    next_page: Option<String>,
}

/// One time bucket.
#[derive(Debug, Default, Deserialize)]
struct Bucket {
    /// Start of the bucket, RFC 3339.
    #[serde(default)]
    starting_at: Option<String>,
    /// Usage rows, one per group (model).
    #[serde(default)]
    results: Option<Vec<UsageRow>>,
}

/// One row of a bucket's `results` (tokens).
#[derive(Debug, Default, Deserialize)]
struct UsageRow {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    uncached_input_tokens: Option<u64>,
    #[serde(default)]
    cache_creation: Option<CacheCreation>,
    /// Flat variant of `cache_creation.ephemeral_5m_input_tokens`.
    #[serde(default)]
    cache_creation_5m_input_tokens: Option<u64>,
    /// Flat variant of `cache_creation.ephemeral_1h_input_tokens`.
    #[serde(default)]
    cache_creation_1h_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    server_tool_use: Option<ServerToolUse>,
}

#[derive(Debug, Default, Deserialize)]
struct CacheCreation {
    #[serde(default)]
    ephemeral_5m_input_tokens: Option<u64>,
    #[serde(default)]
    ephemeral_1h_input_tokens: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
struct ServerToolUse {
    #[serde(default)]
    web_search_requests: Option<u64>,
}

impl UsageRow {
    fn token_counts(&self) -> TokenCounts {
        let cache = self.cache_creation.as_ref();
        let nested_5m = cache.and_then(|c| c.ephemeral_5m_input_tokens);
        let nested_1h = cache.and_then(|c| c.ephemeral_1h_input_tokens);
        TokenCounts {
            input: self.uncached_input_tokens.unwrap_or(0),
            output: self.output_tokens.unwrap_or(0),
            cache_write_5m: nested_5m.or(self.cache_creation_5m_input_tokens).unwrap_or(0),
            cache_write_1h: nested_1h.or(self.cache_creation_1h_input_tokens).unwrap_or(0),
            cache_read: self.cache_read_input_tokens.unwrap_or(0),
            web_search_requests: self.server_tool_use.as_ref().and_then(|s| s.web_search_requests).unwrap_or(0),
        }
    }
}

/// Client of the messages usage report, authenticated with an Admin API key
/// (`sk-ant-admin…`; an ordinary API key is refused by the API). Source:
/// "Usage and Cost API, GET /v1/organizations/usage_report/messages".
#[derive(Clone, Debug)]
pub struct UsageReportClient {
    http: reqwest::Client,
    /// `https://api.anthropic.com` or a fake's URL, without trailing slash.
    base_url: String,
    admin_key: Secret,
}

impl UsageReportClient {
    /// A client for `base_url` (no trailing slash needed); each request
    /// times out after `timeout`.
    ///
    /// # Errors
    /// [`ProviderError::Transport`] when the HTTP client cannot be built
    /// (TLS set-up).
    pub fn new(base_url: &str, admin_key: Secret, timeout: Duration) -> Result<Self, ProviderError> {
        let http = reqwest::Client::builder()
            .connect_timeout(timeout)
            .timeout(timeout)
            .build()
            .map_err(|e| ProviderError::Transport(scrub(&e.to_string(), &admin_key)))?;
        Ok(Self { http, base_url: base_url.trim_end_matches('/').to_owned(), admin_key })
    }

    fn transport(&self, e: reqwest::Error) -> ProviderError {
        ProviderError::Transport(scrub(&e.without_url().to_string(), &self.admin_key))
    }

    /// The report for `[from 00:00Z, to + 1 day 00:00Z)`, every page,
    /// summed per (UTC day of the bucket's `starting_at`, model, class).
    /// Buckets outside the range (the API should send none) are ignored.
    ///
    /// # Errors
    /// [`ProviderError`] on an HTTP error, a transport error, a body that
    /// is not a usage report (a bucket without a valid `starting_at`), or
    /// pages that do not end.
    pub async fn daily_tokens(&self, from: NaiveDate, to: NaiveDate) -> Result<ProviderTotals, ProviderError> {
        let start = from.and_time(chrono::NaiveTime::MIN).and_utc();
        let end = to
            .succ_opt()
            .ok_or_else(|| ProviderError::Decode(format!("no day after {to}")))?
            .and_time(chrono::NaiveTime::MIN)
            .and_utc();
        let mut totals = ProviderTotals::new();
        let mut page: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let report = self.page(start, end, page.as_deref()).await?;
            for bucket in report.data {
                let at = bucket
                    .starting_at
                    .as_deref()
                    .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
                    .ok_or_else(|| ProviderError::Decode(format!("bucket starting_at {:?}", bucket.starting_at)))?
                    .with_timezone(&Utc);
                if at < start || at >= end {
                    continue;
                }
                for row in bucket.results.unwrap_or_default() {
                    let model = row.model.clone().filter(|m| !m.is_empty()).unwrap_or_else(|| "-".to_owned());
                    for (class, n) in token_classes(&row.token_counts()) {
                        if n > 0 {
                            *totals.entry((at.date_naive(), model.clone(), class)).or_default() += n;
                        }
                    }
                }
            }
            match (report.has_more.unwrap_or(false), report.next_page) {
                (true, Some(next)) if page.as_deref() != Some(next.as_str()) => page = Some(next),
                (true, next) => {
                    return Err(ProviderError::Decode(format!("has_more with next_page {next:?} after page {page:?}")))
                }
                (false, _) => return Ok(totals),
            }
        }
        Err(ProviderError::Decode(format!("more than {MAX_PAGES} pages")))
    }

    /// One page of the report.
    async fn page(
        &self,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        page: Option<&str>,
    ) -> Result<ReportPage, ProviderError> {
        let limit = BUCKETS_PER_PAGE.to_string();
        let mut query = vec![
            ("starting_at", start.to_rfc3339_opts(SecondsFormat::Secs, true)),
            ("ending_at", end.to_rfc3339_opts(SecondsFormat::Secs, true)),
            ("bucket_width", BUCKET_WIDTH.to_owned()),
            ("group_by[]", "model".to_owned()),
            ("limit", limit),
        ];
        if let Some(page) = page {
            query.push(("page", page.to_owned()));
        }
        let response = self
            .http
            .get(format!("{}{USAGE_REPORT_PATH}", self.base_url))
            .query(&query)
            .header("x-api-key", self.admin_key.expose())
            .header("anthropic-version", ANTHROPIC_VERSION)
            .send()
            .await
            .map_err(|e| self.transport(e))?;
        let status = response.status().as_u16();
        let text = response.text().await.map_err(|e| self.transport(e))?;
        if status >= 400 {
            let body = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| serde_json::from_value::<ErrorBody>(v.get("error")?.clone()).ok())
                .unwrap_or_else(|| ErrorBody {
                    kind: "http_error".into(),
                    message: scrub(&text.chars().take(200).collect::<String>(), &self.admin_key),
                });
            return Err(ProviderError::Http { status, body });
        }
        serde_json::from_str(&text).map_err(|e| ProviderError::Decode(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::RawQuery;
    use axum::http::HeaderMap;
    use axum::routing::get;
    use axum::Json;
    use serde_json::{json, Value};

    fn day(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    /// Serves `pages` in turn (by the `page` query parameter: none → 0,
    /// `p1` → 1, …), answering 401 without the key.
    async fn serve(pages: Vec<Value>) -> (String, tokio::task::JoinHandle<()>) {
        let app = axum::Router::new().route(
            USAGE_REPORT_PATH,
            get(move |headers: HeaderMap, RawQuery(query): RawQuery| {
                let pages = pages.clone();
                async move {
                    if headers.get("x-api-key").and_then(|v| v.to_str().ok()) != Some("sk-ant-admin-test") {
                        let body = json!({"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}});
                        return (axum::http::StatusCode::UNAUTHORIZED, Json(body));
                    }
                    assert_eq!(headers.get("anthropic-version").unwrap(), "2023-06-01");
                    let query = query.unwrap_or_default();
                    assert!(query.contains("group_by%5B%5D=model"), "{query}");
                    assert!(query.contains("bucket_width=1h"), "{query}");
                    assert!(query.contains("starting_at=2025-11-29T00%3A00%3A00Z"), "{query}");
                    assert!(query.contains("ending_at=2025-12-01T00%3A00%3A00Z"), "{query}");
                    let n = query
                        .split('&')
                        .find_map(|kv| kv.strip_prefix("page=p"))
                        .map_or(0, |n| n.parse::<usize>().unwrap());
                    (axum::http::StatusCode::OK, Json(pages[n].clone()))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        #[expect(clippy::disallowed_methods, reason = "the test's fake server: it ends with the test's runtime")]
        let handle = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        (url, handle)
    }

    #[tokio::test]
    async fn follows_pages_and_sums_per_day_model_and_class_leniently() {
        let pages = vec![
            json!({
                "data": [
                    {"starting_at": "2025-11-29T10:00:00Z", "ending_at": "2025-11-29T11:00:00Z", "results": [
                        {"model": "claude-sonnet-4-5-20250929", "uncached_input_tokens": 100,
                         "cache_creation": {"ephemeral_5m_input_tokens": 10, "ephemeral_1h_input_tokens": 20},
                         "cache_read_input_tokens": 30, "output_tokens": 40,
                         "server_tool_use": {"web_search_requests": 1},
                         "api_key_id": null, "workspace_id": null, "service_tier": null, "context_window": null}
                    ]},
                    {"starting_at": "2025-11-29T11:00:00Z", "ending_at": "2025-11-29T12:00:00Z", "results": []}
                ],
                "has_more": true, "next_page": "p1"
            }),
            json!({
                "data": [
                    {"starting_at": "2025-11-29T23:00:00Z", "results": [
                        // Flat cache fields, nulls and a field this build does not know.
                        {"model": "claude-sonnet-4-5-20250929", "uncached_input_tokens": 1,
                         "cache_creation_5m_input_tokens": 2, "cache_creation_1h_input_tokens": null,
                         "cache_read_input_tokens": null, "output_tokens": 3, "brand_new": {"x": 1}}
                    ]},
                    {"starting_at": "2025-11-30T00:00:00Z", "results": [
                        {"model": "claude-haiku-4-5", "output_tokens": 7},
                        {"uncached_input_tokens": 5}
                    ]},
                    {"starting_at": "2025-12-01T00:00:00Z", "results": [{"model": "out-of-range", "output_tokens": 9}]}
                ],
                "has_more": false, "next_page": null
            }),
        ];
        let (url, server) = serve(pages).await;
        let client = UsageReportClient::new(&url, Secret::new("sk-ant-admin-test"), Duration::from_secs(5)).unwrap();
        let totals = client.daily_tokens(day("2025-11-29"), day("2025-11-30")).await.unwrap();
        let sonnet =
            |d: &str, class: &'static str| totals.get(&(day(d), "claude-sonnet-4-5-20250929".to_owned(), class));
        assert_eq!(sonnet("2025-11-29", "input"), Some(&101));
        assert_eq!(sonnet("2025-11-29", "output"), Some(&43));
        assert_eq!(sonnet("2025-11-29", "cache_write_5m"), Some(&12));
        assert_eq!(sonnet("2025-11-29", "cache_write_1h"), Some(&20));
        assert_eq!(sonnet("2025-11-29", "cache_read"), Some(&30));
        assert_eq!(sonnet("2025-11-29", "web_search_requests"), Some(&1));
        assert_eq!(totals.get(&(day("2025-11-30"), "claude-haiku-4-5".to_owned(), "output")), Some(&7));
        assert_eq!(totals.get(&(day("2025-11-30"), "-".to_owned(), "input")), Some(&5));
        assert!(!totals.keys().any(|(_, model, _)| model == "out-of-range"));
        assert_eq!(totals.len(), 8, "{totals:?}");
        server.abort();
    }

    #[tokio::test]
    async fn an_http_error_is_an_error_without_the_key() {
        let (url, server) = serve(vec![json!({"data": [], "has_more": false})]).await;
        let client = UsageReportClient::new(&url, Secret::new("sk-ant-api-wrong"), Duration::from_secs(5)).unwrap();
        let error = client.daily_tokens(day("2025-11-29"), day("2025-11-30")).await.unwrap_err();
        let text = error.to_string();
        assert!(matches!(error, ProviderError::Http { status: 401, .. }), "{text}");
        assert!(text.contains("authentication_error"), "{text}");
        assert!(!text.contains("sk-ant-api-wrong"), "{text}");
        server.abort();
    }

    #[tokio::test]
    async fn pages_that_never_end_and_bodies_that_are_not_reports_are_errors() {
        let looping = json!({"data": [], "has_more": true, "next_page": null});
        let (url, server) = serve(vec![looping]).await;
        let client = UsageReportClient::new(&url, Secret::new("sk-ant-admin-test"), Duration::from_secs(5)).unwrap();
        let error = client.daily_tokens(day("2025-11-29"), day("2025-11-30")).await.unwrap_err();
        assert!(matches!(error, ProviderError::Decode(_)), "{error}");
        server.abort();

        let (url, server) = serve(vec![json!({"data": [{"results": []}], "has_more": false})]).await;
        let client = UsageReportClient::new(&url, Secret::new("sk-ant-admin-test"), Duration::from_secs(5)).unwrap();
        let error = client.daily_tokens(day("2025-11-29"), day("2025-11-30")).await.unwrap_err();
        assert!(matches!(error, ProviderError::Decode(_)), "{error}");
        server.abort();
    }
}
