//! The finance CLI as a finance person runs it (the built `billing-worker`
//! binary, as its own database role): `--format` is a closed set; CSV is
//! read back by a CSV reader (a header, one column per field, nothing
//! else); JSON is checked against a schema; `grant` refuses an idempotency
//! key reused for another amount or user; `statement` gives every entry
//! between opening and closing balances; dead letters are listed by the
//! event id `reconcile` reports and discarded with a recorded reason;
//! `reconcile` lists user balances below zero and exits 1 for them.
//!
//! Self-contained: the binary runner is here (build the bins first:
//! `cargo build --workspace --bins --locked`).

use anyhow::{Context as _, Result};
use fleet_tests::harness::billing::{publish, usage, BillingWorker};
use fleet_tests::harness::{wait_until, Broker, TestDb, WAIT};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use shared::amqp::{ConfirmPublisher, Outgoing, BILLING_ROUTING_KEY};
use shared::contracts::BillingEvent;
use std::path::PathBuf;
use std::time::Duration;
use uuid::Uuid;

/// The built `billing-worker` (`$CARGO_TARGET_DIR/debug` or `target/debug`).
fn binary() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")));
    target.join("debug").join("billing-worker")
}

/// What one run of the CLI left.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(&self) -> Result<&Self> {
        anyhow::ensure!(
            self.code == Some(0),
            "exit {:?}\nstdout:\n{}\nstderr:\n{}",
            self.code,
            self.stdout,
            self.stderr
        );
        Ok(self)
    }

    fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.stdout).with_context(|| format!("not JSON:\n{}", self.stdout))
    }
}

