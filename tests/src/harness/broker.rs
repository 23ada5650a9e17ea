//! [`Broker`]: a queue prefix of its own per test, and a channel to look
//! into its queues and to delete them at the end.

use super::{amqp_url, within};
use anyhow::{Context as _, Result};
use futures_util::StreamExt;
use lapin::message::{BasicGetMessage, Delivery};
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, ExchangeDeleteOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use shared::amqp::Topology;
use std::time::Duration;
use uuid::Uuid;

/// A unique AMQP prefix for one test and a channel to inspect its queues.
/// Dropped without [`Broker::cleanup`] (a failed assertion, an early `?`),
/// it still deletes the prefix's queues and exchanges.
pub struct Broker {
    /// The broker URL.
    pub url: String,
    /// Every name, with this test's prefix.
    pub topology: Topology,
    /// Kept open for the channel's sake.
    _conn: Connection,
    /// The test's own channel (inspection, unbinding, cleanup).
    ch: Channel,
    /// Set once [`Broker::cleanup`] has deleted everything.
    cleaned: bool,
}

impl Broker {
    /// Connects with a fresh prefix `t<uuid>_`; declares nothing.
    pub async fn new() -> Result<Self> {
        let url = amqp_url();
        let topology = Topology::new(format!("t{}_", Uuid::now_v7().simple()));
        let conn = shared::amqp::connect(&url, "fleet-tests", Duration::from_secs(5))
            .await
            .context("connecting to TEST_AMQP_URL")?;
        let ch = within("opening a channel", conn.create_channel()).await??;
        Ok(Self { url, topology, _conn: conn, ch, cleaned: false })
    }

    /// This test's prefix.
    pub fn prefix(&self) -> &str {
        &self.topology.prefix
    }

    /// The test's channel.
    pub fn channel(&self) -> &Channel {
        &self.ch
    }

    /// Declares the whole topology, as every process does at start.
    pub async fn declare(&self) -> Result<()> {
        within("declaring the topology", self.topology.declare(&self.ch)).await??;
        Ok(())
    }

    /// Ready messages in `queue` (a passive declare: the queue must exist).
    pub async fn message_count(&self, queue: &str) -> Result<u32> {
        let opts = QueueDeclareOptions { passive: true, ..Default::default() };
        let q = within("a passive queue declare", self.ch.queue_declare(queue.into(), opts, FieldTable::default()))
            .await?
            .with_context(|| format!("queue {queue} does not exist"))?;
        Ok(q.message_count())
    }

    /// Takes the next message of `queue` (auto-acked), if any.
    pub async fn get(&self, queue: &str) -> Result<Option<BasicGetMessage>> {
        Ok(within("basic.get", self.ch.basic_get(queue.into(), BasicGetOptions { no_ack: true })).await??)
    }

    /// Takes the next message of a queue holding at most one, waiting up
    /// to 5 s. A consumer, not `basic.get`: quorum queues with single
    /// active consumer refuse `basic.get` (RESOURCE_LOCKED).
    pub async fn take_only(&self, queue: &str) -> Result<Option<Delivery>> {
        let opts = BasicConsumeOptions { no_ack: true, ..Default::default() };
        let mut consumer =
            within("basic.consume", self.ch.basic_consume(queue.into(), "".into(), opts, FieldTable::default()))
                .await??;
        let got = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await.ok().flatten().transpose()?;
        let tag = consumer.tag();
        within("basic.cancel", self.ch.basic_cancel(tag, BasicCancelOptions::default())).await??;
        Ok(got)
    }

    /// Ready messages in every update queue (intake shards, work queue, delays, dead).
    pub async fn pending_updates(&self) -> Result<u32> {
        let t = &self.topology;
        let mut queues = vec![t.updates_queue(), t.updates_dead_queue()];
        queues.extend((0..t.intake_shards).map(|n| t.intake_queue(n)));
        queues.extend(t.update_retry_delays_ms.iter().map(|&ms| t.updates_retry_queue(ms)));
        let mut total = 0;
        for q in queues {
            total += self.message_count(&q).await?;
        }
        Ok(total)
    }

    /// Deletes this test's queues and exchanges.
    pub async fn cleanup(mut self) -> Result<()> {
        let t = &self.topology;
        for q in t.all_queues() {
            within("deleting a queue", self.ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()))
                .await?
                .with_context(|| format!("deleting queue {q}"))?;
        }
        for x in [t.updates_exchange(), t.control_exchange(), t.billing_exchange()] {
            within(
                "deleting an exchange",
                self.ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default()),
            )
            .await?
            .with_context(|| format!("deleting exchange {x}"))?;
        }
        self.cleaned = true;
        Ok(())
    }
}

impl Drop for Broker {
    /// The clean-up of a test that ended early: deletes the prefix's queues
    /// and exchanges (best effort, on a connection and thread of their own).
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        let (url, prefix) = (self.url.clone(), self.topology.prefix.clone());
        super::block_on_own_thread(async move {
            within("deleting the test's queues", crate::fleet::delete_topology(&url, &prefix)).await
        });
    }
}
