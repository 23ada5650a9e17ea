//! Exact money: `Usd` wraps a `rust_decimal::Decimal` (never `f64`), is
//! NUMERIC in PostgreSQL and a string in JSON (DESIGN P8).

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::fmt;

/// An amount of US dollars, exact to 28 significant digits. Not rounded:
/// rounding happens only for display ([`Usd::display_cents`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Usd(
    #[serde(serialize_with = "rust_decimal::serde::str::serialize", deserialize_with = "exact")] pub Decimal,
);

/// A JSON string holding a decimal that `Decimal` represents exactly: more
/// than 28 significant digits is an error, never silently rounded.
fn exact<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Decimal, D::Error> {
    let s = String::deserialize(d)?;
    Decimal::from_str_exact(s.trim()).map_err(|e| serde::de::Error::custom(format!("amount {s:?}: {e}")))
}

impl Usd {
    /// Zero dollars.
    pub const ZERO: Usd = Usd(Decimal::ZERO);

    /// The amount with trailing zeros removed (`0.0021240` → `0.002124`).
    pub fn normalized(self) -> Usd {
        Usd(self.0.normalize())
    }

    /// For users: rounded half-even to cents, e.g. `4.99`.
    pub fn display_cents(self) -> String {
        format!("{:.2}", self.0.round_dp(2))
    }
}

/// The one way money is written for people and files: at least two
/// decimals, otherwise exact — never rounded (`5.5` → `5.50`, `0.0024075`
/// → `0.0024075`, `-1` → `-1.00`, `3.1000` → `3.10`). For CSV cells and
/// JSON strings; [`format_usd`] adds the dollar sign.
pub fn format_amount(amount: Decimal) -> String {
    let mut n = amount.normalize();
    if n.is_zero() {
        // No "-0.00".
        n = Decimal::ZERO;
    }
    if n.scale() < 2 {
        n.rescale(2);
    }
    n.to_string()
}

/// [`format_amount`] with a dollar sign: `$5.50`, `$0.0024075`, `-$1.00`.
pub fn format_usd(amount: Decimal) -> String {
    let text = format_amount(amount);
    match text.strip_prefix('-') {
        Some(abs) => format!("-${abs}"),
        None => format!("${text}"),
    }
}

impl fmt::Display for Usd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.normalize())
    }
}

impl std::str::FromStr for Usd {
    type Err = rust_decimal::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Usd(s.trim().parse::<Decimal>()?))
    }
}

impl std::ops::Add for Usd {
    type Output = Usd;
    fn add(self, rhs: Usd) -> Usd {
        Usd(self.0 + rhs.0)
    }
}

impl std::ops::Sub for Usd {
    type Output = Usd;
    fn sub(self, rhs: Usd) -> Usd {
        Usd(self.0 - rhs.0)
    }
}

impl std::iter::Sum for Usd {
    fn sum<I: Iterator<Item = Usd>>(iter: I) -> Usd {
        iter.fold(Usd::ZERO, |a, b| a + b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_is_written_with_two_decimals_at_least_and_never_rounded() {
        let cases = [
            ("5.5", "$5.50"),
            ("5", "$5.00"),
            ("0.0024075", "$0.0024075"),
            ("3.1000", "$3.10"),
            ("0", "$0.00"),
            ("-0.000", "$0.00"),
            ("-1", "-$1.00"),
            ("-0.0015", "-$0.0015"),
            ("1234567.891", "$1234567.891"),
        ];
        for (amount, text) in cases {
            let d: Decimal = amount.parse().unwrap();
            assert_eq!(format_usd(d), text, "{amount}");
            assert_eq!(format_amount(d), text.replace('$', ""), "{amount}");
        }
    }

    #[test]
    fn parses_and_serializes_as_a_string() {
        let u: Usd = "0.0021240".parse().unwrap();
        assert_eq!(u.to_string(), "0.002124");
        assert_eq!(serde_json::to_string(&u).unwrap(), "\"0.0021240\"");
        let back: Usd = serde_json::from_str("\"4.997876\"").unwrap();
        assert_eq!(back.display_cents(), "5.00");
    }

    #[test]
    fn nan_infinite_scientific_and_non_string_amounts_are_rejected() {
        for json in
            [r#""NaN""#, r#""nan""#, r#""inf""#, r#""-Infinity""#, r#""""#, r#""1,5""#, "1.5", "null", r#""0x10""#]
        {
            assert!(serde_json::from_str::<Usd>(json).is_err(), "{json} was accepted");
        }
    }

    #[test]
    fn amounts_beyond_the_decimal_range_are_rejected_not_wrapped() {
        // 2^96, one past Decimal::MAX, and far beyond.
        for json in
            [r#""79228162514264337593543950336""#, r#""1e40""#, r#""100000000000000000000000000000000000000000""#]
        {
            assert!(serde_json::from_str::<Usd>(json).is_err(), "{json} was accepted");
        }
        let max: Usd = serde_json::from_str(r#""79228162514264337593543950335""#).unwrap();
        assert_eq!(max.0, Decimal::MAX);
    }

    #[test]
    fn negative_amounts_parse_and_keep_their_sign() {
        let u: Usd = serde_json::from_str(r#""-0.002""#).unwrap();
        assert!(u.0.is_sign_negative());
    }

    #[test]
    fn amounts_more_precise_than_28_digits_are_not_silently_zeroed() {
        // 29 decimal places: either an error or kept exactly — never rounded to zero.
        match serde_json::from_str::<Usd>(r#""0.00000000000000000000000000001""#) {
            Err(_) => {}
            Ok(u) => assert!(!u.0.is_zero(), "29 decimal places were rounded to {u}"),
        }
    }
}
