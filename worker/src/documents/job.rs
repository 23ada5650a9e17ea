//! The `document` job's first step: the document a user sent becomes
//! stored text and the job becomes an ordinary chat job, or the document
//! is refused once with a notice. Runs under the job's lease; its writes
//! are fenced by the lease epoch.

use super::{fetch, store, user_turn, Fetched};
use crate::context::WorkerContext;
use crate::job::JobError;
use crate::store::jobs::ClaimedJob;
use crate::store::jobs::JobRow;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use shared::telegram::update::Document;
use shared::telegram::TelegramError;

/// What [`prepare`] decided.
#[derive(Debug)]
pub enum Prepared {
    /// Stored: the job is a chat job now (reloaded row).
    Ready(Box<JobRow>),
    /// Not kept, for good: the notice to send.
    Refused(String),
}

/// The user content of a `document` job, as intake writes it.
///
/// `{"document": <Bot API Document>, "caption": "…"|null, "sender": "Ada"|null}`
/// (`sender` is set in groups, where the user turn is prefixed with the name).
pub fn document_content(doc: &Document, caption: Option<&str>, sender: Option<&str>) -> Value {
    json!({
        "document": {
            "file_id": doc.file_id,
            "file_unique_id": doc.file_unique_id,
            "file_name": doc.file_name,
            "mime_type": doc.mime_type,
            "file_size": doc.file_size,
        },
        "caption": caption,
        "sender": sender,
    })
}

fn parse_content(content: &Value) -> Result<(Document, Option<String>, Option<String>), String> {
    let d = &content["document"];
    let text = |v: &Value| v.as_str().map(str::to_owned);
    let doc = Document {
        file_id: text(&d["file_id"]).ok_or("document without file_id")?,
        file_unique_id: text(&d["file_unique_id"]).ok_or("document without file_unique_id")?,
        file_name: text(&d["file_name"]),
        mime_type: text(&d["mime_type"]),
        file_size: d["file_size"].as_u64(),
    };
    Ok((doc, text(&content["caption"]), text(&content["sender"])))
}

/// Prepares the document of a `document` job: credit, the poison marker,
/// quota, download, extraction, storage, and the job's new user turn.
///
/// # Errors
/// `LeaseLost` when a fenced write matched nothing; `Transient` for a
/// download that failed on the network (the attempt is retried);
/// database errors; `Invalid` for a job row that does not parse.
pub async fn prepare(ctx: &WorkerContext, job: &JobRow, lease: &ClaimedJob) -> Result<Prepared, JobError> {
    let (doc, caption, sender) =
        parse_content(&job.user_content).map_err(|e| JobError::Invalid(format!("job {}: {e}", job.job_id)))?;
    let name = super::display_name(&doc);
    let started = crate::store::documents::started_epoch(&ctx.db, job.job_id).await?;
    if started.is_some_and(|e| e < lease.epoch()) {
        // An earlier attempt began reading this document and never came
        // back (its worker died): it is not tried again (poison).
        tracing::error!(started_epoch = ?started, "a document's earlier reading never finished; refused as poison");
        metrics::counter!("fleet_document_extractions_total", "result" => "poison").increment(1);
        return Ok(Prepared::Refused(crate::notices::document_poison(&name)));
    }
    let available = crate::holds::available(ctx, job.user_id).await?;
    if available <= Decimal::ZERO {
        return Ok(Prepared::Refused(crate::notices::document_needs_credit(&name, available)));
    }
    let (files, chars) = stored_totals(ctx, job.user_id).await?;
    let quota_files = i64::try_from(ctx.settings.document_quota_files).unwrap_or(i64::MAX);
    let quota_chars = i64::try_from(ctx.settings.document_quota_chars).unwrap_or(i64::MAX);
    if files >= quota_files || chars >= quota_chars {
        return Ok(Prepared::Refused(quota_notice(&name, files, chars, quota_files, quota_chars)));
    }
    mark_started(ctx, lease, true).await?;
    let fetched = match fetch(ctx, &doc).await {
        Ok(f) => f,
        Err(e @ (TelegramError::Transport(_) | TelegramError::RetryAfter(_))) => {
            // Not a crash: the marker goes, the attempt is retried later.
            mark_started(ctx, lease, false).await?;
            return Err(JobError::Transient(format!("downloading the document: {e}")));
        }
        Err(e) => return Ok(Prepared::Refused(super::refused(&name, &e))),
    };
    let new = match fetched {
        Fetched::Ready(new) => new,
        Fetched::Rejected(notice) => return Ok(Prepared::Refused(notice)),
    };
    let new_chars = i64::try_from(new.text.chars().count()).unwrap_or(i64::MAX);
    if chars.saturating_add(new_chars) > quota_chars {
        return Ok(Prepared::Refused(quota_notice(&name, files, chars, quota_files, quota_chars)));
    }
    let mut tx = shared::db::begin(&ctx.db).await?;
    // The quota again, under a per-user lock: two documents of one user read
    // at once in two chats cannot both pass the check made before reading.
    crate::store::documents::lock_quota(&mut tx, job.user_id).await?;
    let (files, chars) =
        crate::store::documents::totals_without(&mut tx, job.user_id, job.chat_id, &new.file_unique_id).await?;
    if files >= quota_files || chars.saturating_add(new_chars) > quota_chars {
        return Ok(Prepared::Refused(quota_notice(&name, files, chars, quota_files, quota_chars)));
    }
    let id = store(&mut tx, job.user_id, job.chat_id, &new).await?;
    let mut text = user_turn(id, &new, caption.as_deref());
    if let Some(sender) = sender {
        text = format!("{sender}: {text}");
    }
    let content = json!([{ "type": "text", "text": text }]);
    if !lease.document_to_chat(&mut tx, &content).await? {
        return Err(JobError::LeaseLost);
    }
    tx.commit().await?;
    metrics::counter!("fleet_documents_stored_total").increment(1);
    Ok(Prepared::Ready(Box::new(crate::job::load(ctx, job.job_id).await?)))
}

/// Documents and characters the user has stored.
async fn stored_totals(ctx: &WorkerContext, user_id: i64) -> Result<(i64, i64), sqlx::Error> {
    crate::store::documents::totals(&ctx.db, user_id).await
}

async fn mark_started(ctx: &WorkerContext, lease: &ClaimedJob, started: bool) -> Result<(), JobError> {
    if lease.mark_document_started(&ctx.db, started).await? {
        Ok(())
    } else {
        Err(JobError::LeaseLost)
    }
}

fn quota_notice(name: &str, files: i64, chars: i64, quota_files: i64, quota_chars: i64) -> String {
    crate::notices::document_over_quota(name, files, chars, quota_files, quota_chars)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_job_content_round_trips() {
        let doc = Document {
            file_id: "f".into(),
            file_unique_id: "u".into(),
            file_name: Some("a.pdf".into()),
            mime_type: Some("application/pdf".into()),
            file_size: Some(591),
        };
        let content = document_content(&doc, Some("read it"), Some("Ada"));
        assert_eq!(parse_content(&content), Ok((doc, Some("read it".into()), Some("Ada".into()))));
        assert!(parse_content(&json!({"document": {}})).is_err());
    }
}
