//! `current_time`: the current date and time in an IANA time zone
//! (`Europe/Paris`; default UTC), from the `chrono-tz` database.

use chrono::Utc;
use chrono_tz::Tz;
use serde_json::{json, Value};

/// The time now in `timezone` (or UTC).
///
/// # Errors
/// A message for the model when the zone is not an IANA name.
pub fn now(input: &Value) -> Result<String, String> {
    let zone = input.get("timezone").and_then(Value::as_str).unwrap_or("UTC");
    let tz: Tz =
        zone.parse().map_err(|_| format!("unknown time zone {zone:?}: use an IANA name such as Europe/Paris"))?;
    let t = Utc::now().with_timezone(&tz);
    Ok(json!({
        "timezone": zone,
        "iso8601": t.to_rfc3339(),
        "human": t.format("%A %-d %B %Y, %H:%M:%S %Z").to_string(),
    })
    .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zones_are_checked() {
        assert!(now(&json!({"timezone": "Asia/Tokyo"})).unwrap().contains("+09:00"));
        assert!(now(&json!({})).unwrap().contains("UTC"));
        assert!(now(&json!({"timezone": "Mars/Olympus"})).is_err());
    }
}
