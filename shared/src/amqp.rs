//! Broker topology (DESIGN §3), declared idempotently by every process, and
//! the confirming publisher every publish goes through.
//!
//! All names carry a prefix (empty in production) so that tests and demo
//! runs can share one broker without seeing each other's messages.

use crate::retry::Policy;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
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
    /// A message of a [`crate::contracts::Contract`] type did not serialize (nothing was sent).
    #[error("message does not serialize: {0}")]
    Encode(String),
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
    /// Number of `updates.intake.<n>` shards. The ingress routes an update
    /// to shard `chat_id mod intake_shards`, so every process of a
    /// deployment must agree on it (changing it is an upgrade step,
    /// docs/operations.md).
    pub intake_shards: u32,
}

impl Topology {
    /// The production topology with `prefix`.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            update_retry_delays_ms: vec![250, 1_000, 5_000],
            billing_retry_delays_ms: vec![1_000, 5_000, 30_000, 120_000, 600_000],
            delivery_limit: 10,
            intake_shards: DEFAULT_INTAKE_SHARDS,
        }
    }
    /// Topic exchange the ingress publishes updates to, routing key
    /// `<shard>.<chat id>` ([`Topology::update_routing_key`]).
    pub fn updates_exchange(&self) -> String {
        format!("{}updates", self.prefix)
    }
    /// Quorum queue of *taken-in* work: jobs handed off by the intake
    /// shards, jobs handed back or reaped, and delayed retries. Workers
    /// compete on it, so generation spreads over the fleet. Not bound to the
    /// exchange: raw updates reach it only through the intake shards.
    pub fn updates_queue(&self) -> String {
        format!("{}updates", self.prefix)
    }
    /// Intake shard `shard`: a quorum queue with single active consumer, so
    /// the updates of one chat are taken in by one consumer, in the order
    /// the ingress published them (P2).
    pub fn intake_queue(&self, shard: u32) -> String {
        format!("{}updates.intake.{shard}", self.prefix)
    }
    /// The shard of a chat: `chat_id mod intake_shards` (Euclidean, so
    /// negative group ids too); updates without a chat go to shard 0.
    pub fn shard_of(&self, chat_id: Option<i64>) -> u32 {
        let n = i64::from(self.intake_shards.max(1));
        chat_id.map_or(0, |c| u32::try_from(c.rem_euclid(n)).unwrap_or(0))
    }
    /// Routing key of an update on the updates exchange: `<shard>.<chat id>`
    /// (`<shard>.none` without a chat).
    pub fn update_routing_key(&self, chat_id: Option<i64>) -> String {
        let chat = chat_id.map_or_else(|| "none".to_owned(), |c| c.to_string());
        format!("{}.{chat}", self.shard_of(chat_id))
    }
    /// Routing key of an update of `kind` (the name of its payload field):
    /// a `pre_checkout_query` goes to [`Topology::payments_queue`]
    /// (`payments.none`), every other update to its chat's shard
    /// ([`Topology::update_routing_key`]).
    pub fn routing_key_of(&self, kind: &str, chat_id: Option<i64>) -> String {
        if kind == "pre_checkout_query" {
            format!("{PAYMENTS_BINDING_PREFIX}.none")
        } else {
            self.update_routing_key(chat_id)
        }
    }
    /// Quorum queue of pre-checkout queries, consumed by every worker
    /// (competing consumers, no order): Telegram cancels a checkout not
    /// answered within 10 s (Bot API, `answerPreCheckoutQuery`), so it must
    /// never wait behind chat traffic in an intake shard.
    pub fn payments_queue(&self) -> String {
        format!("{}updates.payments", self.prefix)
    }
    /// Binding key of intake shard `shard` on the updates exchange.
    pub fn intake_binding(shard: u32) -> String {
        format!("{shard}.*")
    }
    /// Delay queue of `ms` milliseconds that dead-letters back to `updates`
    /// (DESIGN §3 `updates.retry.<delay>`; named `.delay.` since these became
    /// quorum queues with at-least-once dead-lettering, see [`Topology::declare`]).
    pub fn updates_retry_queue(&self, ms: u64) -> String {
        format!("{}updates.delay.{ms}", self.prefix)
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
    /// Backoff queue number `n` (0-based) for billing retries (DESIGN §3
    /// `billing.retry.<n>`, named `.delay.` as [`Topology::updates_retry_queue`]).
    pub fn billing_retry_queue(&self, n: usize) -> String {
        format!("{}billing.delay.{n}", self.prefix)
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
        q.extend((0..self.intake_shards).map(|n| self.intake_queue(n)));
        q.push(self.payments_queue());
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
        declare_quorum(ch, &self.updates_queue(), self.delivery_limit, &self.updates_dead_queue(), false).await?;
        // Before intake shards existed `updates` was bound with `#`; a
        // leftover binding would let raw updates skip their shard.
        // Unbinding a binding that does not exist is not an error.
        ch.queue_unbind(
            self.updates_queue().as_str().into(),
            self.updates_exchange().as_str().into(),
            "#".into(),
            FieldTable::default(),
        )
        .await?;
        for n in 0..self.intake_shards {
            let q = self.intake_queue(n);
            declare_quorum(ch, &q, self.delivery_limit, &self.updates_dead_queue(), true).await?;
            bind(ch, &q, &self.updates_exchange(), &Self::intake_binding(n)).await?;
        }
        declare_quorum(ch, &self.payments_queue(), self.delivery_limit, &self.updates_dead_queue(), false).await?;
        bind(ch, &self.payments_queue(), &self.updates_exchange(), &format!("{PAYMENTS_BINDING_PREFIX}.*")).await?;
        // Delay queues are quorum queues with at-least-once dead-lettering
        // (RabbitMQ 3.10+, "Dead Letter Exchanges": at-least-once strategy):
        // a classic queue's dead-lettering is at-most-once, so a broker
        // restart while a message expires could drop a retry.
        for &ms in &self.update_retry_delays_ms {
            declare_delay(ch, &self.updates_retry_queue(ms), Some(ms), &self.updates_queue()).await?;
        }

        declare_classic(ch, &self.billing_dead_queue(), FieldTable::default()).await?;
        declare_quorum(ch, &self.billing_queue(), self.delivery_limit, &self.billing_dead_queue(), false).await?;
        bind(ch, &self.billing_queue(), &self.billing_exchange(), BILLING_ROUTING_KEY).await?;
        // The delay travels with each message (`expiration`), so the
        // billing-worker's backoff is its own setting; one queue per step
        // keeps every message of a queue on the same delay.
        for n in 0..self.billing_retry_delays_ms.len() {
            declare_delay(ch, &self.billing_retry_queue(n), None, &self.billing_queue()).await?;
        }
        Ok(())
    }
}

