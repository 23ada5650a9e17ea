//! The child side of the PDF sandbox: `worker extract-document` reads one
//! PDF on standard input and writes one JSON line on standard output
//! ([`ChildReport`]). It runs in its own process, started by
//! [`super::sandbox`], because the PDF parser can overflow its stack
//! (a Form XObject that draws itself), loop forever (a page tree that is
//! its own parent) or allocate without bound (a Flate bomb): here those
//! kill only this process.
//!
//! Before touching the input the process limits itself with `setrlimit(2)`
//! (POSIX; Linux `getrlimit(2)`): CPU seconds (`RLIMIT_CPU`: SIGXCPU, then
//! SIGKILL at the hard limit), address space (`RLIMIT_AS`: allocations fail,
//! Rust aborts), no files written (`RLIMIT_FSIZE` 0), no core dump. The
//! parent adds a wall-clock limit and kills it when over. Inside, the
//! output is capped: pages, decompressed stream bytes and characters, each
//! a refusal when exceeded (never a silent truncation).

use serde::{Deserialize, Serialize};
use std::io::{Read, Write};

/// Limits of one extraction. Passed to the child as arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct ExtractLimits {
    /// Most characters of text kept from one document.
    #[arg(long, default_value_t = 500_000)]
    pub max_chars: u64,
    /// Most pages of one PDF.
    #[arg(long, default_value_t = 500)]
    pub max_pages: u64,
    /// Most bytes of all Flate-compressed streams of one PDF once decompressed.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    pub max_decompressed_bytes: u64,
    /// CPU time of the child, seconds (`RLIMIT_CPU`).
    #[arg(long, default_value_t = 10)]
    pub cpu_s: u64,
    /// Address space of the child, MiB (`RLIMIT_AS`).
    #[arg(long, default_value_t = 512)]
    pub memory_mib: u64,
    /// Most input bytes read from standard input.
    #[arg(long, default_value_t = 20 * 1024 * 1024)]
    pub max_input_bytes: u64,
}

impl Default for ExtractLimits {
    fn default() -> Self {
        Self {
            max_chars: 500_000,
            max_pages: 500,
            max_decompressed_bytes: 64 * 1024 * 1024,
            cpu_s: 10,
            memory_mib: 512,
            max_input_bytes: 20 * 1024 * 1024,
        }
    }
}

impl ExtractLimits {
    /// The limits as arguments of `worker extract-document`.
    pub fn to_args(&self) -> Vec<String> {
        vec![
            format!("--max-chars={}", self.max_chars),
            format!("--max-pages={}", self.max_pages),
            format!("--max-decompressed-bytes={}", self.max_decompressed_bytes),
            format!("--cpu-s={}", self.cpu_s),
            format!("--memory-mib={}", self.memory_mib),
            format!("--max-input-bytes={}", self.max_input_bytes),
        ]
    }
}

/// The one JSON line the child writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ChildReport {
    /// The text layer, at most `max_chars` characters.
    Text {
        /// The text.
        text: String,
        /// Pages read.
        pages: u64,
    },
    /// Not read; `reason` completes "I could not read this PDF: …".
    Refused {
        /// Why, for the user.
        reason: String,
    },
}

/// `worker extract-document`: limits itself, reads standard input, writes
/// the report. Returns the process exit code (0 when a report was written).
pub fn child_main(limits: &ExtractLimits) -> i32 {
    if let Err(e) = limit_self(limits) {
        // Without its limits the child must not parse anything.
        let _ = writeln!(std::io::stderr(), "extract-document: cannot set resource limits: {e}");
        return 3;
    }
    let mut input = Vec::new();
    let read = std::io::stdin().take(limits.max_input_bytes.saturating_add(1)).read_to_end(&mut input);
    let report = match read {
        Err(e) => ChildReport::Refused { reason: format!("the file could not be read ({e})") },
        Ok(n) if n as u64 > limits.max_input_bytes => ChildReport::Refused { reason: "the file is too large".into() },
        Ok(_) => extract_pdf(&input, limits),
    };
    let line = match serde_json::to_string(&report) {
        Ok(line) => line,
        Err(_) => return 4,
    };
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        return 4;
    }
    0
}

fn limit_self(limits: &ExtractLimits) -> std::io::Result<()> {
    use rlimit::Resource;
    let memory = limits.memory_mib.saturating_mul(1024 * 1024);
    // Soft CPU limit: SIGXCPU (default action: terminate); the hard limit
    // one second later is SIGKILL.
    let cpu = limits.cpu_s.max(1);
    rlimit::setrlimit(Resource::CPU, cpu, cpu.saturating_add(1))?;
    rlimit::setrlimit(Resource::AS, memory, memory)?;
    rlimit::setrlimit(Resource::FSIZE, 0, 0)?;
    rlimit::setrlimit(Resource::CORE, 0, 0)?;
    Ok(())
}

