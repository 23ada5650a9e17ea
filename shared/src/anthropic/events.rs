//! Wire types of the Messages API stream. Source: Anthropic API docs,
//! "Streaming Messages" (event types `message_start`, `content_block_start`,
//! `content_block_delta`, `content_block_stop`, `message_delta`,
//! `message_stop`, `ping`, `error`; delta types `text_delta`,
//! `input_json_delta`, `thinking_delta`, `signature_delta`,
//! `citations_delta`). Types this build does not know deserialize to
//! `Unknown` instead of failing, as the docs ask of clients.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One server-sent event of a streaming response, parsed from its `data:`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamEvent {
    /// First event: the message shell with the input usage.
    MessageStart {
        /// The message with empty content.
        message: MessageStart,
    },
    /// A content block opens at `index`.
    ContentBlockStart {
        /// Position of the block in the message content.
        index: usize,
        /// The block as it starts (`text` empty, `tool_use` input `{}` …),
        /// kept as JSON so that unknown block types pass through unchanged.
        content_block: Value,
    },
    /// A piece of the block at `index`.
    ContentBlockDelta {
        /// Position of the block.
        index: usize,
        /// The piece.
        delta: Delta,
    },
    /// The block at `index` is complete.
    ContentBlockStop {
        /// Position of the block.
        index: usize,
    },
    /// Top-level changes: stop reason and cumulative usage.
    MessageDelta {
        /// `stop_reason` and `stop_sequence`.
        delta: MessageDeltaBody,
        /// Cumulative usage so far (fields absent here keep earlier values).
        #[serde(default)]
        usage: UsageReport,
    },
    /// Last event of a complete stream.
    MessageStop,
    /// Keep-alive; counts as activity for the idle timeout.
    Ping,
    /// An error inside a 200 stream (for example `overloaded_error`).
    Error {
        /// The error object.
        error: ErrorBody,
    },
    /// An event type this build does not know.
    #[serde(other)]
    Unknown,
}

/// The `message` of `message_start`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct MessageStart {
    /// `msg_…` id.
    pub id: String,
    /// Model id as the API reports it (priced by prefix).
    pub model: String,
    /// Usage at the start: input classes final, output a placeholder.
    #[serde(default)]
    pub usage: UsageReport,
}

/// A content block delta.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Delta {
    /// Text appended to a `text` block.
    TextDelta {
        /// The text piece.
        text: String,
    },
    /// A piece of a tool input's JSON text (parsed only at block stop).
    InputJsonDelta {
        /// The JSON fragment, possibly empty.
        partial_json: String,
    },
    /// Text appended to a `thinking` block.
    ThinkingDelta {
        /// The thinking piece.
        thinking: String,
    },
    /// The signature of a `thinking` block.
    SignatureDelta {
        /// The signature piece.
        signature: String,
    },
    /// A citation added to a `text` block.
    CitationsDelta {
        /// The citation object, kept verbatim.
        citation: Value,
    },
    /// A delta type this build does not know.
    #[serde(other)]
    Unknown,
}

/// `delta` of `message_delta`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct MessageDeltaBody {
    /// `end_turn`, `max_tokens`, `tool_use`, `stop_sequence`, `pause_turn`,
    /// `refusal`, or a value this build does not know; `null` mid-message.
    #[serde(default)]
    pub stop_reason: Option<String>,
}

/// The `error` object of an `error` event or an HTTP error body.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct ErrorBody {
    /// `overloaded_error`, `api_error`, `rate_limit_error`, …
    #[serde(rename = "type", default)]
    pub kind: String,
    /// Human-readable message.
    #[serde(default)]
    pub message: String,
}

/// Usage as reported in `message_start` or `message_delta` (tokens). Every
/// field is optional: in `message_delta` an absent field keeps the value of
/// `message_start` (fixtures README, DESIGN §6).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct UsageReport {
    /// Uncached input tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_tokens: Option<u64>,
    /// Output tokens (cumulative in `message_delta`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tokens: Option<u64>,
    /// Total cache-write tokens (5-minute + 1-hour).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_creation_input_tokens: Option<u64>,
    /// Cache-read tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_read_input_tokens: Option<u64>,
    /// Split of cache writes by lifetime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_creation: Option<CacheCreation>,
    /// Server tool counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_tool_use: Option<ServerToolUse>,
}

/// `usage.cache_creation`.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct CacheCreation {
    /// Tokens written with the 5-minute lifetime.
    #[serde(default)]
    pub ephemeral_5m_input_tokens: u64,
    /// Tokens written with the 1-hour lifetime.
    #[serde(default)]
    pub ephemeral_1h_input_tokens: u64,
}

/// `usage.server_tool_use`.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct ServerToolUse {
    /// Web searches run by the API for this call.
    #[serde(default)]
    pub web_search_requests: u64,
}

