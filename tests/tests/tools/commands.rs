//! Commands (issue 16): the bot sets its command menu at start, and a
//! command it does not know (`/model opus`, `/settings`) gets the help
//! text; it never reaches the Messages API and nothing is charged.

use anyhow::{ensure, Result};
use fleet_tests::harness::tools::{message, spawn_fleet, ADA};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_command_gets_the_help_text_and_is_never_sent_to_claude_or_charged() -> Result<()> {
    let fleet = spawn_fleet(|_| {}).await?;
    let result = async {
        fleet.grant(ADA, "1.00").await?;
        fleet.post(&message(930_000_001, "/model opus")).await?;
        let first = fleet.wait_for_message(ADA, "/new").await?;
        ensure!(first == worker::notices::HELP, "expected the help text, got {first:?}");
        fleet.post(&message(930_000_002, "/settings")).await?;
        let helps = || fleet.telegram.messages().into_iter().filter(|m| m.text == worker::notices::HELP).count();
        fleet_tests::harness::wait_until("the second help text", fleet_tests::harness::WAIT, || async {
            Ok(helps() == 2)
        })
        .await?;
        ensure!(
            fleet.anthropic.calls().is_empty(),
            "a command reached the Messages API: {:?}",
            fleet.anthropic.calls()
        );
        // Nothing to charge: no call recorded, no billing event written.
        let calls: i64 = sqlx::query_scalar("SELECT count(*) FROM api_calls").fetch_one(&fleet.db.pool).await?;
        let events: i64 = sqlx::query_scalar("SELECT count(*) FROM billing_outbox").fetch_one(&fleet.db.pool).await?;
        ensure!(calls == 0 && events == 0, "{calls} call(s) and {events} billing event(s) for two commands");
        // The command menu was set at start, with the commands the bot answers.
        let menu = fleet.telegram.calls().into_iter().find(|c| c.method == "setMyCommands");
        let Some(menu) = menu else { anyhow::bail!("setMyCommands was never called") };
        let commands: Vec<&str> =
            menu.params["commands"].as_array().into_iter().flatten().filter_map(|c| c["command"].as_str()).collect();
        ensure!(commands.contains(&"new") && commands.contains(&"stop") && commands.contains(&"buy"), "{commands:?}");
        for c in &commands {
            ensure!(
                worker::commands::is_known(c) || *c == "stop",
                "the menu offers /{c}, which the bot does not answer"
            );
        }
        Ok(())
    }
    .await;
    fleet.cleanup().await?;
    result
}
