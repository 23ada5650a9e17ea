//! Reconciliation: clean after a normal run; finds an event deleted from
//! the ledger (and the balance it leaves wrong) and a ledger event with no
//! outbox row; compares every call's tokens with the provider's usage
//! report (served by the fake from the calls it streamed), passes when they
//! match, names the day, model and class of usage we never recorded, and
//! fails when the report cannot be fetched.

use billing_worker::finance::{reconcile, reconcile_with_provider, render, ProviderComparison, Reconciliation};
use billing_worker::finance_output::Format;
use billing_worker::provider::UsageReportClient;
use fleet_tests::fake_anthropic::ScriptedResponse;
use fleet_tests::harness::billing::{grant, reconcile_cli, usage, wait_settled, ADMIN_KEY};
use fleet_tests::harness::{fixture, fixture_bytes, spawn_app, TestApp, TestDb, WAIT};
use shared::pricing::TokenCounts;
use shared::secret::Secret;
use uuid::Uuid;

/// The model id the fixtures' `message_start` reports.
const MODEL: &str = "claude-sonnet-4-5-20250929";

#[tokio::test]
async fn reconcile_passes_a_clean_run_and_finds_an_event_deleted_from_the_ledger() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    grant(&db.pool, 7, "5").await?;
    let job = Uuid::now_v7();
    let events: Vec<_> = (1..=3).map(|seq| usage(job, seq, 7, "0.01")).collect();
    for e in &events {
        sqlx::query("INSERT INTO billing_outbox (event_id, job_id, payload, published_at) VALUES ($1, $2, $3, now())")
            .bind(e.event_id())
            .bind(job)
            .bind(serde_json::to_value(e)?)
            .execute(&db.pool)
            .await?;
        billing_worker::ledger::apply_event(&db.pool, e).await?;
    }
    let today = chrono::Utc::now().date_naive();
    let clean = reconcile(&db.pool, &db.pool, today, today).await?;
    assert!(clean.clean(), "{}", render(&clean, Format::Table)?);

    // Tampering: the append-only trigger is bypassed to delete one event.
    let victim = events[1].event_id();
    sqlx::query("ALTER TABLE ledger_entries DISABLE TRIGGER ledger_entries_no_update").execute(&db.pool).await?;
    sqlx::query("DELETE FROM ledger_entries WHERE event_id = $1").bind(victim).execute(&db.pool).await?;
    sqlx::query("DELETE FROM applied_events WHERE event_id = $1").bind(victim).execute(&db.pool).await?;
    // And an event applied that no worker wrote.
    let stray = usage(Uuid::now_v7(), 1, 7, "0.02");
    billing_worker::ledger::apply_event(&db.pool, &stray).await?;
    let found = reconcile(&db.pool, &db.pool, today, today).await?;
    let report = render(&found, Format::Table)?;
    assert!(!found.clean());
    assert_eq!(found.missing_in_ledger.len(), 1, "{report}");
    assert!(found.missing_in_ledger[0].contains(&victim.to_string()));
    assert!(found.missing_in_ledger[0].contains(&job.to_string()), "drill-down names the job");
    assert_eq!(found.missing_in_outbox.len(), 1, "{report}");
    assert!(
        found.invariant_failures.iter().any(|f| f.contains("user:7")),
        "the balance no longer matches its entries: {report}"
    );
    assert!(found.totals.values().any(|(outbox, ledger)| outbox != ledger), "a variance in the totals");
    db.cleanup().await
}

