//! Storage: the statements on the bot database (issue 14), moving here one
//! table at a time. The bottom layer: it imports nothing of the pipeline.
//!
//! - [`jobs`]: claims, the lease fence and every fenced write of a running
//!   job ([`jobs::ClaimedJob`]), and the reaper's queries.

pub mod jobs;
