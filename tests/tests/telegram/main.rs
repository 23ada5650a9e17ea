//! Telegram delivery against the fake Bot API: the fleet-wide pacer, 429s
//! across workers, the plain-text fallback for rejected entities, 403
//! stopping the stream, migrated groups, and Stars payments.

mod bot_api_errors;
mod delivery;
mod pacing;
mod payments;
mod undelivered;