/// Runs ada_capital (text_capital.sse) and, with `overloaded`, ben_overloaded
/// (overloaded_midstream.sse, then the retry's moons_ok.sse) through the
/// whole fleet, one after the other, then stops the processes (the fakes
/// keep running).
async fn run_calls(overloaded: bool) -> anyhow::Result<TestApp> {
    let mut app = spawn_app().await?;
    for user in [100_000_001, 100_000_002] {
        grant(&app.db.pool, user, "5").await?;
    }
    app.anthropic.push([ScriptedResponse::from_file(fixture("anthropic/text_capital.sse"))?]);
    assert_eq!(app.post_update(&fixture_bytes("telegram/ada_capital.json")?).await?, reqwest::StatusCode::OK);
    wait_settled(&app.db.pool, 1).await?;
    if overloaded {
        app.anthropic.push([
            ScriptedResponse::from_file(fixture("anthropic/overloaded_midstream.sse"))?,
            ScriptedResponse::from_file(fixture("anthropic/moons_ok.sse"))?,
        ]);
        assert_eq!(app.post_update(&fixture_bytes("telegram/ben_overloaded.json")?).await?, reqwest::StatusCode::OK);
        wait_settled(&app.db.pool, 2).await?;
    }
    app.stop().await?;
    Ok(app)
}

async fn with_provider(
    app: &TestApp,
    from: chrono::NaiveDate,
    to: chrono::NaiveDate,
) -> anyhow::Result<Reconciliation> {
    let client = UsageReportClient::new(&app.anthropic.base_url(), Secret::new(ADMIN_KEY), WAIT)?;
    reconcile_with_provider(&app.db.pool, &app.db.pool, from, to, Some(&client)).await
}

#[tokio::test]
async fn reconcile_compares_every_call_with_the_provider_report_and_passes_when_the_tokens_match() -> anyhow::Result<()>
{
    let app = run_calls(true).await?;
    assert_eq!(app.anthropic.call_count(), 3, "text_capital, overloaded_midstream, moons_ok");
    let today = chrono::Utc::now().date_naive();
    // Eight days of hourly buckets: 192, two pages of the report.
    let from = today - chrono::Days::new(7);
    let r = with_provider(&app, from, today).await?;
    let table = render(&r, Format::Table)?;
    assert!(r.clean(), "{table}");
    let ProviderComparison::Compared { tokens } = &r.provider else { anyhow::bail!("not compared: {table}") };
    let row = |class: &str| tokens.get(&format!("{today} {MODEL} {class}")).copied().unwrap_or_default();
    // The failed stream was served up to its error (300 input, 1 output):
    // in api_calls and in the provider's report, not in the outbox.
    let input = row("input");
    assert_eq!(
        (input.outbox, input.api_calls, input.provider),
        (412 + 300, 412 + 300 + 300, 412 + 300 + 300),
        "{table}"
    );
    let output = row("output");
    assert_eq!((output.outbox, output.api_calls, output.provider), (12 + 11, 12 + 1 + 11, 12 + 1 + 11), "{table}");
    assert!(tokens.values().all(|t| t.variance() == 0), "{table}");
    assert!(table.contains("provider report (Usage and Cost API)"), "{table}");
    assert!(!table.contains("provider variance:"), "{table}");
    assert!(table.contains("reconcile: clean"), "{table}");
    let csv = render(&r, Format::Csv)?;
    let mut reader = csv::Reader::from_reader(csv.as_bytes());
    assert_eq!(
        reader.headers()?.iter().collect::<Vec<_>>(),
        ["day", "model", "class", "unit", "outbox", "ledger", "api_calls", "provider", "variance"],
        "{csv}"
    );
    let records: Vec<csv::StringRecord> = reader.records().collect::<Result<_, _>>()?;
    let input: Vec<&str> = records
        .iter()
        .find(|r| r.get(1) == Some(MODEL) && r.get(2) == Some("input") && r.get(3) == Some("tokens"))
        .map(|r| r.iter().collect())
        .unwrap_or_default();
    assert_eq!(input, [today.to_string().as_str(), MODEL, "input", "tokens", "712", "", "1012", "1012", "0"], "{csv}");
    let json: serde_json::Value = serde_json::from_str(&render(&r, Format::Json)?)?;
    assert_eq!(json["provider"]["status"], "compared");
    assert_eq!(json["provider"]["tokens"][format!("{today} {MODEL} output")]["provider"], 24);
    assert_eq!(json["provider"]["tokens"][format!("{today} {MODEL} output")]["variance"], 0);

    // The command itself passes in every format.
    let base = app.anthropic.base_url();
    for format in ["table", "csv", "json"] {
        let flags = ["--anthropic-base-url", &base, "--format", format];
        reconcile_cli(&app.db.url, from, today, Some(ADMIN_KEY), &flags).await?;
    }
    // Without a key: skipped, and as before.
    reconcile_cli(&app.db.url, from, today, None, &[]).await?;
    let skipped = reconcile(&app.db.pool, &app.db.pool, from, today).await?;
    assert!(skipped.clean());
    let table = render(&skipped, Format::Table)?;
    assert!(table.contains("provider report: skipped (ANTHROPIC_ADMIN_API_KEY not set)"), "{table}");
    app.cleanup().await
}

