//! Rigs of the tools suite: [`ClaimedJob`], a job claimed on a fresh
//! database to call `worker::tools::run_tools` on directly; [`spawn_fleet`],
//! the ingress and a worker with tool settings against the fakes; updates
//! and SSE bodies written inline in the fixtures' format.

use crate::harness::{amqp_url, init_logs, within, worker_settings, TestApp, TestDb, WorkerDeps};
use anyhow::{bail, Result};
use serde_json::{json, Value};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use worker::job::{JobError, JobRow};
use worker::store::jobs::{Claim, ClaimedJob as Lease};
use worker::tools::{ToolOutcome, ToolUse};

/// Ada: user and private chat of the tests.
pub const ADA: i64 = 100_000_001;

/// The worker's settings of this suite: [`worker_settings`] with worker id
/// `tools-test-worker` and 6 database connections.
fn tools_settings(s: &mut worker::Settings) {
    s.worker_id = Some("tools-test-worker".to_owned());
    s.db.database_max_connections = 6;
}

/// A chat job of Ada's, claimed (status `running`, epoch 1) on a database of
/// its own, with the worker's context built from real settings.
pub struct ClaimedJob {
    /// The test database.
    pub db: TestDb,
    /// The built worker (not running): its context drives `run_tools`.
    app: worker::App,
    /// The job, as the pipeline loads it.
    pub job: JobRow,
    /// Its lease.
    pub lease: Lease,
}

impl ClaimedJob {
    /// Creates Ada, her chat and a job, and claims it; `TOOL_TIMEOUT_S` is
    /// `tool_timeout_s`.
    pub async fn new(tool_timeout_s: u64) -> Result<Self> {
        init_logs();
        let db = TestDb::new().await?;
        let prefix = format!("t{}_", Uuid::now_v7().simple());
        let amqp = amqp_url();
        // Nothing listens on port 9: no test here calls Telegram or Claude.
        let mut settings = worker_settings(&WorkerDeps {
            prefix: &prefix,
            amqp_url: &amqp,
            database_url: &db.url,
            telegram_api_url: "http://127.0.0.1:9",
            anthropic_base_url: "http://127.0.0.1:9",
        })?;
        tools_settings(&mut settings);
        settings.tool_timeout_s = tool_timeout_s;
        let app = within("building the worker", worker::App::build(settings)).await??;
        sqlx::query("INSERT INTO users (user_id, first_name) VALUES ($1, 'Ada')").bind(ADA).execute(&db.pool).await?;
        sqlx::query("INSERT INTO chats (chat_id, kind) VALUES ($1, 'private')").bind(ADA).execute(&db.pool).await?;
        let job_id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO jobs (job_id, chat_id, user_id, update_id, kind, user_content, telegram_message_id, status)
             VALUES ($1, $2, $2, 1, 'chat', '[{\"type\":\"text\",\"text\":\"hi\"}]', 1, 'queued')",
        )
        .bind(job_id)
        .bind(ADA)
        .execute(&db.pool)
        .await?;
        let claim =
            worker::store::jobs::claim(&db.pool, job_id, "tools-test-worker", Duration::from_secs(60), 3).await?;
        let Claim::Claimed(lease) = claim else { bail!("the job was not claimed: {claim:?}") };
        let job = worker::job::load(app.context(), job_id).await?;
        Ok(Self { db, app, job, lease })
    }

    /// The worker's context.
    pub fn ctx(&self) -> &worker::WorkerContext {
        self.app.context()
    }

    /// `run_tools` on this job, failing the test after [`WAIT`].
    pub async fn run(
        &self,
        uses: Vec<ToolUse>,
        cancel: &CancellationToken,
    ) -> Result<Result<Vec<ToolOutcome>, JobError>> {
        within("run_tools", worker::tools::run_tools(self.ctx(), &self.job, &self.lease, uses, cancel)).await
    }

    /// Notes stored for Ada, oldest first.
    pub async fn notes(&self) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar("SELECT note FROM user_notes WHERE user_id = $1 ORDER BY id")
            .bind(ADA)
            .fetch_all(&self.db.pool)
            .await?)
    }

    /// `(tool_use_id, is_error)` of every recorded call, by id.
    pub async fn tool_calls(&self) -> Result<Vec<(String, bool)>> {
        Ok(sqlx::query_as("SELECT tool_use_id, is_error FROM tool_calls WHERE job_id = $1 ORDER BY tool_use_id")
            .bind(self.job.job_id)
            .fetch_all(&self.db.pool)
            .await?)
    }

    /// `tool_use_id` of every billing event in the outbox, sorted.
    pub async fn charged_tool_uses(&self) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT payload->>'tool_use_id' FROM billing_outbox WHERE job_id = $1 ORDER BY payload->>'tool_use_id'",
        )
        .bind(self.job.job_id)
        .fetch_all(&self.db.pool)
        .await?)
    }

    /// Drops the database.
    pub async fn cleanup(self) -> Result<()> {
        self.app.context().db.close().await;
        self.db.cleanup().await
    }
}

/// A call as `run_tools` takes it.
pub fn tool_use(id: &str, name: &str, input: Value) -> ToolUse {
    (id.to_owned(), name.to_owned(), Ok(input))
}

/// Queries of this test's database that wait on a lock (a tool hanging
/// behind a lock the test holds).
pub async fn lock_waiters(db: &TestDb) -> Result<i64> {
    db.count(
        "SELECT count(*) FROM pg_stat_activity
          WHERE datname = current_database() AND wait_event_type = 'Lock' AND query ILIKE '%user_notes%'",
    )
    .await
}

