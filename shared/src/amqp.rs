//! Broker topology (DESIGN §3), declared idempotently by every process, and
//! the confirming publisher every publish goes through.
//!
//! All names carry a prefix (empty in production) so that tests and demo
//! runs can share one broker without seeing each other's messages.

use lapin::options::{
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind};
use std::time::Duration;
use tokio::sync::Mutex;

/// Broker errors, classified for the caller.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Connecting, declaring or publishing failed at the protocol level.
    #[error("amqp error: {0}")]
    Amqp(#[from] lapin::Error),
    /// The broker nacked the publish.
    #[error("publish was nacked by the broker")]
    Nacked,
    /// The broker returned the (mandatory) publish: no queue is bound.
    #[error("publish was returned unroutable: {0}")]
    Returned(String),
    /// No confirm arrived in time.
    #[error("no publisher confirm within {0:?}")]
    ConfirmTimeout(Duration),
    /// Connecting took too long.
    #[error("broker connect timed out after {0:?}")]
    ConnectTimeout(Duration),
}

/// Names of every exchange and queue, with the deployment's prefix.
#[derive(Clone, Debug)]
pub struct Topology {
    /// Prepended to every name (`""` in production, `t123_` in a test).
    pub prefix: String,
    /// Delays of the `updates.retry.<ms>` queues, milliseconds.
    pub update_retry_delays_ms: Vec<u64>,
    /// Default delays of the `billing.retry.<n>` steps, milliseconds (the
    /// number of steps is fixed: every process declares the same queues).
    pub billing_retry_delays_ms: Vec<u64>,
    /// Deliveries of one message before the quorum queue dead-letters it.
    pub delivery_limit: i64,
}

impl Topology {
    /// The production topology with `prefix`.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            update_retry_delays_ms: vec![250, 1_000, 5_000],
            billing_retry_delays_ms: vec![1_000, 5_000, 30_000, 120_000, 600_000],
            delivery_limit: 10,
        }
    }
    /// Topic exchange the ingress publishes updates to (routing key = chat id).
    pub fn updates_exchange(&self) -> String {
        format!("{}updates", self.prefix)
    }
    /// Quorum queue of updates, bound to the exchange with `#`.
    pub fn updates_queue(&self) -> String {
        format!("{}updates", self.prefix)
    }
    /// Delay queue of `ms` milliseconds that dead-letters back to `updates`.
    pub fn updates_retry_queue(&self, ms: u64) -> String {
        format!("{}updates.retry.{ms}", self.prefix)
    }
    /// Poison updates after the delivery limit.
    pub fn updates_dead_queue(&self) -> String {
        format!("{}updates.dead", self.prefix)
    }
    /// Fanout exchange for cross-host signals (`/stop`).
    pub fn control_exchange(&self) -> String {
        format!("{}control", self.prefix)
    }
    /// Direct exchange the outbox relay publishes billing events to.
    pub fn billing_exchange(&self) -> String {
        format!("{}billing", self.prefix)
    }
    /// Quorum queue of billing events.
    pub fn billing_queue(&self) -> String {
        format!("{}billing.events", self.prefix)
    }
    /// Backoff queue number `n` (0-based) for billing retries.
    pub fn billing_retry_queue(&self, n: usize) -> String {
        format!("{}billing.retry.{n}", self.prefix)
    }
    /// Billing events that failed every attempt.
    pub fn billing_dead_queue(&self) -> String {
        format!("{}billing.dead", self.prefix)
    }
    /// Every queue name, for tests and the demo to purge or delete.
    pub fn all_queues(&self) -> Vec<String> {
        let mut q =
            vec![self.updates_queue(), self.updates_dead_queue(), self.billing_queue(), self.billing_dead_queue()];
        q.extend(self.update_retry_delays_ms.iter().map(|&ms| self.updates_retry_queue(ms)));
        q.extend((0..self.billing_retry_delays_ms.len()).map(|n| self.billing_retry_queue(n)));
        q
    }

    /// Declares everything; safe to run concurrently from every process.
    ///
    /// # Errors
    /// [`BrokerError::Amqp`], e.g. when a queue exists with other arguments.
    pub async fn declare(&self, ch: &Channel) -> Result<(), BrokerError> {
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        ch.exchange_declare(self.updates_exchange().into(), ExchangeKind::Topic, durable, FieldTable::default())
            .await?;
        ch.exchange_declare(self.control_exchange().into(), ExchangeKind::Fanout, durable, FieldTable::default())
            .await?;
        ch.exchange_declare(self.billing_exchange().into(), ExchangeKind::Direct, durable, FieldTable::default())
            .await?;

        declare_classic(ch, &self.updates_dead_queue(), FieldTable::default()).await?;
        declare_quorum(ch, &self.updates_queue(), self.delivery_limit, &self.updates_dead_queue()).await?;
        bind(ch, &self.updates_queue(), &self.updates_exchange(), "#").await?;
        for &ms in &self.update_retry_delays_ms {
            declare_classic(ch, &self.updates_retry_queue(ms), delay_args(ms, &self.updates_queue())).await?;
        }

        declare_classic(ch, &self.billing_dead_queue(), FieldTable::default()).await?;
        declare_quorum(ch, &self.billing_queue(), self.delivery_limit, &self.billing_dead_queue()).await?;
        bind(ch, &self.billing_queue(), &self.billing_exchange(), BILLING_ROUTING_KEY).await?;
        // The delay travels with each message (`expiration`), so the
        // billing-worker's backoff is its own setting; one queue per step
        // keeps every message of a queue on the same delay.
        for n in 0..self.billing_retry_delays_ms.len() {
            let mut args = FieldTable::default();
            args.insert("x-dead-letter-exchange".into(), str_value(""));
            args.insert("x-dead-letter-routing-key".into(), str_value(&self.billing_queue()));
            declare_classic(ch, &self.billing_retry_queue(n), args).await?;
        }
        Ok(())
    }
}

