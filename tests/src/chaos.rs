//! The chaos run (issue "Chaos, fuzzing and bad input"): the fleet as
//! separate processes (ingress, 3 workers, 2 billing-workers) against the
//! real PostgreSQL and RabbitMQ and the in-process fakes, fed `updates`
//! messages from `users` users while faults are injected at seeded random
//! times: SIGKILL of a worker (then a restart), SIGSTOP of a worker past
//! its lease (then SIGCONT), SIGKILL of a billing-worker (then a restart),
//! a RabbitMQ restart, a PostgreSQL restart, and every broker connection
//! closed by `rabbitmqctl`.
//!
//! After the load and a quiet period it checks, from the fakes' own
//! records and the databases: every accepted update answered exactly once
//! or failed with a notice to the user; no lease held; the outbox empty and
//! applied; every call the fake Anthropic completed charged exactly once,
//! at the amount the fixture scenario gives for that stream (computed
//! independently of the product); `billing-worker reconcile` passes; no
//! process left dead.
//!
//! With `small_grants` some users start with a few cents instead of $100
//! (`small_grant_usd` × k / n for the k-th of n): their answers exhaust the
//! grant mid-run (a call's hold needs a few cents beyond its price), after
//! which their updates are answered with the needs-credit notice. Then it
//! also checks: a refusal counts as an answered update (not lost), only
//! users on small grants are refused, each user is charged the scenario's
//! price once per answer, nobody spends beyond their grant, and no balance
//! ends below zero (`negative_balances`).

use crate::fake_anthropic::{FakeAnthropic, ScriptedResponse};
use crate::fake_telegram::FakeTelegram;
use crate::fleet::{delete_topology, worker_name, Databases, Fleet, FleetConfig, Services, Signal};
use anyhow::Context as _;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// The stream every call is answered with, and the scenario step that
/// gives its exact charge.
const STREAM: &str = "anthropic/text_capital.sse";
const PRICED_BY: &str = "scenarios/01_start_and_question.toml";
/// The update every message is derived from.
const UPDATE: &str = "telegram/ada_capital.json";
const TOKEN: &str = "123456:chaos-bot-token";
const SECRET: &str = "chaos-webhook-secret";
/// Lease length of the workers in the run, seconds.
const VISIBILITY_S: u64 = 5;
const WORKERS: usize = 3;
const BILLING_WORKERS: usize = 2;
/// Texts of the notices that tell a user their message failed.
const FAILURE_NOTICES: [&str; 2] = ["Sorry,", "(Claude is unavailable"];
/// Start of the notice refusing an answer the balance cannot pay for
/// (`worker::notices::needs_credit`).
const NEEDS_CREDIT: &str = "Your balance is too low";
/// The grant of a user not on a small grant, USD.
const FULL_GRANT_USD: i64 = 100;

/// What to run.
#[derive(Debug, Clone)]
pub struct ChaosConfig {
    /// Folder of the fleet's binaries.
    pub bin_dir: PathBuf,
    /// `fixtures/` (the repo copy of `../shared/fixtures`).
    pub fixtures: PathBuf,
    /// PostgreSQL and RabbitMQ.
    pub services: Services,
    /// Process logs go here.
    pub log_dir: PathBuf,
    /// Seed of every random choice (fault times and kinds, senders).
    pub seed: u64,
    /// Updates to post.
    pub updates: usize,
    /// Distinct users (private chats) they come from.
    pub users: usize,
    /// Faults to inject during the load.
    pub faults: usize,
    /// Seconds over which the updates are posted.
    pub load_s: u64,
    /// Longest wait, seconds, for the fleet to settle after the load.
    pub quiet_s: u64,
    /// Users (the first ones, at most `users`) granted a small amount
    /// instead of $100 ([`small_grants`]).
    pub small_grants: usize,
    /// The largest small grant, USD: the k-th of n users gets
    /// `small_grant_usd × k / n`.
    pub small_grant_usd: Decimal,
}

