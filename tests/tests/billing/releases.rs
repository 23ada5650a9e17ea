//! Hold releases follow their charges on the normal path: a fleet's
//! ordinary jobs settle every hold with no billing event counted as
//! retried (a release that arrives while its charges are still being
//! applied waits for them, and one whose charges are really elsewhere is
//! deferred, counted apart from retries).

use fleet_tests::fake_anthropic::ScriptedResponse;
use fleet_tests::harness::billing::{grant, wait_settled};
use fleet_tests::harness::{fixture, spawn_app};

/// The value of `name` with `label` in a Prometheus text (0 when absent).
fn metric(text: &str, name: &str, label: Option<&str>) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#') && l.starts_with(name))
        .filter(|l| label.is_none_or(|v| l.contains(&format!("=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// An ordinary question from `user` in a private chat.
fn question(update_id: i64, user: i64) -> serde_json::Value {
    serde_json::json!({"update_id": update_id, "message": {"message_id": update_id % 1000, "date": 1764460800,
        "chat": {"id": user, "first_name": "User", "type": "private"},
        "from": {"id": user, "is_bot": false, "first_name": "User", "language_code": "en"},
        "text": "What is the capital of France? One sentence, please."}})
}

#[tokio::test]
async fn ordinary_jobs_settle_every_hold_without_a_billing_retry() -> anyhow::Result<()> {
    const JOBS: i64 = 12;
    let app = spawn_app().await?;
    app.anthropic.set_default(Some(ScriptedResponse::from_file(fixture("anthropic/text_capital.sse"))?));
    let users: Vec<i64> = (0..4).map(|i| 100_000_101 + i).collect();
    for user in &users {
        grant(&app.db.pool, *user, "5").await?;
    }
    for n in 0..JOBS {
        let user = users[usize::try_from(n)? % users.len()];
        app.post(&question(800_100_000 + n, user)).await?;
    }
    wait_settled(&app.db.pool, JOBS).await?;
    let pool = app.db.pool.clone();
    fleet_tests::harness::wait_until("every hold to be released", fleet_tests::harness::WAIT, || {
        let pool = pool.clone();
        async move {
            let active: i64 =
                sqlx::query_scalar("SELECT count(*) FROM holds WHERE status = 'active'").fetch_one(&pool).await?;
            Ok(active == 0)
        }
    })
    .await?;
    let text = shared::admin::metrics_handle().map(|h| h.render()).unwrap_or_default();
    let mut app = app;
    app.stop().await?;
    let answered: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE outcome = 'answered'").fetch_one(&app.db.pool).await?;
    assert_eq!(answered, JOBS, "every job answered");
    let settled: i64 =
        sqlx::query_scalar("SELECT count(*) FROM holds WHERE status = 'settled'").fetch_one(&app.db.pool).await?;
    assert_eq!(settled, JOBS, "every hold released by its job's hold_release");
    let releases: i64 = sqlx::query_scalar("SELECT count(*) FROM applied_events WHERE kind = $1")
        .bind(shared::contracts::BillingEvent::HOLD_RELEASE)
        .fetch_one(&app.db.pool)
        .await?;
    assert_eq!(releases, JOBS);
    assert!(metric(&text, "fleet_billing_events_total", Some("applied")) > 0.0, "the counter is exported:\n{text}");
    assert_eq!(
        metric(&text, "fleet_billing_events_total", Some("retried")),
        0.0,
        "no billing event was retried on the normal path:\n{text}"
    );
    // One relay and one billing-worker: every release reached the consumer
    // after its charges, so it waited for them in-process, never deferred.
    assert_eq!(metric(&text, "fleet_billing_deferred_total", None), 0.0, "no release deferred:\n{text}");
    assert_eq!(metric(&text, "fleet_billing_events_total", Some("dead_lettered")), 0.0);
    let failures: i64 = sqlx::query_scalar("SELECT count(*) FROM billing_failures").fetch_one(&app.db.pool).await?;
    assert_eq!(failures, 0, "nothing was dead-lettered");
    app.cleanup().await
}
