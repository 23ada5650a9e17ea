//! The endpoints of the fake Messages API: request checks, the choice of
//! the scripted answer, the call log entry, and Anthropic's error body
//! (shared with the usage report endpoint).

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::{replay, RecordedCall, ScriptedResponse, Shared};

/// How a message call is answered, decided under the lock.
enum Answer {
    Error(ApiError),
    Stream(ScriptedResponse),
}

/// An Anthropic error response.
pub(super) struct ApiError {
    status: u16,
    message: String,
    retry_after_s: Option<u64>,
}

impl ApiError {
    pub(super) fn new(status: u16, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), retry_after_s: None }
    }

    pub(super) fn into_response(self, request_id: String) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = json!({
            "type": "error",
            "error": { "type": error_type(self.status), "message": self.message },
        });
        let mut response = (status, [("request-id", request_id)], Json(body)).into_response();
        if let Some(seconds) = self.retry_after_s {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// Anthropic's `error.type` for an HTTP status.
fn error_type(status: u16) -> &'static str {
    match status {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    }
}

/// The default message of a scripted HTTP error.
fn error_message(status: u16) -> String {
    match status {
        429 => "Number of requests has exceeded your rate limit".to_owned(),
        529 => "Overloaded".to_owned(),
        500 => "Internal server error".to_owned(),
        _ => format!("Scripted error {status}"),
    }
}

/// What is known about a request before it is answered.
struct Request {
    received_at: Instant,
    received_utc: chrono::DateTime<chrono::Utc>,
    api_key_present: bool,
    anthropic_version: Option<String>,
    body: Result<Value, String>,
}

impl Request {
    fn read(headers: &HeaderMap, body: &[u8]) -> Self {
        let received_at = Instant::now();
        let received_utc = chrono::Utc::now();
        let api_key_present = headers.get("x-api-key").is_some_and(|key| !key.as_bytes().is_empty());
        let anthropic_version = headers.get("anthropic-version").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body = match serde_json::from_slice::<Value>(body) {
            Ok(value) if value.is_object() => Ok(value),
            Ok(_) => Err("request body must be a JSON object".to_owned()),
            Err(error) => Err(format!("request body is not valid JSON: {error}")),
        };
        Self { received_at, received_utc, api_key_present, anthropic_version, body }
    }

    /// The error every endpoint answers before looking at the script, if any.
    fn rejection(&self) -> Option<ApiError> {
        if !self.api_key_present {
            return Some(ApiError::new(401, "x-api-key header is required"));
        }
        self.body.as_ref().err().map(|e| ApiError::new(400, e.clone()))
    }
}

pub(super) fn request_id() -> String {
    format!("req_{}", uuid::Uuid::now_v7().simple())
}

/// `POST /v1/messages`: pops a scripted response, records the call, answers.
pub(super) async fn messages(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let request = Request::read(&headers, &body);
    let request_id = request_id();
    let (index, answer) = {
        let mut script = shared.lock();
        let answer = match request.rejection() {
            Some(error) => Answer::Error(error),
            None if !is_streaming(request.body.as_ref().ok()) => {
                Answer::Error(ApiError::new(400, "this fake serves only streaming requests: set \"stream\": true"))
            }
            None => match script.queue.pop_front().or_else(|| script.default.clone()) {
                None => Answer::Error(ApiError::new(500, "no scripted response")),
                Some(scripted) => match scripted.http_status {
                    Some(status) => Answer::Error(ApiError {
                        status,
                        message: error_message(status),
                        retry_after_s: scripted.retry_after_s,
                    }),
                    None => Answer::Stream(scripted),
                },
            },
        };
        let index = script.calls.len();
        let is_error = matches!(answer, Answer::Error(_));
        script.calls.push(RecordedCall {
            index,
            request_id: request_id.clone(),
            received_at: request.received_at,
            received_utc: request.received_utc,
            body: request.body.unwrap_or(Value::Null),
            api_key_present: request.api_key_present,
            anthropic_version: request.anthropic_version,
            status: match &answer {
                Answer::Error(error) => error.status,
                Answer::Stream(_) => 200,
            },
            events_sent: 0,
            ended_at: is_error.then(Instant::now),
            completed: is_error,
            model: None,
            usage: None,
        });
        (index, answer)
    };
    shared.notify();
    match answer {
        Answer::Error(error) => {
            tracing::debug!(index, status = error.status, "fake Anthropic answered an error");
            error.into_response(request_id)
        }
        Answer::Stream(scripted) => {
            let stream = replay::Replay::new(&scripted, Arc::clone(&shared), index).await.into_stream();
            let headers = [
                (header::CONTENT_TYPE.as_str(), "text/event-stream".to_owned()),
                (header::CACHE_CONTROL.as_str(), "no-cache".to_owned()),
                ("request-id", request_id),
            ];
            (StatusCode::OK, headers, Body::from_stream(stream)).into_response()
        }
    }
}

fn is_streaming(body: Option<&Value>) -> bool {
    body.and_then(|b| b.get("stream")).and_then(Value::as_bool) == Some(true)
}

/// `POST /v1/messages/count_tokens`: records the body, answers the set count.
pub(super) async fn count_tokens(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let request = Request::read(&headers, &body);
    let request_id = request_id();
    if let Some(error) = request.rejection() {
        return error.into_response(request_id);
    }
    let (input_tokens, stalled) = {
        let mut script = shared.lock();
        script.count_tokens_calls.push(request.body.unwrap_or(Value::Null));
        (script.count_tokens, script.count_tokens_stalled)
    };
    shared.notify();
    if stalled {
        // Never answers: the client's deadline must end the call.
        std::future::pending::<()>().await;
    }
    ([("request-id", request_id)], Json(json!({ "input_tokens": input_tokens }))).into_response()
}

pub(super) async fn not_found() -> Response {
    ApiError::new(404, "Not found").into_response(request_id())
}
