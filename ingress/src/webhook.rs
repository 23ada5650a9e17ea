//! `POST /telegram/webhook` (Bot API "setWebhook": Telegram sends the
//! `secret_token` back in `X-Telegram-Bot-Api-Secret-Token` and retries any
//! non-2xx answer), plus `/healthz` and `/readyz`; `/metrics` is served only
//! by [`admin_router`], on the admin address (never the public port).

use crate::forwarder::Forwarder;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use shared::secret::Secret;
use shared::telegram::RoutingInfo;
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// Header Telegram puts the webhook secret in.
pub const SECRET_HEADER: &str = "x-telegram-bot-api-secret-token";

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub struct WebState {
    /// Publishes updates with confirms.
    pub forwarder: Arc<Forwarder>,
    /// Expected secret header value.
    pub secret: Secret,
    /// Polling mode's status (never set in webhook mode).
    pub polling: Arc<crate::polling::PollStatus>,
}

/// The public router: webhook, health and readiness (no metrics).
pub fn router(state: WebState, max_body_bytes: usize) -> Router {
    Router::new()
        .route(
            "/telegram/webhook",
            post(webhook).layer(axum::middleware::from_fn_with_state(
                BodyGate { max: max_body_bytes, secret: state.secret.clone() },
                read_body_within,
            )),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// The admin router (`ADMIN_BIND`): health, readiness and `/metrics`.
pub fn admin_router(state: WebState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(shared::admin::metrics_text))
        .with_state(state)
}

/// Longest a webhook request body may take to arrive, seconds: a client
/// that stalls mid-body gets 408 and its connection is closed, instead of
/// holding a connection and a task forever.
pub const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What the body gate needs: the cap and the secret.
#[derive(Clone)]
struct BodyGate {
    /// Largest body, bytes.
    max: usize,
    /// The webhook secret: a request without it is refused before its body is read.
    secret: Secret,
}

/// Checks the secret header first (401 at once, the body never read: an
/// unauthenticated client holds no buffer and no task), then reads the
/// whole body (at most `max` bytes, else 413) within [`BODY_READ_TIMEOUT`]
/// (else 408) before the handler runs.
async fn read_body_within(
    State(gate): State<BodyGate>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    if !secret_matches(req.headers(), &gate.secret) {
        metrics::counter!("fleet_updates_rejected_total", "reason" => "bad_secret").increment(1);
        tracing::warn!(reason = "bad_secret", "webhook rejected before its body was read");
        return (StatusCode::UNAUTHORIZED, "unauthorized").into_response();
    }
    let (parts, body) = req.into_parts();
    match tokio::time::timeout(BODY_READ_TIMEOUT, axum::body::to_bytes(body, gate.max)).await {
        Ok(Ok(bytes)) => next.run(axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes))).await,
        Ok(Err(_)) => {
            metrics::counter!("fleet_updates_rejected_total", "reason" => "too_large").increment(1);
            (StatusCode::PAYLOAD_TOO_LARGE, "body too large").into_response()
        }
        Err(_) => {
            metrics::counter!("fleet_updates_rejected_total", "reason" => "read_timeout").increment(1);
            tracing::warn!(reason = "read_timeout", "webhook body did not arrive in time");
            (StatusCode::REQUEST_TIMEOUT, "body read timed out").into_response()
        }
    }
}

fn secret_matches(headers: &HeaderMap, expected: &Secret) -> bool {
    let Some(given) = headers.get(SECRET_HEADER) else {
        return false;
    };
    // Constant time over the bytes (a length mismatch returns at once, which
    // reveals only the length).
    !expected.is_empty() && bool::from(given.as_bytes().ct_eq(expected.expose().as_bytes()))
}

async fn webhook(State(state): State<WebState>, headers: HeaderMap, body: Bytes) -> (StatusCode, &'static str) {
    metrics::counter!("fleet_updates_received_total").increment(1);
    if !secret_matches(&headers, &state.secret) {
        metrics::counter!("fleet_updates_rejected_total", "reason" => "bad_secret").increment(1);
        tracing::warn!(reason = "bad_secret", "webhook rejected");
        return (StatusCode::UNAUTHORIZED, "unauthorized");
    }
    let info = match RoutingInfo::from_bytes(&body) {
        Ok(info) => info,
        Err(e) => {
            metrics::counter!("fleet_updates_rejected_total", "reason" => "bad_body").increment(1);
            tracing::warn!(reason = "bad_body", error.message = %e, bytes = body.len(), "webhook rejected");
            return (StatusCode::BAD_REQUEST, "not a Telegram update");
        }
    };
    match state.forwarder.forward(&info, &body).await {
        Ok(()) => {
            metrics::counter!("fleet_updates_published_total").increment(1);
            (StatusCode::OK, "ok")
        }
        Err(e) => {
            metrics::counter!("fleet_updates_rejected_total", "reason" => "broker").increment(1);
            tracing::error!(update_id = info.update_id, error.message = %e, "update not accepted by the broker");
            (StatusCode::SERVICE_UNAVAILABLE, "broker unavailable")
        }
    }
}

async fn readyz(State(state): State<WebState>) -> (StatusCode, String) {
    if let Some(problem) = state.polling.problem() {
        return (StatusCode::SERVICE_UNAVAILABLE, problem);
    }
    match state.forwarder.ensure_ready().await {
        Ok(()) => (StatusCode::OK, "ready".to_owned()),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "broker unavailable".to_owned()),
    }
}
