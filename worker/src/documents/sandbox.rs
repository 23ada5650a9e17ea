//! The parent side of the PDF sandbox: runs `worker extract-document`
//! ([`super::extract`]) as a child process with the PDF on its standard
//! input, under a wall-clock limit, and reads one capped report line back.
//! Whatever the child does (stack overflow, endless loop, out of memory,
//! garbage on stdout) ends as a [`Refusal`] here: the worker never parses a
//! PDF itself. The child gets an empty environment (no secrets) and is
//! killed, then reaped, on every path (`kill_on_drop` covers a cancelled
//! caller).

use super::extract::{ChildReport, ExtractLimits};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How to run the extractor.
#[derive(Debug, Clone)]
pub struct Sandbox {
    /// The program that understands `extract-document` (the worker binary itself).
    pub program: PathBuf,
    /// Limits passed to the child.
    pub limits: ExtractLimits,
    /// Wall-clock limit of one extraction; the child is killed when over.
    pub wall_clock: Duration,
}

/// Why a PDF was not read; the text completes "I could not read this PDF: …".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

impl Sandbox {
    /// The sandbox of this worker binary.
    ///
    /// # Errors
    /// When the path of the running program cannot be found.
    pub fn of_current_exe(limits: ExtractLimits, wall_clock: Duration) -> std::io::Result<Self> {
        Ok(Self { program: std::env::current_exe()?, limits, wall_clock })
    }

    /// Extracts the text layer of `pdf` in a child process.
    ///
    /// # Errors
    /// [`Refusal`] for everything that is not text: the child's own refusal,
    /// a crash (a signal), the wall-clock limit, a report that does not parse.
    pub async fn extract(&self, pdf: Vec<u8>) -> Result<(String, u64), Refusal> {
        let mut child = tokio::process::Command::new(&self.program)
            .arg("extract-document")
            .args(self.limits.to_args())
            .env_clear()
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                tracing::error!(error.message = %e, program = %self.program.display(), "cannot start the PDF extractor");
                Refusal("the PDF reader could not be started".into())
            })?;
        let pid = child.id();
        let (Some(mut stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let _ = child.start_kill();
            return Err(Refusal("the PDF reader could not be started".into()));
        };
        // A report holds at most `max_chars` characters (≤ 4 bytes each) escaped
        // as JSON (≤ 6 bytes per character for `\uXXXX`), plus its frame.
        let cap = self.limits.max_chars.saturating_mul(6).saturating_add(4096);
        let work = async {
            let write = async move {
                // The child may exit early (a refusal) and close its stdin.
                let _ = stdin.write_all(&pdf).await;
                drop(stdin);
            };
            let read_out = async move {
                let mut out = Vec::new();
                let _ = stdout.take(cap).read_to_end(&mut out).await;
                out
            };
            let read_err = async move {
                let mut err = Vec::new();
                let _ = stderr.take(4096).read_to_end(&mut err).await;
                err
            };
            let ((), out, err) = tokio::join!(write, read_out, read_err);
            let status = child.wait().await;
            (status, out, err)
        };
        let finished = tokio::time::timeout(self.wall_clock, work).await;
        let Ok((status, out, err)) = finished else {
            // SIGKILL and reap: no thread of it keeps spinning.
            let _ = child.kill().await;
            tracing::warn!(pid, limit_s = self.wall_clock.as_secs(), "PDF extraction killed at its wall-clock limit");
            metrics::counter!("fleet_document_extractions_total", "result" => "timeout").increment(1);
            return Err(Refusal("reading it took too long".into()));
        };
        let status = status.map_err(|e| Refusal(format!("the PDF reader failed ({e})")))?;
        if !status.success() {
            use std::os::unix::process::ExitStatusExt as _;
            let stderr = String::from_utf8_lossy(&err);
            tracing::warn!(pid, code = ?status.code(), signal = ?status.signal(), stderr = %stderr.trim(), "the PDF extractor died");
            metrics::counter!("fleet_document_extractions_total", "result" => "crashed").increment(1);
            let why = match status.signal() {
                // SIGXCPU / SIGKILL after RLIMIT_CPU.
                Some(24 | 9) => "reading it took too long",
                _ => "it made the PDF reader fail (it may be damaged or built to attack readers)",
            };
            return Err(Refusal(why.into()));
        }
        let line = out.split(|b| *b == b'\n').next().unwrap_or_default();
        match serde_json::from_slice::<ChildReport>(line) {
            Ok(ChildReport::Text { text, pages }) => {
                metrics::counter!("fleet_document_extractions_total", "result" => "text").increment(1);
                Ok((text, pages))
            }
            Ok(ChildReport::Refused { reason }) => {
                metrics::counter!("fleet_document_extractions_total", "result" => "refused").increment(1);
                Err(Refusal(reason))
            }
            Err(e) => {
                tracing::warn!(error.message = %e, bytes = out.len(), "the PDF extractor's report does not parse");
                metrics::counter!("fleet_document_extractions_total", "result" => "crashed").increment(1);
                Err(Refusal("the PDF reader gave no usable result".into()))
            }
        }
    }
}
