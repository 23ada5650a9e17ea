//! The `jobs` table under leases (DESIGN §5): a claim sets the owner, an
//! expiry (now + visibility timeout) and a new, larger `lease_epoch`; every
//! later write of the job matches the fence — the job, still `running`,
//! under the claim's epoch — and zero rows means a newer holder exists and
//! this worker must stop.
//!
//! [`claim`] is the only way to get a [`ClaimedJob`], and its methods are
//! the only writes of a running job: the fence predicate is written once,
//! in the `fence!` macro, with the job id as `$1` and the epoch as `$2` in every
//! statement that splices it (underway's `InProgressTask` is the model).

use sqlx::{PgConnection, PgExecutor};
use std::time::Duration;
use uuid::Uuid;

/// The lease fence: the job (`$1`), still `running`, under the claim's epoch
/// (`$2`). Spliced with `concat!` into every fenced statement of this file.
macro_rules! fence {
    () => {
        "job_id = $1 AND status = 'running' AND lease_epoch = $2"
    };
}

text_enum! {
    /// `jobs.status` (the schema's CHECK list).
    pub enum JobStatus in "jobs.status" {
        /// Waiting for a claim.
        Queued = "queued",
        /// Claimed: under a lease.
        Running = "running",
        /// Finished (answered, refused, a command, …: see [`Outcome`]).
        Done = "done",
        /// Finished with an error, a panic or its attempts used up.
        Failed = "failed",
        /// Cancelled before it ran.
        Cancelled = "cancelled",
    }
}

text_enum! {
    /// `jobs.kind` (the schema's CHECK list).
    pub enum JobKind in "jobs.kind" {
        /// A message for Claude.
        Chat = "chat",
        /// A bot command (`/balance`, …).
        Command = "command",
        /// A document to read first; it becomes a `chat` job.
        Document = "document",
    }
}

text_enum! {
    /// `jobs.outcome`: how a finished job ended (no CHECK in the schema;
    /// these are every value the worker writes).
    pub enum Outcome in "jobs.outcome" {
        /// The answer was delivered (or stored and delivered by a later attempt).
        Answered = "answered",
        /// A command was answered.
        Command = "command",
        /// The balance could not pay for an answer: the top-up notice was sent.
        NoBalance = "no_balance",
        /// A document was refused with a notice.
        DocumentRefused = "document_refused",
        /// The user blocked the bot (403) while the answer was made.
        UserBlocked = "user_blocked",
        /// A step failed; the user was told.
        Error = "error",
        /// The job panicked; the user was told.
        Panic = "panic",
        /// The job used up its attempts.
        AttemptsExhausted = "attempts_exhausted",
        /// The answer could not be delivered after every retry: its charges
        /// were waived (provider cost recorded, charged to nobody).
        Undelivered = "undelivered",
    }
}

impl Outcome {
    /// True when the user got no answer, so the job's charges are waived
    /// when it finishes ([`ClaimedJob::finish`]): undelivered, failed, panicked.
    pub fn waives_charges(self) -> bool {
        matches!(self, Self::Undelivered | Self::Error | Self::Panic)
    }

    /// The terminal status a job with this outcome gets.
    pub fn status(self) -> JobStatus {
        match self {
            Self::Error | Self::Panic | Self::AttemptsExhausted => JobStatus::Failed,
            Self::Answered
            | Self::Command
            | Self::NoBalance
            | Self::DocumentRefused
            | Self::UserBlocked
            | Self::Undelivered => JobStatus::Done,
        }
    }
}

/// A job claimed by this worker: the handle to its fenced writes.
///
/// Only [`claim`] makes one, so a write through it always carries the epoch
/// of a real claim. Copying it is harmless: the fence is in the database.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClaimedJob {
    /// The job.
    job_id: Uuid,
    /// Fencing token: larger than every earlier claim of the job.
    epoch: i64,
    /// Attempts so far, this one included.
    attempts: i32,
}

