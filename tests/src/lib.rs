//! Test support for the fleet: in-process fakes of the Telegram Bot API and
//! the Anthropic Messages API, used by the integration tests and the demo.
//!
//! # Layout
//! - [`fake_anthropic`]: `POST /v1/messages` replaying scripted SSE bodies.
//! - [`fake_telegram`]: the Bot API methods the fleet calls, with faults.
//! - [`scenario`]: the scenario file format.
//! - [`fleet`]: starting the fleet as processes on fresh databases.
//! - [`harness`]: the integration tests' harness (fresh database and queue
//!   prefix per test, the processes in-process, waits).
//! - [`demo`]: playing scenarios and checking their expectations.
//! - [`chaos`]: the fleet under injected faults, and the checks after.

pub mod chaos;
pub mod demo;
pub mod fake_anthropic;
pub mod fake_telegram;
pub mod fleet;
pub mod harness;
pub mod scenario;

/// The workspace's target directory: `$CARGO_TARGET_DIR`, else `target/`.
pub fn target_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")))
}

/// The built `worker` binary of this workspace (`$CARGO_TARGET_DIR/debug`
/// or `target/debug`): the PDF sandbox of workers run in-process
/// (`--document-extractor`). `cargo build --bins` builds it (scripts/test).
pub fn worker_binary() -> std::path::PathBuf {
    target_dir().join("debug").join("worker")
}
