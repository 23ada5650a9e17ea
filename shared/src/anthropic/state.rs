//! The pure accumulator of a streamed message: `apply(event, &mut state)`.
//! No I/O here, so it is unit-tested on the fixture streams.

use super::events::{Delta, ErrorBody, StreamEvent, UsageReport};
use serde_json::{Map, Value};

/// Why the model stopped (Messages API `stop_reason`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The model finished its turn.
    EndTurn,
    /// `max_tokens` was reached: the answer may be continued.
    MaxTokens,
    /// The model wants tool results.
    ToolUse,
    /// A stop sequence matched.
    StopSequence,
    /// A long server-tool turn was paused; send it back to continue.
    PauseTurn,
    /// The model declined to answer.
    Refusal,
    /// A value this build does not know, kept verbatim.
    Other(String),
}

impl StopReason {
    fn parse(s: &str) -> Self {
        match s {
            "end_turn" => Self::EndTurn,
            "max_tokens" => Self::MaxTokens,
            "tool_use" => Self::ToolUse,
            "stop_sequence" => Self::StopSequence,
            "pause_turn" => Self::PauseTurn,
            "refusal" => Self::Refusal,
            other => Self::Other(other.to_owned()),
        }
    }

    /// The wire value.
    pub fn as_str(&self) -> &str {
        match self {
            Self::EndTurn => "end_turn",
            Self::MaxTokens => "max_tokens",
            Self::ToolUse => "tool_use",
            Self::StopSequence => "stop_sequence",
            Self::PauseTurn => "pause_turn",
            Self::Refusal => "refusal",
            Self::Other(s) => s,
        }
    }
}

/// Highest content block `index` accepted in a stream. Real messages have a
/// handful of blocks (text, thinking, a few tool calls); the API documents no
/// limit, so this is a bound of our own: a larger index is a stream error,
/// never an allocation of that many blocks (issue 13).
pub const MAX_BLOCK_INDEX: usize = 1_024;

/// The `error` type set on [`MessageState::error`] when the stream itself is
/// malformed beyond tolerance (not an error event of the API).
pub const INVALID_STREAM: &str = "invalid_stream";

/// One content block being assembled.
#[derive(Clone, Debug, Default)]
struct Block {
    /// The block as started, updated by deltas (text, thinking, signature,
    /// citations); tool inputs are set at stop.
    value: Value,
    /// `input_json_delta` pieces, parsed once at `content_block_stop`.
    partial_json: String,
    /// `content_block_stop` was seen.
    complete: bool,
    /// Input JSON that did not parse at stop (the error, for the tool result).
    input_error: Option<String>,
}

/// Everything known about a streamed message so far.
#[derive(Clone, Debug, Default)]
pub struct MessageState {
    /// `msg_…` id from `message_start`.
    pub message_id: Option<String>,
    /// Model id from `message_start`.
    pub model: Option<String>,
    /// Usage: `message_start`, overlaid by each `message_delta`.
    pub usage: UsageReport,
    /// `message_start` was seen (input is billable from here on).
    pub started: bool,
    /// Last `stop_reason` reported.
    pub stop_reason: Option<StopReason>,
    /// `message_stop` was seen: the stream is complete.
    pub stopped: bool,
    /// An `error` event arrived mid-stream.
    pub error: Option<ErrorBody>,
    blocks: Vec<Block>,
    /// Events of unknown type seen (logged once by the caller).
    pub unknown_events: usize,
}

/// What one applied event changed, for the caller's progress display.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Visible text grew.
    Text,
    /// Nothing the user sees changed.
    Quiet,
    /// An unknown event, block or delta type (tolerated).
    Unknown(&'static str),
}

