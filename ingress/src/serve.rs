//! The public HTTP server: the axum router on hyper's HTTP/1 connection
//! builder, with what `axum::serve` does not set against slow or greedy
//! clients (a webhook port faces the internet):
//! - a header read timeout ([`HEADER_READ_TIMEOUT`], hyper's
//!   `http1::Builder::header_read_timeout`): a client that never finishes
//!   its headers (slowloris) is disconnected;
//! - at most [`MAX_CONNECTIONS`] connections at once; one more is closed at
//!   once (counted in `fleet_ingress_connections_refused_total`).
//!
//! The body has its own deadline in the webhook's body gate
//! (`webhook::BODY_READ_TIMEOUT`). Shutdown: stop accepting, let open
//! connections finish their request (graceful), at most [`DRAIN`].

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

/// Longest a client may take to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Most open connections; Telegram itself opens at most 100 per webhook
/// (Bot API, `setWebhook` `max_connections`, default 40).
pub const MAX_CONNECTIONS: usize = 1_024;
/// Longest the graceful drain waits for open connections at shutdown.
pub const DRAIN: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until `shutdown`.
///
/// # Errors
/// None today: accept errors (e.g. out of file descriptors) are logged and
/// the loop goes on after a short pause.
pub async fn serve(listener: TcpListener, app: Router, shutdown: CancellationToken) -> std::io::Result<()> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    let builder = builder.http1_only();
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                tracing::warn!(error.message = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!("fleet_ingress_connections_refused_total").increment(1);
            drop(stream);
            continue;
        };
        let service = TowerToHyperService::new(
            app.clone().map_request(|req: axum::http::Request<Incoming>| req.map(axum::body::Body::new)),
        );
        let connection =
            graceful.watch(builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned());
        #[expect(
            clippy::disallowed_methods,
            reason = "one task per connection, at most MAX_CONNECTIONS (`slots`), each watched by `graceful`, which the drain below waits for"
        )]
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error.message = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown()).await.is_err() {
        tracing::warn!(drain_s = DRAIN.as_secs(), "open connections did not finish in time");
    }
    Ok(())
}
