//! What an ended attempt means, in one table: how a job's attempt ended
//! ([`JobEnd`], returned by [`crate::job::run`], which performs nothing
//! itself) → the claimed job's transition, what happens on the broker, the
//! hold, and the user's notice ([`Plan`], from [`plan`]). The work queue
//! ([`crate::queues::work`]) applies a plan; nothing else maps an outcome.
//!
//! The decision taken before a job runs (a delivery's claim) is in the same
//! table: [`on_claim`] maps a [`Claim`] to a [`Settle`] and a notice.

use crate::notices;
use crate::store::jobs::{Claim, Outcome};

/// What to do with a broker delivery (the raw update or the work item).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    /// Done with it.
    Ack,
    /// Try again later through a delay queue.
    Delay,
    /// Poison: to the dead-letter queue.
    DeadLetter,
    /// Back to its queue now (nack with requeue).
    Requeue,
}

/// How one attempt of a claimed job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEnd {
    /// Finished: the pipeline told the user (answer, command reply, notice).
    Finished(Outcome),
    /// A step failed; `damaged` when stored state did not validate (P10).
    Failed {
        /// What failed (kept as the job's `last_error`).
        error: String,
        /// The conversation's stored state is damaged: the user is told to `/new`.
        damaged: bool,
    },
    /// The job's task panicked.
    Panicked(String),
    /// The process is shutting down before the answer was stored.
    Shutdown,
    /// The database went away before anything was sent: not the user's
    /// failure, so the attempt is not counted.
    DatabaseDown(String),
    /// Another transient failure (a download on a broken network): the attempt counts.
    Transient(String),
    /// The lease was lost: another worker owns the job; nothing more is written.
    LeaseLost,
    /// The reply reached the user but could not be recorded: the job ends
    /// as answered (never sent again), with the error kept and no notice
    /// (the user has the answer; "damaged" would be wrong).
    SentNotRecorded(String),
    /// The reply could not be delivered after every retry: finished as
    /// `undelivered`, its charges waived, its hold voided.
    Undelivered(String),
}

/// The claimed job's transition at the end of an attempt (fenced writes of
/// [`crate::store::jobs::ClaimedJob`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// `finish(outcome)`: terminal.
    Finish(Outcome),
    /// `hand_back`: queued again for any worker; `count_attempt: false` refunds it.
    HandBack {
        /// Whether this attempt counts towards `MAX_ATTEMPTS`.
        count_attempt: bool,
    },
    /// Nothing (the lease is not ours any more).
    Nothing,
}

/// What the broker gets after an attempt (the delivery itself was acked
/// when the claim committed: the job row holds the work, DESIGN §5.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Nothing to publish.
    Done,
    /// Republish the job's work item to `updates` now (another worker takes it).
    RepublishNow,
    /// Republish through the longest delay queue (the database gets time to return).
    RepublishDelayed,
}

/// Everything an ended attempt implies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The fenced transition.
    pub transition: Transition,
    /// The broker action, taken only when the transition was written.
    pub disposition: Disposition,
    /// Void the job's hold after the transition was written (nothing was charged).
    pub void_hold: bool,
    /// A notice for the user (the pipeline sends the answers themselves).
    pub notice: Option<&'static str>,
    /// The `outcome` label of `fleet_jobs_total`.
    pub label: &'static str,
}

/// The table.
pub fn plan(end: &JobEnd) -> Plan {
    use Disposition::{Done, RepublishDelayed, RepublishNow};
    let (transition, disposition, void_hold, notice, label) = match end {
        JobEnd::Finished(o) => (Transition::Finish(*o), Done, false, None, o.as_str()),
        JobEnd::Failed { damaged, .. } => {
            let notice = if *damaged { notices::DAMAGED } else { notices::FAILED };
            (Transition::Finish(Outcome::Error), Done, true, Some(notice), "failed")
        }
        JobEnd::Panicked(_) => (Transition::Finish(Outcome::Panic), Done, true, Some(notices::FAILED), "panic"),
        JobEnd::Shutdown => (Transition::HandBack { count_attempt: true }, RepublishNow, true, None, "handed_back"),
        JobEnd::DatabaseDown(_) => {
            (Transition::HandBack { count_attempt: false }, RepublishDelayed, true, None, "retry_later")
        }
        JobEnd::Transient(_) => {
            (Transition::HandBack { count_attempt: true }, RepublishDelayed, true, None, "retry_later")
        }
        JobEnd::LeaseLost => (Transition::Nothing, Done, false, None, "lease_lost"),
        // Its charges (if any) were stored before it was sent: they settle the hold.
        JobEnd::SentNotRecorded(_) => (Transition::Finish(Outcome::Answered), Done, false, None, "sent_not_recorded"),
        // No notice: the Bot API would not take the answer, it would not take a notice either.
        JobEnd::Undelivered(_) => (Transition::Finish(Outcome::Undelivered), Done, true, None, "undelivered"),
    };
    Plan { transition, disposition, void_hold, notice, label }
}

