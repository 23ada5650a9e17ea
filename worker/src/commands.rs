//! Bot commands: `/start`, `/help`, `/new` (forget the conversation),
//! `/balance`. Each runs as a job, so it is answered once and in order.

use crate::context::WorkerContext;
use crate::job::{JobError, JobRow};
use rust_decimal::Decimal;
use serde_json::Value;

/// True for commands this bot answers.
pub fn is_known(command: &str) -> bool {
    matches!(command, "start" | "help" | "new" | "balance" | "buy" | "usage")
}

const HELP: &str = "Send me any message and Claude will answer.\n\n/new — start a new conversation\n/stop — stop the answer being written\n/balance — show your credit\n/usage — your recent charges\n/buy — buy credit with Telegram Stars\n/help — this help";

/// Answer to `/new` in a group from a member who is not an administrator.
pub const NEW_NEEDS_ADMIN: &str = "Only a group administrator can start a new conversation here.";

/// The user's balance in USD (credits − debits on their ledger account); zero
/// when they have no account yet.
///
/// # Errors
/// Database errors (billing database).
pub async fn available_balance(ctx: &WorkerContext, user_id: i64) -> Result<Decimal, sqlx::Error> {
    crate::holds::available(ctx, user_id).await
}

/// The answer to `/balance` or `/usage` asked in a group.
pub const ACCOUNT_IS_PRIVATE: &str =
    "Ask me for /balance or /usage in a private chat: your account is not shown in a group.";

/// Runs the command of `job` and returns the reply.
///
/// # Errors
/// Database errors.
pub async fn run(ctx: &WorkerContext, job: &JobRow) -> Result<String, JobError> {
    let command = job.user_content.get("command").and_then(Value::as_str).unwrap_or_default();
    Ok(match command {
        "start" => {
            let name = crate::store::chats::first_name(&ctx.db, job.user_id).await?;
            format!(
                "Hello, {}! Welcome — I'm a bot that lets you chat with Claude.\n\n{HELP}",
                name.unwrap_or_default()
            )
        }
        // In a group the conversation is everyone's: only an administrator
        // forgets it (a private chat's id is its user's id, Bot API "Chat").
        "new" if job.chat_id != job.user_id && !crate::admins::is_admin(ctx, job.chat_id, job.user_id).await => {
            NEW_NEEDS_ADMIN.to_owned()
        }
        "new" => {
            crate::store::chats::new_conversation(&ctx.db, job.chat_id).await?;
            "Started a new conversation: earlier messages are forgotten.".to_owned()
        }
        "balance" | "usage" if !job.is_private() => {
            // A member's account is theirs: never posted to a group.
            ACCOUNT_IS_PRIVATE.to_owned()
        }
        "balance" => {
            let balance = available_balance(ctx, job.user_id).await?;
            format!("Your balance is ${:.4} (USD).", balance.round_dp(4))
        }
        "buy" => {
            let keyboard = crate::payments::keyboard(&ctx.packs);
            let text = "Choose a pack of credit (paid in Telegram Stars):";
            match ctx
                .pacer
                .call(job.chat_id, || ctx.telegram.send_with_keyboard(job.chat_id, text, keyboard.clone()))
                .await
            {
                Ok(_) => String::new(),
                Err(e) => {
                    tracing::warn!(error.message = %e, "could not offer the packs");
                    "Buying credit is not available right now; please try again later.".to_owned()
                }
            }
        }
        "usage" => usage(ctx, job.user_id).await?,
        _ => HELP.to_owned(),
    })
}

/// "Why was I charged": the user's last ten ledger movements, newest first,
/// with the model, tokens by class and whether output was estimated
/// ([`billing::statement::recent`]).
async fn usage(ctx: &WorkerContext, user_id: i64) -> Result<String, sqlx::Error> {
    let entries = billing::statement::recent(&ctx.billing_db, user_id, 10).await?;
    if entries.is_empty() {
        return Ok("No charges yet.".to_owned());
    }
    let mut out = String::from("Your recent charges and credits (USD):\n");
    for e in entries {
        let sign = if e.is_credit() { "+" } else { "−" };
        let what = e.memo.clone().unwrap_or_else(|| e.kind.to_string());
        let tokens = e
            .tokens
            .map(|t| {
                format!(
                    " — {} in, {} out, {} cache write, {} cache read",
                    t.input,
                    t.output,
                    t.cache_write_5m.saturating_add(t.cache_write_1h),
                    t.cache_read
                )
            })
            .unwrap_or_default();
        let est = if e.estimated { " (output estimated: the answer was cut short)" } else { "" };
        out.push_str(&format!(
            "\n{} {sign}${} {what}{tokens}{est}",
            e.at.format("%Y-%m-%d %H:%M"),
            e.amount.normalize()
        ));
    }
    Ok(out)
}
