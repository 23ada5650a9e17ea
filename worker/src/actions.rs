//! Immediate actions decided by intake that must not wait behind a chat's
//! lease: answering buttons and pre-checkout queries (Telegram allows 10 s),
//! sending Stars invoices, thanking for payments, moving migrated chats.

use crate::context::WorkerContext;
use crate::intake::Action;
use crate::outcome::Settle;
use serde_json::json;
use shared::telegram::bot::{AnswerPreCheckoutQuery, SendInvoice};

/// Performs `action`; a transient failure retries the update later.
pub async fn perform(ctx: &WorkerContext, action: Action) -> Settle {
    match action {
        Action::AnswerCallback { id, text } => {
            let _ = ctx.telegram.answer_callback_query(&id, Some(&text)).await;
            Settle::Ack
        }
        Action::PreCheckout { id, verdict } => {
            let (ok, error_message) = match verdict {
                Ok(()) => (true, None),
                Err(reason) => (false, Some(reason)),
            };
            // Not paced: Telegram cancels the payment after 10 s.
            match ctx.telegram.call(AnswerPreCheckoutQuery { pre_checkout_query_id: id, ok, error_message }).await {
                Ok(_) => Settle::Ack,
                Err(e) => {
                    tracing::error!(error.message = %e, "pre-checkout query not answered");
                    Settle::Ack
                }
            }
        }
        Action::Invoice { chat_id, user_id, pack, callback_id } => {
            let _ = ctx.telegram.answer_callback_query(&callback_id, None).await;
            let invoice = SendInvoice {
                chat_id,
                title: format!("{} Stars of credit", pack.stars),
                description: format!("${} of credit for chatting with Claude.", pack.usd.normalize()),
                payload: crate::payments::payload(user_id, pack),
                currency: "XTR",
                prices: vec![json!({ "label": "Credit", "amount": pack.stars })],
            };
            match ctx.pacer.call(chat_id, || ctx.telegram.call(invoice.clone())).await {
                Ok(_) => Settle::Ack,
                Err(e) => {
                    tracing::warn!(error.message = %e, "invoice not sent");
                    Settle::Ack
                }
            }
        }
        Action::Paid { chat_id, credit } => {
            ctx.outbox_notify.notify_one();
            let text = format!("Thank you! ${} of credit is on its way to your balance.", credit.normalize());
            let _ = crate::telegram::delivery::send_text(ctx, chat_id, &text, &[]).await;
            Settle::Ack
        }
        Action::StopRefused { chat_id, callback_id } => {
            let text = "Only the person who asked, or a group administrator, can stop this answer.";
            match callback_id {
                Some(id) => {
                    let _ = ctx.telegram.answer_callback_query(&id, Some(text)).await;
                }
                None => {
                    let _ = crate::telegram::delivery::send_text(ctx, chat_id, text, &[]).await;
                }
            }
            Settle::Ack
        }
        Action::Unsupported { chat_id, message_id, kind } => {
            let text = crate::notices::unsupported_media(kind);
            let sent =
                crate::telegram::delivery::send_fenced_in(ctx, chat_id, None, Some(message_id), &text, &[], None).await;
            if let Err(e) = sent {
                tracing::warn!(error.message = %e, "the unsupported-media notice was not sent");
            }
            Settle::Ack
        }
        Action::PaymentAnomaly { chat_id } => {
            let _ = crate::telegram::delivery::send_text(ctx, chat_id, crate::notices::PAYMENT_NOT_CREDITED, &[]).await;
            Settle::Ack
        }
        Action::Migrate { from, to } => match crate::chats::migrate(&ctx.db, from, to).await {
            Ok(()) => Settle::Ack,
            Err(e) => {
                tracing::warn!(error.message = %e, "chat migration failed; retrying");
                Settle::Delay
            }
        },
    }
}
