//! A wrong or revoked bot token (issue 15 part 3): the worker checks it with
//! `getMe` at start; while the Bot API refuses it (401) the worker is not
//! ready, says why, and takes no job, so nobody is charged for answers that
//! could not be sent.

use anyhow::{ensure, Result};
use fleet_tests::harness::tools::{message, spawn_fleet, ADA};
use fleet_tests::harness::{wait_until, WAIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_bot_token_makes_the_worker_not_ready_and_it_takes_no_job() -> Result<()> {
    // The fake refuses a token whose id is not a number (401 Unauthorized).
    let fleet = spawn_fleet(|s| s.bot_token = shared::secret::Secret::new("revoked:token")).await?;
    let result = async {
        fleet.grant(ADA, "5.00").await?;
        let http = reqwest::Client::new();
        let readyz = format!("http://127.0.0.1:{}/readyz", fleet.worker_admin_port);
        wait_until("the worker to say it is not ready because of the token", WAIT, || async {
            let r = http.get(&readyz).send().await?;
            let status = r.status();
            let body = r.text().await?;
            Ok(status == reqwest::StatusCode::SERVICE_UNAVAILABLE && body.contains("refuses the bot token"))
        })
        .await?;
        fleet.post(&message(950_000_001, "Are you there?")).await?;
        // The job is taken in but not started: its delivery goes to the delay queues.
        let metrics = format!("http://127.0.0.1:{}/metrics", fleet.worker_admin_port);
        wait_until("the job's delivery to be delayed", WAIT, || async {
            let text = http.get(&metrics).send().await?.text().await?;
            Ok(text.lines().any(|l| {
                l.starts_with("fleet_updates_settled_total") && l.contains("action=\"delay\"") && !l.ends_with(" 0")
            }))
        })
        .await?;
        ensure!(fleet.anthropic.calls().is_empty(), "a job ran although its answer could not be sent");
        let (attempts, events): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT COALESCE(sum(attempts), 0)::int8 FROM jobs), (SELECT count(*) FROM billing_outbox)",
        )
        .fetch_one(&fleet.db.pool)
        .await?;
        ensure!(attempts == 0 && events == 0, "{attempts} attempt(s) and {events} billing event(s)");
        Ok(())
    }
    .await;
    fleet.cleanup().await?;
    result
}
