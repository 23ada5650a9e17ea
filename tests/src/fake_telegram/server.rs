//! The HTTP side of the fake Bot API: parses `/bot{TOKEN}/{method}`
//! requests, applies faults, runs the method (long-polling for
//! `getUpdates`) and logs the call; serves registered files at
//! `/file/bot{TOKEN}/{file_path}` (logged as `downloadFile`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::bot::{BotState, Success, METHODS};
use super::params::{ApiError, Params};
use super::{Shared, TgCall};

/// The longest `getUpdates` long poll the fake honours.
const MAX_LONG_POLL: Duration = Duration::from_secs(2);

/// `(token, method)` of a `/bot{TOKEN}/{method}` path.
fn split_path(path: &str) -> Option<(&str, &str)> {
    let (token, method) = path.strip_prefix("/bot")?.split_once('/')?;
    let valid = !token.is_empty() && !method.is_empty() && !method.contains('/');
    valid.then_some((token, method))
}

/// Whether `token` looks like a bot token (`123456:ABC-def_1`).
fn valid_token(token: &str) -> bool {
    token.split_once(':').is_some_and(|(id, secret)| {
        !id.is_empty()
            && id.bytes().all(|b| b.is_ascii_digit())
            && !secret.is_empty()
            && secret.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// The documented spelling of a method name (methods are case-insensitive).
fn canonical(method: &str) -> String {
    METHODS.iter().find(|m| m.eq_ignore_ascii_case(method)).map_or_else(|| method.to_owned(), |m| (*m).to_owned())
}

/// One request, as parsed before it is answered.
struct Request {
    at: Instant,
    token: String,
    method: String,
    params: Result<Params, ApiError>,
}

/// `GET /file/bot{TOKEN}/{file_path}`: the bytes registered with
/// [`FakeTelegram::add_file`](super::FakeTelegram::add_file), or 404.
pub(super) async fn download(State(shared): State<Arc<Shared>>, uri: Uri) -> Response {
    let at = Instant::now();
    let Some((token, file_path)) = uri.path().strip_prefix("/file/bot").and_then(|p| p.split_once('/')) else {
        return respond(404, ApiError::new(404, "Not Found").to_json());
    };
    let request = Request {
        at,
        token: token.to_owned(),
        method: "downloadFile".to_owned(),
        params: Params::parse(None, Some("application/json"), json!({ "file_path": file_path }).to_string().as_bytes()),
    };
    let (status, body) = {
        let mut bot = shared.lock();
        let found = if valid_token(token) { bot.file(file_path) } else { None };
        match found {
            Some(bytes) => {
                let size = bytes.len();
                record(&mut bot, &request, Ok(json!({ "bytes": size }).into()));
                (200, Ok(bytes))
            }
            None => {
                let (status, body) = record(&mut bot, &request, Err(ApiError::new(404, "Not Found")));
                (status, Err(body))
            }
        }
    };
    shared.notify();
    match body {
        Ok(bytes) => ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response(),
        Err(json) => respond(status, json),
    }
}

/// Answers every request: faults first, then the method.
pub(super) async fn handle(State(shared): State<Arc<Shared>>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let at = Instant::now();
    let Some((token, method)) = split_path(uri.path()) else {
        return respond(404, ApiError::new(404, "Not Found").to_json());
    };
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let request = Request {
        at,
        token: token.to_owned(),
        method: canonical(method),
        params: Params::parse(uri.query(), content_type, &body),
    };
    let is_long_poll = request.method == "getUpdates";
    let mut stall = false;
    let answered = {
        let mut bot = shared.lock();
        let outcome = match bot.take_fault(&request.method) {
            Some((fault, stalled)) => {
                stall = stalled;
                Some(Err(fault))
            }
            None if !valid_token(&request.token) => Some(Err(ApiError::new(401, "Unauthorized"))),
            None => match &request.params {
                Err(error) => Some(Err(error.clone())),
                Ok(_) if is_long_poll => None,
                Ok(params) => {
                    let index = bot.calls.len();
                    Some(bot.handle(&request.method, params, index))
                }
            },
        };
        outcome.map(|outcome| record(&mut bot, &request, outcome))
    };
    match answered {
        Some(_) if stall => {
            // Recorded (with the fault's status) and never answered: hyper
            // drops this future when the client closes the connection.
            shared.notify();
            std::future::pending().await
        }
        Some((status, response)) => {
            shared.notify();
            respond(status, response)
        }
        None => get_updates(&shared, request).await,
    }
}

/// `getUpdates`: confirms updates below `offset`, then waits (up to
/// `timeout` seconds, capped) for at least one pending update.
async fn get_updates(shared: &Shared, request: Request) -> Response {
    let options = request.params.as_ref().map_err(Clone::clone).and_then(|p| {
        let offset = p.int("offset")?.unwrap_or(0);
        let limit = p.int("limit")?.unwrap_or(100).clamp(1, 100);
        let timeout = p.int("timeout")?.unwrap_or(0).max(0);
        Ok((offset, limit, timeout))
    });
    let ((offset, limit, timeout), mut changes) = {
        let mut bot = shared.lock();
        let options = options.and_then(|o| bot.check_polling_allowed().map(|()| o));
        match options {
            Ok(options) => {
                bot.confirm_updates(options.0);
                (options, shared.changed.subscribe())
            }
            Err(error) => {
                let (status, response) = record(&mut bot, &request, Err(error));
                drop(bot);
                shared.notify();
                return respond(status, response);
            }
        }
    };
    let wait = Duration::from_secs(timeout.unsigned_abs()).min(MAX_LONG_POLL);
    let deadline = tokio::time::Instant::now() + wait;
    let limit = usize::try_from(limit).unwrap_or(100);
    loop {
        let expired = tokio::time::Instant::now() >= deadline || shared.shutdown.is_cancelled();
        let answered = {
            let mut bot = shared.lock();
            let updates = bot.pending_updates(offset, limit);
            (expired || !updates.is_empty()).then(|| record(&mut bot, &request, Ok(Value::Array(updates).into())))
        };
        if let Some((status, response)) = answered {
            shared.notify();
            return respond(status, response);
        }
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    tokio::time::sleep_until(deadline).await;
                }
            }
            () = tokio::time::sleep_until(deadline) => {}
            () = shared.shutdown.cancelled() => {}
        }
    }
}

/// Logs the call and gives the HTTP status and JSON body to answer.
fn record(bot: &mut BotState, request: &Request, outcome: Result<Success, ApiError>) -> (u16, Value) {
    let (status, response) = match outcome {
        Ok(success) => {
            let mut body = json!({ "ok": true, "result": success.result });
            if let (Some(description), Some(fields)) = (success.description, body.as_object_mut()) {
                fields.insert("description".into(), json!(description));
            }
            (200, body)
        }
        Err(error) => (error.status, error.to_json()),
    };
    let index = bot.calls.len();
    tracing::debug!(index, method = %request.method, status, "fake Telegram call");
    bot.calls.push(TgCall {
        index,
        at: request.at,
        token: request.token.clone(),
        method: request.method.clone(),
        params: request.params.as_ref().map_or(Value::Null, Params::to_value),
        status,
        response: response.clone(),
    });
    (status, response)
}

fn respond(status: u16, body: Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(body)).into_response()
}
