//! Stream parsing: the worker's SSE framing (eventsource-stream, as the
//! Anthropic client uses it), event enum and [`MessageState`] over every
//! fixture stream, against a bare line splitter over the same bytes and
//! against the official Python SDK accumulating the same streams
//! (`scripts/bench_sdk.py`).

use crate::{Args, Row};
use futures_util::StreamExt;
use shared::anthropic::events::parse_event;
use shared::anthropic::MessageState;
use std::time::Instant;

/// Target of the parser against the line splitter (issue).
const SPLITTER_TARGET: f64 = 0.3;
/// Target of the parser against the Python SDK (issue).
const SDK_TARGET: f64 = 10.0;
/// Name of the SDK row.
const SDK_ROW: &str = "SSE parse vs Python SDK";

/// SSE bytes: every fixture stream (name order), repeated to `mb` megabytes.
fn sse_corpus(fixtures: &std::path::Path, mb: usize) -> anyhow::Result<Vec<u8>> {
    let mut files: Vec<_> =
        std::fs::read_dir(fixtures.join("anthropic"))?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "sse"));
    files.sort();
    let mut one = Vec::new();
    for path in &files {
        one.extend(std::fs::read(path)?);
        one.extend(b"\n");
    }
    anyhow::ensure!(!one.is_empty(), "no .sse fixtures in {}", fixtures.join("anthropic").display());
    let mut all = Vec::with_capacity(mb * 1_048_576 + one.len());
    while all.len() < mb * 1_048_576 {
        all.extend_from_slice(&one);
    }
    Ok(all)
}

/// The parser and the line splitter; also the parser's MB/s for the SDK row.
///
/// # Errors
/// Unreadable fixtures or a stream the parser rejects.
pub async fn bench_sse(args: &Args) -> anyhow::Result<(Vec<Row>, f64)> {
    let corpus = sse_corpus(&args.fixtures, args.sse_mb)?;
    let mb = corpus.len() as f64 / 1_048_576.0;
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> =
        corpus.chunks(16 * 1024).map(|c| Ok(bytes::Bytes::copy_from_slice(c))).collect();
    let start = Instant::now();
    let mut events = 0u64;
    let mut state = MessageState::default();
    let mut stream = eventsource_stream::Eventsource::eventsource(futures_util::stream::iter(chunks));
    while let Some(ev) = stream.next().await {
        let ev = ev.map_err(|e| anyhow::anyhow!("{e}"))?;
        if ev.data.is_empty() {
            continue;
        }
        let parsed = parse_event(&ev.data)?;
        // One fixture stream is one message: start afresh at each.
        if matches!(parsed, shared::anthropic::StreamEvent::MessageStart { .. }) {
            state = MessageState::default();
        }
        state.apply(parsed);
        events += 1;
    }
    let product = start.elapsed();
    let start = Instant::now();
    let mut data_lines = 0u64;
    for line in corpus.split(|b| *b == b'\n') {
        if line.starts_with(b"data: ") {
            data_lines += 1;
        }
    }
    let ceiling = start.elapsed();
    std::hint::black_box((data_lines, state.text().len()));
    let mb_s = mb / product.as_secs_f64();
    Ok((
        vec![
            Row::ratio(
                "SSE parse + state machine",
                mb_s,
                "MB/s",
                "bare line splitter",
                mb / ceiling.as_secs_f64(),
                SPLITTER_TARGET,
            )
            .with_note(format!("{mb:.0} MB")),
            Row::ratio(
                "SSE events",
                events as f64 / product.as_secs_f64(),
                "events/s",
                "bare line splitter (data lines/s)",
                data_lines as f64 / ceiling.as_secs_f64(),
                SPLITTER_TARGET,
            ),
        ],
        mb_s,
    ))
}

/// The SDK row: `parse_mb_s` (the Rust parser's figure) against the Python
/// SDK's MB/s over the same streams; skipped, with the reason, when the SDK
/// cannot be run.
pub async fn bench_sdk(args: &Args, parse_mb_s: f64) -> Row {
    let skipped = |why: &str| {
        Row::skipped(
            SDK_ROW,
            "MB/s",
            "Python anthropic SDK (MessageStream)",
            &format!("≥ {SDK_TARGET} × baseline"),
            why,
        )
    };
    let out = tokio::process::Command::new(&args.python)
        .arg(&args.sdk_script)
        .arg("--fixtures")
        .arg(&args.fixtures)
        .arg("--mb")
        .arg(args.sdk_mb.to_string())
        .output()
        .await;
    let out = match out {
        Ok(o) => o,
        Err(e) => return skipped(&format!("cannot run {}: {e}", args.python.display())),
    };
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output");
        return skipped(&format!("{} {} failed: {last}", args.python.display(), args.sdk_script.display()));
    }
    let parsed: Result<serde_json::Value, _> = serde_json::from_slice(&out.stdout);
    let Some(sdk) = parsed.ok().filter(|v| v.get("mb_per_s").and_then(serde_json::Value::as_f64).is_some()) else {
        return skipped(&format!("unexpected output: {}", String::from_utf8_lossy(&out.stdout).trim()));
    };
    let num = |k: &str| sdk.get(k).and_then(serde_json::Value::as_f64).unwrap_or(0.0);
    let text = |k: &str| sdk.get(k).and_then(serde_json::Value::as_str).unwrap_or("?").to_owned();
    Row::ratio(SDK_ROW, parse_mb_s, "MB/s", "Python anthropic SDK (MessageStream)", num("mb_per_s"), SDK_TARGET)
        .with_note(format!(
            "anthropic {} on Python {}: {:.1} MB in {} streams, {:.1} s",
            text("sdk_version"),
            text("python"),
            num("mb"),
            num("streams"),
            num("seconds")
        ))
}
