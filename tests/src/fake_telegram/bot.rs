//! The fake bot's state (messages, updates, faults, webhook) and the Bot API
//! methods that read and change it. Everything here is synchronous: the
//! server calls it under a lock.

use std::collections::{HashMap, VecDeque};

use serde_json::{json, Value};

use super::params::{ApiError, Params};
use super::text::{same_entities, FormattedText};
use super::{Fault, TgCall, TgMessage};

/// The bot's user id, as `getMe` and `from` report it.
pub(super) const BOT_ID: i64 = 7_000_000_001;

/// The largest file `getFile` lets a bot download (the Bot API's 20 MB).
const MAX_DOWNLOAD_BYTES: usize = 20 * 1024 * 1024;

/// Chat actions `sendChatAction` accepts.
const CHAT_ACTIONS: &[&str] = &[
    "typing",
    "upload_photo",
    "record_video",
    "upload_video",
    "record_voice",
    "upload_voice",
    "upload_document",
    "choose_sticker",
    "find_location",
    "record_video_note",
    "upload_video_note",
];

/// Every method the fake implements, spelled as the Bot API documents them.
pub(super) const METHODS: &[&str] = &[
    "getMe",
    "getUpdates",
    "sendMessage",
    "editMessageText",
    "editMessageReplyMarkup",
    "sendMessageDraft",
    "sendChatAction",
    "deleteMessage",
    "answerCallbackQuery",
    "setWebhook",
    "deleteWebhook",
    "getWebhookInfo",
    "getFile",
    "setMyCommands",
    "deleteMyCommands",
];

/// A successful answer: `{"ok":true,"result":...,"description"?:...}`.
#[derive(Debug)]
pub(super) struct Success {
    pub(super) result: Value,
    pub(super) description: Option<&'static str>,
}

impl From<Value> for Success {
    fn from(result: Value) -> Self {
        Self { result, description: None }
    }
}

/// A message the bot sent, with what the public [`TgMessage`] leaves out.
#[derive(Debug)]
struct StoredMessage {
    public: TgMessage,
    reply_markup: Value,
    date: i64,
}

/// A fault and how many matching calls it has seen.
#[derive(Debug)]
struct ActiveFault {
    fault: Fault,
    matched: usize,
}

/// Everything the fake Bot API knows.
#[derive(Debug)]
pub(super) struct BotState {
    /// `getMe`'s username.
    bot_username: String,
    /// Every call, in the order answered.
    pub(super) calls: Vec<TgCall>,
    /// Messages the bot sent, in send order.
    messages: Vec<StoredMessage>,
    /// `(chat_id, message_id)` → index in `messages`.
    by_id: HashMap<(i64, i64), usize>,
    /// Last message id used per chat.
    last_message_id: HashMap<i64, i64>,
    /// Updates not yet confirmed by a `getUpdates` offset.
    updates: VecDeque<Value>,
    /// Highest update id seen, to number updates pushed without one.
    last_update_id: i64,
    /// Faults in the order added.
    faults: Vec<ActiveFault>,
    /// Set by `setWebhook`; `getUpdates` is refused while set.
    webhook_url: Option<String>,
    /// `file_id` → number used in its `file_path`.
    files: HashMap<String, usize>,
    /// `file_path` → the bytes served at `/file/bot{TOKEN}/{file_path}`.
    file_bytes: HashMap<String, bytes::Bytes>,
    /// `(chat_id, user_id)` → `getChatMember` status set by the test
    /// (`administrator`, `creator`, …); anyone else is a `member`.
    member_status: HashMap<(i64, i64), String>,
}

impl BotState {
    pub(super) fn new(bot_username: &str) -> Self {
        Self {
            bot_username: bot_username.to_owned(),
            calls: Vec::new(),
            messages: Vec::new(),
            by_id: HashMap::new(),
            last_message_id: HashMap::new(),
            updates: VecDeque::new(),
            last_update_id: 0,
            faults: Vec::new(),
            webhook_url: None,
            files: HashMap::new(),
            file_bytes: HashMap::new(),
            member_status: HashMap::new(),
        }
    }

