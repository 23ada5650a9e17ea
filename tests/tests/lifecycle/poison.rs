//! A poison document (issue 13): the worker reading it dies (SIGKILL while
//! its extractor runs). The job is redelivered to the other worker, which
//! finds the marker written before the reading began and refuses the
//! document with a notice instead of reading it again: one poison update
//! takes a worker down at most once, and the user is told.

use anyhow::{ensure, Context as _, Result};
use fleet_tests::harness::lifecycle::{Lifecycle, Signal, CHI, WAIT};
use serde_json::json;
use std::os::unix::fs::PermissionsExt as _;

/// An extractor that records each start in `log` and then hangs, standing
/// in for a PDF that hangs or kills its reader.
fn hanging_extractor(dir: &std::path::Path) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let log = dir.join("starts.log");
    let script = dir.join("hanging-extractor.sh");
    std::fs::write(&script, format!("#!/bin/sh\necho started >> '{}'\nexec /bin/sleep 60\n", log.display()))?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    Ok((script, log))
}

fn starts(log: &std::path::Path) -> usize {
    std::fs::read_to_string(log).map(|s| s.lines().count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_whose_reading_killed_a_worker_is_refused_on_redelivery_not_read_again() -> Result<()> {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("poison-{}", uuid::Uuid::now_v7()));
    let (script, log) = hanging_extractor(&dir)?;
    let script_path = script.to_str().context("temp path is not UTF-8")?.to_owned();
    let env = [("DOCUMENT_EXTRACTOR", script_path.as_str()), ("DOCUMENT_EXTRACT_TIMEOUT_S", "60")];
    let mut t = Lifecycle::start("poison", 2, &env).await?;
    let result = poison(&mut t, &log).await;
    // The orphaned `sleep` of the killed worker's extractor.
    let _ = std::process::Command::new("pkill").arg("-f").arg(&script_path).status();
    let _ = std::fs::remove_dir_all(&dir);
    t.finish(result).await
}

async fn poison(t: &mut Lifecycle, log: &std::path::Path) -> Result<()> {
    t.grant(CHI, "5.00").await?;
    t.telegram.add_file("BQADpoison", b"%PDF-1.4 whatever".to_vec());
    let update_id = 930_000_001;
    let update = json!({
        "update_id": update_id,
        "message": {
            "message_id": 1,
            "from": { "id": CHI, "is_bot": false, "first_name": "Chi" },
            "chat": { "id": CHI, "first_name": "Chi", "type": "private" },
            "date": 1_764_460_800,
            "document": { "file_id": "BQADpoison", "file_unique_id": "u-poison", "file_name": "poison.pdf",
                          "mime_type": "application/pdf" }
        }
    });
    t.post(&update).await?;
    fleet_tests::harness::wait_until("the extractor to start", WAIT, || async { Ok(starts(log) == 1) }).await?;
    let victim = t.lease_holder(update_id).await?;
    t.fleet.signal(&victim, Signal::Kill).await?;
    t.fleet.wait_exit(&victim, WAIT).await?;

    let job = t.wait_finished(update_id, WAIT).await?;
    ensure!(job.outcome.as_deref() == Some("document_refused"), "the job did not end refused: {job:?}");
    ensure!(job.attempts == 2, "refused on the second attempt: {job:?}");
    t.wait_for_message(CHI, "I could not read poison.pdf: reading it failed, and I will not try it again").await?;
    // The refusal is decided before any reading: the survivor never started the reader.
    ensure!(starts(log) == 1, "the document was read {} times", starts(log));
    ensure!(t.fleet.exited() == vec![victim.clone()], "exited: {:?}", t.fleet.exited());
    ensure!(t.anthropic.calls().is_empty(), "Claude was asked about a refused document");
    Ok(())
}
