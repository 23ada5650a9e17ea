//! Checks of a message's text, `parse_mode` and `entities`, with the Bot
//! API's error descriptions.

use serde_json::Value;

use super::params::{ApiError, Params};

/// The longest message text, in UTF-16 code units.
pub(super) const MAX_TEXT_UTF16: usize = 4096;

/// Entity types of the Bot API's `MessageEntity`.
const ENTITY_TYPES: &[&str] = &[
    "mention",
    "hashtag",
    "cashtag",
    "bot_command",
    "url",
    "email",
    "phone_number",
    "bold",
    "italic",
    "underline",
    "strikethrough",
    "spoiler",
    "blockquote",
    "expandable_blockquote",
    "code",
    "pre",
    "text_link",
    "text_mention",
    "custom_emoji",
    "date_time",
];

/// The formatted text of a message, checked.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct FormattedText {
    /// The text as sent (markup of `parse_mode` is kept verbatim: the fake
    /// does not parse HTML or Markdown).
    pub(super) text: String,
    /// The `entities` array as sent, or `Null`.
    pub(super) entities: Value,
    /// `parse_mode` as sent.
    pub(super) parse_mode: Option<String>,
}

impl FormattedText {
    /// Reads `text`, `parse_mode` and `entities`; `allow_empty` is for
    /// drafts, whose empty text shows a placeholder.
    pub(super) fn from_params(params: &Params, allow_empty: bool) -> Result<Self, ApiError> {
        let text = params.string("text").unwrap_or_default();
        if text.trim().is_empty() && !allow_empty {
            return Err(ApiError::bad_request("message text is empty"));
        }
        let length = text.encode_utf16().count();
        if length > MAX_TEXT_UTF16 {
            return Err(ApiError::bad_request("message is too long"));
        }
        let parse_mode = params.string("parse_mode").filter(|m| !m.is_empty());
        if let Some(mode) = &parse_mode {
            if !["html", "markdown", "markdownv2"].contains(&mode.to_ascii_lowercase().as_str()) {
                return Err(ApiError::bad_request(format!("unsupported parse_mode \"{mode}\"")));
            }
        }
        let entities = params.json("entities")?.unwrap_or(Value::Null);
        check_entities(&entities, length).map_err(|e| ApiError::bad_request(format!("can't parse entities: {e}")))?;
        Ok(Self { text, entities, parse_mode })
    }
}

/// Whether two `entities` values describe the same formatting (`Null` and
/// `[]` are the same).
pub(super) fn same_entities(a: &Value, b: &Value) -> bool {
    let empty = |v: &Value| v.is_null() || v.as_array().is_some_and(Vec::is_empty);
    (empty(a) && empty(b)) || a == b
}

/// Checks `entities` (an array of `MessageEntity`, or `Null`) against a
/// text of `text_len` UTF-16 code units.
pub(super) fn check_entities(entities: &Value, text_len: usize) -> Result<(), String> {
    let list = match entities {
        Value::Null => return Ok(()),
        Value::Array(list) => list,
        _ => return Err("entities must be an array of MessageEntity".to_owned()),
    };
    for (i, entity) in list.iter().enumerate() {
        let kind = entity.get("type").and_then(Value::as_str).ok_or_else(|| format!("entity {i} has no type"))?;
        if !ENTITY_TYPES.contains(&kind) {
            return Err(format!("entity {i} has unsupported type \"{kind}\""));
        }
        let field = |name: &str| {
            entity
                .get(name)
                .and_then(Value::as_u64)
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| format!("entity {i} has no valid {name}"))
        };
        let (offset, length) = (field("offset")?, field("length")?);
        if offset.saturating_add(length) > text_len {
            return Err(format!(
                "entity {i} ({kind}) at UTF-16 offset {offset} with length {length} ends after \
                 the end of the text ({text_len} UTF-16 code units)"
            ));
        }
        let needed = match kind {
            "text_link" => Some("url"),
            "text_mention" => Some("user"),
            "custom_emoji" => Some("custom_emoji_id"),
            _ => None,
        };
        if let Some(needed) = needed.filter(|f| entity.get(*f).is_none_or(Value::is_null)) {
            return Err(format!("entity {i} ({kind}) needs {needed}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn entities_are_measured_in_utf16_code_units() {
        // "😀 bold": the emoji is 2 UTF-16 code units, so the text has 7.
        let ok = json!([{ "type": "bold", "offset": 3, "length": 4 }]);
        assert_eq!(check_entities(&ok, "😀 bold".encode_utf16().count()), Ok(()));
        let past_end = json!([{ "type": "bold", "offset": 3, "length": 5 }]);
        assert!(check_entities(&past_end, 7).is_err());
    }

    #[test]
    fn entities_need_a_known_type_and_their_own_fields() {
        assert!(check_entities(&json!([{ "offset": 0, "length": 1 }]), 5).is_err());
        assert!(check_entities(&json!([{ "type": "blink", "offset": 0, "length": 1 }]), 5).is_err());
        assert!(check_entities(&json!([{ "type": "text_link", "offset": 0, "length": 1 }]), 5).is_err());
        assert!(check_entities(&json!([{ "type": "bold", "offset": -1, "length": 1 }]), 5).is_err());
        assert!(check_entities(&json!({ "type": "bold" }), 5).is_err());
    }

    #[test]
    fn null_and_empty_entities_are_the_same_formatting() {
        assert!(same_entities(&Value::Null, &json!([])));
        assert!(!same_entities(&Value::Null, &json!([{ "type": "bold", "offset": 0, "length": 1 }])));
    }
}
