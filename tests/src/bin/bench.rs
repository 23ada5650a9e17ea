//! `bench`: figures of the fleet beside baselines measured in the same run
//! (issue "Benchmarks beside their baselines"). Prints one table; `--json
//! FILE` writes `{"rows": [{"name","value","unit","baseline_name","baseline",
//! "ratio","target","met"}]}` (a row that could not be measured, or that
//! says more than its numbers, also has a `note`).
//!
//! `scripts/bench` builds the fleet and the Python SDK baseline and runs this
//! with sizes that keep the whole run under 5 minutes on a 2-core machine;
//! `--smoke` runs every micro figure at tiny sizes and skips the fleet ones
//! (a few seconds, for CI).
//!
//! # Layout
//! - [`sse`]: the worker's SSE parser + state machine against a bare line
//!   splitter and against the official Python SDK (`scripts/bench_sdk.py`).
//! - [`billing`]: events applied by a real (in-process) billing-worker
//!   against plain inserts.
//! - [`ingress`]: webhook throughput against a raw confirming publisher.
//! - [`fleet`]: end to end through the process fleet (jobs/s with 1 and 2
//!   workers, added latency) and memory per in-flight stream.

#[path = "bench/billing.rs"]
mod billing;
#[path = "bench/fleet.rs"]
mod fleet;
#[path = "bench/ingress.rs"]
mod ingress;
#[path = "bench/sse.rs"]
mod sse;

use clap::Parser;
use serde::Serialize;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Command-line settings of the benchmark.
#[derive(Debug, Clone, Parser)]
#[command(name = "bench", about = "Benchmarks of the fleet beside same-run baselines.", args_override_self = true)]
pub struct Args {
    /// Fixtures folder.
    #[arg(long, default_value = "fixtures")]
    pub fixtures: PathBuf,
    /// Write the rows as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// PostgreSQL admin URL.
    #[arg(long, env = "DEMO_POSTGRES_URL", default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    pub postgres_url: String,
    /// RabbitMQ URL.
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_url: String,
    /// Tiny sizes, no fleet (end-to-end and memory rows are skipped): a few seconds, for CI.
    #[arg(long)]
    pub smoke: bool,
    /// Only these sections (comma-separated: sse, sdk, billing, ingress, e2e, memory).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Megabytes of SSE to parse (Rust parser and line splitter).
    #[arg(long, default_value_t = 50)]
    pub sse_mb: usize,
    /// Megabytes of SSE to accumulate with the Python SDK.
    #[arg(long, default_value_t = 4.0)]
    pub sdk_mb: f64,
    /// Python interpreter with the `anthropic` package (scripts/bench sets up a venv).
    #[arg(long, env = "BENCH_PYTHON", default_value = "python3")]
    pub python: PathBuf,
    /// The SDK baseline script.
    #[arg(long, default_value = "scripts/bench_sdk.py")]
    pub sdk_script: PathBuf,
    /// Billing events to apply.
    #[arg(long, default_value_t = 5000)]
    pub billing_events: usize,
    /// Seconds of webhook load (and of raw publishing).
    #[arg(long, default_value_t = 5)]
    pub ingress_seconds: u64,
    /// Concurrent webhook clients / publishers.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Jobs (one per private chat) of each end-to-end burst.
    #[arg(long, default_value_t = 400)]
    pub e2e_jobs: usize,
    /// PREFETCH (concurrent jobs) of each end-to-end worker; 0: the burst
    /// size, so that no delivery of the burst waits in a retry queue for a
    /// free job slot (the worker's default is 16).
    #[arg(long, default_value_t = 0)]
    pub e2e_prefetch: usize,
    /// Jobs posted one at a time (each after the previous answer) for the idle latency.
    #[arg(long, default_value_t = 30)]
    pub e2e_probes: usize,
    /// Concurrent slow streams of the memory figure.
    #[arg(long, default_value_t = 1000)]
    pub memory_streams: usize,
    /// Folder of the `ingress`, `worker` and `billing-worker` binaries (default: beside this program).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Folder for the fleet's process logs.
    #[arg(long, default_value = "target/bench-logs")]
    pub log_dir: PathBuf,
}

