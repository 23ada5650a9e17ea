//! Attacks on the billing database through the worker's role (issue 13,
//! second pass): `fleet_worker` has no table privilege in the billing
//! database, only the SECURITY DEFINER functions `fleet_place_hold`,
//! `fleet_void_hold`, `fleet_available_balance` and `fleet_user_entries`.
//! A worker taken over by a hostile document must not be able to use them
//! to free another user's reserved balance, to place holds that are not
//! what they say, or to read without bound.
//!
//! A failing test is a bug still there: its doc comment says what is correct.

use anyhow::{ensure, Context as _, Result};
use fleet_tests::fleet::{as_role, BILLING_ROLE, WORKER_ROLE};
use fleet_tests::harness::TestDb;
use rust_decimal::Decimal;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use std::time::Duration;
use uuid::Uuid;

const ADA: i64 = 100_000_001;
const BOB: i64 = 100_000_002;

async fn pool_as(url: &str, role: &str) -> Result<PgPool> {
    let url = as_role(url, role)?;
    PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&url)
        .await
        .with_context(|| format!("connecting as {role}"))
}

/// A fresh database; Ada and Bob granted 5 USD each by the billing role;
/// the worker role's pool.
async fn two_users() -> Result<(TestDb, PgPool)> {
    let db = TestDb::new().await?;
    let billing = pool_as(&db.url, BILLING_ROLE).await?;
    for user in [ADA, BOB] {
        billing_worker::ledger::grant(&billing, user, Decimal::new(5, 0), Uuid::now_v7()).await?;
    }
    billing.close().await;
    let worker = pool_as(&db.url, WORKER_ROLE).await?;
    Ok((db, worker))
}

async fn place(worker: &PgPool, job: Uuid, user: i64, amount: Decimal, lifetime_s: f64) -> Result<bool, sqlx::Error> {
    let (placed,): (bool,) = sqlx::query_as("SELECT placed FROM fleet_place_hold($1, $2, $3, $4)")
        .bind(job)
        .bind(user)
        .bind(amount)
        .bind(lifetime_s)
        .fetch_one(worker)
        .await?;
    Ok(placed)
}

async fn available(worker: &PgPool, user: i64) -> Result<Decimal> {
    Ok(sqlx::query_scalar("SELECT fleet_available_balance($1)").bind(user).fetch_one(worker).await?)
}

/// Attack: Bob's running job holds 4 of his 5 USD. The worker role calls
/// `fleet_place_hold(<Bob's job>, <Ada>, 0, …)`: the availability check is
/// made on Ada's account, and `ON CONFLICT (job_id) DO UPDATE` then rewrites
/// Bob's hold to 0 USD (its `user_id` is neither compared nor changed), so
/// Bob's 4 USD are free again while his job still runs: overspending past
/// the hold. Correct: a hold is only re-placed for the user it belongs to
/// (`WHERE holds.user_id = EXCLUDED.user_id`, and `placed = false` or an
/// error otherwise); Bob's available balance stays 1 USD.
#[tokio::test]
async fn a_hold_placed_under_another_users_job_id_does_not_rewrite_that_users_hold() -> Result<()> {
    let (db, worker) = two_users().await?;
    let bobs_job = Uuid::now_v7();
    ensure!(place(&worker, bobs_job, BOB, Decimal::new(4, 0), 600.0).await?, "Bob's own hold is placed");
    ensure!(available(&worker, BOB).await? == Decimal::new(1, 0));

    let result = place(&worker, bobs_job, ADA, Decimal::ZERO, 600.0).await;
    let bob_after = available(&worker, BOB).await?;
    let (hold_user, hold_amount): (i64, Decimal) =
        sqlx::query_as("SELECT user_id, amount FROM holds WHERE job_id = $1")
            .bind(bobs_job)
            .fetch_one(&db.pool)
            .await?;
    worker.close().await;
    db.cleanup().await?;
    ensure!(
        bob_after == Decimal::new(1, 0),
        "placing a 0 USD hold for Ada under Bob's job id ({result:?}) rewrote Bob's hold to {hold_amount} USD \
         (hold of user {hold_user}): Bob's available balance is {bob_after} USD instead of 1"
    );
    Ok(())
}

