//! `demo`: the main job. Plays the fixture scenarios through the whole
//! fleet on localhost (separate processes, real webhook, RabbitMQ and
//! PostgreSQL) against the fakes, and prints the transcript, the ledger and
//! PASS/FAIL for every expectation. Exit status 1 on any FAIL.

use clap::Parser;
use fleet_tests::demo::{run_scenario, DemoConfig, ScenarioReport};
use fleet_tests::fleet::Services;
use fleet_tests::scenario::load_all;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "demo", about = "Plays the fixture scenarios through the real fleet and checks them.")]
struct Args {
    /// Fixtures folder (with scenarios/, telegram/, anthropic/, prices.toml).
    #[arg(long, env = "DEMO_FIXTURES", default_value = "fixtures")]
    fixtures: PathBuf,
    /// Only scenarios of this area (fleet, tools, lifecycle, telegram).
    #[arg(long)]
    area: Option<String>,
    /// Only these scenarios (comma-separated names).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Write a JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// PostgreSQL admin URL (databases are created per scenario and dropped).
    #[arg(long, env = "DEMO_POSTGRES_URL", default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    postgres_url: String,
    /// RabbitMQ URL.
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    /// Worker processes per scenario.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Folder of the fleet binaries (default: beside this program).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Folder for the processes' logs.
    #[arg(long, default_value = "target/demo-logs")]
    log_dir: PathBuf,
}

#[expect(clippy::print_stdout, reason = "the demo's output is its transcript and verdicts")]
fn print_report(r: &ScenarioReport) {
    println!("\n━━ {} ({}) ━━", r.name, r.area);
    for line in &r.transcript {
        println!("{line}");
    }
    if !r.ledger.is_empty() {
        println!("  ledger:");
        for l in &r.ledger {
            let est = if l.estimated { " (estimated)" } else { "" };
            println!("    {:<13} {:>12} USD  {} → {}{est}", l.kind, l.amount, l.debit, l.credit);
        }
    }
    for c in &r.checks {
        let verdict = if c.passed { "PASS" } else { "FAIL" };
        let step = if c.step == 0 { "scenario".to_owned() } else { format!("step {}", c.step) };
        println!("  {verdict} {step} {}: {}", c.check, c.detail);
    }
    println!("  => {}", if r.passed { "PASS" } else { "FAIL" });
}

#[expect(clippy::print_stdout, reason = "the summary line")]
fn print_summary(line: &str) {
    println!("\n{line}");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if std::env::var_os("DEMO_LOG").is_some() {
        shared::telemetry::init(shared::telemetry::LogFormat::Pretty);
    }
    let bin_dir = match args.bin_dir.clone() {
        Some(d) => d,
        None => std::env::current_exe()?.parent().map(PathBuf::from).unwrap_or_default(),
    };
    let cfg = DemoConfig {
        fixtures: args.fixtures.clone(),
        bin_dir,
        log_dir: args.log_dir.clone(),
        services: Services { postgres_url: args.postgres_url.clone(), amqp_url: args.amqp_url.clone() },
        workers: args.workers.max(1),
    };
    let mut reports = Vec::new();
    for loaded in load_all(&args.fixtures)? {
        let scenario = match loaded.scenario {
            Ok(s) => s,
            Err(e) => {
                let name = loaded.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                let r = ScenarioReport {
                    name,
                    area: String::new(),
                    passed: false,
                    checks: vec![fleet_tests::demo::Check { step: 0, check: "parse".into(), passed: false, detail: e }],
                    transcript: Vec::new(),
                    ledger: Vec::new(),
                };
                if args.area.is_none() && args.only.is_empty() {
                    print_report(&r);
                    reports.push(r);
                }
                continue;
            }
        };
        if args.area.as_ref().is_some_and(|a| *a != scenario.area)
            || (!args.only.is_empty() && !args.only.contains(&scenario.name))
        {
            continue;
        }
        let r = run_scenario(&cfg, &scenario).await;
        print_report(&r);
        reports.push(r);
    }
    let passed = reports.iter().filter(|r| r.passed).count();
    let checks: usize = reports.iter().map(|r| r.checks.len()).sum();
    let failed: usize = reports.iter().map(|r| r.checks.iter().filter(|c| !c.passed).count()).sum();
    print_summary(&format!(
        "demo: {passed}/{} scenarios passed; {} checks, {} failed — {}",
        reports.len(),
        checks,
        failed,
        if passed == reports.len() && !reports.is_empty() { "PASS" } else { "FAIL" }
    ));
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_vec_pretty(&serde_json::json!({ "scenarios": reports }))?)?;
    }
    if passed != reports.len() || reports.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
