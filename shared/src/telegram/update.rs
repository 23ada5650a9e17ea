//! Reading Telegram `Update` objects (Bot API, "Getting updates" → `Update`).
//!
//! The ingress reads only [`RoutingInfo`]; the worker turns the raw bytes into
//! [`Incoming`], the few kinds it acts on, and ignores the rest.

use serde::Deserialize;
use serde_json::{Map, Value};

/// Why a body is not an update.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UpdateError {
    /// Not JSON, or not a JSON object.
    #[error("body is not a JSON object: {0}")]
    NotAnObject(String),
    /// `update_id` is missing or not an integer.
    #[error("update_id is missing or not an integer")]
    NoUpdateId,
}

/// What the ingress needs to route an update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingInfo {
    /// Telegram's `update_id`.
    pub update_id: i64,
    /// The chat the update belongs to, when it has one.
    pub chat_id: Option<i64>,
    /// The update's kind: the name of its one optional field (`message`, …).
    pub kind: String,
}

impl RoutingInfo {
    /// Reads `update_id`, kind and chat id of a raw update.
    ///
    /// # Errors
    /// [`UpdateError`] when the body is not an object with an integer `update_id`.
    pub fn from_bytes(body: &[u8]) -> Result<Self, UpdateError> {
        let map: Map<String, Value> =
            serde_json::from_slice(body).map_err(|e| UpdateError::NotAnObject(e.to_string()))?;
        let update_id = map.get("update_id").and_then(Value::as_i64).ok_or(UpdateError::NoUpdateId)?;
        let (kind, payload) = map
            .iter()
            .find(|(k, _)| k.as_str() != "update_id")
            .map(|(k, v)| (k.clone(), Some(v)))
            .unwrap_or_else(|| ("empty".to_owned(), None));
        let chat_id = payload
            .and_then(|p| p.pointer("/chat/id").or_else(|| p.pointer("/message/chat/id")).and_then(Value::as_i64));
        Ok(Self { update_id, chat_id, kind })
    }
}

/// A Telegram `User` (the fields we keep).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct User {
    /// User id.
    pub id: i64,
    /// True for bots.
    #[serde(default)]
    pub is_bot: bool,
    /// First name.
    #[serde(default)]
    pub first_name: String,
    /// `@username` without the `@`.
    #[serde(default)]
    pub username: Option<String>,
    /// IETF language tag.
    #[serde(default)]
    pub language_code: Option<String>,
}

/// A Telegram `Chat` (the fields we keep).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Chat {
    /// Chat id (negative for groups).
    pub id: i64,
    /// `private`, `group`, `supergroup` or `channel`.
    #[serde(rename = "type")]
    pub kind: String,
}

/// A `MessageEntity` of an incoming message (offsets in UTF-16 code units).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Entity {
    /// `bot_command`, `mention`, …
    #[serde(rename = "type")]
    pub kind: String,
    /// Start, UTF-16 code units.
    pub offset: usize,
    /// Length, UTF-16 code units.
    pub length: usize,
}

/// A Telegram `Message` (the fields we keep).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Message {
    /// Id within the chat.
    pub message_id: i64,
    /// Sender; absent for channel posts.
    #[serde(default)]
    pub from: Option<User>,
    /// The chat.
    pub chat: Chat,
    /// Text, for text messages.
    #[serde(default)]
    pub text: Option<String>,
    /// Entities of the text.
    #[serde(default)]
    pub entities: Vec<Entity>,
    /// The message thread (forum topic, or a reply thread) it belongs to.
    #[serde(default)]
    pub message_thread_id: Option<i64>,
    /// True for a message sent to a forum topic.
    #[serde(default)]
    pub is_topic_message: bool,
    /// The message this one replies to.
    #[serde(default)]
    pub reply_to_message: Option<Box<Message>>,
    /// A payment that went through (service message).
    #[serde(default)]
    pub successful_payment: Option<SuccessfulPayment>,
    /// The group became the supergroup with this id (service message in the old chat).
    #[serde(default)]
    pub migrate_to_chat_id: Option<i64>,
    /// The supergroup was the group with this id (service message in the new chat).
    #[serde(default)]
    pub migrate_from_chat_id: Option<i64>,
    /// A file sent as a document (its text, if any, is in `caption`).
    #[serde(default)]
    pub document: Option<Document>,
    /// Caption of a document, photo, … (0–1,024 characters).
    #[serde(default)]
    pub caption: Option<String>,
    /// Media the bot does not read (Bot API "Message": `photo`, `voice`,
    /// `video`, `video_note`, `audio`, `sticker`, `animation`): only their
    /// presence is kept, as the kind ([`Message::media_kind`]).
    #[serde(default, flatten)]
    pub media: Media,
}

