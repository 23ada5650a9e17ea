//! Figures of the whole fleet, run as separate processes
//! ([`fleet_tests::fleet`]: ingress, workers, billing-worker from the bin
//! folder) on fresh databases and a fresh broker prefix, against the
//! in-process fakes at zero latency:
//!
//! - end to end: jobs/s of a burst of jobs (one per private chat, so the
//!   per-chat order serializes nothing) with 1 and 2 workers, and the added
//!   latency from the webhook's `200` to the first progress call (typing,
//!   draft or message) to that chat at the fake Bot API, for jobs posted one
//!   at a time and during the burst;
//! - memory: the RSS of one worker per in-flight generation, with 1,000
//!   streams open at a fake that sends one event per second.

use crate::{progress, Args, Row};
use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use fleet_tests::fake_anthropic::{FakeAnthropic, ScriptedResponse};
use fleet_tests::fake_telegram::{FakeTelegram, TgCall};
use fleet_tests::fleet::{delete_topology, worker_name, Databases, Fleet, FleetConfig, Services, Signal};
use futures_util::StreamExt;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Webhook secret of the bench fleet.
const SECRET: &str = "bench-webhook-secret";
/// Bot token the workers use with the fake Bot API.
const TOKEN: &str = "7000000001:BENCH";
/// Target of 2 workers' jobs/s against 1 worker's (issue).
const SCALING_TARGET: f64 = 1.6;
/// Target of the memory per in-flight stream, KiB (issue).
const MEMORY_TARGET_KIB: f64 = 64.0;
/// Longest wait for a burst's jobs to finish.
const BURST_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest wait for one probe job's first progress call and its end.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);
/// Probe jobs run first and not counted (connections, pools, caches).
const WARM_UP: usize = 3;
/// Worker settings of every fleet here: no pacing at all (the fakes
/// enforce no limit, and the figure is the fleet's own cost).
const NO_PACING: &[(&str, &str)] = &[("PACE_PRIVATE_MS", "0"), ("PACE_GROUP_MS", "0"), ("PACE_BOT_MS", "0")];
/// Bot API methods that show progress (or the answer) to the user.
const PROGRESS_METHODS: &[&str] = &["sendChatAction", "sendMessageDraft", "sendMessage"];
/// RSS samples of the memory figure, one a second, while the streams run.
const MEMORY_SAMPLES: usize = 8;
/// Name of the scaling row.
const E2E_ROW: &str = "e2e jobs/s, 2 workers";
/// Name of the memory row.
const MEMORY_ROW: &str = "worker memory per in-flight stream";

/// The end-to-end rows, when they are not measured.
pub fn e2e_skipped(why: &str) -> Row {
    Row::skipped(E2E_ROW, "jobs/s", "1 worker", &format!("≥ {SCALING_TARGET} × baseline"), why)
}

/// The memory row, when it is not measured.
pub fn memory_skipped(why: &str) -> Row {
    Row::skipped(MEMORY_ROW, "KiB/stream", "idle worker RSS (KiB)", &format!("≤ {MEMORY_TARGET_KIB} KiB/stream"), why)
}

/// The fakes, databases and processes of one measurement.
struct Run {
    anthropic: FakeAnthropic,
    telegram: FakeTelegram,
    dbs: Databases,
    fleet: Fleet,
    prefix: String,
    services: Services,
    http: reqwest::Client,
    /// The update every job is made from (`telegram/ada_capital.json`).
    template: Value,
}

/// The folder of the fleet's binaries.
fn bin_dir(args: &Args) -> anyhow::Result<PathBuf> {
    let dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?.parent().map(PathBuf::from).unwrap_or_default(),
    };
    for bin in ["ingress", "worker", "billing-worker"] {
        anyhow::ensure!(
            dir.join(bin).is_file(),
            "{} is missing (cargo build --release --bins -p ingress -p worker -p billing-worker)",
            dir.join(bin).display()
        );
    }
    Ok(dir)
}

/// Credits every user in `users` (directly on the ledger), 8 at a time.
async fn grant_all(pool: &sqlx::PgPool, users: &[i64]) -> anyhow::Result<()> {
    let amount: rust_decimal::Decimal = "100".parse()?;
    let results: Vec<_> = futures_util::stream::iter(users.iter().copied())
        .map(|user| async move { billing_worker::ledger::grant(pool, user, amount, Uuid::now_v7()).await })
        .buffer_unordered(8)
        .collect()
        .await;
    for r in results {
        r?;
    }
    Ok(())
}

