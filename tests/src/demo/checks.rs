//! Evaluation of every expectation field of the scenario format (fixtures
//! README). A field this runner does not know is a failed check, never
//! skipped.

use super::{calls_to_chat, Check, StepRecord};
use crate::fake_anthropic::RecordedCall;
use crate::fake_telegram::TgCall;
use regex::Regex;
use rust_decimal::Decimal;
use serde_json::Value;
use sqlx::PgPool;
use std::time::Duration;

fn push(out: &mut Vec<Check>, step: usize, check: &str, passed: bool, detail: impl Into<String>) {
    out.push(Check { step, check: check.to_owned(), passed, detail: detail.into() });
}

fn strings(v: &toml::Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

fn decimal(v: &toml::Value) -> Option<Decimal> {
    match v {
        toml::Value::String(s) => s.parse().ok(),
        toml::Value::Integer(i) => Some(Decimal::from(*i)),
        _ => None,
    }
}

fn sum(rec: &StepRecord, kinds: &[&str]) -> Decimal {
    rec.entries.iter().filter(|(k, _)| kinds.contains(&k.as_str())).map(|(_, a)| *a).sum()
}

/// UTF-16 slice of `text`.
fn utf16_slice(text: &str, offset: usize, length: usize) -> Option<String> {
    let units: Vec<u16> = text.encode_utf16().collect();
    units.get(offset..offset + length).map(String::from_utf16_lossy)
}

/// True when the parts, joined, equal `answer` with any whitespace allowed
/// at the part boundaries.
pub fn concat_equals(parts: &[String], answer: &str) -> bool {
    let mut rest = answer.trim_start();
    for p in parts {
        let p = p.trim();
        match rest.strip_prefix(p) {
            Some(r) => rest = r.trim_start(),
            None => return false,
        }
    }
    rest.trim().is_empty()
}

/// Checks of one step.
pub fn step_checks(
    rec: &StepRecord,
    all: &[StepRecord],
    anthropic: &[RecordedCall],
    telegram: &[TgCall],
    out: &mut Vec<Check>,
) {
    let n = rec.number;
    for (i, s) in rec.post_statuses.iter().enumerate() {
        if *s != 200 {
            push(out, n, "webhook", false, format!("post {} answered {s}", i + 1));
        }
    }
    let replies: Vec<String> = rec.replies.iter().map(|m| m.text.clone()).collect();
    let reply = replies.join("\n");
    let my_anthropic = &anthropic[rec.anthropic_calls.clone().min_max(anthropic.len())];
    let my_telegram = &telegram[rec.telegram_calls.clone().min_max(telegram.len())];
    for (key, value) in &rec.step.expect {
        let k = key.as_str();
        match k {
            "reply_contains" => {
                for s in strings(value) {
                    push(out, n, k, reply.contains(&s), format!("{s:?}"));
                }
            }
            "reply_not_contains" => {
                for s in strings(value) {
                    push(out, n, k, !reply.contains(&s), format!("{s:?}"));
                }
            }
            "reply_matches" => {
                for s in strings(value) {
                    match Regex::new(&s) {
                        Ok(re) => push(out, n, k, re.is_match(&reply), format!("/{s}/")),
                        Err(e) => push(out, n, k, false, format!("bad regex {s:?}: {e}")),
                    }
                }
            }
            "no_reply" => {
                let want = value.as_bool().unwrap_or(false);
                let sent = rec.chat_id.map_or(0, |c| {
                    calls_to_chat(my_telegram, c)
                        .filter(|c| c.method.eq_ignore_ascii_case("sendMessage") && c.status == 200)
                        .count()
                });
                let none = replies.is_empty() && sent == 0;
                push(out, n, k, none == want, format!("{} replies, {sent} sendMessage calls", replies.len()));
            }
            "reply_parts" => {
                let want = value.as_integer().unwrap_or(-1);
                push(out, n, k, replies.len() as i64 == want, format!("{} parts", replies.len()));
            }
            "reply_parts_min" => {
                let want = value.as_integer().unwrap_or(i64::MAX);
                push(out, n, k, replies.len() as i64 >= want, format!("{} parts", replies.len()));
            }
            "reply_text_equals" => {
                // The exact visible text, written by hand in the scenario
                // (never computed by the product's own converter).
                let want = value.as_str().unwrap_or_default();
                push(
                    out,
                    n,
                    k,
                    !replies.is_empty() && concat_equals(&replies, want),
                    if concat_equals(&replies, want) { "exact text".to_owned() } else { format!("got {reply:?}") },
                );
            }
            "reply_concat_equals_answer" => {
                // The product sends Claude's Markdown as text + entities, so
                // the user sees the answer rendered: the parts are compared
                // with the streamed text as is, and with it rendered by the
                // Markdown → entities converter (shared::telegram::markdown).
                let raw = concat_equals(&replies, &rec.streamed_answer);
                let rendered =
                    raw || concat_equals(&replies, &shared::telegram::to_entities(&rec.streamed_answer).text);
                let how = if raw {
                    "as streamed"
                } else if rendered {
                    "as rendered from Markdown"
                } else {
                    "no match"
                };
                push(
                    out,
                    n,
                    k,
                    rendered == value.as_bool().unwrap_or(true),
                    format!("{} parts vs {} chars streamed: {how}", replies.len(), rec.streamed_answer.chars().count()),
                );
            }
            "balanced_code_fences" => {
                let bad: Vec<usize> = replies
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.matches("```").count() % 2 != 0)
                    .map(|(i, _)| i + 1)
                    .collect();
                push(
                    out,
                    n,
                    k,
                    bad.is_empty() == value.as_bool().unwrap_or(true),
                    if bad.is_empty() { "all parts balanced".to_owned() } else { format!("unbalanced parts {bad:?}") },
                );
            }
            "bot_calls_carry" => {
                // Every call of the step that sends into a chat (`send*`:
                // the methods that take `message_thread_id`) carries each
                // listed parameter with the listed value.
                let sends: Vec<_> = my_telegram.iter().filter(|c| c.method.starts_with("send")).collect();
                for (param, want) in value.as_table().into_iter().flatten() {
                    let want = toml_to_json(want);
                    let missing: Vec<String> = sends
                        .iter()
                        .filter(|c| c.params.get(param.as_str()).map(param_value) != Some(want.clone()))
                        .map(|c| {
                            format!("{} ({})", c.method, c.params.get(param.as_str()).cloned().unwrap_or_default())
                        })
                        .collect();
                    push(
                        out,
                        n,
                        k,
                        !sends.is_empty() && missing.is_empty(),
                        if sends.is_empty() {
                            "no send call".to_owned()
                        } else if missing.is_empty() {
                            format!("{} send calls carry {param} = {want}", sends.len())
                        } else {
                            format!("{param} = {want} missing in {missing:?}")
                        },
                    );
                }
            }
            "no_parse_mode" => {
                let used =
                    my_telegram.iter().filter(|c| c.params.get("parse_mode").is_some_and(|p| !p.is_null())).count();
                push(
                    out,
                    n,
                    k,
                    (used == 0) == value.as_bool().unwrap_or(true),
                    format!("{used} calls used parse_mode"),
                );
            }
            "entities" => {
                for e in value.as_array().into_iter().flatten() {
                    let kind = e.get("type").and_then(|v| v.as_str()).unwrap_or_default();
                    let text = e.get("text").and_then(|v| v.as_str()).unwrap_or_default();
                    // Other fields (`language`, `url`, …) must match the entity's.
                    let extra: Vec<(&String, &toml::Value)> =
                        e.as_table().into_iter().flatten().filter(|(k, _)| *k != "type" && *k != "text").collect();
                    let found = rec.replies.iter().any(|m| {
                        m.entities.as_array().into_iter().flatten().any(|ent| {
                            ent.get("type").and_then(Value::as_str) == Some(kind)
                                && utf16_slice(
                                    &m.text,
                                    ent.get("offset").and_then(Value::as_u64).unwrap_or(0) as usize,
                                    ent.get("length").and_then(Value::as_u64).unwrap_or(0) as usize,
                                )
                                .as_deref()
                                    == Some(text)
                                && extra.iter().all(|(k, v)| ent.get(k.as_str()).and_then(Value::as_str) == v.as_str())
                        })
                    });
                    let extras: Vec<String> = extra.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    push(out, n, k, found, format!("{kind} over {text:?} {}", extras.join(" ")));
                }
            }
            "api_calls" => {
                let want = value.as_integer().unwrap_or(-1);
                push(out, n, k, my_anthropic.len() as i64 == want, format!("{} calls", my_anthropic.len()));
            }
            "request_contains" | "request_not_contains" => {
                for item in value.as_array().into_iter().flatten() {
                    let call = item.get("call").and_then(toml::Value::as_integer).unwrap_or(1);
                    let body =
                        usize::try_from(call - 1).ok().and_then(|i| my_anthropic.get(i)).map(|c| c.body.to_string());
                    for s in item.get("contains").map(strings).unwrap_or_default() {
                        let ok = match &body {
                            None => false,
                            Some(b) => b.contains(&s) == (k == "request_contains"),
                        };
                        push(
                            out,
                            n,
                            k,
                            ok,
                            format!("call {call}: {s:?}{}", if body.is_none() { " (no such call)" } else { "" }),
                        );
                    }
                }
            }
            "provider_cost_usd" => {
                let got = sum(rec, &["provider_cost"]);
                let want = decimal(value);
                push(out, n, k, want == Some(got), format!("expected {} got {}", value, got.normalize()));
            }
            "user_charge_usd" => {
                let got = sum(rec, &["usage_charge", "tool_charge"]);
                let want = decimal(value);
                push(out, n, k, want == Some(got), format!("expected {} got {}", value, got.normalize()));
            }
            "quiet_after_429_s" => {
                let secs = value.as_integer().or_else(|| value.as_float().map(|f| f as i64)).unwrap_or(0);
                let quiet = Duration::from_secs(u64::try_from(secs).unwrap_or(0));
                let chat = rec.chat_id.unwrap_or_default();
                let to_chat: Vec<&TgCall> = calls_to_chat(my_telegram, chat).collect();
                let limited: Vec<usize> =
                    to_chat.iter().enumerate().filter(|(_, c)| c.status == 429).map(|(i, _)| i).collect();
                if limited.is_empty() {
                    push(out, n, k, false, "no 429 was answered in this step");
                }
                for i in limited {
                    let at = to_chat[i].at;
                    let next = to_chat.get(i + 1).map(|c| c.at.duration_since(at));
                    let ok = next.is_none_or(|d| d >= quiet);
                    push(
                        out,
                        n,
                        k,
                        ok,
                        format!("next call after the 429: {:?}", next.map(|d| format!("{:.2} s", d.as_secs_f64()))),
                    );
                }
            }
            "telegram_calls_max" => {
                let want = value.as_integer().unwrap_or(0);
                let count = rec.chat_id.map_or(0, |c| calls_to_chat(my_telegram, c).count());
                push(out, n, k, count as i64 <= want, format!("{count} calls"));
            }
            "previous_stream_ended_within_ms" => {
                let ms = value.as_integer().unwrap_or(0);
                let prev = all.iter().find(|r| r.number + 1 == n);
                let ended = prev
                    .and_then(|p| {
                        anthropic.get(p.anthropic_calls.clone().min_max(anthropic.len())).and_then(|c| c.last())
                    })
                    .and_then(|c| c.ended_at);
                match ended {
                    Some(t) => {
                        let took = t.saturating_duration_since(rec.posted_at);
                        push(
                            out,
                            n,
                            k,
                            took.as_millis() as i64 <= ms,
                            format!("ended {} ms after this step's update", took.as_millis()),
                        );
                    }
                    None => push(out, n, k, false, "the previous stream has not ended"),
                }
            }
            other => push(out, n, other, false, "unknown expectation field"),
        }
    }
}

