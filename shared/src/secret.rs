//! Secrets (bot token, API key, webhook secret) wrapped so that `Debug` and
//! `Display` print `[redacted]` (DESIGN P12).

use std::fmt;

/// A string that must never appear in logs, errors or metrics.
///
/// Read the value only where it is sent on the wire, with [`Secret::expose`].
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that sends it (a header, a URL).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when no secret was configured.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self::new(s))
    }
}

/// Replaces every occurrence of `secret` in `text` with `[redacted]`.
///
/// Used on error messages of HTTP clients, which may embed request URLs that
/// contain the bot token (`/bot<token>/method`).
pub fn scrub(text: &str, secret: &Secret) -> String {
    if secret.is_empty() {
        return text.to_owned();
    }
    text.replace(secret.expose(), "[redacted]")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let s = Secret::new("123456:ABCDEF");
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(format!("{s}"), "[redacted]");
        assert_eq!(s.expose(), "123456:ABCDEF");
    }

    #[test]
    fn scrub_removes_the_secret_from_urls() {
        let s = Secret::new("123:tok");
        assert_eq!(
            scrub("error sending request for url (http://x/bot123:tok/sendMessage)", &s),
            "error sending request for url (http://x/bot[redacted]/sendMessage)"
        );
    }
}