/// Result of a claim.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// The lease is ours.
    Claimed(ClaimedJob),
    /// Another job of the chat runs, or an older one waits: try later.
    ChatBusy,
    /// The job is finished or held by a live lease elsewhere: nothing to do.
    NotClaimable,
    /// The job used up its attempts and was marked failed now.
    AttemptsExhausted,
}

/// What a heartbeat found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// Extended.
    Held,
    /// Extended, and `/stop` was requested for the job.
    StopRequested,
    /// Lost: a newer epoch exists, or the job left `running`.
    Lost,
}

/// Claims job `job_id` for `owner` if it is queued (or its lease expired),
/// no other job of the chat runs and no older job of the chat waits. The
/// lease lasts `visibility`; a job that has had `max_attempts` attempts is
/// marked failed instead (one attempt more when its answer is stored or
/// sent, to deliver it), its charges waived when nothing was sent.
///
/// # Errors
/// Database errors (a unique violation of the one-running-job index is `ChatBusy`).
pub async fn claim(
    db: &sqlx::PgPool,
    job_id: Uuid,
    owner: &str,
    visibility: Duration,
    max_attempts: i32,
) -> Result<Claim, sqlx::Error> {
    // A job whose answer is stored (or sent) gets one attempt more, to
    // deliver it (or finish without sending it again): its user is not
    // told it failed when the answer exists. An exhausted job that sent
    // nothing has its charges waived in the same transaction (stored
    // rounds and tools of earlier attempts included, P14).
    let mut tx = shared::db::begin(db).await?;
    let exhausted: Option<bool> = sqlx::query_scalar(
        "UPDATE jobs SET status = $3, outcome = $4, lease_owner = NULL,
                lease_expires_at = NULL, finished_at = now()
          WHERE job_id = $1
            AND attempts >= $2 + CASE WHEN answer_stored_at IS NOT NULL OR cardinality(reply_message_ids) > 0
                                      THEN 1 ELSE 0 END
            AND (status = 'queued' OR (status = 'running' AND lease_expires_at < now()))
          RETURNING cardinality(reply_message_ids) = 0",
    )
    .bind(job_id)
    .bind(max_attempts)
    .bind(Outcome::AttemptsExhausted.status())
    .bind(Outcome::AttemptsExhausted)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(unanswered) = exhausted {
        let waived = if unanswered { crate::store::outbox::waive_charges(&mut tx, job_id).await? } else { 0 };
        tx.commit().await?;
        if waived > 0 {
            tracing::warn!(waived, %job_id, "attempts used up without an answer: the job's charges are waived");
        }
        return Ok(Claim::AttemptsExhausted);
    }
    tx.rollback().await?;
    let claimed: Result<Option<(i64, i32)>, sqlx::Error> = sqlx::query_as(
        "UPDATE jobs SET status = 'running', lease_owner = $2, lease_epoch = lease_epoch + 1,
                lease_expires_at = now() + make_interval(secs => $3), attempts = attempts + 1,
                started_at = COALESCE(started_at, now())
          WHERE job_id = $1
            AND (status = 'queued' OR (status = 'running' AND lease_expires_at < now()))
            AND NOT EXISTS (
                SELECT 1 FROM jobs o
                 WHERE o.chat_id = jobs.chat_id AND o.job_id <> jobs.job_id
                   AND ((o.status = 'running' AND o.lease_expires_at >= now())
                        OR (o.status = 'queued' AND o.update_id < jobs.update_id)))
          RETURNING lease_epoch, attempts",
    )
    .bind(job_id)
    .bind(owner)
    .bind(visibility.as_secs_f64())
    .fetch_optional(db)
    .await;
    match claimed {
        Ok(Some((epoch, attempts))) => Ok(Claim::Claimed(ClaimedJob { job_id, epoch, attempts })),
        Ok(None) => {
            let waiting: bool = sqlx::query_scalar(
                "SELECT status = 'queued' OR (status = 'running' AND lease_expires_at < now()) FROM jobs WHERE job_id = $1",
            )
            .bind(job_id)
            .fetch_optional(db)
            .await?
            .unwrap_or(false);
            Ok(if waiting { Claim::ChatBusy } else { Claim::NotClaimable })
        }
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Ok(Claim::ChatBusy),
        Err(e) => Err(e),
    }
}

