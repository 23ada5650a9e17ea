//! `worker`: see the crate docs. Thin: parse settings, init tracing, run.
//! `worker extract-document` is the PDF sandbox's child
//! ([`worker::documents::child_main`]): dispatched before anything else
//! (no settings, no secrets, no runtime, no threads).

use clap::Parser;
use tokio_util::sync::CancellationToken;
use worker::Settings;

/// Arguments of `worker extract-document`.
#[derive(Parser)]
#[command(name = "worker extract-document", about = "Reads one PDF on stdin under resource limits (internal).")]
struct ExtractArgs {
    #[command(flatten)]
    limits: worker::documents::ExtractLimits,
}

fn main() -> anyhow::Result<()> {
    if std::env::args_os().nth(1).is_some_and(|a| a == "extract-document") {
        let args = ExtractArgs::parse_from(std::env::args_os().skip(1));
        std::process::exit(worker::documents::child_main(&args.limits));
    }
    let settings = Settings::load()?;
    shared::telemetry::init(settings.log.log_format);
    let shutdown = CancellationToken::new();
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(async {
        shared::shutdown::on_signal(shutdown.clone());
        worker::startup::main_with(settings, shutdown).await
    })
}