impl Run {
    /// Fakes, fresh databases with `users` credited, and a fleet of
    /// `workers` workers with [`NO_PACING`] and `env`; waits until every
    /// worker consumes.
    async fn start(
        args: &Args,
        label: &str,
        workers: usize,
        env: &[(&str, &str)],
        users: &[i64],
        default: ScriptedResponse,
    ) -> anyhow::Result<Self> {
        let bin_dir = bin_dir(args)?;
        let services = Services { postgres_url: args.postgres_url.clone(), amqp_url: args.amqp_url.clone() };
        let stem = format!("bench_{label}_{}", &Uuid::now_v7().simple().to_string()[20..]);
        let prefix = format!("{stem}_");
        let log_dir = args.log_dir.join(&stem);
        let template: Value = serde_json::from_slice(
            &std::fs::read(args.fixtures.join("telegram/ada_capital.json")).context("fixture update")?,
        )?;
        let anthropic = FakeAnthropic::start("127.0.0.1:0".parse()?).await?;
        anthropic.set_default(Some(default));
        let telegram = FakeTelegram::start("127.0.0.1:0".parse()?, "fleet_bench_bot").await?;
        let dbs = Databases::create(&services, &stem).await?;
        if let Err(e) = grant_all(&dbs.billing, users).await {
            let _ = dbs.drop_all().await;
            return Err(e.context("granting credit"));
        }
        let mut worker_env = BTreeMap::new();
        for (k, v) in NO_PACING.iter().chain(env) {
            worker_env.insert((*k).to_owned(), (*v).to_owned());
        }
        let cfg = FleetConfig {
            bin_dir,
            log_dir: log_dir.clone(),
            services: services.clone(),
            prefix: prefix.clone(),
            bot_db_url: dbs.bot_url.clone(),
            billing_db_url: dbs.billing_url.clone(),
            telegram_api_url: telegram.api_url(),
            anthropic_base_url: anthropic.base_url(),
            prices_file: args.fixtures.join("prices.toml"),
            bot_token: TOKEN.into(),
            webhook_secret: SECRET.into(),
            worker_env,
            workers,
        };
        let fleet = match Fleet::start(&cfg).await {
            Ok(f) => f,
            Err(e) => {
                let _ = delete_topology(&services.amqp_url, &prefix).await;
                let _ = dbs.drop_all().await;
                return Err(e.context(format!("starting the fleet (logs in {})", log_dir.display())));
            }
        };
        let run = Self { anthropic, telegram, dbs, fleet, prefix, services, http: reqwest::Client::new(), template };
        for i in 0..workers {
            if !run.fleet.wait_for_log(&worker_name(i), &["consuming updates"], Duration::from_secs(30)).await {
                let e = anyhow::anyhow!("{} never started consuming (logs in {})", worker_name(i), log_dir.display());
                run.finish().await;
                return Err(e);
            }
        }
        Ok(run)
    }

    /// Stops the processes, deletes the broker prefix, drops the databases
    /// and stops the fakes (errors of the clean-up are reported, not returned).
    async fn finish(self) {
        let Self { anthropic, telegram, dbs, fleet, prefix, services, .. } = self;
        fleet.stop().await;
        if let Err(e) = delete_topology(&services.amqp_url, &prefix).await {
            progress(&format!("could not delete broker prefix {prefix}: {e:#}"));
        }
        if let Err(e) = dbs.drop_all().await {
            progress(&format!("could not drop the databases: {e:#}"));
        }
        anthropic.shutdown().await;
        telegram.shutdown().await;
    }

    /// The template update, from `user` in their private chat, as update `update_id`.
    fn update(&self, user: i64, update_id: i64) -> Value {
        let mut u = self.template.clone();
        u["update_id"] = update_id.into();
        u["message"]["message_id"] = 1.into();
        u["message"]["from"]["id"] = user.into();
        u["message"]["chat"]["id"] = user.into();
        u
    }

    /// Posts `update` to the webhook; the instant its `200` arrived.
    async fn post(&self, update: &Value) -> anyhow::Result<Instant> {
        post(&self.http, &self.fleet.webhook_url(), update).await
    }

