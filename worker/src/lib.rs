//! The worker: turns Telegram updates into jobs, runs each job under a
//! per-chat lease (stream Claude, show progress, deliver the answer, record
//! usage and billing events in one transaction), and relays the billing
//! outbox to the broker.
//!
//! # Layout (layers, bottom up; a module imports only from layers below it,
//! except [`context`], the hub every step is handed)
//! - [`store`]: every statement on the bot database (jobs, updates, conversation, calls, outbox, pacing,
//!   documents, notes, chats, payments); claims and the fenced writes of a running job ([`store::jobs::ClaimedJob`]).
//! - [`config`]: settings (`--help`); [`context`]: [`WorkerContext`], everything a step needs.
//! - [`telegram`]: Bot API output: delivery, progress drafts, the fleet-wide pacer, group admins.
//! - [`holds`]: two-phase spending through the `billing` crate: holds on the balance before Claude is called.
//! - [`job`] and [`tools`]: the pipeline of one job (`load` → `build_request` → `stream_reply` → `finalize` →
//!   `deliver`) and the tool registry with parallel execution, a transaction per tool. No SQL.
//! - [`intake`]: one transaction per update: dedup, upsert user and chat, create the job.
//! - [`commands`], [`payments`], [`documents`], [`chats`], [`actions`]: commands, Stars packs and invoices,
//!   files users send, group → supergroup migration, immediate actions (buttons, payments) outside jobs.
//! - [`lease`]: the heartbeat loop that keeps a claimed job's lease alive.
//! - [`queues`]: the broker edge: intake shards, the work queue, control (`/stop`), the reaper, the outbox relay.
//! - [`startup`]: building and running the app.

pub mod actions;
pub mod cancel;
pub mod chats;
pub mod commands;
pub mod config;
pub mod context;
pub mod documents;
pub mod holds;
pub mod intake;
pub mod job;
pub mod lease;
pub mod notices;
pub mod outcome;
pub mod payments;
pub mod queues;
pub mod startup;
pub mod store;
pub mod telegram;
pub mod tools;

pub use config::Settings;
pub use context::WorkerContext;
pub use startup::App;
