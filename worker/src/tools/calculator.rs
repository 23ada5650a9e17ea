//! `calculator`: arithmetic with functions (sqrt, ln, sin, …) evaluated by
//! the `evalexpr` crate, read-only (no variables, no assignment).

use evalexpr::{eval_with_context, DefaultNumericTypes, HashMapContext, Value};
use std::sync::LazyLock;

static BARE_FUNCTION: LazyLock<Option<regex::Regex>> = LazyLock::new(|| {
    regex::Regex::new(r"\b(sqrt|cbrt|ln|log2|log10|exp|sin|cos|tan|asin|acos|atan|sinh|cosh|tanh|abs|hypot)\s*\(").ok()
});

/// Evaluates `expression`; the result as text (`7006652`, `99.8649…`).
///
/// # Errors
/// A message for the model: syntax errors, division by zero, non-finite results.
pub fn evaluate(expression: &str) -> Result<String, String> {
    if expression.trim().is_empty() {
        return Err("the expression is empty".into());
    }
    if expression.len() > 1_000 {
        return Err("the expression is longer than 1,000 characters".into());
    }
    // Functions under the names people write (`sqrt(2)`) map to evalexpr's
    // `math::` namespace.
    let normalized = match BARE_FUNCTION.as_ref() {
        Some(re) => re.replace_all(expression, "math::$1(").into_owned(),
        None => expression.to_owned(),
    };
    let context = HashMapContext::<DefaultNumericTypes>::new();
    match eval_with_context(&normalized, &context) {
        Ok(Value::Int(i)) => Ok(i.to_string()),
        Ok(Value::Float(f)) if f.is_finite() => Ok(format_float(f)),
        Ok(Value::Float(_)) => {
            Err("the result is not a finite number: the expression divides by zero or overflows".into())
        }
        Ok(Value::Boolean(b)) => Ok(b.to_string()),
        Ok(other) => Err(format!("the expression does not evaluate to a number: {other}")),
        Err(evalexpr::EvalexprError::DivisionError { .. }) => {
            Err("division by zero: the expression divides by zero".into())
        }
        Err(e) => Err(format!("cannot evaluate the expression: {e}")),
    }
}

fn format_float(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 1e15 {
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
    fn assignments_and_garbage_are_rejected() {
        assert!(evaluate("a = 5").is_err());
        assert!(evaluate("((").is_err());
        assert!(evaluate("").is_err());
    }
}
