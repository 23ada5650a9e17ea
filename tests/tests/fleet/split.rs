//! The splitter of long answers: parts of at most 4,096 UTF-16 code units,
//! surrogate pairs never torn, code fences closed and reopened per part, and
//! no text lost.

use shared::telegram::{split_message, utf16_len, MAX_MESSAGE_UTF16};

#[test]
fn an_astral_emoji_wall_splits_at_4095_4096_and_2_utf16_units() {
    let text = "a".to_owned() + &"🙂".repeat(4096);
    let parts = split_message(&text, 4096);
    let lens: Vec<usize> = parts.iter().map(|p| utf16_len(p)).collect();
    assert_eq!(lens, [4095, 4096, 2]);
    assert_eq!(parts.concat(), text, "nothing lost, nothing torn");
}

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `lo..hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + usize::try_from(self.next() % (hi - lo) as u64).unwrap_or(0)
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.range(0, items.len())]
    }
}

const WORDS: &[&str] =
    &["error", "Result", "the", "borrow", "checker", "naïve", "東京", "🙂", "🦀", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "a", "x", "Ω", "…"];
const LANGS: &[&str] = &["", "rust", "python", "json", "text"];

/// Markdown-like text: paragraphs, lists, code blocks (some longer than a
/// part, some with one huge line), and long runs without any space.
fn generated_text(rng: &mut Rng) -> String {
    let mut text = String::new();
    for _ in 0..rng.range(1, 30) {
        match rng.range(0, 5) {
            0 => {
                for _ in 0..rng.range(1, 400) {
                    text.push_str(rng.pick(WORDS));
                    text.push(' ');
                }
            }
            1 => {
                text.push_str("```");
                text.push_str(rng.pick(LANGS));
                text.push('\n');
                for _ in 0..rng.range(0, 300) {
                    for _ in 0..rng.range(0, 12) {
                        text.push_str(rng.pick(WORDS));
                        text.push(' ');
                    }
                    text.push('\n');
                }
                if rng.range(0, 4) == 0 {
                    // One line longer than a whole message.
                    text.push_str(&rng.pick(WORDS).repeat(rng.range(1_000, 5_000)));
                    text.push('\n');
                }
                text.push_str("```");
            }
            2 => text.push_str(&rng.pick(WORDS).repeat(rng.range(100, 6_000))),
            3 => {
                for i in 0..rng.range(1, 50) {
                    text.push_str(&format!("{i}. {} {}\n", rng.pick(WORDS), rng.pick(WORDS)));
                }
            }
            _ => text.push_str(&format!("## {}", rng.pick(WORDS))),
        }
        text.push_str(if rng.range(0, 3) == 0 { "\n" } else { "\n\n" });
    }
    text
}

fn is_fence(line: &str) -> bool {
    line.trim_start().starts_with("```")
}

/// The text without fence lines and without newlines: what must survive a
/// split (fences are closed and reopened, newlines at a cut are dropped).
fn content(text: &str) -> String {
    text.lines().filter(|l| !is_fence(l)).collect()
}

fn check_parts(text: &str, limit: usize, case: &str) {
    let parts = split_message(text, limit);
    for (i, part) in parts.iter().enumerate() {
        let units = utf16_len(part);
        assert!(units <= limit, "{case}: part {i} has {units} UTF-16 units, over {limit}");
        assert!(!part.trim().is_empty(), "{case}: part {i} is blank");
        let fences = part.lines().filter(|l| is_fence(l)).count();
        assert_eq!(fences % 2, 0, "{case}: part {i} has unbalanced fences:\n{part}");
        let utf16: Vec<u16> = part.encode_utf16().collect();
        assert!(char::decode_utf16(utf16).all(|c| c.is_ok()), "{case}: part {i} has a lone surrogate");
    }
    let (got, want) = (content(&parts.join("\n")), content(text));
    if let Some(at) = first_difference(&got, &want) {
        panic!(
            "{case}: text was lost or changed at char {at}: got {:?}, want {:?}",
            excerpt(&got, at),
            excerpt(&want, at)
        );
    }
}

/// The char index where `a` and `b` first differ, if they do.
fn first_difference(a: &str, b: &str) -> Option<usize> {
    let mut pairs = a.chars().zip(b.chars()).enumerate();
    match pairs.find(|(_, (x, y))| x != y) {
        Some((i, _)) => Some(i),
        None if a.chars().count() != b.chars().count() => Some(a.chars().count().min(b.chars().count())),
        None => None,
    }
}

/// Up to 40 chars of `s` around char `at`.
fn excerpt(s: &str, at: usize) -> String {
    s.chars().skip(at.saturating_sub(20)).take(40).collect()
}

#[test]
fn generated_texts_split_into_parts_within_the_limit_with_balanced_fences_and_whole_characters() {
    let mut rng = Rng(0x5eed_f1ee_7000_0001);
    for n in 0..200 {
        let text = generated_text(&mut rng);
        check_parts(&text, MAX_MESSAGE_UTF16, &format!("text {n} ({} UTF-16 units)", utf16_len(&text)));
    }
}

#[test]
fn a_code_fence_whose_opening_line_is_longer_than_a_part_is_split_within_the_limit() {
    // A fence line Claude did not break: ```json followed by minified JSON.
    let text = format!("```json{}\n```\nafter", "{\"k\":1}".repeat(700));
    check_parts(&text, MAX_MESSAGE_UTF16, "long fence line");
}

#[test]
fn the_delivery_splitter_gives_4095_4096_and_2_utf16_units_for_the_emoji_wall() {
    // What the worker actually sends: Markdown rendered to text + entities, then split.
    let text = format!("a{}", "🙂".repeat(4096));
    let parts = shared::telegram::split_formatted(&shared::telegram::to_entities(&text), MAX_MESSAGE_UTF16);
    let lens: Vec<usize> = parts.iter().map(|p| utf16_len(&p.text)).collect();
    assert_eq!(lens, [4095, 4096, 2]);
    assert_eq!(parts.iter().map(|p| p.text.as_str()).collect::<String>(), text);
}
