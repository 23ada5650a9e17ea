//! The Bot API client: teloxide-core's `Bot` (URL building, the JSON
//! envelope `{"ok":…}`, error classification) with payloads of our own for
//! the methods we call, so that results we do not need are not parsed and
//! methods newer than teloxide-core 0.13 (`sendMessageDraft`, Bot API 9.3)
//! work the same way. Errors never contain the token (DESIGN P12).

use crate::secret::{scrub, Secret};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use std::time::Duration;
use teloxide_core::requests::Payload;
use teloxide_core::Bot;

/// How a Bot API call failed, classified for the caller's decision.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TelegramError {
    /// 429: wait this long before calling for this chat again.
    #[error("flood control: retry after {0:?}")]
    RetryAfter(Duration),
    /// 403: the user blocked the bot or the chat is gone; stop sending.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The edit would not change the message (treated as success by callers).
    #[error("message is not modified")]
    NotModified,
    /// Entities were rejected: resend as plain text.
    #[error("can't parse entities: {0}")]
    BadEntities(String),
    /// The group became a supergroup: send to this chat id instead.
    #[error("the group migrated to chat {0}")]
    Migrated(i64),
    /// Any other error answer of the Bot API.
    #[error("bot api error: {0}")]
    Api(String),
    /// Network or decoding failure (token scrubbed).
    #[error("telegram transport error: {0}")]
    Transport(String),
    /// The caller gave up before the call was sent (its job's lease was lost).
    #[error("call aborted: {0}")]
    Aborted(String),
}

/// The Bot API client; cheap to clone.
#[derive(Clone)]
pub struct BotApi {
    bot: Bot,
    token: Secret,
    /// Longest exchange of one call ([`BotApi::with_call_timeout`]); a long
    /// poll gets its own on top.
    call_timeout: Duration,
    /// False once the Bot API answered 401 (a wrong or revoked token), true
    /// again after any successful call; true until the first answer.
    token_accepted: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for BotApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BotApi { token: [redacted] }")
    }
}

/// A message the bot sent (`Message`, the fields we keep).
#[derive(Debug, Clone, Deserialize)]
pub struct SentMessage {
    /// Id of the message in its chat.
    pub message_id: i64,
}

/// `getMe` result (the fields we keep).
#[derive(Debug, Clone, Deserialize)]
pub struct Me {
    /// The bot's user id.
    pub id: i64,
    /// The bot's `@username`, without `@`.
    #[serde(default)]
    pub username: Option<String>,
}

macro_rules! payload {
    ($ty:ident, $name:literal, $out:ty) => {
        impl Payload for $ty {
            type Output = $out;
            const NAME: &'static str = $name;
        }
    };
}

/// `sendMessage` (Bot API, "sendMessage").
#[derive(Debug, Clone, Serialize)]
pub struct SendMessage {
    /// Target chat.
    pub chat_id: i64,
    /// The forum topic to send into (forum supergroups only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_thread_id: Option<i64>,
    /// 1–4,096 UTF-16 code units.
    pub text: String,
    /// `MessageEntity` objects (offsets in UTF-16 code units); never `parse_mode`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entities: Option<Vec<Value>>,
    /// `ReplyParameters` (to answer a group message in its thread).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_parameters: Option<Value>,
    /// `InlineKeyboardMarkup`, e.g. the Stop button or the Stars packs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_markup: Option<Value>,
}
payload!(SendMessage, "sendMessage", SentMessage);

/// `editMessageText`.
#[derive(Debug, Clone, Serialize)]
pub struct EditMessageText {
    /// Chat of the message.
    pub chat_id: i64,
    /// The message to edit.
    pub message_id: i64,
    /// New text.
    pub text: String,
    /// New entities.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entities: Option<Vec<Value>>,
}
payload!(EditMessageText, "editMessageText", Value);

