//! Operability: metrics scraped after real traffic, the fields every job's
//! log lines carry, and no secret in any log line even when every Bot API
//! call fails.

mod config;
mod logs;
mod metrics;
mod recovery;
