//! The price table and the cost of one Messages API call (DESIGN §6).
//!
//! The table is a TOML file in the format of `fixtures/prices.toml`: token
//! rates in USD per million tokens, web searches in USD per 1,000, a markup
//! applied to provider cost, and flat prices for our own tools. Source of the
//! rates: Anthropic's public pricing page; of the token classes: the Messages
//! API `usage` object (docs: "Messages" → "usage").

use crate::money::Usd;
use chrono::NaiveDate;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Errors loading or applying a price table.
#[derive(Debug, thiserror::Error)]
pub enum PricingError {
    /// The file could not be read.
    #[error("cannot read price file {path}: {source}")]
    Read {
        /// The path that was read.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a valid price table.
    #[error("invalid price file: {0}")]
    Parse(#[from] toml::de::Error),
    /// The table's markup or a rate is negative, or the currency is not USD.
    #[error("invalid price table: {0}")]
    Invalid(String),
    /// No row matches the model at that date.
    #[error("no price row for model {model} effective on {on}")]
    UnknownModel {
        /// Model id as reported by the API.
        model: String,
        /// Date the call was made.
        on: NaiveDate,
    },
}

/// One row of the `[[models]]` array: the rates of a model family from a date.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct ModelPrice {
    /// Prefix of the model id the API reports (`claude-sonnet-4-5`).
    #[serde(rename = "match")]
    pub model_prefix: String,
    /// First day (UTC) these rates apply.
    pub effective_from: NaiveDate,
    /// USD per million uncached input tokens.
    pub input: Decimal,
    /// USD per million output tokens (thinking included, as Anthropic bills it).
    pub output: Decimal,
    /// USD per million 5-minute cache-write tokens.
    pub cache_write_5m: Decimal,
    /// USD per million 1-hour cache-write tokens.
    pub cache_write_1h: Decimal,
    /// USD per million cache-read tokens.
    pub cache_read: Decimal,
    /// USD per million thinking tokens, for providers that bill them apart.
    #[serde(default)]
    pub thinking: Option<Decimal>,
    /// USD per 1,000 web searches.
    #[serde(default)]
    pub web_search_per_1k: Decimal,
}

/// The whole price table.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct PriceTable {
    /// Must be `USD`.
    pub currency: String,
    /// User price = provider cost × markup.
    pub markup: Decimal,
    /// Model rows; several rows of one prefix are told apart by date.
    pub models: Vec<ModelPrice>,
    /// USD per successful call of each of our own tools (not marked up).
    #[serde(default)]
    pub tools: BTreeMap<String, Decimal>,
}

/// Tokens of one call by price class, from the call's final usage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCounts {
    /// Uncached input tokens.
    pub input: u64,
    /// Output tokens (thinking included).
    pub output: u64,
    /// Tokens written to the 5-minute cache.
    pub cache_write_5m: u64,
    /// Tokens written to the 1-hour cache.
    pub cache_write_1h: u64,
    /// Tokens read from the cache.
    pub cache_read: u64,
    /// Server-side web searches.
    pub web_search_requests: u64,
}

/// What a call cost and which row priced it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Priced {
    /// What Anthropic bills us, exact.
    pub provider_cost: Usd,
    /// What the user is charged: provider cost × markup.
    pub user_charge: Usd,
    /// `match` of the row used.
    pub price_model: String,
    /// `effective_from` of the row used.
    pub price_effective_from: NaiveDate,
}

const PER_MILLION: Decimal = Decimal::from_parts(1_000_000, 0, 0, false, 0);
const PER_THOUSAND: Decimal = Decimal::from_parts(1_000, 0, 0, false, 0);

