//! The harness of the lifecycle tests: the fleet's real binaries as separate
//! processes ([`crate::fleet`]) on fresh databases and a fresh broker
//! prefix, the in-process fakes, typed look-ups of jobs, calls and ledger
//! rows, and clean-up that runs whether the test passed or not.

use crate::fake_anthropic::{FakeAnthropic, RecordedCall};
use crate::fake_telegram::{FakeTelegram, TgCall, TgMessage};
use crate::fleet::{delete_topology, worker_name, Databases, Fleet, FleetConfig, Services};
use crate::harness::wait_until;
use anyhow::{anyhow, ensure, Context as _, Result};
use rust_decimal::Decimal;
use serde_json::Value;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use uuid::Uuid;

pub use crate::fleet::Signal;
pub use fixtures::*;

mod binaries;
mod fixtures;

/// The webhook secret of the test ingress.
const SECRET: &str = "lifecycle-webhook-secret";
/// The bot token the workers use with the fake Bot API.
const TOKEN: &str = "7000000001:LIFECYCLE";
pub use crate::harness::WAIT;

/// Ada: sender of `ada_*.json`, in a private chat of the same id.
pub const ADA: i64 = 100_000_001;
/// Chi: sender of `chi_*.json`, in a private chat of the same id.
pub const CHI: i64 = 100_000_003;

/// Worker settings every lifecycle test starts from: short leases, no pacing
/// to speak of.
pub const FAST_WORKER_ENV: &[(&str, &str)] = &[
    ("VISIBILITY_TIMEOUT_S", "3"),
    ("IDLE_TIMEOUT_S", "60"),
    ("PACE_PRIVATE_MS", "50"),
    ("PACE_GROUP_MS", "50"),
    ("PACE_BOT_MS", "1"),
    ("MAX_ATTEMPTS", "3"),
];

/// A job row, as the tests read it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Job {
    /// Job id.
    pub job_id: Uuid,
    /// `queued`, `running`, `done`, `failed`, `cancelled`.
    pub status: String,
    /// Claims so far.
    pub attempts: i32,
    /// Holder (a worker's `WORKER_ID`), while running.
    pub lease_owner: Option<String>,
    /// Fencing epoch of the newest claim.
    pub lease_epoch: i64,
    /// First claim.
    pub started_at: Option<chrono::DateTime<chrono::Utc>>,
    /// End.
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Telegram ids of the final answer's messages.
    pub reply_message_ids: Vec<i64>,
    /// How it ended.
    pub outcome: Option<String>,
}

/// A fleet of separate processes with its fakes, databases and broker prefix.
pub struct Lifecycle {
    /// Fake Messages API.
    pub anthropic: FakeAnthropic,
    /// Fake Bot API.
    pub telegram: FakeTelegram,
    /// The bot and billing databases.
    pub dbs: Databases,
    /// The processes.
    pub fleet: Fleet,
    /// Broker prefix of this test.
    prefix: String,
    /// Services, for clean-up.
    services: Services,
    /// Where the process logs are.
    pub log_dir: PathBuf,
    /// Posts updates to the webhook.
    http: reqwest::Client,
}

impl Lifecycle {
    /// Starts the fakes, fresh databases `lc_<test>_<uuid>` and a fleet of
    /// `workers` workers with [`FAST_WORKER_ENV`] overlaid by `env`, and
    /// waits until every worker consumes.
    pub async fn start(test: &str, workers: usize, env: &[(&str, &str)]) -> Result<Self> {
        let bin_dir = tokio::task::spawn_blocking(binaries::ensure_binaries).await??;
        let services =
            Services { postgres_url: crate::harness::admin_database_url(), amqp_url: crate::harness::amqp_url() };
        let stem = format!("lc_{}_{}", short(test), &Uuid::now_v7().simple().to_string()[20..]);
        let prefix = format!("{stem}_");
        // Cargo's CARGO_TARGET_TMPDIR of the integration tests.
        let log_dir = crate::target_dir().join("tmp").join("lifecycle").join(&stem);
        let anthropic = FakeAnthropic::start("127.0.0.1:0".parse()?).await?;
        let telegram = FakeTelegram::start("127.0.0.1:0".parse()?, "fleet_test_bot").await?;
        let dbs = tokio::time::timeout(WAIT, Databases::create(&services, &stem))
            .await
            .map_err(|_| anyhow!("creating the databases timed out"))??;
        let cfg = FleetConfig::for_test(
            bin_dir,
            log_dir.clone(),
            services.clone(),
            &prefix,
            &dbs,
            telegram.api_url(),
            anthropic.base_url(),
        )
        .secrets(TOKEN, SECRET)
        .worker_env(FAST_WORKER_ENV.iter().chain(env).copied())
        .workers(workers);
        let fleet = match Fleet::start(&cfg).await {
            Ok(f) => f,
            Err(e) => {
                let _ = delete_topology(&services.amqp_url, &prefix).await;
                let _ = dbs.drop_all().await;
                return Err(e.context(format!("starting the fleet (logs in {})", log_dir.display())));
            }
        };
        let t = Self { anthropic, telegram, dbs, fleet, prefix, services, log_dir, http: reqwest::Client::new() };
        for i in 0..workers {
            if !t.fleet.wait_for_log(&worker_name(i), &["consuming updates"], WAIT).await {
                let e = anyhow!("{} never started consuming (logs in {})", worker_name(i), t.log_dir.display());
                return Err(t.finish(Err(e)).await.err().unwrap_or_else(|| anyhow!("worker did not start")));
            }
        }
        Ok(t)
    }

