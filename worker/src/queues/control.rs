//! Cross-host control: `/stop` never waits behind a chat's lease (P6).
//! Whichever worker receives it marks the chat's running job
//! (`cancel_requested_at`) and publishes a `stop.v1` message on the
//! `control` fanout; every worker listens on its own exclusive, auto-delete
//! queue and cancels the job if it holds it. The holder also sees the mark
//! at its next heartbeat, should the broadcast be lost.

use crate::cancel::CancelReason;
use crate::context::WorkerContext;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use shared::amqp::{self, Outgoing};
use shared::contracts::ControlMessage;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Publishes a stop for `chat_id` on the control fanout (confirmed).
///
/// # Errors
/// Broker errors: the caller retries the `/stop` update.
pub async fn publish_stop(
    ctx: &WorkerContext,
    chat_id: i64,
    update_id: i64,
    job_id: Option<Uuid>,
) -> Result<(), amqp::BrokerError> {
    let body = serde_json::to_vec(&ControlMessage::Stop { chat_id, update_id, job_id }).unwrap_or_default();
    let exchange = ctx.topology.control_exchange();
    // A fanout with no bound queue would return the message; a worker is
    // always bound (this one), so mandatory publishing is fine.
    ctx.publisher
        .publish(Outgoing {
            exchange: &exchange,
            routing_key: "",
            body: &body,
            message_id: None,
            content_type: "application/json",
            attempt: None,
        })
        .await
}

/// Listens for control messages until `shutdown`, reconnecting with backoff.
pub async fn run(ctx: WorkerContext, shutdown: CancellationToken) {
    amqp::reconnecting("control", &shutdown, || listen(&ctx, &shutdown)).await;
}

async fn listen(ctx: &WorkerContext, shutdown: &CancellationToken) -> Result<(), amqp::BrokerError> {
    let conn = amqp::connect(&ctx.settings.broker.amqp_url, "worker-control", Duration::from_secs(5)).await?;
    let ch = amqp::consumer_channel(&conn, 64).await?;
    ctx.topology.declare(&ch).await?;
    let opts = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
    let queue = ch.queue_declare("".into(), opts, FieldTable::default()).await?;
    ch.queue_bind(
        queue.name().clone(),
        ctx.topology.control_exchange().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let mut consumer = ch
        .basic_consume(queue.name().clone(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    loop {
        let d = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            d = consumer.next() => d,
        };
        let d = match d {
            Some(Ok(d)) => d,
            Some(Err(e)) => return Err(e.into()),
            None => return Err(amqp::BrokerError::Nacked),
        };
        match serde_json::from_slice::<ControlMessage>(&d.data) {
            Ok(ControlMessage::Stop { chat_id, update_id, job_id }) => {
                let here = ctx.running.cancel_chat(chat_id, update_id, job_id, CancelReason::Stop);
                tracing::info!(chat_id, update_id, cancelled_here = here, "stop received");
            }
            Err(e) => tracing::warn!(error.message = %e, "unknown control message ignored"),
        }
        let _ = d.acker.ack(BasicAckOptions::default()).await;
    }
}
