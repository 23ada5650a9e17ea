//! Telegram Stars top-ups (Bot API, "Payments in Telegram Stars"): `/buy`
//! offers the packs of `STARS_PACKS`; a pack button sends an invoice in
//! `XTR`; the pre-checkout query is answered at once after [`check`]; the
//! successful payment is checked again by the same function and credits the
//! pack's USD of the server-side table through the outbox, keyed by
//! `telegram_payment_charge_id`, so a payment delivered twice credits once.
//! A payment that fails the check credits nothing and is recorded in
//! `payment_anomalies` for finance (refund with `billing-worker refund-stars`).

use rust_decimal::Decimal;
use serde_json::{json, Value};

/// One pack: Stars → USD credit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pack {
    /// Stars paid.
    pub stars: i64,
    /// USD credited.
    pub usd: Decimal,
}

/// Parses `STARS_PACKS` (`100:1.00,500:5.50`).
///
/// # Errors
/// A message naming the bad pack.
pub fn parse_packs(spec: &[String]) -> Result<Vec<Pack>, String> {
    spec.iter()
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (s, u) = p.split_once(':').ok_or_else(|| format!("pack {p:?} is not STARS:USD"))?;
            let stars: i64 = s.trim().parse().map_err(|_| format!("pack {p:?}: Stars must be a whole number"))?;
            let usd: Decimal = u.trim().parse().map_err(|_| format!("pack {p:?}: USD must be a decimal"))?;
            if stars <= 0 || usd <= Decimal::ZERO {
                return Err(format!("pack {p:?} must be positive"));
            }
            Ok(Pack { stars, usd })
        })
        .collect()
}

/// The invoice payload: `stars:v2:<user>:<pack Stars>` (≤ 128 bytes, Bot
/// API "sendInvoice"). The credit is never read from it: it names a pack of
/// the server-side table.
pub fn payload(user_id: i64, pack: Pack) -> String {
    format!("stars:v2:{user_id}:{}", pack.stars)
}

/// Why a payment (or its pre-checkout) is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not a payload of ours.
    Malformed,
    /// The invoice was made for another user.
    OtherPayer,
    /// No pack of the table has these Stars.
    UnknownPack,
    /// A v1 payload whose USD differs from the table's pack.
    PriceMismatch,
    /// Paid in another currency than Telegram Stars (`XTR`).
    WrongCurrency,
    /// `total_amount` differs from the pack's Stars.
    WrongAmount,
}

impl Refusal {
    /// Stable code stored in `payment_anomalies.reason`.
    pub fn code(self) -> &'static str {
        match self {
            Self::Malformed => "malformed_payload",
            Self::OtherPayer => "other_payer",
            Self::UnknownPack => "unknown_pack",
            Self::PriceMismatch => "price_mismatch",
            Self::WrongCurrency => "wrong_currency",
            Self::WrongAmount => "wrong_amount",
        }
    }

    /// The text shown to the user at pre-checkout.
    pub fn message(self) -> &'static str {
        match self {
            Self::Malformed => crate::notices::INVOICE_INVALID,
            Self::OtherPayer => crate::notices::INVOICE_OTHER_PAYER,
            Self::UnknownPack | Self::PriceMismatch => crate::notices::PACK_WITHDRAWN,
            Self::WrongCurrency | Self::WrongAmount => crate::notices::AMOUNT_MISMATCH,
        }
    }
}

