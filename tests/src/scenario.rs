//! The scenario format of `fixtures/scenarios/*.toml` (fixtures README).
//! Fields this build does not know are kept, so the runner can report them
//! as failed checks instead of skipping them.

use crate::fake_telegram::Fault;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One end-to-end case.
#[derive(Debug, Clone, Deserialize)]
pub struct Scenario {
    /// `01_start_and_question`.
    pub name: String,
    /// What it shows.
    #[serde(default)]
    pub summary: String,
    /// `fleet`, `tools`, `lifecycle`, `telegram`.
    #[serde(default)]
    pub area: String,
    /// Credit granted before the steps.
    #[serde(default)]
    pub setup: Setup,
    /// Worker setting overrides.
    #[serde(default)]
    pub config: BTreeMap<String, toml::Value>,
    /// Steps, in order.
    #[serde(default, rename = "step")]
    pub steps: Vec<Step>,
    /// Checks after the last step.
    #[serde(default)]
    pub expect: toml::Table,
    /// Unknown top-level fields (reported as failures).
    #[serde(flatten)]
    pub unknown: BTreeMap<String, toml::Value>,
}

/// `[setup]`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Setup {
    /// User id → USD granted.
    #[serde(default)]
    pub grants_usd: BTreeMap<String, String>,
    /// Unknown fields.
    #[serde(flatten)]
    pub unknown: BTreeMap<String, toml::Value>,
}

/// One `[[step]]`.
#[derive(Debug, Clone, Deserialize)]
pub struct Step {
    /// Update file, relative to the fixtures folder.
    pub update: String,
    /// `during_previous_stream` to overlap the previous step.
    #[serde(default)]
    pub when: Option<String>,
    /// Post the update this many times.
    #[serde(default)]
    pub repeat: Option<u32>,
    /// Scripted Messages API answers, in call order.
    #[serde(default)]
    pub anthropic: Vec<AnthropicEntry>,
    /// Answer of the token-counting endpoint.
    #[serde(default)]
    pub count_tokens: Option<u64>,
    /// Bot API faults during this step.
    #[serde(default)]
    pub telegram_faults: Vec<Fault>,
    /// Checks of this step.
    #[serde(default)]
    pub expect: toml::Table,
    /// Unknown fields.
    #[serde(flatten)]
    pub unknown: BTreeMap<String, toml::Value>,
}

/// One scripted answer.
#[derive(Debug, Clone, Deserialize)]
pub struct AnthropicEntry {
    /// SSE file relative to the fixtures folder.
    #[serde(default)]
    pub sse: Option<String>,
    /// Pause before each event, ms.
    #[serde(default)]
    pub event_delay_ms: Option<u64>,
    /// Events sent before the stream stalls.
    #[serde(default)]
    pub stall_after_events: Option<usize>,
    /// Error status instead of a stream.
    #[serde(default)]
    pub http_status: Option<u16>,
    /// `retry-after` with the error status, seconds.
    #[serde(default)]
    pub retry_after_s: Option<u64>,
    /// Unknown fields.
    #[serde(flatten)]
    pub unknown: BTreeMap<String, toml::Value>,
}

/// A scenario file and its parse result.
#[derive(Debug)]
pub struct Loaded {
    /// The file.
    pub path: PathBuf,
    /// The scenario, or why it does not parse.
    pub scenario: Result<Scenario, String>,
}

/// Reads every `*.toml` of `dir/scenarios`, sorted by file name.
///
/// # Errors
/// The I/O error when the folder cannot be listed.
pub fn load_all(fixtures: &Path) -> std::io::Result<Vec<Loaded>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(fixtures.join("scenarios"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    Ok(files
        .into_iter()
        .map(|path| {
            let scenario = std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|t| toml::from_str::<Scenario>(&t).map_err(|e| e.to_string()));
            Loaded { path, scenario }
        })
        .collect())
}
