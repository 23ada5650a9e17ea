//! `/metrics` after traffic: text answers, tools, a duplicate, a 529 retry,
//! a Bot API 429, a rejected webhook and billing.

use fleet_tests::fake_anthropic::{FakeAnthropic, ScriptedResponse};
use fleet_tests::fake_telegram::{FakeTelegram, Fault};
use fleet_tests::harness::{
    fixture, fixture_bytes, post_webhook, spawn_billing_worker, spawn_ingress, spawn_worker, stop, wait_until, Broker,
    TestDb, WorkerDeps, BOT_USERNAME, WAIT,
};

fn value(text: &str, name: &str, label: Option<&str>) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && (l[name.len()..].starts_with(' ') || l[name.len()..].starts_with('{')))
        .filter(|l| label.is_none_or(|lab| l.contains(lab)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The faults a healthy run never meets, provoked so their metrics move:
/// a lease taken over while its job streams, a job left behind by a crashed
/// worker for the reaper, a hold release deferred, a billing event retried
/// and one dead-lettered.
async fn faults(
    pool: &sqlx::PgPool,
    broker: &Broker,
    anthropic: &FakeAnthropic,
    http: &reqwest::Client,
    port: u16,
    admin: u16,
) -> anyhow::Result<()> {
    let scrape = |name: &'static str| async move {
        let text = http.get(format!("http://127.0.0.1:{admin}/metrics")).send().await?.text().await?;
        anyhow::Ok(value(&text, name, None))
    };
    // 1. Another holder takes the lease (a newer epoch) while the job streams.
    let mut slow = ScriptedResponse::from_file(fixture("anthropic/essay_slow.sse"))?;
    slow.event_delay_ms = 100;
    anthropic.push([slow]);
    let body = fixture_bytes("telegram/ada_after_stall.json")?;
    let update_id = serde_json::from_slice::<serde_json::Value>(&body)?["update_id"].as_i64().unwrap_or(0);
    assert_eq!(post_webhook(http, port, Some(fleet_tests::harness::WEBHOOK_SECRET), body).await?, 200);
    wait_until("the slow job to stream", WAIT, || async {
        Ok(!anthropic.calls().is_empty() && anthropic.calls().last().is_some_and(|c| c.ended_at.is_none()))
    })
    .await?;
    sqlx::query("UPDATE jobs SET lease_epoch = lease_epoch + 1 WHERE update_id = $1")
        .bind(update_id)
        .execute(pool)
        .await?;
    wait_until("the worker to notice its lease is lost", WAIT, || async {
        Ok(scrape("fleet_lease_losses_total").await? > 0.0)
    })
    .await?;
    // Let the job end (the newer "holder" never existed): the reaper takes it.
    sqlx::query("UPDATE jobs SET status = 'failed', lease_owner = NULL WHERE update_id = $1")
        .bind(update_id)
        .execute(pool)
        .await?;

    // 2. A job whose worker died: its lease has expired; the reaper republishes it.
    let job_id = uuid::Uuid::now_v7();
    sqlx::query("INSERT INTO processed_updates (update_id, kind, chat_id, outcome) VALUES (800300001, 'message', 100000003, 'job')")
        .execute(pool)
        .await?;
    sqlx::query(
        "INSERT INTO jobs (job_id, chat_id, user_id, update_id, kind, user_content, telegram_message_id, status,
                           attempts, lease_owner, lease_epoch, lease_expires_at, answer_stored_at, stored_reply)
         VALUES ($1, 100000003, 100000003, 800300001, 'chat', '[{\"type\":\"text\",\"text\":\"hi\"}]', 9,
                 'running', 1, 'a-dead-worker', 1, now() - interval '1 second', now(), 'Stored before the crash.')",
    )
    .bind(job_id)
    .execute(pool)
    .await?;
    wait_until("the reaper to rescue the job", WAIT, || async {
        Ok(scrape("fleet_reaper_rescues_total").await? > 0.0)
    })
    .await?;

    // 3. A hold release whose charge has not arrived is deferred; one whose
    // charge stayed missing for the whole deferral window is retried; a
    // malformed event is dead-lettered.
    let publisher = shared::amqp::ConfirmPublisher::new(&broker.url, "metrics-test", std::time::Duration::from_secs(5));
    let release = || {
        serde_json::json!({
            "type": "hold_release.v1", "event_id": uuid::Uuid::now_v7(), "job_id": job_id,
            "user_id": 100_000_003, "charge_event_ids": [uuid::Uuid::now_v7()]
        })
    };
    let waited_out = [(shared::amqp::DEFERRALS_HEADER, billing_worker::consumer::MAX_DEFERRALS)];
    for (body, headers) in [
        (serde_json::to_vec(&release())?, &[][..]),
        (serde_json::to_vec(&release())?, &waited_out[..]),
        (b"not an event".to_vec(), &[][..]),
    ] {
        let msg = shared::amqp::Outgoing {
            exchange: &broker.topology.billing_exchange(),
            routing_key: shared::amqp::BILLING_ROUTING_KEY,
            body: &body,
            message_id: None,
            content_type: "application/json",
            attempt: None,
        };
        publisher.publish_with_headers(msg, None, headers).await?;
    }
    let text =
        || async { anyhow::Ok(http.get(format!("http://127.0.0.1:{admin}/metrics")).send().await?.text().await?) };
    wait_until("a billing deferral, a retry and a dead letter", WAIT, || async {
        let t = text().await?;
        Ok(value(&t, "fleet_billing_deferred_total", None) > 0.0
            && value(&t, "fleet_billing_events_total", Some("retried")) > 0.0
            && value(&t, "fleet_billing_events_total", Some("dead_lettered")) > 0.0)
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_run_leaves_every_metric_with_a_plausible_value() -> anyhow::Result<()> {
    fleet_tests::harness::init_logs();
    let telegram = FakeTelegram::start("127.0.0.1:0".parse()?, BOT_USERNAME).await?;
    let anthropic = FakeAnthropic::start("127.0.0.1:0".parse()?).await?;
    let db = TestDb::new().await?;
    let broker = Broker::new().await?;
    let (port, ingress_token, ingress) = spawn_ingress(broker.prefix(), &broker.url).await?;
    let (telegram_api_url, anthropic_base_url) = (telegram.api_url(), anthropic.base_url());
    let deps = WorkerDeps {
        prefix: broker.prefix(),
        amqp_url: &broker.url,
        database_url: &db.url,
        telegram_api_url: &telegram_api_url,
        anthropic_base_url: &anthropic_base_url,
    };
    // Short leases: heartbeats every second, the reaper every 1.5 s.
    let worker = spawn_worker(&deps, |s| s.visibility_timeout_s = 3).await?;
    let admin = worker.admin_port;
    let (worker_token, worker) = worker.running;
    let billing = spawn_billing_worker(broker.prefix(), &broker.url, &db.url)?;
    for user in [100_000_001, 100_000_003] {
        billing_worker::ledger::grant(&db.pool, user, "5".parse()?, uuid::Uuid::now_v7()).await?;
    }
    let sse = |n: &str| ScriptedResponse::from_file(fixture(&format!("anthropic/{n}")));
    anthropic.push([
        sse("text_capital.sse")?,
        ScriptedResponse::http_error(529, Some(0)),
        sse("tools_calc_and_time.sse")?,
        sse("tools_followup.sse")?,
        sse("text_octopus_haiku.sse")?,
    ]);
    // On the first answer's send, which every run makes (a chat action
    // races the end of a fast answer and may never be sent).
    telegram.add_fault(Fault {
        methods: vec!["sendMessage".into()],
        nth: 1,
        status: 429,
        retry_after: Some(1),
        description: None,
        times: 1,
        stall: false,
    });
    let http = fleet_tests::harness::http_client()?;
    assert_eq!(post_webhook(&http, port, Some("wrong-secret"), b"{}".to_vec()).await?, 401);
    for (name, times) in
        [("telegram/ada_capital.json", 1), ("telegram/ada_tools.json", 1), ("telegram/chi_duplicate.json", 2)]
    {
        let body = fixture_bytes(name)?;
        for _ in 0..times {
            assert_eq!(post_webhook(&http, port, Some(fleet_tests::harness::WEBHOOK_SECRET), body.clone()).await?, 200);
        }
        let update_id = serde_json::from_slice::<serde_json::Value>(&body)?["update_id"].as_i64().unwrap_or(0);
        let pool = db.pool.clone();
        wait_until("the job to finish and its billing to apply", WAIT, || {
            let pool = pool.clone();
            async move {
                let done: Option<String> = sqlx::query_scalar("SELECT status FROM jobs WHERE update_id = $1").bind(update_id).fetch_optional(&pool).await?;
                let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM billing_outbox o WHERE NOT EXISTS (SELECT 1 FROM applied_events a WHERE a.event_id = o.event_id)")
                    .fetch_one(&pool)
                    .await?;
                Ok(done.as_deref() == Some("done") && pending == 0)
            }
        })
        .await?;
    }
    faults(&db.pool, &broker, &anthropic, &http, port, admin).await?;
    let text = http.get(format!("http://127.0.0.1:{admin}/metrics")).send().await?.text().await?;
    let ready = http.get(format!("http://127.0.0.1:{admin}/readyz")).send().await?.status();
    assert_eq!(ready, 200, "the worker is ready while consuming");
    let checks: &[(&str, Option<&str>)] = &[
        ("fleet_updates_received_total", None),
        ("fleet_updates_published_total", None),
        ("fleet_updates_rejected_total", Some("bad_secret")),
        ("fleet_updates_settled_total", Some("claimed")),
        ("fleet_jobs_total", Some("answered")),
        ("fleet_job_duration_seconds_count", None),
        ("fleet_time_to_first_token_seconds_count", None),
        ("fleet_claude_calls_total", Some("complete")),
        ("fleet_claude_errors_total", Some("http_529")),
        ("fleet_tokens_total", Some("output")),
        ("fleet_call_cost_usd_sum", Some("user_charge")),
        ("fleet_tool_calls_total", Some("calculator")),
        ("fleet_telegram_calls_total", Some("sendMessage")),
        ("fleet_telegram_flood_waits_total", None),
        ("fleet_telegram_pacing_wait_seconds_count", None),
        ("fleet_outbox_published_total", None),
        ("fleet_billing_events_total", Some("applied")),
        ("fleet_billing_events_total", Some("retried")),
        ("fleet_billing_events_total", Some("dead_lettered")),
        ("fleet_billing_deferred_total", None),
        ("fleet_lease_losses_total", None),
        ("fleet_jobs_total", Some("lease_lost")),
        ("fleet_reaper_rescues_total", None),
    ];
    let missing: Vec<&str> = checks.iter().filter(|(n, l)| value(&text, n, *l) <= 0.0).map(|(n, _)| *n).collect();
    assert!(missing.is_empty(), "metrics without a value: {missing:?}\n{text}");
    assert!(text.contains("fleet_leases_active"), "the lease gauge is exported");
    assert_eq!(value(&text, "fleet_leases_active", None), 0.0, "no lease is left held");
    worker_token.cancel();
    let _ = worker.await;
    stop("billing-worker", billing).await?;
    stop("ingress", (ingress_token, ingress)).await?;
    telegram.shutdown().await;
    anthropic.shutdown().await;
    broker.cleanup().await?;
    db.cleanup().await
}