/// The grant of each user: the first `cfg.small_grants` get
/// `small_grant_usd × k / n` (k = 1…n, rounded down to a millionth of a
/// dollar), the others [`FULL_GRANT_USD`].
pub fn small_grants(cfg: &ChaosConfig, users: &[i64]) -> Vec<(i64, Decimal)> {
    let n = cfg.small_grants.min(users.len());
    users
        .iter()
        .enumerate()
        .map(|(i, &u)| {
            let amount = if i < n {
                (cfg.small_grant_usd * Decimal::from(i + 1) / Decimal::from(n))
                    .round_dp_with_strategy(6, rust_decimal::RoundingStrategy::ToZero)
            } else {
                Decimal::from(FULL_GRANT_USD)
            };
            (u, amount)
        })
        .collect()
}

/// One injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// SIGKILL a worker, restart it a second later.
    KillWorker,
    /// SIGSTOP a worker for longer than its lease, then SIGCONT.
    StopWorker,
    /// SIGKILL a billing-worker, restart it a second later.
    KillBillingWorker,
    /// `rabbitmqctl stop_app` then `start_app`.
    RestartRabbitmq,
    /// `pg_ctlcluster … restart`.
    RestartPostgres,
    /// `rabbitmqctl close_all_connections`.
    CloseConnections,
}

const KINDS: [FaultKind; 6] = [
    FaultKind::KillWorker,
    FaultKind::StopWorker,
    FaultKind::KillBillingWorker,
    FaultKind::RestartRabbitmq,
    FaultKind::RestartPostgres,
    FaultKind::CloseConnections,
];

/// A fault as injected.
#[derive(Debug, Clone, Serialize)]
pub struct FaultRecord {
    /// Seconds after the load started.
    pub at_s: f64,
    /// What.
    pub kind: FaultKind,
    /// The process hit, for process faults.
    pub target: Option<String>,
    /// An error injecting it, if any (the run goes on).
    pub error: Option<String>,
}

/// The outcome (`--json` writes it).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChaosReport {
    /// Faults injected.
    pub faults: usize,
    /// Each fault.
    pub fault_log: Vec<FaultRecord>,
    /// Updates accepted by the webhook (HTTP 200).
    pub updates: usize,
    /// Updates answered (an answer message in their chat).
    pub answered: usize,
    /// Updates that failed with a notice to the user.
    pub failed_with_notice: usize,
    /// Users on a small grant.
    pub small_grant_users: usize,
    /// Updates answered with the needs-credit notice (the balance could not
    /// pay for an answer): answered, not lost.
    pub refused_for_credit: usize,
    /// Users on a small grant who were refused at least once (their grant
    /// ran out).
    pub small_grant_users_refused: usize,
    /// What the users on a small grant spent, USD (never beyond their grants).
    pub small_grant_spent_usd: Decimal,
    /// Answers or notices beyond one per accepted update.
    pub duplicates: usize,
    /// Accepted updates with neither an answer nor a notice.
    pub lost: usize,
    /// Messages API calls the fake completed.
    pub completed_calls: usize,
    /// Of those, calls whose worker died before recording them: booked by a
    /// later attempt or the reaper (`api_calls.state = 'orphaned'`), in the
    /// ledger as estimated provider cost charged to nobody; matched by
    /// request id, or by count for a worker killed before it read the
    /// response (its row, written before the request, has no request id).
    pub orphaned_calls: usize,
    /// Ledger usage charges minus what the completed calls cost, USD.
    pub ledger_variance_usd: Decimal,
    /// User accounts whose ledger balance ended below zero (issue 15: never).
    pub negative_balances: usize,
    /// Every broken promise, in words.
    pub violations: Vec<String>,
    /// Wall time of the run, seconds.
    pub seconds: f64,
}