impl UsageReport {
    /// Overlays `later` on `self`: fields present in `later` win.
    pub fn merge(&mut self, later: &UsageReport) {
        fn take<T: Copy>(dst: &mut Option<T>, src: Option<T>) {
            if src.is_some() {
                *dst = src;
            }
        }
        take(&mut self.input_tokens, later.input_tokens);
        take(&mut self.output_tokens, later.output_tokens);
        take(&mut self.cache_creation_input_tokens, later.cache_creation_input_tokens);
        take(&mut self.cache_read_input_tokens, later.cache_read_input_tokens);
        take(&mut self.cache_creation, later.cache_creation);
        take(&mut self.server_tool_use, later.server_tool_use);
    }

    /// Tokens by price class. Cache writes without a lifetime split are
    /// 5-minute writes (fixtures README); with a split, the 1-hour part is
    /// taken from it and the rest of the total is 5-minute.
    pub fn token_counts(&self) -> crate::pricing::TokenCounts {
        let split = self.cache_creation.unwrap_or_default();
        let total = self
            .cache_creation_input_tokens
            .unwrap_or(split.ephemeral_5m_input_tokens.saturating_add(split.ephemeral_1h_input_tokens));
        let one_hour = split.ephemeral_1h_input_tokens.min(total);
        crate::pricing::TokenCounts {
            input: self.input_tokens.unwrap_or(0),
            output: self.output_tokens.unwrap_or(0),
            cache_write_5m: total - one_hour,
            cache_write_1h: one_hour,
            cache_read: self.cache_read_input_tokens.unwrap_or(0),
            web_search_requests: self.server_tool_use.map_or(0, |s| s.web_search_requests),
        }
    }
}

/// Parses one SSE `data:` payload.
///
/// # Errors
/// The JSON error when the payload is not a JSON object with a `type`.
pub fn parse_event(data: &str) -> Result<StreamEvent, serde_json::Error> {
    serde_json::from_str(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_event_and_delta_types_are_tolerated() {
        assert_eq!(parse_event(r#"{"type":"brand_new","x":1}"#).unwrap(), StreamEvent::Unknown);
        let e =
            parse_event(r#"{"type":"content_block_delta","index":0,"delta":{"type":"hologram_delta","h":1}}"#).unwrap();
        assert_eq!(e, StreamEvent::ContentBlockDelta { index: 0, delta: Delta::Unknown });
    }

    #[test]
    fn message_delta_usage_overrides_only_present_fields() {
        let mut start = UsageReport {
            input_tokens: Some(22),
            cache_creation_input_tokens: Some(140),
            cache_read_input_tokens: Some(2100),
            output_tokens: Some(1),
            cache_creation: Some(CacheCreation { ephemeral_5m_input_tokens: 140, ephemeral_1h_input_tokens: 0 }),
            server_tool_use: None,
        };
        start.merge(&UsageReport { output_tokens: Some(64), ..Default::default() });
        let t = start.token_counts();
        assert_eq!((t.input, t.output, t.cache_write_5m, t.cache_write_1h, t.cache_read), (22, 64, 140, 0, 2100));
    }

    #[test]
    fn cache_writes_without_a_split_are_five_minute_writes() {
        let u = UsageReport { cache_creation_input_tokens: Some(50), ..Default::default() };
        assert_eq!(u.token_counts().cache_write_5m, 50);
        assert_eq!(u.token_counts().cache_write_1h, 0);
    }

    #[test]
    fn invalid_json_in_a_data_line_is_an_error() {
        for data in [r#"{"type":"content_block_delta","index":0,"#, "not json", "", r#"{"index":0}"#, "[1]", "null"] {
            assert!(parse_event(data).is_err(), "{data:?} parsed");
        }
    }

    #[test]
    fn negative_fractional_huge_or_string_token_counts_are_errors_never_a_charge() {
        for usage in [
            r#"{"output_tokens":-5}"#,
            r#"{"output_tokens":1e30}"#,
            r#"{"output_tokens":12.5}"#,
            r#"{"output_tokens":"12"}"#,
            r#"{"output_tokens":18446744073709551616}"#,
            r#"{"input_tokens":-1}"#,
            r#"{"cache_read_input_tokens":-1}"#,
            r#"{"cache_creation":{"ephemeral_1h_input_tokens":-1}}"#,
            r#"{"server_tool_use":{"web_search_requests":-1}}"#,
        ] {
            let data = format!(r#"{{"type":"message_delta","delta":{{"stop_reason":"end_turn"}},"usage":{usage}}}"#);
            assert!(parse_event(&data).is_err(), "{usage} was accepted");
            let start = format!(
                r#"{{"type":"message_start","message":{{"id":"msg_1","model":"claude-sonnet-4-5","usage":{usage}}}}}"#
            );
            assert!(parse_event(&start).is_err(), "{usage} was accepted in message_start");
        }
    }

    #[test]
    fn the_largest_token_counts_do_not_overflow_the_price_classes() {
        let u = UsageReport {
            cache_creation: Some(CacheCreation { ephemeral_5m_input_tokens: u64::MAX, ephemeral_1h_input_tokens: 1 }),
            output_tokens: Some(u64::MAX),
            ..Default::default()
        };
        let t = u.token_counts();
        assert_eq!(t.output, u64::MAX);
        assert_eq!(t.cache_write_1h, 1);
        assert!(t.cache_write_5m >= u64::MAX - 1, "saturated, not wrapped: {t:?}");
    }
}