trait MinMax {
    fn min_max(self, len: usize) -> Self;
}
impl MinMax for std::ops::Range<usize> {
    fn min_max(self, len: usize) -> Self {
        self.start.min(len)..self.end.min(len)
    }
}

/// Scenario-level checks (`[expect]`).
pub async fn final_checks(expect: &toml::Table, billing: &PgPool, out: &mut Vec<Check>) {
    for (key, value) in expect {
        match key.as_str() {
            "balances_usd" => {
                for (user, want) in value.as_table().into_iter().flatten() {
                    let got = match user.parse::<i64>() {
                        Ok(uid) => sqlx::query_scalar::<_, Decimal>("SELECT balance FROM accounts WHERE user_id = $1")
                            .bind(uid)
                            .fetch_optional(billing)
                            .await
                            .ok()
                            .flatten()
                            .unwrap_or_default(),
                        Err(_) => Decimal::MIN,
                    };
                    push(
                        out,
                        0,
                        "balances_usd",
                        decimal(want) == Some(got),
                        format!("user {user}: expected {want} got {}", got.normalize()),
                    );
                }
            }
            other => push(out, 0, other, false, "unknown expectation field"),
        }
    }
}

/// A scenario value as JSON (integers, strings, booleans, floats).
fn toml_to_json(v: &toml::Value) -> serde_json::Value {
    match v {
        toml::Value::Integer(i) => serde_json::json!(i),
        toml::Value::String(s) => serde_json::json!(s),
        toml::Value::Boolean(b) => serde_json::json!(b),
        toml::Value::Float(f) => serde_json::json!(f),
        other => serde_json::json!(other.to_string()),
    }
}

/// A recorded Bot API parameter as JSON: form-encoded calls record numbers
/// as strings, so a numeric string is read as its number.
fn param_value(v: &serde_json::Value) -> serde_json::Value {
    match v.as_str().and_then(|s| s.parse::<i64>().ok()) {
        Some(i) => serde_json::json!(i),
        None => v.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concat_ignores_whitespace_only_at_boundaries() {
        let parts = vec!["Hello world.".to_owned(), "Second para.".to_owned()];
        assert!(concat_equals(&parts, "Hello world.\n\nSecond para."));
        assert!(!concat_equals(&parts, "Hello world.\n\nSecond  para."));
        assert!(!concat_equals(&parts[..1], "Hello world.\n\nSecond para."));
    }
}