/// `sendMessageDraft` (Bot API 9.3): streams a partial message to a private chat.
#[derive(Debug, Clone, Serialize)]
pub struct SendMessageDraft {
    /// Target private chat.
    pub chat_id: i64,
    /// Non-zero id, stable for the whole answer so updates animate in place.
    pub draft_id: i64,
    /// The text so far.
    pub text: String,
    /// Entities of the text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entities: Option<Vec<Value>>,
}
payload!(SendMessageDraft, "sendMessageDraft", Value);

/// `sendChatAction` (`typing`).
#[derive(Debug, Clone, Serialize)]
pub struct SendChatAction {
    /// Target chat.
    pub chat_id: i64,
    /// The forum topic the action is shown in (forum supergroups only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_thread_id: Option<i64>,
    /// `typing`.
    pub action: &'static str,
}
payload!(SendChatAction, "sendChatAction", Value);

/// `answerCallbackQuery`.
#[derive(Debug, Clone, Serialize)]
pub struct AnswerCallbackQuery {
    /// The query.
    pub callback_query_id: String,
    /// A short notice shown to the user.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}
payload!(AnswerCallbackQuery, "answerCallbackQuery", Value);

/// `sendInvoice` in Telegram Stars (`currency = XTR`, one price, no provider token).
#[derive(Debug, Clone, Serialize)]
pub struct SendInvoice {
    /// Target chat.
    pub chat_id: i64,
    /// 1–32 characters.
    pub title: String,
    /// 1–255 characters.
    pub description: String,
    /// Our payload, echoed in the pre-checkout query and the payment.
    pub payload: String,
    /// `XTR`.
    pub currency: &'static str,
    /// `[{"label": …, "amount": stars}]`.
    pub prices: Vec<Value>,
}
payload!(SendInvoice, "sendInvoice", SentMessage);

/// `answerPreCheckoutQuery`.
#[derive(Debug, Clone, Serialize)]
pub struct AnswerPreCheckoutQuery {
    /// The query.
    pub pre_checkout_query_id: String,
    /// Accept the payment.
    pub ok: bool,
    /// Why not, when refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
}
payload!(AnswerPreCheckoutQuery, "answerPreCheckoutQuery", Value);

/// `refundStarPayment`.
#[derive(Debug, Clone, Serialize)]
pub struct RefundStarPayment {
    /// Who paid.
    pub user_id: i64,
    /// The charge to refund.
    pub telegram_payment_charge_id: String,
}
payload!(RefundStarPayment, "refundStarPayment", Value);

/// `deleteMessage`.
#[derive(Debug, Clone, Serialize)]
pub struct DeleteMessage {
    /// Chat of the message.
    pub chat_id: i64,
    /// The message.
    pub message_id: i64,
}
payload!(DeleteMessage, "deleteMessage", Value);

/// `getMe`.
#[derive(Debug, Clone, Serialize)]
pub struct GetMe {}
payload!(GetMe, "getMe", Me);

/// `deleteWebhook` (Bot API, "deleteWebhook"): lets `getUpdates` work
/// (while a webhook is set it answers 409 Conflict).
#[derive(Debug, Clone, Serialize)]
pub struct DeleteWebhook {
    /// `false`: updates waiting on the webhook are kept for `getUpdates`.
    pub drop_pending_updates: bool,
}
payload!(DeleteWebhook, "deleteWebhook", bool);

/// One entry of the command menu (Bot API, "BotCommand").
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BotCommand {
    /// 1–32 characters: lowercase letters, digits and underscores.
    pub command: String,
    /// 1–256 characters.
    pub description: String,
}

/// `setMyCommands` (Bot API, "setMyCommands"): the command menu, for users
/// of `language_code` (an IETF language tag; `None`: everyone else).
#[derive(Debug, Clone, Serialize)]
pub struct SetMyCommands {
    /// The menu, in order.
    pub commands: Vec<BotCommand>,
    /// Two-letter ISO 639-1 code, or none for the default menu.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub language_code: Option<String>,
}
payload!(SetMyCommands, "setMyCommands", bool);

/// `getChatMember` (Bot API, "getChatMember"): a user's membership of a chat.
#[derive(Debug, Clone, Serialize)]
pub struct GetChatMember {
    /// The group or supergroup.
    pub chat_id: i64,
    /// The user.
    pub user_id: i64,
}
payload!(GetChatMember, "getChatMember", ChatMember);

/// `ChatMember` (the field we keep).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct ChatMember {
    /// `creator`, `administrator`, `member`, `restricted`, `left` or `kicked`.
    pub status: String,
}

