//! HTTP client of the Messages API: `POST {base}/v1/messages` with
//! `"stream": true` (SSE) and `POST {base}/v1/messages/count_tokens`.
//! Headers per the API docs ("Versions", "Getting started"): `x-api-key`,
//! `anthropic-version: 2023-06-01`. Errors never contain the key.

use super::events::{parse_event, ErrorBody, StreamEvent};
use crate::secret::{scrub, Secret};
use eventsource_stream::Eventsource;
use futures_util::{Stream, StreamExt};
use serde_json::Value;
use std::pin::Pin;
use std::time::Duration;

/// The API version header value this client speaks.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// Failures of a Messages API call.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The API answered with an HTTP error (429, 500, 529 overloaded, …).
    #[error("anthropic HTTP {status} {}: {}", body.kind, body.message)]
    Http {
        /// HTTP status.
        status: u16,
        /// The error object of the body, if it parsed.
        body: ErrorBody,
        /// `retry-after` header, seconds.
        retry_after_s: Option<u64>,
    },
    /// Connecting or reading failed (URL and key scrubbed).
    #[error("anthropic transport error: {0}")]
    Transport(String),
    /// An event that is not valid JSON of the stream format.
    #[error("anthropic stream decode error: {0}")]
    Decode(String),
    /// No complete answer within the call's deadline.
    #[error("anthropic call took longer than {0:?}")]
    TimedOut(Duration),
}

impl ApiError {
    /// Worth retrying with backoff: 408, 409, 429, 5xx/529 and transport errors
    /// (API docs, "Errors").
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Http { status, .. } => matches!(status, 408 | 409 | 429 | 500..=599),
            Self::Transport(_) | Self::TimedOut(_) => true,
            Self::Decode(_) => false,
        }
    }
}

/// A streaming response: events in order, with the response's `request-id`.
pub struct MessageStream {
    /// Anthropic's `request-id` header, for drill-down from the ledger.
    pub request_id: Option<String>,
    /// The events; ends after `message_stop` or when the connection closes.
    pub events: Pin<Box<dyn Stream<Item = Result<StreamEvent, ApiError>> + Send>>,
}

/// Client of the Messages API; cheap to clone (shares one connection pool).
#[derive(Clone, Debug)]
pub struct AnthropicClient {
    http: reqwest::Client,
    /// `https://api.anthropic.com` or a fake's URL, without trailing slash.
    base_url: String,
    api_key: Secret,
}

impl AnthropicClient {
    /// A client for `base_url` (no trailing slash needed).
    ///
    /// # Errors
    /// The transport error when the HTTP client cannot be built (TLS set-up).
    pub fn new(base_url: &str, api_key: Secret, connect_timeout: Duration) -> Result<Self, ApiError> {
        let http = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .build()
            .map_err(|e| ApiError::Transport(scrub(&e.to_string(), &api_key)))?;
        Ok(Self { http, base_url: base_url.trim_end_matches('/').to_owned(), api_key })
    }

    fn transport(&self, e: reqwest::Error) -> ApiError {
        ApiError::Transport(scrub(&e.without_url().to_string(), &self.api_key))
    }

    async fn post(&self, path: &str, body: &Value) -> Result<reqwest::Response, ApiError> {
        let response = self
            .http
            .post(format!("{}{path}", self.base_url))
            .header("x-api-key", self.api_key.expose())
            .header("anthropic-version", ANTHROPIC_VERSION)
            .json(body)
            .send()
            .await
            .map_err(|e| self.transport(e))?;
        let status = response.status().as_u16();
        if status >= 400 {
            let retry_after_s =
                response.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok());
            let text = response.text().await.unwrap_or_default();
            let body = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| serde_json::from_value::<ErrorBody>(v.get("error")?.clone()).ok())
                .unwrap_or(ErrorBody { kind: "http_error".into(), message: truncate(&text, 200) });
            return Err(ApiError::Http { status, body, retry_after_s });
        }
        Ok(response)
    }

    /// Starts a streaming call; `body` is a Messages API request with
    /// `"stream": true`.
    ///
    /// # Errors
    /// [`ApiError::Http`] for an error status, [`ApiError::Transport`] when
    /// the connection fails. Errors inside the stream come as items.
    pub async fn stream(&self, body: &Value) -> Result<MessageStream, ApiError> {
        let response = self.post("/v1/messages", body).await?;
        let request_id = response.headers().get("request-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let key = self.api_key.clone();
        let events = response.bytes_stream().eventsource().filter_map(move |item| {
            let out = match item {
                Ok(ev) if ev.data.trim().is_empty() => None,
                Ok(ev) => Some(
                    parse_event(&ev.data).map_err(|e| ApiError::Decode(format!("{e} in {}", truncate(&ev.data, 120)))),
                ),
                Err(e) => Some(Err(ApiError::Transport(scrub(&e.to_string(), &key)))),
            };
            std::future::ready(out)
        });
        Ok(MessageStream { request_id, events: Box::pin(events) })
    }

    /// Counts the input tokens of `body` (`POST /v1/messages/count_tokens`;
    /// docs: "Token counting"). Used to bill output of a call cut short. The
    /// whole call (connect, answer, body) ends within `timeout`.
    ///
    /// # Errors
    /// As [`AnthropicClient::stream`], `Decode` when `input_tokens` is
    /// missing, `TimedOut` when no answer came within `timeout`.
    pub async fn count_tokens(&self, body: &Value, timeout: Duration) -> Result<u64, ApiError> {
        let call = async {
            let response = self.post("/v1/messages/count_tokens", body).await?;
            let v: Value = response.json().await.map_err(|e| self.transport(e))?;
            v.get("input_tokens")
                .and_then(Value::as_u64)
                .ok_or_else(|| ApiError::Decode("count_tokens answer without input_tokens".into()))
        };
        tokio::time::timeout(timeout, call).await.unwrap_or(Err(ApiError::TimedOut(timeout)))
    }
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}
