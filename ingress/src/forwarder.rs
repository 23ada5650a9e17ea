//! The forwarder: publishes a raw update to the `updates` exchange with the
//! routing key of its chat's intake shard, mandatory and persistent, and
//! waits for the broker's confirm (the webhook and polling answer only after it).

use shared::amqp::{BrokerError, ConfirmPublisher, Outgoing, Topology};
use shared::telegram::RoutingInfo;
use std::time::Duration;

/// Publishes raw updates to the `updates` exchange, declaring the topology
/// on first use and after every reconnect.
pub struct Forwarder {
    publisher: ConfirmPublisher,
    topology: Topology,
    declared: tokio::sync::Mutex<bool>,
}

impl Forwarder {
    /// A forwarder for `amqp_url` with `prefix`.
    pub fn new(amqp_url: &str, prefix: &str, confirm_timeout: Duration) -> Self {
        Self {
            publisher: ConfirmPublisher::new(amqp_url, "ingress", confirm_timeout),
            topology: Topology::new(prefix),
            declared: tokio::sync::Mutex::new(false),
        }
    }

    /// Connects and declares the topology if not done on this connection.
    ///
    /// # Errors
    /// The broker error.
    pub async fn ensure_ready(&self) -> Result<(), BrokerError> {
        let mut declared = self.declared.lock().await;
        let connected = self.publisher.is_connected().await;
        let ch = self.publisher.ensure_connected().await?;
        if !*declared || !connected {
            self.topology.declare(&ch).await?;
            *declared = true;
        }
        Ok(())
    }

    /// Publishes one update verbatim, routing key `<shard>.<chat id>`, or
    /// `payments.none` for a pre-checkout query
    /// ([`shared::amqp::Topology::routing_key_of`]), and waits for the confirm.
    ///
    /// # Errors
    /// Any failure to get an Ack without a return.
    pub async fn forward(&self, info: &RoutingInfo, body: &[u8]) -> Result<(), BrokerError> {
        if let Err(e) = self.ensure_ready().await {
            *self.declared.lock().await = false;
            return Err(e);
        }
        let message_id = info.update_id.to_string();
        let key = self.topology.routing_key_of(&info.kind, info.chat_id);
        self.publisher
            .publish(Outgoing {
                exchange: &self.topology.updates_exchange(),
                routing_key: &key,
                body,
                message_id: Some(&message_id),
                content_type: "application/json",
                attempt: None,
            })
            .await
    }
}
