//! Hostile documents (issue 13): PDFs written to attack the reader — a Form
//! XObject that draws itself (stack overflow), a page that is its own
//! parent (endless loop), a Flate text bomb — are each refused with a
//! message while the worker keeps serving other chats; the sandboxed child
//! is gone afterwards; nothing over the cap is stored. Documents never
//! stall an intake shard, pre-checkout queries never wait behind chats, and
//! a user without credit gets no document read.

use anyhow::{ensure, Result};
use fleet_tests::fake_anthropic::ScriptedResponse;
use fleet_tests::harness::tools::{document_message, message, pdf, spawn_fleet, sse, ADA};
use fleet_tests::harness::{wait_until, WAIT};
use serde_json::{json, Value};
use std::io::Write as _;
use std::time::{Duration, Instant};

/// Bob: another private chat in Ada's intake shard (ids equal mod 8).
const BOB: i64 = ADA + 8;

/// Tight sandbox limits so the loop is killed quickly.
fn limits(s: &mut worker::Settings) {
    s.document_extract_cpu_s = 2;
    s.document_extract_timeout_s = 6;
    s.document_max_chars = 100_000;
    s.document_max_bytes = 1_048_576;
}

/// One page whose content is `/X0 Do`, where `X0` is a Form XObject whose
/// own content is `/X0 Do` and that has no `/Resources` of its own.
fn recursive_form_pdf() -> Vec<u8> {
    pdf::document(&[
        b"<< /Type /Catalog /Pages 2 0 R >>".to_vec(),
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_vec(),
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /XObject << /X0 5 0 R >> >> >>"
            .to_vec(),
        pdf::stream("", b"/X0 Do"),
        pdf::stream("/Type /XObject /Subtype /Form /BBox [0 0 612 792]", b"/X0 Do"),
    ])
}

/// A page that lists itself as its `/Parent`, with nothing to inherit found.
fn parent_cycle_pdf() -> Vec<u8> {
    pdf::document(&[
        b"<< /Type /Catalog /Pages 2 0 R >>".to_vec(),
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_vec(),
        b"<< /Type /Page /Parent 3 0 R /Contents 4 0 R >>".to_vec(),
        pdf::stream("", b"BT /F1 12 Tf 72 712 Td (loop) Tj ET"),
    ])
}

/// A Flate-compressed page of `runs` × `(A…A) Tj` with 1,000 A's each:
/// a few KB that expand to `runs` × 1,000 characters of text.
fn flate_text_bomb(runs: usize) -> Result<Vec<u8>> {
    let line = format!("({}) Tj\n", "A".repeat(1_000));
    let mut content = b"BT /F1 12 Tf 72 712 Td\n".to_vec();
    for _ in 0..runs {
        content.extend(line.as_bytes());
    }
    content.extend(b"ET");
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    z.write_all(&content)?;
    let compressed = z.finish()?;
    Ok(pdf::document(&[
        b"<< /Type /Catalog /Pages 2 0 R >>".to_vec(),
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_vec(),
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>"
            .to_vec(),
        pdf::stream("/Filter /FlateDecode", &compressed),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".to_vec(),
    ]))
}

/// Children of this test process (the in-process worker's) whose command
/// line names the sandbox's subcommand.
fn extractor_processes() -> usize {
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0 };
    dir.filter_map(Result::ok)
        .filter(|e| {
            // /proc/<pid>/stat: "pid (comm) state ppid …"; comm may hold spaces.
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let after_comm = stat.rsplit_once(')').map(|(_, rest)| rest.to_owned()).unwrap_or_default();
            after_comm.split_whitespace().nth(1) == Some(me.as_str())
        })
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|cmd| cmd.split(|b| *b == 0).any(|arg| arg == b"extract-document"))
        .count()
}

fn pdf_document(file_id: &str, name: &str) -> Value {
    json!({"file_id": file_id, "file_unique_id": format!("u-{file_id}"), "file_name": name, "mime_type": "application/pdf"})
}

/// A private message from `user` (not Ada).
fn message_from(user: i64, name: &str, update_id: i64, text: &str) -> Value {
    let mut update = message(update_id, text);
    update["message"]["from"] = json!({ "id": user, "is_bot": false, "first_name": name });
    update["message"]["chat"] = json!({ "id": user, "first_name": name, "type": "private" });
    update
}

