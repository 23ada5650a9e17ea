//! `telegram_pacing`: one row per pacing scope (`chat:<id>`, `bot`) with the
//! next free slot and any 429 pause, shared by every host (see `pacer`).

use sqlx::PgPool;
use std::time::Duration;

/// Takes the next slot of `scope`, `interval` after the previous one and
/// not before a pause ends; how long to wait for it (zero when it is now).
///
/// # Errors
/// Database errors.
pub async fn reserve(db: &PgPool, scope: &str, interval: Duration) -> Result<Duration, sqlx::Error> {
    sqlx::query("INSERT INTO telegram_pacing (scope) VALUES ($1) ON CONFLICT (scope) DO NOTHING")
        .bind(scope)
        .execute(db)
        .await?;
    let wait: f64 = sqlx::query_scalar(
        "UPDATE telegram_pacing SET next_free = GREATEST(now(), next_free, paused_until) + make_interval(secs => $2)
          WHERE scope = $1
          RETURNING GREATEST(0, EXTRACT(EPOCH FROM (next_free - make_interval(secs => $2) - now())))::float8",
    )
    .bind(scope)
    .bind(interval.as_secs_f64())
    .fetch_one(db)
    .await?;
    Ok(Duration::from_secs_f64(wait.max(0.0)))
}

/// How long `scope` is still paused by a 429 (zero when it is not).
///
/// # Errors
/// Database errors.
pub async fn pause_left(db: &PgPool, scope: &str) -> Result<Duration, sqlx::Error> {
    let wait: Option<f64> = sqlx::query_scalar(
        // `paused_until` is `-infinity` when the scope was never paused:
        // clamped to now() first, since PostgreSQL 15+ refuses to subtract
        // an infinite timestamp ("cannot subtract infinite timestamps").
        "SELECT EXTRACT(EPOCH FROM (GREATEST(paused_until, now()) - now()))::float8 FROM telegram_pacing WHERE scope = $1",
    )
    .bind(scope)
    .fetch_optional(db)
    .await?;
    Ok(Duration::from_secs_f64(wait.unwrap_or(0.0).max(0.0)))
}

/// Pauses `scope` until `retry_after` from now (an earlier pause that ends
/// later stands).
///
/// # Errors
/// Database errors.
pub async fn pause(db: &PgPool, scope: &str, retry_after: Duration) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO telegram_pacing (scope, paused_until) VALUES ($1, now() + make_interval(secs => $2))
         ON CONFLICT (scope) DO UPDATE SET paused_until = GREATEST(telegram_pacing.paused_until, EXCLUDED.paused_until)",
    )
    .bind(scope)
    .bind(retry_after.as_secs_f64())
    .execute(db)
    .await?;
    Ok(())
}
