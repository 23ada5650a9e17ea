//! The fleet's binaries: where they are, and building them once per test
//! process so a test never runs a stale worker.

use anyhow::{anyhow, ensure, Result};
use std::path::PathBuf;
use std::sync::OnceLock;

/// Folder of the fleet binaries: `LIFECYCLE_BIN_DIR`, else the debug folder
/// of the workspace's target directory.
fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LIFECYCLE_BIN_DIR") {
        return PathBuf::from(dir);
    }
    crate::target_dir().join("debug")
}

/// Builds the three binaries once per test process (a no-op when they are
/// up to date), so a test never runs a stale worker: `cargo nextest` builds
/// this crate's dependencies as libraries, not the other crates' binaries.
/// `LIFECYCLE_BIN_DIR` (prebuilt binaries) skips it.
pub fn ensure_binaries() -> Result<PathBuf> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let dir = bin_dir();
    if std::env::var_os("LIFECYCLE_BIN_DIR").is_none() {
        let built = BUILT.get_or_init(|| {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut build = std::process::Command::new(cargo);
            build
                .args(["build", "--quiet", "--workspace", "--bins"])
                .arg("--manifest-path")
                .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml"));
            // Cargo sets these for the test binary; some build scripts
            // (ring's) rerun when they change, so passing them on would
            // rebuild half the workspace here and again in the next plain build.
            for (key, _) in std::env::vars_os() {
                let key = key.to_string_lossy();
                if is_per_crate_cargo_var(&key) {
                    build.env_remove(key.as_ref());
                }
            }
            let out = build.output().map_err(|e| format!("running cargo build: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!("cargo build --workspace --bins failed:\n{}", String::from_utf8_lossy(&out.stderr)))
            }
        });
        built.clone().map_err(|e| anyhow!(e))?;
    }
    for bin in ["ingress", "worker", "billing-worker"] {
        ensure!(dir.join(bin).is_file(), "{} is missing (cargo build --bins)", dir.join(bin).display());
    }
    Ok(dir)
}

/// Variables cargo sets for the crate under test (not user configuration).
fn is_per_crate_cargo_var(key: &str) -> bool {
    key == "OUT_DIR"
        || key == "CARGO_MANIFEST_DIR"
        || key == "CARGO_MANIFEST_PATH"
        || key == "CARGO_CRATE_NAME"
        || key == "CARGO_PRIMARY_PACKAGE"
        || key == "CARGO_TARGET_TMPDIR"
        || key == "CARGO_RUSTC_CURRENT_DIR"
        || key.starts_with("CARGO_PKG_")
        || key.starts_with("CARGO_BIN_")
}
