//! Bot commands: `/start`, `/help`, `/new` (forget the conversation),
//! `/balance`. Each runs as a job, so it is answered once and in order.

use crate::context::WorkerContext;
use crate::store::jobs::JobRow;
use rust_decimal::Decimal;
use serde_json::Value;

/// True for commands this bot answers.
pub fn is_known(command: &str) -> bool {
    matches!(command, "start" | "help" | "new" | "balance" | "buy" | "usage")
}

use crate::notices;

/// The user's balance in USD (credits − debits on their ledger account); zero
/// when they have no account yet.
///
/// # Errors
/// Database errors (billing database).
pub async fn available_balance(ctx: &WorkerContext, user_id: i64) -> Result<Decimal, sqlx::Error> {
    crate::holds::available(ctx, user_id).await
}

/// Runs the command of `job` and returns the reply.
///
/// # Errors
/// Database errors.
pub async fn run(ctx: &WorkerContext, job: &JobRow) -> Result<String, sqlx::Error> {
    let command = job.user_content.get("command").and_then(Value::as_str).unwrap_or_default();
    Ok(match command {
        "start" => {
            let name = crate::store::chats::first_name(&ctx.db, job.user_id).await?;
            notices::welcome(&name.unwrap_or_default())
        }
        // In a group the conversation is everyone's: only an administrator
        // forgets it (a private chat's id is its user's id, Bot API "Chat").
        "new"
            if job.chat_id != job.user_id
                && !crate::telegram::admins::is_admin(ctx, job.chat_id, job.user_id).await =>
        {
            notices::NEW_NEEDS_ADMIN.to_owned()
        }
        "new" => {
            crate::store::chats::new_conversation(&ctx.db, job.chat_id).await?;
            notices::NEW_CONVERSATION.to_owned()
        }
        "balance" | "usage" if !job.is_private() => {
            // A member's account is theirs: never posted to a group.
            notices::ACCOUNT_IS_PRIVATE.to_owned()
        }
        "balance" => {
            let balance = available_balance(ctx, job.user_id).await?;
            notices::balance(balance)
        }
        "buy" => {
            let keyboard = crate::payments::keyboard(&ctx.packs);
            let text = notices::CHOOSE_PACK;
            match ctx
                .pacer
                .call(job.chat_id, || ctx.telegram.send_with_keyboard(job.chat_id, text, keyboard.clone()))
                .await
            {
                Ok(_) => String::new(),
                Err(e) => {
                    tracing::warn!(error.message = %e, "could not offer the packs");
                    notices::BUY_UNAVAILABLE.to_owned()
                }
            }
        }
        "usage" => usage(ctx, job.user_id).await?,
        _ => notices::HELP.to_owned(),
    })
}

/// "Why was I charged": the user's last ten ledger movements, newest first,
/// with the model, tokens by class and whether output was estimated
/// ([`billing::statement::recent`]).
async fn usage(ctx: &WorkerContext, user_id: i64) -> Result<String, sqlx::Error> {
    let entries = billing::statement::recent(&ctx.billing_db, user_id, 10).await?;
    if entries.is_empty() {
        return Ok(notices::NO_CHARGES.to_owned());
    }
    let mut out = String::from(notices::USAGE_HEADER);
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
        let est = if e.estimated { notices::USAGE_ESTIMATED } else { "" };
        out.push_str(&format!(
            "\n{} {sign}{} {what}{tokens}{est}",
            e.at.format("%Y-%m-%d %H:%M"),
            shared::money::format_usd(e.amount)
        ));
    }
    Ok(out)
}
