//! Runs the fake Telegram Bot API and the fake Anthropic Messages API as a
//! standalone process until ctrl-c or SIGTERM. The Anthropic fake answers
//! every call with the default SSE file.
//!
//! Prints `TELEGRAM_API_URL=...` and `ANTHROPIC_BASE_URL=...` on stdout once
//! both listen; logs go to stderr (`RUST_LOG`, default `info`).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use fleet_tests::fake_anthropic::{FakeAnthropic, ScriptedResponse};
use fleet_tests::fake_telegram::FakeTelegram;
use tracing_subscriber::EnvFilter;

/// Fakes of the Telegram Bot API and the Anthropic Messages API.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address of the fake Bot API.
    #[arg(long, env = "FAKE_TELEGRAM_BIND", default_value = "0.0.0.0:8081")]
    telegram_bind: SocketAddr,
    /// Address of the fake Messages API.
    #[arg(long, env = "FAKE_ANTHROPIC_BIND", default_value = "0.0.0.0:8082")]
    anthropic_bind: SocketAddr,
    /// Username `getMe` reports.
    #[arg(long, env = "FAKE_BOT_USERNAME", default_value = "fleet_test_bot")]
    bot_username: String,
    /// The fixtures folder.
    #[arg(long, env = "FAKE_FIXTURES", default_value = "fixtures")]
    fixtures: PathBuf,
    /// SSE file (relative to the fixtures folder) answered to every call.
    #[arg(long, env = "FAKE_DEFAULT_SSE", default_value = "anthropic/text_capital.sse")]
    default_sse: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();

    let sse_path = args.fixtures.join(&args.default_sse);
    let default = ScriptedResponse::from_file(&sse_path)
        .with_context(|| format!("reading the default SSE file {}", sse_path.display()))?;
    let telegram = FakeTelegram::start(args.telegram_bind, &args.bot_username)
        .await
        .with_context(|| format!("binding the fake Bot API to {}", args.telegram_bind))?;
    let anthropic = FakeAnthropic::start(args.anthropic_bind)
        .await
        .with_context(|| format!("binding the fake Messages API to {}", args.anthropic_bind))?;
    anthropic.set_default(Some(default));
    announce(&telegram, &anthropic);
    tracing::info!(
        telegram = %telegram.api_url(),
        anthropic = %anthropic.base_url(),
        default_sse = %sse_path.display(),
        "fakes running"
    );

    wait_for_stop_signal().await?;

    // Shutdown: 1. stop accepting and end open streams and long polls,
    // 2. wait (bounded) for both servers to finish.
    tracing::info!("stopping the fakes");
    tokio::join!(telegram.shutdown(), anthropic.shutdown());
    Ok(())
}

#[expect(clippy::print_stdout, reason = "scripts read the fakes' URLs from stdout")]
fn announce(telegram: &FakeTelegram, anthropic: &FakeAnthropic) {
    println!("TELEGRAM_API_URL={}", telegram.api_url());
    println!("ANTHROPIC_BASE_URL={}", anthropic.base_url());
}

/// Resolves on ctrl-c, or on SIGTERM where there is one.
async fn wait_for_stop_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            ctrl_c = tokio::signal::ctrl_c() => ctrl_c.context("waiting for ctrl-c")?,
            _ = sigterm.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await.context("waiting for ctrl-c")?;
    Ok(())
}