/// Default number of intake shards: enough for intake to spread over a
/// few hosts; each shard takes in its chats one update at a time per chat.
pub const DEFAULT_INTAKE_SHARDS: u32 = 8;

/// First word of the routing key of pre-checkout queries (`payments.none`).
pub const PAYMENTS_BINDING_PREFIX: &str = "payments";

/// Routing key of billing events on the billing exchange.
pub const BILLING_ROUTING_KEY: &str = "event";

fn str_value(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

/// A delay queue: a durable quorum queue whose messages expire after `ms`
/// (or their own `expiration`) and dead-letter, through the default
/// exchange, to `target`, at least once (`x-dead-letter-strategy`, which
/// needs `x-overflow: reject-publish`).
async fn declare_delay(ch: &Channel, name: &str, ms: Option<u64>, target: &str) -> Result<(), BrokerError> {
    let mut t = FieldTable::default();
    t.insert("x-queue-type".into(), str_value("quorum"));
    if let Some(ms) = ms {
        t.insert("x-message-ttl".into(), AMQPValue::LongLongInt(i64::try_from(ms).unwrap_or(i64::MAX)));
    }
    t.insert("x-dead-letter-exchange".into(), str_value(""));
    t.insert("x-dead-letter-routing-key".into(), str_value(target));
    t.insert("x-dead-letter-strategy".into(), str_value("at-least-once"));
    t.insert("x-overflow".into(), str_value("reject-publish"));
    let opts = QueueDeclareOptions { durable: true, ..Default::default() };
    ch.queue_declare(name.into(), opts, t).await?;
    Ok(())
}

async fn declare_classic(ch: &Channel, name: &str, args: FieldTable) -> Result<(), BrokerError> {
    let opts = QueueDeclareOptions { durable: true, ..Default::default() };
    ch.queue_declare(name.into(), opts, args).await?;
    Ok(())
}

/// A durable quorum queue with an explicit delivery limit (RabbitMQ 3.10 has
/// no default; 4.x defaults to 20) dead-lettering to `dead`; with
/// `single_active`, one consumer at a time receives its messages, in order
/// (RabbitMQ docs, "Single Active Consumer", 3.8+).
async fn declare_quorum(
    ch: &Channel,
    name: &str,
    delivery_limit: i64,
    dead: &str,
    single_active: bool,
) -> Result<(), BrokerError> {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), str_value("quorum"));
    if single_active {
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    }
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

