//! Process shutdown: one `CancellationToken` per process, cancelled on
//! SIGTERM or ctrl-c, passed down to every task (no global state).

use tokio_util::sync::CancellationToken;

/// Spawns a task that cancels `token` on SIGTERM or ctrl-c.
#[expect(
    clippy::disallowed_methods,
    reason = "the signal listener lives as long as the process; it only cancels the token it is given"
)]
pub fn on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = term.recv() => {},
                        _ = tokio::signal::ctrl_c() => {},
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        tracing::info!("shutdown requested");
        token.cancel();
    });
}