/// Routing key of billing events on the billing exchange.
pub const BILLING_ROUTING_KEY: &str = "event";

fn str_value(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

/// Arguments of a delay queue: messages expire after `ms` and dead-letter,
/// through the default exchange, to `target`.
fn delay_args(ms: u64, target: &str) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert("x-message-ttl".into(), AMQPValue::LongLongInt(i64::try_from(ms).unwrap_or(i64::MAX)));
    t.insert("x-dead-letter-exchange".into(), str_value(""));
    t.insert("x-dead-letter-routing-key".into(), str_value(target));
    t
}

async fn declare_classic(ch: &Channel, name: &str, args: FieldTable) -> Result<(), BrokerError> {
    let opts = QueueDeclareOptions { durable: true, ..Default::default() };
    ch.queue_declare(name.into(), opts, args).await?;
    Ok(())
}

/// A durable quorum queue with an explicit delivery limit (RabbitMQ 3.10 has
/// no default; 4.x defaults to 20) dead-lettering to `dead`.
async fn declare_quorum(ch: &Channel, name: &str, delivery_limit: i64, dead: &str) -> Result<(), BrokerError> {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), str_value("quorum"));
    args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(delivery_limit));
    args.insert("x-dead-letter-exchange".into(), str_value(""));
    args.insert("x-dead-letter-routing-key".into(), str_value(dead));
    let opts = QueueDeclareOptions { durable: true, ..Default::default() };
    ch.queue_declare(name.into(), opts, args).await?;
    Ok(())
}

async fn bind(ch: &Channel, queue: &str, exchange: &str, key: &str) -> Result<(), BrokerError> {
    ch.queue_bind(queue.into(), exchange.into(), key.into(), QueueBindOptions::default(), FieldTable::default())
        .await?;
    Ok(())
}

/// Opens a connection named `name` (shown in the management UI).
///
/// # Errors
/// [`BrokerError::ConnectTimeout`] or [`BrokerError::Amqp`].
pub async fn connect(url: &str, name: &str, timeout: Duration) -> Result<Connection, BrokerError> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(timeout, Connection::connect(url, props)).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(BrokerError::ConnectTimeout(timeout)),
    }
}

/// A consumer channel with a bounded prefetch.
///
/// # Errors
/// [`BrokerError::Amqp`].
pub async fn consumer_channel(conn: &Connection, prefetch: u16) -> Result<Channel, BrokerError> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    Ok(ch)
}

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing<'a> {
    /// Exchange (`""` for the default exchange).
    pub exchange: &'a str,
    /// Routing key.
    pub routing_key: &'a str,
    /// Body bytes.
    pub body: &'a [u8],
    /// AMQP `message-id` (idempotency key for consumers), if any.
    pub message_id: Option<&'a str>,
    /// `content-type`.
    pub content_type: &'a str,
    /// Header `x-attempt` (billing retries), if any.
    pub attempt: Option<i64>,
}

