//! Telegram Stars top-ups (Bot API, "Payments in Telegram Stars"): `/buy`
//! offers the packs of `STARS_PACKS`; a pack button sends an invoice in
//! `XTR`; the pre-checkout query is answered at once after checking the
//! payload; the successful payment credits the ledger through the outbox,
//! keyed by `telegram_payment_charge_id`, so a payment delivered twice
//! credits once.

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

/// The invoice payload: `stars:v1:<user>:<stars>:<usd>` (≤ 128 bytes).
pub fn payload(user_id: i64, pack: Pack) -> String {
    format!("stars:v1:{user_id}:{}:{}", pack.stars, pack.usd.normalize())
}

/// Checks a payload against the payer, the amount and the current packs.
///
/// # Errors
/// Why the payment must be refused (shown to the user).
pub fn check(payload: &str, payer: i64, currency: &str, total: i64, packs: &[Pack]) -> Result<Pack, String> {
    let parts: Vec<&str> = payload.split(':').collect();
    let [kind, version, user, stars, usd] = parts.as_slice() else {
        return Err("This invoice is not valid any more.".into());
    };
    let pack = Pack { stars: stars.parse().unwrap_or(-1), usd: usd.parse().unwrap_or(Decimal::NEGATIVE_ONE) };
    if *kind != "stars" || *version != "v1" || user.parse::<i64>().ok() != Some(payer) {
        return Err("This invoice was made for someone else.".into());
    }
    if currency != "XTR" || total != pack.stars {
        return Err("The amount does not match the invoice.".into());
    }
    if !packs.contains(&pack) {
        return Err("This pack is no longer offered; send /buy again.".into());
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
        assert_eq!(check(&pl, 42, "XTR", 500, &packs()), Ok(p));
        assert!(check(&pl, 43, "XTR", 500, &packs()).is_err(), "another payer");
        assert!(check(&pl, 42, "XTR", 499, &packs()).is_err(), "another amount");
        assert!(check(&pl, 42, "USD", 500, &packs()).is_err(), "another currency");
        assert!(check("garbage", 42, "XTR", 500, &packs()).is_err());
        assert!(
            check(&payload(42, Pack { stars: 500, usd: "9".parse().unwrap() }), 42, "XTR", 500, &packs()).is_err(),
            "changed price"
        );
    }

    #[test]
    fn bad_pack_specs_are_rejected() {
        assert!(parse_packs(&["100".into()]).is_err());
        assert!(parse_packs(&["0:1".into()]).is_err());
        assert!(parse_packs(&["10:x".into()]).is_err());
    }
}