    /// Sets what `getChatMember` answers for `user_id` in `chat_id`.
    pub(super) fn set_member_status(&mut self, chat_id: i64, user_id: i64, status: &str) {
        self.member_status.insert((chat_id, user_id), status.to_owned());
    }

    /// `getChatMember`: a `ChatMember` with the status set by the test, else `member`.
    fn get_chat_member(&self, params: &Params) -> Result<Value, ApiError> {
        let chat_id = params.chat_id()?;
        let user_id = params.required_int("user_id", "Bad Request: user_id is required")?;
        let status = self.member_status.get(&(chat_id, user_id)).map_or("member", String::as_str);
        Ok(json!({ "status": status, "user": { "id": user_id, "is_bot": false, "first_name": "Member" } }))
    }

    /// Registers `bytes` as the content of `file_id`; gives its `file_path`.
    pub(super) fn add_file(&mut self, file_id: &str, bytes: bytes::Bytes) -> String {
        let path = format!("documents/file_{}", self.file_number(file_id));
        self.file_bytes.insert(path.clone(), bytes);
        path
    }

    /// The bytes registered at `file_path`.
    pub(super) fn file(&self, file_path: &str) -> Option<bytes::Bytes> {
        self.file_bytes.get(file_path).cloned()
    }

    fn file_number(&mut self, file_id: &str) -> usize {
        let next = self.files.len() + 1;
        *self.files.entry(file_id.to_owned()).or_insert(next)
    }

    pub(super) fn add_fault(&mut self, fault: Fault) {
        self.faults.push(ActiveFault { fault, matched: 0 });
    }

    pub(super) fn clear_faults(&mut self) {
        self.faults.clear();
    }

    /// Counts a call to `method` against every matching fault and returns the
    /// answer of the first fault whose window it falls in.
    /// The `bool` is [`Fault::stall`].
    pub(super) fn take_fault(&mut self, method: &str) -> Option<(ApiError, bool)> {
        let mut hit = None;
        for active in &mut self.faults {
            if !active.fault.matches(method) {
                continue;
            }
            active.matched += 1;
            let first = active.fault.nth.max(1);
            let last = first + active.fault.times.max(1) - 1;
            if hit.is_none() && (first..=last).contains(&active.matched) {
                hit = Some((active.fault.to_error(), active.fault.stall));
            }
        }
        hit
    }

    pub(super) fn push_update(&mut self, mut update: Value) {
        match update.get("update_id").and_then(Value::as_i64) {
            Some(id) => self.last_update_id = self.last_update_id.max(id),
            None => {
                self.last_update_id += 1;
                if let Some(fields) = update.as_object_mut() {
                    fields.insert("update_id".into(), json!(self.last_update_id));
                }
            }
        }
        self.updates.push_back(update);
    }

    pub(super) fn messages(&self) -> Vec<TgMessage> {
        self.messages.iter().map(|m| m.public.clone()).collect()
    }

    /// Confirms updates below `offset` (a negative offset keeps only the last
    /// `-offset` updates), as `getUpdates` does on arrival.
    pub(super) fn confirm_updates(&mut self, offset: i64) {
        if offset < 0 {
            let keep = usize::try_from(offset.unsigned_abs()).unwrap_or(usize::MAX);
            while self.updates.len() > keep {
                self.updates.pop_front();
            }
        } else {
            self.updates.retain(|u| u.get("update_id").and_then(Value::as_i64).unwrap_or(0) >= offset);
        }
    }

    /// `getUpdates` refusal while a webhook is set.
    pub(super) fn check_polling_allowed(&self) -> Result<(), ApiError> {
        match self.webhook_url {
            Some(_) => Err(ApiError::new(
                409,
                "Conflict: can't use getUpdates method while webhook is active; use deleteWebhook \
                 to delete the webhook first",
            )),
            None => Ok(()),
        }
    }

    /// Up to `limit` pending updates (the ones at or above `offset`).
    pub(super) fn pending_updates(&self, offset: i64, limit: usize) -> Vec<Value> {
        self.updates
            .iter()
            .filter(|u| offset <= 0 || u.get("update_id").and_then(Value::as_i64).unwrap_or(0) >= offset)
            .take(limit)
            .cloned()
            .collect()
    }

