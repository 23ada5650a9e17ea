//! Telegram: reading updates, splitting answers, calling the Bot API.
//!
//! - [`update`]: routing facts of a raw update and the typed view the worker acts on.
//! - [`split`]: the splitter at 4,096 UTF-16 code units (raw text).
//! - [`markdown`]: Markdown → text + `MessageEntity` values, and their splitter.
//! - [`bot`]: the Bot API client (teloxide-core), secrets scrubbed from errors.

pub mod bot;
pub mod markdown;
pub mod split;
pub mod update;

pub use bot::{BotApi, TelegramError};
pub use markdown::{split_formatted, to_entities, Entity, Formatted};
pub use split::{split_message, utf16_len, MAX_MESSAGE_UTF16};
pub use update::{Incoming, RoutingInfo, UpdateError};