    /// Ends the test whatever `result` is: stops the fleet, deletes the
    /// broker prefix, drops the databases, stops the fakes; then returns
    /// `result` (with the log folder named when it failed; the logs of a
    /// passed test are removed).
    pub async fn finish(self, result: Result<()>) -> Result<()> {
        let Self { anthropic, telegram, dbs, fleet, prefix, services, log_dir, .. } = self;
        fleet.stop().await;
        let topology = delete_topology(&services.amqp_url, &prefix).await;
        let dropped = dbs.drop_all().await;
        anthropic.shutdown().await;
        telegram.shutdown().await;
        result.with_context(|| format!("process logs: {}", log_dir.display()))?;
        topology.context("deleting the broker prefix")?;
        dropped.context("dropping the databases")?;
        // Logs are kept only for failed tests.
        let _ = std::fs::remove_dir_all(&log_dir);
        Ok(())
    }

    /// Posts an update to the webhook; the instant just before the post.
    pub async fn post(&self, update: &Value) -> Result<Instant> {
        let at = Instant::now();
        let status = tokio::time::timeout(
            WAIT,
            self.http
                .post(self.fleet.webhook_url())
                .header("x-telegram-bot-api-secret-token", SECRET)
                .json(update)
                .send(),
        )
        .await
        .map_err(|_| anyhow!("posting to the webhook timed out"))??
        .status();
        ensure!(status.is_success(), "the webhook answered {status}");
        Ok(at)
    }

    /// Posts a fixture update.
    pub async fn post_fixture(&self, rel: &str) -> Result<Instant> {
        self.post(&fixture_json(rel)?).await
    }

    /// Grants `usd` of credit to `user_id` (directly on the ledger).
    pub async fn grant(&self, user_id: i64, usd: &str) -> Result<()> {
        billing_worker::ledger::grant(&self.dbs.billing, user_id, usd.parse()?, Uuid::now_v7()).await?;
        Ok(())
    }

    /// The job of `update_id`.
    pub async fn job(&self, update_id: i64) -> Result<Job> {
        sqlx::query_as(
            "SELECT job_id, status, attempts, lease_owner, lease_epoch, started_at, finished_at,
                    reply_message_ids, outcome
               FROM jobs WHERE update_id = $1",
        )
        .bind(update_id)
        .fetch_optional(&self.dbs.bot)
        .await?
        .with_context(|| format!("no job for update {update_id}"))
    }