impl Args {
    /// Whether section `name` runs.
    fn runs(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == name)
    }

    /// `--smoke` sizes.
    fn smoke_sizes(mut self) -> Self {
        self.sse_mb = 2;
        self.sdk_mb = 0.1;
        self.billing_events = 300;
        self.ingress_seconds = 1;
        self.concurrency = self.concurrency.min(8);
        self
    }
}

/// One line of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// What is measured.
    pub name: String,
    /// The figure.
    pub value: f64,
    /// Its unit.
    pub unit: String,
    /// What it is compared with.
    pub baseline_name: String,
    /// The baseline's figure, same run.
    pub baseline: f64,
    /// `value / baseline` (0 where a ratio means nothing).
    pub ratio: f64,
    /// The target, in words.
    pub target: String,
    /// Whether the target was met.
    pub met: bool,
    /// Why a row was skipped, or what else was seen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Row {
    /// A figure against a baseline with a target of at least `target` × baseline.
    pub fn ratio(name: &str, value: f64, unit: &str, baseline_name: &str, baseline: f64, target: f64) -> Self {
        let ratio = if baseline > 0.0 { value / baseline } else { 0.0 };
        Self {
            name: name.into(),
            value,
            unit: unit.into(),
            baseline_name: baseline_name.into(),
            baseline,
            ratio,
            target: format!("≥ {target} × baseline"),
            met: ratio >= target,
            note: None,
        }
    }

    /// Latency percentiles of `samples`: p50 as the value and p99 as the
    /// baseline; the target is p99 below `p99_target_ms` (none: report only).
    pub fn latency(name: &str, samples: &mut [Duration], p99_target_ms: Option<f64>) -> Self {
        let (p50, p99) = (percentile_ms(samples, 0.5), percentile_ms(samples, 0.99));
        let (target, met) = match p99_target_ms {
            Some(t) => (format!("p99 < {t} ms"), p99 < t),
            None => ("— (report only)".to_owned(), true),
        };
        Self {
            name: name.into(),
            value: p50,
            unit: "ms (p50)".into(),
            baseline_name: "p99".into(),
            baseline: p99,
            ratio: 0.0,
            target,
            met,
            note: Some(format!("{} samples", samples.len())),
        }
    }

    /// A row that could not be measured, and why.
    pub fn skipped(name: &str, unit: &str, baseline_name: &str, target: &str, why: &str) -> Self {
        Self {
            name: name.into(),
            value: 0.0,
            unit: unit.into(),
            baseline_name: baseline_name.into(),
            baseline: 0.0,
            ratio: 0.0,
            target: target.into(),
            met: false,
            note: Some(format!("SKIPPED: {why}")),
        }
    }

    /// This row with `note` (appended to any note it has).
    pub fn with_note(mut self, note: impl Into<String>) -> Self {
        let note = note.into();
        self.note = Some(match self.note.take() {
            Some(old) => format!("{old}; {note}"),
            None => note,
        });
        self
    }

    fn is_skipped(&self) -> bool {
        self.note.as_deref().is_some_and(|n| n.starts_with("SKIPPED"))
    }
}

/// The `q` quantile (nearest rank) of `samples` in milliseconds; sorts them.
pub fn percentile_ms(samples: &mut [Duration], q: f64) -> f64 {
    samples.sort();
    if samples.is_empty() {
        return 0.0;
    }
    let rank = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len());
    samples.get(rank - 1).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// A progress line on stderr, so that a long run shows where it is.
pub fn progress(what: &str) {
    eprintln!("bench: {what}");
}

