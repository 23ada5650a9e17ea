//! Exact money: `Usd` wraps a `rust_decimal::Decimal` (never `f64`), is
//! NUMERIC in PostgreSQL and a string in JSON (DESIGN P8).

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::fmt;

/// An amount of US dollars, exact to 28 significant digits. Not rounded:
/// rounding happens only for display ([`Usd::display_cents`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Usd(#[serde(with = "rust_decimal::serde::str")] pub Decimal);

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
    fn parses_and_serializes_as_a_string() {
        let u: Usd = "0.0021240".parse().unwrap();
        assert_eq!(u.to_string(), "0.002124");
        assert_eq!(serde_json::to_string(&u).unwrap(), "\"0.0021240\"");
        let back: Usd = serde_json::from_str("\"4.997876\"").unwrap();
        assert_eq!(back.display_cents(), "5.00");
    }
}