    /// Runs one method other than `getUpdates`. `call_index` is the index the
    /// call will have in the log.
    pub(super) fn handle(&mut self, method: &str, params: &Params, call_index: usize) -> Result<Success, ApiError> {
        match method {
            "getMe" => Ok(self.get_me().into()),
            "sendMessage" => self.send_message(params, call_index).map(Success::from),
            "editMessageText" => self.edit_message_text(params).map(Success::from),
            "editMessageReplyMarkup" => self.edit_reply_markup(params).map(Success::from),
            "sendMessageDraft" => send_message_draft(params).map(Success::from),
            "sendChatAction" => send_chat_action(params).map(Success::from),
            "deleteMessage" => self.delete_message(params).map(Success::from),
            "answerCallbackQuery" => answer_callback_query(params).map(Success::from),
            "setWebhook" => Ok(self.set_webhook(params)),
            "deleteWebhook" => Ok(self.delete_webhook(params)),
            "getWebhookInfo" => Ok(self.webhook_info().into()),
            "getFile" => self.get_file(params).map(Success::from),
            "setMyCommands" | "deleteMyCommands" => Ok(json!(true).into()),
            "sendInvoice" => self.send_invoice(params, call_index).map(Success::from),
            "answerPreCheckoutQuery" => answer_pre_checkout_query(params).map(Success::from),
            "refundStarPayment" => refund_star_payment(params).map(Success::from),
            "getChatMember" => self.get_chat_member(params).map(Success::from),
            _ => Err(ApiError::new(404, "Not Found: method not found")),
        }
    }

    fn get_me(&self) -> Value {
        json!({
            "id": BOT_ID,
            "is_bot": true,
            "first_name": "Fleet",
            "username": self.bot_username,
            "can_join_groups": true,
            "can_read_all_group_messages": false,
            "supports_inline_queries": false,
            "can_connect_to_business": false,
            "has_main_web_app": false,
        })
    }

    fn send_message(&mut self, params: &Params, call_index: usize) -> Result<Value, ApiError> {
        let chat_id = params.chat_id()?;
        let formatted = FormattedText::from_params(params, false)?;
        let reply_markup = params.json("reply_markup")?.unwrap_or(Value::Null);
        let last_id = self.last_message_id.entry(chat_id).or_insert(0);
        *last_id += 1;
        let message_id = *last_id;
        self.by_id.insert((chat_id, message_id), self.messages.len());
        self.messages.push(StoredMessage {
            public: TgMessage {
                chat_id,
                message_id,
                text: formatted.text,
                entities: formatted.entities,
                parse_mode: formatted.parse_mode,
                sent_call: call_index,
                edits: 0,
                deleted: false,
            },
            reply_markup,
            date: chrono::Utc::now().timestamp(),
        });
        Ok(self.message_json(chat_id, message_id, None))
    }

    /// `sendInvoice` (Telegram Stars: currency `XTR`, one price, no provider token).
    fn send_invoice(&mut self, params: &Params, call_index: usize) -> Result<Value, ApiError> {
        let chat_id = params.chat_id()?;
        let title = params.string("title").unwrap_or_default();
        if title.is_empty() || params.string("payload").is_none_or(|p| p.is_empty()) {
            return Err(ApiError::bad_request("title and payload are required"));
        }
        if params.string("currency").as_deref() != Some("XTR") {
            return Err(ApiError::bad_request("CURRENCY_INVALID"));
        }
        let prices = params.json("prices")?.unwrap_or(Value::Null);
        if prices.as_array().is_none_or(|p| p.len() != 1) {
            return Err(ApiError::bad_request("Stars invoices take exactly one price"));
        }
        let last_id = self.last_message_id.entry(chat_id).or_insert(0);
        *last_id += 1;
        let message_id = *last_id;
        self.by_id.insert((chat_id, message_id), self.messages.len());
        self.messages.push(StoredMessage {
            public: TgMessage {
                chat_id,
                message_id,
                text: format!("[invoice] {title}"),
                entities: Value::Null,
                parse_mode: None,
                sent_call: call_index,
                edits: 0,
                deleted: false,
            },
            reply_markup: Value::Null,
            date: chrono::Utc::now().timestamp(),
        });
        Ok(self.message_json(chat_id, message_id, None))
    }

