//! Reconciliation: clean after a normal run; finds an event deleted from
//! the ledger (and the balance it leaves wrong) and a ledger event with no
//! outbox row.

use crate::common::{grant, usage};
use crate::helpers::TestDb;
use billing_worker::finance::reconcile;
use uuid::Uuid;

#[tokio::test]
async fn reconcile_passes_a_clean_run_and_finds_an_event_deleted_from_the_ledger() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    grant(&db.pool, 7, "5").await?;
    let job = Uuid::now_v7();
    let events: Vec<_> = (1..=3).map(|seq| usage(job, seq, 7, "0.01")).collect();
    for e in &events {
        sqlx::query("INSERT INTO billing_outbox (event_id, job_id, payload, published_at) VALUES ($1, $2, $3, now())")
            .bind(e.event_id())
            .bind(job)
            .bind(serde_json::to_value(e)?)
            .execute(&db.pool)
            .await?;
        billing_worker::ledger::apply_event(&db.pool, e).await?;
    }
    let today = chrono::Utc::now().date_naive();
    let clean = reconcile(&db.pool, &db.pool, today, today).await?;
    assert!(clean.clean(), "{}", billing_worker::finance::render(&clean, "table"));

    // Tampering: the append-only trigger is bypassed to delete one event.
    let victim = events[1].event_id();
    sqlx::query("ALTER TABLE ledger_entries DISABLE TRIGGER ledger_entries_no_update").execute(&db.pool).await?;
    sqlx::query("DELETE FROM ledger_entries WHERE event_id = $1").bind(victim).execute(&db.pool).await?;
    sqlx::query("DELETE FROM applied_events WHERE event_id = $1").bind(victim).execute(&db.pool).await?;
    // And an event applied that no worker wrote.
    let stray = usage(Uuid::now_v7(), 1, 7, "0.02");
    billing_worker::ledger::apply_event(&db.pool, &stray).await?;
    let found = reconcile(&db.pool, &db.pool, today, today).await?;
    let report = billing_worker::finance::render(&found, "table");
    assert!(!found.clean());
    assert_eq!(found.missing_in_ledger.len(), 1, "{report}");
    assert!(found.missing_in_ledger[0].contains(&victim.to_string()));
    assert!(found.missing_in_ledger[0].contains(&job.to_string()), "drill-down names the job");
    assert_eq!(found.missing_in_outbox.len(), 1, "{report}");
    assert!(
        found.invariant_failures.iter().any(|f| f.contains("user:7")),
        "the balance no longer matches its entries: {report}"
    );
    assert!(found.totals.values().any(|(outbox, ledger)| outbox != ledger), "a variance in the totals");
    db.cleanup().await
}
