//! Holds on the user's balance (two-phase spending, DESIGN §5.4): before
//! **every** Messages API call and before every round of paid tools, the
//! job's hold is extended to what the job has spent so far plus that step's
//! worst case ([`call_worst_case`], the tools' prices), atomically against
//! the available balance, so neither one long answer nor concurrent chats of
//! one user can spend more than the user has (issue 15). Available balance =
//! ledger balance − active holds. The job's `hold_release` event, relayed
//! after its charges, settles the hold in the billing-worker; a job that
//! fails or is handed back voids it here; the billing-worker sweeps expired ones.
//!
//! The holds themselves belong to the `billing` crate ([`billing::holds`]):
//! this module sizes them and calls its API; `job::admission` decides, per
//! call, what to hold.

use crate::context::WorkerContext;
use rust_decimal::Decimal;
use serde_json::Value;
use shared::pricing::{ModelPrice, PriceTable};
use std::time::Duration;
use uuid::Uuid;

pub use billing::holds::Placement;

/// Tokens added to every input bound for what the Messages API puts into
/// the prompt beyond the request's own bytes: the tool-use system prompt
/// (346 tokens for Claude 4 models with `tool_choice` auto, Anthropic's
/// "Tool use" pricing table) and role markers, with room to spare.
pub const PROMPT_ALLOWANCE_TOKENS: u64 = 1_024;

const PER_MILLION: Decimal = Decimal::from_parts(1_000_000, 0, 0, false, 0);
const PER_THOUSAND: Decimal = Decimal::from_parts(1_000, 0, 0, false, 0);

/// The most one Messages API call of a request can be billed for, in the
/// price classes that bound it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallBound {
    /// Upper bound of the call's input tokens, all classes together
    /// (uncached, cache writes, cache reads): see [`input_token_bound`].
    pub input_tokens: u64,
    /// The request's `max_tokens`: the API never bills more output (thinking included).
    pub max_tokens: u64,
    /// Sum of the `max_uses` of the request's web search tools (0 without).
    pub web_searches: u64,
}

/// An upper bound of the input tokens of `request`: the UTF-8 byte length of
/// the whole request body as JSON, plus [`PROMPT_ALLOWANCE_TOKENS`].
///
/// Why it bounds: every token of Claude's tokenizer stands for at least one
/// byte of text (a byte-level BPE), and the JSON carries every character of
/// the system prompt, the messages and the tool definitions (escaping only
/// lengthens strings), plus keys, quotes and fields (`model`, `stream`) that
/// are no input at all. What the API adds around them (role markers, the
/// tool-use system prompt) is covered by the allowance. No network call is
/// made (`count_tokens` would cost a round trip before every call).
pub fn input_token_bound(request: &Value) -> u64 {
    let bytes = serde_json::to_vec(request).map(|b| b.len()).unwrap_or(usize::MAX);
    u64::try_from(bytes).unwrap_or(u64::MAX).saturating_add(PROMPT_ALLOWANCE_TOKENS)
}

/// The sum of the `max_uses` of the request's web search tools (0 without).
pub fn web_search_limit(request: &Value) -> u64 {
    request
        .get("tools")
        .and_then(Value::as_array)
        .map(|tools| {
            tools
                .iter()
                .filter(|t| t.get("type").and_then(Value::as_str).is_some_and(|k| k.starts_with("web_search")))
                .filter_map(|t| t.get("max_uses").and_then(Value::as_u64))
                .fold(0u64, u64::saturating_add)
        })
        .unwrap_or(0)
}

impl CallBound {
    /// The bound of one call of `request` (its `max_tokens`, 0 when absent).
    pub fn of(request: &Value) -> Self {
        Self {
            input_tokens: input_token_bound(request),
            max_tokens: request.get("max_tokens").and_then(Value::as_u64).unwrap_or(0),
            web_searches: web_search_limit(request),
        }
    }
}

/// The dearest rate an input token can be billed at: the highest of the
/// uncached input, 5-minute and 1-hour cache-write rates (cache reads are
/// cheaper than all of them), USD per million tokens.
pub fn input_rate(row: &ModelPrice) -> Decimal {
    row.input.max(row.cache_write_5m).max(row.cache_write_1h).max(row.cache_read)
}

/// The most a call within `bound` can charge the user, USD, exact: input
/// tokens at [`input_rate`], `max_tokens` at the output rate, web searches
/// at the search price, × the table's markup (as `PriceTable::price_call`
/// prices a charge).
pub fn call_worst_case(prices: &PriceTable, row: &ModelPrice, bound: &CallBound) -> Decimal {
    let tokens = Decimal::from(bound.input_tokens) * input_rate(row) + Decimal::from(bound.max_tokens) * row.output;
    let cost = tokens / PER_MILLION + Decimal::from(bound.web_searches) * row.web_search_per_1k / PER_THOUSAND;
    cost * prices.markup
}

