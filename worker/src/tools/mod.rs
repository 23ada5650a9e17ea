//! Tools Claude may call (Messages API "Tool use"): a registry of built-in
//! tools, input validation against each tool's JSON Schema, and parallel
//! execution where every tool gets its own pooled connection and
//! transaction (P4, audit #1 and #4): a failing tool rolls back only its own
//! writes and is reported to Claude as an error `tool_result`.
//!
//! A successful call of a priced tool writes its billing event to the outbox
//! in the same transaction as its result (P7). A `tool_use` id already
//! recorded for the job is not run again (unique `(job_id, tool_use_id)`).
//!
//! # Layout
//! - this file: the declarations ([`builtin`]), the [`Registry`] and [`ToolOutcome`].
//! - `run`: [`run_tools`], a transaction, a timeout and cancellation per call.
//! - `calculator`, `clock`, `notes`, `files`: the tools themselves.

mod calculator;
mod clock;
mod files;
mod notes;
mod run;

pub use calculator::evaluate;
pub use files::MAX_READ_CHARS;
pub use run::{run_tools, ToolUse};

use serde_json::{json, Value};
use std::collections::BTreeMap;

/// One tool's declaration.
#[derive(Debug, Clone)]
pub struct ToolSpec {
    /// Name Claude calls it by.
    pub name: &'static str,
    /// What it does, for the model.
    pub description: &'static str,
    /// JSON Schema of its input.
    pub schema: Value,
}

/// Every built-in tool.
pub fn builtin() -> Vec<ToolSpec> {
    vec![
        ToolSpec {
            name: "calculator",
            description: "Evaluates an arithmetic expression exactly (integers) or in floating point, with functions such as sqrt, ln, log10, exp, sin, cos, tan, abs, floor, round, min, max and ^ for powers.",
            schema: json!({"type": "object", "properties": {"expression": {"type": "string", "minLength": 1, "maxLength": 1000}}, "required": ["expression"], "additionalProperties": false}),
        },
        ToolSpec {
            name: "current_time",
            description: "Returns the current date and time, in the given IANA time zone (e.g. Asia/Tokyo) or in UTC.",
            schema: json!({"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 64}}, "additionalProperties": false}),
        },
        ToolSpec {
            name: "remember",
            description: "Saves a short note about the user for later conversations.",
            schema: json!({"type": "object", "properties": {"note": {"type": "string", "minLength": 1, "maxLength": 2000}}, "required": ["note"], "additionalProperties": false}),
        },
        ToolSpec {
            name: "recall",
            description: "Returns the notes saved about the user, newest first, optionally only those containing `query`.",
            schema: json!({"type": "object", "properties": {"query": {"type": "string", "maxLength": 200}}, "additionalProperties": false}),
        },
        ToolSpec {
            name: "list_files",
            description: "Lists the files (documents) the user has sent: id, name, MIME type, size and date, newest first. Read one with read_file.",
            schema: json!({"type": "object", "properties": {}, "additionalProperties": false}),
        },
        ToolSpec {
            name: "read_file",
            description: "Returns the text of a file the user sent (text files and PDFs), by its id. Long files come in slices: read max_chars characters (default 10,000, at most 20,000) from offset, and continue from next_offset until it is null.",
            schema: json!({"type": "object", "properties": {
                "id": {"type": "integer", "minimum": 1},
                "offset": {"type": "integer", "minimum": 0},
                "max_chars": {"type": "integer", "minimum": 1, "maximum": files::MAX_READ_CHARS}
            }, "required": ["id"], "additionalProperties": false}),
        },
    ]
}

/// The enabled tools with compiled validators.
pub struct Registry {
    specs: Vec<ToolSpec>,
    validators: BTreeMap<&'static str, jsonschema::Validator>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("tools", &self.specs.iter().map(|s| s.name).collect::<Vec<_>>()).finish()
    }
}

impl Registry {
    /// The registry of the named tools.
    ///
    /// # Errors
    /// An unknown tool name, or a schema that does not compile.
    pub fn new(enabled: &[String]) -> Result<Self, String> {
        let all = builtin();
        let mut specs = Vec::new();
        let mut validators = BTreeMap::new();
        for name in enabled.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
            let spec = all.iter().find(|s| s.name == name).ok_or_else(|| format!("unknown tool {name:?} in TOOLS"))?;
            let v = jsonschema::validator_for(&spec.schema).map_err(|e| format!("schema of {name}: {e}"))?;
            validators.insert(spec.name, v);
            specs.push(spec.clone());
        }
        Ok(Self { specs, validators })
    }

    /// The `tools` array of a Messages API request.
    pub fn request_tools(&self) -> Vec<Value> {
        self.specs
            .iter()
            .map(|s| json!({ "name": s.name, "description": s.description, "input_schema": s.schema }))
            .collect()
    }

    /// Checks `input` against the tool's schema.
    ///
    /// # Errors
    /// Why the input is invalid, or that the tool is unknown.
    pub fn validate(&self, name: &str, input: &Value) -> Result<(), String> {
        let v = self.validators.get(name).ok_or_else(|| format!("unknown tool {name:?}"))?;
        let errors: Vec<String> = v.iter_errors(input).map(|e| e.to_string()).take(5).collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(format!("invalid input for {name}: {}", errors.join("; ")))
        }
    }
}

/// The result of one tool call, as sent back to Claude.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolOutcome {
    /// The `tool_use` id answered.
    pub tool_use_id: String,
    /// Tool name.
    pub name: String,
    /// Output or error text.
    pub content: String,
    /// The call failed.
    pub is_error: bool,
    /// Price charged (zero for failures and free tools).
    pub charged: rust_decimal::Decimal,
}

impl ToolOutcome {
    /// The `tool_result` block.
    pub fn block(&self) -> Value {
        let mut b = json!({ "type": "tool_result", "tool_use_id": self.tool_use_id, "content": self.content });
        if self.is_error {
            b["is_error"] = Value::Bool(true);
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_checked_against_the_schema() {
        let r = Registry::new(&["calculator".into(), "current_time".into()]).unwrap();
        assert!(r.validate("calculator", &json!({"expression": "1+1"})).is_ok());
        assert!(r.validate("calculator", &json!({})).unwrap_err().contains("expression"));
        assert!(r.validate("calculator", &json!({"expression": 5})).is_err());
        assert!(r.validate("current_time", &json!({})).is_ok());
        assert!(r.validate("remember", &json!({"note": "x"})).is_err(), "not enabled");
        assert!(Registry::new(&["nope".into()]).is_err());
    }

    #[test]
    fn read_file_inputs_are_checked_against_the_schema() {
        let r = Registry::new(&["list_files".into(), "read_file".into()]).unwrap();
        assert!(r.validate("list_files", &json!({})).is_ok());
        assert!(r.validate("list_files", &json!({"x": 1})).is_err());
        assert!(r.validate("read_file", &json!({"id": 7, "offset": 100, "max_chars": 20000})).is_ok());
        assert!(r.validate("read_file", &json!({"id": 7, "max_chars": 20001})).is_err());
        assert!(r.validate("read_file", &json!({"id": "7"})).is_err());
        assert!(r.validate("read_file", &json!({"offset": 0})).is_err());
        assert!(r.validate("read_file", &json!({"id": 7, "offset": -1})).is_err());
    }

    #[test]
    fn every_builtin_tool_is_enabled_by_default() {
        use clap::Parser as _;
        let settings = crate::Settings::try_parse_from(["worker"]).unwrap();
        let names: Vec<&str> = builtin().iter().map(|s| s.name).collect();
        assert_eq!(settings.tools, names);
    }
}
