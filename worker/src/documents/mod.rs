//! Documents users send (Bot API `Document`), for the `list_files` and
//! `read_file` tools. Intake only records that a document arrived (a job of
//! kind `document`, holding the `Document` as sent) and acks: nothing slow
//! or dangerous runs in an intake shard. The job then, under its lease,
//! [`prepare`]s the document: checks the sender's credit and quota,
//! downloads it with `getFile` and `{api_url}/file/bot<token>/<file_path>`
//! (under `DOCUMENT_DOWNLOAD_TIMEOUT_S`, capped at `DOCUMENT_MAX_BYTES`),
//! extracts its text (UTF-8 here; a PDF only in the sandboxed child process
//! of [`sandbox`]), stores the text in `documents` (never the bytes) and
//! turns itself into an ordinary chat job whose user turn points to the
//! file. A file that cannot be kept is refused once, permanently, with a
//! notice ("I could not read this PDF: …"); only network failures of the
//! download are retried (as attempts of the job).

mod extract;
mod job;
mod sandbox;

pub use extract::{child_main, extract_pdf, ChildReport, ExtractLimits};
pub use job::{document_content, prepare, Prepared};
pub use sandbox::{Refusal, Sandbox};

use crate::context::WorkerContext;
use shared::telegram::bot::FileError;
use shared::telegram::update::Document;
use shared::telegram::TelegramError;
use std::time::Duration;

/// The largest file the public Bot API lets a bot download (20 MB).
pub const BOT_API_MAX_BYTES: u64 = shared::telegram::MAX_DOWNLOAD_BYTES;

/// How a document's text was obtained (`documents.extraction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extraction {
    /// Text file, decoded as UTF-8 with invalid bytes replaced.
    Text,
    /// The text layer of a PDF.
    Pdf,
}

impl Extraction {
    fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Pdf => "pdf",
        }
    }
}

/// A downloaded document, ready to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDocument {
    /// Telegram's stable id of the file (one row per user and file).
    pub file_unique_id: String,
    /// The sender's file name, cleaned for display.
    pub file_name: String,
    /// The sender's MIME type.
    pub mime_type: Option<String>,
    /// Bytes downloaded.
    pub size_bytes: u64,
    /// How `text` was obtained.
    pub extraction: Extraction,
    /// The extracted text.
    pub text: String,
}

/// What [`fetch`] got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// Downloaded and read.
    Ready(NewDocument),
    /// Not kept: the notice for the user says why.
    Rejected(String),
}

/// What kind of file a name and MIME type announce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Pdf,
    /// Unknown: decided by the bytes (`%PDF-`, or UTF-8 without NUL).
    Sniff,
    Unsupported,
}

const TEXT_EXTENSIONS: &[&str] = &[
    "txt", "md", "markdown", "csv", "tsv", "json", "jsonl", "ndjson", "xml", "yaml", "yml", "toml", "ini", "cfg",
    "conf", "log", "html", "htm", "css", "js", "ts", "py", "rs", "go", "java", "c", "h", "cpp", "hpp", "cs", "rb",
    "php", "sh", "sql", "tex", "rst", "srt", "vtt", "env",
];
const TEXT_MIME_TYPES: &[&str] = &[
    "application/json",
    "application/xml",
    "application/x-yaml",
    "application/yaml",
    "application/toml",
    "application/javascript",
    "application/x-sh",
    "application/sql",
    "application/csv",
    "application/x-ndjson",
    "application/x-subrip",
];

fn kind_of(file_name: &str, mime_type: Option<&str>) -> Kind {
    let ext = file_name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    let mime = mime_type.unwrap_or_default().to_ascii_lowercase();
    if mime == "application/pdf" || ext == "pdf" {
        Kind::Pdf
    } else if mime.starts_with("text/")
        || TEXT_MIME_TYPES.contains(&mime.as_str())
        || mime.ends_with("+json")
        || mime.ends_with("+xml")
        || TEXT_EXTENSIONS.contains(&ext.as_str())
    {
        Kind::Text
    } else if ["image/", "audio/", "video/", "font/"].iter().any(|p| mime.starts_with(p))
        || mime.starts_with("application/vnd.")
        || mime.starts_with("application/zip")
        || mime.starts_with("application/x-")
        || mime == "application/msword"
        || mime == "application/gzip"
    {
        Kind::Unsupported
    } else {
        Kind::Sniff
    }
}

