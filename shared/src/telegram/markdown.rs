//! Claude's Markdown (CommonMark + GFM, parsed by `pulldown-cmark`) turned
//! into plain text plus Telegram `MessageEntity` values (Bot API,
//! "MessageEntity": offsets and lengths in UTF-16 code units), so that no
//! `parse_mode` is ever used and a stray `*` or `_` cannot make Telegram
//! reject a message (DESIGN §7). [`split_formatted`] splits the result at
//! 4,096 UTF-16 units, cutting and re-opening entities at the boundary.

use pulldown_cmark::{CodeBlockKind, Event, Options, Parser, Tag, TagEnd};
use serde::Serialize;

/// One Telegram `MessageEntity`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entity {
    /// `bold`, `italic`, `underline`, `strikethrough`, `code`, `pre`, `text_link`, `blockquote`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Start, UTF-16 code units.
    pub offset: usize,
    /// Length, UTF-16 code units.
    pub length: usize,
    /// For `text_link`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// For `pre`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
}

/// Text with its entities.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Formatted {
    /// The text as the user sees it.
    pub text: String,
    /// Entities over `text`, sorted by offset.
    pub entities: Vec<Entity>,
}

impl Formatted {
    /// The entities as Bot API JSON, or `None` when there are none.
    pub fn entities_json(&self) -> Option<Vec<serde_json::Value>> {
        if self.entities.is_empty() {
            return None;
        }
        Some(self.entities.iter().filter_map(|e| serde_json::to_value(e).ok()).collect())
    }
}

struct Open {
    kind: &'static str,
    start: usize,
    url: Option<String>,
    language: Option<String>,
}

struct Builder {
    text: String,
    units: usize,
    open: Vec<Open>,
    entities: Vec<Entity>,
    lists: Vec<Option<u64>>,
    in_code_block: bool,
}

impl Builder {
    fn push(&mut self, s: &str) {
        self.units += s.encode_utf16().count();
        self.text.push_str(s);
    }

    /// Separates a new block from what came before by a blank line (or one
    /// newline inside lists).
    fn block(&mut self, tight: bool) {
        if self.text.is_empty() {
            return;
        }
        let want = if tight { "\n" } else { "\n\n" };
        let have = self.text.len() - self.text.trim_end_matches('\n').len();
        for _ in have..want.len() {
            self.push("\n");
        }
    }

    fn open(&mut self, kind: &'static str, url: Option<String>, language: Option<String>) {
        self.open.push(Open { kind, start: self.units, url, language });
    }

    fn close(&mut self, kind: &'static str) {
        if let Some(pos) = self.open.iter().rposition(|o| o.kind == kind) {
            let o = self.open.remove(pos);
            if self.units > o.start {
                self.entities.push(Entity {
                    kind: o.kind,
                    offset: o.start,
                    length: self.units - o.start,
                    url: o.url,
                    language: o.language,
                });
            }
        }
    }
}

