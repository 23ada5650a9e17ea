//! Intake: one transaction per delivered update. It records the `update_id`
//! (a redelivery only bumps a counter), upserts the user and the chat, and
//! creates the job, so that a crash anywhere leaves either nothing or a
//! queued job that the redelivered message picks up again.

use crate::context::WorkerContext;
use crate::payments::{self, Pack};
use crate::store::chats::UserRow;
use crate::store::jobs::{JobKind, NewJob};
use crate::store::payments::PaymentAnomaly;
use serde_json::{json, Value};
use shared::contracts::{top_up_event_id, BillingEvent, TopUp};
use shared::telegram::update::{CallbackQuery, ChatMemberUpdated, Message, SuccessfulPayment};
use shared::telegram::{Incoming, TelegramError, UpdateError};
use uuid::Uuid;

/// Why an update could not be taken in.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    /// The body is not an update: dead-letter it, retrying cannot help.
    #[error("poison update: {0}")]
    Poison(#[from] UpdateError),
    /// The database failed: retry later.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// getMe failed while deciding whether a group message is for us: retry later.
    #[error("telegram: {0}")]
    Telegram(#[from] TelegramError),
    /// One attempt took longer than this: retry later.
    #[error("intake took longer than {0:?}")]
    TimedOut(std::time::Duration),
}

/// Where a "queued" notice goes: a reply to the message it announces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Announce {
    /// The message that waits.
    pub message_id: i64,
    /// Its forum topic, if any.
    pub thread: Option<i64>,
}

/// The job a delivery stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobRef {
    /// Job id (uuid v7).
    pub job_id: Uuid,
    /// Chat of the job.
    pub chat_id: i64,
    /// User who asked.
    pub user_id: i64,
    /// Telegram update that created it.
    pub update_id: i64,
}

/// What intake decided.
#[derive(Debug, PartialEq, Eq)]
pub enum IntakeOutcome {
    /// Seen before and its job (if any) is done or running elsewhere.
    Duplicate,
    /// Nothing to do for this kind of update; recorded.
    Ignored(String),
    /// A job to claim (new, or left queued by an earlier delivery).
    Job(JobRef),
    /// A new job created while another job of its chat runs or waits: it
    /// is answered after them. The user is told it is queued once per busy
    /// period: only the first message waiting behind the current answer is
    /// announced (`announce`), with a reply to that message.
    Queued {
        /// The job.
        job: JobRef,
        /// Send the "queued" notice, as a reply to this message.
        announce: Option<Announce>,
    },
    /// `/stop` (or the Stop button): cancel the chat's generation wherever it runs.
    Stop {
        /// The chat.
        chat_id: i64,
        /// Only this job (a group member stopping their own answer); `None`
        /// stops whatever runs (a private chat, or a group's administrator).
        job_id: Option<Uuid>,
        /// The `/stop` update.
        update_id: i64,
        /// A job of the chat was running when it arrived.
        running: bool,
        /// The callback query to answer, for the button.
        callback_id: Option<String>,
    },
    /// Something to do once, right after the commit, outside any job.
    Action(Action),
}