impl PriceTable {
    /// Reads and validates a price file.
    ///
    /// # Errors
    /// [`PricingError::Read`], [`PricingError::Parse`] or [`PricingError::Invalid`].
    pub fn load(path: &Path) -> Result<Self, PricingError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| PricingError::Read { path: path.display().to_string(), source })?;
        Self::parse(&text)
    }

    /// Parses and validates a price table from TOML text.
    ///
    /// # Errors
    /// [`PricingError::Parse`] or [`PricingError::Invalid`].
    pub fn parse(text: &str) -> Result<Self, PricingError> {
        let table: PriceTable = toml::from_str(text)?;
        if table.currency != "USD" {
            return Err(PricingError::Invalid(format!("currency must be USD, not {}", table.currency)));
        }
        if table.markup.is_sign_negative() {
            return Err(PricingError::Invalid("markup is negative".into()));
        }
        for m in &table.models {
            let rates = [m.input, m.output, m.cache_write_5m, m.cache_write_1h, m.cache_read, m.web_search_per_1k];
            if rates.iter().any(|r| r.is_sign_negative()) {
                return Err(PricingError::Invalid(format!("negative rate for {}", m.model_prefix)));
            }
        }
        if let Some((name, _)) = table.tools.iter().find(|(_, p)| p.is_sign_negative()) {
            return Err(PricingError::Invalid(format!("negative price for tool {name}")));
        }
        Ok(table)
    }

    /// The row for `model` on `on`: the longest matching prefix, then the
    /// latest `effective_from` not after `on`.
    pub fn row_for(&self, model: &str, on: NaiveDate) -> Option<&ModelPrice> {
        self.models
            .iter()
            .filter(|m| model.starts_with(&m.model_prefix) && m.effective_from <= on)
            .max_by_key(|m| (m.model_prefix.len(), m.effective_from))
    }

    /// Cost of one call: Σ tokens × rate / 1,000,000 over the classes, plus
    /// web searches × rate / 1,000; user charge = cost × markup. Exact.
    ///
    /// # Errors
    /// [`PricingError::UnknownModel`] when no row matches.
    pub fn price_call(&self, model: &str, on: NaiveDate, t: &TokenCounts) -> Result<Priced, PricingError> {
        let row = self.row_for(model, on).ok_or_else(|| PricingError::UnknownModel { model: model.to_owned(), on })?;
        let tokens = Decimal::from(t.input) * row.input
            + Decimal::from(t.output) * row.output
            + Decimal::from(t.cache_write_5m) * row.cache_write_5m
            + Decimal::from(t.cache_write_1h) * row.cache_write_1h
            + Decimal::from(t.cache_read) * row.cache_read;
        let cost = tokens / PER_MILLION + Decimal::from(t.web_search_requests) * row.web_search_per_1k / PER_THOUSAND;
        Ok(Priced {
            provider_cost: Usd(cost.normalize()),
            user_charge: Usd((cost * self.markup).normalize()),
            price_model: row.model_prefix.clone(),
            price_effective_from: row.effective_from,
        })
    }

    /// Price of one successful call of our own tool `name` (zero if unlisted).
    pub fn tool_price(&self, name: &str) -> Usd {
        Usd(self.tools.get(name).copied().unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_table() -> PriceTable {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/prices.toml");
        PriceTable::load(Path::new(path)).unwrap()
    }

    fn day() -> NaiveDate {
        NaiveDate::from_ymd_opt(2026, 11, 29).unwrap()
    }

    #[test]
    fn one_hour_cache_write_is_priced_at_twice_input() {
        // cache_write_1h.sse: 35 input, 2100 1-hour writes, 80 output.
        let t = TokenCounts { input: 35, cache_write_1h: 2100, output: 80, ..Default::default() };
        let p = fixture_table().price_call("claude-sonnet-4-5-20250929", day(), &t).unwrap();
        assert_eq!(p.provider_cost.to_string(), "0.013905");
        assert_eq!(p.user_charge.to_string(), "0.0208575");
    }

    #[test]
    fn web_searches_are_ten_dollars_per_thousand() {
        let t = TokenCounts { web_search_requests: 1, ..Default::default() };
        let p = fixture_table().price_call("claude-haiku-4-5", day(), &t).unwrap();
        assert_eq!(p.provider_cost.to_string(), "0.01");
    }

    #[test]
    fn an_unknown_model_is_an_error_not_free() {
        let err = fixture_table().price_call("gpt-4", day(), &TokenCounts::default());
        assert!(matches!(err, Err(PricingError::UnknownModel { .. })));
    }

    #[test]
    fn rows_are_chosen_by_date() {
        let mut t = fixture_table();
        let mut newer = t.models[0].clone();
        newer.effective_from = NaiveDate::from_ymd_opt(2027, 1, 1).unwrap();
        newer.input = Decimal::from(100);
        t.models.push(newer);
        let counts = TokenCounts { input: 1_000_000, ..Default::default() };
        let now = t.price_call("claude-sonnet-4-5", day(), &counts).unwrap();
        assert_eq!(now.provider_cost.to_string(), "3");
        let later = t.price_call("claude-sonnet-4-5", NaiveDate::from_ymd_opt(2027, 2, 1).unwrap(), &counts).unwrap();
        assert_eq!(later.provider_cost.to_string(), "100");
    }

    #[test]
    fn a_negative_markup_is_rejected() {
        let text = "currency = \"USD\"\nmarkup = \"-1\"\nmodels = []\n";
        assert!(matches!(PriceTable::parse(text), Err(PricingError::Invalid(_))));
    }
}
