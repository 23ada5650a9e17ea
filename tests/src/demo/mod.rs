//! The demo: plays the scenarios of a fixtures folder through the real
//! fleet (separate processes, real webhook, real broker and databases)
//! against the in-process fakes, and checks every expectation.
//!
//! - [`run_scenario`] plays one scenario and returns its [`ScenarioReport`].
//! - [`checks`] evaluates the expectation fields.

pub mod checks;

use crate::fake_anthropic::{FakeAnthropic, ScriptedResponse};
use crate::fake_telegram::{FakeTelegram, TgCall, TgMessage};
use crate::fleet::{delete_topology, Databases, Fleet, FleetConfig, Services};
use crate::scenario::{Scenario, Step};
use anyhow::Context;
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::Value;
use shared::telegram::RoutingInfo;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// One checked expectation.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Step number (1-based); 0 for scenario-level checks.
    pub step: usize,
    /// Expectation name (`provider_cost_usd`, …).
    pub check: String,
    /// Whether it held.
    pub passed: bool,
    /// What was seen.
    pub detail: String,
}

/// A ledger entry, for printing.
#[derive(Debug, Clone, Serialize)]
pub struct LedgerLine {
    /// Entry kind.
    pub kind: String,
    /// Debited account.
    pub debit: String,
    /// Credited account.
    pub credit: String,
    /// USD.
    pub amount: String,
    /// Output counted by us.
    pub estimated: bool,
}

/// What one scenario did and whether it passed.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    /// Scenario name.
    pub name: String,
    /// Its area.
    pub area: String,
    /// True when every check passed.
    pub passed: bool,
    /// Every check.
    pub checks: Vec<Check>,
    /// Lines of the transcript the user saw.
    #[serde(skip)]
    pub transcript: Vec<String>,
    /// The ledger after the scenario (grants included).
    #[serde(skip)]
    pub ledger: Vec<LedgerLine>,
}

/// Settings of a demo run.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Fixtures folder (with `scenarios/`, `telegram/`, `anthropic/`, `prices.toml`).
    pub fixtures: PathBuf,
    /// Folder of the fleet binaries.
    pub bin_dir: PathBuf,
    /// Folder for logs.
    pub log_dir: PathBuf,
    /// Services.
    pub services: Services,
    /// Worker processes per scenario.
    pub workers: usize,
}

/// Everything recorded about one step.
#[derive(Debug, Clone)]
pub struct StepRecord {
    /// 1-based.
    pub number: usize,
    /// The step.
    pub step: Step,
    /// The update as posted.
    pub update: Value,
    /// Its update_id.
    pub update_id: i64,
    /// Its chat.
    pub chat_id: Option<i64>,
    /// When it was (first) posted.
    pub posted_at: Instant,
    /// HTTP statuses of the posts.
    pub post_statuses: Vec<u16>,
    /// Anthropic calls made in this step's window (indices into the fake's calls).
    pub anthropic_calls: std::ops::Range<usize>,
    /// Telegram calls in this step's window.
    pub telegram_calls: std::ops::Range<usize>,
    /// The job and its reply message ids.
    pub job: Option<(Uuid, Vec<i64>)>,
    /// Final messages attributed to this step.
    pub replies: Vec<TgMessage>,
    /// Ledger entries of the step's job: (kind, amount).
    pub entries: Vec<(String, Decimal)>,
    /// The answer text of the step's SSE files (text deltas, in order).
    pub streamed_answer: String,
}

/// The fakes and the fleet of one scenario.
struct Run<'a> {
    cfg: &'a DemoConfig,
    anthropic: FakeAnthropic,
    telegram: FakeTelegram,
    dbs: Databases,
    fleet: Option<Fleet>,
    http: reqwest::Client,
}

const SECRET: &str = "demo-webhook-secret";
const TOKEN: &str = "7000000001:DEMO";
const STEP_TIMEOUT: Duration = Duration::from_secs(90);

