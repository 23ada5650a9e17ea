//! Operability: the Prometheus recorder of the process and the small admin
//! HTTP server every process serves (`/healthz` alive, `/readyz` broker and
//! database reachable and consumers running, `/metrics` in the Prometheus
//! text format).
//!
//! The `metrics` facade keeps one recorder per process by design; it is
//! installed once here and its handle passed around explicitly.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use sqlx::PgPool;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

static RECORDER: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process's Prometheus handle, installing the recorder on first use.
/// `None` only if another recorder was installed first.
pub fn metrics_handle() -> Option<PrometheusHandle> {
    RECORDER
        .get_or_init(|| {
            let buckets = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];
            let recorder = PrometheusBuilder::new().set_buckets(&buckets).ok()?.build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            Some(handle)
        })
        .clone()
}

/// What `/readyz` checks.
#[derive(Clone, Default)]
pub struct Readiness {
    /// Databases that must answer `SELECT 1`.
    pub databases: Vec<PgPool>,
    /// Set by consumers while they are connected and consuming.
    pub consumers: Vec<Arc<AtomicBool>>,
    /// Other conditions, each with the reason given while it is false
    /// (e.g. "the Bot API refuses the bot token").
    pub conditions: Vec<(&'static str, Arc<AtomicBool>)>,
}

impl Readiness {
    async fn ready(&self) -> Result<(), String> {
        for (i, flag) in self.consumers.iter().enumerate() {
            if !flag.load(Ordering::Relaxed) {
                return Err(format!("consumer {i} is not consuming"));
            }
        }
        for (reason, flag) in &self.conditions {
            if !flag.load(Ordering::Relaxed) {
                return Err((*reason).to_owned());
            }
        }
        for db in &self.databases {
            let ok = tokio::time::timeout(Duration::from_secs(2), sqlx::query("SELECT 1").execute(db)).await;
            if !matches!(ok, Ok(Ok(_))) {
                return Err("database unreachable".into());
            }
        }
        Ok(())
    }
}

/// The admin routes: `/healthz`, `/readyz`, `/metrics`.
pub fn router(readiness: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(Arc::new(readiness))
}

async fn readyz(State(r): State<Arc<Readiness>>) -> (StatusCode, String) {
    match r.ready().await {
        Ok(()) => (StatusCode::OK, "ready".into()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

/// The Prometheus text exposition of this process.
pub async fn metrics_text() -> String {
    metrics_handle().map(|h| h.render()).unwrap_or_default()
}

/// Serves the admin routes on `listener` until `shutdown`.
#[expect(clippy::disallowed_methods, reason = "owned: the caller keeps the handle and awaits it after `shutdown`")]
pub fn serve(listener: TcpListener, readiness: Readiness, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let app = router(readiness);
        let served = axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await;
        if let Err(e) = served {
            tracing::error!(error.message = %e, "admin server failed");
        }
    })
}