impl ClaimedJob {
    /// The job.
    pub fn job_id(&self) -> Uuid {
        self.job_id
    }

    /// The claim's fencing token: larger than every earlier claim of the job.
    pub fn epoch(&self) -> i64 {
        self.epoch
    }

    /// Attempts so far, this one included.
    pub fn attempts(&self) -> i32 {
        self.attempts
    }

    /// Extends the lease to now + `visibility`, and says whether `/stop` was
    /// requested.
    ///
    /// # Errors
    /// Database errors.
    pub async fn heartbeat<'e>(&self, db: impl PgExecutor<'e>, visibility: Duration) -> Result<Beat, sqlx::Error> {
        let r: Option<bool> = sqlx::query_scalar(concat!(
            "UPDATE jobs SET lease_expires_at = now() + make_interval(secs => $3)
              WHERE ",
            fence!(),
            "
              RETURNING cancel_requested_at IS NOT NULL"
        ))
        .bind(self.job_id)
        .bind(self.epoch)
        .bind(visibility.as_secs_f64())
        .fetch_optional(db)
        .await?;
        Ok(match r {
            None => Beat::Lost,
            Some(true) => Beat::StopRequested,
            Some(false) => Beat::Held,
        })
    }

    /// Ends the job: `outcome` and its terminal status ([`Outcome::status`]),
    /// `error` as its `last_error`, lease cleared. `Ok(false)`: the lease was
    /// lost and nothing was written.
    ///
    /// # Errors
    /// Database errors.
    ///
    /// An outcome that [waives charges](Outcome::waives_charges) also waives
    /// the job's charges in the same transaction
    /// ([`crate::store::outbox::waive_charges`]): the user pays nothing for
    /// an answer that never reached them (tools of a failed job included),
    /// and finance still sees what the provider served.
    pub async fn finish(&self, db: &sqlx::PgPool, outcome: Outcome, error: Option<&str>) -> Result<bool, sqlx::Error> {
        if !outcome.waives_charges() {
            return self.finish_in(db, outcome, error).await;
        }
        let mut tx = shared::db::begin(db).await?;
        if !self.finish_in(&mut *tx, outcome, error).await? {
            return Ok(false);
        }
        let waived = crate::store::outbox::waive_charges(&mut tx, self.job_id).await?;
        tx.commit().await?;
        if waived > 0 {
            tracing::warn!(
                waived,
                outcome = outcome.as_str(),
                "no answer reached the user: the job's charges are waived"
            );
        }
        Ok(true)
    }

    async fn finish_in<'e>(
        &self,
        db: impl PgExecutor<'e>,
        outcome: Outcome,
        error: Option<&str>,
    ) -> Result<bool, sqlx::Error> {
        let r = sqlx::query(concat!(
            "UPDATE jobs SET status = $3, outcome = $4, last_error = $5, lease_owner = NULL,
                    lease_expires_at = NULL, finished_at = now()
              WHERE ",
            fence!()
        ))
        .bind(self.job_id)
        .bind(self.epoch)
        .bind(outcome.status())
        .bind(outcome)
        .bind(error)
        .execute(db)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Hands the job back: `queued` again with no owner, so the next worker
    /// that sees it claims it (graceful shutdown, a database that went away).
    /// With `refund_attempt` the attempt is not counted: the job was
    /// interrupted by the infrastructure, not by something about it.
    /// `Ok(false)`: the lease was lost and nothing was written.
    ///
    /// # Errors
    /// Database errors.
    pub async fn hand_back<'e>(&self, db: impl PgExecutor<'e>, refund_attempt: bool) -> Result<bool, sqlx::Error> {
        let r = sqlx::query(concat!(
            "UPDATE jobs SET status = 'queued', lease_owner = NULL, lease_expires_at = NULL,
                    attempts = CASE WHEN $3 THEN greatest(attempts - 1, 0) ELSE attempts END
              WHERE ",
            fence!()
        ))
        .bind(self.job_id)
        .bind(self.epoch)
        .bind(refund_attempt)
        .execute(db)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Records the Telegram message ids of the sent answer (appended), so a
    /// later attempt never sends it again (P1). `Ok(false)`: the lease was
    /// lost and nothing was written.
    ///
    /// # Errors
    /// Database errors.
    pub async fn record_reply<'e>(&self, db: impl PgExecutor<'e>, message_ids: &[i64]) -> Result<bool, sqlx::Error> {
        let r = sqlx::query(concat!(
            "UPDATE jobs SET reply_message_ids = reply_message_ids || $3
              WHERE ",
            fence!()
        ))
        .bind(self.job_id)
        .bind(self.epoch)
        .bind(message_ids)
        .execute(db)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Marks the answer stored, with `reply` as the text to deliver, inside
    /// the caller's `finalize` transaction. `Ok(false)`: nothing was written
    /// — the lease was lost, or this claim stored it already (tell them
    /// apart with [`ClaimedJob::answer_stored`]).
    ///
    /// # Errors
    /// Database errors.
    pub async fn store_answer(&self, tx: &mut PgConnection, reply: &str) -> Result<bool, sqlx::Error> {
        let r = sqlx::query(concat!(
            "UPDATE jobs SET answer_stored_at = now(), stored_reply = $3
              WHERE ",
            fence!(),
            " AND answer_stored_at IS NULL"
        ))
        .bind(self.job_id)
        .bind(self.epoch)
        .bind(reply)
        .execute(tx)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// True when the answer is stored and the lease still holds: a retried
    /// `finalize` whose first commit succeeded but looked failed.
    ///
    /// # Errors
    /// Database errors.
    pub async fn answer_stored<'e>(&self, db: impl PgExecutor<'e>) -> Result<bool, sqlx::Error> {
        let stored: Option<bool> =
            sqlx::query_scalar(concat!("SELECT answer_stored_at IS NOT NULL FROM jobs WHERE ", fence!()))
                .bind(self.job_id)
                .bind(self.epoch)
                .fetch_optional(db)
                .await?;
        Ok(stored == Some(true))
    }

    /// Sets the document job's poison marker to this claim's epoch
    /// (`started`: reading begins) or clears it (a transient failure, to be
    /// retried). `Ok(false)`: the lease was lost and nothing was written.
    ///
    /// # Errors
    /// Database errors.
    pub async fn mark_document_started<'e>(&self, db: impl PgExecutor<'e>, started: bool) -> Result<bool, sqlx::Error> {
        let r =
            sqlx::query(concat!("UPDATE jobs SET document_started_epoch = CASE WHEN $3 THEN $2 END WHERE ", fence!()))
                .bind(self.job_id)
                .bind(self.epoch)
                .bind(started)
                .execute(db)
                .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Turns the stored document job into a chat job whose user turn is
    /// `user_content`, inside the caller's transaction (the one that stored
    /// the document). `Ok(false)`: the lease was lost and nothing was written.
    ///
    /// # Errors
    /// Database errors.
    pub async fn document_to_chat(
        &self,
        tx: &mut PgConnection,
        user_content: &serde_json::Value,
    ) -> Result<bool, sqlx::Error> {
        let r = sqlx::query(concat!(
            "UPDATE jobs SET kind = $4, user_content = $3
              WHERE ",
            fence!()
        ))
        .bind(self.job_id)
        .bind(self.epoch)
        .bind(user_content)
        .bind(JobKind::Chat)
        .execute(tx)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Opens a tool's transaction: sets its server-side `statement_timeout`
    /// (a PostgreSQL interval text such as `"31000ms"`) for the transaction
    /// and checks the lease. Returns the backend pid (to cancel a cut-off
    /// statement with `pg_cancel_backend`), or `None` when the lease is lost.
    ///
    /// # Errors
    /// Database errors.
    pub async fn begin_tool(&self, tx: &mut PgConnection, statement_timeout: &str) -> Result<Option<i32>, sqlx::Error> {
        let (pid, live): (i32, bool) = sqlx::query_as(concat!(
            "SELECT pg_backend_pid(), EXISTS (SELECT 1 FROM jobs WHERE ",
            fence!(),
            ")
               FROM set_config('statement_timeout', $3, true)"
        ))
        .bind(self.job_id)
        .bind(self.epoch)
        .bind(statement_timeout)
        .fetch_one(tx)
        .await?;
        Ok(live.then_some(pid))
    }

    /// Records call `call` of this claim as `open`, fenced: written only
    /// while the lease holds, so that a call made under a lost lease never
    /// looks like the live attempt's. Written twice per call: before its
    /// HTTP request leaves (`started: false`, the input an upper bound) and
    /// at its `message_start` (`started: true`: request id, message id,
    /// model and reported input replace the first write's). A row no
    /// longer `open` (recorded, or booked as orphaned) is left as it is.
    /// `Ok(false)`: nothing was written (the lease was lost, or the row is
    /// no longer open).
    ///
    /// # Errors
    /// Database errors.
    pub async fn open_call<'e>(
        &self,
        db: impl PgExecutor<'e>,
        call: &crate::store::calls::OpenedCall<'_>,
    ) -> Result<bool, sqlx::Error> {
        use crate::store::calls::count;
        let r = sqlx::query(concat!(
            "INSERT INTO api_calls (job_id, lease_epoch, seq, request_id, anthropic_message_id, model,
                    input_tokens, output_tokens, cache_write_5m, cache_write_1h, cache_read, web_search_requests,
                    max_tokens, max_web_searches, provider_cost, user_charge, estimated, abandoned, state, started)
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, 0, 0, false, false, 'open', $15
              WHERE EXISTS (SELECT 1 FROM jobs WHERE ",
            fence!(),
            ")
             ON CONFLICT (job_id, lease_epoch, seq) DO UPDATE SET
                 request_id = COALESCE(EXCLUDED.request_id, api_calls.request_id),
                 anthropic_message_id = COALESCE(EXCLUDED.anthropic_message_id, api_calls.anthropic_message_id),
                 model = EXCLUDED.model, input_tokens = EXCLUDED.input_tokens,
                 output_tokens = EXCLUDED.output_tokens, cache_write_5m = EXCLUDED.cache_write_5m,
                 cache_write_1h = EXCLUDED.cache_write_1h, cache_read = EXCLUDED.cache_read,
                 web_search_requests = EXCLUDED.web_search_requests, max_tokens = EXCLUDED.max_tokens,
                 max_web_searches = EXCLUDED.max_web_searches, started = EXCLUDED.started
               WHERE api_calls.state = 'open'"
        ))
        .bind(self.job_id)
        .bind(self.epoch)
        .bind(call.seq)
        .bind(call.request_id)
        .bind(call.anthropic_message_id)
        .bind(call.model)
        .bind(count(call.tokens.input))
        .bind(count(call.tokens.output))
        .bind(count(call.tokens.cache_write_5m))
        .bind(count(call.tokens.cache_write_1h))
        .bind(count(call.tokens.cache_read))
        .bind(count(call.tokens.web_search_requests))
        .bind(call.max_tokens.map(count))
        .bind(call.max_web_searches.map(count))
        .bind(call.started)
        .execute(db)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// The fence of a tool transaction, just before its commit: locks the
    /// job row `FOR SHARE` until the commit, so the tool's writes commit only
    /// under the live lease (and `/stop` and heartbeats never wait behind a
    /// running tool). `Ok(false)`: the lease is lost; roll back.
    ///
    /// # Errors
    /// Database errors.
    pub async fn fence(&self, tx: &mut PgConnection) -> Result<bool, sqlx::Error> {
        let held: Option<i64> =
            sqlx::query_scalar(concat!("SELECT lease_epoch FROM jobs WHERE ", fence!(), " FOR SHARE"))
                .bind(self.job_id)
                .bind(self.epoch)
                .fetch_optional(tx)
                .await?;
        Ok(held.is_some())
    }

    /// Stores a completed tool round of the job inside the caller's
    /// transaction (the one that records the round's calls), fenced: the
    /// job row is locked `FOR SHARE` until the commit, so the round commits
    /// only under the live lease and a newer claim sees it. The round's
    /// `lease_epoch` is this claim's. `Ok(None)`: the lease is lost, nothing
    /// was written (roll back); `Ok(Some(false))`: stored already by this
    /// claim (a retried commit).
    ///
    /// # Errors
    /// Database errors.
    pub async fn store_round(
        &self,
        tx: &mut PgConnection,
        round: &crate::store::rounds::Round,
    ) -> Result<Option<bool>, sqlx::Error> {
        if !self.fence(tx).await? {
            return Ok(None);
        }
        let round = crate::store::rounds::Round { lease_epoch: self.epoch, ..round.clone() };
        Ok(Some(crate::store::rounds::insert(tx, self.job_id, &round).await?))
    }
}

/// Jobs the reaper republishes now: leases expired, or queued for two
/// `visibility_s` (seconds) with nobody claiming them, and not reaped in the
/// last `visibility_s`; at most 50, locked (`SKIP LOCKED`) in `tx` until
/// [`mark_reaped`]. `(job_id, update_id)` pairs, oldest first.
///
/// # Errors
/// Database errors.
pub async fn due_for_reaping(tx: &mut PgConnection, visibility_s: f64) -> Result<Vec<(Uuid, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT job_id, update_id FROM jobs
          WHERE ((status = 'running' AND lease_expires_at < now())
                 OR (status = 'queued' AND created_at < now() - make_interval(secs => $1 * 2)))
            AND (reaped_at IS NULL OR reaped_at < now() - make_interval(secs => $1))
          ORDER BY created_at LIMIT 50 FOR UPDATE SKIP LOCKED",
    )
    .bind(visibility_s)
    .fetch_all(tx)
    .await
}

