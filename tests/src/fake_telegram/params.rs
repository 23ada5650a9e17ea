//! Request parameters of a Bot API call (query string, JSON body or
//! url-encoded form, as <https://core.telegram.org/bots/api#making-requests>
//! allows) and the Bot API's error answer.

use serde_json::{json, Map, Value};

/// A Bot API error: `{"ok":false,"error_code":N,"description":"..."}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ApiError {
    /// HTTP status and `error_code`.
    pub(super) status: u16,
    /// `description`.
    pub(super) description: String,
    /// `parameters.retry_after`, when set.
    pub(super) retry_after: Option<u64>,
}

impl ApiError {
    /// A `400 Bad Request: {detail}` answer.
    pub(super) fn bad_request(detail: impl std::fmt::Display) -> Self {
        Self { status: 400, description: format!("Bad Request: {detail}"), retry_after: None }
    }

    /// An answer with this status and description.
    pub(super) fn new(status: u16, description: impl Into<String>) -> Self {
        Self { status, description: description.into(), retry_after: None }
    }

    /// The JSON body of the answer.
    pub(super) fn to_json(&self) -> Value {
        let mut body = json!({
            "ok": false,
            "error_code": self.status,
            "description": self.description,
        });
        if let (Some(retry_after), Some(fields)) = (self.retry_after, body.as_object_mut()) {
            fields.insert("parameters".into(), json!({ "retry_after": retry_after }));
        }
        body
    }
}

/// The parameters of one call, merged from the query string and the body
/// (the body wins). Form and query values are strings; the getters accept
/// both strings and JSON values, as the real API does.
#[derive(Debug, Clone, Default)]
pub(super) struct Params(Map<String, Value>);

impl Params {
    /// Parses the query string and the body, as told by `content_type`
    /// (JSON, url-encoded form, or guessed when absent).
    pub(super) fn parse(query: Option<&str>, content_type: Option<&str>, body: &[u8]) -> Result<Self, ApiError> {
        let mut params = Map::new();
        if let Some(query) = query {
            extend_form(&mut params, query.as_bytes());
        }
        let media_type = content_type.and_then(|ct| ct.split(';').next()).map(|ct| ct.trim().to_ascii_lowercase());
        let is_blank = body.iter().all(u8::is_ascii_whitespace);
        match media_type.as_deref() {
            _ if is_blank => {}
            Some("application/json") => params.extend(json_object(body)?),
            Some("application/x-www-form-urlencoded") => extend_form(&mut params, body),
            Some("multipart/form-data") => {
                return Err(ApiError::bad_request("multipart/form-data is not supported by the fake Bot API"))
            }
            _ => match json_object(body) {
                Ok(fields) => params.extend(fields),
                Err(_) => extend_form(&mut params, body),
            },
        }
        Ok(Self(params))
    }

    /// All parameters as one JSON object, for the call log.
    pub(super) fn to_value(&self) -> Value {
        Value::Object(self.0.clone())
    }

    /// Whether the parameter is present (and not `null`).
    pub(super) fn has(&self, name: &str) -> bool {
        self.0.get(name).is_some_and(|v| !v.is_null())
    }

    /// An integer parameter sent as a number or a numeric string.
    pub(super) fn int(&self, name: &str) -> Result<Option<i64>, ApiError> {
        let parsed = match self.0.get(name) {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Number(n)) => n.as_i64(),
            Some(Value::String(s)) => s.trim().parse().ok(),
            Some(_) => None,
        };
        parsed.map(Some).ok_or_else(|| ApiError::bad_request(format!("wrong parameter {name} in request")))
    }

    /// The required `chat_id`; only numeric ids are known to the fake.
    pub(super) fn chat_id(&self) -> Result<i64, ApiError> {
        match self.int("chat_id") {
            Ok(Some(0)) | Err(_) => Err(ApiError::bad_request("chat not found")),
            Ok(Some(id)) => Ok(id),
            Ok(None) => Err(ApiError::bad_request("chat_id is empty")),
        }
    }

    /// A required integer, with `missing` as the error when absent.
    pub(super) fn required_int(&self, name: &str, missing: &str) -> Result<i64, ApiError> {
        self.int(name)?.ok_or_else(|| ApiError::bad_request(missing))
    }

    /// A string parameter; numbers and booleans are given as their text.
    pub(super) fn string(&self, name: &str) -> Option<String> {
        match self.0.get(name)? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }

    /// A boolean parameter (`true`, `"true"`, `1`, `"1"`).
    pub(super) fn flag(&self, name: &str) -> bool {
        match self.0.get(name) {
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s)) => matches!(s.trim(), "true" | "True" | "1"),
            Some(Value::Number(n)) => n.as_i64() == Some(1),
            _ => false,
        }
    }

    /// A JSON-serialized parameter (array or object), sent as JSON or as a
    /// string holding JSON. `Ok(None)` when absent or empty.
    pub(super) fn json(&self, name: &str) -> Result<Option<Value>, ApiError> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
            Some(Value::String(s)) => serde_json::from_str(s)
                .map(Some)
                .map_err(|_| ApiError::bad_request(format!("can't parse {name} JSON object"))),
            Some(value) => Ok(Some(value.clone())),
        }
    }
}

fn json_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(fields)) => Ok(fields),
        _ => Err(ApiError::bad_request("can't parse request JSON object")),
    }
}

fn extend_form(params: &mut Map<String, Value>, form: &[u8]) {
    for (name, value) in form_urlencoded::parse(form) {
        params.insert(name.into_owned(), Value::String(value.into_owned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_body_overrides_query_and_numbers_may_be_strings() {
        let params = Params::parse(
            Some("chat_id=1&text=from%20query"),
            Some("application/x-www-form-urlencoded; charset=utf-8"),
            b"chat_id=-100200&entities=%5B%5D",
        )
        .unwrap();
        assert_eq!(params.chat_id().unwrap(), -100_200);
        assert_eq!(params.string("text").as_deref(), Some("from query"));
        assert_eq!(params.json("entities").unwrap(), Some(json!([])));
    }

    #[test]
    fn json_body_without_content_type_is_recognised() {
        let params = Params::parse(None, None, br#"{"chat_id": 5, "text": "hi"}"#).unwrap();
        assert_eq!(params.chat_id().unwrap(), 5);
        assert!(params.has("text"));
    }

    #[test]
    fn malformed_json_body_is_a_bad_request() {
        let error = Params::parse(None, Some("application/json"), b"{nope").unwrap_err();
        assert_eq!(error.status, 400);
    }

    #[test]
    fn username_chat_ids_are_unknown_chats() {
        let params = Params::parse(Some("chat_id=%40somechannel"), None, b"").unwrap();
        assert_eq!(params.chat_id().unwrap_err().description, "Bad Request: chat not found");
    }
}