fn fmt_num(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The table as lines (header first), then the notes.
fn render(rows: &[Row]) -> Vec<String> {
    let cells: Vec<[String; 8]> = rows
        .iter()
        .map(|r| {
            let met = if r.is_skipped() {
                "skipped"
            } else if r.target.starts_with('—') {
                "—"
            } else if r.met {
                "yes"
            } else {
                "NO"
            };
            [
                r.name.clone(),
                fmt_num(r.value),
                r.unit.clone(),
                r.baseline_name.clone(),
                fmt_num(r.baseline),
                if r.ratio == 0.0 { "—".into() } else { format!("{:.3}", r.ratio) },
                r.target.clone(),
                met.into(),
            ]
        })
        .collect();
    let header = ["figure", "value", "unit", "baseline", "baseline value", "ratio", "target", "met"];
    let mut widths = header.map(|h| h.chars().count());
    for c in &cells {
        for (w, s) in widths.iter_mut().zip(c) {
            *w = (*w).max(s.chars().count());
        }
    }
    let line = |c: &[String]| {
        let mut out = String::new();
        for (i, (s, w)) in c.iter().zip(widths).enumerate() {
            let pad = " ".repeat(w.saturating_sub(s.chars().count()));
            // Numbers right-aligned, words left-aligned.
            if matches!(i, 1 | 4 | 5) {
                out.push_str(&pad);
                out.push_str(s);
            } else {
                out.push_str(s);
                out.push_str(&pad);
            }
            out.push_str("  ");
        }
        out.trim_end().to_owned()
    };
    let mut out = vec![line(&header.map(String::from))];
    out.push("-".repeat(widths.iter().sum::<usize>() + 2 * (widths.len() - 1)));
    out.extend(cells.iter().map(|c| line(c)));
    let notes: Vec<String> = rows
        .iter()
        .filter_map(|r| r.note.as_ref().map(|n| format!("  {} [{}]: {n}", r.name, r.baseline_name)))
        .collect();
    if !notes.is_empty() {
        out.push("notes:".into());
        out.extend(notes);
    }
    out
}

#[expect(clippy::print_stdout, reason = "the benchmark's table")]
fn print_rows(rows: &[Row], took: Duration) {
    for l in render(rows) {
        println!("{l}");
    }
    println!("bench took {:.1} s", took.as_secs_f64());
}

/// The failure of a whole section, as a skipped row (the other sections still run).
fn failed_section(section: &str, e: &anyhow::Error) -> Row {
    Row::skipped(section, "—", "—", "—", &format!("the section failed: {e:#}"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    let mut args = Args::parse();
    if args.smoke {
        args = args.smoke_sizes();
    }
    let mut rows = Vec::new();
    let mut parse_mb_s = None;
    if args.runs("sse") || args.runs("sdk") {
        progress("SSE parsing");
        let (sse_rows, mb_s) = sse::bench_sse(&args).await?;
        if args.runs("sse") {
            rows.extend(sse_rows);
        }
        parse_mb_s = Some(mb_s);
    }
    if let (true, Some(mb_s)) = (args.runs("sdk"), parse_mb_s) {
        progress("Python SDK baseline");
        rows.push(sse::bench_sdk(&args, mb_s).await);
    }
    if args.runs("billing") {
        progress("billing");
        match billing::bench_billing(&args).await {
            Ok(r) => rows.extend(r),
            Err(e) => rows.push(failed_section("billing", &e)),
        }
    }
    if args.runs("ingress") {
        progress("ingress");
        match ingress::bench_ingress(&args).await {
            Ok(r) => rows.extend(r),
            Err(e) => rows.push(failed_section("ingress", &e)),
        }
    }
    if args.runs("e2e") {
        if args.smoke {
            rows.push(fleet::e2e_skipped("--smoke runs no fleet"));
        } else {
            progress("end to end");
            match fleet::bench_e2e(&args).await {
                Ok(r) => rows.extend(r),
                Err(e) => rows.push(failed_section("end to end", &e)),
            }
        }
    }
    if args.runs("memory") {
        if args.smoke {
            rows.push(fleet::memory_skipped("--smoke runs no fleet"));
        } else {
            progress("memory per stream");
            match fleet::bench_memory(&args).await {
                Ok(r) => rows.push(r),
                Err(e) => rows.push(failed_section("memory per stream", &e)),
            }
        }
    }
    print_rows(&rows, started.elapsed());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&serde_json::json!({ "rows": rows }))?)?;
    }
    Ok(())
}