    /// Posts one update for each of `users` (update ids from `first_update`),
    /// `concurrency` at a time; the wall clock before the first post and
    /// the instant each chat's `200` arrived.
    async fn post_all(
        &self,
        users: &[i64],
        first_update: i64,
        concurrency: usize,
    ) -> anyhow::Result<(DateTime<Utc>, HashMap<i64, Instant>)> {
        let updates: Arc<Vec<(i64, Value)>> =
            Arc::new(users.iter().zip(first_update..).map(|(&user, id)| (user, self.update(user, id))).collect());
        let next = Arc::new(AtomicUsize::new(0));
        let url = self.fleet.webhook_url();
        let started = Utc::now();
        let mut tasks = Vec::new();
        for _ in 0..concurrency.max(1) {
            let (updates, next, http, url) = (updates.clone(), next.clone(), self.http.clone(), url.clone());
            tasks.push(tokio::spawn(async move {
                let mut acked = Vec::new();
                while let Some((user, update)) = updates.get(next.fetch_add(1, Ordering::Relaxed)) {
                    acked.push((*user, post(&http, &url, update).await?));
                }
                Ok::<_, anyhow::Error>(acked)
            }));
        }
        let mut acked = HashMap::new();
        for t in tasks {
            acked.extend(t.await??);
        }
        Ok((started, acked))
    }

    /// Jobs that ended, jobs `done`, and the last `finished_at`.
    async fn finished(&self) -> anyhow::Result<(i64, i64, Option<DateTime<Utc>>)> {
        Ok(sqlx::query_as(
            "SELECT count(*) FILTER (WHERE status IN ('done', 'failed', 'cancelled')),
                    count(*) FILTER (WHERE status = 'done'),
                    max(finished_at)
               FROM jobs",
        )
        .fetch_one(&self.dbs.bot)
        .await?)
    }

    /// Polls (every `every`) until `n` jobs ended; what [`Run::finished`] says then.
    async fn wait_finished(
        &self,
        n: usize,
        every: Duration,
        timeout: Duration,
    ) -> anyhow::Result<(i64, i64, Option<DateTime<Utc>>)> {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.finished().await?;
            if now.0 >= i64::try_from(n)? {
                return Ok(now);
            }
            if Instant::now() > deadline {
                bail!("{} of {n} jobs ended after {timeout:?}", now.0);
            }
            tokio::time::sleep(every).await;
        }
    }

    /// When the first progress call to each chat arrived at the fake Bot API.
    fn first_progress(&self) -> HashMap<i64, Instant> {
        let mut first: HashMap<i64, Instant> = HashMap::new();
        for c in self.telegram.calls() {
            if let Some(chat) = progress_chat(&c) {
                first.entry(chat).and_modify(|t| *t = (*t).min(c.at)).or_insert(c.at);
            }
        }
        first
    }
}

/// Posts `update` to `url` with the webhook secret; the instant its `200` arrived.
async fn post(http: &reqwest::Client, url: &str, update: &Value) -> anyhow::Result<Instant> {
    let status = http.post(url).header("x-telegram-bot-api-secret-token", SECRET).json(update).send().await?.status();
    anyhow::ensure!(status.is_success(), "the webhook answered {status}");
    Ok(Instant::now())
}

/// The chat of a progress call ([`PROGRESS_METHODS`]).
fn progress_chat(call: &TgCall) -> Option<i64> {
    if !PROGRESS_METHODS.contains(&call.method.as_str()) {
        return None;
    }
    let id = call.params.get("chat_id")?;
    id.as_i64().or_else(|| id.as_str().and_then(|s| s.parse().ok()))
}

/// What one fleet size measured.
struct E2e {
    /// Jobs done per second, first post to last `finished_at`.
    jobs_per_s: f64,
    /// Jobs of the burst, and how many ended `done`.
    jobs: usize,
    done: i64,
    /// Webhook `200` → first progress, one job at a time.
    idle: Vec<Duration>,
    /// The same during the burst.
    burst: Vec<Duration>,
}

/// PREFETCH of the end-to-end workers (`--e2e-prefetch`, 0: the burst size).
fn e2e_prefetch(args: &Args) -> usize {
    let p = if args.e2e_prefetch == 0 { args.e2e_jobs } else { args.e2e_prefetch };
    p.clamp(1, usize::from(u16::MAX))
}