/// Immediate actions (they must not wait behind a chat's lease).
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Answer a callback query with a short notice.
    AnswerCallback {
        /// Query id.
        id: String,
        /// Notice.
        text: String,
    },
    /// Send a Stars invoice for a pack.
    Invoice {
        /// Chat to send it to.
        chat_id: i64,
        /// Who will pay.
        user_id: i64,
        /// The pack.
        pack: Pack,
        /// The button's query, to answer.
        callback_id: String,
    },
    /// Answer a pre-checkout query (within 10 s).
    PreCheckout {
        /// Query id.
        id: String,
        /// `Err(reason)` refuses the payment.
        verdict: Result<(), String>,
    },
    /// A payment was recorded (its credit is in the outbox): thank the user.
    Paid {
        /// Chat.
        chat_id: i64,
        /// USD credited.
        credit: rust_decimal::Decimal,
    },
    /// A payment failed [`payments::check`]: nothing was credited; tell the payer.
    PaymentAnomaly {
        /// Chat of the payment.
        chat_id: i64,
    },
    /// A group member asked to stop an answer that is not theirs, without
    /// being an administrator: nothing stops; tell them.
    StopRefused {
        /// The group.
        chat_id: i64,
        /// The Stop button's query to answer, if it was the button.
        callback_id: Option<String>,
    },
    /// A private message the bot cannot read (a photo, a voice message, …):
    /// the user is told what it reads, in a reply.
    Unsupported {
        /// The private chat.
        chat_id: i64,
        /// The message, replied to.
        message_id: i64,
        /// What it carries (`"photo"`, `"voice message"`, …).
        kind: &'static str,
    },
    /// The group became a supergroup.
    Migrate {
        /// Old chat id.
        from: i64,
        /// New chat id.
        to: i64,
    },
}

/// What an update asks of us, decided before the transaction (a document is
/// downloaded, or refused, at this point).
enum Plan {
    Ignore(String),
    Stop {
        chat_id: i64,
        callback_id: Option<String>,
        job_id: Option<Uuid>,
    },
    Act(Action),
    Payment {
        msg: Message,
        payment: SuccessfulPayment,
    },
    Job {
        msg: Message,
        kind: JobKind,
        content: Value,
    },
    /// A document: recorded as a `document` job, read later by the job.
    Document {
        msg: Message,
        doc: shared::telegram::update::Document,
    },
    Membership(ChatMemberUpdated),
}

async fn plan(ctx: &WorkerContext, incoming: Incoming) -> Result<Plan, IntakeError> {
    let msg = match incoming {
        Incoming::Ignored { kind } => return Ok(Plan::Ignore(kind)),
        Incoming::MyChatMember(m) => return Ok(Plan::Membership(m)),
        Incoming::CallbackQuery(q) => {
            if let (Some("stop"), Some(m)) = (q.data.as_deref(), q.message.as_ref()) {
                let private = m.chat.kind == "private";
                return stop_plan(ctx, m.chat.id, private, q.from.id, Some(q.id.clone())).await;
            }
            return Ok(callback_plan(ctx, q));
        }
        Incoming::PreCheckoutQuery(q) => {
            let verdict = payments::check(&q.invoice_payload, q.from.id, &q.currency, q.total_amount, &ctx.packs)
                .map(|_| ())
                .map_err(|refusal| {
                    tracing::warn!(reason = refusal.code(), payload = %q.invoice_payload, "pre-checkout refused");
                    refusal.message().to_owned()
                });
            return Ok(Plan::Act(Action::PreCheckout { id: q.id, verdict }));
        }
        Incoming::Message(m) => *m,
    };
    if let Some(to) = msg.migrate_to_chat_id {
        return Ok(Plan::Act(Action::Migrate { from: msg.chat.id, to }));
    }
    if let Some(from) = msg.migrate_from_chat_id {
        return Ok(Plan::Act(Action::Migrate { from, to: msg.chat.id }));
    }
    if let Some(payment) = msg.successful_payment.clone() {
        return Ok(Plan::Payment { msg, payment });
    }
    let Some(from) = msg.from.as_ref() else {
        return Ok(Plan::Ignore("message without sender".into()));
    };
    if from.is_bot {
        return Ok(Plan::Ignore("message from a bot".into()));
    }
    if from.id == TELEGRAM_SERVICE_USER {
        // A channel post forwarded automatically into its linked group: no
        // person asked, nobody is to be charged.
        return Ok(Plan::Ignore("automatic forward from a channel".into()));
    }
    if msg.text.is_none() && msg.document.is_none() {
        return Ok(match msg.media_kind() {
            // In a private chat the user is told what the bot reads; in a
            // group nobody addressed the bot (a caption is not read).
            Some(kind) if msg.is_private() => {
                Plan::Act(Action::Unsupported { chat_id: msg.chat.id, message_id: msg.message_id, kind })
            }
            Some(kind) => Plan::Ignore(format!("{kind} in a group")),
            None => Plan::Ignore("message without text".into()),
        });
    }
    if !msg.is_private() {
        let me = ctx.bot_username().await?;
        let replied_to_me = msg
            .reply_to_message
            .as_ref()
            .and_then(|r| r.from.as_ref())
            .and_then(|u| u.username.as_deref())
            .is_some_and(|u| u.eq_ignore_ascii_case(me));
        if !(msg.mentions(me) || replied_to_me) {
            return Ok(Plan::Ignore("group message not addressed to the bot".into()));
        }
    }
    if let Some(doc) = msg.document.clone() {
        // Nothing is downloaded or parsed here: the job reads it (P2: an
        // intake shard never waits on a user's file).
        return Ok(Plan::Document { msg, doc });
    }
    let Some(text) = msg.text.clone() else {
        return Ok(Plan::Ignore("message without text".into()));
    };
    if let Some(target) = msg.command_target() {
        let me = ctx.bot_username().await?;
        if !target.eq_ignore_ascii_case(me) {
            return Ok(Plan::Ignore("command addressed to another bot".into()));
        }
    }
    if let Some(command) = msg.command() {
        if command == "stop" {
            return stop_plan(ctx, msg.chat.id, msg.is_private(), from.id, None).await;
        }
        // An unknown command (`/model opus`, `/settings`) gets the help
        // text: never sent to Claude, never charged (issue 16).
        let command = if crate::commands::is_known(&command) { command } else { "help".to_owned() };
        return Ok(Plan::Job { msg, kind: JobKind::Command, content: json!({ "command": command }) });
    }
    let text = if msg.is_private() { text } else { format!("{}: {text}", from.first_name) };
    Ok(Plan::Job { msg, kind: JobKind::Chat, content: json!([{ "type": "text", "text": text }]) })
}