/// Converts Markdown to text and entities.
pub fn to_entities(markdown: &str) -> Formatted {
    let opts = Options::ENABLE_STRIKETHROUGH | Options::ENABLE_TABLES | Options::ENABLE_TASKLISTS;
    let mut b = Builder {
        text: String::new(),
        units: 0,
        open: Vec::new(),
        entities: Vec::new(),
        lists: Vec::new(),
        in_code_block: false,
    };
    for event in Parser::new_ext(markdown, opts) {
        match event {
            Event::Start(tag) => match tag {
                Tag::Paragraph => b.block(!b.lists.is_empty()),
                // A line of tag-like text (`<details> is an HTML tag`) is an
                // HTML block to CommonMark: a block of its own, shown literally.
                Tag::HtmlBlock => b.block(!b.lists.is_empty()),
                Tag::Heading { .. } => {
                    b.block(false);
                    b.open("bold", None, None);
                }
                Tag::BlockQuote(_) => {
                    b.block(false);
                    b.open("blockquote", None, None);
                }
                Tag::CodeBlock(kind) => {
                    b.block(!b.lists.is_empty());
                    let language = match kind {
                        CodeBlockKind::Fenced(info) => {
                            info.split_whitespace().next().map(str::to_owned).filter(|l| !l.is_empty())
                        }
                        CodeBlockKind::Indented => None,
                    };
                    b.in_code_block = true;
                    b.open("pre", None, language);
                }
                Tag::List(start) => {
                    b.block(!b.lists.is_empty());
                    b.lists.push(start);
                }
                Tag::Item => {
                    b.block(true);
                    let depth = b.lists.len().saturating_sub(1);
                    let marker = match b.lists.last_mut() {
                        Some(Some(n)) => {
                            let m = format!("{n}. ");
                            *n += 1;
                            m
                        }
                        _ => "• ".to_owned(),
                    };
                    b.push(&format!("{}{marker}", "  ".repeat(depth)));
                }
                Tag::Emphasis => b.open("italic", None, None),
                Tag::Strong => b.open("bold", None, None),
                Tag::Strikethrough => b.open("strikethrough", None, None),
                Tag::Link { dest_url, .. } => b.open("text_link", Some(dest_url.to_string()), None),
                Tag::Table(_) => b.block(false),
                Tag::TableRow | Tag::TableHead => b.block(true),
                Tag::TableCell if !b.text.ends_with('\n') && !b.text.is_empty() => b.push(" | "),
                _ => {}
            },
            Event::End(tag) => match tag {
                TagEnd::Heading(_) => b.close("bold"),
                TagEnd::BlockQuote(_) => b.close("blockquote"),
                TagEnd::CodeBlock => {
                    // The block's last newline is not part of the code.
                    if b.text.ends_with('\n') {
                        b.text.pop();
                        b.units -= 1;
                    }
                    b.in_code_block = false;
                    b.close("pre");
                }
                TagEnd::List(_) => {
                    b.lists.pop();
                }
                TagEnd::Emphasis => b.close("italic"),
                TagEnd::Strong => b.close("bold"),
                TagEnd::Strikethrough => b.close("strikethrough"),
                TagEnd::Link => b.close("text_link"),
                _ => {}
            },
            Event::Text(t) => b.push(&t),
            Event::Code(t) => {
                b.open("code", None, None);
                b.push(&t);
                b.close("code");
            }
            Event::SoftBreak | Event::HardBreak => b.push("\n"),
            Event::Rule => {
                b.block(false);
                b.push("———");
            }
            Event::Html(t) | Event::InlineHtml(t) => b.push(&t),
            Event::TaskListMarker(done) => b.push(if done { "☑ " } else { "☐ " }),
            Event::FootnoteReference(t) | Event::InlineMath(t) | Event::DisplayMath(t) => b.push(&t),
        }
    }
    let _ = b.in_code_block;
    // Unclosed entities (cannot happen with a well-formed event stream) are dropped.
    let mut f = Formatted { text: b.text, entities: b.entities };
    trim(&mut f);
    f.entities.sort_by_key(|e| (e.offset, std::cmp::Reverse(e.length)));
    f
}

/// Trims whitespace at both ends (Telegram does) and clips entities to match.
fn trim(f: &mut Formatted) {
    let lead = f.text.len() - f.text.trim_start().len();
    let lead_units: usize = f.text[..lead].encode_utf16().count();
    let kept = f.text.trim().to_owned();
    let total = kept.encode_utf16().count();
    f.entities = f
        .entities
        .drain(..)
        .filter_map(|mut e| {
            let start = e.offset.saturating_sub(lead_units);
            let end = (e.offset + e.length).saturating_sub(lead_units).min(total);
            (end > start).then(|| {
                e.offset = start;
                e.length = end - start;
                e
            })
        })
        .collect();
    f.text = kept;
}

/// Splits `f` into parts of at most `limit` UTF-16 units, on paragraph, then
/// line, then word boundaries (never inside a surrogate pair). An entity
/// crossing a cut is cut too and continues, same type, in the next part
/// (a code block is closed and reopened with its language).
pub fn split_formatted(f: &Formatted, limit: usize) -> Vec<Formatted> {
    let limit = limit.max(16);
    let mut parts = Vec::new();
    let units: Vec<u16> = f.text.encode_utf16().collect();
    let mut start = 0; // UTF-16 offset of the rest
    while start < units.len() {
        let mut end = (start + limit).min(units.len());
        if end < units.len() {
            end = choose_cut(&units, start, end);
        }
        // Drop the newlines and spaces at the cut from both sides.
        let mut part_end = end;
        while part_end > start && is_space(units[part_end - 1]) {
            part_end -= 1;
        }
        let text = String::from_utf16_lossy(&units[start..part_end]);
        let entities = f
            .entities
            .iter()
            .filter_map(|e| {
                let s = e.offset.max(start);
                let t = (e.offset + e.length).min(part_end);
                (t > s).then(|| Entity { offset: s - start, length: t - s, ..e.clone() })
            })
            .collect();
        if !text.is_empty() {
            parts.push(Formatted { text, entities });
        }
        start = end;
        while start < units.len() && is_space(units[start]) {
            start += 1;
        }
    }
    parts
}

fn is_space(u: u16) -> bool {
    u == u16::from(b'\n') || u == u16::from(b' ')
}