    /// Polls until the job of `update_id` satisfies `pred`; the job then.
    pub async fn wait_job(
        &self,
        update_id: i64,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Job) -> bool,
    ) -> Result<Job> {
        // The newest row seen, for the timeout's message.
        let last = std::cell::RefCell::new(None);
        let seen = wait_until(&format!("the job of {update_id} to be {what}"), timeout, || async {
            let Ok(job) = self.job(update_id).await else { return Ok(false) };
            let done = pred(&job);
            *last.borrow_mut() = Some(job);
            Ok(done)
        })
        .await;
        let last = last.into_inner();
        match (seen, last) {
            (Ok(()), Some(job)) => Ok(job),
            (Err(e), last) => Err(anyhow!("{e}; last seen: {last:?}")),
            (Ok(()), None) => Err(anyhow!("the job of {update_id} vanished")),
        }
    }

    /// Waits for the job of `update_id` to end (`done` or `failed`).
    pub async fn wait_finished(&self, update_id: i64, timeout: Duration) -> Result<Job> {
        self.wait_job(update_id, "finished", timeout, |j| matches!(j.status.as_str(), "done" | "failed")).await
    }

    /// Waits until every outbox event is published and applied to the ledger.
    pub async fn wait_ledger_settled(&self) -> Result<()> {
        wait_until("every billing event relayed and applied", WAIT, || async {
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
            Ok(applied == i64::try_from(ids.len())?)
        })
        .await
    }

    /// `usage_charge` ledger entries of a job: (event id, amount).
    pub async fn usage_charges(&self, job_id: Uuid) -> Result<Vec<(Uuid, Decimal)>> {
        Ok(sqlx::query_as(
            "SELECT event_id, amount FROM ledger_entries WHERE kind = 'usage_charge' AND job_id = $1 ORDER BY entry_id",
        )
        .bind(job_id)
        .fetch_all(&self.dbs.billing)
        .await?)
    }

    /// `api_calls` of a job that count for the user (abandoned attempts'
    /// calls left out): (seq, lease epoch, user charge).
    pub async fn api_calls(&self, job_id: Uuid) -> Result<Vec<(i32, i64, Decimal)>> {
        Ok(sqlx::query_as(
            "SELECT seq, lease_epoch, user_charge FROM api_calls WHERE job_id = $1 AND NOT abandoned ORDER BY seq",
        )
        .bind(job_id)
        .fetch_all(&self.dbs.bot)
        .await?)
    }

    /// Usage-charge events of a job in the outbox.
    pub async fn outbox_usage(&self, job_id: Uuid) -> Result<Vec<Uuid>> {
        Ok(sqlx::query_scalar(
            "SELECT event_id FROM billing_outbox WHERE job_id = $1 AND payload->>'type' = 'usage_charge.v1'
               AND (payload->>'abandoned') IS DISTINCT FROM 'true' ORDER BY event_id",
        )
        .bind(job_id)
        .fetch_all(&self.dbs.bot)
        .await?)
    }

    /// Final messages (`sendMessage`) the bot sent to `chat`, as they are now.
    pub fn messages_to(&self, chat: i64) -> Vec<TgMessage> {
        self.telegram.messages().into_iter().filter(|m| m.chat_id == chat && !m.deleted).collect()
    }

    /// Waits for a `sendMessage` to `chat` whose text contains `text`.
    pub async fn wait_for_message(&self, chat: i64, text: &str) -> Result<()> {
        let seen = self.telegram.wait_for_call(|c| is_send_to(c, chat) && param_text(c).contains(text), WAIT).await;
        ensure!(seen, "no sendMessage to {chat} containing {text:?} within {WAIT:?}");
        Ok(())
    }

    /// Waits until the `index`-th Messages API call has had `events` SSE
    /// events sent (it is streaming).
    pub async fn wait_streaming(&self, index: usize, events: usize) -> Result<()> {
        let ok = self.anthropic.wait_for(|c| c.get(index).is_some_and(|c| c.events_sent >= events), WAIT).await;
        ensure!(ok, "call {index} never streamed {events} events: {:?}", summary(&self.anthropic.calls()));
        Ok(())
    }

    /// Waits for at least `n` Messages API calls.
    pub async fn wait_for_calls(&self, n: usize, timeout: Duration) -> Result<()> {
        let ok = self.anthropic.wait_for_calls(n, timeout).await;
        ensure!(ok, "expected {n} Messages API calls within {timeout:?}, got {:?}", summary(&self.anthropic.calls()));
        Ok(())
    }

    /// Waits until the worker holding the lease of `update_id` is known; its name.
    pub async fn lease_holder(&self, update_id: i64) -> Result<String> {
        let job = self
            .wait_job(update_id, "running with an owner", WAIT, |j| j.status == "running" && j.lease_owner.is_some())
            .await?;
        job.lease_owner.context("no owner")
    }

    /// The other worker's name in a fleet of two.
    pub fn other_worker(&self, name: &str) -> String {
        if name == worker_name(0) {
            worker_name(1)
        } else {
            worker_name(0)
        }
    }
}

/// True for a `sendMessage` to `chat`.
pub fn is_send_to(call: &TgCall, chat: i64) -> bool {
    call.method == "sendMessage" && chat_of(call) == Some(chat)
}

fn chat_of(call: &TgCall) -> Option<i64> {
    let id = call.params.get("chat_id");
    id.and_then(Value::as_i64).or_else(|| id.and_then(Value::as_str).and_then(|s| s.parse().ok()))
}

fn param_text(call: &TgCall) -> &str {
    call.params.get("text").and_then(Value::as_str).unwrap_or_default()
}

/// A short description of the calls, for failure messages.
pub fn summary(calls: &[RecordedCall]) -> Vec<String> {
    calls
        .iter()
        .map(|c| {
            format!(
                "#{} status {} events {} completed {} ended {}",
                c.index,
                c.status,
                c.events_sent,
                c.completed,
                c.ended_at.is_some()
            )
        })
        .collect()
}

/// The `messages` array of a recorded request as compact JSON.
pub fn request_messages(call: &RecordedCall) -> Vec<Value> {
    call.body.get("messages").and_then(Value::as_array).cloned().unwrap_or_default()
}

fn short(test: &str) -> String {
    test.chars().filter(char::is_ascii_alphanumeric).take(12).collect::<String>().to_lowercase()
}

/// Milliseconds between two instants (negative when `b` is before `a`).
pub fn ms_between(a: Instant, b: Instant) -> i128 {
    if b >= a {
        i128::try_from(b.duration_since(a).as_millis()).unwrap_or(i128::MAX)
    } else {
        -i128::try_from(a.duration_since(b).as_millis()).unwrap_or(i128::MAX)
    }
}