/// The limits of one sandboxed PDF extraction, from the worker's settings.
pub fn limits_of(settings: &crate::config::Settings) -> ExtractLimits {
    ExtractLimits {
        max_chars: settings.document_max_chars,
        max_pages: settings.document_max_pages,
        max_decompressed_bytes: settings.document_max_decompressed_mib.saturating_mul(1024 * 1024),
        cpu_s: settings.document_extract_cpu_s,
        memory_mib: settings.document_extract_memory_mib,
        max_input_bytes: settings.document_max_bytes,
    }
}

/// Downloads `doc` (under `DOCUMENT_DOWNLOAD_TIMEOUT_S`) and extracts its
/// text (a PDF in the sandbox, under its own limits).
///
/// # Errors
/// Transient failures, worth retrying later: network errors, 5xx and 429
/// answers, the download timeout. Everything permanent is [`Fetched::Rejected`].
pub async fn fetch(ctx: &WorkerContext, doc: &Document) -> Result<Fetched, TelegramError> {
    let cap = ctx.settings.document_max_bytes;
    let name = display_name(doc);
    let kind = kind_of(&name, doc.mime_type.as_deref());
    if let Some(size) = doc.file_size.filter(|&s| s > cap) {
        return Ok(Fetched::Rejected(too_large(&name, Some(size), cap)));
    }
    if kind == Kind::Unsupported {
        return Ok(Fetched::Rejected(unsupported(&name)));
    }
    let limit = Duration::from_secs(ctx.settings.document_download_timeout_s);
    let bytes = match tokio::time::timeout(limit, download(ctx, doc, &name, cap)).await {
        Ok(Ok(Ok(bytes))) => bytes,
        Ok(Ok(Err(notice))) => return Ok(Fetched::Rejected(notice)),
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(TelegramError::Transport(format!(
                "the document download took longer than {} s",
                limit.as_secs()
            )))
        }
    };
    let size_bytes = bytes.len() as u64;
    let sandbox = Sandbox {
        program: ctx.extractor.clone(),
        limits: limits_of(&ctx.settings),
        wall_clock: Duration::from_secs(ctx.settings.document_extract_timeout_s),
    };
    // At most DOCUMENT_EXTRACT_CONCURRENCY children at once; a closed
    // semaphore (never closed here) would only skip the wait.
    let _slot = ctx.extract_slots.acquire().await.ok();
    let (extraction, text) = match extract(&sandbox, kind, bytes, &name).await {
        Ok(x) => x,
        Err(notice) => return Ok(Fetched::Rejected(notice)),
    };
    let chars = text.chars().count() as u64;
    if chars > ctx.settings.document_max_chars {
        return Ok(Fetched::Rejected(crate::notices::document_too_long(&name, chars, ctx.settings.document_max_chars)));
    }
    Ok(Fetched::Ready(NewDocument {
        file_unique_id: doc.file_unique_id.clone(),
        file_name: name,
        mime_type: doc.mime_type.clone(),
        size_bytes,
        extraction,
        text,
    }))
}

/// `getFile` and the download: the bytes, a notice (permanent), or a
/// transient error.
async fn download(
    ctx: &WorkerContext,
    doc: &Document,
    name: &str,
    cap: u64,
) -> Result<Result<Vec<u8>, String>, TelegramError> {
    let info = match ctx.telegram.get_file(&doc.file_id).await {
        Ok(info) => info,
        Err(e @ (TelegramError::Transport(_) | TelegramError::RetryAfter(_))) => return Err(e),
        Err(TelegramError::Api(d)) if d.contains("file is too big") => return Ok(Err(too_large(name, None, cap))),
        Err(e) => return Ok(Err(refused(name, &e))),
    };
    if let Some(size) = info.file_size.filter(|&s| s > cap) {
        return Ok(Err(too_large(name, Some(size), cap)));
    }
    let Some(path) = info.file_path else {
        return Ok(Err(format!("Telegram did not let me download {name}, so I could not read it.")));
    };
    match ctx.telegram.download_file(&path, cap).await {
        Ok(bytes) => Ok(Ok(bytes)),
        Err(FileError::TooLarge(_)) => Ok(Err(too_large(name, None, cap))),
        Err(FileError::Telegram(e @ (TelegramError::Transport(_) | TelegramError::RetryAfter(_)))) => Err(e),
        Err(FileError::Telegram(e)) => Ok(Err(refused(name, &e))),
    }
}

