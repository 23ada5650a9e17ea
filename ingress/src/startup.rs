//! Building and running the ingress.
//!
//! Shutdown phases:
//! 1. the token is cancelled (SIGTERM / ctrl-c in `main`);
//! 2. the HTTP server stops accepting and finishes in-flight requests
//!    (each waits for its confirm) — or the polling loop returns between
//!    batches; the admin server stops;
//! 3. `run_until_stopped` returns; the broker connection closes on drop.

use crate::config::{Mode, Settings};
pub use crate::forwarder::Forwarder;
use crate::webhook::{admin_router, router, WebState};
use anyhow::Context;
use shared::telegram::BotApi;
use std::future::IntoFuture as _;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A built ingress, ready to run.
pub struct App {
    listener: TcpListener,
    /// The admin listener (`/metrics`), apart from the public one.
    admin: TcpListener,
    settings: Settings,
    forwarder: Arc<Forwarder>,
}

impl App {
    /// Binds the HTTP listener and prepares the broker connection (which may
    /// be down: requests then answer 503 until it is back).
    ///
    /// # Errors
    /// Invalid settings or a bind failure.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        settings.validate().map_err(anyhow::Error::msg)?;
        let _ = shared::admin::metrics_handle();
        let listener = TcpListener::bind(settings.bind).await.with_context(|| format!("binding {}", settings.bind))?;
        let admin = TcpListener::bind(settings.admin_bind)
            .await
            .with_context(|| format!("ADMIN_BIND: cannot bind {}", settings.admin_bind))?;
        let forwarder = Arc::new(Forwarder::new(
            &settings.broker.amqp_url,
            &settings.broker.amqp_prefix,
            Duration::from_secs(settings.confirm_timeout_s),
        ));
        if let Err(e) = forwarder.ensure_ready().await {
            tracing::warn!(error.message = %e, "broker not reachable at start; answering 503 until it is");
        }
        Ok(Self { listener, admin, settings, forwarder })
    }

    /// The bound port (tests bind port 0).
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// The bound port of the admin server (`/metrics`).
    pub fn admin_port(&self) -> u16 {
        self.admin.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Serves until `shutdown` is cancelled.
    ///
    /// # Errors
    /// A server or Bot API client error.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let poll_status = Arc::new(crate::polling::PollStatus::default());
        let state = WebState {
            forwarder: self.forwarder.clone(),
            secret: self.settings.webhook_secret.clone(),
            polling: poll_status.clone(),
        };
        let app = router(state.clone(), self.settings.max_body_bytes);
        // A child token: the admin server also stops when the public one fails.
        let admin_stop = shutdown.child_token();
        let admin_stopped = admin_stop.clone();
        #[expect(clippy::disallowed_methods, reason = "owned: stopped by `admin_stop` and awaited below")]
        let admin = tokio::spawn(
            axum::serve(self.admin, admin_router(state))
                .with_graceful_shutdown(async move { admin_stopped.cancelled().await })
                .into_future(),
        );
        // Not `axum::serve`: the public port needs a header read timeout and
        // a connection limit (`crate::serve`).
        let server = crate::serve::serve(self.listener, app, shutdown.clone());
        tracing::info!(mode = ?self.settings.mode, "ingress running");
        let served = match self.settings.mode {
            Mode::Webhook => server.await.context("http server"),
            Mode::Polling => match BotApi::new(
                &self.settings.telegram_api_url,
                self.settings.bot_token.clone(),
                Duration::from_secs(u64::from(self.settings.poll_timeout_s) + 10),
            ) {
                Ok(bot) => {
                    let poll = crate::polling::run(
                        bot,
                        &self.forwarder,
                        self.settings.poll_timeout_s,
                        &poll_status,
                        shutdown.clone(),
                    );
                    let (served, ()) = tokio::join!(server, poll);
                    served.context("http server")
                }
                Err(e) => Err(anyhow::anyhow!("TELEGRAM_API_URL: {e}")),
            },
        };
        admin_stop.cancel();
        admin.await.context("admin server task")?.context("admin server")?;
        served
    }
}
