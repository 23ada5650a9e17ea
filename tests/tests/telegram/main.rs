//! Telegram delivery against the fake Bot API: the fleet-wide pacer, 429s
//! across workers, the plain-text fallback for rejected entities, 403
//! stopping the stream, migrated groups, and Stars payments.

#[path = "../fleet/helpers.rs"]
#[expect(dead_code, unused_imports, reason = "helpers shared by `#[path]` includes: each suite uses a part of them")]
mod helpers;

mod delivery;
mod pacing;
mod payments;
