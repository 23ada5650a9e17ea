//! The pacer: every Bot API call of the fleet waits for a slot of its chat
//! (about 1 message/s in private chats, 20/min in groups) and of the bot
//! (about 30/s), both kept in PostgreSQL so that every host shares them
//! (Telegram Bot FAQ, "My bot is hitting limits"). A 429's `retry_after`
//! pauses the chat fleet-wide; the next slot comes after the pause, so waits
//! accumulate across retries (P9).

use shared::retry::Policy;
use shared::telegram::TelegramError;
use sqlx::PgPool;
use std::future::Future;
use std::time::Duration;

/// Budgets of the pacer.
#[derive(Debug, Clone)]
pub struct Pacer {
    db: PgPool,
    /// Interval between calls to one private chat.
    pub private_interval: Duration,
    /// Interval between calls to one group.
    pub group_interval: Duration,
    /// Interval between any two calls of the bot.
    pub bot_interval: Duration,
    /// How long one call keeps being retried through 5xx answers, timeouts
    /// and connection failures (with [`Policy::BotApiSend`]'s backoff)
    /// before its error is returned.
    pub delivery_deadline: Duration,
}

/// Tries of one call through 429s (each waits out its `retry_after`).
const MAX_FLOOD_TRIES: usize = 6;

/// The default of [`Pacer::delivery_deadline`].
pub const DELIVERY_DEADLINE: Duration = Duration::from_secs(30);

impl Pacer {
    /// A pacer on `db`.
    pub fn new(db: PgPool, private_interval: Duration, group_interval: Duration, bot_interval: Duration) -> Self {
        Self { db, private_interval, group_interval, bot_interval, delivery_deadline: DELIVERY_DEADLINE }
    }

    /// This pacer with another [`Pacer::delivery_deadline`].
    #[must_use]
    pub fn with_delivery_deadline(mut self, deadline: Duration) -> Self {
        self.delivery_deadline = deadline;
        self
    }

    fn interval(&self, chat_id: i64) -> Duration {
        if chat_id < 0 {
            self.group_interval
        } else {
            self.private_interval
        }
    }

    async fn reserve(&self, scope: &str, interval: Duration) -> Result<Duration, sqlx::Error> {
        crate::store::pacing::reserve(&self.db, scope, interval).await
    }

    /// How long the chat is still paused by a 429.
    async fn pause_left(&self, scope: &str) -> Result<Duration, sqlx::Error> {
        crate::store::pacing::pause_left(&self.db, scope).await
    }

    /// Waits for this chat's and the bot's next slot. If the database is
    /// unreachable, waits one chat interval instead (never calls unpaced).
    pub async fn wait_turn(&self, chat_id: i64) {
        self.wait(chat_id, true).await;
    }

    /// Waits for the bot's next slot and the end of any pause of the chat,
    /// without using one of the chat's message slots (chat actions).
    pub async fn wait_action_turn(&self, chat_id: i64) {
        self.wait(chat_id, false).await;
    }

    async fn wait(&self, chat_id: i64, message: bool) {
        let scope = format!("chat:{chat_id}");
        let chat =
            if message { self.reserve(&scope, self.interval(chat_id)).await } else { self.pause_left(&scope).await };
        // No bot budget configured (benchmarks, tests): no shared hot row to update.
        let bot =
            if self.bot_interval.is_zero() { Ok(Duration::ZERO) } else { self.reserve("bot", self.bot_interval).await };
        let wait = match (chat, bot) {
            (Ok(a), Ok(b)) => a.max(b),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error.message = %e, "pacer unavailable; pacing locally");
                self.interval(chat_id)
            }
        };
        metrics::histogram!("fleet_telegram_pacing_wait_seconds").record(wait.as_secs_f64());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Pauses the chat for every host until `retry_after` from now.
    pub async fn pause(&self, chat_id: i64, retry_after: Duration) {
        let r = crate::store::pacing::pause(&self.db, &format!("chat:{chat_id}"), retry_after).await;
        if let Err(e) = r {
            tracing::warn!(error.message = %e, "could not record the pause; waiting locally");
            tokio::time::sleep(retry_after).await;
        }
    }

    /// Runs one Bot API call for `chat_id` under the pacer: waits for a slot,
    /// and on 429 pauses the chat fleet-wide and tries again in a new slot
    /// (up to 6 tries); 5xx answers, timeouts and connection failures
    /// ([`TelegramError::Transport`]) are retried with backoff and jitter
    /// until [`Pacer::delivery_deadline`]; every other error returns at once
    /// (403 stops, bad entities fall back, …).
    ///
    /// # Errors
    /// The last [`TelegramError`].
    pub async fn call<T, F, Fut>(&self, chat_id: i64, call: F) -> Result<T, TelegramError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, TelegramError>>,
    {
        self.call_kind(chat_id, true, call).await
    }

    /// As [`Pacer::call`] for a chat action (`typing`): it does not use one
    /// of the chat's message slots, but waits out the chat's pauses.
    ///
    /// # Errors
    /// The last [`TelegramError`].
    pub async fn call_action<T, F, Fut>(&self, chat_id: i64, call: F) -> Result<T, TelegramError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, TelegramError>>,
    {
        self.call_kind(chat_id, false, call).await
    }

    async fn call_kind<T, F, Fut>(&self, chat_id: i64, message: bool, mut call: F) -> Result<T, TelegramError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, TelegramError>>,
    {
        let started = tokio::time::Instant::now();
        let mut backoff = Policy::BotApiSend.backoff();
        let mut flood_tries = 0;
        loop {
            self.wait(chat_id, message).await;
            match call().await {
                Ok(v) => return Ok(v),
                Err(TelegramError::RetryAfter(d)) => {
                    metrics::counter!("fleet_telegram_flood_waits_total").increment(1);
                    flood_tries += 1;
                    if flood_tries >= MAX_FLOOD_TRIES {
                        return Err(TelegramError::RetryAfter(d));
                    }
                    tracing::warn!(
                        chat_id,
                        retry_after_s = d.as_secs(),
                        attempt = flood_tries,
                        "telegram flood control; chat paused fleet-wide"
                    );
                    self.pause(chat_id, d).await;
                }
                Err(TelegramError::Transport(e)) => {
                    let wait = backoff.next_or_last();
                    if started.elapsed() + wait > self.delivery_deadline {
                        tracing::warn!(chat_id, error.message = %e, deadline_s = self.delivery_deadline.as_secs(), "telegram call still failing at its delivery deadline; giving up");
                        return Err(TelegramError::Transport(e));
                    }
                    metrics::counter!("fleet_telegram_retries_total").increment(1);
                    tracing::warn!(chat_id, error.message = %e, wait_ms = wait.as_millis() as u64, "telegram call failed (5xx, timeout or network); retrying");
                    tokio::time::sleep(wait).await;
                }
                Err(other) => return Err(other),
            }
        }
    }
}