/// Maps a scenario `[config]` key to the worker's environment variable.
fn config_env(key: &str) -> Option<&'static str> {
    Some(match key {
        "max_tokens" => "ANTHROPIC_MAX_TOKENS",
        "max_continuations" => "MAX_CONTINUATIONS",
        "idle_timeout_s" => "IDLE_TIMEOUT_S",
        "stream_deadline_s" => "STREAM_DEADLINE_S",
        "visibility_timeout_s" => "VISIBILITY_TIMEOUT_S",
        "max_attempts" => "MAX_ATTEMPTS",
        "model" => "ANTHROPIC_MODEL",
        _ => return None,
    })
}

/// Plays one scenario.
pub async fn run_scenario(cfg: &DemoConfig, scenario: &Scenario) -> ScenarioReport {
    let mut report = ScenarioReport {
        name: scenario.name.clone(),
        area: scenario.area.clone(),
        passed: false,
        checks: Vec::new(),
        transcript: Vec::new(),
        ledger: Vec::new(),
    };
    match play(cfg, scenario, &mut report).await {
        Ok(()) => {}
        Err(e) => report.checks.push(Check { step: 0, check: "run".into(), passed: false, detail: format!("{e:#}") }),
    }
    report.passed = !report.checks.is_empty() && report.checks.iter().all(|c| c.passed);
    report
}