/// Which unsupported media a message carries; each field is present or not
/// (its content is not parsed).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct Media {
    #[serde(default)]
    photo: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    voice: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    video: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    video_note: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    audio: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    sticker: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    animation: Option<serde::de::IgnoredAny>,
}

/// `Document`: a general file (Bot API, "Document"); download it with
/// `getFile` (at most 20 MB through the public Bot API).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Document {
    /// Id for `getFile`; valid for this bot only.
    pub file_id: String,
    /// The same for every bot and over time: what deduplicates a file.
    pub file_unique_id: String,
    /// Name given by the sender.
    #[serde(default)]
    pub file_name: Option<String>,
    /// MIME type given by the sender.
    #[serde(default)]
    pub mime_type: Option<String>,
    /// Size in bytes, when known.
    #[serde(default)]
    pub file_size: Option<u64>,
}

/// `SuccessfulPayment` (the fields we keep).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct SuccessfulPayment {
    /// `XTR` for Telegram Stars.
    pub currency: String,
    /// Price in the smallest units (Stars).
    pub total_amount: i64,
    /// Our invoice payload.
    pub invoice_payload: String,
    /// Telegram's id of the charge (refunds need it).
    pub telegram_payment_charge_id: String,
}

/// `CallbackQuery` (an inline button was pressed).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct CallbackQuery {
    /// Query id, to answer.
    pub id: String,
    /// Who pressed.
    pub from: User,
    /// The message with the button.
    #[serde(default)]
    pub message: Option<CallbackMessage>,
    /// The button's `callback_data`.
    #[serde(default)]
    pub data: Option<String>,
}

/// The message of a callback (the fields we keep).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct CallbackMessage {
    /// Its id.
    pub message_id: i64,
    /// Its chat.
    pub chat: Chat,
}

/// `PreCheckoutQuery`: must be answered within 10 s.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct PreCheckoutQuery {
    /// Query id, to answer.
    pub id: String,
    /// Who pays.
    pub from: User,
    /// `XTR`.
    pub currency: String,
    /// Stars.
    pub total_amount: i64,
    /// Our invoice payload.
    pub invoice_payload: String,
}

/// `my_chat_member`: the bot's own membership changed (blocked, unblocked).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ChatMemberUpdated {
    /// The chat.
    pub chat: Chat,
    /// Who changed it.
    pub from: User,
    /// The bot's new membership.
    pub new_chat_member: ChatMember,
}

/// A chat member (the status only).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ChatMember {
    /// `member`, `kicked`, `left`, …
    pub status: String,
}

/// The kinds of update the worker acts on; everything else is `Ignored`.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// A new message (boxed: it is much larger than the other variants).
    Message(Box<Message>),
    /// The bot was blocked or unblocked by a user (`my_chat_member`).
    MyChatMember(ChatMemberUpdated),
    /// An inline button was pressed.
    CallbackQuery(CallbackQuery),
    /// A payment is about to be made.
    PreCheckoutQuery(PreCheckoutQuery),
    /// Any other kind (edits, reactions, kinds newer than this build).
    Ignored {
        /// The update's kind.
        kind: String,
    },
}

