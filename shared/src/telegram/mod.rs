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

pub use bot::{BotApi, BotCommand, TelegramError};

/// The largest file a bot may download through the public Bot API, bytes
/// (Bot API, "getFile": "bots can download files of up to 20MB in size").
pub const MAX_DOWNLOAD_BYTES: u64 = 20 * 1024 * 1024;
pub use markdown::{split_formatted, to_entities, Entity, Formatted};
pub use split::{split_message, utf16_len, MAX_MESSAGE_UTF16};
pub use update::{Incoming, RoutingInfo, UpdateError};
