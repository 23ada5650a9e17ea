//! Telegram output: everything the worker sends to the Bot API while a job
//! runs or an action answers, above the store and below the pipeline.
//!
//! - [`delivery`]: sending text (entities, split at 4,096 UTF-16 code units, paced, 403 handled).
//! - [`progress`]: drafts or an edited message while the answer streams.
//! - [`pacer`]: the fleet-wide pacer of Bot API calls (PostgreSQL).
//! - [`admins`]: whether a user administers a group (`getChatMember`, with a timeout).

pub mod admins;
pub mod delivery;
pub mod pacer;
pub mod progress;
