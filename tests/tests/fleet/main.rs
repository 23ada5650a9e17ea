//! Integration tests of the fleet: the real ingress, worker and
//! billing-worker in-process, against PostgreSQL, RabbitMQ and the fakes of
//! the Telegram Bot API and the Anthropic Messages API.
//!
//! Every test gets a fresh database and a unique queue prefix
//! ([`fleet_tests::harness`]); logs are printed only with `TEST_LOG=1`.
//!
//! # Layout
//! - [`bad_input`]: nesting bombs, invalid UTF-8, extreme ids, slow and stalled clients at the webhook.
//! - [`ingress`]: the webhook's answers and what reaches the `updates` queue.
//! - [`dedup`]: a duplicated update is answered and charged once, end to end.
//! - [`billing`]: a billing event applies once; malformed events are dead-lettered.
//! - [`sse`]: the fixture streams parse over real HTTP into text, usage and cost.
//! - [`split`]: the UTF-16 splitter's limits, fences and surrogate pairs.

mod bad_input;
mod billing;
mod dedup;
mod ingress;
mod polling;
mod split;
mod sse;