    /// The live (not deleted) message `(chat_id, message_id)` of the params.
    fn target(&self, params: &Params, not_found: &str) -> Result<(i64, i64, usize), ApiError> {
        let chat_id = params.chat_id()?;
        let message_id = params.required_int("message_id", "message identifier is not specified")?;
        match self.by_id.get(&(chat_id, message_id)) {
            Some(&i) if self.messages.get(i).is_some_and(|m| !m.public.deleted) => Ok((chat_id, message_id, i)),
            _ => Err(ApiError::bad_request(not_found)),
        }
    }

    fn edit_message_text(&mut self, params: &Params) -> Result<Value, ApiError> {
        if params.has("inline_message_id") && !params.has("chat_id") {
            FormattedText::from_params(params, false)?;
            return Ok(json!(true));
        }
        let (chat_id, message_id, i) = self.target(params, "message to edit not found")?;
        let formatted = FormattedText::from_params(params, false)?;
        let reply_markup = params.json("reply_markup")?.unwrap_or(Value::Null);
        let stored = self.messages.get_mut(i).ok_or_else(|| ApiError::bad_request("message to edit not found"))?;
        let current = &stored.public;
        if current.text == formatted.text
            && same_entities(&current.entities, &formatted.entities)
            && current.parse_mode == formatted.parse_mode
            && stored.reply_markup == reply_markup
        {
            return Err(not_modified());
        }
        stored.public.text = formatted.text;
        stored.public.entities = formatted.entities;
        stored.public.parse_mode = formatted.parse_mode;
        stored.public.edits += 1;
        stored.reply_markup = reply_markup;
        Ok(self.message_json(chat_id, message_id, Some(chrono::Utc::now().timestamp())))
    }

    fn edit_reply_markup(&mut self, params: &Params) -> Result<Value, ApiError> {
        let (chat_id, message_id, i) = self.target(params, "message to edit not found")?;
        let reply_markup = params.json("reply_markup")?.unwrap_or(Value::Null);
        let stored = self.messages.get_mut(i).ok_or_else(|| ApiError::bad_request("message to edit not found"))?;
        if stored.reply_markup == reply_markup {
            return Err(not_modified());
        }
        stored.reply_markup = reply_markup;
        stored.public.edits += 1;
        Ok(self.message_json(chat_id, message_id, Some(chrono::Utc::now().timestamp())))
    }

    fn delete_message(&mut self, params: &Params) -> Result<Value, ApiError> {
        let (_, _, i) = self.target(params, "message to delete not found")?;
        if let Some(stored) = self.messages.get_mut(i) {
            stored.public.deleted = true;
        }
        Ok(json!(true))
    }

    fn set_webhook(&mut self, params: &Params) -> Success {
        let url = params.string("url").filter(|u| !u.is_empty());
        let description = if url.is_some() { "Webhook was set" } else { "Webhook was deleted" };
        self.webhook_url = url;
        Success { result: json!(true), description: Some(description) }
    }

    fn delete_webhook(&mut self, params: &Params) -> Success {
        let description = match self.webhook_url.take() {
            Some(_) => "Webhook was deleted",
            None => "Webhook is already deleted",
        };
        if params.flag("drop_pending_updates") {
            self.updates.clear();
        }
        Success { result: json!(true), description: Some(description) }
    }

    fn webhook_info(&self) -> Value {
        json!({
            "url": self.webhook_url.clone().unwrap_or_default(),
            "has_custom_certificate": false,
            "pending_update_count": self.updates.len(),
        })
    }

    fn get_file(&mut self, params: &Params) -> Result<Value, ApiError> {
        let file_id = params
            .string("file_id")
            .filter(|id| !id.is_empty())
            .ok_or_else(|| ApiError::bad_request("file_id is empty"))?;
        let number = self.file_number(&file_id);
        let path = format!("documents/file_{number}");
        let mut file = json!({ "file_id": file_id, "file_unique_id": format!("unique_{number}") });
        if let Some(bytes) = self.file_bytes.get(&path) {
            if bytes.len() > MAX_DOWNLOAD_BYTES {
                return Err(ApiError::bad_request("file is too big"));
            }
            file["file_size"] = json!(bytes.len());
        }
        file["file_path"] = json!(path);
        Ok(file)
    }