/// Runs `billing-worker args…` on the test database (bot and billing in
/// one) as the billing-worker's role, with `broker` for the commands that
/// publish.
async fn cli(db: &TestDb, broker: Option<&Broker>, args: &[&str]) -> Result<Run> {
    let url = fleet_tests::fleet::as_role(&db.url, fleet_tests::fleet::BILLING_ROLE)?;
    let mut cmd = tokio::process::Command::new(binary());
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("BILLING_DATABASE_URL", &url)
        .env("DATABASE_URL", &url)
        .env("LOG_FORMAT", "json")
        .args(args)
        .kill_on_drop(true);
    if let Some(b) = broker {
        cmd.env("AMQP_URL", &b.url).env("AMQP_PREFIX", b.prefix());
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .context("billing-worker did not exit within 60 s")?
        .with_context(|| format!("running {} (cargo build --workspace --bins first)", binary().display()))?;
    Ok(Run {
        code: out.status.code(),
        stdout: String::from_utf8(out.stdout)?,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Header and records of a CSV document; every record as long as the
/// header (the reader refuses anything else: a summary line fails).
fn read_csv(text: &str) -> Result<(Vec<String>, Vec<Vec<String>>)> {
    let mut reader = csv::ReaderBuilder::new().flexible(false).from_reader(text.as_bytes());
    let header: Vec<String> = reader.headers()?.iter().map(str::to_owned).collect();
    let mut rows = Vec::new();
    for r in reader.records() {
        let r = r.with_context(|| format!("not CSV of one table:\n{text}"))?;
        rows.push(r.iter().map(str::to_owned).collect());
    }
    Ok((header, rows))
}

/// The cell `column` of `row`.
fn col<'a>(header: &[String], row: &'a [String], column: &str) -> &'a str {
    header.iter().position(|h| h == column).and_then(|i| row.get(i)).map_or("", String::as_str)
}

/// Errors of `instance` against the JSON Schema `schema` (none when valid).
fn schema_errors(schema: &Value, instance: &Value) -> Result<Vec<String>> {
    let validator = jsonschema::validator_for(schema).map_err(|e| anyhow::anyhow!("schema: {e}"))?;
    Ok(validator.iter_errors(instance).map(|e| format!("{} at {}", e, e.instance_path())).collect())
}

/// A money string: an optional sign, digits, and two decimals at least.
const MONEY: &str = r"^-?[0-9]+\.[0-9]{2,}$";

/// True when `s` is written as money is (two decimals at least, never rounded).
fn is_money(s: &str) -> bool {
    regex::Regex::new(MONEY).is_ok_and(|r| r.is_match(s))
}

/// Writes `event`'s outbox row (published) and applies it to the ledger,
/// as a worker and the billing-worker would.
async fn charged(db: &TestDb, event: &BillingEvent) -> Result<()> {
    outbox(db, event.event_id(), &serde_json::to_value(event)?).await?;
    billing_worker::ledger::apply_event(&db.pool, event).await?;
    Ok(())
}

async fn outbox(db: &TestDb, id: Uuid, payload: &Value) -> Result<()> {
    let job = payload.get("job_id").and_then(Value::as_str).and_then(|j| Uuid::parse_str(j).ok());
    sqlx::query("INSERT INTO billing_outbox (event_id, job_id, payload, published_at) VALUES ($1, $2, $3, now())")
        .bind(id)
        .bind(job.unwrap_or_else(Uuid::now_v7))
        .bind(payload)
        .execute(&db.pool)
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_format_outside_table_csv_json_is_refused_with_a_non_zero_exit() -> Result<()> {
    let db = TestDb::new().await?;
    for args in [
        &["reconcile", "--format", "xml"][..],
        &["statement", "--user", "1", "--format", "xml"][..],
        &["dead-letters", "list", "--format", "xml"][..],
        &["reconcile", "--format", "CSV "][..],
    ] {
        let run = cli(&db, None, args).await?;
        assert!(run.code.is_some_and(|c| c != 0), "{args:?} exited {:?}: {}", run.code, run.stdout);
        assert!(run.stdout.is_empty(), "{args:?} printed {}", run.stdout);
        assert!(run.stderr.contains("table") && run.stderr.contains("csv"), "{args:?}: {}", run.stderr);
    }
    db.cleanup().await
}

fn reconcile_schema() -> Value {
    let money = json!({ "type": "string", "pattern": MONEY });
    let row = json!({
        "type": "object",
        "required": ["day", "model", "class", "outbox_usd", "ledger_usd", "variance_usd"],
        "properties": {
            "day": { "type": "string", "format": "date" }, "model": { "type": "string" }, "class": { "type": "string" },
            "outbox_usd": money, "ledger_usd": money, "variance_usd": money,
        },
    });
    json!({
        "type": "object",
        "required": ["from", "to", "clean", "variance", "totals", "rows", "missing_in_ledger", "missing_in_outbox",
                     "discarded", "invariant_failures", "negative_balances", "provider"],
        "properties": {
            "from": { "type": "string" }, "to": { "type": "string" },
            "clean": { "type": "boolean" },
            "variance": {
                "type": "object",
                "required": ["usd", "tokens", "missing_in_ledger", "missing_in_outbox", "invariant_failures",
                             "negative_balances"],
                "properties": {
                    "usd": money, "tokens": { "type": "integer", "minimum": 0 },
                    "missing_in_ledger": { "type": "integer" }, "missing_in_outbox": { "type": "integer" },
                    "invariant_failures": { "type": "integer" },
                    "negative_balances": { "type": "integer", "minimum": 0 },
                },
            },
            "totals": {
                "type": "array",
                "items": {
                    "type": "object", "required": ["class", "outbox_usd", "ledger_usd", "variance_usd"],
                    "properties": { "class": { "type": "string" }, "outbox_usd": money, "ledger_usd": money,
                                    "variance_usd": money },
                },
            },
            "rows": { "type": "array", "items": row },
            "missing_in_ledger": { "type": "array", "items": { "type": "string" } },
            "missing_in_outbox": { "type": "array", "items": { "type": "string" } },
            "discarded": { "type": "array", "items": { "type": "string" } },
            "invariant_failures": { "type": "array", "items": { "type": "string" } },
            "negative_balances": {
                "type": "array",
                "items": {
                    "type": "object", "required": ["user_id", "account", "balance_usd"],
                    "properties": {
                        "user_id": { "type": "integer" }, "account": { "type": "string", "pattern": "^user:" },
                        "balance_usd": { "type": "string", "pattern": r"^-[0-9]+\.[0-9]{2,}$" },
                    },
                },
            },
            "provider": { "type": "object", "required": ["status"] },
        },
    })
}

#[tokio::test]
async fn reconcile_writes_real_csv_and_json_with_totals_variance_and_clean() -> Result<()> {
    let db = TestDb::new().await?;
    billing_worker::ledger::grant(&db.pool, 7, "5".parse()?, Uuid::now_v7()).await?;
    let job = Uuid::now_v7();
    for seq in 1..=3 {
        charged(&db, &usage(job, seq, 7, "0.0016050")).await?;
    }
    let today = chrono::Utc::now().date_naive().to_string();
    let period = ["--from", today.as_str(), "--to", today.as_str()];

    let run = cli(&db, None, &[&["reconcile", "--format", "csv"][..], &period].concat()).await?;
    run.ok()?;
    let (header, rows) = read_csv(&run.stdout)?;
    assert_eq!(header, ["day", "model", "class", "unit", "outbox", "ledger", "api_calls", "provider", "variance"]);
    let charge = rows
        .iter()
        .find(|r| col(&header, r, "class") == "user_charge")
        .with_context(|| format!("no user_charge row:\n{}", run.stdout))?;
    assert_eq!(col(&header, charge, "day"), today);
    assert_eq!(col(&header, charge, "model"), "claude-sonnet-4-5", "the model in a column of its own");
    assert_eq!(col(&header, charge, "unit"), "usd");
    assert_eq!(col(&header, charge, "outbox"), "0.0072225", "3 × 1.5 × 0.001605, exact");
    assert_eq!(col(&header, charge, "variance"), "0.00");
    for r in &rows {
        for c in ["outbox", "ledger", "variance"] {
            assert!(is_money(col(&header, r, c)), "{c} of {r:?}");
        }
    }
    assert!(!run.stdout.contains("reconcile:"), "no summary line in CSV:\n{}", run.stdout);

    let run = cli(&db, None, &[&["reconcile", "--format", "json"][..], &period].concat()).await?;
    run.ok()?;
    let doc = run.json()?;
    assert_eq!(schema_errors(&reconcile_schema(), &doc)?, Vec::<String>::new(), "{doc:#}");
    assert_eq!(doc["clean"], true);
    assert_eq!(doc["variance"]["usd"], "0.00");
    assert_eq!(doc["negative_balances"], json!([]));
    let total = doc["totals"].as_array().and_then(|t| t.iter().find(|t| t["class"] == "provider_cost")).cloned();
    assert_eq!(total.map(|t| t["outbox_usd"].clone()), Some(json!("0.004815")), "{doc:#}");

    let run = cli(&db, None, &[&["reconcile"][..], &period].concat()).await?;
    run.ok()?;
    assert!(run.stdout.contains("total user_charge") && run.stdout.contains("$0.0072225"), "{}", run.stdout);
    assert!(run.stdout.contains("reconcile: clean"), "{}", run.stdout);

    // An event the workers meant to charge that never reached the ledger.
    let lost = usage(Uuid::now_v7(), 1, 7, "0.01");
    outbox(&db, lost.event_id(), &serde_json::to_value(&lost)?).await?;
    let run = cli(&db, None, &[&["reconcile", "--format", "json"][..], &period].concat()).await?;
    assert_eq!(run.code, Some(1), "a variance exits 1: {}", run.stderr);
    let doc = run.json()?;
    assert_eq!(schema_errors(&reconcile_schema(), &doc)?, Vec::<String>::new(), "{doc:#}");
    assert_eq!(doc["clean"], false);
    assert_eq!(doc["variance"]["missing_in_ledger"], 1);
    assert_eq!(doc["variance"]["usd"], "0.025", "0.01 provider cost + 0.015 user charge");
    let run = cli(&db, None, &[&["reconcile", "--format", "csv"][..], &period].concat()).await?;
    assert_eq!(run.code, Some(1));
    read_csv(&run.stdout)?;
    assert!(
        run.stderr.contains(&format!("missing in ledger: event {}", lost.event_id())),
        "the findings beside the CSV: {}",
        run.stderr
    );
    db.cleanup().await
}

#[tokio::test]
async fn grant_with_a_reused_key_is_idempotent_for_the_same_grant_and_refused_for_another() -> Result<()> {
    let db = TestDb::new().await?;
    let grant = |user: &'static str, usd: &'static str| {
        let db = &db;
        async move { cli(db, None, &["grant", "--user", user, "--usd", usd, "--idempotency-key", "stripe-evt-1"]).await }
    };
    let first = grant("5", "5.5").await?;
    first.ok()?;
    assert_eq!(first.stdout.trim(), "granted: $5.50 to user 5, balance $5.50");
    for same in ["5.5", "5.50", "5.500"] {
        let again = grant("5", same).await?;
        again.ok()?;
        assert!(again.stdout.starts_with("already granted"), "{}", again.stdout);
    }
    let other_amount = grant("5", "7").await?;
    assert_eq!(other_amount.code, Some(1), "{other_amount:?}");
    assert!(
        other_amount.stderr.contains("$5.50") && other_amount.stderr.contains("$7.00"),
        "both amounts: {}",
        other_amount.stderr
    );
    let other_user = grant("6", "5.5").await?;
    assert_eq!(other_user.code, Some(1), "{other_user:?}");
    assert!(other_user.stderr.contains("user 5") && other_user.stderr.contains("user 6"), "{}", other_user.stderr);
    assert_eq!(db.balance(5).await?, "5.5".parse::<Decimal>()?, "granted once");
    assert_eq!(db.balance(6).await?, Decimal::ZERO);
    let balance = cli(&db, None, &["balance", "--user", "5"]).await?;
    assert_eq!(balance.ok()?.stdout.trim(), "$5.50");
    db.cleanup().await
}

fn statement_schema() -> Value {
    let money = json!({ "type": "string", "pattern": MONEY });
    let maybe_string = json!({ "type": ["string", "null"] });
    json!({
        "type": "object",
        "required": ["user_id", "from", "to", "opening_usd", "closing_usd", "credits_usd", "debits_usd", "entries"],
        "properties": {
            "user_id": { "type": "integer" },
            "opening_usd": money, "closing_usd": money, "credits_usd": money, "debits_usd": money,
            "entries": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["entry_id", "at", "event_id", "kind", "job_id", "model", "tool", "request_id",
                                 "tokens", "estimated", "amount_usd", "balance_usd", "memo"],
                    "properties": {
                        "entry_id": { "type": "integer" }, "at": { "type": "string" },
                        "event_id": { "type": "string", "format": "uuid" },
                        "kind": { "enum": ["usage_charge", "tool_charge", "top_up", "grant", "refund"] },
                        "job_id": maybe_string, "model": maybe_string, "tool": maybe_string,
                        "request_id": maybe_string,
                        "tokens": {
                            "type": ["object", "null"],
                            "required": ["input", "output", "cache_write_5m", "cache_write_1h", "cache_read",
                                         "web_search_requests"],
                        },
                        "estimated": { "type": "boolean" }, "amount_usd": money, "balance_usd": money,
                        "memo": maybe_string,
                    },
                },
            },
        },
    })
}

#[tokio::test]
async fn statement_lists_every_entry_with_event_job_model_and_tokens_between_opening_and_closing_balances() -> Result<()>
{
    let db = TestDb::new().await?;
    const USER: i64 = 77;
    // Three days ago: a grant and a charge.
    billing_worker::ledger::grant(&db.pool, USER, "10".parse()?, Uuid::now_v7()).await?;
    let old_job = Uuid::now_v7();
    billing_worker::ledger::apply_event(&db.pool, &usage(old_job, 1, USER, "0.1")).await?;
    // Moved back in time as the owner (the ledger is append-only to its role).
    sqlx::query("ALTER TABLE ledger_entries DISABLE TRIGGER ledger_entries_no_update").execute(&db.pool).await?;
    sqlx::query("UPDATE ledger_entries SET created_at = now() - interval '3 days'").execute(&db.pool).await?;
    sqlx::query("ALTER TABLE ledger_entries ENABLE TRIGGER ledger_entries_no_update").execute(&db.pool).await?;
    // Today: two charges of one job, and another user's charge.
    let job = Uuid::now_v7();
    let today_events = [usage(job, 1, USER, "0.0016050"), usage(job, 2, USER, "0.002")];
    for e in &today_events {
        billing_worker::ledger::apply_event(&db.pool, e).await?;
    }
    billing_worker::ledger::grant(&db.pool, 78, "1".parse()?, Uuid::now_v7()).await?;
    billing_worker::ledger::apply_event(&db.pool, &usage(Uuid::now_v7(), 1, 78, "0.5")).await?;

    let today = chrono::Utc::now().date_naive().to_string();
    let user = USER.to_string();
    let args = ["statement", "--user", user.as_str(), "--from", today.as_str(), "--to", today.as_str()];
    let run = cli(&db, None, &[&args[..], &["--format", "json"]].concat()).await?;
    let doc = run.ok()?.json()?;
    assert_eq!(schema_errors(&statement_schema(), &doc)?, Vec::<String>::new(), "{doc:#}");
    assert_eq!(doc["opening_usd"], "9.85", "10 − 1.5 × 0.1 before the period: {doc:#}");
    assert_eq!(doc["closing_usd"], "9.8445925", "9.85 − 1.5 × (0.001605 + 0.002): {doc:#}");
    assert_eq!(doc["closing_usd"].as_str().map(str::parse::<Decimal>).transpose()?, Some(db.balance(USER).await?));
    assert_eq!(doc["debits_usd"], "0.0054075");
    let entries = doc["entries"].as_array().cloned().unwrap_or_default();
    assert_eq!(entries.len(), 2, "the period's entries of this user only (no provider-cost legs): {doc:#}");
    assert_eq!(entries[0]["event_id"], json!(today_events[0].event_id()));
    assert_eq!(entries[0]["job_id"], json!(job));
    assert_eq!(entries[0]["model"], "claude-sonnet-4-5");
    assert_eq!(entries[0]["tokens"]["input"], 10);
    assert_eq!(entries[0]["amount_usd"], "-0.0024075");
    assert_eq!(entries[1]["balance_usd"], doc["closing_usd"]);

    let run = cli(&db, None, &[&args[..], &["--format", "csv"]].concat()).await?;
    let (header, rows) = read_csv(&run.ok()?.stdout)?;
    assert_eq!(header.first().map(String::as_str), Some("entry_id"));
    for c in ["event_id", "job_id", "model", "input_tokens", "output_tokens", "amount_usd", "balance_usd"] {
        assert!(header.iter().any(|h| h == c), "no column {c}: {header:?}");
    }
    assert_eq!(rows.len(), 2);
    assert_eq!(col(&header, &rows[1], "event_id"), today_events[1].event_id().to_string());
    assert_eq!(col(&header, &rows[1], "output_tokens"), "10");
    assert_eq!(col(&header, &rows[1], "balance_usd"), "9.8445925");
    let opening: Decimal = col(&header, &rows[0], "balance_usd").parse::<Decimal>()?
        - col(&header, &rows[0], "amount_usd").parse::<Decimal>()?;
    assert_eq!(opening, "9.85".parse::<Decimal>()?, "the opening balance follows from the first row");

    // All time: from 0 to the balance, the grant first.
    let run = cli(&db, None, &["statement", "--user", &user, "--format", "json"]).await?;
    let doc = run.ok()?.json()?;
    assert_eq!(doc["opening_usd"], "0.00");
    assert_eq!(doc["entries"][0]["kind"], "grant");
    assert_eq!(doc["entries"][0]["amount_usd"], "10.00");
    assert_eq!(doc["entries"].as_array().map(Vec::len), Some(4));
    let table = cli(&db, None, &["statement", "--user", &user]).await?;
    let table = &table.ok()?.stdout;
    assert!(table.contains("opening balance $0.00") && table.contains("closing balance $9.8445925"), "{table}");

    let run = cli(&db, None, &["statement", "--user", &user, "--from", "2026-02-02", "--to", "2026-02-01"]).await?;
    assert_ne!(run.code, Some(0), "--from after --to: {run:?}");
    db.cleanup().await
}

#[tokio::test]
async fn a_dead_letter_is_listed_by_the_event_id_reconcile_reports_and_discarded_with_its_reason() -> Result<()> {
    let db = TestDb::new().await?;
    let broker = Broker::new().await?;
    broker.declare().await?;
    billing_worker::ledger::grant(&db.pool, 42, "10".parse()?, Uuid::now_v7()).await?;
    // A charge whose body no billing-worker can read (its amount is NaN),
    // in the outbox as a worker wrote it.
    let event = usage(Uuid::now_v7(), 1, 42, "0.001");
    let mut body = serde_json::to_value(&event)?;
    body["provider_cost"] = json!("NaN");
    outbox(&db, event.event_id(), &body).await?;
    let good = usage(Uuid::now_v7(), 1, 42, "0.002");
    charged(&db, &good).await?;
    let worker = BillingWorker::start(&broker, &db.url, &["--retry-delays-ms", "50,50,50,50,50"])?;
    let publisher = ConfirmPublisher::new(&broker.url, "test-finance-cli", Duration::from_secs(10));
    let bytes = serde_json::to_vec(&body)?;
    publisher
        .publish(Outgoing {
            exchange: &broker.topology.billing_exchange(),
            routing_key: BILLING_ROUTING_KEY,
            body: &bytes,
            message_id: None,
            content_type: "application/json",
            attempt: None,
        })
        .await?;
    publish(&broker, std::slice::from_ref(&good)).await?;
    let pool = db.pool.clone();
    wait_until("the unreadable charge to be dead-lettered", WAIT, || {
        let pool = pool.clone();
        async move {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM billing_failures WHERE dead_lettered_at IS NOT NULL")
                .fetch_one(&pool)
                .await?;
            Ok(n == 1)
        }
    })
    .await?;
    worker.stop().await?;
    let id = event.event_id().to_string();

    let today = chrono::Utc::now().date_naive().to_string();
    let run = cli(&db, None, &["reconcile", "--from", &today, "--to", &today, "--format", "json"]).await?;
    let missing = run.json()?["missing_in_ledger"].clone();
    assert_eq!(missing.as_array().map(Vec::len), Some(1), "{missing}");
    assert!(missing[0].as_str().is_some_and(|m| m.contains(&id)), "{missing}");

    let run = cli(&db, None, &["dead-letters", "list", "--format", "csv"]).await?;
    let (header, rows) = read_csv(&run.ok()?.stdout)?;
    assert_eq!(rows.len(), 1, "{}", run.stdout);
    assert_eq!(col(&header, &rows[0], "event_id"), id, "the id reconcile reports");
    assert_eq!(col(&header, &rows[0], "status"), "pending");
    assert_eq!(col(&header, &rows[0], "user_id"), "42");
    assert!(col(&header, &rows[0], "last_error").contains("malformed"), "{rows:?}");
    let run = cli(&db, None, &["dead-letters", "list", "--format", "json"]).await?;
    let doc = run.ok()?.json()?;
    assert_eq!(doc["pending"], 1);
    assert_eq!(doc["dead_letters"][0]["event_id"], id);
    assert_eq!(doc["dead_letters"][0]["user_id"], 42);

    // Refused: no reason, an unknown id, an event the ledger applied.
    let run = cli(&db, None, &["dead-letters", "discard", "--id", &id, "--reason", "  "]).await?;
    assert_ne!(run.code, Some(0), "{run:?}");
    let unknown = Uuid::now_v7().to_string();
    let run = cli(&db, None, &["dead-letters", "discard", "--id", &unknown, "--reason", "x"]).await?;
    assert_ne!(run.code, Some(0), "{run:?}");
    sqlx::query(
        "INSERT INTO billing_failures (event_id, attempts, last_error, dead_lettered_at) VALUES ($1, 6, 'x', now())",
    )
    .bind(good.event_id())
    .execute(&db.pool)
    .await?;
    let applied = good.event_id().to_string();
    let run = cli(&db, None, &["dead-letters", "discard", "--id", &applied, "--reason", "x"]).await?;
    assert_ne!(run.code, Some(0), "an applied event is refunded, not discarded: {run:?}");
    assert!(run.stderr.contains("applied"), "{}", run.stderr);
    sqlx::query("DELETE FROM billing_failures WHERE event_id = $1").bind(good.event_id()).execute(&db.pool).await?;

    let reason = "NaN provider cost from worker build 1.2; ticket FIN-7, user refunded by hand";
    let run = cli(&db, None, &["dead-letters", "discard", "--id", &id, "--reason", reason]).await?;
    assert!(run.ok()?.stdout.starts_with(&format!("discarded: {id}")), "{}", run.stdout);
    let (at, recorded): (Option<chrono::DateTime<chrono::Utc>>, Option<String>) =
        sqlx::query_as("SELECT discarded_at, discard_reason FROM billing_failures WHERE event_id = $1")
            .bind(event.event_id())
            .fetch_one(&db.pool)
            .await?;
    assert!(at.is_some());
    assert_eq!(recorded.as_deref(), Some(reason));
    let again = cli(&db, None, &["dead-letters", "discard", "--id", &id, "--reason", "other"]).await?;
    assert!(again.ok()?.stdout.starts_with("already discarded"), "{}", again.stdout);

    let run = cli(&db, None, &["dead-letters", "list", "--format", "csv"]).await?;
    let (_, rows) = read_csv(&run.ok()?.stdout)?;
    assert!(rows.is_empty(), "no longer pending: {}", run.stdout);
    let run = cli(&db, None, &["dead-letters", "list", "--all", "--format", "json"]).await?;
    let doc = run.ok()?.json()?;
    assert_eq!(doc["pending"], 0);
    assert_eq!(doc["dead_letters"][0]["status"], "discarded");
    assert_eq!(doc["dead_letters"][0]["discard_reason"], reason);
    // Reconcile accounts for it now: listed with its reason, not a variance.
    let run = cli(&db, None, &["reconcile", "--from", &today, "--to", &today, "--format", "json"]).await?;
    let doc = run.ok()?.json()?;
    assert_eq!(doc["clean"], true, "{doc:#}");
    assert_eq!(doc["missing_in_ledger"], json!([]));
    assert!(doc["discarded"][0].as_str().is_some_and(|d| d.contains(&id) && d.contains(reason)), "{doc:#}");
    let run = cli(&db, Some(&broker), &["dead-letters", "redrive", "--event", &id]).await?;
    assert_ne!(run.code, Some(0), "a discarded event is not redriven: {run:?}");
    assert!(run.stderr.contains("discarded"), "{}", run.stderr);
    broker.cleanup().await?;
    db.cleanup().await
}

#[tokio::test]
async fn reconcile_lists_a_user_balance_below_zero_in_every_format_and_exits_1() -> Result<()> {
    let db = TestDb::new().await?;
    billing_worker::ledger::grant(&db.pool, 7, "5".parse()?, Uuid::now_v7()).await?;
    billing_worker::ledger::grant(&db.pool, 8, "0.01".parse()?, Uuid::now_v7()).await?;
    let today = chrono::Utc::now().date_naive().to_string();
    let period = ["--from", today.as_str(), "--to", today.as_str()];
    charged(&db, &usage(Uuid::now_v7(), 1, 7, "0.01")).await?;
    charged(&db, &usage(Uuid::now_v7(), 1, 8, "0.004")).await?;
    let run = cli(&db, None, &[&["reconcile", "--format", "json"][..], &period].concat()).await?;
    run.ok()?;
    assert_eq!(run.json()?["negative_balances"], json!([]), "0.01 − 0.006 is not below zero");

    // A charge the balance did not cover (user 8 had 0.004 left).
    charged(&db, &usage(Uuid::now_v7(), 1, 8, "0.006")).await?;
    let run = cli(&db, None, &[&["reconcile", "--format", "json"][..], &period].concat()).await?;
    assert_eq!(run.code, Some(1), "a negative balance exits 1: {}", run.stderr);
    assert!(run.stderr.contains("1 user balance(s) below zero"), "{}", run.stderr);
    let doc = run.json()?;
    assert_eq!(schema_errors(&reconcile_schema(), &doc)?, Vec::<String>::new(), "{doc:#}");
    assert_eq!(doc["clean"], false);
    assert_eq!(doc["variance"]["usd"], "0.00", "outbox and ledger agree: the balance alone is wrong");
    assert_eq!(doc["variance"]["negative_balances"], 1);
    assert_eq!(
        doc["negative_balances"],
        json!([{ "user_id": 8, "account": "user:8", "balance_usd": "-0.005" }]),
        "0.01 − 1.5 × (0.004 + 0.006)"
    );

    let run = cli(&db, None, &[&["reconcile"][..], &period].concat()).await?;
    assert_eq!(run.code, Some(1));
    assert!(run.stdout.contains("negative balance: user:8 (user 8): balance -$0.005"), "{}", run.stdout);
    assert!(run.stdout.contains("reconcile: VARIANCE"), "{}", run.stdout);
    let run = cli(&db, None, &[&["reconcile", "--format", "csv"][..], &period].concat()).await?;
    assert_eq!(run.code, Some(1));
    read_csv(&run.stdout)?;
    assert!(run.stderr.contains("negative balance: user:8"), "the finding beside the CSV: {}", run.stderr);
    db.cleanup().await
}