/// `open` calls whose attempt is over — the complement of the fence: the
/// job is no longer `running` under the epoch that made the call (a newer
/// claim exists, or the job was handed back or ended) — so nobody but a
/// booker will ever record them. Only job `job_id`'s when given; at most
/// `limit`, oldest first, locked in `tx` (`SKIP LOCKED`: two bookers never
/// wait for each other) until it ends.
///
/// # Errors
/// Database errors.
pub async fn orphaned_calls(
    tx: &mut PgConnection,
    job_id: Option<Uuid>,
    limit: i64,
) -> Result<Vec<crate::store::calls::OpenCall>, sqlx::Error> {
    sqlx::query_as(
        "SELECT c.job_id, c.seq, c.lease_epoch, c.request_id, c.model, c.input_tokens, c.output_tokens,
                c.cache_write_5m, c.cache_write_1h, c.cache_read, c.web_search_requests, c.max_tokens,
                c.max_web_searches, c.started, c.created_at, j.user_id, j.chat_id, j.update_id
           FROM api_calls c JOIN jobs j USING (job_id)
          WHERE c.state = 'open' AND ($1::uuid IS NULL OR c.job_id = $1)
            AND NOT (j.status = 'running' AND j.lease_epoch = c.lease_epoch)
          ORDER BY c.created_at LIMIT $2
          FOR UPDATE OF c SKIP LOCKED",
    )
    .bind(job_id)
    .bind(limit)
    .fetch_all(tx)
    .await
}