/// The one check of a payment, used at pre-checkout and again when the
/// payment arrives: the payload names a pack of `packs` (v2 by its Stars; a
/// v1 payload of an invoice sent before v2 only if its Stars *and* USD match
/// a pack exactly), the payer is the payload's user, the currency is `XTR`
/// and `total` (Stars) equals the pack's Stars. The credit is the pack's USD.
///
/// # Errors
/// The [`Refusal`]: no credit.
pub fn check(payload: &str, payer: i64, currency: &str, total: i64, packs: &[Pack]) -> Result<Pack, Refusal> {
    let parts: Vec<&str> = payload.split(':').collect();
    let (user, stars, usd) = match parts.as_slice() {
        ["stars", "v2", user, stars] => (*user, *stars, None),
        ["stars", "v1", user, stars, usd] => (*user, *stars, Some(*usd)),
        _ => return Err(Refusal::Malformed),
    };
    let user: i64 = user.parse().map_err(|_| Refusal::Malformed)?;
    let stars: i64 = stars.parse().map_err(|_| Refusal::Malformed)?;
    if user != payer {
        return Err(Refusal::OtherPayer);
    }
    let pack = *packs.iter().find(|p| p.stars == stars).ok_or(Refusal::UnknownPack)?;
    if let Some(usd) = usd {
        let usd: Decimal = usd.parse().map_err(|_| Refusal::Malformed)?;
        if usd != pack.usd {
            return Err(Refusal::PriceMismatch);
        }
    }
    if currency != "XTR" {
        return Err(Refusal::WrongCurrency);
    }
    if total != pack.stars {
        return Err(Refusal::WrongAmount);
    }
    Ok(pack)
}

/// The inline keyboard of `/buy`.
pub fn keyboard(packs: &[Pack]) -> Value {
    let rows: Vec<Value> = packs
        .iter()
        .map(|p| json!([{ "text": format!("{} ⭐ → ${}", p.stars, p.usd.normalize()), "callback_data": format!("buy:{}", p.stars) }]))
        .collect();
    json!({ "inline_keyboard": rows })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packs() -> Vec<Pack> {
        parse_packs(&["100:1.00".into(), "500:5.50".into()]).unwrap()
    }

    #[test]
    fn payloads_round_trip_and_are_checked() {
        let p = packs()[1];
        let pl = payload(42, p);
        assert_eq!(pl, "stars:v2:42:500");
        assert_eq!(check(&pl, 42, "XTR", 500, &packs()), Ok(p));
        assert_eq!(check(&pl, 43, "XTR", 500, &packs()), Err(Refusal::OtherPayer));
        assert_eq!(check(&pl, 42, "XTR", 499, &packs()), Err(Refusal::WrongAmount));
        assert_eq!(check(&pl, 42, "USD", 500, &packs()), Err(Refusal::WrongCurrency));
        assert_eq!(check("garbage", 42, "XTR", 500, &packs()), Err(Refusal::Malformed));
        assert_eq!(check("stars:v2:42:700", 42, "XTR", 700, &packs()), Err(Refusal::UnknownPack));
        assert_eq!(check("stars:v3:42:500", 42, "XTR", 500, &packs()), Err(Refusal::Malformed));
    }

    #[test]
    fn the_forged_payload_of_issue_13_credits_nothing() {
        // total_amount 1 for "$1,000,000": no pack has 1 Star.
        let forged = "stars:v1:100000001:1:1000000";
        assert_eq!(check(forged, 100_000_001, "XTR", 1, &packs()), Err(Refusal::UnknownPack));
        // The pack's Stars with a forged price.
        assert_eq!(check("stars:v1:42:500:1000000", 42, "XTR", 500, &packs()), Err(Refusal::PriceMismatch));
    }

    #[test]
    fn a_v1_payload_counts_only_when_its_pack_matches_the_table_exactly() {
        let p = packs()[1];
        assert_eq!(check("stars:v1:42:500:5.5", 42, "XTR", 500, &packs()), Ok(p), "5.5 is 5.50");
        assert_eq!(check("stars:v1:42:500:5.51", 42, "XTR", 500, &packs()), Err(Refusal::PriceMismatch));
        assert_eq!(check("stars:v1:42:500:x", 42, "XTR", 500, &packs()), Err(Refusal::Malformed));
    }

    #[test]
    fn bad_pack_specs_are_rejected() {
        assert!(parse_packs(&["100".into()]).is_err());
        assert!(parse_packs(&["0:1".into()]).is_err());
        assert!(parse_packs(&["10:x".into()]).is_err());
    }
}
