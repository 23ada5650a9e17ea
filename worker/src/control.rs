//! Cross-host control: `/stop` never waits behind a chat's lease (P6).
//! Whichever worker receives it marks the chat's running job
//! (`cancel_requested_at`) and publishes a `stop.v1` message on the
//! `control` fanout; every worker listens on its own exclusive, auto-delete
//! queue and cancels the job if it holds it. The holder also sees the mark
//! at its next heartbeat, should the broadcast be lost.

use crate::context::WorkerContext;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use shared::amqp::{self, Outgoing};
use shared::contracts::ControlMessage;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Why a job was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// The user sent `/stop`.
    Stop,
    /// The lease was lost to another worker.
    LeaseLost,
    /// The process is shutting down: hand the job back.
    Shutdown,
    /// Telegram answered 403: the user blocked the bot; stop at once.
    Blocked,
}

/// A job's cancellation: a token raced inside every await, and the first reason given.
#[derive(Debug, Clone, Default)]
pub struct JobCancel {
    token: CancellationToken,
    reason: Arc<OnceLock<CancelReason>>,
}

impl JobCancel {
    /// Cancels with `reason` (the first reason wins).
    pub fn cancel(&self, reason: CancelReason) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }
    /// The token to race against.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }
    /// Why it was cancelled, if it was.
    pub fn reason(&self) -> Option<CancelReason> {
        self.reason.get().copied()
    }
}

/// Jobs running in this process, by chat.
#[derive(Debug, Clone, Default)]
pub struct RunningJobs {
    /// chat → (job, its update_id, its cancel handle).
    inner: Arc<Mutex<HashMap<i64, RunningJob>>>,
}

/// A job running here: its id, the update that created it, its cancel handle.
type RunningJob = (Uuid, i64, JobCancel);

/// Removes the job from [`RunningJobs`] when dropped.
pub struct Registration {
    jobs: RunningJobs,
    chat_id: i64,
    job_id: Uuid,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut map) = self.jobs.inner.lock() {
            if map.get(&self.chat_id).is_some_and(|(j, _, _)| *j == self.job_id) {
                map.remove(&self.chat_id);
            }
        }
    }
}

impl RunningJobs {
    /// Registers a running job (created by update `update_id`); it is
    /// removed when the guard drops.
    pub fn register(&self, chat_id: i64, job_id: Uuid, update_id: i64, cancel: JobCancel) -> Registration {
        if let Ok(mut map) = self.inner.lock() {
            map.insert(chat_id, (job_id, update_id, cancel));
        }
        Registration { jobs: self.clone(), chat_id, job_id }
    }

    /// Cancels the chat's job if it runs here, came from an update older
    /// than `stop_update_id` (a `/stop` redelivered late never stops a
    /// message sent after it) and, when `only` is given, is that job (a group
    /// member stops only their own answer); true when one was cancelled.
    pub fn cancel_chat(&self, chat_id: i64, stop_update_id: i64, only: Option<Uuid>, reason: CancelReason) -> bool {
        let found = self.inner.lock().ok().and_then(|m| {
            m.get(&chat_id)
                .filter(|(job_id, update_id, _)| *update_id < stop_update_id && only.is_none_or(|j| j == *job_id))
                .map(|(_, _, c)| c.clone())
        });
        match found {
            Some(c) => {
                c.cancel(reason);
                true
            }
            None => false,
        }
    }

    /// Cancels every job here (shutdown).
    pub fn cancel_all(&self, reason: CancelReason) {
        let all: Vec<JobCancel> =
            self.inner.lock().map(|m| m.values().map(|(_, _, c)| c.clone()).collect()).unwrap_or_default();
        for c in all {
            c.cancel(reason);
        }
    }

    /// Number of jobs running here.
    pub fn len(&self) -> usize {
        self.inner.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// True when none runs.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

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
pub async fn run(ctx: WorkerContext, ready: Arc<tokio::sync::Notify>, shutdown: CancellationToken) {
    let mut delay = Duration::from_millis(200);
    while !shutdown.is_cancelled() {
        if let Err(e) = listen(&ctx, &ready, &shutdown).await {
            tracing::warn!(error.message = %e, "control listener lost the broker; reconnecting");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }
}

async fn listen(
    ctx: &WorkerContext,
    ready: &tokio::sync::Notify,
    shutdown: &CancellationToken,
) -> Result<(), amqp::BrokerError> {
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
    ready.notify_waiters();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_cancels_only_a_job_of_an_older_update() {
        let jobs = RunningJobs::default();
        let cancel = JobCancel::default();
        let _registration = jobs.register(1, Uuid::nil(), 10, cancel.clone());
        assert!(!jobs.cancel_chat(1, 9, None, CancelReason::Stop), "a /stop sent before the message never stops it");
        assert!(cancel.reason().is_none());
        assert!(!jobs.cancel_chat(2, 11, None, CancelReason::Stop), "another chat");
        assert!(!jobs.cancel_chat(1, 11, Some(Uuid::max()), CancelReason::Stop), "another member's job");
        assert!(cancel.reason().is_none());
        assert!(jobs.cancel_chat(1, 11, Some(Uuid::nil()), CancelReason::Stop));
        assert_eq!(cancel.reason(), Some(CancelReason::Stop));
    }
}
