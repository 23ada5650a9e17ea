//! The broker edge: every consumer and publisher of the worker.
//!
//! - [`shards`]: the intake shards `updates.intake.<n>` (single active consumer, per-chat order).
//! - [`work`]: the competing `updates` work queue: claim a job, run it, settle the delivery.
//! - [`control`]: `/stop` across hosts (control fanout) and the registry of running jobs.
//! - [`reaper`]: republishes jobs whose lease expired.
//! - [`relay`]: the billing outbox relay (publisher confirms, then mark relayed).

pub mod control;
pub mod reaper;
pub mod relay;
pub mod shards;
pub mod work;