    /// The Bot API `Message` object of a stored message.
    fn message_json(&self, chat_id: i64, message_id: i64, edit_date: Option<i64>) -> Value {
        let Some(stored) = self.by_id.get(&(chat_id, message_id)).and_then(|&i| self.messages.get(i)) else {
            return Value::Null;
        };
        let chat = if chat_id > 0 {
            json!({ "id": chat_id, "type": "private" })
        } else {
            json!({ "id": chat_id, "type": "supergroup", "title": "Fleet test group" })
        };
        let mut message = json!({
            "message_id": message_id,
            "from": {
                "id": BOT_ID,
                "is_bot": true,
                "first_name": "Fleet",
                "username": self.bot_username,
            },
            "chat": chat,
            "date": stored.date,
            "text": stored.public.text,
        });
        if let Some(fields) = message.as_object_mut() {
            if !same_entities(&stored.public.entities, &Value::Null) {
                fields.insert("entities".into(), stored.public.entities.clone());
            }
            if !stored.reply_markup.is_null() {
                fields.insert("reply_markup".into(), stored.reply_markup.clone());
            }
            if let Some(edit_date) = edit_date {
                fields.insert("edit_date".into(), json!(edit_date));
            }
        }
        message
    }
}

fn not_modified() -> ApiError {
    ApiError::bad_request(
        "message is not modified: specified new message content and reply markup are exactly the \
         same as a current content and reply markup of the message",
    )
}

fn send_message_draft(params: &Params) -> Result<Value, ApiError> {
    let chat_id = params.chat_id()?;
    if chat_id < 0 {
        // Drafts exist only in private chats.
        return Err(ApiError::bad_request("TEXTDRAFT_PEER_INVALID"));
    }
    match params.int("draft_id")? {
        None => return Err(ApiError::bad_request("draft_id is empty")),
        Some(0) => return Err(ApiError::bad_request("draft_id must be non-zero")),
        Some(_) => {}
    }
    FormattedText::from_params(params, true)?;
    Ok(json!(true))
}

fn send_chat_action(params: &Params) -> Result<Value, ApiError> {
    params.chat_id()?;
    match params.string("action") {
        Some(action) if CHAT_ACTIONS.contains(&action.as_str()) => Ok(json!(true)),
        _ => Err(ApiError::bad_request("wrong parameter action in request")),
    }
}

/// `answerPreCheckoutQuery`: `ok` is required; `error_message` when not ok.
fn answer_pre_checkout_query(params: &Params) -> Result<Value, ApiError> {
    if params.string("pre_checkout_query_id").is_none_or(|id| id.is_empty()) {
        return Err(ApiError::bad_request("QUERY_ID_INVALID"));
    }
    if !params.has("ok") {
        return Err(ApiError::bad_request("parameter \"ok\" is required"));
    }
    if !params.flag("ok") && params.string("error_message").is_none_or(|m| m.is_empty()) {
        return Err(ApiError::bad_request("ERROR_MESSAGE_EMPTY"));
    }
    Ok(json!(true))
}

/// `refundStarPayment`: needs `user_id` and `telegram_payment_charge_id`.
fn refund_star_payment(params: &Params) -> Result<Value, ApiError> {
    params.required_int("user_id", "user_id is required")?;
    match params.string("telegram_payment_charge_id") {
        Some(id) if !id.is_empty() => Ok(json!(true)),
        _ => Err(ApiError::bad_request("CHARGE_ID_EMPTY")),
    }
}

fn answer_callback_query(params: &Params) -> Result<Value, ApiError> {
    match params.string("callback_query_id") {
        Some(id) if !id.is_empty() => Ok(json!(true)),
        _ => Err(ApiError::bad_request("query is too old and response timeout expired or query ID is invalid")),
    }
}
