//! Tools Claude may call (Messages API "Tool use"): a registry of built-in
//! tools, input validation against each tool's JSON Schema, and parallel
//! execution where every tool gets its own pooled connection and
//! transaction (P4, audit #1 and #4): a failing tool rolls back only its own
//! writes and is reported to Claude as an error `tool_result`.
//!
//! A successful call of a priced tool writes its billing event to the outbox
//! in the same transaction as its result (P7). A `tool_use` id already
//! recorded for the job is not run again (unique `(job_id, tool_use_id)`).

mod calculator;
mod clock;
mod notes;

pub use calculator::evaluate;

use crate::context::WorkerContext;
use crate::job::{JobError, JobRow};
use crate::lease::Lease;
use chrono::Utc;
use serde_json::{json, Value};
use shared::contracts::{tool_event_id, BillingEvent, ToolCharge};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

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

/// A requested call: `(tool_use id, name, parsed input or why it did not parse)`.
pub type ToolUse = (String, String, Result<Value, String>);

/// Runs every call of one turn concurrently; outcomes in the order of `uses`.
///
/// # Errors
/// `LeaseLost` when the job's lease is gone (nothing of the tools is kept),
/// database errors.
pub async fn run_tools(
    ctx: &WorkerContext,
    job: &JobRow,
    lease: &Lease,
    uses: Vec<ToolUse>,
    cancel: &CancellationToken,
) -> Result<Vec<ToolOutcome>, JobError> {
    let runs = uses.into_iter().map(|u| run_one(ctx, job, lease, u, cancel));
    futures_util::future::join_all(runs).await.into_iter().collect()
}

async fn run_one(
    ctx: &WorkerContext,
    job: &JobRow,
    lease: &Lease,
    (id, name, input): ToolUse,
    cancel: &CancellationToken,
) -> Result<ToolOutcome, JobError> {
    let previous: Option<(Option<Value>, bool)> =
        sqlx::query_as("SELECT output, is_error FROM tool_calls WHERE job_id = $1 AND tool_use_id = $2")
            .bind(job.job_id)
            .bind(&id)
            .fetch_optional(&ctx.db)
            .await?;
    if let Some((output, is_error)) = previous {
        tracing::info!(tool_use_id = %id, "tool_use id seen before in this job; not run again");
        let content = output.and_then(|o| o.as_str().map(str::to_owned)).unwrap_or_default();
        return Ok(ToolOutcome { tool_use_id: id, name, content, is_error, charged: Default::default() });
    }
    let input_value = input.clone().unwrap_or(Value::Null);
    let checked = input.and_then(|i| ctx.tools.validate(&name, &i).map(|()| i));
    let started = Instant::now();
    let result: Result<(), String> = match checked {
        Err(e) => Err(e),
        Ok(input) => {
            let mut tx = ctx.db.begin().await?;
            // Fence: the tool's writes commit only under the live lease.
            let held: Option<i64> = sqlx::query_scalar(
                "SELECT lease_epoch FROM jobs WHERE job_id = $1 AND status = 'running' AND lease_epoch = $2 FOR SHARE",
            )
            .bind(lease.job_id)
            .bind(lease.epoch)
            .fetch_optional(&mut *tx)
            .await?;
            if held.is_none() {
                return Err(JobError::LeaseLost);
            }
            let timeout = Duration::from_secs(ctx.settings.tool_timeout_s);
            let ran = tokio::select! {
                _ = cancel.cancelled() => Err("cancelled: the user stopped the answer".to_owned()),
                r = tokio::time::timeout(timeout, execute(&mut tx, job.user_id, &name, &input)) => match r {
                    Ok(r) => r,
                    Err(_) => Err(format!("the tool did not finish within {} s", timeout.as_secs())),
                },
            };
            match ran {
                Ok(output) => {
                    let price = ctx.prices.tool_price(&name);
                    record(&mut tx, job, &id, &name, &input, Some(&output), false, started).await?;
                    if price.0 > rust_decimal::Decimal::ZERO {
                        let event = BillingEvent::ToolCharge(ToolCharge {
                            event_id: tool_event_id(job.job_id, &id),
                            job_id: job.job_id,
                            user_id: job.user_id,
                            chat_id: job.chat_id,
                            tool_use_id: id.clone(),
                            tool_name: name.clone(),
                            user_charge: price,
                            occurred_at: Utc::now(),
                        });
                        sqlx::query("INSERT INTO billing_outbox (event_id, job_id, payload) VALUES ($1, $2, $3) ON CONFLICT (event_id) DO NOTHING")
                            .bind(event.event_id())
                            .bind(job.job_id)
                            .bind(serde_json::to_value(&event).map_err(|e| JobError::Invalid(e.to_string()))?)
                            .execute(&mut *tx)
                            .await?;
                    }
                    tx.commit().await?;
                    ctx.outbox_notify.notify_one();
                    return Ok(ToolOutcome {
                        tool_use_id: id,
                        name,
                        content: output,
                        is_error: false,
                        charged: price.0,
                    });
                }
                Err(e) => {
                    // Only this tool's writes are undone.
                    tx.rollback().await?;
                    Err(e)
                }
            }
        }
    };
    let error = result.err().unwrap_or_default();
    tracing::warn!(tool = %name, tool_use_id = %id, error.message = %error, "tool call failed");
    let mut conn = ctx.db.acquire().await?;
    record(&mut conn, job, &id, &name, &input_value, Some(&error), true, started).await?;
    Ok(ToolOutcome { tool_use_id: id, name, content: error, is_error: true, charged: Default::default() })
}

#[allow(clippy::too_many_arguments)]
async fn record(
    conn: &mut sqlx::PgConnection,
    job: &JobRow,
    id: &str,
    name: &str,
    input: &Value,
    output: Option<&str>,
    is_error: bool,
    started: Instant,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO tool_calls (job_id, tool_use_id, name, input, output, is_error, duration_ms)
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (job_id, tool_use_id) DO NOTHING",
    )
    .bind(job.job_id)
    .bind(id)
    .bind(name)
    .bind(input)
    .bind(output.map(|o| Value::String(o.to_owned())))
    .bind(is_error)
    .bind(i32::try_from(started.elapsed().as_millis()).unwrap_or(i32::MAX))
    .execute(conn)
    .await?;
    Ok(())
}

async fn execute(tx: &mut sqlx::PgConnection, user_id: i64, name: &str, input: &Value) -> Result<String, String> {
    match name {
        "calculator" => calculator::evaluate(input.get("expression").and_then(Value::as_str).unwrap_or_default()),
        "current_time" => clock::now(input),
        "remember" => notes::remember(tx, user_id, input).await,
        "recall" => notes::recall(tx, user_id, input).await,
        other => Err(format!("unknown tool {other:?}")),
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
}
