//! Cross-host control: `/stop` never waits behind a chat's lease (P6).
//! Whichever worker receives it marks the chat's running job
//! (`cancel_requested_at`) and publishes a `stop.v1` message on the
//! `control` fanout; every worker listens on its own exclusive, auto-delete
//! queue and cancels the job if it holds it. The holder also sees the mark
//! at its next heartbeat, should the broadcast be lost.

use crate::cancel::CancelReason;
use crate::context::WorkerContext;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use shared::amqp;
use shared::contracts::ControlMessage;
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
    // A fanout with no bound queue would return the message; a worker is
    // always bound (this one), so mandatory publishing is fine.
    let stop = ControlMessage::Stop { chat_id, update_id, job_id };
    ctx.publisher.send(&ctx.topology.control_exchange(), "", &stop).await
}

/// Listens for control messages until `shutdown`, reconnecting with backoff.
pub async fn run(ctx: WorkerContext, shutdown: CancellationToken) {
    amqp::reconnecting("control", &shutdown, || listen(&ctx, &shutdown)).await;
}

async fn listen(ctx: &WorkerContext, shutdown: &CancellationToken) -> Result<(), amqp::BrokerError> {
    let mut sub = amqp::Subscription::open(&ctx.settings.broker.amqp_url, "worker-control", 64, &ctx.topology).await?;
    let opts = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
    let queue = sub.channel().queue_declare("".into(), opts, FieldTable::default()).await?;
    sub.channel()
        .queue_bind(
            queue.name().clone(),
            ctx.topology.control_exchange().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    // Auto-acked: the queue is this process's own and dies with it; a stop
    // lost with its consumer is still seen at the holder's next heartbeat.
    sub.consume_with(queue.name().as_str(), BasicConsumeOptions { no_ack: true, ..Default::default() }).await?;
    sub.for_each(shutdown, |d| match serde_json::from_slice::<ControlMessage>(&d.data) {
        Ok(ControlMessage::Stop { chat_id, update_id, job_id }) => {
            let here = ctx.running.cancel_chat(chat_id, update_id, job_id, CancelReason::Stop);
            tracing::info!(chat_id, update_id, cancelled_here = here, "stop received");
        }
        Err(e) => tracing::warn!(error.message = %e, "unknown control message ignored"),
    })
    .await
}
