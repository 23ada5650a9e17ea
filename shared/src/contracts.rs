//! Messages that travel over the broker between our own processes:
//! versioned, tagged serde enums (`"type": "usage_charge.v1"`). Money is a
//! string in JSON (exact Decimal). Telegram updates are not here: the ingress
//! forwards them verbatim.

use crate::money::Usd;
use crate::pricing::TokenCounts;
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Namespace of our deterministic (v5) event ids.
pub const EVENT_NAMESPACE: Uuid = Uuid::from_u128(0x6f1e_2b8a_41c3_4d0e_9a57_3c2f_8e61_b0d4);

/// The event id of the usage charge of API call `seq` of `job_id`: the same
/// whenever the work is redone, so the ledger applies it once (DESIGN P7).
pub fn usage_event_id(job_id: Uuid, seq: i32) -> Uuid {
    Uuid::new_v5(&EVENT_NAMESPACE, format!("usage:{job_id}:{seq}").as_bytes())
}

/// The event id of call `seq` of an abandoned attempt (lease `epoch`) of
/// `job_id`: distinct from every charge of the attempt that answered.
pub fn abandoned_usage_event_id(job_id: Uuid, epoch: i64, seq: i32) -> Uuid {
    Uuid::new_v5(&EVENT_NAMESPACE, format!("abandoned:{job_id}:{epoch}:{seq}").as_bytes())
}

/// The event id of the charge of tool call `tool_use_id` of `job_id`.
pub fn tool_event_id(job_id: Uuid, tool_use_id: &str) -> Uuid {
    Uuid::new_v5(&EVENT_NAMESPACE, format!("tool:{job_id}:{tool_use_id}").as_bytes())
}

/// The event id of a grant made with an idempotency key.
pub fn grant_event_id(idempotency_key: &str) -> Uuid {
    Uuid::new_v5(&EVENT_NAMESPACE, format!("grant:{idempotency_key}").as_bytes())
}

/// A billing event, published by the outbox relay, applied once by the
/// billing-worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum BillingEvent {
    /// Provider usage of one Messages API call, and what the user pays for it.
    #[serde(rename = "usage_charge.v1")]
    UsageCharge(UsageCharge),
    /// A successful call of one of our own tools.
    #[serde(rename = "tool_charge.v1")]
    ToolCharge(ToolCharge),
    /// Credit bought with Telegram Stars.
    #[serde(rename = "top_up.v1")]
    TopUp(TopUp),
    /// A job's charges are all written: its hold is settled.
    #[serde(rename = "hold_release.v1")]
    HoldRelease(HoldRelease),
}

/// The event id of a job's hold release.
pub fn hold_release_event_id(job_id: Uuid) -> Uuid {
    Uuid::new_v5(&EVENT_NAMESPACE, format!("release:{job_id}").as_bytes())
}

/// Settles a job's hold; relayed after the job's charges.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HoldRelease {
    /// [`hold_release_event_id`] of the job.
    pub event_id: Uuid,
    /// The job whose hold is settled.
    pub job_id: Uuid,
    /// Its user.
    pub user_id: i64,
    /// Every charge of the job (usage and tool charges). The ledger settles
    /// the hold only once all of them are applied, so the user's available
    /// balance never omits a charge that is still in a retry queue. Absent
    /// in events written before this field existed (then settled at once).
    #[serde(default)]
    pub charge_event_ids: Vec<Uuid>,
}

/// The event id of a Stars payment: one credit per `telegram_payment_charge_id`.
pub fn top_up_event_id(telegram_payment_charge_id: &str) -> Uuid {
    Uuid::new_v5(&EVENT_NAMESPACE, format!("stars:{telegram_payment_charge_id}").as_bytes())
}

/// The event id of the refund of a Stars payment.
pub fn refund_event_id(telegram_payment_charge_id: &str) -> Uuid {
    Uuid::new_v5(&EVENT_NAMESPACE, format!("stars-refund:{telegram_payment_charge_id}").as_bytes())
}

