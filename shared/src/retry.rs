//! The one retry helper: every backoff in the fleet is a named [`Policy`]
//! here, built on `backon`'s exponential builder. A `backon` builder
//! anywhere else is refused by clippy (`disallowed-types` in
//! `clippy.toml`), so delays, limits and jitter are read in one place.
//!
//! A [`Backoff`] is an iterator of delays; the caller keeps its own loop, so
//! it can check what only it knows between attempts (a lost lease, a
//! deadline, a shutdown token) and log each retry.

use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A named backoff policy. Every delay doubles from the first to the cap;
/// "no limit" means the caller bounds the retries (by time, attempts or
/// cancellation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// A bot-database write that must not be lost to a blip (storing a
    /// finished answer, recording a sent one): 200 ms doubling to 2 s, no
    /// jitter, no limit (the job stops when its lease is lost or its
    /// visibility timeout passes).
    DbWrite,
    /// Taking an update in again after a transient failure: 100 ms doubling
    /// to 10 s, no jitter, no limit (the intake counts its attempts).
    Intake,
    /// Handing a job to the work queue: 100 ms doubling with no cap, five
    /// delays (100 ms … 1.6 s), no jitter.
    HandOff,
    /// Reconnecting a consumer that lost the broker: 200 ms doubling to
    /// 10 s, ±25 % jitter (a fleet that lost the broker together does not
    /// return together), no limit.
    BrokerReconnect,
    /// Opening a Messages API stream after a retryable HTTP or transport
    /// error: 500 ms doubling to 20 s, plus 0–100 % jitter, two retries
    /// (three attempts).
    AnthropicOpen,
    /// Restarting a Messages API call after an `error` event mid-stream
    /// (`overloaded_error`): 300 ms doubling to 10 s, plus 0–100 % jitter,
    /// two restarts.
    AnthropicRestart,
    /// A Bot API call that failed with a 5xx answer, a timeout or a
    /// connection failure: 250 ms doubling to 4 s, plus 0–100 % jitter, no
    /// limit (the caller's delivery deadline bounds it).
    BotApiSend,
    /// Telegram `getUpdates` or a batch the broker did not confirm: 200 ms
    /// doubling to 30 s, plus 0–100 % jitter, no limit.
    BotApiPoll,
}

/// Random spread applied to each delay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Jitter {
    /// Exact delays.
    None,
    /// `backon`'s jitter: the delay plus a random 0–100 % of it.
    Additive,
    /// The delay scaled by a random factor in [0.75, 1.25].
    Spread25,
}

impl Policy {
    /// (first delay, cap or `None` for no cap, most delays or `None` for no
    /// limit, jitter).
    fn shape(self) -> (Duration, Option<Duration>, Option<usize>, Jitter) {
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        match self {
            Self::DbWrite => (ms(200), Some(s(2)), None, Jitter::None),
            Self::Intake => (ms(100), Some(s(10)), None, Jitter::None),
            Self::HandOff => (ms(100), None, Some(5), Jitter::None),
            Self::BrokerReconnect => (ms(200), Some(s(10)), None, Jitter::Spread25),
            Self::AnthropicOpen => (ms(500), Some(s(20)), Some(2), Jitter::Additive),
            Self::AnthropicRestart => (ms(300), Some(s(10)), Some(2), Jitter::Additive),
            Self::BotApiSend => (ms(250), Some(s(4)), None, Jitter::Additive),
            Self::BotApiPoll => (ms(200), Some(s(30)), None, Jitter::Additive),
        }
    }

    /// A fresh sequence of delays for one operation.
    #[expect(clippy::disallowed_types, reason = "the one place a backon builder is made: every policy is named here")]
    pub fn backoff(self) -> Backoff {
        use backon::BackoffBuilder;
        let (first, cap, times, jitter) = self.shape();
        let mut builder = backon::ExponentialBuilder::default().with_factor(2.0).with_min_delay(first);
        builder = match cap {
            Some(cap) => builder.with_max_delay(cap),
            None => builder.without_max_delay(),
        };
        builder = match times {
            Some(n) => builder.with_max_times(n),
            None => builder.without_max_times(),
        };
        if jitter == Jitter::Additive {
            builder = builder.with_jitter();
        }
        Backoff { delays: builder.build(), spread: jitter == Jitter::Spread25, last: first }
    }
}

