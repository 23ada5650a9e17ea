//! Splitting a long answer into Telegram messages (DESIGN §7): at most
//! 4,096 UTF-16 code units each (Bot API `sendMessage`: "Text of the message
//! to be sent, 1-4096 characters after entities parsing", counted in UTF-16
//! code units), cut on paragraph or line boundaries, never inside a surrogate
//! pair, with code fences closed at the end of a part and reopened (same
//! info string) at the start of the next.

/// Telegram's limit on a message's text, in UTF-16 code units.
pub const MAX_MESSAGE_UTF16: usize = 4096;

/// Length of `s` in UTF-16 code units (what Telegram counts).
pub fn utf16_len(s: &str) -> usize {
    s.chars().map(char::len_utf16).sum()
}

/// Smallest limit [`split_message`] works with, UTF-16 code units.
pub const MIN_SPLIT_LIMIT: usize = 64;

/// Splits `text` into parts of at most `limit` UTF-16 code units each.
///
/// Preference for the cut: a blank line outside code blocks in the second
/// half of the window, then a line break outside code blocks, then any line
/// break (closing and reopening the fence), then a space, then the last
/// whole character. Newlines at a cut are dropped. `limit` below
/// [`MIN_SPLIT_LIMIT`] is raised to it so that a reopened fence (up to 35
/// units), its closing marker and some text always fit (a fuzzed input at
/// 16 produced a part over the limit).
pub fn split_message(text: &str, limit: usize) -> Vec<String> {
    let limit = limit.max(MIN_SPLIT_LIMIT);
    let mut parts = Vec::new();
    let mut rest: &str = text.trim_matches('\n');
    // Fence to reopen at the start of the next part (its opening line).
    let mut carry: Option<String> = None;
    // The previous cut fell inside a fence's opening line: its remainder
    // continues that line (it is info string, not code).
    let mut glue = false;
    while !rest.is_empty() {
        let prefix = carry.as_ref().map(|f| if glue { f.clone() } else { format!("{f}\n") }).unwrap_or_default();
        // `carry` is at most 3 + 32 units, so room stays well above 4.
        let room = limit.saturating_sub(utf16_len(&prefix)).max(8);
        if utf16_len(rest) <= room {
            parts.push(format!("{prefix}{rest}"));
            break;
        }
        let mut cut = choose_cut(&rest[..byte_index_at_utf16(rest, room)], carry.is_some());
        if open_fence_after(&rest[..cut], carry.as_deref()).is_some() {
            // The part ends inside a code block: leave room to close it.
            let window = &rest[..byte_index_at_utf16(rest, room.saturating_sub(4))];
            cut = choose_cut(window, carry.is_some());
        }
        let (head, tail) = rest.split_at(cut.max(first_char_len(rest)));
        let open = open_fence_after(head, carry.as_deref());
        let mut part = format!("{prefix}{}", head.trim_end_matches('\n'));
        if open.is_some() {
            part.push_str("\n```");
        }
        parts.push(part);
        glue = open.is_some()
            && !head.ends_with('\n')
            && head.lines().last().is_some_and(|l| l.trim_start().starts_with("```"))
            && (head.lines().count() > 1 || carry.is_none() || glue);
        carry = open;
        rest = if glue { tail } else { tail.trim_start_matches('\n') };
    }
    parts
}

/// Byte index of the longest prefix of `s` with at most `units` UTF-16 units.
fn byte_index_at_utf16(s: &str, units: usize) -> usize {
    let mut used = 0;
    for (i, c) in s.char_indices() {
        used += c.len_utf16();
        if used > units {
            return i;
        }
    }
    s.len()
}

fn first_char_len(s: &str) -> usize {
    s.chars().next().map_or(0, char::len_utf8)
}

/// Chooses the byte offset to cut `window` at.
fn choose_cut(window: &str, starts_in_fence: bool) -> usize {
    let half = window.len() / 2;
    let mut in_fence = starts_in_fence;
    let mut best_blank_outside = None;
    let mut best_line_outside = None;
    let mut best_line_any = None;
    let mut offset = 0;
    for line in window.split_inclusive('\n') {
        let is_fence = line.trim_start().starts_with("```");
        let end = offset + line.len();
        if line.ends_with('\n') {
            let after_fence = if is_fence { !in_fence } else { in_fence };
            if !after_fence {
                best_line_outside = Some(end);
                if window[end..].starts_with('\n') && end >= half {
                    best_blank_outside = Some(end);
                }
            }
            best_line_any = Some(end);
        }
        if is_fence {
            in_fence = !in_fence;
        }
        offset = end;
    }
    best_blank_outside
        .or(best_line_outside.filter(|&e| e >= window.len() / 4))
        .or(best_line_any.filter(|&e| e >= window.len() / 4))
        .or_else(|| window.rfind(' ').map(|i| i + 1).filter(|&e| e > 0))
        .unwrap_or(window.len())
}