/// Publishes with `mandatory`, persistent delivery mode, and waits for the
/// publisher confirm. A nack, a return or a missing confirm is an error: the
/// caller must not consider the message sent.
///
/// Holds one connection and confirm channel, re-opened on the next publish
/// after any failure.
pub struct ConfirmPublisher {
    url: String,
    name: String,
    confirm_timeout: Duration,
    state: Mutex<Option<(Connection, Channel)>>,
}

impl ConfirmPublisher {
    /// A publisher that connects lazily to `url`.
    pub fn new(url: &str, name: &str, confirm_timeout: Duration) -> Self {
        Self { url: url.to_owned(), name: name.to_owned(), confirm_timeout, state: Mutex::new(None) }
    }

    async fn channel(&self) -> Result<Channel, BrokerError> {
        let mut guard = self.state.lock().await;
        if let Some((conn, ch)) = guard.as_ref() {
            if conn.status().connected() && ch.status().connected() {
                return Ok(ch.clone());
            }
        }
        *guard = None;
        let conn = connect(&self.url, &self.name, self.confirm_timeout).await?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        *guard = Some((conn, ch.clone()));
        Ok(ch)
    }

    /// True when the last publish left a live connection (for readiness).
    pub async fn is_connected(&self) -> bool {
        let guard = self.state.lock().await;
        guard.as_ref().is_some_and(|(c, ch)| c.status().connected() && ch.status().connected())
    }

    /// Ensures a connection exists now (used at start-up and by readiness).
    ///
    /// # Errors
    /// As [`ConfirmPublisher::publish`].
    pub async fn ensure_connected(&self) -> Result<Channel, BrokerError> {
        self.channel().await
    }

    /// Publishes and waits for the confirm.
    ///
    /// # Errors
    /// [`BrokerError::Nacked`], [`BrokerError::Returned`],
    /// [`BrokerError::ConfirmTimeout`] or a connection error.
    pub async fn publish(&self, msg: Outgoing<'_>) -> Result<(), BrokerError> {
        self.publish_expiring(msg, None).await
    }

    /// As [`ConfirmPublisher::publish`], with a per-message TTL in
    /// milliseconds (AMQP `expiration`): used for delay queues.
    ///
    /// # Errors
    /// As [`ConfirmPublisher::publish`].
    pub async fn publish_expiring(&self, msg: Outgoing<'_>, expiration_ms: Option<u64>) -> Result<(), BrokerError> {
        let result = self.publish_once(&msg, expiration_ms).await;
        if result.is_err() {
            // Drop the channel: the next publish reconnects.
            *self.state.lock().await = None;
        }
        result
    }

    async fn publish_once(&self, msg: &Outgoing<'_>, expiration_ms: Option<u64>) -> Result<(), BrokerError> {
        let ch = self.channel().await?;
        let mut props = BasicProperties::default().with_delivery_mode(2).with_content_type(msg.content_type.into());
        if let Some(ms) = expiration_ms {
            props = props.with_expiration(ms.to_string().into());
        }
        if let Some(id) = msg.message_id {
            props = props.with_message_id(id.into());
        }
        if let Some(attempt) = msg.attempt {
            let mut h = FieldTable::default();
            h.insert("x-attempt".into(), AMQPValue::LongLongInt(attempt));
            props = props.with_headers(h);
        }
        let opts = BasicPublishOptions { mandatory: true, ..Default::default() };
        let exchange: ShortString = msg.exchange.into();
        let confirm = ch.basic_publish(exchange, msg.routing_key.into(), opts, msg.body, props).await?;
        match tokio::time::timeout(self.confirm_timeout, confirm).await {
            Err(_) => Err(BrokerError::ConfirmTimeout(self.confirm_timeout)),
            Ok(Err(e)) => Err(e.into()),
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(ret)))) => Err(BrokerError::Returned(ret.reply_text.to_string())),
            Ok(Ok(Confirmation::Nack(_))) => Err(BrokerError::Nacked),
            Ok(Ok(Confirmation::NotRequested)) => Err(BrokerError::Nacked),
        }
    }
}

/// Reads the `x-attempt` header of a delivery (0 when absent).
pub fn attempt_of(props: &BasicProperties) -> i64 {
    props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-attempt").cloned())
        .and_then(|v| match v {
            AMQPValue::LongLongInt(n) => Some(n),
            AMQPValue::LongInt(n) => Some(i64::from(n)),
            AMQPValue::ShortInt(n) => Some(i64::from(n)),
            _ => None,
        })
        .unwrap_or(0)
}
