//! The pacer is shared by every worker through PostgreSQL.

use fleet_tests::fake_telegram::{FakeTelegram, Fault, TgCall};
use fleet_tests::harness::{TestDb, BOT_TOKEN, BOT_USERNAME};
use shared::secret::Secret;
use shared::telegram::BotApi;
use std::time::Duration;
use worker::telegram::pacer::Pacer;

const CHAT: i64 = 100_000_001;

fn pacer(db: &TestDb, private_ms: u64) -> Pacer {
    Pacer::new(
        db.pool.clone(),
        Duration::from_millis(private_ms),
        Duration::from_millis(private_ms),
        Duration::from_millis(1),
    )
}

fn to_chat(calls: &[TgCall]) -> Vec<&TgCall> {
    calls.iter().filter(|c| c.params.get("chat_id").and_then(serde_json::Value::as_i64) == Some(CHAT)).collect()
}

#[tokio::test]
async fn two_workers_sending_to_one_chat_never_exceed_the_chat_budget() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let fake = FakeTelegram::start("127.0.0.1:0".parse()?, BOT_USERNAME).await?;
    let bot =
        BotApi::new(&fake.api_url(), Secret::new(BOT_TOKEN), Duration::from_secs(5)).map_err(anyhow::Error::msg)?;
    // Two workers: two pacers on one database.
    let (a, b) = (pacer(&db, 200), pacer(&db, 200));
    let send = |p: Pacer, bot: BotApi, n: usize| async move {
        for i in 0..n {
            let text = format!("message {i}");
            p.call(CHAT, || bot.send_message(CHAT, &text, None)).await.map(|_| ())?;
        }
        Ok::<(), shared::telegram::TelegramError>(())
    };
    let (ra, rb) = tokio::join!(send(a, bot.clone(), 5), send(b, bot.clone(), 5));
    ra.map_err(anyhow::Error::msg)?;
    rb.map_err(anyhow::Error::msg)?;
    let calls = fake.calls();
    let sent = to_chat(&calls);
    assert_eq!(sent.len(), 10);
    // Slots are 200 ms apart in the database; arrival times at the fake
    // also carry each process's scheduling delay, so single gaps get slack,
    // and the whole run must take the budget's time.
    for pair in sent.windows(2) {
        let gap = pair[1].at.duration_since(pair[0].at);
        assert!(gap >= Duration::from_millis(150), "two calls to the chat {gap:?} apart");
    }
    let span = sent[sent.len() - 1].at.duration_since(sent[0].at);
    assert!(span >= Duration::from_millis(9 * 195), "10 calls within {span:?}");
    fake.shutdown().await;
    db.cleanup().await
}

#[tokio::test]
async fn a_429_seen_by_one_worker_keeps_the_other_silent_towards_that_chat() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let fake = FakeTelegram::start("127.0.0.1:0".parse()?, BOT_USERNAME).await?;
    let bot =
        BotApi::new(&fake.api_url(), Secret::new(BOT_TOKEN), Duration::from_secs(5)).map_err(anyhow::Error::msg)?;
    fake.add_fault(Fault {
        methods: vec!["sendMessage".into()],
        nth: 1,
        status: 429,
        retry_after: Some(3),
        description: None,
        times: 1,
        stall: false,
    });
    let (a, b) = (pacer(&db, 10), pacer(&db, 10));
    // Worker A meets the 429 (and retries after it).
    let a_task = {
        let bot = bot.clone();
        tokio::spawn(async move { a.call(CHAT, || bot.send_message(CHAT, "from A", None)).await.map(|_| ()) })
    };
    assert!(fake.wait_for_call(|c| c.status == 429, Duration::from_secs(5)).await, "no 429 was answered");
    // "Seen by worker A": once A has recorded the pause for the fleet.
    let pool = db.pool.clone();
    fleet_tests::harness::wait_until("worker A to record the pause", Duration::from_secs(5), || {
        let pool = pool.clone();
        async move {
            let paused: Option<bool> =
                sqlx::query_scalar("SELECT paused_until > now() FROM telegram_pacing WHERE scope = $1")
                    .bind(format!("chat:{CHAT}"))
                    .fetch_optional(&pool)
                    .await?;
            Ok(paused == Some(true))
        }
    })
    .await?;
    // Worker B wants to talk to the same chat right after.
    b.call(CHAT, || bot.send_message(CHAT, "from B", None)).await.map_err(anyhow::Error::msg)?;
    a_task.await?.map_err(anyhow::Error::msg)?;
    let calls = fake.calls();
    let sent = to_chat(&calls);
    let limited = sent.iter().find(|c| c.status == 429).expect("the 429 call");
    for c in sent.iter().filter(|c| c.index > limited.index) {
        let after = c.at.duration_since(limited.at);
        assert!(after >= Duration::from_millis(2_950), "a call {after:?} after the 429 with retry_after=3");
    }
    assert_eq!(sent.iter().filter(|c| c.status == 200).count(), 2, "both messages arrive once");
    fake.shutdown().await;
    db.cleanup().await
}

/// Issue 16: a scope that was never paused has `paused_until = -infinity`,
/// which PostgreSQL 15+ refuses to subtract from ("cannot subtract infinite
/// timestamps"); asking how long it is paused must say zero, not fail.
#[tokio::test]
async fn a_scope_never_paused_has_no_pause_left_on_postgresql_15() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    worker::store::pacing::reserve(&db.pool, "chat:1", Duration::from_millis(1)).await?;
    let left = worker::store::pacing::pause_left(&db.pool, "chat:1").await?;
    assert_eq!(left, Duration::ZERO);
    worker::store::pacing::pause(&db.pool, "chat:1", Duration::from_secs(30)).await?;
    let left = worker::store::pacing::pause_left(&db.pool, "chat:1").await?;
    assert!(left > Duration::from_secs(25) && left <= Duration::from_secs(30), "{left:?}");
    db.cleanup().await
}