/// The decision on a delivery whose claim was tried: what the broker gets
/// and what the user is told. `Claimed` is the caller's (it runs the job).
pub fn on_claim(claim: &Claim) -> (Settle, Option<&'static str>) {
    match claim {
        // Acked before the job runs: the job row holds the work from then on.
        Claim::Claimed(_) => (Settle::Ack, None),
        // Its chat is busy: try again after a delay (per-chat order, P4).
        Claim::ChatBusy => (Settle::Delay, None),
        // Finished, or running elsewhere under a live lease.
        Claim::NotClaimable => (Settle::Ack, None),
        Claim::AttemptsExhausted => (Settle::Ack, Some(notices::ATTEMPTS_EXHAUSTED)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_end_has_one_plan_and_only_failures_tell_the_user() {
        let ends = [
            JobEnd::Finished(Outcome::Answered),
            JobEnd::Failed { error: "x".into(), damaged: false },
            JobEnd::Failed { error: "x".into(), damaged: true },
            JobEnd::Panicked("boom".into()),
            JobEnd::Shutdown,
            JobEnd::DatabaseDown("gone".into()),
            JobEnd::Transient("net".into()),
            JobEnd::LeaseLost,
            JobEnd::SentNotRecorded("gone".into()),
            JobEnd::Undelivered("502".into()),
        ];
        let plans: Vec<Plan> = ends.iter().map(plan).collect();
        assert_eq!(plans[0].transition, Transition::Finish(Outcome::Answered));
        assert!(!plans[0].void_hold, "an answered job's hold is settled by its charges, not voided");
        assert_eq!(plans[1].notice, Some(notices::FAILED));
        assert_eq!(plans[2].notice, Some(notices::DAMAGED));
        assert_eq!(plans[3].transition, Transition::Finish(Outcome::Panic));
        assert_eq!(plans[4].transition, Transition::HandBack { count_attempt: true });
        assert_eq!(plans[4].disposition, Disposition::RepublishNow);
        assert_eq!(plans[5].transition, Transition::HandBack { count_attempt: false });
        assert_eq!(plans[5].disposition, Disposition::RepublishDelayed);
        assert_eq!(plans[6].transition, Transition::HandBack { count_attempt: true });
        assert_eq!(
            plans[7],
            Plan {
                transition: Transition::Nothing,
                disposition: Disposition::Done,
                void_hold: false,
                notice: None,
                label: "lease_lost"
            }
        );
        assert_eq!(plans[8].transition, Transition::Finish(Outcome::Answered));
        assert_eq!(plans[8].notice, None, "a user who got the answer is never told the conversation is damaged");
        for (end, p) in ends.iter().zip(&plans) {
            // Handed back or failed: nothing was charged, the reservation goes.
            let uncharged = matches!(
                p.transition,
                Transition::HandBack { .. }
                    | Transition::Finish(Outcome::Error | Outcome::Panic | Outcome::Undelivered)
            );
            assert_eq!(p.void_hold, uncharged, "{end:?}");
            // Only a hand-back republishes.
            assert_eq!(
                p.disposition != Disposition::Done,
                matches!(p.transition, Transition::HandBack { .. }),
                "{end:?}"
            );
        }
    }

    #[test]
    fn a_claim_maps_to_one_settle() {
        assert_eq!(on_claim(&Claim::ChatBusy), (Settle::Delay, None));
        assert_eq!(on_claim(&Claim::NotClaimable), (Settle::Ack, None));
        assert_eq!(on_claim(&Claim::AttemptsExhausted), (Settle::Ack, Some(notices::ATTEMPTS_EXHAUSTED)));
    }
}
