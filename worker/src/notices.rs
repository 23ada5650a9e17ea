//! Every text the bot writes to a user, in one place (ready for
//! translation: a function per text that takes values, a constant for the
//! rest). What Claude writes is not here; nor are the log messages.
//!
//! Amounts are USD. Names of files are the user's own (shown as sent).

use rust_decimal::Decimal;

/// `/help`, and the tail of `/start`.
pub const HELP: &str = "Send me any message and Claude will answer.\n\n/new — start a new conversation\n/stop — stop the answer being written\n/balance — show your credit\n/usage — your recent charges\n/buy — buy credit with Telegram Stars\n/help — this help";

/// The command menu set with `setMyCommands` at start: `(command, description)`.
pub const COMMAND_MENU: &[(&str, &str)] = &[
    ("new", "Start a new conversation"),
    ("stop", "Stop the answer being written"),
    ("balance", "Show your credit"),
    ("usage", "Your recent charges"),
    ("buy", "Buy credit with Telegram Stars"),
    ("help", "What this bot does"),
];

/// The answer to `/start`: a greeting by first name, then [`HELP`].
pub fn welcome(first_name: &str) -> String {
    format!("Hello, {first_name}! Welcome — I'm a bot that lets you chat with Claude.\n\n{HELP}")
}

/// The answer to `/new`.
pub const NEW_CONVERSATION: &str = "Started a new conversation: earlier messages are forgotten.";

/// Answer to `/new` in a group from a member who is not an administrator.
pub const NEW_NEEDS_ADMIN: &str = "Only a group administrator can start a new conversation here.";

/// The answer to `/balance` or `/usage` asked in a group.
pub const ACCOUNT_IS_PRIVATE: &str =
    "Ask me for /balance or /usage in a private chat: your account is not shown in a group.";

/// The answer to `/balance`: the available balance, USD, shown to 4 decimals.
pub fn balance(available: Decimal) -> String {
    format!("Your balance is ${:.4} (USD).", available.round_dp(4))
}

/// The answer to `/usage` when the user has no ledger entry.
pub const NO_CHARGES: &str = "No charges yet.";

/// The first line of the answer to `/usage`.
pub const USAGE_HEADER: &str = "Your recent charges and credits (USD):\n";

/// Marks a `/usage` line whose output tokens were estimated.
pub const USAGE_ESTIMATED: &str = " (output estimated: the answer was cut short)";

/// The text above the `/buy` keyboard.
pub const CHOOSE_PACK: &str = "Choose a pack of credit (paid in Telegram Stars):";

/// When the `/buy` keyboard could not be sent.
pub const BUY_UNAVAILABLE: &str = "Buying credit is not available right now; please try again later.";

/// Pre-checkout refusal: the invoice payload does not parse.
pub const INVOICE_INVALID: &str = "This invoice is not valid any more.";
/// Pre-checkout refusal: the invoice was made for another user.
pub const INVOICE_OTHER_PAYER: &str = "This invoice was made for someone else.";
/// Pre-checkout refusal: the pack is not (or no longer) offered at that price.
pub const PACK_WITHDRAWN: &str = "This pack is no longer offered; send /buy again.";
/// Pre-checkout refusal: currency or amount differ from the invoice.
pub const AMOUNT_MISMATCH: &str = "The amount does not match the invoice.";

/// A payment that passed pre-checkout but could not be credited.
pub const PAYMENT_NOT_CREDITED: &str = "Your payment could not be credited automatically. It has been recorded and \
                                        will be reviewed; if it is not credited, it will be refunded.";

/// An amount shown as needed: rounded up to 4 decimals.
fn shown_needed(amount: Decimal) -> Decimal {
    amount.round_dp_with_strategy(4, rust_decimal::RoundingStrategy::AwayFromZero)
}

/// An amount shown as available: rounded down to 4 decimals, never below 0.
fn shown_available(amount: Decimal) -> Decimal {
    amount.max(Decimal::ZERO).round_dp_with_strategy(4, rust_decimal::RoundingStrategy::ToZero)
}

/// Notice for a user whose balance cannot pay for an answer at all:
/// `needed` is the least the first call needs held (its input, the smallest
/// `max_tokens`), `available` what the balance has free, USD (shown rounded
/// up and down to 4 decimals).
pub fn needs_credit(needed: Decimal, available: Decimal) -> String {
    format!(
        "Your balance is too low to ask Claude: an answer needs ${:.4} to start and your available balance is \
         ${:.4}. Send /buy to top up your credit.",
        shown_needed(needed),
        shown_available(available)
    )
}

/// Appended when the answer stops because the balance does not cover its
/// next step (`needed` USD for that step, `available` USD left after what
/// the answer has used so far).
pub fn balance_stops_answer(needed: Decimal, available: Decimal) -> String {
    format!(
        "(Stopped here: your balance does not cover the next step of this answer. It needs ${:.4} and ${:.4} is \
         left. Send /buy to top up your credit.)",
        shown_needed(needed),
        shown_available(available)
    )
}