impl Incoming {
    /// Reads the typed view of a raw update. A known kind whose body does not
    /// have the expected shape is `Ignored` with a kind naming the problem,
    /// never a panic.
    ///
    /// # Errors
    /// [`UpdateError`] when the body is not an update at all.
    pub fn parse(body: &[u8]) -> Result<(i64, Incoming), UpdateError> {
        let info = RoutingInfo::from_bytes(body)?;
        let map: Map<String, Value> =
            serde_json::from_slice(body).map_err(|e| UpdateError::NotAnObject(e.to_string()))?;
        let payload = map.get(&info.kind).cloned().unwrap_or(Value::Null);
        let incoming = match info.kind.as_str() {
            "message" => match serde_json::from_value(payload) {
                Ok(m) => Incoming::Message(Box::new(m)),
                Err(e) => Incoming::Ignored { kind: format!("message (malformed: {e})") },
            },
            "my_chat_member" => match serde_json::from_value(payload) {
                Ok(m) => Incoming::MyChatMember(m),
                Err(e) => Incoming::Ignored { kind: format!("my_chat_member (malformed: {e})") },
            },
            "callback_query" => match serde_json::from_value(payload) {
                Ok(q) => Incoming::CallbackQuery(q),
                Err(e) => Incoming::Ignored { kind: format!("callback_query (malformed: {e})") },
            },
            "pre_checkout_query" => match serde_json::from_value(payload) {
                Ok(q) => Incoming::PreCheckoutQuery(q),
                Err(e) => Incoming::Ignored { kind: format!("pre_checkout_query (malformed: {e})") },
            },
            other => Incoming::Ignored { kind: other.to_owned() },
        };
        Ok((info.update_id, incoming))
    }
}

impl Message {
    /// The bot command this message starts with (`/start@bot args` → `start`),
    /// from its `bot_command` entity at offset 0.
    pub fn command(&self) -> Option<String> {
        let cmd = self.command_entity()?;
        Some(cmd.split('@').next().unwrap_or(&cmd).to_lowercase())
    }

    /// The bot a command is addressed to (`/new@other_bot` → `other_bot`),
    /// `None` for a bare command (Bot API, "Commands": in groups a command
    /// may name its bot after `@`; another bot's command is not ours).
    pub fn command_target(&self) -> Option<String> {
        let cmd = self.command_entity()?;
        cmd.split_once('@').map(|(_, bot)| bot.to_owned())
    }

    /// The text of the `bot_command` entity at offset 0, without the `/`
    /// (entity lengths are UTF-16 code units).
    fn command_entity(&self) -> Option<String> {
        let text = self.text.as_deref()?;
        let entity = self.entities.iter().find(|e| e.kind == "bot_command" && e.offset == 0)?;
        let units: Vec<u16> = text.encode_utf16().take(entity.length).collect();
        let cmd = String::from_utf16_lossy(&units);
        Some(cmd.trim_start_matches('/').to_owned())
    }

    /// True when the text (or a document's caption) mentions `@username`
    /// (case-insensitive).
    pub fn mentions(&self, username: &str) -> bool {
        let Some(text) = self.text.as_deref().or(self.caption.as_deref()) else { return false };
        // A mention is `@` and a whole username (Telegram usernames are
        // `[A-Za-z0-9_]`, matched case-insensitively): `@fleet_bot_staging`
        // is another bot, not a mention of `@fleet_bot`. Commands addressed
        // to the bot (`/start@fleet_bot`) count.
        let is_name_char = |c: char| c.is_ascii_alphanumeric() || c == '_';
        text.split('@').skip(1).any(|rest| {
            let name: &str = rest.split(|c: char| !is_name_char(c)).next().unwrap_or_default();
            !name.is_empty() && name.eq_ignore_ascii_case(username)
        })
    }