impl ChatMember {
    /// The owner or an administrator of the chat.
    pub fn is_admin(&self) -> bool {
        matches!(self.status.as_str(), "creator" | "administrator")
    }
}

/// `getFile`: prepares a file for download (the link lives at least an hour).
#[derive(Debug, Clone, Serialize)]
pub struct GetFile {
    /// The file's `file_id`.
    pub file_id: String,
}
payload!(GetFile, "getFile", FileInfo);

/// `File` (the result of `getFile`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct FileInfo {
    /// Id for this bot.
    pub file_id: String,
    /// Id shared by every bot.
    pub file_unique_id: String,
    /// Size in bytes, when known.
    #[serde(default)]
    pub file_size: Option<u64>,
    /// Path for `{api_url}/file/bot<token>/<file_path>`; absent when the
    /// file cannot be downloaded.
    #[serde(default)]
    pub file_path: Option<String>,
}

/// Why a file download failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FileError {
    /// The file is larger than the caller's cap, in bytes (nothing more was read).
    #[error("the file is larger than {0} bytes")]
    TooLarge(u64),
    /// The Bot API or the connection failed (token scrubbed).
    #[error(transparent)]
    Telegram(#[from] TelegramError),
}

/// `getUpdates`, returning each update as a JSON value. Not `RawValue`:
/// teloxide reads an answer through an untagged enum, which buffers it and
/// cannot hand out raw slices (every `getUpdates` failed to parse so).
#[derive(Debug, Clone, Serialize)]
pub struct GetUpdatesRaw {
    /// First update to return; confirms all earlier ones.
    pub offset: i64,
    /// Long-poll timeout, seconds.
    pub timeout: u32,
    /// 1–100 updates.
    pub limit: u8,
}
impl Payload for GetUpdatesRaw {
    type Output = Vec<Value>;
    const NAME: &'static str = "getUpdates";
    fn timeout_hint(&self) -> Option<Duration> {
        Some(Duration::from_secs(u64::from(self.timeout)))
    }
}