/// The best cut in `units[start..end]` (exclusive end), never between the
/// two halves of a surrogate pair.
fn choose_cut(units: &[u16], start: usize, end: usize) -> usize {
    let window = &units[start..end];
    let nl = u16::from(b'\n');
    let half = window.len() / 2;
    let find = |pred: &dyn Fn(usize) -> bool| (1..window.len()).rev().find(|&i| pred(i));
    let blank = find(&|i| i >= half && window[i] == nl && window[i - 1] == nl);
    let line = || find(&|i| i >= window.len() / 4 && window[i] == nl);
    let space = || find(&|i| i >= window.len() / 4 && window[i] == u16::from(b' '));
    let cut = blank.or_else(line).or_else(space).map(|i| start + i).unwrap_or(end);
    // Never split a surrogate pair.
    if cut < units.len() && (0xDC00..0xE000).contains(&units[cut]) {
        cut - 1
    } else {
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(f: &Formatted, e: &Entity) -> String {
        let u: Vec<u16> = f.text.encode_utf16().collect();
        String::from_utf16_lossy(&u[e.offset..e.offset + e.length])
    }

    #[test]
    fn inline_styles_become_entities_without_markers() {
        let f = to_entities(
            "Some **bold**, *italic*, `parse_mode` and [the docs](https://core.telegram.org/bots/api). 1.50 - 2.00 USD",
        );
        assert_eq!(f.text, "Some bold, italic, parse_mode and the docs. 1.50 - 2.00 USD");
        let kinds: Vec<(&str, String)> = f.entities.iter().map(|e| (e.kind, slice(&f, e))).collect();
        assert!(kinds.contains(&("bold", "bold".into())));
        assert!(kinds.contains(&("italic", "italic".into())));
        assert!(kinds.contains(&("code", "parse_mode".into())));
        let link = f.entities.iter().find(|e| e.kind == "text_link").unwrap();
        assert_eq!(link.url.as_deref(), Some("https://core.telegram.org/bots/api"));
    }

    #[test]
    fn fenced_code_is_pre_with_language_and_keeps_stray_markers() {
        let f = to_entities("Run:\n\n```python\nprint(\"a_b * c\")\n```\n\nDone");
        let pre = f.entities.iter().find(|e| e.kind == "pre").unwrap();
        assert_eq!(slice(&f, pre), "print(\"a_b * c\")");
        assert_eq!(pre.language.as_deref(), Some("python"));
        assert_eq!(f.text, "Run:\n\nprint(\"a_b * c\")\n\nDone");
    }

    #[test]
    fn offsets_are_utf16() {
        let f = to_entities("🙂 **x**");
        assert_eq!(f.entities[0].offset, 3);
        assert_eq!(f.entities[0].length, 1);
    }

    #[test]
    fn a_code_block_longer_than_a_part_continues_in_the_next() {
        let code = "let x = 1;\n".repeat(300);
        let f = to_entities(&format!("Intro\n\n```rust\n{code}```\n\nOutro"));
        let parts = split_formatted(&f, 1000);
        assert!(parts.len() >= 3);
        assert!(parts[1]
            .entities
            .iter()
            .any(|e| e.kind == "pre" && e.language.as_deref() == Some("rust") && e.offset == 0));
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        fn markdownish() -> impl Strategy<Value = String> {
            let pieces = prop::sample::select(vec![
                "word ",
                "**bold** ",
                "*it* ",
                "`code` ",
                "🙂",
                "é",
                "\n",
                "\n\n",
                "```py\nx = 1\n```\n",
                "[l](http://x.y) ",
                "_",
                "*",
                "> quote\n",
                "- item\n",
            ]);
            prop::collection::vec(pieces, 0..400).prop_map(|v| v.concat())
        }

        proptest! {
            #[test]
            fn entities_stay_inside_their_part_and_pairs_are_never_split(md in markdownish(), limit in 16usize..300) {
                let f = to_entities(&md);
                let total: usize = f.text.encode_utf16().count();
                for e in &f.entities {
                    prop_assert!(e.offset + e.length <= total);
                }
                for part in split_formatted(&f, limit) {
                    let units: Vec<u16> = part.text.encode_utf16().collect();
                    prop_assert!(units.len() <= limit);
                    prop_assert!(String::from_utf16(&units).is_ok(), "lone surrogate in a part");
                    for e in &part.entities {
                        prop_assert!(e.length > 0 && e.offset + e.length <= units.len());
                    }
                }
            }
        }
    }

    #[test]
    fn a_line_that_looks_like_html_is_its_own_paragraph_shown_literally() {
        let f = to_entities("for errors.\n\n<details> is an HTML tag; shown literally.\n\nFor numbers, a<b and b>c.");
        assert_eq!(f.text, "for errors.\n\n<details> is an HTML tag; shown literally.\n\nFor numbers, a<b and b>c.");
    }
}