/// Attack: holds with lifetimes that are not a duration — negative (already
/// expired when placed, so the next sweep frees it while the job runs),
/// NaN, infinite. Correct: each refused like a bad amount (SQLSTATE 22023;
/// the non-finite ones are refused today by `make_interval`'s 22008), never
/// an active hold that expired before it was placed.
#[tokio::test]
async fn a_hold_with_a_negative_or_non_finite_lifetime_is_refused() -> Result<()> {
    let (db, worker) = two_users().await?;
    let mut wrong = Vec::new();
    for lifetime in [-1.0, -1e9, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let job = Uuid::now_v7();
        match place(&worker, job, ADA, Decimal::new(1, 0), lifetime).await {
            Err(sqlx::Error::Database(e)) if matches!(e.code().as_deref(), Some("22023" | "22008")) => {}
            other => {
                let expires: Option<String> =
                    sqlx::query_scalar("SELECT expires_at::text FROM holds WHERE job_id = $1 AND status = 'active'")
                        .bind(job)
                        .fetch_optional(&db.pool)
                        .await?;
                wrong.push(format!("{lifetime} s → {other:?}, active hold expiring at {expires:?}"));
            }
        }
    }
    worker.close().await;
    db.cleanup().await?;
    ensure!(wrong.is_empty(), "lifetimes not refused:\n{}", wrong.join("\n"));
    Ok(())
}

/// Attack (or a redelivered job): the job's hold was settled (its charges
/// applied) and `fleet_place_hold` is called again for the same job. The
/// upsert skips a settled row (`WHERE holds.status <> 'settled'`) but the
/// function still answers `placed = true`: the caller believes the amount
/// is reserved and runs the job, and nothing is held. Correct: `placed`
/// is true only when an active hold of that amount exists afterwards.
#[tokio::test]
async fn placing_a_hold_again_for_a_settled_job_does_not_claim_a_reservation_that_is_not_there() -> Result<()> {
    let (db, worker) = two_users().await?;
    let job = Uuid::now_v7();
    ensure!(place(&worker, job, ADA, Decimal::new(1, 0), 600.0).await?);
    // The billing-worker settles it (hold_release after the job's charges).
    sqlx::query("UPDATE holds SET status = 'settled' WHERE job_id = $1").bind(job).execute(&db.pool).await?;
    let placed = place(&worker, job, ADA, Decimal::new(4, 0), 600.0).await?;
    let ada = available(&worker, ADA).await?;
    worker.close().await;
    db.cleanup().await?;
    ensure!(
        !placed || ada == Decimal::new(1, 0),
        "fleet_place_hold answered placed = {placed} for a settled job, yet Ada's available balance is {ada} USD: \
         the 4 USD it claims to hold are not held"
    );
    Ok(())
}

/// Attack: `/usage` reads through `fleet_user_entries`; a worker asks for
/// `i32::MAX` rows, or a negative count. Handled: at most 100 rows, none
/// for a negative limit.
#[tokio::test]
async fn user_entries_are_capped_at_one_hundred_rows_whatever_limit_is_asked() -> Result<()> {
    let (db, worker) = two_users().await?;
    let billing = pool_as(&db.url, BILLING_ROLE).await?;
    for _ in 0..110 {
        billing_worker::ledger::grant(&billing, ADA, Decimal::new(1, 2), Uuid::now_v7()).await?;
    }
    billing.close().await;
    let mut counts = Vec::new();
    for limit in [i32::MAX, -1, i32::MIN] {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM fleet_user_entries($1, $2)")
            .bind(ADA)
            .bind(limit)
            .fetch_one(&worker)
            .await?;
        counts.push(n);
    }
    worker.close().await;
    db.cleanup().await?;
    ensure!(counts == [100, 0, 0], "rows for limits i32::MAX, -1, i32::MIN: {counts:?}");
    Ok(())
}

/// Attack: the worker role creates its own objects in the billing database
/// to hijack the SECURITY DEFINER functions (a `public` table or function
/// found through their `search_path`), or calls the append-only guard.
/// Handled: no CREATE on the schema (PostgreSQL 15 default), the functions'
/// `search_path` starts with `pg_catalog`.
#[tokio::test]
async fn the_worker_role_cannot_create_objects_beside_the_ledger() -> Result<()> {
    let (db, worker) = two_users().await?;
    let mut ran = Vec::new();
    for sql in [
        "CREATE TABLE public.holds_shadow (x int)",
        "CREATE FUNCTION public.make_interval(secs double precision) RETURNS interval LANGUAGE sql AS 'SELECT interval ''100 years'''",
        "CREATE VIEW public.accounts_view AS SELECT 1",
    ] {
        if sqlx::query(sql).execute(&worker).await.is_ok() {
            ran.push(sql);
        }
    }
    worker.close().await;
    db.cleanup().await?;
    ensure!(ran.is_empty(), "the worker role created objects in the billing schema: {ran:?}");
    Ok(())
}