/// What reopens a fence in the next part: the backticks and the language
/// (the first word of the info string, at most 32 characters), never the
/// whole opening line, which may be arbitrarily long.
fn reopen_marker(opening_line: &str) -> String {
    let info = opening_line.trim_start_matches('`').split_whitespace().next().unwrap_or("");
    let lang: String =
        info.chars().take_while(|c| c.is_alphanumeric() || matches!(c, '+' | '-' | '#' | '.' | '_')).take(32).collect();
    format!("```{lang}")
}

/// The opening line of the fence still open at the end of `head`, given the
/// fence (if any) open at its start.
fn open_fence_after(head: &str, open_at_start: Option<&str>) -> Option<String> {
    let mut open = open_at_start.map(str::to_owned);
    for line in head.lines() {
        let t = line.trim_start();
        if t.starts_with("```") {
            open = match open {
                Some(_) => None,
                None => Some(reopen_marker(t)),
            };
        }
    }
    open
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiny_limit_is_raised_so_a_reopened_fence_always_fits() {
        // Found by the `splitter` fuzz target at limit 16: a fence reopened
        // with its info string left no room and a part went over the limit.
        let text = "\0\0@1234 \u{d7} 5678 = **7)006,652**/\0. T@The house rules boil down he tcurrent time in Tokyo is shown above \0\0\0\0Tan\0\0\0\0```\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0y\0 ```4the.to thremoohings: be'kind, stool.";
        for limit in [1, 16, MIN_SPLIT_LIMIT] {
            for part in split_message(text, limit) {
                assert!(utf16_len(&part) <= MIN_SPLIT_LIMIT, "limit {limit}: part over {MIN_SPLIT_LIMIT}: {part:?}");
            }
        }
    }

    #[test]
    fn astral_emoji_are_never_torn() {
        let text = format!("a{}", "🙂".repeat(4096));
        let parts = split_message(&text, MAX_MESSAGE_UTF16);
        let lens: Vec<_> = parts.iter().map(|p| utf16_len(p)).collect();
        assert_eq!(lens, [4095, 4096, 2]);
        assert_eq!(parts.concat(), text);
    }

    #[test]
    fn short_text_is_one_part() {
        assert_eq!(split_message("hello", MAX_MESSAGE_UTF16), ["hello"]);
    }

    #[test]
    fn cuts_at_a_paragraph_boundary() {
        let para = "word ".repeat(100);
        let text = format!("{para}\n\n{para}\n\n{para}");
        let parts = split_message(&text, 1100);
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|p| utf16_len(p) <= 1100));
        assert_eq!(parts[0], format!("{para}\n\n{para}").trim_end_matches('\n'));
    }

    #[test]
    fn a_code_block_longer_than_a_part_is_closed_and_reopened() {
        let code = "let x = 1;\n".repeat(200);
        let text = format!("Intro\n\n```rust\n{code}```\n\nOutro");
        let parts = split_message(&text, 1000);
        assert!(parts.len() >= 3);
        for p in &parts {
            assert!(utf16_len(p) <= 1000, "part too long: {}", utf16_len(p));
            assert_eq!(p.matches("```").count() % 2, 0, "unbalanced part: {p}");
        }
        assert!(parts[1].starts_with("```rust\n"));
    }

    #[test]
    fn a_fence_whose_opening_line_is_longer_than_a_part_stays_within_the_limit() {
        let text = format!("```json {}\nmore\n```", "x".repeat(5000));
        let parts = split_message(&text, MAX_MESSAGE_UTF16);
        assert!(parts.iter().all(|p| utf16_len(p) <= MAX_MESSAGE_UTF16));
        assert!(parts[1].starts_with("```json"));
    }

    #[test]
    fn text_without_any_break_is_cut_hard() {
        let text = "x".repeat(5000);
        let parts = split_message(&text, MAX_MESSAGE_UTF16);
        assert_eq!(parts.iter().map(|p| p.len()).collect::<Vec<_>>(), [4096, 904]);
    }
}
