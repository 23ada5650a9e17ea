//! Operability: metrics scraped after real traffic, the fields every job's
//! log lines carry, and no secret in any log line even when every Bot API
//! call fails.

#[path = "../fleet/helpers.rs"]
#[expect(dead_code, unused_imports, reason = "helpers shared by `#[path]` includes: each suite uses a part of them")]
mod helpers;

mod config;
mod logs;
mod metrics;
mod recovery;