/// The user id Telegram sends automatic forwards from a linked channel as
/// (`777000`, "Telegram"; Bot API `Message.is_automatic_forward`).
const TELEGRAM_SERVICE_USER: i64 = 777_000;

/// Takes one raw update in.
///
/// # Errors
/// [`IntakeError`]: `Poison` for bodies that are not updates, the others
/// are transient.
pub async fn intake(ctx: &WorkerContext, body: &[u8]) -> Result<IntakeOutcome, IntakeError> {
    let (update_id, incoming) = Incoming::parse(body)?;
    let info = shared::telegram::RoutingInfo::from_bytes(body)?;
    let plan = plan(ctx, incoming).await?;
    let outcome_label = match &plan {
        Plan::Ignore(_) => "ignored",
        Plan::Stop { .. } => "stop",
        Plan::Act(_) => "action",
        Plan::Payment { .. } => "payment",
        Plan::Membership(_) => "membership",
        Plan::Job { .. } | Plan::Document { .. } => "job",
    };
    let mut tx = shared::db::begin(&ctx.db).await?;
    let inserted = crate::store::updates::record(&mut tx, update_id, &info.kind, info.chat_id, outcome_label).await?;
    if !inserted {
        if let Plan::Stop { chat_id, callback_id, job_id } = plan {
            // Stopping again is harmless; the first attempt may not have been broadcast.
            tx.commit().await?;
            return Ok(IntakeOutcome::Stop { chat_id, job_id, update_id, running: true, callback_id });
        }
        if let Plan::Act(action @ Action::Migrate { .. }) = plan {
            // Idempotent, and a failed first attempt asked for this retry.
            tx.commit().await?;
            return Ok(IntakeOutcome::Action(action));
        }
        // A redelivery: resume the job if nobody holds it, else drop.
        let pending = crate::store::jobs::resumable(&mut tx, update_id).await?;
        tx.commit().await?;
        return Ok(match pending {
            Some((job_id, chat_id, user_id)) => IntakeOutcome::Job(JobRef { job_id, chat_id, user_id, update_id }),
            None => IntakeOutcome::Duplicate,
        });
    }
    let outcome = match plan {
        Plan::Ignore(why) => {
            tracing::info!(update_id, chat_id = ?info.chat_id, reason = %why, "update ignored");
            IntakeOutcome::Ignored(why)
        }
        Plan::Stop { chat_id, callback_id, job_id } => {
            let running = crate::store::jobs::request_stop(&mut tx, chat_id, job_id).await?;
            IntakeOutcome::Stop { chat_id, job_id, update_id, running, callback_id }
        }
        Plan::Act(action) => IntakeOutcome::Action(action),
        Plan::Payment { msg, payment } => record_payment(&mut tx, &msg, &payment, &ctx.packs).await?,
        Plan::Membership(m) => {
            let blocked = matches!(m.new_chat_member.status.as_str(), "kicked" | "left");
            upsert_user(&mut tx, &m.from).await?;
            crate::store::chats::set_blocked(&mut *tx, m.from.id, blocked).await?;
            IntakeOutcome::Ignored(format!("membership changed to {}", m.new_chat_member.status))
        }
        Plan::Job { msg, kind, content } => {
            let from = upsert_sender(&mut tx, &msg).await?;
            create_job(&mut tx, &msg, from.id, update_id, kind, &content).await?
        }
        Plan::Document { msg, doc } => {
            let from = upsert_sender(&mut tx, &msg).await?;
            let sender = (!msg.is_private()).then_some(from.first_name.as_str());
            let content = crate::documents::document_content(&doc, msg.caption.as_deref(), sender);
            create_job(&mut tx, &msg, from.id, update_id, JobKind::Document, &content).await?
        }
    };
    tx.commit().await?;
    Ok(outcome)
}

