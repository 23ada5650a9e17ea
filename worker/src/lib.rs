//! The worker: turns Telegram updates into jobs, runs each job under a
//! per-chat lease (stream Claude, show progress, deliver the answer, record
//! usage and billing events in one transaction), and relays the billing
//! outbox to the broker.
//!
//! # Layout
//! - [`config`]: settings (`--help`).
//! - [`context`]: [`WorkerContext`], everything a step needs.
//! - [`consumer`]: the `updates` consumer; maps each outcome to ack / delay / dead-letter.
//! - [`control`]: `/stop` across hosts (control fanout) and the registry of running jobs.
//! - [`holds`]: two-phase spending: holds on the balance before Claude is called.
//! - [`intake`]: one transaction per update: dedup, upsert user and chat, create the job.
//! - [`lease`]: the heartbeat loop that keeps a claimed job's lease alive.
//! - [`store`]: every statement on the bot database (jobs, updates, conversation, calls, outbox, pacing,
//!   documents, notes, chats, payments); claims and the fenced writes of a running job ([`store::jobs::ClaimedJob`]).
//! - [`job`]: the pipeline of one job (`load` → `build_request` → `stream_reply` → `finalize` → `deliver`).
//! - [`actions`]: immediate actions (buttons, payments, migrations) outside jobs.
//! - [`admins`]: whether a user administers a group (`getChatMember`, with a timeout).
//! - [`commands`]: `/start`, `/help`, `/new`, `/balance`, `/buy`.
//! - [`payments`]: Telegram Stars packs, invoices and their checks.
//! - [`chats`]: moving a chat when a group becomes a supergroup.
//! - [`delivery`]: sending text to Telegram (entities, split, paced, 403 handled).
//! - [`documents`]: files users send: downloaded at intake (capped), their text stored for `read_file`.
//! - [`pacer`]: the fleet-wide pacer of Bot API calls (PostgreSQL).
//! - [`progress`]: drafts or an edited message while the answer streams.
//! - [`outbox`]: the billing outbox relay.
//! - [`reaper`]: republishes jobs whose lease expired.
//! - [`tools`]: the tool registry and parallel execution, a transaction per tool.
//! - [`startup`]: building and running the app.

pub mod actions;
pub mod admins;
pub mod chats;
pub mod commands;
pub mod config;
pub mod consumer;
pub mod context;
pub mod control;
pub mod delivery;
pub mod documents;
pub mod holds;
pub mod intake;
pub mod job;
pub mod lease;
pub mod outbox;
pub mod pacer;
pub mod payments;
pub mod progress;
pub mod reaper;
pub mod sequencer;
pub mod startup;
pub mod store;
pub mod tools;

pub use config::Settings;
pub use context::WorkerContext;
pub use startup::App;