impl MessageState {
    /// Applies one event. Never panics: malformed sequences (a delta for a
    /// block that never started) are tolerated and reported as `Unknown`; a
    /// block index above [`MAX_BLOCK_INDEX`] sets [`MessageState::error`]
    /// (type [`INVALID_STREAM`]), which ends the call as failed.
    pub fn apply(&mut self, event: StreamEvent) -> Applied {
        match event {
            StreamEvent::MessageStart { message } => {
                self.started = true;
                self.message_id = Some(message.id);
                self.model = Some(message.model);
                self.usage = message.usage;
                Applied::Quiet
            }
            StreamEvent::ContentBlockStart { index, .. } if index > MAX_BLOCK_INDEX => {
                self.error = Some(ErrorBody {
                    kind: INVALID_STREAM.to_owned(),
                    message: format!("content block index {index} is above the bound of {MAX_BLOCK_INDEX}"),
                });
                Applied::Unknown("block index above the bound")
            }
            StreamEvent::ContentBlockStart { index, content_block } => {
                if self.blocks.len() <= index {
                    self.blocks.resize_with(index + 1, Block::default);
                }
                self.blocks[index] = Block { value: content_block, ..Block::default() };
                Applied::Quiet
            }
            StreamEvent::ContentBlockDelta { index, delta } => self.apply_delta(index, delta),
            StreamEvent::ContentBlockStop { index } => {
                if let Some(block) = self.blocks.get_mut(index) {
                    block.complete = true;
                    finish_tool_input(block);
                }
                Applied::Quiet
            }
            StreamEvent::MessageDelta { delta, usage } => {
                if let Some(reason) = delta.stop_reason.as_deref() {
                    self.stop_reason = Some(StopReason::parse(reason));
                }
                self.usage.merge(&usage);
                Applied::Quiet
            }
            StreamEvent::MessageStop => {
                self.stopped = true;
                Applied::Quiet
            }
            StreamEvent::Ping => Applied::Quiet,
            StreamEvent::Error { error } => {
                self.error = Some(error);
                Applied::Quiet
            }
            StreamEvent::Unknown => {
                self.unknown_events += 1;
                Applied::Unknown("event")
            }
        }
    }

    fn apply_delta(&mut self, index: usize, delta: Delta) -> Applied {
        let Some(block) = self.blocks.get_mut(index) else {
            return Applied::Unknown("delta for a block that never started");
        };
        let Some(obj) = block.value.as_object_mut() else {
            return Applied::Unknown("block that is not an object");
        };
        match delta {
            Delta::TextDelta { text } => {
                append(obj, "text", &text);
                Applied::Text
            }
            Delta::ThinkingDelta { thinking } => {
                append(obj, "thinking", &thinking);
                Applied::Quiet
            }
            Delta::SignatureDelta { signature } => {
                append(obj, "signature", &signature);
                Applied::Quiet
            }
            Delta::CitationsDelta { citation } => {
                let entry = obj.entry("citations").or_insert_with(|| Value::Array(Vec::new()));
                if let Value::Array(list) = entry {
                    list.push(citation);
                }
                Applied::Quiet
            }
            Delta::InputJsonDelta { partial_json } => {
                block.partial_json.push_str(&partial_json);
                Applied::Quiet
            }
            Delta::Unknown => Applied::Unknown("delta"),
        }
    }

    /// All visible text so far: the `text` blocks in order, adjacent blocks
    /// joined directly (citations split one sentence into blocks), blocks
    /// separated by a tool call joined by a blank line.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let mut gap = false;
        for b in &self.blocks {
            match b.value.get("type").and_then(Value::as_str) {
                Some("text") => {
                    let t = b.value.get("text").and_then(Value::as_str).unwrap_or_default();
                    if gap && !out.is_empty() && !t.is_empty() {
                        out.push_str("\n\n");
                    }
                    out.push_str(t);
                    gap = false;
                }
                Some("thinking" | "redacted_thinking") | None => {}
                Some(_) => gap = true,
            }
        }
        out
    }

    /// Everything the model generated so far, for counting the output of a
    /// stream cut short (DESIGN §6): visible text, thinking text and tool
    /// inputs (parsed, or the raw `input_json_delta` pieces of a block cut
    /// off), one block per line. Signatures and citations are not output
    /// the model wrote and are left out.
    pub fn generated_text(&self) -> String {
        let mut parts = Vec::new();
        for b in &self.blocks {
            let field = |k: &str| b.value.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
            let part = match b.value.get("type").and_then(Value::as_str) {
                Some("text") => field("text"),
                Some("thinking") => field("thinking"),
                Some("tool_use" | "server_tool_use") if b.complete => {
                    b.value.get("input").map(Value::to_string).unwrap_or_default()
                }
                Some("tool_use" | "server_tool_use") => b.partial_json.clone(),
                _ => String::new(),
            };
            if !part.is_empty() {
                parts.push(part);
            }
        }
        parts.join("\n")
    }

    /// The content blocks to store and send back as the assistant turn:
    /// complete blocks only (a block cut off mid-stream is dropped, except
    /// text, which is kept as received). Empty text blocks are dropped, as
    /// the API rejects them in requests.
    pub fn content_blocks(&self) -> Vec<Value> {
        self.blocks
            .iter()
            .filter(|b| {
                let kind = b.value.get("type").and_then(Value::as_str);
                match kind {
                    Some("text") => b.value.get("text").and_then(Value::as_str).is_some_and(|t| !t.is_empty()),
                    Some(_) => b.complete,
                    None => false,
                }
            })
            .map(|b| b.value.clone())
            .collect()
    }

    /// `tool_use` blocks that completed with valid input: `(id, name, input)`.
    /// A block whose input was cut off (not complete) is never returned.
    pub fn tool_uses(&self) -> Vec<(String, String, Result<Value, String>)> {
        self.blocks
            .iter()
            .filter(|b| b.complete && b.value.get("type").and_then(Value::as_str) == Some("tool_use"))
            .map(|b| {
                let id = b.value.get("id").and_then(Value::as_str).unwrap_or_default().to_owned();
                let name = b.value.get("name").and_then(Value::as_str).unwrap_or_default().to_owned();
                let input = match &b.input_error {
                    Some(e) => Err(e.clone()),
                    None => Ok(b.value.get("input").cloned().unwrap_or_else(|| Value::Object(Map::new()))),
                };
                (id, name, input)
            })
            .collect()
    }
}