/// The largest `max_tokens` whose call (input and searches as in `bound`)
/// costs the user at most `budget` USD: `None` when even the input does not
/// fit; `Some(u64::MAX)` when output is free.
pub fn affordable_max_tokens(prices: &PriceTable, row: &ModelPrice, bound: &CallBound, budget: Decimal) -> Option<u64> {
    let fixed = call_worst_case(prices, row, &CallBound { max_tokens: 0, ..*bound });
    if budget < fixed {
        return None;
    }
    let per_token = row.output * prices.markup / PER_MILLION;
    if per_token <= Decimal::ZERO {
        return Some(u64::MAX);
    }
    let tokens = ((budget - fixed) / per_token).floor();
    Some(u64::try_from(tokens).unwrap_or(u64::MAX))
}

/// Places job `job_id`'s hold on user `user_id`'s balance at `amount` USD
/// (the job's whole reservation, not an increment): the first call creates
/// it, later calls grow or shrink it, each atomically against the
/// available balance (ledger balance − the user's *other* active holds,
/// under a lock on the user's account row). `placed: false`: the balance
/// does not cover `amount`; the hold is left as it was. Each placement
/// renews the hold's expiry.
///
/// Through [`billing::holds::place`]: the worker's role may not touch the
/// billing tables itself (issue 13, least privilege).
///
/// # Errors
/// Database errors (billing database).
pub async fn place(ctx: &WorkerContext, job_id: Uuid, user_id: i64, amount: Decimal) -> Result<Placement, sqlx::Error> {
    let lifetime =
        Duration::from_secs(ctx.settings.stream_deadline_s * u64::from(2 + ctx.settings.max_continuations) + 600);
    let placement = billing::holds::place(&ctx.billing_db, job_id, user_id, amount, lifetime).await?;
    if !placement.placed {
        tracing::info!(available = %placement.available, hold = %amount, "balance does not cover the hold");
    }
    Ok(placement)
}

/// Voids the job's hold (failure, hand-back); harmless when there is none.
pub async fn void(ctx: &WorkerContext, job_id: Uuid) {
    if let Err(e) = billing::holds::void(&ctx.billing_db, job_id).await {
        // The billing-worker's sweeper voids it when it expires.
        tracing::warn!(error.message = %e, "could not void the hold");
    }
}