/// Stamps `reaped_at` on the jobs republished.
///
/// # Errors
/// Database errors.
pub async fn mark_reaped(tx: &mut PgConnection, job_ids: &[Uuid]) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE jobs SET reaped_at = now() WHERE job_id = ANY($1)").bind(job_ids).execute(tx).await?;
    Ok(())
}

/// A job to create at intake (queued).
#[derive(Debug)]
pub struct NewJob<'a> {
    /// The chat it answers in.
    pub chat_id: i64,
    /// Who asked.
    pub user_id: i64,
    /// The update it comes from (unique per job).
    pub update_id: i64,
    /// What it is.
    pub kind: JobKind,
    /// The user's turn, `{"command": …}` or the document (see `jobs.user_content`).
    pub user_content: &'a serde_json::Value,
    /// The Telegram message it answers.
    pub telegram_message_id: i64,
    /// The forum topic it was asked in (answered there).
    pub message_thread_id: Option<i64>,
}

/// Creates a queued job; its id (uuid v7).
///
/// # Errors
/// Database errors.
pub async fn create(tx: &mut PgConnection, job: &NewJob<'_>) -> Result<Uuid, sqlx::Error> {
    let job_id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO jobs (job_id, chat_id, user_id, update_id, kind, user_content, telegram_message_id, message_thread_id, status)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'queued')",
    )
    .bind(job_id)
    .bind(job.chat_id)
    .bind(job.user_id)
    .bind(job.update_id)
    .bind(job.kind)
    .bind(job.user_content)
    .bind(job.telegram_message_id)
    .bind(job.message_thread_id)
    .execute(tx)
    .await?;
    Ok(job_id)
}