fn append(obj: &mut Map<String, Value>, key: &str, piece: &str) {
    match obj.get_mut(key) {
        Some(Value::String(s)) => s.push_str(piece),
        _ => {
            obj.insert(key.to_owned(), Value::String(piece.to_owned()));
        }
    }
}

/// Tool inputs are parsed once, at `content_block_stop`; no pieces or only
/// `""` mean `{}` (Anthropic docs, "Streaming Messages": input_json_delta).
fn finish_tool_input(block: &mut Block) {
    let kind = block.value.get("type").and_then(Value::as_str);
    if !matches!(kind, Some("tool_use" | "server_tool_use")) {
        return;
    }
    let raw = block.partial_json.trim();
    let parsed = if raw.is_empty() {
        Ok(block.value.get("input").cloned().unwrap_or_else(|| Value::Object(Map::new())))
    } else {
        serde_json::from_str::<Value>(raw).map_err(|e| format!("tool input is not valid JSON: {e}"))
    };
    match parsed {
        Ok(v) if v.is_object() => {
            if let Some(obj) = block.value.as_object_mut() {
                obj.insert("input".into(), v);
            }
        }
        Ok(_) => block.input_error = Some("tool input is not a JSON object".into()),
        Err(e) => block.input_error = Some(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::anthropic::events::parse_event;

    fn replay(name: &str) -> MessageState {
        let path = format!("{}/../fixtures/anthropic/{name}", env!("CARGO_MANIFEST_DIR"));
        let body = std::fs::read_to_string(path).unwrap();
        let mut state = MessageState::default();
        for chunk in body.split("\n\n") {
            if let Some(data) = chunk.lines().find_map(|l| l.strip_prefix("data: ")) {
                state.apply(parse_event(data).unwrap());
            }
        }
        state
    }

    #[test]
    fn tool_input_is_assembled_and_parsed_at_block_stop() {
        let s = replay("thinking_then_tool.sse");
        let tools = s.tool_uses();
        assert_eq!(tools.len(), 1);
        assert_eq!(tools[0].1, "calculator");
        assert_eq!(tools[0].2.as_ref().unwrap()["expression"], "sqrt(9973)");
        assert_eq!(s.stop_reason, Some(StopReason::ToolUse));
        let blocks = s.content_blocks();
        assert_eq!(blocks[0]["type"], "thinking");
        assert!(blocks[0]["signature"].as_str().unwrap().starts_with("Eq2S"));
    }

    #[test]
    fn web_search_blocks_pass_through_and_the_last_usage_wins() {
        let s = replay("web_search_two_deltas.sse");
        let blocks = s.content_blocks();
        let kinds: Vec<_> = blocks.iter().map(|b| b["type"].as_str().unwrap().to_owned()).collect();
        assert_eq!(kinds, ["text", "server_tool_use", "web_search_tool_result", "text"]);
        assert_eq!(blocks[3]["citations"].as_array().unwrap().len(), 1);
        let t = s.usage.token_counts();
        assert_eq!((t.input, t.output, t.web_search_requests), (5400, 210, 1));
        assert_eq!(
            s.text(),
            "Let me look that up.\n\nThe latest release stabilised several APIs and improved compile times."
        );
    }

    #[test]
    fn an_error_event_mid_stream_is_recorded_with_the_partial_text() {
        let s = replay("overloaded_midstream.sse");
        assert_eq!(s.error.as_ref().unwrap().kind, "overloaded_error");
        assert_eq!(s.text(), "Three moons of Jupiter");
        assert!(!s.stopped);
    }

    #[test]
    fn a_tool_use_cut_off_before_its_stop_is_never_returned() {
        let mut s = MessageState::default();
        s.apply(parse_event(r#"{"type":"content_block_start","index":0,"content_block":{"type":"tool_use","id":"t1","name":"calculator","input":{}}}"#).unwrap());
        s.apply(parse_event(r#"{"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"{\"expr"}}"#).unwrap());
        assert!(s.tool_uses().is_empty());
        assert!(s.content_blocks().is_empty());
    }

    #[test]
    fn output_cut_short_counts_thinking_and_tool_input_not_only_visible_text() {
        let s = replay("thinking_then_tool.sse");
        let generated = s.generated_text();
        let thinking = s.content_blocks()[0]["thinking"].as_str().unwrap().to_owned();
        assert!(!thinking.is_empty());
        assert!(generated.contains(&thinking), "thinking is output: {generated}");
        assert!(generated.contains("sqrt(9973)"), "the tool input is output: {generated}");
        assert!(!generated.contains("Eq2S"), "the signature is not: {generated}");

        let mut cut = MessageState::default();
        cut.apply(parse_event(r#"{"type":"content_block_start","index":0,"content_block":{"type":"tool_use","id":"t1","name":"calculator","input":{}}}"#).unwrap());
        cut.apply(parse_event(r#"{"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"{\"expr"}}"#).unwrap());
        assert_eq!(cut.text(), "");
        assert_eq!(cut.generated_text(), r#"{"expr"#, "a cut tool input counts as received");
    }

    #[test]
    fn empty_tool_input_is_an_empty_object() {
        let s = replay("tool_empty_input.sse");
        let tools = s.tool_uses();
        assert_eq!(tools.len(), 1);
        assert_eq!(tools[0].2.as_ref().unwrap(), &serde_json::json!({}));
    }

    #[test]
    fn events_for_a_block_that_never_started_are_tolerated_not_a_panic() {
        let mut s = MessageState::default();
        let applied = s.apply(
            parse_event(r#"{"type":"content_block_delta","index":99,"delta":{"type":"text_delta","text":"ghost"}}"#)
                .unwrap(),
        );
        assert_eq!(applied, Applied::Unknown("delta for a block that never started"));
        assert_eq!(s.apply(parse_event(r#"{"type":"content_block_stop","index":99}"#).unwrap()), Applied::Quiet);
        assert_eq!(s.text(), "");
        assert!(s.content_blocks().is_empty());
        // A block that starts later at a lower index still works; the gap stays empty.
        s.apply(
            parse_event(r#"{"type":"content_block_start","index":1,"content_block":{"type":"text","text":""}}"#)
                .unwrap(),
        );
        let applied = s.apply(
            parse_event(r#"{"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":"hi"}}"#)
                .unwrap(),
        );
        assert_eq!(applied, Applied::Text);
        assert_eq!(
            s.apply(
                parse_event(r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"x"}}"#)
                    .unwrap()
            ),
            Applied::Unknown("block that is not an object")
        );
        assert_eq!(s.text(), "hi");
        assert_eq!(s.content_blocks().len(), 1);
    }

    #[test]
    fn a_block_index_of_four_billion_is_a_stream_error_not_an_allocation() {
        let mut s = MessageState::default();
        let applied = s.apply(
            parse_event(
                r#"{"type":"content_block_start","index":4000000000,"content_block":{"type":"text","text":""}}"#,
            )
            .unwrap(),
        );
        assert_eq!(applied, Applied::Unknown("block index above the bound"));
        assert_eq!(s.error.as_ref().map(|e| e.kind.as_str()), Some(INVALID_STREAM));
        assert!(s.content_blocks().is_empty(), "no block was allocated");
        assert!(s.blocks.capacity() <= MAX_BLOCK_INDEX + 1);
        // The bound itself is still accepted.
        let mut at_bound = MessageState::default();
        at_bound.apply(
            parse_event(&format!(
                r#"{{"type":"content_block_start","index":{MAX_BLOCK_INDEX},"content_block":{{"type":"text","text":""}}}}"#
            ))
            .unwrap(),
        );
        assert!(at_bound.error.is_none());
    }

    #[test]
    fn a_stream_without_message_stop_is_not_complete() {
        let mut s = MessageState::default();
        for data in [
            r#"{"type":"message_start","message":{"id":"msg_1","model":"claude-sonnet-4-5","usage":{"input_tokens":10,"output_tokens":1}}}"#,
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Half an ans"}}"#,
            r#"{"type":"content_block_stop","index":0}"#,
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":5}}"#,
        ] {
            s.apply(parse_event(data).unwrap());
        }
        assert!(s.started);
        assert!(!s.stopped, "a stop_reason is not message_stop");
        assert_eq!(s.stop_reason, Some(StopReason::EndTurn));
        assert_eq!(s.text(), "Half an ans");
    }
}