    /// The forum topic to answer in: `message_thread_id` of a topic message
    /// (Bot API: "for forum supergroups only"), `None` elsewhere.
    pub fn topic(&self) -> Option<i64> {
        self.message_thread_id.filter(|_| self.is_topic_message)
    }

    /// True in private chats.
    pub fn is_private(&self) -> bool {
        self.chat.kind == "private"
    }

    /// The kind of media the message carries that the bot does not read
    /// (`"photo"`, `"voice message"`, …), if any.
    pub fn media_kind(&self) -> Option<&'static str> {
        let m = &self.media;
        [
            (m.photo.is_some(), "photo"),
            (m.voice.is_some(), "voice message"),
            (m.video.is_some(), "video"),
            (m.video_note.is_some(), "video message"),
            (m.audio.is_some(), "audio file"),
            (m.sticker.is_some(), "sticker"),
            (m.animation.is_some(), "animation"),
        ]
        .into_iter()
        .find_map(|(present, kind)| present.then_some(kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_reads_the_chat_of_any_kind() {
        let r =
            RoutingInfo::from_bytes(br#"{"update_id":5,"callback_query":{"id":"1","message":{"chat":{"id":-42}}}}"#)
                .unwrap();
        assert_eq!((r.update_id, r.chat_id, r.kind.as_str()), (5, Some(-42), "callback_query"));
        let r = RoutingInfo::from_bytes(br#"{"update_id":6,"some_future_update":{"x":1}}"#).unwrap();
        assert_eq!(r.chat_id, None);
    }

    #[test]
    fn bodies_without_an_integer_update_id_are_rejected() {
        assert_eq!(RoutingInfo::from_bytes(br#"{"update_id":"5"}"#), Err(UpdateError::NoUpdateId));
        assert_eq!(RoutingInfo::from_bytes(br#"{"update_id":5.5}"#), Err(UpdateError::NoUpdateId));
        assert!(matches!(RoutingInfo::from_bytes(b"[1]"), Err(UpdateError::NotAnObject(_))));
        assert!(matches!(RoutingInfo::from_bytes(b"nope"), Err(UpdateError::NotAnObject(_))));
    }

    #[test]
    fn commands_and_mentions_are_recognised() {
        let (_, inc) = Incoming::parse(br#"{"update_id":1,"message":{"message_id":1,"chat":{"id":1,"type":"private"},"text":"/Start@fleet_bot hi","entities":[{"type":"bot_command","offset":0,"length":16}]}}"#).unwrap();
        let Incoming::Message(m) = inc else { panic!("not a message") };
        assert_eq!(m.command().as_deref(), Some("start"));
        assert_eq!(m.command_target().as_deref(), Some("fleet_bot"));
        assert!(m.mentions("Fleet_Bot"));
        assert!(!m.mentions("fleet"), "a prefix of the username is not a mention");
    }

    #[test]
    fn a_document_is_read_with_its_caption() {
        let (_, inc) = Incoming::parse(br#"{"update_id":2,"message":{"message_id":3,"chat":{"id":-5,"type":"group"},"caption":"@Fleet_bot read this","document":{"file_id":"BQAC","file_unique_id":"AgAD","file_name":"a.txt","mime_type":"text/plain","file_size":12}}}"#).unwrap();
        let Incoming::Message(m) = inc else { panic!("not a message") };
        let doc = m.document.as_ref().unwrap();
        assert_eq!((doc.file_id.as_str(), doc.file_size), ("BQAC", Some(12)));
        assert_eq!(doc.file_name.as_deref(), Some("a.txt"));
        assert!(m.text.is_none());
        assert!(m.mentions("fleet_bot"));
    }

    #[test]
    fn a_malformed_message_is_ignored_not_a_panic() {
        let (_, inc) = Incoming::parse(br#"{"update_id":1,"message":{"chat":"x"}}"#).unwrap();
        assert!(matches!(inc, Incoming::Ignored { .. }));
    }

    #[test]
    fn deeply_nested_json_is_an_error_not_a_stack_overflow() {
        // 100,000 nested arrays inside an update: serde_json's recursion limit
        // turns this into an error instead of blowing the stack.
        let depth = 100_000;
        let mut body = br#"{"update_id":7,"message":{"chat":{"id":1},"x":"#.to_vec();
        body.extend(std::iter::repeat_n(b'[', depth));
        body.extend(std::iter::repeat_n(b']', depth));
        body.extend(b"}}");
        assert!(matches!(RoutingInfo::from_bytes(&body), Err(UpdateError::NotAnObject(_))));
        assert!(matches!(Incoming::parse(&body), Err(UpdateError::NotAnObject(_))));
        // Unbalanced (never closed) is an error too.
        let open: Vec<u8> = std::iter::repeat_n(b'{', depth).collect();
        assert!(matches!(RoutingInfo::from_bytes(&open), Err(UpdateError::NotAnObject(_))));
    }

    #[test]
    fn invalid_utf8_is_not_an_object() {
        let body = b"{\"update_id\":1,\"message\":{\"text\":\"\xff\xfe\"}}";
        assert!(matches!(RoutingInfo::from_bytes(body), Err(UpdateError::NotAnObject(_))));
        assert!(matches!(Incoming::parse(body), Err(UpdateError::NotAnObject(_))));
    }

    #[test]
    fn extreme_update_ids_are_read_exactly_or_rejected() {
        let r = RoutingInfo::from_bytes(br#"{"update_id":9223372036854775807,"message":{"chat":{"id":3}}}"#).unwrap();
        assert_eq!((r.update_id, r.chat_id), (i64::MAX, Some(3)));
        // Negative ids are not Telegram's, but are an integer: accepted verbatim.
        let r = RoutingInfo::from_bytes(br#"{"update_id":-5,"message":{"chat":{"id":3}}}"#).unwrap();
        assert_eq!(r.update_id, -5);
        let r = RoutingInfo::from_bytes(br#"{"update_id":-9223372036854775808}"#).unwrap();
        assert_eq!((r.update_id, r.kind.as_str()), (i64::MIN, "empty"));
        // Beyond i64 (one past the max, u64::MAX, a float-only number): no update id.
        for body in [
            &br#"{"update_id":9223372036854775808}"#[..],
            br#"{"update_id":18446744073709551615}"#,
            br#"{"update_id":1e300}"#,
            br#"{"update_id":123456789012345678901234567890}"#,
        ] {
            assert_eq!(
                RoutingInfo::from_bytes(body),
                Err(UpdateError::NoUpdateId),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn a_chat_id_beyond_i64_routes_as_no_chat_not_a_wrapped_id() {
        let r = RoutingInfo::from_bytes(br#"{"update_id":1,"message":{"chat":{"id":18446744073709551615}}}"#).unwrap();
        assert_eq!(r.chat_id, None);
    }

    #[test]
    fn a_mention_is_a_whole_username_never_a_prefix_of_another() {
        let msg = |text: &str| -> Message {
            let body = serde_json::json!({"update_id": 1, "message": {"message_id": 1, "chat": {"id": -5, "type": "group"}, "text": text}});
            let (_, inc) = Incoming::parse(body.to_string().as_bytes()).unwrap();
            let Incoming::Message(m) = inc else { panic!("not a message") };
            *m
        };
        assert!(!msg("@fleet_test_bot_staging what is the deploy status?").mentions("fleet_test_bot"));
        assert!(msg("@Fleet_Test_Bot what does a pilot do?").mentions("fleet_test_bot"));
        assert!(msg("ask @fleet_test_bot, please").mentions("fleet_test_bot"));
        assert!(!msg("mail me at x@fleet_test_botnet.org").mentions("fleet_test_bot"));
        assert!(!msg("@").mentions("fleet_test_bot"));
    }
}
