//! Pricing any token counts with the fixture price table: never a panic,
//! never a negative amount, the user charge at least the provider cost.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shared::pricing::{PriceTable, TokenCounts};

const PRICES: &str = include_str!("../../config/prices.toml");

fuzz_target!(|data: &[u8]| {
    let Ok(table) = PriceTable::parse(PRICES) else { return };
    let mut n = [0u64; 6];
    for (i, chunk) in data.chunks(8).take(6).enumerate() {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        // Any u64 a usage report could carry.
        n[i] = u64::from_le_bytes(b);
    }
    let t = TokenCounts {
        input: n[0],
        output: n[1],
        cache_write_5m: n[2],
        cache_write_1h: n[3],
        cache_read: n[4],
        web_search_requests: n[5],
    };
    let model = if data.first().is_some_and(|b| b % 2 == 0) { "claude-sonnet-4-5-20250929" } else { "claude-haiku-4-5" };
    let on = chrono::NaiveDate::from_ymd_opt(2026, 11, 30).expect("a valid date");
    if let Ok(p) = table.price_call(model, on, &t) {
        assert!(!p.provider_cost.0.is_sign_negative() && !p.user_charge.0.is_sign_negative());
        assert!(p.user_charge.0 >= p.provider_cost.0, "the markup is at least 1");
    }
});