/// Reads the text layer of `pdf` within `limits` (no resource limits of
/// its own: call it in the sandboxed child, or in tests on safe input).
pub fn extract_pdf(pdf: &[u8], limits: &ExtractLimits) -> ChildReport {
    let refused = |reason: &str| ChildReport::Refused { reason: reason.to_owned() };
    let doc = match pdf_extract::Document::load_mem(pdf) {
        Ok(doc) => doc,
        Err(_) => return refused("it seems damaged or uses features I do not support"),
    };
    if doc.is_encrypted() {
        return refused("it is encrypted");
    }
    let pages = doc.get_pages().len() as u64;
    if pages > limits.max_pages {
        return refused(&format!("it has {pages} pages, more than the {} I read", limits.max_pages));
    }
    if let Err(reason) = check_decompressed(&doc, limits.max_decompressed_bytes) {
        return refused(&reason);
    }
    let mut out = CappedText::new(limits.max_chars);
    let written = {
        let mut dev = pdf_extract::PlainTextOutput::new(&mut out as &mut dyn Write);
        pdf_extract::output_doc(&doc, &mut dev)
    };
    if out.over {
        return refused(&format!("it has more than {} characters of text, the most I keep", limits.max_chars));
    }
    match (written, String::from_utf8(out.bytes)) {
        (Ok(()), Ok(text)) => ChildReport::Text { text, pages },
        _ => refused("it seems damaged or uses features I do not support"),
    }
}

/// Measures what every stream expands to, and stops at `max` bytes in
/// total: a bomb is refused before the text is read. A chain of Flate
/// filters (`[/FlateDecode /FlateDecode]`) is inflated layer after layer in
/// a stream, counting, never held; any other filter chain (LZW, ASCII85, …)
/// is decoded by the parser's own decoder, whose memory the child's
/// `RLIMIT_AS` bounds. A corrupt stream counts what it inflated before the
/// error (the parser keeps that much too).
fn check_decompressed(doc: &pdf_extract::Document, max: u64) -> Result<(), String> {
    let mut total: u64 = 0;
    for object in doc.objects.values() {
        let pdf_extract::Object::Stream(stream) = object else { continue };
        let filters: Vec<Vec<u8>> =
            stream.filters().map(|f| f.iter().map(|f| f.to_vec()).collect()).unwrap_or_default();
        let budget = max.saturating_sub(total).saturating_add(1);
        let size = if filters.is_empty() {
            stream.content.len() as u64
        } else if filters.iter().all(|f| f.as_slice() == b"FlateDecode") {
            let mut reader: Box<dyn Read + '_> = Box::new(stream.content.as_slice());
            for _ in &filters {
                reader = Box::new(flate2::read::ZlibDecoder::new(reader));
            }
            count_until_error(reader.take(budget))
        } else {
            match stream.decompressed_content() {
                Ok(content) => content.len() as u64,
                Err(_) => stream.content.len() as u64,
            }
        };
        total = total.saturating_add(size);
        if total > max {
            return Err(format!("it expands to more than {} MB of data, the most I read", max / (1024 * 1024)));
        }
    }
    Ok(())
}

/// Bytes a reader yields before its end or its first error.
fn count_until_error(mut reader: impl Read) -> u64 {
    let mut buf = [0u8; 64 * 1024];
    let mut n: u64 = 0;
    loop {
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => return n,
            Ok(k) => n = n.saturating_add(k as u64),
        }
    }
}

/// A UTF-8 sink that keeps at most `max_chars` characters, then refuses
/// more (the PDF parser stops at the first refused write).
struct CappedText {
    bytes: Vec<u8>,
    chars: u64,
    max_chars: u64,
    over: bool,
}

impl CappedText {
    fn new(max_chars: u64) -> Self {
        Self { bytes: Vec::new(), chars: 0, max_chars, over: false }
    }
}

impl Write for CappedText {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // The parser writes whole `str`s: count characters as UTF-8 lead bytes.
        let chars = buf.iter().filter(|b| (**b & 0xC0) != 0x80).count() as u64;
        if self.chars.saturating_add(chars) > self.max_chars {
            self.over = true;
            return Err(std::io::Error::other("character cap reached"));
        }
        self.chars += chars;
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_capped_sink_refuses_past_its_cap() {
        let mut t = CappedText::new(3);
        assert!(t.write_all("ab".as_bytes()).is_ok());
        assert!(t.write_all("é".as_bytes()).is_ok());
        assert!(t.write_all("x".as_bytes()).is_err());
        assert!(t.over);
        assert_eq!(String::from_utf8(t.bytes).unwrap(), "abé");
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        let r = extract_pdf(b"%PDF-1.4 not really", &ExtractLimits::default());
        assert!(matches!(r, ChildReport::Refused { ref reason } if reason.contains("damaged")), "{r:?}");
    }

    #[test]
    fn limits_round_trip_through_arguments() {
        #[derive(clap::Parser)]
        struct P {
            #[command(flatten)]
            l: ExtractLimits,
        }
        let l = ExtractLimits { max_chars: 7, cpu_s: 2, ..ExtractLimits::default() };
        let parsed = <P as clap::Parser>::parse_from(std::iter::once("x".to_owned()).chain(l.to_args()));
        assert_eq!(parsed.l, l);
    }
}