async fn play(cfg: &DemoConfig, scenario: &Scenario, report: &mut ScenarioReport) -> anyhow::Result<()> {
    for key in scenario.unknown.keys().chain(scenario.setup.unknown.keys()) {
        report.checks.push(Check {
            step: 0,
            check: key.clone(),
            passed: false,
            detail: "unknown scenario field".into(),
        });
    }
    let mut worker_env = BTreeMap::new();
    for (k, v) in &scenario.config {
        match config_env(k) {
            Some(env) => {
                let value = match v {
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                worker_env.insert(env.to_owned(), value);
            }
            None => report.checks.push(Check {
                step: 0,
                check: format!("config.{k}"),
                passed: false,
                detail: "unknown config setting".into(),
            }),
        }
    }
    let stem = format!("demo_{}", &Uuid::now_v7().simple().to_string()[20..]);
    let prefix = format!("{stem}_");
    let anthropic = FakeAnthropic::start("127.0.0.1:0".parse()?).await?;
    let telegram = FakeTelegram::start("127.0.0.1:0".parse()?, "fleet_test_bot").await?;
    let dbs = Databases::create(&cfg.services, &stem).await?;
    let fleet_cfg = FleetConfig {
        bin_dir: cfg.bin_dir.clone(),
        log_dir: cfg.log_dir.join(&scenario.name),
        services: cfg.services.clone(),
        prefix: prefix.clone(),
        bot_db_url: dbs.bot_url.clone(),
        billing_db_url: dbs.billing_url.clone(),
        telegram_api_url: telegram.api_url(),
        anthropic_base_url: anthropic.base_url(),
        prices_file: cfg.fixtures.join("prices.toml"),
        bot_token: TOKEN.into(),
        webhook_secret: SECRET.into(),
        worker_env,
        workers: cfg.workers,
    };
    let fleet = Fleet::start(&fleet_cfg).await?;
    let mut run = Run { cfg, anthropic, telegram, dbs, fleet: Some(fleet), http: reqwest::Client::new() };
    let result = run.steps(scenario, report).await;
    if let Some(fleet) = run.fleet.take() {
        fleet.stop().await;
    }
    report.ledger = ledger_lines(&run.dbs).await.unwrap_or_default();
    let _ = delete_topology(&cfg.services.amqp_url, &prefix).await;
    let _ = run.dbs.drop_all().await;
    result
}

impl Run<'_> {
    async fn steps(&mut self, scenario: &Scenario, report: &mut ScenarioReport) -> anyhow::Result<()> {
        for (user, usd) in &scenario.setup.grants_usd {
            self.grant(user, usd).await?;
        }
        let mut records: Vec<StepRecord> = Vec::new();
        let mut i = 0;
        while i < scenario.steps.len() {
            // A step and the steps that overlap it form one group.
            let mut group = vec![i];
            while group.last().is_some_and(|&j| j + 1 < scenario.steps.len())
                && scenario.steps[group[group.len() - 1] + 1].when.as_deref() == Some("during_previous_stream")
            {
                group.push(group[group.len() - 1] + 1);
            }
            let first = records.len();
            for (k, &idx) in group.iter().enumerate() {
                let step = &scenario.steps[idx];
                for key in step.unknown.keys() {
                    report.checks.push(Check {
                        step: idx + 1,
                        check: key.clone(),
                        passed: false,
                        detail: "unknown step field".into(),
                    });
                }
                if let Some(w) = step.when.as_deref().filter(|w| *w != "during_previous_stream") {
                    report.checks.push(Check {
                        step: idx + 1,
                        check: "when".into(),
                        passed: false,
                        detail: format!("unknown when = {w:?}"),
                    });
                }
                if k > 0 {
                    // Post as soon as the previous step's first progress update reached Telegram.
                    let since = records[records.len() - 1].telegram_calls.start;
                    let seen = self
                        .telegram
                        .wait_for_call(
                            |c| {
                                c.index >= since
                                    && matches!(
                                        c.method.as_str(),
                                        "sendMessageDraft" | "editMessageText" | "sendMessage"
                                    )
                            },
                            Duration::from_secs(30),
                        )
                        .await;
                    if !seen {
                        report.checks.push(Check {
                            step: idx + 1,
                            check: "when".into(),
                            passed: false,
                            detail: "the previous step never showed progress".into(),
                        });
                    }
                }
                records.push(self.post_step(idx + 1, step).await?);
            }
            self.wait_group(&records[first..]).await?;
            self.collect_group(&mut records[first..]).await?;
            i = group[group.len() - 1] + 1;
        }
        for rec in &records {
            report.transcript.extend(transcript_lines(rec));
            checks::step_checks(rec, &records, &self.anthropic.calls(), &self.telegram.calls(), &mut report.checks);
        }
        checks::final_checks(&scenario.expect, &self.dbs.billing, &mut report.checks).await;
        Ok(())
    }

    async fn grant(&self, user: &str, usd: &str) -> anyhow::Result<()> {
        let out = tokio::process::Command::new(self.cfg.bin_dir.join("billing-worker"))
            .env("BILLING_DATABASE_URL", crate::fleet::as_role(&self.dbs.billing_url, crate::fleet::BILLING_ROLE)?)
            .env("LOG_FORMAT", "json")
            .args(["grant", "--user", user, "--usd", usd, "--idempotency-key", &format!("setup-{user}")])
            .output()
            .await
            .context("running billing-worker grant")?;
        if !out.status.success() {
            anyhow::bail!("grant failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    async fn post_step(&self, number: usize, step: &Step) -> anyhow::Result<StepRecord> {
        let path = self.cfg.fixtures.join(&step.update);
        let body = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let update: Value = serde_json::from_slice(&body).with_context(|| format!("parsing {}", path.display()))?;
        let info = RoutingInfo::from_bytes(&body).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let mut streamed_answer = String::new();
        let mut scripted = Vec::new();
        for entry in &step.anthropic {
            let mut r = ScriptedResponse::default();
            if let Some(sse) = &entry.sse {
                let bytes = std::fs::read(self.cfg.fixtures.join(sse)).with_context(|| format!("reading {sse}"))?;
                streamed_answer.push_str(&sse_text(&bytes));
                r.sse = Some(bytes.into());
            }
            r.event_delay_ms = entry.event_delay_ms.unwrap_or(0);
            r.stall_after_events = entry.stall_after_events;
            r.http_status = entry.http_status;
            r.retry_after_s = entry.retry_after_s;
            scripted.push(r);
        }
        self.anthropic.push(scripted);
        if let Some(n) = step.count_tokens {
            self.anthropic.set_count_tokens(n);
        }
        self.telegram.clear_faults();
        for f in &step.telegram_faults {
            self.telegram.add_fault(f.clone());
        }
        let anthropic_start = self.anthropic.call_count();
        let telegram_start = self.telegram.calls().len();
        let posted_at = Instant::now();
        let mut post_statuses = Vec::new();
        for _ in 0..step.repeat.unwrap_or(1).max(1) {
            let status = self
                .http
                .post(self.fleet.as_ref().map(Fleet::webhook_url).unwrap_or_default())
                .header("x-telegram-bot-api-secret-token", SECRET)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .context("posting the update to the webhook")?
                .status()
                .as_u16();
            post_statuses.push(status);
        }
        Ok(StepRecord {
            number,
            step: step.clone(),
            update,
            update_id: info.update_id,
            chat_id: info.chat_id,
            posted_at,
            post_statuses,
            anthropic_calls: anthropic_start..anthropic_start,
            telegram_calls: telegram_start..telegram_start,
            job: None,
            replies: Vec::new(),
            entries: Vec::new(),
            streamed_answer,
        })
    }

    /// Waits until every update of the group was processed (all deliveries),
    /// its job (if any) ended, the outbox is relayed and the ledger applied it.
    async fn wait_group(&self, group: &[StepRecord]) -> anyhow::Result<()> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            if self.group_settled(group).await? {
                return Ok(());
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "steps {:?} did not settle within {STEP_TIMEOUT:?}",
                    group.iter().map(|r| r.number).collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn group_settled(&self, group: &[StepRecord]) -> anyhow::Result<bool> {
        for rec in group {
            let accepted = rec.post_statuses.iter().filter(|s| **s == 200).count() as i32;
            let deliveries: Option<i32> =
                sqlx::query_scalar("SELECT deliveries FROM processed_updates WHERE update_id = $1")
                    .bind(rec.update_id)
                    .fetch_optional(&self.dbs.bot)
                    .await?;
            if accepted > 0 && deliveries.unwrap_or(0) < accepted {
                return Ok(false);
            }
            let open: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM jobs WHERE update_id = $1 AND status IN ('queued', 'running')",
            )
            .bind(rec.update_id)
            .fetch_one(&self.dbs.bot)
            .await?;
            if open > 0 {
                return Ok(false);
            }
        }
        let events: Vec<(Uuid, Option<chrono::DateTime<chrono::Utc>>)> =
            sqlx::query_as("SELECT event_id, published_at FROM billing_outbox").fetch_all(&self.dbs.bot).await?;
        if events.iter().any(|(_, p)| p.is_none()) {
            return Ok(false);
        }
        let ids: Vec<Uuid> = events.into_iter().map(|(id, _)| id).collect();
        let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM applied_events WHERE event_id = ANY($1)")
            .bind(&ids)
            .fetch_one(&self.dbs.billing)
            .await?;
        Ok(applied == ids.len() as i64)
    }

    async fn collect_group(&self, group: &mut [StepRecord]) -> anyhow::Result<()> {
        let a_end = self.anthropic.call_count();
        let t_end = self.telegram.calls().len();
        let messages = self.telegram.messages();
        let n = group.len();
        for k in 0..n {
            let a_next = if k + 1 < n { group[k + 1].anthropic_calls.start } else { a_end };
            let t_next = if k + 1 < n { group[k + 1].telegram_calls.start } else { t_end };
            group[k].anthropic_calls.end = a_next;
            group[k].telegram_calls.end = t_next;
        }
        for rec in group.iter_mut() {
            let job: Option<(Uuid, Vec<i64>)> =
                sqlx::query_as("SELECT job_id, reply_message_ids FROM jobs WHERE update_id = $1")
                    .bind(rec.update_id)
                    .fetch_optional(&self.dbs.bot)
                    .await?;
            if let Some((job_id, _)) = &job {
                rec.entries =
                    sqlx::query_as("SELECT kind, amount FROM ledger_entries WHERE job_id = $1 ORDER BY entry_id")
                        .bind(job_id)
                        .fetch_all(&self.dbs.billing)
                        .await?;
            }
            rec.job = job;
        }
        // Replies: a step's job's messages; in a group of one, any other
        // message sent to the chat in its window counts too (a duplicate
        // answer must show up); in a larger group, messages without a job go
        // to the last step.
        let claimed: Vec<i64> = group.iter().flat_map(|r| r.job.iter().flat_map(|(_, ids)| ids.clone())).collect();
        let last = n - 1;
        let group_start = group[0].telegram_calls.start;
        for (k, rec) in group.iter_mut().enumerate() {
            let Some(chat) = rec.chat_id else { continue };
            let own: Vec<i64> = rec.job.as_ref().map(|(_, ids)| ids.clone()).unwrap_or_default();
            let (lo, hi) =
                if n == 1 { (rec.telegram_calls.start, rec.telegram_calls.end) } else { (group_start, t_end) };
            rec.replies = messages
                .iter()
                .filter(|m| m.chat_id == chat && !m.deleted)
                .filter(|m| {
                    own.contains(&m.message_id)
                        || (k == last && !claimed.contains(&m.message_id) && m.sent_call >= lo && m.sent_call < hi)
                })
                .cloned()
                .collect();
        }
        Ok(())
    }
}

/// The text of an SSE body: every `text_delta`, in order.
pub fn sse_text(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out = String::new();
    for line in text.lines() {
        if let Some(data) = line.strip_prefix("data: ") {
            if let Ok(v) = serde_json::from_str::<Value>(data) {
                if v.pointer("/delta/type").and_then(Value::as_str) == Some("text_delta") {
                    out.push_str(v.pointer("/delta/text").and_then(Value::as_str).unwrap_or_default());
                }
            }
        }
    }
    out
}

fn clip(s: &str, max: usize) -> String {
    let flat = s.replace('\n', " ⏎ ");
    if flat.chars().count() <= max {
        flat
    } else {
        format!("{}… ({} chars)", flat.chars().take(max).collect::<String>(), s.chars().count())
    }
}

fn transcript_lines(rec: &StepRecord) -> Vec<String> {
    let user = rec
        .update
        .get("message")
        .and_then(|m| m.get("text"))
        .and_then(Value::as_str)
        .map(|t| format!("“{}”", clip(t, 100)))
        .unwrap_or_else(|| {
            let kind =
                rec.update.as_object().and_then(|o| o.keys().find(|k| *k != "update_id").cloned()).unwrap_or_default();
            format!("({kind})")
        });
    let times = rec.step.repeat.filter(|r| *r > 1).map(|r| format!(" ×{r}")).unwrap_or_default();
    let mut lines = vec![format!("  [{}] user {}{times} ▶ {user}", rec.number, rec.chat_id.unwrap_or_default())];
    if rec.replies.is_empty() {
        lines.push("      bot ◀ (no reply)".to_owned());
    }
    for m in &rec.replies {
        lines.push(format!("      bot ◀ {}", clip(&m.text, 160)));
    }
    lines
}

async fn ledger_lines(dbs: &Databases) -> anyhow::Result<Vec<LedgerLine>> {
    let rows: Vec<(String, String, String, Decimal, bool)> = sqlx::query_as(
        "SELECT kind, debit_account, credit_account, amount, estimated FROM ledger_entries ORDER BY entry_id",
    )
    .fetch_all(&dbs.billing)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(kind, debit, credit, amount, estimated)| LedgerLine {
            kind,
            debit,
            credit,
            amount: amount.normalize().to_string(),
            estimated,
        })
        .collect())
}

/// Calls of the fake Bot API addressed to `chat`.
pub fn calls_to_chat(calls: &[TgCall], chat: i64) -> impl Iterator<Item = &TgCall> {
    calls.iter().filter(move |c| {
        let id = c.params.get("chat_id");
        id.and_then(Value::as_i64).or_else(|| id.and_then(Value::as_str).and_then(|s| s.parse().ok())) == Some(chat)
    })
}

/// Default fixtures folder: `fixtures` from the project root (the repo copy of `../shared/fixtures`).
pub fn default_fixtures() -> PathBuf {
    Path::new("fixtures").to_path_buf()
}