/// How many other jobs of the chat are queued or running: `job_id` waits
/// behind them (0: it runs next).
///
/// # Errors
/// Database errors.
pub async fn jobs_ahead(tx: &mut PgConnection, chat_id: i64, job_id: Uuid) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE chat_id = $1 AND job_id <> $2 AND status IN ('queued', 'running')",
    )
    .bind(chat_id)
    .bind(job_id)
    .fetch_one(tx)
    .await
}

/// The job of update `update_id` if nobody holds it (queued, or its lease
/// expired): `(job_id, chat_id, user_id)`, to resume on a redelivery.
///
/// # Errors
/// Database errors.
pub async fn resumable(tx: &mut PgConnection, update_id: i64) -> Result<Option<(Uuid, i64, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT job_id, chat_id, user_id FROM jobs WHERE update_id = $1
           AND (status = 'queued' OR (status = 'running' AND lease_expires_at < now()))",
    )
    .bind(update_id)
    .fetch_optional(tx)
    .await
}

/// Marks `/stop` on the chat's running job (only `job_id`'s, when given);
/// the holder sees it at its next heartbeat. True when a job was marked.
///
/// # Errors
/// Database errors.
pub async fn request_stop(tx: &mut PgConnection, chat_id: i64, job_id: Option<Uuid>) -> Result<bool, sqlx::Error> {
    let marked = sqlx::query(
        "UPDATE jobs SET cancel_requested_at = now()
          WHERE chat_id = $1 AND status = 'running' AND ($2::uuid IS NULL OR job_id = $2)",
    )
    .bind(chat_id)
    .bind(job_id)
    .execute(tx)
    .await?;
    Ok(marked.rows_affected() > 0)
}

