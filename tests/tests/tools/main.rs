//! Integration tests of the tools (issue 4): each call in a transaction of
//! its own, cut off by its timeout or by `/stop`, run once per `tool_use`
//! id, never run on a truncated input; thinking blocks sent back unchanged;
//! documents users send read with `list_files` / `read_file`.
//!
//! Against PostgreSQL and RabbitMQ: a fresh database and queue prefix per
//! test; logs only with `TEST_LOG=1`.
//!
//! # Layout
//! - [`fleet_tests::harness`]: databases, broker prefixes, the ingress, waits.
//! - [`fleet_tests::harness::tools`]: a claimed job to call `run_tools` on,
//!   the fleet with tool settings, scripted SSE bodies.
//! - [`isolation`]: two tools writing at once commit or roll back independently.
//! - [`limits`]: a hanging tool is cut off by its timeout; `/stop` cancels it.
//! - [`dedup`]: a repeated `tool_use` id runs once.
//! - [`truncated`]: a tool input cut off mid-stream is never executed.
//! - [`thinking`]: the thinking block goes back byte for byte with the tool result.
//! - [`documents`]: text and PDF documents, the size cap, redelivery.
//! - [`hostile_documents`]: PDFs built to crash, hang or flood the reader;
//!   documents and pre-checkouts never stall an intake shard.
//! - [`groups`]: files and notes scoped to (user, chat); who may `/stop` and `/new` in a group.
//! - [`count_tokens`]: a token count that never answers ends within its timeout.
//! - [`failed_calls`]: a stream that just stops is retried; its partial text
//!   is neither shown, nor kept, nor charged.
//! - [`admission`]: holds bound spend: small grants, two chats at once, a lower
//!   `max_tokens`, the per-round tool-call limit (issue 15).
//! - [`attacks`]: a hostile user's and a careless operator's attacks beyond
//!   the ones above (failing tests are bugs still there).
//! - [`attacks2`]: a second pass: secret files, the ingress's public port,
//!   buy buttons, topics, `/usage` in a group, the sandbox child.
//! - [`attacks3`]: a third pass (issue 14): calls booked when their attempt
//!   dies, the reaper's orphan booking, a `/stop` storm, hostile unknown commands.

mod admission;
mod attacks;
mod attacks2;
mod attacks3;
mod commands;
mod count_tokens;
mod dedup;
mod documents;
mod failed_calls;
mod groups;
mod hostile_documents;
mod isolation;
mod limits;
mod media;
mod retry_after;
mod thinking;
mod token;
mod truncated;