/// The ingress and one worker of this suite's settings, changed by
/// `overrides` (`|s| s.tool_timeout_s = 20`), against the fakes on a
/// database and prefix of their own; no billing-worker.
pub async fn spawn_fleet(overrides: impl FnOnce(&mut worker::Settings) + Send + 'static) -> Result<TestApp> {
    TestApp::builder().without_billing_worker().worker(tools_settings).worker(overrides).spawn().await
}

/// A private text message from Ada.
pub fn message(update_id: i64, text: &str) -> Value {
    let mut update = json!({
        "update_id": update_id,
        "message": {
            "message_id": update_id % 100_000,
            "from": { "id": ADA, "is_bot": false, "first_name": "Ada", "language_code": "en" },
            "chat": { "id": ADA, "first_name": "Ada", "type": "private" },
            "date": 1_764_460_800,
            "text": text,
        }
    });
    if let Some(command) = text.strip_prefix('/') {
        let length = command.split_whitespace().next().unwrap_or_default().len() + 1;
        update["message"]["entities"] = json!([{ "type": "bot_command", "offset": 0, "length": length }]);
    }
    update
}

/// A private message from Ada carrying `document` (a Bot API `Document`).
pub fn document_message(update_id: i64, document: Value, caption: Option<&str>) -> Value {
    let mut update = message(update_id, "");
    let msg = &mut update["message"];
    if let Some(fields) = msg.as_object_mut() {
        fields.remove("text");
    }
    msg["document"] = document;
    if let Some(caption) = caption {
        msg["caption"] = json!(caption);
    }
    update
}

/// SSE bodies of `POST /v1/messages` in the fixtures' format.
pub mod sse {
    use serde_json::{json, Value};

    /// One event: `event:` and `data:` lines and a blank line.
    pub fn event(data: &Value) -> String {
        format!("event: {}\ndata: {data}\n\n", data["type"].as_str().unwrap_or_default())
    }

    fn start(id: &str) -> String {
        event(&json!({"type": "message_start", "message": {"id": id, "type": "message", "role": "assistant",
            "model": "claude-sonnet-4-5-20250929", "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 500, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                "output_tokens": 1, "service_tier": "standard"}}}))
    }

    fn end(stop_reason: &str) -> String {
        event(&json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null},
            "usage": {"output_tokens": 40}}))
            + &event(&json!({"type": "message_stop"}))
    }

    fn tool_block(index: usize, id: &str, name: &str, partial_json: &str) -> String {
        event(&json!({"type": "content_block_start", "index": index,
            "content_block": {"type": "tool_use", "id": id, "name": name, "input": {}}}))
            + &event(&json!({"type": "content_block_delta", "index": index,
                "delta": {"type": "input_json_delta", "partial_json": partial_json}}))
    }

    fn block_stop(index: usize) -> String {
        event(&json!({"type": "content_block_stop", "index": index}))
    }

    /// A turn that calls each `(id, name, input)` and stops for `tool_use`.
    pub fn tool_turn(calls: &[(&str, &str, Value)]) -> String {
        let mut body = start("msg_tools_turn");
        for (i, (id, name, input)) in calls.iter().enumerate() {
            body += &tool_block(i, id, name, &input.to_string());
            body += &block_stop(i);
        }
        body + &end("tool_use")
    }

    /// A turn that answers `text` and ends.
    pub fn text_turn(text: &str) -> String {
        start("msg_text_turn")
            + &event(&json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}))
            + &event(&json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}))
            + &block_stop(0)
            + &end("end_turn")
    }

    /// A turn whose `remember` input is cut after `{"note": "half`: the
    /// stream stops there (`None`) or the block closes and the message
    /// ends with `stop_reason` (`max_tokens`).
    pub fn cut_tool_input(stop_reason: Option<&str>) -> String {
        let mut body = start("msg_cut_turn")
            + &event(
                &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            )
            + &event(&json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": "Saving that."}}))
            + &block_stop(0)
            + &tool_block(1, "toolu_cut", "remember", "{\"note\": \"half");
        if let Some(reason) = stop_reason {
            body += &block_stop(1);
            body += &end(reason);
        }
        body
    }

    /// How many events `body` has.
    pub fn event_count(body: &str) -> usize {
        body.matches("\n\n").count()
    }
}

/// Hand-written PDFs for the document tests (each input written by the
/// test, no binary blobs).
pub mod pdf {
    /// A PDF of `objects` (object `n` is `objects[n - 1]`, written verbatim
    /// between `n 0 obj` and `endobj`), with its cross-reference table;
    /// object 1 is the catalog.
    pub fn document(objects: &[Vec<u8>]) -> Vec<u8> {
        let mut out = b"%PDF-1.4\n".to_vec();
        let mut offsets = Vec::new();
        for (i, object) in objects.iter().enumerate() {
            offsets.push(out.len());
            out.extend(format!("{} 0 obj\n", i + 1).bytes());
            out.extend(object);
            out.extend(b"\nendobj\n");
        }
        let xref = out.len();
        out.extend(format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).bytes());
        for offset in offsets {
            out.extend(format!("{offset:010} 00000 n \n").bytes());
        }
        out.extend(
            format!("trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n", objects.len() + 1).bytes(),
        );
        out
    }

    /// A stream object: `<< dict /Length n >> stream … endstream`.
    pub fn stream(dict: &str, content: &[u8]) -> Vec<u8> {
        let mut s = format!("<< {dict} /Length {} >>\nstream\n", content.len()).into_bytes();
        s.extend(content);
        s.extend(b"\nendstream");
        s
    }
}