/// A successful Telegram Stars payment (Bot API "Payments in Telegram Stars").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TopUp {
    /// [`top_up_event_id`] of the charge.
    pub event_id: Uuid,
    /// Who paid.
    pub user_id: i64,
    /// Chat the payment came from.
    pub chat_id: i64,
    /// Stars paid (`total_amount`, currency `XTR`).
    pub stars: i64,
    /// Credit granted, USD.
    pub credit: Usd,
    /// Telegram's charge id (needed to refund).
    pub telegram_payment_charge_id: String,
    /// When the payment arrived.
    pub occurred_at: DateTime<Utc>,
}

impl BillingEvent {
    /// The [`kind`](Self::kind) of [`Self::UsageCharge`].
    pub const USAGE_CHARGE: &'static str = "usage_charge.v1";
    /// The [`kind`](Self::kind) of [`Self::ToolCharge`].
    pub const TOOL_CHARGE: &'static str = "tool_charge.v1";
    /// The [`kind`](Self::kind) of [`Self::TopUp`].
    pub const TOP_UP: &'static str = "top_up.v1";
    /// The [`kind`](Self::kind) of [`Self::HoldRelease`].
    pub const HOLD_RELEASE: &'static str = "hold_release.v1";
    /// Every event's [`kind`](Self::kind), in declaration order.
    pub const KINDS: [&'static str; 4] = [Self::USAGE_CHARGE, Self::TOOL_CHARGE, Self::TOP_UP, Self::HOLD_RELEASE];

    /// The serde tag of the event (`"type"` in JSON, `applied_events.kind`
    /// in the billing database): SQL binds this, never a literal tag.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::UsageCharge(_) => Self::USAGE_CHARGE,
            Self::ToolCharge(_) => Self::TOOL_CHARGE,
            Self::TopUp(_) => Self::TOP_UP,
            Self::HoldRelease(_) => Self::HOLD_RELEASE,
        }
    }

    /// The idempotency key.
    pub fn event_id(&self) -> Uuid {
        match self {
            Self::UsageCharge(c) => c.event_id,
            Self::ToolCharge(c) => c.event_id,
            Self::TopUp(c) => c.event_id,
            Self::HoldRelease(c) => c.event_id,
        }
    }

    /// The user charged.
    pub fn user_id(&self) -> i64 {
        match self {
            Self::UsageCharge(c) => c.user_id,
            Self::ToolCharge(c) => c.user_id,
            Self::TopUp(c) => c.user_id,
            Self::HoldRelease(c) => c.user_id,
        }
    }
}

/// Usage of one Messages API call (tokens as reported, costs exact).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UsageCharge {
    /// [`usage_event_id`] of (job, seq).
    pub event_id: Uuid,
    /// The job the call belongs to.
    pub job_id: Uuid,
    /// Telegram update that started the job.
    pub update_id: i64,
    /// Lease epoch under which the call ran.
    pub lease_epoch: i64,
    /// 1-based number of the call within the job.
    pub api_call_seq: i32,
    /// The user charged.
    pub user_id: i64,
    /// The chat.
    pub chat_id: i64,
    /// Anthropic's `request-id`.
    pub request_id: Option<String>,
    /// Model id as reported.
    pub model: String,
    /// Tokens by class.
    pub tokens: TokenCounts,
    /// What Anthropic bills, USD.
    pub provider_cost: Usd,
    /// What the user pays, USD.
    pub user_charge: Usd,
    /// `match` of the price row used.
    pub price_model: String,
    /// `effective_from` of the price row used.
    pub price_effective_from: NaiveDate,
    /// Output counted by us (call cut short), not reported by the API.
    pub estimated: bool,
    /// A call of an attempt that lost its lease or was handed back: its
    /// provider cost is recorded, the user is not charged
    /// (`user_charge` is zero; the ledger posts no user leg).
    #[serde(default)]
    pub abandoned: bool,
    /// When the worker recorded it.
    pub occurred_at: DateTime<Utc>,
}

/// A successful call of one of our own tools.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolCharge {
    /// [`tool_event_id`] of (job, tool_use_id).
    pub event_id: Uuid,
    /// The job.
    pub job_id: Uuid,
    /// The user charged.
    pub user_id: i64,
    /// The chat.
    pub chat_id: i64,
    /// Claude's `tool_use` id.
    pub tool_use_id: String,
    /// Tool name.
    pub tool_name: String,
    /// Price, USD (not marked up).
    pub user_charge: Usd,
    /// The answer never reached the user: the run is recorded, nothing is
    /// charged (`user_charge` is zero; the ledger posts nothing).
    #[serde(default)]
    pub waived: bool,
    /// When the tool ran.
    pub occurred_at: DateTime<Utc>,
}

