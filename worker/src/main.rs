//! `worker`: see the crate docs. Thin: parse settings, init tracing, run.

use tokio_util::sync::CancellationToken;
use worker::Settings;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::load()?;
    shared::telemetry::init(settings.log.log_format);
    let shutdown = CancellationToken::new();
    shared::shutdown::on_signal(shutdown.clone());
    worker::startup::main_with(settings, shutdown).await
}