/// The user's available balance: ledger balance − active holds.
///
/// # Errors
/// Database errors (billing database).
pub async fn available(ctx: &WorkerContext, user_id: i64) -> Result<Decimal, sqlx::Error> {
    billing::holds::available(&ctx.billing_db, user_id).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use shared::pricing::TokenCounts;
    use std::path::{Path, PathBuf};

    fn table() -> PriceTable {
        PriceTable::load(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/prices.toml"))).unwrap()
    }

    fn sonnet(t: &PriceTable) -> ModelPrice {
        t.row_for("claude-sonnet-4-5", chrono::NaiveDate::from_ymd_opt(2026, 12, 1).unwrap()).unwrap().clone()
    }

    #[test]
    fn the_input_bound_is_the_request_bytes_plus_the_allowance() {
        let request = json!({"model": "m", "max_tokens": 1024, "messages": [{"role": "user", "content": "héllo"}]});
        let bytes = serde_json::to_vec(&request).unwrap().len() as u64;
        assert_eq!(input_token_bound(&request), bytes + PROMPT_ALLOWANCE_TOKENS);
        // Every character is at least one byte: the bound is above the character count.
        let text = "日本語のテキスト".repeat(100);
        assert!(input_token_bound(&json!({ "messages": [{ "content": text }] })) > text.chars().count() as u64);
        let bound = CallBound::of(&json!({"max_tokens": 300, "tools": [
            { "name": "calculator" },
            { "type": "web_search_20250305", "name": "web_search", "max_uses": 5 },
            { "type": "web_search_20250305", "name": "web_search_2", "max_uses": 2 },
        ]}));
        assert_eq!((bound.max_tokens, bound.web_searches), (300, 7));
    }

    #[test]
    fn the_worst_case_prices_input_at_the_dearest_input_rate_output_at_max_tokens_and_every_search() {
        let t = table();
        let row = sonnet(&t);
        assert_eq!(input_rate(&row), Decimal::from(6), "the 1-hour cache write is the dearest");
        let bound = CallBound { input_tokens: 1_000, max_tokens: 1_024, web_searches: 5 };
        // (1,000 × 6 + 1,024 × 15) / 10⁶ + 5 × 10 / 10³ = 0.02136 + 0.05; × 1.5.
        assert_eq!(call_worst_case(&t, &row, &bound), "0.10704".parse::<Decimal>().unwrap());
    }

    #[test]
    fn no_usage_within_the_bound_is_charged_more_than_the_worst_case() {
        let t = table();
        let row = sonnet(&t);
        let bound = CallBound { input_tokens: 10_000, max_tokens: 2_048, web_searches: 3 };
        let worst = call_worst_case(&t, &row, &bound);
        let splits =
            [(10_000, 0, 0, 0), (0, 10_000, 0, 0), (0, 0, 10_000, 0), (0, 0, 0, 10_000), (2_500, 2_500, 2_500, 2_500)];
        for (input, cw5, cw1h, read) in splits {
            let tokens = TokenCounts {
                input,
                output: 2_048,
                cache_write_5m: cw5,
                cache_write_1h: cw1h,
                cache_read: read,
                web_search_requests: 3,
            };
            let charge = t
                .price_call(
                    "claude-sonnet-4-5-20250929",
                    chrono::NaiveDate::from_ymd_opt(2026, 12, 1).unwrap(),
                    &tokens,
                )
                .unwrap();
            assert!(charge.user_charge.0 <= worst, "{tokens:?}: {} > {worst}", charge.user_charge.0);
        }
        let all_1h =
            TokenCounts { cache_write_1h: 10_000, output: 2_048, web_search_requests: 3, ..Default::default() };
        let charge =
            t.price_call("claude-sonnet-4-5", chrono::NaiveDate::from_ymd_opt(2026, 12, 1).unwrap(), &all_1h).unwrap();
        assert_eq!(charge.user_charge.0, worst, "the worst case is reached");
    }

    #[test]
    fn a_small_budget_lowers_max_tokens_to_what_it_covers() {
        let t = table();
        let row = sonnet(&t);
        let bound = CallBound { input_tokens: 1_000, max_tokens: 1_024, web_searches: 0 };
        let budget: Decimal = "0.05".parse().unwrap();
        // Input: 1,000 × 6 / 10⁶ × 1.5 = 0.009; each output token 15 / 10⁶ × 1.5 = 0.0000225;
        // (0.05 − 0.009) / 0.0000225 = 1,822.2.
        let n = affordable_max_tokens(&t, &row, &bound, budget).unwrap();
        assert_eq!(n, 1_822);
        assert!(call_worst_case(&t, &row, &CallBound { max_tokens: n, ..bound }) <= budget);
        assert!(call_worst_case(&t, &row, &CallBound { max_tokens: n + 1, ..bound }) > budget);
        assert_eq!(affordable_max_tokens(&t, &row, &bound, "0.009".parse().unwrap()), Some(0));
        assert_eq!(affordable_max_tokens(&t, &row, &bound, "0.0089".parse().unwrap()), None, "not even the input");
        assert_eq!(affordable_max_tokens(&t, &row, &bound, Decimal::ZERO - Decimal::ONE), None);
        let mut free = t.clone();
        free.markup = Decimal::ZERO;
        assert_eq!(affordable_max_tokens(&free, &row, &bound, Decimal::ZERO), Some(u64::MAX));
    }

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// Issue 14: the billing database has one owner, the `billing` crate.
    /// The needles are split so this file does not find itself.
    #[test]
    fn no_worker_source_runs_sql_on_the_billing_database() {
        let query = concat!("sqlx", "::query");
        let pool = concat!("billing", "_db");
        let billing_sql = [
            concat!("fleet_", "place_hold"),
            concat!("fleet_", "void_hold"),
            concat!("fleet_", "available_balance"),
            concat!("fleet_", "user_entries"),
            concat!("ledger", "_entries"),
            concat!("applied", "_events"),
            concat!("billing", "_failures"),
            concat!("FROM ", "holds"),
            concat!("UPDATE ", "holds"),
            concat!("INTO ", "holds"),
        ];
        let mut files = Vec::new();
        rust_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut files);
        assert!(files.len() > 20, "scanned {} files", files.len());
        let mut found = Vec::new();
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            let lines: Vec<&str> = text.lines().collect();
            for (i, line) in lines.iter().enumerate() {
                let at = format!("{}:{}", file.display(), i + 1);
                if let Some(name) = billing_sql.iter().find(|n| line.contains(*n)) {
                    found.push(format!("{at}: {name}"));
                }
                if line.contains(pool) {
                    let near = &lines[i.saturating_sub(5)..(i + 6).min(lines.len())];
                    if near.iter().any(|l| l.contains(query)) {
                        found.push(format!("{at}: a query near the billing pool"));
                    }
                }
            }
        }
        assert!(found.is_empty(), "billing-database SQL in the worker (call the billing crate):\n{}", found.join("\n"));
    }
}
