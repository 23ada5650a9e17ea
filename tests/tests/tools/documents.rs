//! Documents the user sends: downloaded through `getFile` and the file URL
//! of the fake Bot API, their text stored, then read by Claude with
//! `read_file` / `list_files` (scripted calls); a file over
//! `DOCUMENT_MAX_BYTES` is refused with a notice and nothing is stored.

use anyhow::{Context as _, Result};
use fleet_tests::fake_anthropic::ScriptedResponse;
use fleet_tests::fake_telegram::FakeTelegram;
use fleet_tests::harness::tools::{document_message, pdf, spawn_fleet, sse, ADA};
use fleet_tests::harness::{wait_until, BOT_TOKEN, WAIT};
use serde_json::{json, Value};
use shared::secret::Secret;
use shared::telegram::bot::FileError;
use shared::telegram::{BotApi, TelegramError};

/// The cap of these tests, bytes.
const CAP: u64 = 4096;

/// A one-page PDF whose text layer is `text` (Helvetica, no compression).
fn minimal_pdf(text: &str) -> Vec<u8> {
    let content = format!("BT /F1 12 Tf 72 712 Td ({text}) Tj ET");
    pdf::document(&[
        b"<< /Type /Catalog /Pages 2 0 R >>".to_vec(),
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_vec(),
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>"
            .to_vec(),
        pdf::stream("", content.as_bytes()),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".to_vec(),
    ])
}

/// The `tool_result` blocks of a recorded request, by `tool_use_id`.
fn tool_result(body: &Value, tool_use_id: &str) -> Result<Value> {
    let last = body["messages"].as_array().and_then(|m| m.last()).context("no messages")?;
    let block = last["content"]
        .as_array()
        .and_then(|c| c.iter().find(|b| b["tool_use_id"] == tool_use_id))
        .with_context(|| format!("no tool_result for {tool_use_id} in {last}"))?;
    Ok(block.clone())
}

