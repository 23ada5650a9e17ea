//! Who may act for a whole group: the chat's owner and administrators, as
//! the Bot API's `getChatMember` says (Bot API, "getChatMember",
//! `ChatMemberOwner` / `ChatMemberAdministrator`). Used for `/stop` of
//! another member's answer and for `/new` in a group.

use crate::context::WorkerContext;
use shared::telegram::bot::GetChatMember;
use std::time::Duration;

/// Longest wait for `getChatMember`; a check that takes longer counts as
/// "not an administrator" (the caller refuses, nothing is lost).
pub const ADMIN_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// True when `user_id` is the owner or an administrator of `chat_id`. Any
/// failure (error answer, transport error, timeout) means "not an admin".
pub async fn is_admin(ctx: &WorkerContext, chat_id: i64, user_id: i64) -> bool {
    let call = ctx.telegram.call(GetChatMember { chat_id, user_id });
    match tokio::time::timeout(ADMIN_CHECK_TIMEOUT, call).await {
        Ok(Ok(member)) => member.is_admin(),
        Ok(Err(e)) => {
            tracing::warn!(chat_id, user_id, error.message = %e, "getChatMember failed; treated as not an administrator");
            false
        }
        Err(_) => {
            tracing::warn!(chat_id, user_id, "getChatMember timed out; treated as not an administrator");
            false
        }
    }
}