/// The `tool_result` of a `tool_use` beyond `MAX_TOOL_CALLS_PER_ROUND` (not run).
pub fn too_many_tool_calls(limit: u32) -> String {
    format!("not run: at most {limit} tool calls are run per turn; call the others in a later turn")
}
/// Appended to an answer stopped by `/stop`.
pub const STOPPED: &str = "(Stopped.)";
/// Appended when the continuation limit is hit (P11).
pub const LIMIT: &str = "(The answer reached its length limit and was cut off here.)";
/// Appended when a stream timed out (P5).
pub const TIMEOUT: &str = "(The answer took too long and was cut short: timed out.)";
/// Claude asked to wait `seconds` (a 429 or 529 `retry-after` past the
/// answer's deadline): the wait, rounded to seconds, minutes or hours.
pub fn busy_for(seconds: u64) -> String {
    let wait = match seconds {
        0..=89 => format!("{seconds} seconds"),
        90..=3_569 => format!("{} minutes", (seconds + 30) / 60),
        _ => match (seconds + 1_800) / 3_600 {
            1 => "an hour".to_owned(),
            h => format!("{h} hours"),
        },
    };
    format!("(Claude is busy and asked to wait about {wait}; please try again later.)")
}

/// The answer to a private message of a kind the bot does not read
/// (`kind`: `"photo"`, `"voice message"`, …). Nothing is charged.
pub fn unsupported_media(kind: &str) -> String {
    format!("I can't read a {kind} yet. Send me text, or a document (PDF or a text file), and Claude will answer.")
}

/// Appended when the Messages API failed after every retry.
pub const UNAVAILABLE: &str = "(Claude is unavailable right now; please try again in a moment.)";
/// Appended when the model's context window is full.
pub const CONTEXT_FULL: &str = "(This conversation is too long for the model. Send /new to start a new one.)";
/// The answer when Claude refused (`stop_reason: refusal`) and wrote nothing.
pub const DECLINED: &str = "Claude declined to answer this request.";
/// The answer when Claude wrote nothing.
pub const EMPTY_ANSWER: &str = "(Claude returned an empty answer.)";

/// Appended when the tool-round limit of one answer is reached.
pub fn tool_round_limit(rounds: u32) -> String {
    format!("(Stopped after {rounds} rounds of tool use: the limit for one answer.)")
}

/// Appended when paid tools ran: `(name, USD)` each, e.g. `(Tools used: web_fetch $0.01.)`.
pub fn tools_used(charges: &[(String, Decimal)]) -> String {
    let list: Vec<String> = charges.iter().map(|(n, p)| format!("{n} {}", shared::money::format_usd(*p))).collect();
    format!("(Tools used: {}.)", list.join(", "))
}

/// A job failed in a step (the user may try again).
pub const FAILED: &str = "Sorry, something went wrong while answering. Please try again.";
/// A job failed on stored state that does not validate (P10).
pub const DAMAGED: &str = "Sorry, this conversation's stored state is damaged. Send /new to start a new conversation.";
/// A job used up its attempts.
pub const ATTEMPTS_EXHAUSTED: &str = "Sorry, I could not answer this message after several attempts.";
/// An update that could not be taken in after several deliveries.
pub const NOT_TAKEN: &str = "Sorry, I could not read your last message. Please send it again.";
/// A message that arrived while its chat's answer is being written.
pub const QUEUED: &str = "⏳ Queued: I will answer this after the current reply.";
/// `/stop` with nothing running.
pub const NOTHING_TO_STOP: &str = "Nothing is being generated right now.";
/// The toast of the Stop button.
pub const STOPPING: &str = "Stopping…";

/// A document whose reading failed before (a poison file), not tried again.
pub fn document_poison(name: &str) -> String {
    format!("I could not read {name}: reading it failed, and I will not try it again. Please send another file.")
}

/// A document sent by a user without credit (`available` USD, shown to 2 decimals, never below 0).
pub fn document_needs_credit(name: &str, available: Decimal) -> String {
    format!(
        "I read documents only for users with credit, and your balance is ${}. Send /buy to top up, then send {name} again.",
        available.max(Decimal::ZERO).round_dp(2)
    )
}

/// A document over the user's quota of stored files or characters.
pub fn document_over_quota(name: &str, files: i64, chars: i64, quota_files: i64, quota_chars: i64) -> String {
    format!(
        "I could not keep {name}: you have {files} stored files with {chars} characters of text, and I keep at most \
         {quota_files} files or {quota_chars} characters per user."
    )
}

/// A document larger than the download cap; `size` and `cap` are already written out ("1.5 MB").
pub fn document_too_large(name: &str, size: Option<&str>, cap: &str) -> String {
    let size = size.map(|s| format!(" is {s} and")).unwrap_or_default();
    format!("{name}{size} is larger than the {cap} I can read, so I did not keep it. Please send a smaller file.")
}

/// A document with more text than one file may keep (`chars` Unicode scalar values).
pub fn document_too_long(name: &str, chars: u64, max_chars: u64) -> String {
    format!(
        "I could not keep {name}: it has {chars} characters of text, more than the {max_chars} I keep for one file."
    )
}

/// A PDF without a text layer.
pub fn document_no_text(name: &str) -> String {
    format!("I found no text in {name} (a scanned PDF has none), so I did not keep it.")
}

/// A PDF that was refused; `why` completes the sentence.
pub fn document_unreadable(name: &str, why: &str) -> String {
    format!("I could not read this PDF ({name}): {why}.")
}

/// A file of a kind the bot does not read.
pub fn document_unsupported(name: &str) -> String {
    format!("I can read text files and PDFs only, so I could not use {name}.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_is_told_rounded_to_seconds_minutes_or_hours() {
        assert!(busy_for(30).contains("about 30 seconds"));
        assert!(busy_for(100).contains("about 2 minutes"));
        assert!(busy_for(3_600).contains("about an hour"));
        assert!(busy_for(7_000).contains("about 2 hours"));
    }
}