/// One fleet of `workers` workers: the probes, then the burst.
async fn e2e(args: &Args, workers: usize) -> anyhow::Result<E2e> {
    let probes = args.e2e_probes + WARM_UP;
    let users: Vec<i64> = (0..i64::try_from(probes + args.e2e_jobs)?).map(|i| 300_000_001 + i).collect();
    let (probe_users, burst_users) = users.split_at(probes);
    let default = ScriptedResponse::from_file(args.fixtures.join("anthropic/text_capital.sse"))?;
    let prefetch = e2e_prefetch(args).to_string();
    let env = [("PREFETCH", prefetch.as_str())];
    let run = Run::start(args, &format!("e2e{workers}"), workers, &env, &users, default).await?;
    let result = e2e_on(args, &run, probe_users, burst_users).await;
    run.finish().await;
    result
}

async fn e2e_on(args: &Args, run: &Run, probe_users: &[i64], burst_users: &[i64]) -> anyhow::Result<E2e> {
    let mut idle = Vec::new();
    for (i, &user) in probe_users.iter().enumerate() {
        let update_id = 900_000_000 + i64::try_from(i)?;
        let acked = run.post(&run.update(user, update_id)).await?;
        let seen = run.telegram.wait_for_call(|c| progress_chat(c) == Some(user), PROBE_TIMEOUT).await;
        anyhow::ensure!(seen, "no progress call to chat {user} within {PROBE_TIMEOUT:?}");
        let first = run.first_progress().get(&user).copied().context("progress call vanished")?;
        if i >= WARM_UP {
            idle.push(first.saturating_duration_since(acked));
        }
        run.wait_finished(i + 1, Duration::from_millis(5), PROBE_TIMEOUT).await?;
    }
    let (before, before_done, _) = run.finished().await?;
    let (started, acked) = run.post_all(burst_users, 910_000_000, args.concurrency).await?;
    let total = usize::try_from(before)? + burst_users.len();
    let (_, done_all, last) = run.wait_finished(total, Duration::from_millis(25), BURST_TIMEOUT).await?;
    let done = done_all - before_done;
    let last = last.context("no finished job")?;
    let seconds = (last - started).to_std().map_or(0.0, |d| d.as_secs_f64());
    let first = run.first_progress();
    let burst =
        burst_users.iter().filter_map(|u| Some(first.get(u)?.saturating_duration_since(*acked.get(u)?))).collect();
    Ok(E2e {
        jobs_per_s: if seconds > 0.0 { done as f64 / seconds } else { 0.0 },
        jobs: burst_users.len(),
        done,
        idle,
        burst,
    })
}

/// The end-to-end rows: scaling from 1 to 2 workers, and latencies.
///
/// # Errors
/// A fleet that does not start, or jobs that do not finish.
pub async fn bench_e2e(args: &Args) -> anyhow::Result<Vec<Row>> {
    progress("end to end: 1 worker");
    let mut one = e2e(args, 1).await?;
    progress("end to end: 2 workers");
    let mut two = e2e(args, 2).await?;
    let note =
        |r: &E2e, w: usize| format!("{w} worker(s): {} of {} jobs done, {:.1} jobs/s", r.done, r.jobs, r.jobs_per_s);
    let mut rows = vec![Row::ratio(E2E_ROW, two.jobs_per_s, "jobs/s", "1 worker", one.jobs_per_s, SCALING_TARGET)
        .with_note(format!(
            "{}; {}; one private chat per job, text_capital.sse at zero latency, pacing off, PREFETCH {}",
            note(&one, 1),
            note(&two, 2),
            e2e_prefetch(args)
        ))];
    for (w, r) in [(1, &mut one), (2, &mut two)] {
        rows.push(Row::latency(
            &format!("e2e webhook 200 → first progress, {w} worker(s), one job at a time"),
            &mut r.idle,
            None,
        ));
        rows.push(Row::latency(
            &format!("e2e webhook 200 → first progress, {w} worker(s), during the burst"),
            &mut r.burst,
            None,
        ));
    }
    Ok(rows)
}

/// VmRSS of process `pid`, KiB.
fn rss_kib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    let kib: f64 = line.split_whitespace().nth(1).context("VmRSS without a number")?.parse()?;
    Ok(kib)
}

