//! Common library of the fleet: everything the ingress, the workers and the
//! billing-workers must agree on.
//!
//! # Layout
//!
//! - [`config`]: settings shared by every binary (clap + environment).
//! - [`config_source`]: secrets from the environment or `*_FILE`, never flags; placeholder checks.
//! - [`secret`]: a wrapper that keeps tokens and keys out of logs.
//! - [`money`]: `Usd`, an exact Decimal amount of US dollars.
//! - [`pricing`]: the price table (`prices.toml` format) and the cost of a call.
//! - [`anthropic`]: Messages API streaming: SSE event types, the pure message
//!   state machine, and the HTTP client.
//! - [`telegram`]: update routing, the UTF-16 splitter, the Bot API client.
//! - [`amqp`]: broker topology and the confirming publisher.
//! - [`contracts`]: versioned messages that travel over the broker.
//! - [`db`]: PostgreSQL pools and the two migration sets.
//! - [`retry`]: the named backoff policies every retry loop uses.
//! - [`telemetry`]: tracing subscriber set-up.
//! - [`admin`]: the Prometheus recorder and the `/healthz` `/readyz` `/metrics` server.
//! - [`shutdown`]: the per-process cancellation token from signals.

pub mod admin;
pub mod amqp;
pub mod anthropic;
pub mod config;
pub mod config_source;
pub mod contracts;
pub mod db;
pub mod money;
pub mod pricing;
pub mod retry;
pub mod secret;
pub mod shutdown;
pub mod telegram;
pub mod telemetry;