/// Runs the chaos and returns its report (violations included; the caller
/// decides the exit code).
///
/// # Errors
/// Set-up failures (fixtures, databases, processes that never start).
pub async fn run(cfg: &ChaosConfig) -> anyhow::Result<ChaosReport> {
    let started = Instant::now();
    let (user_charge, provider_cost) = priced_stream(cfg)?;
    let stem = format!("chaos_{}", &uuid::Uuid::now_v7().simple().to_string()[20..]);
    let prefix = format!("{stem}_");
    let anthropic = FakeAnthropic::start("127.0.0.1:0".parse()?).await?;
    let telegram = FakeTelegram::start("127.0.0.1:0".parse()?, "fleet_test_bot").await?;
    // Realistic latency: 300 ms to the first event, 30 ms per event after.
    let sse = std::fs::read(cfg.fixtures.join(STREAM)).with_context(|| format!("reading {STREAM}"))?;
    anthropic.set_default(Some(ScriptedResponse {
        first_event_delay_ms: 300,
        ..ScriptedResponse { event_delay_ms: 30, ..ScriptedResponse::from_sse(sse) }
    }));
    let dbs = Databases::create(&cfg.services, &stem).await?;
    let worker_env: BTreeMap<String, String> = [
        ("VISIBILITY_TIMEOUT_S", VISIBILITY_S.to_string()),
        ("MAX_ATTEMPTS", "6".to_owned()),
        ("PACE_PRIVATE_MS", "200".to_owned()),
        ("PACE_BOT_MS", "1".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let fleet_cfg = FleetConfig {
        bin_dir: cfg.bin_dir.clone(),
        log_dir: cfg.log_dir.join(&stem),
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
        workers: WORKERS,
    };
    let fleet = Fleet::start_sized(&fleet_cfg, BILLING_WORKERS).await?;
    let webhook = fleet.webhook_url();
    let fleet = Arc::new(Mutex::new(fleet));
    let mut report = ChaosReport::default();
    let result = async {
        let users: Vec<i64> = (0..cfg.users.max(1)).map(|i| 300_000_001 + i64::try_from(i).unwrap_or(0)).collect();
        let grants = small_grants(cfg, &users);
        for &(u, amount) in &grants {
            billing_worker::ledger::grant(&dbs.billing, u, amount, uuid::Uuid::now_v7()).await?;
        }
        let grants: BTreeMap<i64, Decimal> = grants.into_iter().collect();
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let plan = fault_plan(&mut rng, cfg);
        let posting = tokio::spawn(post_updates(cfg.clone(), webhook, users.clone(), rng.random()));
        report.fault_log = inject(&fleet, plan, &mut rng).await;
        report.faults = report.fault_log.len();
        let accepted = posting.await.context("the poster panicked")??;
        report.updates = accepted.values().map(Vec::len).sum();
        settle(cfg, &dbs, &accepted).await;
        let prices = (user_charge, provider_cost);
        check(cfg, &dbs, &anthropic, &telegram, &accepted, &grants, prices, &mut report).await?;
        let mut fleet = fleet.lock().await;
        let dead = fleet.exited();
        if !dead.is_empty() {
            report.violations.push(format!("processes not running at the end: {dead:?}"));
        }
        anyhow::Ok(())
    }
    .await;
    match Arc::try_unwrap(fleet) {
        Ok(f) => f.into_inner().stop().await,
        Err(_) => tracing::warn!("fleet still shared at the end; its processes die with it"),
    }
    let _ = delete_topology(&cfg.services.amqp_url, &prefix).await;
    if result.is_ok() && report.violations.is_empty() {
        let _ = dbs.drop_all().await;
    }
    anthropic.shutdown().await;
    telegram.shutdown().await;
    report.seconds = started.elapsed().as_secs_f64();
    result.map(|()| report)
}

/// The charge and provider cost of one complete [`STREAM`] call, read from
/// the fixture scenario that prices it (independent of the product).
fn priced_stream(cfg: &ChaosConfig) -> anyhow::Result<(Decimal, Decimal)> {
    let text = std::fs::read_to_string(cfg.fixtures.join(PRICED_BY))?;
    let doc: toml::Value = toml::from_str(&text)?;
    let steps = doc.get("step").and_then(toml::Value::as_array).context("scenario without steps")?;
    for step in steps {
        let streams = step.get("anthropic").and_then(toml::Value::as_array);
        let uses =
            streams.is_some_and(|s| s.iter().any(|a| a.get("sse").and_then(toml::Value::as_str) == Some(STREAM)));
        let expect = step.get("expect");
        let field = |k: &str| expect.and_then(|e| e.get(k)).and_then(toml::Value::as_str).map(str::parse::<Decimal>);
        if let (true, Some(Ok(charge)), Some(Ok(cost))) = (uses, field("user_charge_usd"), field("provider_cost_usd")) {
            return Ok((charge, cost));
        }
    }
    anyhow::bail!("{PRICED_BY} has no priced step streaming {STREAM}")
}

/// Fault kinds and their times (seconds into the load), in time order.
fn fault_plan(rng: &mut StdRng, cfg: &ChaosConfig) -> Vec<(f64, FaultKind)> {
    let span = cfg.load_s.max(1) as f64;
    let mut plan: Vec<(f64, FaultKind)> = (0..cfg.faults)
        .map(|i| {
            // Every kind comes up in turn, shuffled by the seed.
            let kind = KINDS[(i + rng.random_range(0..KINDS.len())) % KINDS.len()];
            (rng.random_range(0.05..0.9) * span, kind)
        })
        .collect();
    plan.sort_by(|a, b| a.0.total_cmp(&b.0));
    plan
}

async fn inject(fleet: &Arc<Mutex<Fleet>>, plan: Vec<(f64, FaultKind)>, rng: &mut StdRng) -> Vec<FaultRecord> {
    let start = Instant::now();
    let mut log = Vec::new();
    for (at, kind) in plan {
        let due = Duration::from_secs_f64(at);
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        let target = match kind {
            FaultKind::KillWorker | FaultKind::StopWorker => Some(worker_name(rng.random_range(0..WORKERS))),
            FaultKind::KillBillingWorker => Some(format!("billing-worker-{}", rng.random_range(0..BILLING_WORKERS))),
            _ => None,
        };
        let at_s = start.elapsed().as_secs_f64();
        tracing::info!(?kind, target = ?target, at_s, "injecting a fault");
        let error = one_fault(fleet, kind, target.as_deref()).await.err().map(|e| format!("{e:#}"));
        log.push(FaultRecord { at_s, kind, target, error });
    }
    log
}

async fn one_fault(fleet: &Arc<Mutex<Fleet>>, kind: FaultKind, target: Option<&str>) -> anyhow::Result<()> {
    let name = target.unwrap_or_default();
    match kind {
        FaultKind::KillWorker | FaultKind::KillBillingWorker => {
            fleet.lock().await.signal(name, Signal::Kill).await?;
            fleet.lock().await.wait_exit(name, Duration::from_secs(10)).await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            fleet.lock().await.restart(name).await
        }
        FaultKind::StopWorker => {
            fleet.lock().await.signal(name, Signal::Stop).await?;
            tokio::time::sleep(Duration::from_secs(VISIBILITY_S + 2)).await;
            fleet.lock().await.signal(name, Signal::Cont).await
        }
        FaultKind::RestartRabbitmq => {
            shell("rabbitmqctl", &["stop_app"]).await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            shell("rabbitmqctl", &["start_app"]).await?;
            shell("rabbitmqctl", &["await_startup"]).await
        }
        FaultKind::RestartPostgres => {
            let version = std::fs::read_dir("/etc/postgresql")?
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .next()
                .context("no cluster under /etc/postgresql")?;
            shell("pg_ctlcluster", &["--skip-systemctl-redirect", &version, "main", "restart"]).await
        }
        FaultKind::CloseConnections => shell("rabbitmqctl", &["close_all_connections", "chaos run"]).await,
    }
}

async fn shell(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        anyhow::bail!("{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Posts the updates at an even rate; a refused post (503 while the broker
/// restarts) is retried as Telegram would, for up to two minutes. Returns
/// the accepted update ids by chat.
async fn post_updates(
    cfg: ChaosConfig,
    webhook: String,
    users: Vec<i64>,
    seed: u64,
) -> anyhow::Result<BTreeMap<i64, Vec<i64>>> {
    let template: Value = serde_json::from_slice(&std::fs::read(cfg.fixtures.join(UPDATE))?)?;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    let mut rng = StdRng::seed_from_u64(seed);
    let gap = Duration::from_secs_f64(cfg.load_s as f64 / cfg.updates.max(1) as f64);
    let start = Instant::now();
    let mut accepted: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for i in 0..cfg.updates {
        if let Some(wait) = (gap * u32::try_from(i).unwrap_or(u32::MAX)).checked_sub(start.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        let user = users[rng.random_range(0..users.len())];
        let update_id = 900_000_000 + i64::try_from(i)?;
        let mut u = template.clone();
        u["update_id"] = update_id.into();
        u["message"]["message_id"] = (i64::try_from(i)? + 1).into();
        u["message"]["text"] = format!("Question {i}: what is the capital of France?").into();
        u["message"]["from"]["id"] = user.into();
        u["message"]["chat"]["id"] = user.into();
        let body = serde_json::to_vec(&u)?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let sent = http
                .post(&webhook)
                .header("x-telegram-bot-api-secret-token", SECRET)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await;
            if sent.as_ref().is_ok_and(|r| r.status().is_success()) {
                accepted.entry(user).or_default().push(update_id);
                break;
            }
            if Instant::now() > deadline {
                tracing::warn!(update_id, "update never accepted; Telegram would have given up too");
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    Ok(accepted)
}

/// Waits until every accepted update's job has ended, no call is left
/// `open` (booked by the reaper once its attempt is over) and the billing
/// has caught up, or `quiet_s` passed (the checks then say what is missing).
async fn settle(cfg: &ChaosConfig, dbs: &Databases, accepted: &BTreeMap<i64, Vec<i64>>) {
    let total: i64 = accepted.values().map(|v| i64::try_from(v.len()).unwrap_or(0)).sum();
    let deadline = Instant::now() + Duration::from_secs(cfg.quiet_s);
    while Instant::now() < deadline {
        let ended: Result<i64, _> =
            sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status IN ('done', 'failed', 'cancelled')")
                .fetch_one(&dbs.bot)
                .await;
        let unpublished: Result<i64, _> =
            sqlx::query_scalar("SELECT count(*) FROM billing_outbox WHERE published_at IS NULL")
                .fetch_one(&dbs.bot)
                .await;
        let open: Result<i64, _> =
            sqlx::query_scalar("SELECT count(*) FROM api_calls WHERE state = 'open'").fetch_one(&dbs.bot).await;
        if let (Ok(ended), Ok(0), Ok(0)) = (ended, unpublished, open) {
            if ended >= total && billing_caught_up(dbs).await.unwrap_or(false) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn billing_caught_up(dbs: &Databases) -> anyhow::Result<bool> {
    let ids: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT event_id FROM billing_outbox").fetch_all(&dbs.bot).await?;
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM applied_events WHERE event_id = ANY($1)")
        .bind(&ids)
        .fetch_one(&dbs.billing)
        .await?;
    Ok(applied == i64::try_from(ids.len())?)
}

#[expect(clippy::too_many_arguments, reason = "the run's parts, each checked")]
async fn check(
    cfg: &ChaosConfig,
    dbs: &Databases,
    anthropic: &FakeAnthropic,
    telegram: &FakeTelegram,
    accepted: &BTreeMap<i64, Vec<i64>>,
    grants: &BTreeMap<i64, Decimal>,
    (user_charge, provider_cost): (Decimal, Decimal),
    report: &mut ChaosReport,
) -> anyhow::Result<()> {
    // The streamed Markdown as the user sees it (bold markers become an entity).
    let answer = crate::demo::sse_text(&std::fs::read(cfg.fixtures.join(STREAM))?).replace("**", "");
    let messages = telegram.messages();
    let full = Decimal::from(FULL_GRANT_USD);
    report.small_grant_users = grants.values().filter(|g| **g < full).count();
    // Answers delivered per chat: what each user must have been charged for.
    let mut answers_by_chat: BTreeMap<i64, usize> = BTreeMap::new();
    // 1. Every accepted update answered once (a needs-credit notice
    //    answers it too) or failed with a notice.
    for (chat, updates) in accepted {
        let sent: Vec<&str> = messages.iter().filter(|m| m.chat_id == *chat).map(|m| m.text.as_str()).collect();
        let answers = sent.iter().filter(|t| t.trim() == answer.trim()).count();
        let refusals = sent.iter().filter(|t| t.starts_with(NEEDS_CREDIT)).count();
        let notices = sent.iter().filter(|t| FAILURE_NOTICES.iter().any(|n| t.starts_with(n))).count();
        let want = updates.len();
        answers_by_chat.insert(*chat, answers.min(want));
        report.answered += answers.min(want);
        report.refused_for_credit += refusals.min(want.saturating_sub(answers));
        report.failed_with_notice += notices.min(want.saturating_sub(answers + refusals));
        if refusals > 0 {
            if grants.get(chat).is_some_and(|g| *g < full) {
                report.small_grant_users_refused += 1;
            } else {
                report.violations.push(format!("chat {chat}: {refusals} needs-credit notice(s) on a full grant"));
            }
        }
        let got = answers + refusals + notices;
        if got > want {
            report.duplicates += got - want;
            report.violations.push(format!("chat {chat}: {got} answers/notices for {want} updates"));
        } else if got < want {
            report.lost += want - got;
            let other: Vec<&&str> = sent.iter().filter(|t| t.trim() != answer.trim()).take(3).collect();
            report
                .violations
                .push(format!("chat {chat}: only {got} answers/notices for {want} updates; other texts: {other:?}"));
        }
    }
    let ids: Vec<i64> = accepted.values().flatten().copied().collect();
    let without_job: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM unnest($1::bigint[]) AS u(id) WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.update_id = u.id)",
    )
    .bind(&ids)
    .fetch_one(&dbs.bot)
    .await?;
    if without_job > 0 {
        report.violations.push(format!("{without_job} accepted updates have no job"));
    }
    // 2. No lease held, nothing waiting.
    let open: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')")
        .fetch_one(&dbs.bot)
        .await?;
    if open > 0 {
        report.violations.push(format!("{open} jobs still queued or holding a lease"));
    }
    // 3. Outbox empty and applied.
    let unpublished: i64 = sqlx::query_scalar("SELECT count(*) FROM billing_outbox WHERE published_at IS NULL")
        .fetch_one(&dbs.bot)
        .await?;
    if unpublished > 0 {
        report.violations.push(format!("{unpublished} outbox events never published"));
    }
    if !billing_caught_up(dbs).await? {
        report.violations.push("outbox events missing from the ledger".into());
    }
    // 4. Every call the fake completed is in the ledger exactly once (as
    //    provider cost, by its request id), at the scenario's price when
    //    the whole stream was received; the user pays the scenario's price
    //    once per answered update (calls of abandoned attempts are ours).
    let calls = anthropic.calls();
    let completed: Vec<_> = calls.iter().filter(|c| c.completed && c.status == 200).collect();
    report.completed_calls = completed.len();
    let costs: Vec<(Option<String>, Decimal, bool)> = sqlx::query_as(
        "SELECT provider_request_id, amount, estimated FROM ledger_entries WHERE kind = 'provider_cost'",
    )
    .fetch_all(&dbs.billing)
    .await?;
    let mut by_request: BTreeMap<&str, Vec<(Decimal, bool)>> = BTreeMap::new();
    for (id, amount, estimated) in &costs {
        by_request.entry(id.as_deref().unwrap_or("-")).or_default().push((*amount, *estimated));
    }
    let (mut missing, mut twice, mut mispriced) = (0, 0, 0);
    for call in &completed {
        match by_request.get(call.request_id.as_str()).map(Vec::as_slice) {
            None | Some([]) => missing += 1,
            Some([(amount, estimated)]) => {
                if !estimated && *amount != provider_cost {
                    mispriced += 1;
                }
            }
            Some(_) => twice += 1,
        }
    }
    // A worker killed after its request left but before it read the
    // response has an `open` row with no request id (written before the
    // request): booked as an orphan, its provider cost is in the ledger
    // under no request id. Such a call cannot be matched by id; it is
    // matched by count: every completed call missing by id must have an
    // unidentified orphan booking of its own. (Unidentified bookings beyond
    // that are requests the provider never completed, or never received:
    // over-recorded cost, estimated, not a loss.)
    let unidentified: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM api_calls WHERE state = 'orphaned' AND request_id IS NULL AND NOT started",
    )
    .fetch_one(&dbs.bot)
    .await?;
    let unidentified_in_ledger = by_request.get("-").map_or(0, Vec::len);
    let matched_by_count = missing.min(usize::try_from(unidentified)?).min(unidentified_in_ledger);
    missing -= matched_by_count;
    report.orphaned_calls += matched_by_count;
    if missing + twice + mispriced > 0 {
        report.violations.push(format!(
            "completed calls: {missing} not in the ledger, {twice} in it more than once, {mispriced} at a wrong provider cost"
        ));
    }
    // A call whose worker died before recording it counts as in the books
    // above only through its estimated booking (orphaned: charged to
    // nobody); one still open at the end was never booked.
    let orphaned: Vec<String> =
        sqlx::query_scalar("SELECT request_id FROM api_calls WHERE state = 'orphaned' AND request_id IS NOT NULL")
            .fetch_all(&dbs.bot)
            .await?;
    report.orphaned_calls += completed.iter().filter(|c| orphaned.contains(&c.request_id)).count();
    let open: i64 =
        sqlx::query_scalar("SELECT count(*) FROM api_calls WHERE state = 'open'").fetch_one(&dbs.bot).await?;
    if open > 0 {
        report.violations.push(format!("{open} Messages API calls still open in api_calls (never booked)"));
    }
    let charges: Vec<Decimal> = sqlx::query_scalar("SELECT amount FROM ledger_entries WHERE kind = 'usage_charge'")
        .fetch_all(&dbs.billing)
        .await?;
    let charged: Decimal = charges.iter().copied().sum();
    let answered = Decimal::from(report.answered);
    report.ledger_variance_usd = charged - answered * user_charge;
    if !report.ledger_variance_usd.is_zero() {
        report.violations.push(format!(
            "users were charged {charged} USD ({} charges) for {} answers at {user_charge} USD each",
            charges.len(),
            report.answered
        ));
    }
    // Nobody spends credit they do not have (holds before every call).
    let negative: Vec<(i64, Decimal)> =
        sqlx::query_as("SELECT user_id, balance FROM accounts WHERE kind = 'user' AND balance < 0 ORDER BY user_id")
            .fetch_all(&dbs.billing)
            .await?;
    report.negative_balances = negative.len();
    if !negative.is_empty() {
        report.violations.push(format!("user balances below zero: {negative:?}"));
    }
    // Each user pays the scenario's price once per answer delivered to them
    // (refused updates cost nothing), and nobody spends beyond the grant.
    let per_user: Vec<(i64, Decimal)> = sqlx::query_as(
        "SELECT user_id, sum(amount) FROM ledger_entries WHERE kind = 'usage_charge' GROUP BY user_id ORDER BY user_id",
    )
    .fetch_all(&dbs.billing)
    .await?;
    let per_user: BTreeMap<i64, Decimal> = per_user.into_iter().collect();
    for (&user, &grant) in grants {
        let spent = per_user.get(&user).copied().unwrap_or_default();
        let answers = answers_by_chat.get(&user).copied().unwrap_or_default();
        if spent != Decimal::from(answers) * user_charge {
            report.violations.push(format!("user {user}: charged {spent} USD for {answers} answers"));
        }
        if spent > grant {
            report.violations.push(format!("user {user}: spent {spent} USD of a {grant} USD grant"));
        }
        if grant < full {
            report.small_grant_spent_usd += spent;
        }
    }
    let requests: Vec<(Option<String>, i64)> = sqlx::query_as(
        "SELECT provider_request_id, count(*) FROM ledger_entries WHERE kind = 'usage_charge' GROUP BY 1 HAVING count(*) > 1",
    )
    .fetch_all(&dbs.billing)
    .await?;
    if !requests.is_empty() {
        report.violations.push(format!("Anthropic requests charged to a user more than once: {requests:?}"));
    }
    // 5. Reconcile passes.
    let today = chrono::Utc::now().date_naive().to_string();
    let out = tokio::process::Command::new(cfg.bin_dir.join("billing-worker"))
        .env("DATABASE_URL", crate::fleet::as_role(&dbs.bot_url, crate::fleet::BILLING_ROLE)?)
        .env("BILLING_DATABASE_URL", crate::fleet::as_role(&dbs.billing_url, crate::fleet::BILLING_ROLE)?)
        .env("LOG_FORMAT", "json")
        .args(["reconcile", "--from", &today, "--to", &today])
        .output()
        .await
        .context("running billing-worker reconcile")?;
    if !out.status.success() {
        report.violations.push(format!(
            "reconcile failed: {}",
            String::from_utf8_lossy(&out.stdout).lines().rev().take(15).collect::<Vec<_>>().join(" | ")
        ));
    }
    Ok(())
}

/// Prints the report as a table.
#[expect(clippy::print_stdout, reason = "the chaos run's table")]
pub fn print(report: &ChaosReport) {
    println!("fault at (s)  kind                 target / error");
    for f in &report.fault_log {
        println!(
            "{:<13.1} {:<20} {} {}",
            f.at_s,
            serde_json::to_value(f.kind).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default(),
            f.target.clone().unwrap_or_default(),
            f.error.clone().unwrap_or_default()
        );
    }
    println!();
    for (k, v) in [
        ("faults injected", report.faults.to_string()),
        ("updates accepted", report.updates.to_string()),
        ("answered", report.answered.to_string()),
        ("failed with notice", report.failed_with_notice.to_string()),
        ("refused for credit", report.refused_for_credit.to_string()),
        ("small-grant users", report.small_grant_users.to_string()),
        ("  refused at least once", report.small_grant_users_refused.to_string()),
        ("  spent (USD)", report.small_grant_spent_usd.to_string()),
        ("duplicates", report.duplicates.to_string()),
        ("lost", report.lost.to_string()),
        ("completed Claude calls", report.completed_calls.to_string()),
        ("  booked after a death", report.orphaned_calls.to_string()),
        ("ledger variance (USD)", report.ledger_variance_usd.to_string()),
        ("negative_balances", report.negative_balances.to_string()),
        ("violations", report.violations.len().to_string()),
        ("seconds", format!("{:.0}", report.seconds)),
    ] {
        println!("{k:<24} {v}");
    }
    for v in &report.violations {
        println!("VIOLATION: {v}");
    }
    println!("chaos: {}", if report.violations.is_empty() { "PASS" } else { "FAIL" });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_users_get_small_grants_spread_up_to_the_largest_and_the_rest_the_full_grant() {
        let cfg = ChaosConfig {
            bin_dir: PathBuf::new(),
            fixtures: PathBuf::new(),
            services: Services { postgres_url: String::new(), amqp_url: String::new() },
            log_dir: PathBuf::new(),
            seed: 1,
            updates: 1,
            users: 4,
            faults: 0,
            load_s: 1,
            quiet_s: 1,
            small_grants: 3,
            small_grant_usd: "0.05".parse().unwrap(),
        };
        let grants = small_grants(&cfg, &[1, 2, 3, 4]);
        let amounts: Vec<String> = grants.iter().map(|(_, a)| a.normalize().to_string()).collect();
        assert_eq!(amounts, ["0.016666", "0.033333", "0.05", "100"]);
        assert_eq!(grants.iter().map(|(u, _)| *u).collect::<Vec<_>>(), [1, 2, 3, 4]);
        // More small grants than users: every user is on one.
        let all = small_grants(&ChaosConfig { small_grants: 9, ..cfg }, &[1, 2]);
        assert!(all.iter().all(|(_, a)| *a <= "0.05".parse().unwrap()), "{all:?}");
    }
}