/// The chat's running job, if any: `(job_id, user_id)`.
///
/// # Errors
/// Database errors.
pub async fn running_in_chat<'e>(db: impl PgExecutor<'e>, chat_id: i64) -> Result<Option<(Uuid, i64)>, sqlx::Error> {
    sqlx::query_as("SELECT job_id, user_id FROM jobs WHERE chat_id = $1 AND status = 'running' LIMIT 1")
        .bind(chat_id)
        .fetch_optional(db)
        .await
}

/// A job with what the pipeline needs of its chat.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobRow {
    /// The job.
    pub job_id: Uuid,
    /// Its chat.
    pub chat_id: i64,
    /// Who asked.
    pub user_id: i64,
    /// Source update.
    pub update_id: i64,
    /// `chat`, `command` or `document`.
    pub kind: JobKind,
    /// The user's turn (content blocks) or `{"command": …}`.
    pub user_content: serde_json::Value,
    /// `private`, `group`, `supergroup`.
    pub chat_kind: String,
    /// Current conversation of the chat.
    pub conversation_epoch: i32,
    /// The forum topic to answer in (`jobs.message_thread_id`).
    pub message_thread_id: Option<i64>,
    /// The message the job answers (`jobs.telegram_message_id`).
    pub telegram_message_id: i64,
    /// Telegram messages already sent for this job (by an earlier attempt).
    pub reply_message_ids: Vec<i64>,
    /// True once an attempt's `finalize` committed the answer.
    pub answer_stored: bool,
    /// The reply that attempt stored, to deliver as is.
    pub stored_reply: Option<String>,
}