/// The JSON a tool answered with (its `tool_result` content).
fn tool_output(body: &Value, tool_use_id: &str) -> Result<Value> {
    let block = tool_result(body, tool_use_id)?;
    assert_ne!(block["is_error"], true, "{block}");
    Ok(serde_json::from_str(block["content"].as_str().context("content is not text")?)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_document_is_stored_once_and_read_with_read_file() -> Result<()> {
    let fleet = spawn_fleet(|s| s.document_max_bytes = CAP).await?;
    fleet.grant(ADA, "5.00").await?;
    let list = "Shopping list:\n- oat milk\n- 12 eggs\n- grüner Tee\n";
    fleet.telegram.add_file("BQADlist", list.as_bytes().to_vec());
    fleet.anthropic.push([
        ScriptedResponse::from_sse(sse::tool_turn(&[("toolu_read", "read_file", json!({"id": 1}))])),
        ScriptedResponse::from_sse(sse::text_turn("You need oat milk, 12 eggs and green tea.")),
    ]);
    fleet.anthropic.set_default(None);
    let document = json!({"file_id": "BQADlist", "file_unique_id": "AgADlist", "file_name": "list.txt",
        "mime_type": "text/plain", "file_size": list.len()});
    let update = document_message(900_000_021, document, Some("What is on my list?"));

    fleet.post(&update).await?;
    wait_until("the document to be stored", WAIT, || async {
        Ok(fleet.db.count("SELECT count(*) FROM documents").await? == 1)
    })
    .await?;
    fleet.post(&update).await?; // Telegram delivers it again: no second download, no second job.
    let reply = fleet.wait_for_message(ADA, "oat milk").await?;

    assert!(reply.contains("green tea"), "{reply}");
    let (name, text, extraction): (String, String, String) =
        sqlx::query_as("SELECT file_name, text, extraction FROM documents WHERE user_id = $1")
            .bind(ADA)
            .fetch_one(&fleet.db.pool)
            .await?;
    assert_eq!((name.as_str(), text.as_str(), extraction.as_str()), ("list.txt", list, "text"));
    let calls = fleet.anthropic.calls();
    assert_eq!(calls.len(), 2);
    let first = serde_json::to_string(&calls[0].body["messages"])?;
    assert!(
        first.contains("[The user sent the file list.txt (id 1, 50 bytes, 49 characters of text); use read_file to read it] What is on my list?"),
        "{first}"
    );
    let read = tool_output(&calls[1].body, "toolu_read")?;
    assert_eq!(read["text"], list);
    assert_eq!((read["offset"].as_i64(), read["total_chars"].as_i64()), (Some(0), Some(49)));
    assert_eq!(read["next_offset"], Value::Null);
    let downloads = fleet.telegram.calls().into_iter().filter(|c| c.method == "downloadFile").count();
    assert_eq!(downloads, 1, "a redelivered update is not downloaded again");
    assert_eq!(fleet.db.count("SELECT count(*) FROM jobs").await?, 1);
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pdf_is_stored_as_text_and_listed_and_read_in_slices() -> Result<()> {
    let fleet = spawn_fleet(|s| s.document_max_bytes = CAP).await?;
    fleet.grant(ADA, "5.00").await?;
    fleet.telegram.add_file("BQADpdf", minimal_pdf("Quarterly revenue grew 12 percent"));
    fleet.anthropic.push([
        ScriptedResponse::from_sse(sse::tool_turn(&[
            ("toolu_list", "list_files", json!({})),
            ("toolu_slice", "read_file", json!({"id": 1, "offset": 10, "max_chars": 7})),
            ("toolu_other", "read_file", json!({"id": 99})),
        ])),
        ScriptedResponse::from_sse(sse::text_turn("Revenue grew 12 percent this quarter.")),
    ]);
    fleet.anthropic.set_default(None);
    // No file_size in the update: the cap is checked on getFile's answer.
    let document = json!({"file_id": "BQADpdf", "file_unique_id": "AgADpdf", "file_name": "report.pdf",
        "mime_type": "application/pdf"});

    fleet.post(&document_message(900_000_022, document, None)).await?;
    let reply = fleet.wait_for_message(ADA, "Revenue grew").await?;

    assert!(reply.contains("12 percent"), "{reply}");
    let (text, extraction): (String, String) =
        sqlx::query_as("SELECT text, extraction FROM documents").fetch_one(&fleet.db.pool).await?;
    assert_eq!((text.trim(), extraction.as_str()), ("Quarterly revenue grew 12 percent", "pdf"));
    let calls = fleet.anthropic.calls();
    let listed = tool_output(&calls[1].body, "toolu_list")?;
    assert_eq!(listed["files"][0]["id"], 1);
    assert_eq!(listed["files"][0]["name"], "report.pdf");
    assert_eq!(listed["files"][0]["mime_type"], "application/pdf");
    let slice = tool_output(&calls[1].body, "toolu_slice")?;
    let expected: String = text.chars().skip(10).take(7).collect();
    assert_eq!(slice["text"], expected.as_str());
    assert_eq!(slice["next_offset"], 17);
    let other = tool_result(&calls[1].body, "toolu_other")?;
    assert_eq!(other["is_error"], true, "another id is not the user's file: {other}");
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_over_the_cap_or_not_text_are_refused_with_a_notice_and_not_stored() -> Result<()> {
    let fleet = spawn_fleet(|s| s.document_max_bytes = CAP).await?;
    fleet.grant(ADA, "5.00").await?;
    fleet.telegram.add_file("BQADbig", vec![b'x'; 5_000]);
    fleet.telegram.add_file("BQADhuge", vec![0; 20 * 1024 * 1024 + 1]);
    fleet.anthropic.set_default(None);
    // No sizes from the sender: getFile's size refuses the first file, the
    // Bot API's "file is too big" the second; the photo is refused by its type.
    let big =
        json!({"file_id": "BQADbig", "file_unique_id": "AgADbig", "file_name": "big.log", "mime_type": "text/plain"});
    let huge = json!({"file_id": "BQADhuge", "file_unique_id": "AgADhuge", "file_name": "huge.bin"});
    let photo = json!({"file_id": "BQADjpg", "file_unique_id": "AgADjpg", "file_name": "cat.jpg",
        "mime_type": "image/jpeg", "file_size": 2_000});

    fleet.post(&document_message(900_000_023, big, Some("Summarise this"))).await?;
    let notice = fleet.wait_for_message(ADA, "big.log").await?;
    assert_eq!(
        notice,
        "big.log is 4.9 KB and is larger than the 4.0 KB I can read, so I did not keep it. Please send a smaller file."
    );
    fleet.post(&document_message(900_000_024, huge, None)).await?;
    let notice = fleet.wait_for_message(ADA, "huge.bin").await?;
    assert!(notice.contains("larger than the 4.0 KB I can read"), "{notice}");
    fleet.post(&document_message(900_000_025, photo, None)).await?;
    let notice = fleet.wait_for_message(ADA, "cat.jpg").await?;
    assert_eq!(notice, "I can read text files and PDFs only, so I could not use cat.jpg.");

    wait_until("the document jobs to end", WAIT, || async {
        Ok(fleet.db.count("SELECT count(*) FROM jobs WHERE outcome = 'document_refused'").await? == 3)
    })
    .await?;
    assert_eq!(fleet.db.count("SELECT count(*) FROM documents").await?, 0);
    assert_eq!(fleet.anthropic.call_count(), 0, "Claude is not asked");
    let methods: Vec<String> = fleet
        .telegram
        .calls()
        .into_iter()
        .filter(|c| c.method == "getFile" || c.method == "downloadFile")
        .map(|c| c.method)
        .collect();
    assert_eq!(methods, ["getFile", "getFile"], "nothing was downloaded; the photo was not even looked up");
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_stops_at_the_cap_and_its_errors_never_show_the_token() -> Result<()> {
    let telegram = FakeTelegram::start("127.0.0.1:0".parse()?, "fleet_test_bot").await?;
    let api = BotApi::new(&telegram.api_url(), Secret::new(BOT_TOKEN), WAIT)?;
    let path = telegram.add_file("BQADbytes", vec![b'y'; 1_000]);

    assert_eq!(api.download_file(&path, 1_000).await?.len(), 1_000);
    assert_eq!(api.download_file(&path, 999).await, Err(FileError::TooLarge(999)));
    let missing = api.download_file("documents/file_404", 1_000).await.expect_err("no such file");
    let secret = BOT_TOKEN.split_once(':').map_or(BOT_TOKEN, |(_, s)| s);
    assert!(!format!("{missing} {missing:?}").contains(secret), "{missing:?}");
    assert!(matches!(missing, FileError::Telegram(TelegramError::Api(_))), "{missing:?}");
    telegram.shutdown().await;
    Ok(())
}