/// Runs `session` (connect, consume, return on a broker error) until
/// `shutdown`, reconnecting after each failure with
/// [`Policy::BrokerReconnect`] (about 200 ms doubling to 10 s, ±25 %
/// jitter), back to the first delay after a session that lasted 10 s or
/// more. Each session declares the topology again. `what` names the
/// consumer in the logs.
pub async fn reconnecting<F, Fut>(what: &str, shutdown: &tokio_util::sync::CancellationToken, mut session: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), BrokerError>>,
{
    /// A session at least this long was healthy: the next failure starts the backoff over.
    const HEALTHY: Duration = Duration::from_secs(10);
    let mut backoff = Policy::BrokerReconnect.backoff();
    while !shutdown.is_cancelled() {
        let started = std::time::Instant::now();
        match session().await {
            Ok(()) => break,
            Err(e) => {
                if started.elapsed() >= HEALTHY {
                    backoff = Policy::BrokerReconnect.backoff();
                }
                let wait = backoff.next_or_last();
                tracing::warn!(error.message = %e, consumer = what, wait_ms = wait.as_millis() as u64, "consumer lost the broker; reconnecting");
                metrics::counter!("fleet_broker_reconnects_total", "consumer" => what.to_owned()).increment(1);
                if crate::retry::sleep_or_stopped(wait, shutdown).await {
                    break;
                }
            }
        }
    }
}

/// AMQP heartbeat asked for when the URL names none, seconds: a dead peer
/// is noticed within two intervals (AMQP 0-9-1 §4.2.7), not the broker's
/// 60 s default.
pub const HEARTBEAT_S: u16 = 10;

/// `url` with `heartbeat=`[`HEARTBEAT_S`] added to its query unless it sets one.
pub fn with_heartbeat(url: &str) -> String {
    if url.contains("heartbeat=") {
        return url.to_owned();
    }
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}heartbeat={HEARTBEAT_S}")
}