/// The delays of one operation under a [`Policy`]: `None` once its limit is
/// reached.
#[derive(Debug)]
pub struct Backoff {
    /// `backon`'s exponential delays (with its jitter when the policy asks).
    delays: backon::ExponentialBackoff,
    /// Scale each delay by a random factor in [0.75, 1.25].
    spread: bool,
    /// The last delay given (the first delay before any).
    last: Duration,
}

impl Backoff {
    /// The next delay, or past the policy's limit the last one again: for
    /// a loop bounded by something else (a lease, a deadline, a shutdown).
    pub fn next_or_last(&mut self) -> Duration {
        self.next().unwrap_or(self.last)
    }
}

impl Iterator for Backoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let d = self.delays.next()?;
        self.last = if self.spread { spread25(d) } else { d };
        Some(self.last)
    }
}

/// `d` scaled by a random factor in [0.75, 1.25] (the random bits of a
/// UUIDv7, RFC 9562 §5.7).
fn spread25(d: Duration) -> Duration {
    let r = f64::from(uuid::Uuid::now_v7().as_bytes()[15]) / 255.0;
    d.mul_f64(0.75 + r / 2.0)
}

/// Sleeps for `wait` unless `stop` is cancelled first; true when it was
/// (the caller gives up).
pub async fn sleep_or_stopped(wait: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        () = stop.cancelled() => true,
        () = tokio::time::sleep(wait) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(d: Duration) -> u128 {
        d.as_millis()
    }

    #[test]
    fn exact_policies_double_from_their_first_delay_to_their_cap() {
        let db: Vec<u128> = Policy::DbWrite.backoff().take(6).map(ms).collect();
        assert_eq!(db, [200, 400, 800, 1600, 2000, 2000]);
        let intake: Vec<u128> = Policy::Intake.backoff().take(9).map(ms).collect();
        assert_eq!(intake, [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000]);
        let hand_off: Vec<u128> = Policy::HandOff.backoff().map(ms).collect();
        assert_eq!(hand_off, [100, 200, 400, 800, 1600], "five delays, no cap");
    }

    #[test]
    fn policies_without_a_limit_keep_going_and_limited_ones_stop() {
        assert_eq!(Policy::DbWrite.backoff().take(1_000).count(), 1_000);
        assert_eq!(Policy::BrokerReconnect.backoff().take(1_000).count(), 1_000);
        assert_eq!(Policy::BotApiPoll.backoff().take(1_000).count(), 1_000);
        assert_eq!(Policy::AnthropicOpen.backoff().count(), 2);
        assert_eq!(Policy::AnthropicRestart.backoff().count(), 2);
        let mut hand_off = Policy::HandOff.backoff();
        hand_off.by_ref().for_each(drop);
        assert_eq!(ms(hand_off.next_or_last()), 1600, "past the limit, the last delay again");
    }

    #[test]
    fn jittered_policies_stay_within_their_spread() {
        // `backon` computes in f32: a delay may be off by a few nanoseconds.
        let within = |d: Duration, low: f64, high: f64| {
            let d = d.as_secs_f64() * 1_000.0;
            d >= low - 0.001 && d <= high + 0.001
        };
        for _ in 0..50 {
            let reconnect: Vec<Duration> = Policy::BrokerReconnect.backoff().take(8).collect();
            for (d, base) in reconnect.iter().zip([200.0, 400.0, 800.0, 1600.0, 3200.0, 6400.0, 10_000.0, 10_000.0]) {
                assert!(within(*d, base * 0.75, base * 1.25), "{d:?} around {base} ms");
            }
            let open: Vec<Duration> = Policy::AnthropicOpen.backoff().collect();
            for (d, base) in open.iter().zip([500.0, 1000.0]) {
                assert!(within(*d, base, base * 2.0), "{d:?} from {base} ms");
            }
            let poll: Vec<Duration> = Policy::BotApiPoll.backoff().take(12).collect();
            assert!(poll.iter().all(|d| within(*d, 200.0, 60_000.0)), "capped at 30 s before jitter");
        }
    }

    #[tokio::test]
    async fn a_cancelled_token_ends_the_sleep() {
        let stop = CancellationToken::new();
        assert!(!sleep_or_stopped(Duration::from_millis(10), &stop).await);
        stop.cancel();
        assert!(sleep_or_stopped(Duration::from_secs(3600), &stop).await);
    }
}
