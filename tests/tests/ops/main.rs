//! Operability: metrics scraped after real traffic, the fields every job's
//! log lines carry, and no secret in any log line even when every Bot API
//! call fails.

#[path = "../fleet/helpers.rs"]
#[allow(dead_code, unused_imports)]
mod helpers;

mod config;
mod logs;
mod metrics;
mod recovery;