/// Opens a connection named `name` (shown in the management UI).
///
/// # Errors
/// [`BrokerError::ConnectTimeout`] or [`BrokerError::Amqp`].
pub async fn connect(url: &str, name: &str, timeout: Duration) -> Result<Connection, BrokerError> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let url = with_heartbeat(url);
    match tokio::time::timeout(timeout, Connection::connect(&url, props)).await {
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

/// One consumer session: a connection, a channel with a bounded prefetch,
/// the topology declared, and any number of queues consumed as one stream.
/// Every consumer of the fleet runs on one of these inside [`reconnecting`]
/// (one consume loop, written once: [`Subscription::for_each`]).
pub struct Subscription {
    conn: Connection,
    channel: Channel,
    stream: futures_util::stream::SelectAll<lapin::Consumer>,
}

impl Subscription {
    /// Connects as `name` (connect timeout 5 s), opens a channel with
    /// `prefetch` unacked deliveries at most, and declares `topology`.
    ///
    /// # Errors
    /// [`BrokerError::Amqp`], [`BrokerError::ConnectTimeout`].
    pub async fn open(url: &str, name: &str, prefetch: u16, topology: &Topology) -> Result<Self, BrokerError> {
        let conn = connect(url, name, Duration::from_secs(5)).await?;
        let channel = consumer_channel(&conn, prefetch).await?;
        topology.declare(&channel).await?;
        Ok(Self { conn, channel, stream: futures_util::stream::SelectAll::new() })
    }

    /// The channel (to declare a queue of this session's own before consuming it).
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Starts consuming `queue` (manual acks) into this session's stream.
    ///
    /// # Errors
    /// [`BrokerError::Amqp`].
    pub async fn consume(&mut self, queue: &str) -> Result<(), BrokerError> {
        self.consume_with(queue, BasicConsumeOptions::default()).await
    }

    /// As [`Subscription::consume`] with explicit options (`no_ack` for a
    /// transient queue whose messages may be lost with their consumer).
    ///
    /// # Errors
    /// [`BrokerError::Amqp`].
    pub async fn consume_with(&mut self, queue: &str, options: BasicConsumeOptions) -> Result<(), BrokerError> {
        let consumer = self.channel.basic_consume(queue.into(), "".into(), options, FieldTable::default()).await?;
        self.stream.push(consumer);
        Ok(())
    }

    /// The next delivery of any consumed queue; `Ok(None)` at `shutdown`.
    ///
    /// # Errors
    /// The channel or connection is gone ([`BrokerError::Amqp`], or
    /// [`BrokerError::Nacked`] when the stream simply ended): reconnect.
    pub async fn next(
        &mut self,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Result<Option<lapin::message::Delivery>, BrokerError> {
        use futures_util::StreamExt;
        tokio::select! {
            _ = shutdown.cancelled() => Ok(None),
            d = self.stream.next() => match d {
                Some(Ok(d)) => Ok(Some(d)),
                Some(Err(e)) => Err(e.into()),
                None => Err(BrokerError::Nacked),
            },
        }
    }

    /// A delivery that has already arrived, without waiting (`Ok(None)`: none yet).
    ///
    /// # Errors
    /// As [`Subscription::next`].
    pub fn next_ready(&mut self) -> Result<Option<lapin::message::Delivery>, BrokerError> {
        use futures_util::{FutureExt, StreamExt};
        match self.stream.next().now_or_never() {
            None => Ok(None),
            Some(Some(Ok(d))) => Ok(Some(d)),
            Some(Some(Err(e))) => Err(e.into()),
            Some(None) => Err(BrokerError::Nacked),
        }
    }

    /// Hands every delivery to `handle` until `shutdown` (`Ok`) or until the
    /// broker goes away (`Err`: the caller's [`reconnecting`] opens a new
    /// session). `handle` must not block: it spawns the work into a task
    /// set its caller owns.
    ///
    /// # Errors
    /// As [`Subscription::next`].
    pub async fn for_each(
        &mut self,
        shutdown: &tokio_util::sync::CancellationToken,
        mut handle: impl FnMut(lapin::message::Delivery),
    ) -> Result<(), BrokerError> {
        while let Some(d) = self.next(shutdown).await? {
            handle(d);
        }
        Ok(())
    }

    /// Closes the connection (unacked deliveries return to their queues).
    pub async fn close(self) {
        let _ = self.conn.close(200, "bye".into()).await;
    }
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

    /// Publishes a typed message (JSON, persistent, mandatory) to
    /// `exchange` with `routing_key` and waits for the confirm: the one way
    /// a [`crate::contracts::Contract`] is put on the wire.
    ///
    /// # Errors
    /// [`BrokerError::Encode`], else as [`ConfirmPublisher::publish`].
    pub async fn send<T: crate::contracts::Contract>(
        &self,
        exchange: &str,
        routing_key: &str,
        message: &T,
    ) -> Result<(), BrokerError> {
        let body = serde_json::to_vec(message).map_err(|e| BrokerError::Encode(e.to_string()))?;
        let message_id = message.message_id();
        self.publish(Outgoing {
            exchange,
            routing_key,
            body: &body,
            message_id: message_id.as_deref(),
            content_type: "application/json",
            attempt: None,
        })
        .await
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
        self.publish_with_headers(msg, expiration_ms, &[]).await
    }

    /// As [`ConfirmPublisher::publish_expiring`], with more integer headers
    /// beside `x-attempt` (e.g. [`DEFERRALS_HEADER`]).
    ///
    /// # Errors
    /// As [`ConfirmPublisher::publish`].
    pub async fn publish_with_headers(
        &self,
        msg: Outgoing<'_>,
        expiration_ms: Option<u64>,
        headers: &[(&str, i64)],
    ) -> Result<(), BrokerError> {
        let result = self.publish_once(&msg, expiration_ms, headers).await;
        if result.is_err() {
            // Drop the channel: the next publish reconnects.
            *self.state.lock().await = None;
        }
        result
    }

    async fn publish_once(
        &self,
        msg: &Outgoing<'_>,
        expiration_ms: Option<u64>,
        headers: &[(&str, i64)],
    ) -> Result<(), BrokerError> {
        let ch = self.channel().await?;
        let mut props = BasicProperties::default().with_delivery_mode(2).with_content_type(msg.content_type.into());
        if let Some(ms) = expiration_ms {
            props = props.with_expiration(ms.to_string().into());
        }
        if let Some(id) = msg.message_id {
            props = props.with_message_id(id.into());
        }
        if msg.attempt.is_some() || !headers.is_empty() {
            let mut h = FieldTable::default();
            if let Some(attempt) = msg.attempt {
                h.insert("x-attempt".into(), AMQPValue::LongLongInt(attempt));
            }
            for (name, value) in headers {
                h.insert((*name).into(), AMQPValue::LongLongInt(*value));
            }
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
    int_header(props, "x-attempt")
}

/// Header counting how often a billing event was deferred (put back to
/// wait for other events, not failed): kept apart from `x-attempt`, so a
/// deferral never counts as a retry.
pub const DEFERRALS_HEADER: &str = "x-deferrals";

/// Reads the [`DEFERRALS_HEADER`] of a delivery (0 when absent).
pub fn deferrals_of(props: &BasicProperties) -> i64 {
    int_header(props, DEFERRALS_HEADER)
}

/// Earlier deliveries of a message from a quorum queue: its
/// `x-delivery-count` header (RabbitMQ, "Quorum Queues: Poison Message
/// Handling"; absent, so 0, on the first delivery). Every return counts:
/// a consumer that died, a channel closed at shutdown, a requeue.
pub fn delivery_count_of(props: &BasicProperties) -> i64 {
    int_header(props, "x-delivery-count")
}

fn int_header(props: &BasicProperties, name: &str) -> i64 {
    props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(name).cloned())
        .and_then(|v| match v {
            AMQPValue::LongLongInt(n) => Some(n),
            AMQPValue::LongInt(n) => Some(i64::from(n)),
            AMQPValue::ShortInt(n) => Some(i64::from(n)),
            AMQPValue::LongUInt(n) => Some(i64::from(n)),
            AMQPValue::ShortUInt(n) => Some(i64::from(n)),
            _ => None,
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod shard_tests {
    use super::{with_heartbeat, Topology};

    #[test]
    fn a_heartbeat_is_asked_for_unless_the_url_sets_one() {
        assert_eq!(with_heartbeat("amqp://h:5672/%2f"), "amqp://h:5672/%2f?heartbeat=10");
        assert_eq!(with_heartbeat("amqp://h/%2f?frame_max=8192"), "amqp://h/%2f?frame_max=8192&heartbeat=10");
        assert_eq!(with_heartbeat("amqp://h/%2f?heartbeat=30"), "amqp://h/%2f?heartbeat=30");
    }

    #[test]
    fn a_chat_always_routes_to_the_same_shard_and_negative_ids_too() {
        let t = Topology::new("");
        assert_eq!(t.update_routing_key(Some(100_000_001)), "1.100000001");
        assert_eq!(
            t.update_routing_key(Some(-1_001_234_567_890)),
            format!("{}.-1001234567890", t.shard_of(Some(-1_001_234_567_890)))
        );
        assert!(t.shard_of(Some(-1_001_234_567_890)) < t.intake_shards);
        assert_eq!(t.update_routing_key(None), "0.none");
        assert_eq!(t.routing_key_of("pre_checkout_query", None), "payments.none");
        assert_eq!(t.routing_key_of("message", Some(100_000_001)), "1.100000001");
        let one = Topology { intake_shards: 0, ..Topology::new("") };
        assert_eq!(one.shard_of(Some(7)), 0, "zero shards is read as one");
    }
}
