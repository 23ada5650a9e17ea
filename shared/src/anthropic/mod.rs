//! The Anthropic Messages API, streaming (`POST /v1/messages` with
//! `"stream": true`; docs: "Streaming Messages").
//!
//! - [`events`]: one serde enum for every SSE event and delta type, unknown
//!   values tolerated.
//! - [`state`]: the pure `apply(event, &mut MessageState)` accumulator.
//! - [`client`]: the HTTP client that turns a request into a stream of events.

pub mod client;
pub mod events;
pub mod state;

pub use client::{AnthropicClient, ApiError, MessageStream};
pub use events::{StreamEvent, UsageReport};
pub use state::{MessageState, StopReason};
