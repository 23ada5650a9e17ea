//! The ingress: takes Telegram updates (webhook or long polling) and puts
//! them on RabbitMQ, answering Telegram only once the broker confirmed.
//! It touches no database (DESIGN §1).
//!
//! # Layout
//! - [`config`]: settings (`--help`).
//! - [`webhook`]: `POST /telegram/webhook`, `/healthz`, `/readyz`.
//! - [`polling`]: the `getUpdates` loop (`deleteWebhook` first; 401/409 make it not ready).
//! - [`forwarder`]: publishing an update to its intake shard with a confirm.
//! - [`serve`]: the public port (header read timeout, connection limit).
//! - [`startup`]: building and running the app.

pub mod config;
pub mod forwarder;
pub mod polling;
pub mod serve;
pub mod startup;
pub mod webhook;

pub use config::Settings;
pub use startup::App;
