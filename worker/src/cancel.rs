//! Cancelling running jobs: why a job was cancelled, its cancel handle, and
//! the registry of jobs running in this process (by chat). The broker side
//! of `/stop` (the control fanout) is [`crate::queues::control`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
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
