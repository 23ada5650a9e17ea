//! `chaos`: the fleet under faults (issue "Chaos, fuzzing and bad input").
//! See [`fleet_tests::chaos`] for what it does and checks. Prints a table;
//! `--json FILE` writes the report; exit status 1 on any violation.

use clap::Parser;
use fleet_tests::chaos::{print, run, ChaosConfig};
use fleet_tests::fleet::Services;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "chaos", about = "Runs the fleet under injected faults and checks every promise afterwards.")]
struct Args {
    /// Seed of every random choice (fault times and kinds, senders).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Updates to post.
    #[arg(long, default_value_t = 1000)]
    updates: usize,
    /// Faults to inject.
    #[arg(long, default_value_t = 20)]
    faults: usize,
    /// Distinct users (private chats).
    #[arg(long, default_value_t = 100)]
    users: usize,
    /// Seconds over which the updates are posted (default: one per 100 ms).
    #[arg(long)]
    load_s: Option<u64>,
    /// Longest wait for the fleet to settle after the load, seconds.
    #[arg(long, default_value_t = 180)]
    quiet_s: u64,
    /// Users (the first ones) granted a few cents instead of $100, so that
    /// their answers exhaust the grant mid-run and later updates get the
    /// needs-credit notice.
    #[arg(long, default_value_t = 0)]
    small_grants: usize,
    /// The largest small grant, USD: the k-th of n small-grant users gets
    /// `small-grant-usd × k / n` (the default spreads them from below the
    /// least the first call of an answer must hold, about $0.034, to a
    /// grant that pays for a few answers).
    #[arg(long, default_value = "0.05")]
    small_grant_usd: rust_decimal::Decimal,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Fixtures folder.
    #[arg(long, env = "DEMO_FIXTURES", default_value = "fixtures")]
    fixtures: PathBuf,
    /// PostgreSQL admin URL.
    #[arg(long, env = "DEMO_POSTGRES_URL", default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    postgres_url: String,
    /// RabbitMQ URL.
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    /// Folder of the fleet binaries (default: beside this program).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Folder for the processes' logs (kept when the run fails).
    #[arg(long, default_value = "target/chaos-logs")]
    log_dir: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    shared::telemetry::init(shared::telemetry::LogFormat::Pretty);
    let bin_dir = match args.bin_dir {
        Some(d) => d,
        None => std::env::current_exe()?.parent().map(PathBuf::from).unwrap_or_default(),
    };
    let cfg = ChaosConfig {
        bin_dir,
        fixtures: args.fixtures,
        services: Services { postgres_url: args.postgres_url, amqp_url: args.amqp_url },
        log_dir: args.log_dir,
        seed: args.seed,
        updates: args.updates,
        users: args.users,
        faults: args.faults,
        load_s: args.load_s.unwrap_or_else(|| (args.updates as u64 / 10).max(10)),
        quiet_s: args.quiet_s,
        small_grants: args.small_grants,
        small_grant_usd: args.small_grant_usd,
    };
    let report = run(&cfg).await?;
    print(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    if !report.violations.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