/// Sends `pdf` from Ada, waits for the refusal naming `name`, and checks
/// that Bob (same intake shard) is answered meanwhile and that no
/// extractor process is left.
async fn refused_while_bob_is_served(
    fleet: &fleet_tests::harness::TestApp,
    pdf: Vec<u8>,
    file_id: &str,
    name: &str,
    update_id: i64,
) -> Result<String> {
    fleet.telegram.add_file(file_id, pdf);
    fleet.post(&document_message(update_id, pdf_document(file_id, name), Some("Summarise it"))).await?;
    let bob_asked = Instant::now();
    fleet.post(&message_from(BOB, "Bob", update_id + 1, "Are you there?")).await?;
    fleet.wait_for_message(BOB, "Still here").await?;
    let bob_waited = bob_asked.elapsed();
    let notice = fleet.wait_for_message(ADA, name).await?;
    ensure!(bob_waited < Duration::from_secs(2), "Bob waited {bob_waited:?} behind Ada's document");
    wait_until("the extractor to be gone", Duration::from_secs(5), || async { Ok(extractor_processes() == 0) }).await?;
    Ok(notice)
}

async fn fleet() -> Result<fleet_tests::harness::TestApp> {
    let fleet = spawn_fleet(limits).await?;
    fleet.grant(ADA, "5.00").await?;
    fleet.grant(BOB, "5.00").await?;
    fleet.anthropic.set_default(Some(ScriptedResponse::from_sse(sse::text_turn("Still here."))));
    Ok(fleet)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_form_that_draws_itself_is_refused_and_the_worker_keeps_serving() -> Result<()> {
    let fleet = fleet().await?;
    let notice = refused_while_bob_is_served(&fleet, recursive_form_pdf(), "BQADform", "form.pdf", 910_000_001).await?;
    assert!(notice.starts_with("I could not read this PDF (form.pdf): "), "{notice}");
    assert_eq!(fleet.db.count("SELECT count(*) FROM documents").await?, 0);
    // The worker still answers Ada herself.
    fleet.post(&message(910_000_003, "And now?")).await?;
    fleet.wait_for_message(ADA, "Still here").await?;
    let refused = fleet.db.count("SELECT count(*) FROM jobs WHERE outcome = 'document_refused'").await?;
    assert_eq!(refused, 1);
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_that_is_its_own_parent_is_killed_at_its_limit_and_refused() -> Result<()> {
    let fleet = fleet().await?;
    let started = Instant::now();
    let notice = refused_while_bob_is_served(&fleet, parent_cycle_pdf(), "BQADloop", "loop.pdf", 910_000_011).await?;
    assert!(notice.starts_with("I could not read this PDF (loop.pdf): "), "{notice}");
    assert!(started.elapsed() < Duration::from_secs(15), "the loop was stopped by its limits");
    assert_eq!(fleet.db.count("SELECT count(*) FROM documents").await?, 0);
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flate_text_bomb_is_refused_and_nothing_over_the_cap_is_stored() -> Result<()> {
    let fleet = fleet().await?;
    let bomb = flate_text_bomb(2_000)?;
    assert!(bomb.len() < 64 * 1024, "the bomb is small: {} bytes", bomb.len());
    let notice = refused_while_bob_is_served(&fleet, bomb, "BQADbomb", "bomb.pdf", 910_000_021).await?;
    assert_eq!(
        notice,
        "I could not read this PDF (bomb.pdf): it has more than 100000 characters of text, the most I keep."
    );
    let stored = fleet.db.count("SELECT COALESCE(sum(char_length(text)), 0)::bigint FROM documents").await?;
    assert!(stored <= 100_000, "{stored} characters stored");
    // Under the cap the same construction is read and stored.
    fleet.telegram.add_file("BQADsmall", flate_text_bomb(50)?);
    fleet.anthropic.push([ScriptedResponse::from_sse(sse::text_turn("Many A's."))]);
    fleet.post(&document_message(910_000_023, pdf_document("BQADsmall", "small.pdf"), None)).await?;
    fleet.wait_for_message(ADA, "Many A's").await?;
    let stored = fleet.db.count("SELECT COALESCE(sum(char_length(text)), 0)::bigint FROM documents").await?;
    assert!((50_000..=100_000).contains(&stored), "{stored} characters stored");
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extractor_that_never_ends_is_killed_at_the_wall_clock_limit_and_reaped() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("spin-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir)?;
    let script = dir.join("spinning-extractor.sh");
    std::fs::write(&script, "#!/bin/sh\nwhile :; do :; done\n")?;
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let sandbox = worker::documents::Sandbox {
        program: script.clone(),
        limits: worker::documents::ExtractLimits::default(),
        wall_clock: Duration::from_millis(500),
    };
    let started = Instant::now();
    let refused = sandbox.extract(b"%PDF-1.4".to_vec()).await;
    assert_eq!(refused, Err(worker::documents::Refusal("reading it took too long".into())));
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    // Killed and reaped before `extract` returned: nothing of it is left.
    assert_eq!(extractor_processes(), 0);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_without_credit_gets_no_document_read() -> Result<()> {
    let fleet = spawn_fleet(limits).await?;
    fleet.telegram.add_file("BQADfree", b"free text".to_vec());
    let doc =
        json!({"file_id": "BQADfree", "file_unique_id": "u-free", "file_name": "free.txt", "mime_type": "text/plain"});
    fleet.post(&document_message(910_000_031, doc, None)).await?;
    let notice = fleet.wait_for_message(ADA, "free.txt").await?;
    assert!(notice.starts_with("I read documents only for users with credit, and your balance is $0"), "{notice}");
    let downloads = fleet.telegram.calls().into_iter().filter(|c| c.method == "getFile" || c.method == "downloadFile");
    assert_eq!(downloads.count(), 0, "nothing was looked up or downloaded");
    assert_eq!(fleet.db.count("SELECT count(*) FROM documents").await?, 0);
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pre_checkout_is_answered_within_two_seconds_while_a_shard_is_busy() -> Result<()> {
    let fleet = fleet().await?;
    // Chat 100_000_000 is in shard 0, where pre-checkout queries used to land.
    let busy = 100_000_000;
    fleet.grant(busy, "5.00").await?;
    for i in 0..40 {
        fleet.post(&message_from(busy, "Busy", 920_000_000 + i, &format!("message {i}"))).await?;
    }
    let query = json!({
        "update_id": 920_000_100,
        "pre_checkout_query": {
            "id": "pcq-busy-1",
            "from": { "id": ADA, "is_bot": false, "first_name": "Ada" },
            "currency": "XTR",
            "total_amount": 100,
            "invoice_payload": format!("stars:v1:{ADA}:100:1")
        }
    });
    let asked = Instant::now();
    fleet.post(&query).await?;
    let answered = fleet
        .telegram
        .wait_for_call(
            |c| c.method == "answerPreCheckoutQuery" && c.params["pre_checkout_query_id"] == "pcq-busy-1",
            WAIT,
        )
        .await;
    let waited = asked.elapsed();
    ensure!(answered, "the pre-checkout query was never answered");
    ensure!(waited < Duration::from_secs(2), "the pre-checkout query waited {waited:?}");
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_update_returned_five_times_is_dead_lettered_with_a_notice_not_taken_in() -> Result<()> {
    use lapin::options::BasicPublishOptions;
    use lapin::types::{AMQPValue, FieldTable};
    let fleet = fleet().await?;
    let topology = shared::amqp::Topology::new(fleet.broker.prefix());
    let update = message(910_000_041, "I killed four workers");
    let mut headers = FieldTable::default();
    // What a quorum queue writes after four returns of the delivery.
    headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(worker::queues::shards::POISON_DELIVERIES));
    let props = lapin::BasicProperties::default().with_delivery_mode(2).with_headers(headers);
    fleet
        .broker
        .channel()
        .basic_publish(
            topology.updates_exchange().as_str().into(),
            topology.update_routing_key(Some(ADA)).as_str().into(),
            BasicPublishOptions::default(),
            &serde_json::to_vec(&update)?,
            props,
        )
        .await?
        .await?;
    let notice = fleet.wait_for_message(ADA, "could not read your last message").await?;
    assert_eq!(notice, worker::notices::NOT_TAKEN);
    wait_until("the update to be dead-lettered", WAIT, || async {
        Ok(fleet.broker.message_count(&topology.updates_dead_queue()).await? == 1)
    })
    .await?;
    assert_eq!(fleet.db.count("SELECT count(*) FROM processed_updates").await?, 0, "never taken in");
    assert_eq!(fleet.anthropic.call_count(), 0);
    fleet.cleanup().await
}