/// Streams open at the fake Messages API now.
fn open_streams(anthropic: &FakeAnthropic) -> usize {
    anthropic.calls().iter().filter(|c| c.ended_at.is_none()).count()
}

/// The memory row: one worker's RSS idle (after a few warm-up jobs) and
/// with `--memory-streams` generations in flight.
///
/// # Errors
/// A fleet that does not start, or a worker that dies.
pub async fn bench_memory(args: &Args) -> anyhow::Result<Row> {
    let streams = args.memory_streams.max(1);
    let users: Vec<i64> = (0..i64::try_from(streams + WARM_UP)?).map(|i| 400_000_001 + i).collect();
    let slow = ScriptedResponse {
        event_delay_ms: 1000,
        ..ScriptedResponse::from_file(args.fixtures.join("anthropic/essay_slow.sse"))?
    };
    let prefetch = streams.clamp(16, usize::from(u16::MAX)).to_string();
    let env = [("PREFETCH", prefetch.as_str()), ("DATABASE_MAX_CONNECTIONS", "30")];
    let run = Run::start(args, "mem", 1, &env, &users, slow).await?;
    let result = memory_on(args, &run, &users, streams).await;
    // The streams are not waited for: kill the worker, then stop the rest.
    let _ = run.fleet.signal(&worker_name(0), Signal::Kill).await;
    run.finish().await;
    result
}

async fn memory_on(args: &Args, run: &Run, users: &[i64], streams: usize) -> anyhow::Result<Row> {
    let pid = run.fleet.pid(&worker_name(0)).context("the worker has no pid")?;
    let (warm, load) = users.split_at(WARM_UP);
    let quick = ScriptedResponse::from_file(args.fixtures.join("anthropic/text_capital.sse"))?;
    run.anthropic.push(std::iter::repeat_n(quick, warm.len()));
    for (i, &user) in warm.iter().enumerate() {
        run.post(&run.update(user, 920_000_000 + i64::try_from(i)?)).await?;
    }
    run.wait_finished(warm.len(), Duration::from_millis(20), PROBE_TIMEOUT).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = rss_kib(pid)?;
    progress(&format!("memory: worker idle at {idle:.0} KiB; opening {streams} slow streams"));
    let posted = Instant::now();
    run.post_all(load, 930_000_000, args.concurrency).await?;
    let ramp_deadline = posted + Duration::from_secs(45);
    let mut open = open_streams(&run.anthropic);
    while open < streams && Instant::now() < ramp_deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        open = open_streams(&run.anthropic);
    }
    let ramp = posted.elapsed();
    progress(&format!("memory: {open} streams open after {:.1} s", ramp.as_secs_f64()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut samples = Vec::new();
    for _ in 0..MEMORY_SAMPLES {
        let (rss, open) = (rss_kib(pid)?, open_streams(&run.anthropic));
        if open > 0 {
            samples.push((rss, open));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    anyhow::ensure!(!samples.is_empty(), "no stream was open at the fake Messages API");
    let mut per: Vec<f64> = samples.iter().map(|(rss, open)| (rss - idle) / *open as f64).collect();
    per.sort_by(f64::total_cmp);
    let median = per.get(per.len() / 2).copied().unwrap_or_default();
    let (low, high) = (per.first().copied().unwrap_or_default(), per.last().copied().unwrap_or_default());
    let (busy, open) = samples.get(samples.len() / 2).copied().unwrap_or_default();
    Ok(Row {
        name: format!("{MEMORY_ROW} ({streams} streams)"),
        value: median,
        unit: "KiB/stream".into(),
        baseline_name: "idle worker RSS (KiB)".into(),
        baseline: idle,
        ratio: 0.0,
        target: format!("≤ {MEMORY_TARGET_KIB} KiB/stream"),
        met: median <= MEMORY_TARGET_KIB,
        note: Some(format!(
            "RSS {busy:.0} KiB with {open} streams open (idle {idle:.0} KiB); {} open after a {:.1} s ramp; median of {} samples 1 s apart (range {low:.1}–{high:.1} KiB/stream); essay_slow.sse at 1 event/s, PREFETCH={streams}",
            samples.iter().map(|s| s.1).min().unwrap_or(0),
            ramp.as_secs_f64(),
            samples.len()
        )),
    })
}