impl JobRow {
    /// True in private chats (drafts allowed).
    pub fn is_private(&self) -> bool {
        self.chat_kind == "private"
    }

    /// The message an answer replies to: in groups the question (so that
    /// the answer is found among other members' messages); none in private chats.
    pub fn reply_to(&self) -> Option<i64> {
        (!self.is_private() && self.telegram_message_id > 0).then_some(self.telegram_message_id)
    }

    /// A non-zero draft id, stable for the job (Bot API 9.3 `sendMessageDraft`).
    pub fn draft_id(&self) -> i64 {
        let bits = (self.job_id.as_u128() & 0x7fff_ffff_ffff_ffff) as i64;
        bits | 1
    }
}

/// Loads job `job_id` with its chat's kind and conversation.
///
/// # Errors
/// Database errors (`RowNotFound` for an unknown id).
pub async fn load<'e>(db: impl PgExecutor<'e>, job_id: Uuid) -> Result<JobRow, sqlx::Error> {
    sqlx::query_as(
        "SELECT j.job_id, j.chat_id, j.user_id, j.update_id, j.kind, j.user_content, c.kind AS chat_kind, c.conversation_epoch, j.message_thread_id,
                j.telegram_message_id, j.reply_message_ids, j.answer_stored_at IS NOT NULL AS answer_stored, j.stored_reply
           FROM jobs j JOIN chats c USING (chat_id) WHERE j.job_id = $1",
    )
    .bind(job_id)
    .fetch_one(db)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings<T: Copy + ToString>(all: &[T]) -> Vec<String> {
        all.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn job_statuses_are_the_schemas_check_list() {
        assert_eq!(strings(JobStatus::ALL), crate::store::check_list("status"));
    }

    #[test]
    fn job_kinds_are_the_schemas_check_list() {
        assert_eq!(strings(JobKind::ALL), crate::store::check_list("kind"));
    }

    #[test]
    fn every_value_parses_back_and_unknown_ones_are_refused() {
        for s in JobStatus::ALL {
            assert_eq!(s.as_str().parse::<JobStatus>(), Ok(*s));
        }
        for k in JobKind::ALL {
            assert_eq!(k.as_str().parse::<JobKind>(), Ok(*k));
        }
        for o in Outcome::ALL {
            assert_eq!(o.as_str().parse::<Outcome>(), Ok(*o));
        }
        assert_eq!(
            "Chat".parse::<JobKind>(),
            Err(crate::store::UnknownValue { column: "jobs.kind", value: "Chat".into() })
        );
    }

    #[test]
    fn only_errors_panics_and_exhausted_attempts_fail_a_job() {
        let failed: Vec<Outcome> = Outcome::ALL.iter().copied().filter(|o| o.status() == JobStatus::Failed).collect();
        assert_eq!(failed, [Outcome::Error, Outcome::Panic, Outcome::AttemptsExhausted]);
        assert!(Outcome::ALL.iter().all(|o| matches!(o.status(), JobStatus::Done | JobStatus::Failed)));
    }
}
