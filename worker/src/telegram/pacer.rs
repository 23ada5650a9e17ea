//! The pacer: every Bot API call of the fleet waits for a slot of its chat
//! (about 1 message/s in private chats, 20/min in groups) and of the bot
//! (about 30/s), both kept in PostgreSQL so that every host shares them
//! (Telegram Bot FAQ, "My bot is hitting limits"). A 429's `retry_after`
//! pauses the chat fleet-wide; the next slot comes after the pause, so waits
//! accumulate across retries (P9).

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
}

/// Tries of one call through 429s and transport errors.
const MAX_TRIES: usize = 6;

impl Pacer {
    /// A pacer on `db`.
    pub fn new(db: PgPool, private_interval: Duration, group_interval: Duration, bot_interval: Duration) -> Self {
        Self { db, private_interval, group_interval, bot_interval }
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
    /// and on 429 pauses the chat fleet-wide and tries again in a new slot;
    /// transport errors are retried a few times; every other error returns
    /// at once (403 stops, bad entities fall back, …).
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
        let mut last = TelegramError::Transport("no attempt".into());
        for attempt in 0..MAX_TRIES {
            self.wait(chat_id, message).await;
            match call().await {
                Ok(v) => return Ok(v),
                Err(TelegramError::RetryAfter(d)) => {
                    metrics::counter!("fleet_telegram_flood_waits_total").increment(1);
                    tracing::warn!(
                        chat_id,
                        retry_after_s = d.as_secs(),
                        attempt,
                        "telegram flood control; chat paused fleet-wide"
                    );
                    self.pause(chat_id, d).await;
                    last = TelegramError::RetryAfter(d);
                }
                Err(TelegramError::Transport(e)) => {
                    tracing::warn!(chat_id, error.message = %e, attempt, "telegram transport error; retrying");
                    last = TelegramError::Transport(e);
                }
                Err(other) => return Err(other),
            }
        }
        Err(last)
    }
}
