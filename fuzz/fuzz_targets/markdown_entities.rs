//! Markdown → text + entities → parts of at most `limit` UTF-16 units:
//! every entity lies inside its text, offsets in UTF-16 code units, and no
//! part is longer than the limit. Never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shared::telegram::{split_formatted, to_entities, utf16_len};

fuzz_target!(|data: &[u8]| {
    let Some((&l, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let f = to_entities(text);
    let units = utf16_len(&f.text);
    for e in &f.entities {
        assert!(e.offset + e.length <= units, "entity {e:?} outside {units} units");
    }
    let limit = usize::from(l).max(16);
    for part in split_formatted(&f, limit) {
        let n = utf16_len(&part.text);
        assert!(n <= limit, "part of {n} units over the limit {limit}");
        for e in &part.entities {
            assert!(e.offset + e.length <= n, "entity {e:?} outside its part of {n} units");
        }
    }
});