/// Upserts the sender and the chat of `msg`; the sender.
async fn upsert_sender<'m>(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    msg: &'m Message,
) -> Result<&'m shared::telegram::update::User, IntakeError> {
    let from = msg.from.as_ref().ok_or(UpdateError::NoUpdateId)?;
    upsert_user(tx, from).await?;
    crate::store::chats::insert_chat(tx, msg.chat.id, &msg.chat.kind).await?;
    Ok(from)
}

/// Creates a queued job for `msg` (its sender and chat upserted before).
async fn create_job(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    msg: &Message,
    user_id: i64,
    update_id: i64,
    kind: JobKind,
    content: &Value,
) -> Result<IntakeOutcome, IntakeError> {
    let new = NewJob {
        chat_id: msg.chat.id,
        user_id,
        update_id,
        kind,
        user_content: content,
        telegram_message_id: msg.message_id,
        message_thread_id: msg.topic(),
    };
    let job_id = crate::store::jobs::create(tx, &new).await?;
    let ahead = crate::store::jobs::jobs_ahead(tx, msg.chat.id, job_id).await?;
    let job = JobRef { job_id, chat_id: msg.chat.id, user_id, update_id };
    Ok(match ahead {
        0 => IntakeOutcome::Job(job),
        // The first message waiting behind the current answer is announced;
        // later ones in the same busy period are not.
        1 => {
            IntakeOutcome::Queued { job, announce: Some(Announce { message_id: msg.message_id, thread: msg.topic() }) }
        }
        _ => IntakeOutcome::Queued { job, announce: None },
    })
}