/// The text of a file: text kinds decoded here, PDFs read by the sandboxed
/// child process (a crash, a loop or a bomb is a refusal, never a crash of
/// the worker).
///
/// # Errors
/// A notice for the user about `name`.
async fn extract(sandbox: &Sandbox, kind: Kind, bytes: Vec<u8>, name: &str) -> Result<(Extraction, String), String> {
    let is_pdf = kind == Kind::Pdf || (kind == Kind::Sniff && bytes.starts_with(b"%PDF-"));
    if !is_pdf {
        let looks_textual = !bytes.contains(&0) && std::str::from_utf8(&bytes).is_ok();
        if kind != Kind::Text && !looks_textual {
            return Err(unsupported(name));
        }
        return Ok((Extraction::Text, clean(&String::from_utf8_lossy(&bytes))));
    }
    match sandbox.extract(bytes).await {
        Ok((text, _pages)) => {
            let text = clean(&text);
            if text.trim().is_empty() {
                Err(crate::notices::document_no_text(name))
            } else {
                Ok((Extraction::Pdf, text))
            }
        }
        Err(Refusal(why)) => Err(crate::notices::document_unreadable(name, &why)),
    }
}

/// Text as stored: no byte-order mark, no NUL (PostgreSQL text cannot hold it).
fn clean(text: &str) -> String {
    text.trim_start_matches('\u{feff}').replace('\0', "")
}

/// The sender's file name without control characters, at most 200 characters.
fn display_name(doc: &Document) -> String {
    let name: String = doc
        .file_name
        .as_deref()
        .unwrap_or_default()
        .chars()
        .filter(|c| !c.is_control() && !matches!(c, '[' | ']'))
        .take(200)
        .collect();
    if name.trim().is_empty() {
        "the file".to_owned()
    } else {
        name.trim().to_owned()
    }
}

fn size_text(bytes: u64) -> String {
    const KIB: f64 = 1024.0;
    let b = bytes as f64;
    if b >= KIB * KIB {
        format!("{:.1} MB", b / (KIB * KIB))
    } else if b >= KIB {
        format!("{:.1} KB", b / KIB)
    } else {
        format!("{bytes} bytes")
    }
}

fn too_large(name: &str, size: Option<u64>, cap: u64) -> String {
    crate::notices::document_too_large(name, size.map(size_text).as_deref(), &size_text(cap))
}

fn unsupported(name: &str) -> String {
    crate::notices::document_unsupported(name)
}

fn refused(name: &str, e: &TelegramError) -> String {
    tracing::warn!(error.message = %e, "a document could not be downloaded");
    format!("Telegram did not let me download {name}, so I could not read it.")
}

/// Stores the document for `user_id` in `chat_id` and returns its id; the
/// same file sent again in the same chat keeps its id and gets the new name
/// (in another chat it is another row: tools see a chat's own files only).
///
/// # Errors
/// Database errors.
pub async fn store(
    tx: &mut sqlx::PgConnection,
    user_id: i64,
    chat_id: i64,
    doc: &NewDocument,
) -> Result<i64, sqlx::Error> {
    let row = crate::store::documents::NewDocumentRow {
        file_unique_id: &doc.file_unique_id,
        file_name: &doc.file_name,
        mime_type: doc.mime_type.as_deref(),
        size_bytes: i64::try_from(doc.size_bytes).unwrap_or(i64::MAX),
        extraction: doc.extraction.as_str(),
        text: &doc.text,
    };
    crate::store::documents::insert(tx, user_id, chat_id, &row).await
}