impl BotApi {
    /// A client for `api_url` (`https://api.telegram.org` or a fake).
    ///
    /// # Errors
    /// [`TelegramError::Transport`] when the URL is not an http(s) URL or the
    /// HTTP client cannot be built.
    pub fn new(api_url: &str, token: Secret, request_timeout: Duration) -> Result<Self, TelegramError> {
        let url = reqwest::Url::parse(api_url)
            .map_err(|e| TelegramError::Transport(format!("invalid TELEGRAM_API_URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() {
            return Err(TelegramError::Transport("TELEGRAM_API_URL must be an http(s) URL".into()));
        }
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(request_timeout)
            .build()
            .map_err(|e| TelegramError::Transport(e.without_url().to_string()))?;
        let bot = Bot::with_client(token.expose(), client).set_api_url(url);
        Ok(Self {
            bot,
            token,
            call_timeout: request_timeout,
            token_accepted: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
        })
    }

    /// This client with `timeout` as the longest exchange of one method call
    /// (file downloads keep the `request_timeout` of [`BotApi::new`]).
    #[must_use]
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// Sends any payload (`POST {api_url}/bot<token>/<method>`, JSON body)
    /// and classifies the answer by its `error_code` and `parameters` (Bot
    /// API, "Making requests" and "ResponseParameters"). The HTTP exchange
    /// is ours, not teloxide-core's: teloxide sleeps 10 s inside the call
    /// after any 5xx answer, which held a job's lease for nothing; retries
    /// and their backoff belong to the caller (the worker's pacer).
    ///
    /// # Errors
    /// A classified [`TelegramError`]: 5xx answers (an HTML page too),
    /// timeouts and connection failures are [`TelegramError::Transport`]
    /// (worth retrying); a 2xx–4xx answer that is not a Bot API answer, or
    /// `ok` without a `result`, is [`TelegramError::Api`] (not retried: the
    /// call may have taken effect); 429 [`TelegramError::RetryAfter`]; 403
    /// [`TelegramError::Forbidden`]; a `migrate_to_chat_id`
    /// [`TelegramError::Migrated`]; every other answer
    /// [`TelegramError::Api`] with Telegram's description (a 401 starts
    /// "Unauthorized").
    pub async fn call<P>(&self, payload: P) -> Result<P::Output, TelegramError>
    where
        P: Payload + Serialize + Send + 'static,
        P::Output: serde::de::DeserializeOwned + Send,
    {
        let timeout = payload.timeout_hint().map_or(self.call_timeout, |hint| hint + self.call_timeout);
        let result = self.exchange::<P>(&payload, timeout).await;
        match &result {
            Ok(_) => self.token_accepted.store(true, std::sync::atomic::Ordering::Relaxed),
            Err(TelegramError::Api(d)) if is_token_refusal(d) => {
                self.token_accepted.store(false, std::sync::atomic::Ordering::Relaxed);
            }
            Err(_) => {}
        }
        let outcome = match &result {
            Ok(_) => "ok",
            Err(TelegramError::RetryAfter(_)) => "retry_after",
            Err(TelegramError::Forbidden(_)) => "forbidden",
            Err(TelegramError::NotModified) => "not_modified",
            Err(TelegramError::BadEntities(_)) => "bad_entities",
            Err(TelegramError::Migrated(_)) => "migrated",
            Err(TelegramError::Api(_)) => "api_error",
            Err(TelegramError::Transport(_)) => "transport",
            Err(TelegramError::Aborted(_)) => "aborted",
        };
        metrics::counter!("fleet_telegram_calls_total", "method" => P::NAME, "result" => outcome).increment(1);
        result
    }

    /// One HTTP exchange of [`BotApi::call`], bounded by `timeout`.
    async fn exchange<P>(&self, payload: &P, timeout: Duration) -> Result<P::Output, TelegramError>
    where
        P: Payload + Serialize,
        P::Output: serde::de::DeserializeOwned,
    {
        let url = method_url(self.bot.api_url(), self.token.expose(), P::NAME)
            .ok_or_else(|| TelegramError::Transport("TELEGRAM_API_URL cannot be a base URL".into()))?;
        let transport = |e: reqwest::Error| {
            let what = if e.is_timeout() { "timed out" } else { "failed" };
            TelegramError::Transport(format!(
                "{} {what}: {}",
                P::NAME,
                scrub(&e.without_url().to_string(), &self.token)
            ))
        };
        let response = self.bot.client().post(url).json(payload).timeout(timeout).send().await.map_err(transport)?;
        let status = response.status();
        let body = response.bytes().await.map_err(transport)?;
        let envelope: Envelope<P::Output> = match serde_json::from_slice(&body) {
            Ok(e) => e,
            // An HTML error page of a proxy in front of the Bot API (502, 504).
            Err(_) if status.is_server_error() => {
                return Err(TelegramError::Transport(format!("{} answered HTTP {status}", P::NAME)));
            }
            // Not retried: the call may have taken effect (a proxy's page
            // in front of a working Bot API, a wrong base URL path), and a
            // `sendMessage` sent again would show twice.
            Err(e) => {
                return Err(TelegramError::Api(format!(
                    "{} answered HTTP {status} with a body that is not a Bot API answer: {e}",
                    P::NAME
                )));
            }
        };
        if envelope.ok {
            // Not retried: the call took effect.
            return envelope
                .result
                .ok_or_else(|| TelegramError::Api(format!("{} answered ok without a result", P::NAME)));
        }
        let description = scrub(envelope.description.as_deref().unwrap_or("(no description)"), &self.token);
        let code = envelope.error_code.unwrap_or(status.as_u16());
        Err(classify(code, description, envelope.parameters.unwrap_or_default()))
    }

    /// The flag [`BotApi::call`] keeps: false once the Bot API refused the
    /// token (401), true again after any successful call (for readiness and
    /// to stop taking jobs that could not be answered).
    pub fn token_accepted(&self) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
        self.token_accepted.clone()
    }

    /// `getMe`: the bot's own id and username.
    ///
    /// # Errors
    /// A classified [`TelegramError`].
    pub async fn get_me(&self) -> Result<Me, TelegramError> {
        self.call(GetMe {}).await
    }

    /// `deleteWebhook`, keeping pending updates (`drop_pending_updates: false`).
    ///
    /// # Errors
    /// A classified [`TelegramError`].
    pub async fn delete_webhook(&self) -> Result<(), TelegramError> {
        self.call(DeleteWebhook { drop_pending_updates: false }).await.map(|_| ())
    }

    /// `setMyCommands` for `language_code` (`None`: the default menu).
    ///
    /// # Errors
    /// A classified [`TelegramError`].
    pub async fn set_my_commands(
        &self,
        commands: Vec<BotCommand>,
        language_code: Option<&str>,
    ) -> Result<(), TelegramError> {
        self.call(SetMyCommands { commands, language_code: language_code.map(str::to_owned) }).await.map(|_| ())
    }

    /// `sendMessage` with optional entities.
    ///
    /// # Errors
    /// A classified [`TelegramError`].
    pub async fn send_message(
        &self,
        chat_id: i64,
        text: &str,
        entities: Option<Vec<Value>>,
    ) -> Result<SentMessage, TelegramError> {
        self.send_message_in(chat_id, None, None, text, entities).await
    }

    /// `sendMessage` into forum topic `thread` (`None`: the chat itself),
    /// as a reply to message `reply_to` of the chat when given (Bot API
    /// "ReplyParameters", with `allow_sending_without_reply`: the message
    /// is sent even when the original is gone).
    ///
    /// # Errors
    /// A classified [`TelegramError`].
    pub async fn send_message_in(
        &self,
        chat_id: i64,
        thread: Option<i64>,
        reply_to: Option<i64>,
        text: &str,
        entities: Option<Vec<Value>>,
    ) -> Result<SentMessage, TelegramError> {
        self.call(SendMessage {
            chat_id,
            message_thread_id: thread,
            text: text.to_owned(),
            entities,
            reply_parameters: reply_to
                .map(|message_id| serde_json::json!({ "message_id": message_id, "allow_sending_without_reply": true })),
            reply_markup: None,
        })
        .await
    }

    /// `editMessageText`; "message is not modified" is reported as
    /// [`TelegramError::NotModified`] for the caller to treat as success.
    ///
    /// # Errors
    /// A classified [`TelegramError`].
    pub async fn edit_message_text(
        &self,
        chat_id: i64,
        message_id: i64,
        text: &str,
        entities: Option<Vec<Value>>,
    ) -> Result<(), TelegramError> {
        self.call(EditMessageText { chat_id, message_id, text: text.to_owned(), entities }).await.map(|_| ())
    }

    /// `sendMessageDraft` (Bot API 9.3).
    ///
    /// # Errors
    /// A classified [`TelegramError`].
    pub async fn send_message_draft(
        &self,
        chat_id: i64,
        draft_id: i64,
        text: &str,
        entities: Option<Vec<Value>>,
    ) -> Result<(), TelegramError> {
        self.call(SendMessageDraft { chat_id, draft_id, text: text.to_owned(), entities }).await.map(|_| ())
    }

    /// `answerCallbackQuery` with an optional notice.
    ///
    /// # Errors
    /// A classified [`TelegramError`].
    pub async fn answer_callback_query(&self, id: &str, text: Option<&str>) -> Result<(), TelegramError> {
        self.call(AnswerCallbackQuery { callback_query_id: id.to_owned(), text: text.map(str::to_owned) })
            .await
            .map(|_| ())
    }

    /// `sendMessage` with an inline keyboard.
    ///
    /// # Errors
    /// A classified [`TelegramError`].
    pub async fn send_with_keyboard(
        &self,
        chat_id: i64,
        text: &str,
        keyboard: Value,
    ) -> Result<SentMessage, TelegramError> {
        self.call(SendMessage {
            chat_id,
            message_thread_id: None,
            text: text.to_owned(),
            entities: None,
            reply_parameters: None,
            reply_markup: Some(keyboard),
        })
        .await
    }

    /// `deleteMessage`.
    ///
    /// # Errors
    /// A classified [`TelegramError`].
    pub async fn delete_message(&self, chat_id: i64, message_id: i64) -> Result<(), TelegramError> {
        self.call(DeleteMessage { chat_id, message_id }).await.map(|_| ())
    }

    /// `sendChatAction` with `typing`.
    ///
    /// # Errors
    /// A classified [`TelegramError`].
    pub async fn send_typing(&self, chat_id: i64) -> Result<(), TelegramError> {
        self.send_typing_in(chat_id, None).await
    }

    /// `sendChatAction` with `typing` in forum topic `thread`.
    ///
    /// # Errors
    /// A classified [`TelegramError`].
    pub async fn send_typing_in(&self, chat_id: i64, thread: Option<i64>) -> Result<(), TelegramError> {
        self.call(SendChatAction { chat_id, message_thread_id: thread, action: "typing" }).await.map(|_| ())
    }

    /// `getFile`: the file's size and download path.
    ///
    /// # Errors
    /// A classified [`TelegramError`].
    pub async fn get_file(&self, file_id: &str) -> Result<FileInfo, TelegramError> {
        self.call(GetFile { file_id: file_id.to_owned() }).await
    }

    /// Downloads `{api_url}/file/bot<token>/<file_path>` (Bot API "getFile"),
    /// reading at most `max_bytes`: a larger `Content-Length` or body stops
    /// the download at once. Bounded by the client's request timeout.
    ///
    /// # Errors
    /// [`FileError::TooLarge`]; [`TelegramError::Transport`] for network
    /// failures and 5xx answers (worth retrying), [`TelegramError::RetryAfter`]
    /// for 429, [`TelegramError::Api`] for other answers. The token is never
    /// in the message.
    pub async fn download_file(&self, file_path: &str, max_bytes: u64) -> Result<Vec<u8>, FileError> {
        let url = file_url(self.bot.api_url(), self.token.expose(), file_path)
            .ok_or_else(|| TelegramError::Transport("TELEGRAM_API_URL cannot be a base URL".into()))?;
        let transport = |e: reqwest::Error| TelegramError::Transport(scrub(&e.without_url().to_string(), &self.token));
        let mut response = self.bot.client().get(url).send().await.map_err(transport)?;
        let status = response.status();
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            let wait = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(1);
            return Err(TelegramError::RetryAfter(Duration::from_secs(wait)).into());
        }
        if status.is_server_error() {
            return Err(TelegramError::Transport(format!("file download answered HTTP {status}")).into());
        }
        if !status.is_success() {
            return Err(TelegramError::Api(format!("file download answered HTTP {status}")).into());
        }
        if response.content_length().is_some_and(|n| n > max_bytes) {
            return Err(FileError::TooLarge(max_bytes));
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(transport)? {
            if (bytes.len() + chunk.len()) as u64 > max_bytes {
                return Err(FileError::TooLarge(max_bytes));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    }

    /// `getUpdates` for long polling: each update as JSON text, written
    /// again from the parsed answer (the same content as Telegram's; key
    /// order and number spelling may differ).
    ///
    /// # Errors
    /// A classified [`TelegramError`].
    pub async fn get_updates_raw(&self, offset: i64, timeout: u32) -> Result<Vec<Box<RawValue>>, TelegramError> {
        let updates = self.call(GetUpdatesRaw { offset, timeout, limit: 100 }).await?;
        updates
            .iter()
            .map(|u| {
                serde_json::value::to_raw_value(u)
                    .map_err(|e| TelegramError::Transport(format!("getUpdates: an update does not serialize: {e}")))
            })
            .collect()
    }
}

/// The answer of every Bot API method (Bot API, "Making requests"). A
/// `result` that does not have the expected shape fails the whole answer
/// (a decoding error, [`TelegramError::Transport`]).
#[derive(Debug, Deserialize)]
struct Envelope<T> {
    ok: bool,
    #[serde(default = "none")]
    result: Option<T>,
    #[serde(default)]
    error_code: Option<u16>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters: Option<ResponseParameters>,
}

fn none<T>() -> Option<T> {
    None
}

/// `ResponseParameters` (Bot API): why a failed call may be retried.
#[derive(Debug, Default, Deserialize)]
struct ResponseParameters {
    /// The group became a supergroup with this id.
    #[serde(default)]
    migrate_to_chat_id: Option<i64>,
    /// Seconds to wait (flood control).
    #[serde(default)]
    retry_after: Option<u64>,
}

/// The class of a failed answer: `code` is its `error_code` (or the HTTP
/// status), `description` Telegram's text with the token scrubbed.
fn classify(code: u16, description: String, parameters: ResponseParameters) -> TelegramError {
    if let Some(s) = parameters.retry_after {
        return TelegramError::RetryAfter(Duration::from_secs(s));
    }
    if code == 429 {
        // Flood control without a `retry_after`: a short pause.
        return TelegramError::RetryAfter(Duration::from_secs(1));
    }
    if let Some(id) = parameters.migrate_to_chat_id {
        return TelegramError::Migrated(id);
    }
    if code >= 500 {
        // Telegram's side failed: worth retrying like a network error.
        return TelegramError::Transport(format!("server error {code}: {description}"));
    }
    if description.contains("message is not modified") {
        return TelegramError::NotModified;
    }
    if description.contains("can't parse entities") {
        return TelegramError::BadEntities(description);
    }
    if code == 403 || description.starts_with("Forbidden") {
        return TelegramError::Forbidden(description);
    }
    if code == 401 && !is_token_refusal(&description) {
        return TelegramError::Api(format!("Unauthorized: {description}"));
    }
    TelegramError::Api(description)
}

/// `{api_url}/bot<token>/<method>` (the path of the base URL kept).
fn method_url(mut base: reqwest::Url, token: &str, method: &str) -> Option<reqwest::Url> {
    {
        let mut segments = base.path_segments_mut().ok()?;
        segments.pop_if_empty().push(&format!("bot{token}")).push(method);
    }
    Some(base)
}

/// `{api_url}/file/bot<token>/<file_path>`, each `/`-separated piece of
/// `file_path` a path segment of its own (teloxide-core's helper escapes the
/// `/` of `documents/file_1`).
fn file_url(mut base: reqwest::Url, token: &str, file_path: &str) -> Option<reqwest::Url> {
    {
        let mut segments = base.path_segments_mut().ok()?;
        segments.pop_if_empty().push("file").push(&format!("bot{token}"));
        segments.extend(file_path.split('/').filter(|s| !s.is_empty()));
    }
    Some(base)
}

/// A 401 answer (Bot API "Making requests": a wrong or revoked token);
/// teloxide spells it "Invalid bot token" (`ApiError::InvalidToken`).
pub fn is_token_refusal(description: &str) -> bool {
    description.contains("Invalid bot token") || description.starts_with("Unauthorized")
}

#[cfg(test)]
mod tests {

    use super::*;

    fn classified(code: u16, description: &str, parameters: &str) -> TelegramError {
        classify(code, description.to_owned(), serde_json::from_str(parameters).unwrap())
    }

    #[test]
    fn failed_answers_are_classified_by_code_and_parameters() {
        assert_eq!(
            classified(429, "Too Many Requests: retry after 7", r#"{"retry_after": 7}"#),
            TelegramError::RetryAfter(Duration::from_secs(7))
        );
        assert_eq!(
            classified(
                400,
                "Bad Request: group chat was upgraded to a supergroup chat",
                r#"{"migrate_to_chat_id": -1001}"#
            ),
            TelegramError::Migrated(-1001)
        );
        assert!(matches!(classified(502, "Bad Gateway", "{}"), TelegramError::Transport(_)));
        assert!(matches!(classified(500, "Internal Server Error: restart", "{}"), TelegramError::Transport(_)));
        assert_eq!(
            classified(400, "Bad Request: message is not modified: specified new message content", "{}"),
            TelegramError::NotModified
        );
        assert!(matches!(
            classified(400, "Bad Request: can't parse entities: Unsupported start tag", "{}"),
            TelegramError::BadEntities(_)
        ));
        assert!(matches!(classified(403, "Forbidden: bot was blocked by the user", "{}"), TelegramError::Forbidden(_)));
        let refused = classified(401, "Unauthorized", "{}");
        assert!(matches!(&refused, TelegramError::Api(d) if is_token_refusal(d)), "{refused:?}");
        assert!(matches!(classified(400, "Bad Request: chat not found", "{}"), TelegramError::Api(_)));
    }

    #[test]
    fn method_urls_keep_the_path_of_the_base() {
        let base = reqwest::Url::parse("https://example.com/tg/").unwrap();
        assert_eq!(
            method_url(base, "1:x", "sendMessage").unwrap().as_str(),
            "https://example.com/tg/bot1:x/sendMessage"
        );
        let base = reqwest::Url::parse("http://127.0.0.1:8081").unwrap();
        assert_eq!(method_url(base, "1:x", "getMe").unwrap().as_str(), "http://127.0.0.1:8081/bot1:x/getMe");
    }

    #[test]
    fn file_urls_keep_the_path_of_the_base_and_the_slashes_of_the_file_path() {
        let base = reqwest::Url::parse("https://example.com/tg/").unwrap();
        let url = file_url(base, "123:abc", "documents/file_1.pdf").unwrap();
        assert_eq!(url.as_str(), "https://example.com/tg/file/bot123:abc/documents/file_1.pdf");
        let base = reqwest::Url::parse("http://127.0.0.1:8081").unwrap();
        assert_eq!(file_url(base, "1:x", "a/b").unwrap().as_str(), "http://127.0.0.1:8081/file/bot1:x/a/b");
    }

    #[tokio::test]
    async fn a_failed_download_never_shows_the_token() {
        // Nothing listens on port 9 of localhost: the connection is refused.
        let api = BotApi::new("http://127.0.0.1:9", Secret::new("4242:SECRETTOKEN"), Duration::from_secs(2)).unwrap();
        let err = api.download_file("documents/file_1", 10).await.unwrap_err();
        let text = format!("{err} {err:?}");
        assert!(!text.contains("SECRETTOKEN"), "{text}");
        assert!(matches!(err, FileError::Telegram(TelegramError::Transport(_))), "{err:?}");
    }
}