#[tokio::test]
async fn reconcile_fails_naming_the_day_model_and_class_of_usage_the_provider_reports_but_we_never_recorded(
) -> anyhow::Result<()> {
    let app = run_calls(false).await?;
    let today = chrono::Utc::now().date_naive();
    let before = with_provider(&app, today, today).await?;
    assert!(before.clean(), "{}", render(&before, Format::Table)?);

    app.anthropic.add_report_usage(MODEL, chrono::Utc::now(), TokenCounts { cache_read: 500, ..Default::default() });
    let r = with_provider(&app, today, today).await?;
    let table = render(&r, Format::Table)?;
    assert!(!r.clean(), "{table}");
    let key = format!("{today} {MODEL} cache_read");
    assert_eq!(r.provider_variances(), [format!("{key}: provider 500, api_calls 0, variance +500")], "{table}");
    assert!(r.missing_in_ledger.is_empty() && r.missing_in_outbox.is_empty() && r.invariant_failures.is_empty());
    assert!(table.contains(&format!("provider variance: {key}")), "{table}");
    assert!(table.contains("reconcile: VARIANCE"), "{table}");
    let csv = render(&r, Format::Csv)?;
    let day = today.to_string();
    let row = [day.as_str(), MODEL, "cache_read", "tokens", "0", "", "0", "500", "500"];
    let found_row = csv::Reader::from_reader(csv.as_bytes())
        .records()
        .filter_map(Result::ok)
        .any(|r| r.iter().eq(row.iter().copied()));
    assert!(found_row, "{csv}");
    let json: serde_json::Value = serde_json::from_str(&render(&r, Format::Json)?)?;
    assert_eq!(json["provider"]["tokens"][&key]["variance"], 500);

    let base = app.anthropic.base_url();
    let flags = ["--anthropic-base-url", &base];
    let exit = reconcile_cli(&app.db.url, today, today, Some(ADMIN_KEY), &flags).await;
    let error = exit.err().map(|e| format!("{e:#}")).unwrap_or_default();
    assert!(
        error.contains(&key) && error.contains("+500"),
        "a non-zero exit naming the day, model and class: {error:?}"
    );
    app.cleanup().await
}

#[tokio::test]
async fn reconcile_fails_when_the_provider_report_cannot_be_fetched() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let today = chrono::Utc::now().date_naive();
    // Nothing listens there.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", closed.local_addr()?);
    drop(closed);
    let exit = reconcile_cli(&db.url, today, today, Some(ADMIN_KEY), &["--anthropic-base-url", &url]).await;
    let error = exit.err().map(|e| format!("{e:#}")).unwrap_or_default();
    assert!(error.contains("usage report"), "{error:?}");
    assert!(!error.contains(ADMIN_KEY), "{error:?}");
    // An HTTP error (a wrong base path: 404) is an error too.
    let fake = fleet_tests::fake_anthropic::FakeAnthropic::start("127.0.0.1:0".parse()?).await?;
    let wrong = format!("{}/nope", fake.base_url());
    let exit = reconcile_cli(&db.url, today, today, Some(ADMIN_KEY), &["--anthropic-base-url", &wrong]).await;
    let error = exit.err().map(|e| format!("{e:#}")).unwrap_or_default();
    assert!(error.contains("HTTP 404"), "{error:?}");
    fake.shutdown().await;
    db.cleanup().await
}