/// Who may stop what: in a private chat, the chat's answer; in a group, the
/// asker stops their own answer, an administrator (`getChatMember`) any
/// answer, and anyone else is refused with a short notice.
async fn stop_plan(
    ctx: &WorkerContext,
    chat_id: i64,
    private: bool,
    by: i64,
    callback_id: Option<String>,
) -> Result<Plan, IntakeError> {
    if private {
        return Ok(Plan::Stop { chat_id, callback_id, job_id: None });
    }
    let running = crate::store::jobs::running_in_chat(&ctx.db, chat_id).await?;
    Ok(match running {
        // Nothing runs: the usual "nothing is being generated" answer.
        None => Plan::Stop { chat_id, callback_id, job_id: None },
        Some((job_id, asker)) if asker == by => Plan::Stop { chat_id, callback_id, job_id: Some(job_id) },
        Some(_) if crate::telegram::admins::is_admin(ctx, chat_id, by).await => {
            Plan::Stop { chat_id, callback_id, job_id: None }
        }
        Some(_) => {
            tracing::info!(chat_id, user_id = by, "stop refused: not the asker nor an administrator");
            Plan::Act(Action::StopRefused { chat_id, callback_id })
        }
    })
}

fn callback_plan(ctx: &WorkerContext, q: CallbackQuery) -> Plan {
    let data = q.data.clone().unwrap_or_default();
    let chat = q.message.as_ref().map(|m| m.chat.id);
    if let (Some(stars), Some(chat_id)) = (data.strip_prefix("buy:").and_then(|s| s.parse::<i64>().ok()), chat) {
        if let Some(pack) = ctx.packs.iter().find(|p| p.stars == stars) {
            return Plan::Act(Action::Invoice { chat_id, user_id: q.from.id, pack: *pack, callback_id: q.id });
        }
    }
    Plan::Act(Action::AnswerCallback { id: q.id, text: "This button has expired.".into() })
}

/// Writes the credit of a successful Stars payment to the outbox, keyed by
/// the charge id (a payment delivered twice credits once). The credit is the
/// pack's USD of the server-side table, after [`payments::check`]; a payment
/// that fails it credits nothing and is recorded once in `payment_anomalies`.
async fn record_payment(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    msg: &Message,
    payment: &SuccessfulPayment,
    packs: &[Pack],
) -> Result<IntakeOutcome, IntakeError> {
    let Some(from) = msg.from.as_ref() else {
        return Ok(IntakeOutcome::Ignored("payment without payer".into()));
    };
    upsert_user(tx, from).await?;
    let charge = &payment.telegram_payment_charge_id;
    let pack = match payments::check(&payment.invoice_payload, from.id, &payment.currency, payment.total_amount, packs)
    {
        Ok(pack) => pack,
        Err(refusal) => {
            let anomaly = PaymentAnomaly {
                telegram_payment_charge_id: charge,
                user_id: from.id,
                chat_id: msg.chat.id,
                invoice_payload: &payment.invoice_payload,
                currency: &payment.currency,
                total_amount: payment.total_amount,
                reason: refusal.code(),
            };
            let first = crate::store::payments::record_anomaly(tx, &anomaly).await?;
            tracing::error!(
                charge = %charge, user_id = from.id, payload = %payment.invoice_payload, currency = %payment.currency,
                total_amount = payment.total_amount, reason = refusal.code(), first,
                "payment credited nothing: recorded in payment_anomalies (refund with billing-worker refund-stars)"
            );
            return Ok(IntakeOutcome::Action(Action::PaymentAnomaly { chat_id: msg.chat.id }));
        }
    };
    let event = BillingEvent::TopUp(TopUp {
        event_id: top_up_event_id(charge),
        user_id: from.id,
        chat_id: msg.chat.id,
        stars: pack.stars,
        credit: shared::money::Usd(pack.usd),
        telegram_payment_charge_id: charge.clone(),
        occurred_at: chrono::Utc::now(),
    });
    crate::queues::relay::write(tx, &event, None).await?;
    Ok(IntakeOutcome::Action(Action::Paid { chat_id: msg.chat.id, credit: pack.usd }))
}

async fn upsert_user(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    user: &shared::telegram::update::User,
) -> Result<(), sqlx::Error> {
    let row = UserRow {
        user_id: user.id,
        first_name: &user.first_name,
        username: user.username.as_deref(),
        language_code: user.language_code.as_deref(),
    };
    crate::store::chats::upsert_user(tx, &row).await
}
