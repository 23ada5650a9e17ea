//! `ingress`: see the crate docs. Thin: parse settings, init tracing, run.

use ingress::{App, Settings};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::load()?;
    shared::telemetry::init(settings.log.log_format);
    let shutdown = CancellationToken::new();
    shared::shutdown::on_signal(shutdown.clone());
    App::build(settings).await?.run_until_stopped(shutdown).await
}
