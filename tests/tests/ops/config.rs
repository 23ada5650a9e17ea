//! Start-up fails fast with a message naming the bad setting.

use crate::helpers::fixture;
use clap::Parser as _;

fn worker_args(extra: &[&str]) -> Vec<String> {
    let prices = fixture("prices.toml");
    let mut args: Vec<String> = [
        "worker",
        "--anthropic-api-key",
        "key",
        "--prices-file",
        prices.to_str().unwrap_or_default(),
        "--admin-bind",
        "127.0.0.1:0",
    ]
    .map(str::to_owned)
    .to_vec();
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

async fn start_error(args: Vec<String>) -> String {
    match worker::Settings::try_parse_from(args) {
        Err(e) => e.to_string(),
        Ok(settings) => match worker::App::build(settings).await {
            Ok(_) => String::new(),
            Err(e) => format!("{e:#}"),
        },
    }
}

#[tokio::test]
async fn a_worker_with_an_unpriced_model_refuses_to_start() {
    let err = start_error(worker_args(&["--bot-token", "7000000001:TEST", "--model", "gpt-4o"])).await;
    assert!(err.contains("ANTHROPIC_MODEL"), "{err}");
}

#[tokio::test]
async fn bad_settings_are_named_in_the_start_up_error() {
    let err = start_error(worker_args(&["--bot-token", ""])).await;
    assert!(err.contains("TELEGRAM_BOT_TOKEN"), "{err}");
    let err = start_error(worker_args(&["--bot-token", "7000000001:TEST", "--visibility-timeout-s", "1"])).await;
    assert!(err.contains("VISIBILITY_TIMEOUT_S"), "{err}");
    let err = start_error(worker_args(&["--bot-token", "7000000001:TEST", "--stars-packs", "100"])).await;
    assert!(err.contains("STARS_PACKS"), "{err}");
    let err = start_error(worker_args(&["--bot-token", "7000000001:TEST", "--tools", "calculator,teleport"])).await;
    assert!(err.contains("TOOLS"), "{err}");
}
