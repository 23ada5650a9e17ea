//! `calculator`: arithmetic with functions (sqrt, ln, log10, exp, sin, cos,
//! tan, abs, …) evaluated by the `exmex` crate (MIT/Apache-2.0). Values are
//! `f64`: integers are exact up to 2^53, which covers what a chat asks.
//! No variables: an expression that uses one is rejected.

/// Evaluates `expression`; the result as text (`7006652`, `99.8649…`).
///
/// # Errors
/// A message for the model: syntax errors, unknown names, division by zero,
/// non-finite results.
pub fn evaluate(expression: &str) -> Result<String, String> {
    let expr = expression.trim();
    if expr.is_empty() {
        return Err("the expression is empty".into());
    }
    if expr.len() > 1_000 {
        return Err("the expression is longer than 1,000 characters".into());
    }
    let parsed = exmex::parse::<f64>(expr).map_err(|e| format!("cannot evaluate the expression: {e}"))?;
    use exmex::Express as _;
    if !parsed.var_names().is_empty() {
        return Err(format!(
            "the expression uses unknown names {:?}; only numbers and functions are allowed",
            parsed.var_names()
        ));
    }
    let value = parsed.eval(&[]).map_err(|e| format!("cannot evaluate the expression: {e}"))?;
    if !value.is_finite() {
        return Err("the result is not a finite number: the expression divides by zero or overflows".into());
    }
    Ok(format_number(value))
}

fn format_number(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 9.0e15 {
        format!("{f:.0}")
    } else {
        format!("{f}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_and_functions() {
        assert_eq!(evaluate("1234 * 5678").unwrap(), "7006652");
        assert!(evaluate("sqrt(9973)").unwrap().starts_with("99.86"));
        assert_eq!(evaluate("2 ^ 10").unwrap(), "1024");
    }

    #[test]
    fn division_by_zero_is_an_error() {
        assert!(evaluate("10 / (5 - 5)").unwrap_err().contains("divides by zero"));
        assert!(evaluate("1.0 / 0").unwrap_err().contains("divides by zero"));
    }

    #[test]
    fn variables_and_garbage_are_rejected() {
        assert!(evaluate("a + 5").is_err());
        assert!(evaluate("((").is_err());
        assert!(evaluate("").is_err());
    }
}