/// The user's turn for a stored document: where it is, then the caption.
pub fn user_turn(id: i64, doc: &NewDocument, caption: Option<&str>) -> String {
    let chars = doc.text.chars().count();
    let mut turn = format!(
        "[The user sent the file {} (id {id}, {}, {chars} characters of text); use read_file to read it]",
        doc.file_name,
        size_text(doc.size_bytes)
    );
    if let Some(caption) = caption.map(str::trim).filter(|c| !c.is_empty()) {
        turn.push(' ');
        turn.push_str(caption);
    }
    turn
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_come_from_the_mime_type_or_the_extension() {
        assert_eq!(kind_of("report.pdf", None), Kind::Pdf);
        assert_eq!(kind_of("x", Some("application/pdf")), Kind::Pdf);
        assert_eq!(kind_of("notes.md", Some("application/octet-stream")), Kind::Text);
        assert_eq!(kind_of("data", Some("application/json")), Kind::Text);
        assert_eq!(kind_of("a.txt", Some("text/plain")), Kind::Text);
        assert_eq!(kind_of("photo.jpg", Some("image/jpeg")), Kind::Unsupported);
        assert_eq!(kind_of("a.docx", Some("application/vnd.openxmlformats-officedocument")), Kind::Unsupported);
        assert_eq!(kind_of("blob", Some("application/octet-stream")), Kind::Sniff);
        assert_eq!(kind_of("blob", None), Kind::Sniff);
    }

    /// A sandbox whose program does not exist: PDFs are refused, text never reaches it.
    fn no_sandbox() -> Sandbox {
        Sandbox {
            program: "/nonexistent/worker".into(),
            limits: ExtractLimits::default(),
            wall_clock: std::time::Duration::from_secs(1),
        }
    }

    #[tokio::test]
    async fn text_is_decoded_lossily_and_binaries_of_unknown_kind_are_refused() {
        let sb = no_sandbox();
        let (x, text) = extract(&sb, Kind::Text, b"\xef\xbb\xbfhi \xff there\0!".to_vec(), "a").await.unwrap();
        assert_eq!((x, text.as_str()), (Extraction::Text, "hi \u{fffd} there!"));
        let (x, text) = extract(&sb, Kind::Sniff, "plain ünïcode".as_bytes().to_vec(), "a").await.unwrap();
        assert_eq!((x, text.as_str()), (Extraction::Text, "plain ünïcode"));
        let png = vec![0x89, b'P', b'N', b'G', 0, 0];
        assert!(extract(&sb, Kind::Sniff, png, "a.bin").await.unwrap_err().contains("could not use a.bin"));
    }

    #[tokio::test]
    async fn a_pdf_the_sandbox_cannot_read_is_refused_with_a_reason() {
        let err = extract(&no_sandbox(), Kind::Pdf, b"%PDF-1.4 not really".to_vec(), "x.pdf").await.unwrap_err();
        assert!(err.starts_with("I could not read this PDF (x.pdf): the PDF reader could not be started"), "{err}");
    }

    #[test]
    fn names_are_cleaned_and_the_turn_points_to_read_file() {
        let doc = Document {
            file_id: "f".into(),
            file_unique_id: "u".into(),
            file_name: Some("re[port]\n.txt".into()),
            mime_type: None,
            file_size: None,
        };
        assert_eq!(display_name(&doc), "report.txt");
        let new = NewDocument {
            file_unique_id: "u".into(),
            file_name: display_name(&doc),
            mime_type: None,
            size_bytes: 2048,
            extraction: Extraction::Text,
            text: "abc".into(),
        };
        assert_eq!(
            user_turn(7, &new, Some(" summarise ")),
            "[The user sent the file report.txt (id 7, 2.0 KB, 3 characters of text); use read_file to read it] summarise"
        );
        assert!(too_large("big.pdf", Some(3 * 1024 * 1024), 2 * 1024 * 1024).contains("3.0 MB"));
    }
}