/// A message type the fleet puts on the broker ([`crate::amqp::ConfirmPublisher::send`]).
pub trait Contract: Serialize {
    /// The AMQP `message-id` (the consumers' idempotency key), if the type has one.
    fn message_id(&self) -> Option<String> {
        None
    }
}

/// The work queue's message (`updates`): "take job of update `update_id`
/// in" — published at hand-off from an intake shard, at hand-back, by the
/// reaper and through the delay queues. On the wire `{"update_id": N}`, the
/// shape of an update without a payload, so intake reads it as the known
/// update it is and resumes its job; untagged on purpose, so messages
/// already queued by older workers stay valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkItem {
    /// The update whose job is to be claimed.
    pub update_id: i64,
}

impl Contract for WorkItem {}

impl Contract for ControlMessage {}

impl Contract for BillingEvent {
    fn message_id(&self) -> Option<String> {
        Some(self.event_id().to_string())
    }
}

/// A cross-host signal on the `control` fanout exchange.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ControlMessage {
    /// Cancel the generation running in this chat, wherever it runs.
    #[serde(rename = "stop.v1")]
    Stop {
        /// The chat whose generation stops.
        chat_id: i64,
        /// The `/stop` update.
        update_id: i64,
        /// Only this job (a group member stopping their own answer);
        /// absent: whatever runs in the chat. Absent in messages of older
        /// workers, which keeps them valid.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        job_id: Option<uuid::Uuid>,
    },
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_work_item_is_an_update_without_a_payload_on_the_wire() {
        let body = serde_json::to_vec(&WorkItem { update_id: 42 }).unwrap();
        assert_eq!(body, br#"{"update_id":42}"#);
        // What older workers published still reads as a work item.
        let old: WorkItem = serde_json::from_str(r#"{"update_id": 42}"#).unwrap();
        assert_eq!(old, WorkItem { update_id: 42 });
        let info = crate::telegram::RoutingInfo::from_bytes(&body).unwrap();
        assert_eq!(info.update_id, 42);
    }

    use super::*;

    #[test]
    fn event_ids_are_deterministic_and_distinct() {
        let job = Uuid::now_v7();
        assert_eq!(usage_event_id(job, 1), usage_event_id(job, 1));
        assert_ne!(usage_event_id(job, 1), usage_event_id(job, 2));
        assert_ne!(usage_event_id(job, 1), tool_event_id(job, "1"));
    }

    #[test]
    fn events_are_tagged_and_money_is_a_string() {
        let ev = BillingEvent::ToolCharge(ToolCharge {
            event_id: Uuid::nil(),
            job_id: Uuid::nil(),
            user_id: 1,
            chat_id: 1,
            tool_use_id: "t".into(),
            tool_name: "calculator".into(),
            user_charge: "0.0005".parse().unwrap(),
            waived: false,
            occurred_at: Utc::now(),
        });
        let json = serde_json::to_value(&ev).unwrap();
        assert_eq!(json["type"], "tool_charge.v1");
        assert_eq!(json["type"], ev.kind());
        assert_eq!(json["user_charge"], "0.0005");
        let back: BillingEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back, ev);
    }

    #[test]
    fn the_kinds_are_exactly_the_serde_tags_of_billing_event() {
        let source = include_str!("contracts.rs");
        let start = source.find("pub enum BillingEvent").unwrap();
        let body = &source[start..start + source[start..].find("\n}").unwrap()];
        let tags: Vec<&str> = body.split("#[serde(rename = \"").skip(1).filter_map(|s| s.split('"').next()).collect();
        assert_eq!(tags, BillingEvent::KINDS);
        let release = BillingEvent::HoldRelease(HoldRelease {
            event_id: Uuid::nil(),
            job_id: Uuid::nil(),
            user_id: 1,
            charge_event_ids: Vec::new(),
        });
        assert_eq!(serde_json::to_value(&release).unwrap()["type"], release.kind());
    }
}
