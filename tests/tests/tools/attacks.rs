//! Attacks of a hostile Telegram user (and of a careless operator) beyond
//! the ones `hostile_documents`, `groups`, `telegram::payments` and
//! `lifecycle::poison` cover (issue 13, verification).
//!
//! Each test is one attack. A test that fails shows a bug that is still
//! there: its doc comment says what the correct behaviour is. A test that
//! passes is a regression test for an attack that is handled.
//!
//! # Layout
//! - group addressing: mentions and commands meant for someone else; a
//!   member's tool results replayed in another member's request;
//!   updates without a human sender.
//! - documents: the per-user quota under concurrency; the decompression
//!   cap against filter chains and corrupt checksums.
//! - tools: `read_file` at the largest offset.
//! - payments: a pack withdrawn between pre-checkout and payment; payload
//!   spellings.
//! - operator: absurd settings.

use anyhow::{ensure, Context as _, Result};
use clap::Parser as _;
use fleet_tests::fake_anthropic::ScriptedResponse;
use fleet_tests::fake_telegram::BOT_USER_ID;
use fleet_tests::harness::tools::{document_message, message, pdf, spawn_fleet, sse, ClaimedJob, ADA};
use fleet_tests::harness::{BOT_USERNAME, WAIT};
use serde_json::{json, Value};
use std::io::Write as _;
use worker::documents::{extract_pdf, ChildReport, ExtractLimits};

/// Bob: a second member of the groups.
const BOB: i64 = 100_000_002;
/// The group of the addressing attacks.
const GROUP: i64 = -100_700;

/// A message of `user` in `chat` (a group), with `text` as given.
fn group_message(update_id: i64, chat: i64, user: i64, name: &str, text: &str) -> Value {
    let mut update = message(update_id, text);
    update["message"]["from"] = json!({ "id": user, "is_bot": false, "first_name": name });
    update["message"]["chat"] = json!({ "id": chat, "title": "Team", "type": "group" });
    update
}

/// `update` made a reply to a message the bot sent in `chat`.
fn replying_to_the_bot(mut update: Value, chat: i64) -> Value {
    update["message"]["reply_to_message"] = json!({
        "message_id": 1,
        "from": { "id": BOT_USER_ID, "is_bot": true, "first_name": "Fleet", "username": BOT_USERNAME },
        "chat": { "id": chat, "title": "Team", "type": "group" },
        "date": 1_764_460_700,
        "text": "an earlier answer",
    });
    update
}

// ---------------------------------------------------------------------------
// Group addressing
// ---------------------------------------------------------------------------

/// Attack: in a group, Bob writes to another account whose name starts with
/// the bot's (`@fleet_test_bot_fan`). The bot must not take that as a
/// mention: it must not answer, call Claude or charge Bob for it.
/// Correct: only a `mention` of exactly `@<bot username>` (the message's
/// `mention` entities, or a whole-word match) addresses the bot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mention_of_another_account_whose_name_starts_with_the_bots_is_not_for_the_bot() -> Result<()> {
    let fleet = spawn_fleet(|_| {}).await?;
    fleet.grant(BOB, "5.00").await?;
    // One scripted answer: if the first message were taken for a mention it
    // would use it up, and the real mention would find none (two calls).
    fleet.anthropic.push([ScriptedResponse::from_sse(sse::text_turn("Answered the real mention."))]);
    fleet.anthropic.set_default(Some(ScriptedResponse::from_sse(sse::text_turn("WRONGLY ANSWERED"))));

    let fan = format!("@{BOT_USERNAME}_fan are you coming tonight?");
    let mut update = group_message(900_014_001, GROUP, BOB, "Bob", &fan);
    let length = BOT_USERNAME.len() + 5;
    update["message"]["entities"] = json!([{ "type": "mention", "offset": 0, "length": length }]);
    fleet.post(&update).await?;
    // Same chat, so intake takes it after the first: when this is answered,
    // the first was decided.
    fleet.post(&group_message(900_014_002, GROUP, BOB, "Bob", &format!("@{BOT_USERNAME} hello"))).await?;
    let answer = fleet.wait_for_message(GROUP, "Answered").await?;
    let wrongly = fleet.telegram.messages().into_iter().any(|m| m.text.contains("WRONGLY ANSWERED"));
    let calls = fleet.anthropic.call_count();
    fleet.cleanup().await?;
    ensure!(
        calls == 1 && !wrongly,
        "a message to @{BOT_USERNAME}_fan was answered by the bot (and charged to Bob): {calls} Claude calls, \
         last answer {answer:?}"
    );
    Ok(())
}

/// Attack: Bob, an administrator, sends `/new@other_bot` (a command for
/// another bot) as a reply to one of this bot's answers. It must not reset
/// this bot's conversation. Correct: a command whose `@suffix` names another
/// bot is not ours, whatever it replies to (the same holds for
/// `/stop@other_bot`, which would stop this bot's answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_addressed_to_another_bot_is_not_run_by_this_one() -> Result<()> {
    let fleet = spawn_fleet(|_| {}).await?;
    fleet.grant(BOB, "5.00").await?;
    fleet.telegram.set_member_status(GROUP, BOB, "administrator");
    fleet.anthropic.set_default(Some(ScriptedResponse::from_sse(sse::text_turn("Still the same conversation."))));

    let mut new = replying_to_the_bot(group_message(900_014_101, GROUP, BOB, "Bob", "/new@other_bot"), GROUP);
    new["message"]["entities"] = json!([{ "type": "bot_command", "offset": 0, "length": 14 }]);
    fleet.post(&new).await?;
    fleet.post(&group_message(900_014_102, GROUP, BOB, "Bob", &format!("@{BOT_USERNAME} hello"))).await?;
    fleet.wait_for_message(GROUP, "Still the same conversation").await?;
    let epoch = fleet.db.count_of("SELECT conversation_epoch::int8 FROM chats WHERE chat_id = $1", GROUP).await?;
    let reset = fleet.telegram.messages().into_iter().any(|m| m.text.contains("Started a new conversation"));
    fleet.cleanup().await?;
    ensure!(epoch == 1 && !reset, "/new@other_bot reset this bot's conversation (epoch {epoch}, notice sent: {reset})");
    Ok(())
}

/// Attack: updates without a human sender that mention the bot — a group
/// message without `from` (a channel speaking through `sender_chat`), one
/// from an anonymous administrator (`GroupAnonymousBot`, a bot), an edited
/// message, a channel post, an unknown kind, the largest `update_id`. None
/// is answered or charged to anyone, none stops the worker: the next real
/// message is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_without_a_human_sender_are_ignored_and_charge_nobody() -> Result<()> {
    let fleet = spawn_fleet(|_| {}).await?;
    fleet.grant(BOB, "5.00").await?;
    fleet.anthropic.push([ScriptedResponse::from_sse(sse::text_turn("Only Bob is answered."))]);
    fleet.anthropic.set_default(None);
    let mention = format!("@{BOT_USERNAME} answer me on someone's bill");

    let mut channel = group_message(900_014_201, GROUP, BOB, "Bob", &mention);
    if let Some(m) = channel["message"].as_object_mut() {
        m.remove("from");
    }
    channel["message"]["sender_chat"] = json!({ "id": -100_999, "title": "News", "type": "channel" });
    let mut anonymous = group_message(900_014_202, GROUP, 1_087_968_824, "Group", &mention);
    anonymous["message"]["from"]["is_bot"] = json!(true);
    anonymous["message"]["sender_chat"] = json!({ "id": GROUP, "title": "Team", "type": "group" });
    let edited_from = group_message(900_014_203, GROUP, BOB, "Bob", &mention);
    let edited = json!({ "update_id": 900_014_203, "edited_message": edited_from["message"] });
    let post = json!({ "update_id": 900_014_204, "channel_post": {
        "message_id": 4, "chat": { "id": -100_999, "type": "channel" }, "date": 1, "text": mention } });
    let unknown = json!({ "update_id": 900_014_205, "business_message": { "chat": { "id": GROUP } } });
    let mut huge = group_message(i64::MAX, GROUP, BOB, "Bob", "no mention, largest update id");
    huge["message"]["message_id"] = json!(9);
    for update in [&channel, &anonymous, &edited, &post, &unknown, &huge] {
        fleet.post(update).await?;
    }
    fleet.post(&group_message(900_014_206, GROUP, BOB, "Bob", &format!("@{BOT_USERNAME} hello"))).await?;
    fleet.wait_for_message(GROUP, "Only Bob is answered").await?;
    ensure!(fleet.anthropic.call_count() == 1, "{} Claude calls", fleet.anthropic.call_count());
    let jobs = fleet.db.count("SELECT count(*) FROM jobs").await?;
    ensure!(jobs == 1, "{jobs} jobs were created");
    let users: Vec<i64> =
        sqlx::query_scalar("SELECT user_id FROM users ORDER BY user_id").fetch_all(&fleet.db.pool).await?;
    ensure!(users == vec![BOB], "users recorded: {users:?}");
    fleet.cleanup().await
}

/// Attack (privacy and cost): in a group, Ada sends a file and has Claude
/// read it; then Bob asks anything. The `read_file` result (the file's text,
/// up to 20,000 characters a call) is stored in the group's conversation and
/// replayed in Bob's request: Bob pays its input tokens on every later
/// question, and can have Claude quote Ada's file although "files are seen
/// only by the member who sent them" (README, groups). Correct: a member's
/// tool results are not replayed in another member's requests (or the
/// promise and the billing are documented as they are).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_members_file_read_in_a_group_is_not_replayed_in_another_members_request() -> Result<()> {
    const SECRET: &str = "ADA-GROUP-FILE salary table: Ada 9000, Carl 7000";
    let fleet = spawn_fleet(|_| {}).await?;
    fleet.grant(ADA, "5.00").await?;
    fleet.grant(BOB, "5.00").await?;
    fleet.telegram.add_file("BQADgrp", SECRET.as_bytes().to_vec());
    fleet.anthropic.push([
        ScriptedResponse::from_sse(sse::tool_turn(&[("toolu_ada_read", "read_file", json!({"id": 1}))])),
        ScriptedResponse::from_sse(sse::text_turn("Ada's file is summarised.")),
        ScriptedResponse::from_sse(sse::text_turn("Bob is answered.")),
    ]);
    fleet.anthropic.set_default(None);
    let doc = json!({"file_id": "BQADgrp", "file_unique_id": "u-grp", "file_name": "salaries.txt",
        "mime_type": "text/plain"});
    let mut update = document_message(900_014_601, doc, Some(&format!("@{BOT_USERNAME} summarise")));
    update["message"]["chat"] = json!({ "id": GROUP, "title": "Team", "type": "group" });
    fleet.post(&update).await?;
    fleet.wait_for_message(GROUP, "Ada's file is summarised").await?;
    let ada_read = fleet.anthropic.calls().get(1).map(|c| c.body.to_string()).unwrap_or_default();
    ensure!(ada_read.contains("ADA-GROUP-FILE"), "Ada's own read did not carry her file: {ada_read}");
    fleet.post(&group_message(900_014_602, GROUP, BOB, "Bob", &format!("@{BOT_USERNAME} what's new?"))).await?;
    fleet.wait_for_message(GROUP, "Bob is answered").await?;
    let bob = fleet.anthropic.calls().last().map(|c| c.body.to_string()).unwrap_or_default();
    fleet.cleanup().await?;
    ensure!(!bob.contains("ADA-GROUP-FILE"), "Bob's request (billed to Bob) carries Ada's file text: {bob}");
    Ok(())
}

// ---------------------------------------------------------------------------
// Documents
// ---------------------------------------------------------------------------

fn zlib(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    z.write_all(bytes)?;
    Ok(z.finish()?)
}

/// One page whose `/Contents` are `contents` (each a stream with `filter`),
/// Helvetica as `/F1`.
fn page_pdf(filter: &str, contents: &[Vec<u8>]) -> Vec<u8> {
    let first_content = 4;
    let font = first_content + contents.len();
    let refs: Vec<String> = (0..contents.len()).map(|i| format!("{} 0 R", first_content + i)).collect();
    let mut objects = vec![
        b"<< /Type /Catalog /Pages 2 0 R >>".to_vec(),
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_vec(),
        format!(
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents [{}] /Resources << /Font << /F1 {font} 0 R >> >> >>",
            refs.join(" ")
        )
        .into_bytes(),
    ];
    objects.extend(contents.iter().map(|c| pdf::stream(filter, c)));
    objects.push(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".to_vec());
    pdf::document(&objects)
}

/// A content stream that shows `text` and is padded with `padding` bytes of
/// blank lines (no text): large once decompressed, a few KB compressed.
fn padded_content(text: &str, padding: usize) -> Vec<u8> {
    let mut content = format!("BT /F1 12 Tf 72 712 Td ({text}) Tj ET\n").into_bytes();
    content.extend(std::iter::repeat_n(b'\n', padding));
    content
}

const MIB: usize = 1024 * 1024;

/// Attack: the decompression cap (`DOCUMENT_MAX_DECOMPRESSED_MIB`, here
/// 1 MiB) is measured by inflating each Flate stream once. A stream
/// compressed twice (`/Filter [/FlateDecode /FlateDecode]`) counts as its
/// inner, still compressed size, and the parser then inflates both layers.
/// The same content compressed once is refused; compressed twice it must be
/// refused too. Correct: the cap counts the output of the whole filter
/// chain (every filter lopdf decodes: FlateDecode, LZWDecode, ASCII85Decode).
#[test]
fn a_stream_compressed_twice_is_measured_after_both_filters() -> Result<()> {
    let limits = ExtractLimits { max_decompressed_bytes: MIB as u64, ..ExtractLimits::default() };
    let content = padded_content("twice inflated", 4 * MIB);
    let once = page_pdf("/Filter /FlateDecode", &[zlib(&content)?]);
    let refused_once = extract_pdf(&once, &limits);
    assert!(
        matches!(&refused_once, ChildReport::Refused { reason } if reason.contains("expands to more than 1 MB")),
        "compressed once: {refused_once:?}"
    );
    let twice = page_pdf("/Filter [/FlateDecode /FlateDecode]", &[zlib(&zlib(&content)?)?]);
    assert!(twice.len() < 64 * 1024, "{} bytes", twice.len());
    let report = extract_pdf(&twice, &limits);
    let shown = match &report {
        ChildReport::Text { text, pages } => format!("Text {{ {} characters, {pages} pages }}", text.len()),
        ChildReport::Refused { reason } => format!("Refused {{ {reason} }}"),
    };
    assert!(
        matches!(&report, ChildReport::Refused { reason } if reason.contains("expands to more than 1 MB")),
        "4 MiB behind two Flate filters passed a 1 MiB cap: {shown}"
    );
    Ok(())
}

/// Attack: Flate streams whose Adler-32 checksum is wrong. The cap's
/// counter drops what such a stream yielded (`io::copy(..).unwrap_or(0)`),
/// while lopdf keeps the inflated bytes of a stream that fails its checksum.
/// Three streams of 0.9 MiB each, every checksum flipped, pass a 1 MiB cap.
/// Correct: a corrupt stream counts the bytes it yielded before the error
/// (as the comment in `check_decompressed` says), so 2.7 MiB is refused.
#[test]
fn streams_with_a_wrong_checksum_count_what_they_inflate_to() -> Result<()> {
    let limits = ExtractLimits { max_decompressed_bytes: MIB as u64, ..ExtractLimits::default() };
    let mut contents = Vec::new();
    for i in 0..3 {
        let mut z = zlib(&padded_content(&format!("part {i}"), MIB * 9 / 10))?;
        let n = z.len();
        for b in &mut z[n - 4..] {
            *b ^= 0xff;
        }
        contents.push(z);
    }
    let report = extract_pdf(&page_pdf("/Filter /FlateDecode", &contents), &limits);
    let shown = match &report {
        ChildReport::Text { text, .. } => format!("read: {text:?}"),
        ChildReport::Refused { reason } => format!("refused: {reason}"),
    };
    assert!(
        matches!(&report, ChildReport::Refused { reason } if reason.contains("expands to more than 1 MB")),
        "2.7 MiB of corrupt Flate streams passed a 1 MiB cap, {shown}"
    );
    Ok(())
}

/// Attack: Ada sends one PDF in each of four groups at once, with a quota
/// of one stored file (`DOCUMENT_QUOTA_FILES=1`). The quota is read before
/// the download and the reading, and the row is written after them, with
/// nothing in between that serialises two jobs of one user in different
/// chats: every job sees zero files. Correct: at most one file is stored
/// (the check and the insert in one transaction with a per-user lock, or a
/// re-check under the lock before the insert); the others are refused with
/// the quota notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_quota_holds_when_one_user_sends_documents_in_several_chats_at_once() -> Result<()> {
    let fleet = spawn_fleet(|s| s.document_quota_files = 1).await?;
    fleet.grant(ADA, "5.00").await?;
    fleet.anthropic.set_default(Some(ScriptedResponse::from_sse(sse::text_turn("Kept it."))));
    let groups: Vec<i64> = (0..4).map(|i| -100_800 - i).collect();
    for (i, group) in groups.iter().enumerate() {
        let file_id = format!("BQADquota{i}");
        fleet.telegram.add_file(&file_id, page_pdf("", &[padded_content(&format!("file {i}"), 10)]));
        let doc = json!({"file_id": file_id, "file_unique_id": format!("u-quota-{i}"),
            "file_name": format!("q{i}.pdf"), "mime_type": "application/pdf"});
        let mut update = document_message(900_014_301 + i as i64, doc, Some(&format!("@{BOT_USERNAME} keep this")));
        update["message"]["chat"] = json!({ "id": group, "title": "Team", "type": "group" });
        fleet.post(&update).await?;
    }
    for group in &groups {
        let decided = |c: &fleet_tests::fake_telegram::TgCall| {
            c.method == "sendMessage"
                && c.params["chat_id"].as_i64() == Some(*group)
                && c.params["text"].as_str().is_some_and(|t| t.contains("Kept it") || t.contains("could not keep"))
        };
        ensure!(fleet.telegram.wait_for_call(decided, WAIT).await, "group {group} was never answered");
    }
    let stored = fleet.db.count_of("SELECT count(*) FROM documents WHERE user_id = $1", ADA).await?;
    fleet.cleanup().await?;
    ensure!(stored <= 1, "{stored} documents stored for Ada with DOCUMENT_QUOTA_FILES=1");
    Ok(())
}

// ---------------------------------------------------------------------------
// Tools
// ---------------------------------------------------------------------------

/// Attack: Claude (steered by the user) calls `read_file` with the largest
/// offset the schema admits (`"minimum": 0`, no maximum): 2^63 − 1. Correct:
/// an error result for the model ("offset … is past the end" or "too
/// large"), never an arithmetic overflow (`offset + 1` panics in a debug
/// build and only wraps to the right refusal by chance in release).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_file_at_the_largest_offset_is_an_error_result_not_an_overflow() -> Result<()> {
    let job = ClaimedJob::new(5).await?;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO documents (user_id, chat_id, file_unique_id, file_name, mime_type, size_bytes, extraction, text)
         VALUES ($1, $1, 'u-off', 'off.txt', 'text/plain', 5, 'text', 'hello') RETURNING id",
    )
    .bind(ADA)
    .fetch_one(&job.db.pool)
    .await?;
    let cancel = tokio_util::sync::CancellationToken::new();
    let uses =
        vec![fleet_tests::harness::tools::tool_use("toolu_off", "read_file", json!({"id": id, "offset": i64::MAX}))];
    // Spawned, so that a panic is reported as such rather than ending the test.
    let ran = {
        let ctx = job.ctx().clone();
        let (row, lease) = (job.job.clone(), job.lease);
        tokio::spawn(async move { worker::tools::run_tools(&ctx, &row, &lease, uses, &cancel).await }).await
    };
    job.cleanup().await?;
    let outcomes = match ran {
        Err(e) => anyhow::bail!("read_file with offset 2^63-1 panicked: {e}"),
        Ok(r) => r.map_err(|e| anyhow::anyhow!("{e:?}"))?,
    };
    let outcome = outcomes.first().context("no outcome")?;
    ensure!(outcome.is_error && outcome.content.contains("offset"), "{}", outcome.content);
    Ok(())
}

// ---------------------------------------------------------------------------
// Payments
// ---------------------------------------------------------------------------

/// Attack (or bad luck): the operator withdraws the 500 ⭐ pack between
/// Ada's pre-checkout and her payment. Nothing is credited from the
/// payload; the payment is recorded for a refund and Ada is told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_for_a_pack_withdrawn_after_the_pre_checkout_is_recorded_for_a_refund() -> Result<()> {
    let fleet = spawn_fleet(|s| s.stars_packs = vec!["100:1.00".to_owned()]).await?;
    let payment = json!({"update_id": 900_014_401, "message": {"message_id": 41, "date": 1_764_461_300,
        "chat": {"id": ADA, "first_name": "Ada", "type": "private"},
        "from": {"id": ADA, "is_bot": false, "first_name": "Ada"},
        "successful_payment": {"currency": "XTR", "total_amount": 500,
            "invoice_payload": format!("stars:v2:{ADA}:500"), "telegram_payment_charge_id": "stxWITHDRAWN"}}});
    fleet.post(&payment).await?;
    fleet.wait_for_message(ADA, "could not be credited automatically").await?;
    let reason: String =
        sqlx::query_scalar("SELECT reason FROM payment_anomalies WHERE telegram_payment_charge_id = $1")
            .bind("stxWITHDRAWN")
            .fetch_one(&fleet.db.pool)
            .await?;
    ensure!(reason == "unknown_pack", "{reason}");
    ensure!(fleet.db.count("SELECT count(*) FROM billing_outbox").await? == 0, "something was credited");
    fleet.cleanup().await
}

/// Attack: payload spellings a forged or stale invoice could carry. Only a
/// pack of the table, paid in full in `XTR` by the payload's user, credits;
/// the credit is always the table's.
#[test]
fn payload_spellings_never_credit_more_than_the_tables_pack() {
    use worker::payments::{check, parse_packs, Refusal};
    let packs = parse_packs(&["100:1.00".into(), "500:5.50".into()]).unwrap_or_default();
    let ada = ADA.to_string();
    /// Payload, payer, currency, total paid; the pack's Stars credited or the refusal.
    type Case = (String, i64, &'static str, i64, Result<i64, Refusal>);
    let cases: Vec<Case> = vec![
        (format!("stars:v2:{ada}:+100"), ADA, "XTR", 100, Ok(100)),
        (format!("stars:v2:{ada}:0100"), ADA, "XTR", 100, Ok(100)),
        (format!("stars:v2:{ada}:100:"), ADA, "XTR", 100, Err(Refusal::Malformed)),
        (format!("stars:v2:{ada}:-100"), ADA, "XTR", -100, Err(Refusal::UnknownPack)),
        (format!("stars:v2:{ada}:100"), ADA, "XTR", -100, Err(Refusal::WrongAmount)),
        (format!("stars:v2:{ada}:100"), ADA, "xtr", 100, Err(Refusal::WrongCurrency)),
        (format!("stars:v2:{ada}:99999999999999999999"), ADA, "XTR", 100, Err(Refusal::Malformed)),
        (format!("stars:v2:{ada}0:100"), ADA, "XTR", 100, Err(Refusal::OtherPayer)),
        (format!("stars:v2: {ada}:100"), ADA, "XTR", 100, Err(Refusal::Malformed)),
        (format!("stars:v1:{ada}:500:5.50000000000000000000000000001"), ADA, "XTR", 500, Ok(500)),
        (format!("stars:v1:{ada}:500:NaN"), ADA, "XTR", 500, Err(Refusal::Malformed)),
        (format!("stars:v1:{ada}:500:-5.50"), ADA, "XTR", 500, Err(Refusal::PriceMismatch)),
        ("stars:v2:9223372036854775808:100".to_owned(), ADA, "XTR", 100, Err(Refusal::Malformed)),
        (String::new(), ADA, "XTR", 100, Err(Refusal::Malformed)),
    ];
    for (payload, payer, currency, total, expected) in cases {
        let got = check(&payload, payer, currency, total, &packs);
        assert_eq!(got.map(|p| p.stars), expected, "{payload:?} paid {total} {currency}");
        if let Ok(pack) = got {
            assert!(packs.contains(&pack), "credit outside the table: {pack:?}");
        }
    }
}

// ---------------------------------------------------------------------------
// Operator
// ---------------------------------------------------------------------------

/// The worker's settings from `extra` flags, secrets set, validated.
fn validated(extra: &[&str]) -> Result<(), String> {
    let prices = fleet_tests::harness::fixture("prices.toml");
    let mut args: Vec<String> =
        ["worker", "--prices-file", prices.to_str().unwrap_or_default()].map(str::to_owned).to_vec();
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let mut settings = worker::Settings::try_parse_from(args).map_err(|e| e.to_string())?;
    settings.bot_token = shared::secret::Secret::new(fleet_tests::harness::BOT_TOKEN);
    settings.anthropic_api_key = shared::secret::Secret::new("sk-ant-test-key");
    settings.validate()
}

/// Misconfiguration: absurd values that clap accepts. Each is used in
/// arithmetic that overflows (`2 + MAX_CONTINUATIONS` in the hold's
/// lifetime and `1 + MAX_CONTINUATIONS` in its amount, both `u32`;
/// `STREAM_DEADLINE_S × (2 + …)`; `DOCUMENT_EXTRACT_CPU_S + 1` in the
/// child's `setrlimit`): a panic in a debug build, a wrapped value in
/// release (a hold of almost nothing that expires at once; a sandbox that
/// cannot start, so every PDF is refused as "built to attack readers").
/// Correct: start-up refuses each, naming the setting.
#[test]
fn absurd_settings_are_refused_at_start_up_naming_the_setting() {
    let u32_max = u32::MAX.to_string();
    let u64_max = u64::MAX.to_string();
    let absurd: [(&str, &str); 4] = [
        ("--max-continuations", &u32_max),
        ("--stream-deadline-s", &u64_max),
        ("--document-extract-cpu-s", &u64_max),
        ("--max-tool-rounds", &u32_max),
    ];
    let accepted: Vec<String> = absurd
        .iter()
        .filter(|(flag, value)| validated(&[flag, value]).is_ok())
        .map(|(f, v)| format!("{f} {v}"))
        .collect();
    assert!(accepted.is_empty(), "accepted at start-up: {accepted:?}");
}

/// Misconfiguration, its consequence: with `DOCUMENT_EXTRACT_CPU_S` at its
/// largest value a plain, valid PDF is refused and the user is told it may
/// be "built to attack readers". Correct: the PDF is read (the limit
/// saturates), or the worker refuses to start; never a false accusation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_cpu_limit_does_not_turn_every_pdf_into_an_attack() -> Result<()> {
    let sandbox = worker::documents::Sandbox {
        program: fleet_tests::worker_binary(),
        limits: ExtractLimits { cpu_s: u64::MAX, ..ExtractLimits::default() },
        wall_clock: std::time::Duration::from_secs(20),
    };
    let plain = page_pdf("", &[padded_content("plain text", 1)]);
    let read = sandbox.extract(plain).await;
    ensure!(matches!(&read, Ok((text, 1)) if text.contains("plain text")), "a plain PDF: {read:?}");
    Ok(())
}

/// Misconfiguration: `DOCUMENT_EXTRACTOR` pointing nowhere. A text document
/// is still read (it never reaches the sandbox); a PDF is refused with a
/// notice, not lost silently and not retried for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extractor_that_does_not_exist_refuses_pdfs_with_a_notice_and_text_still_works() -> Result<()> {
    let fleet = spawn_fleet(|s| s.document_extractor = Some("/nonexistent/worker".into())).await?;
    fleet.grant(ADA, "5.00").await?;
    fleet.anthropic.set_default(Some(ScriptedResponse::from_sse(sse::text_turn("Read the text file."))));
    fleet.telegram.add_file("BQADnopdf", page_pdf("", &[padded_content("unread", 1)]));
    fleet.telegram.add_file("BQADtext", b"plain words".to_vec());
    let pdf_doc = json!({"file_id": "BQADnopdf", "file_unique_id": "u-nopdf", "file_name": "a.pdf",
        "mime_type": "application/pdf"});
    let text_doc =
        json!({"file_id": "BQADtext", "file_unique_id": "u-text", "file_name": "a.txt", "mime_type": "text/plain"});
    fleet.post(&document_message(900_014_501, pdf_doc, None)).await?;
    let notice = fleet.wait_for_message(ADA, "a.pdf").await?;
    ensure!(notice.starts_with("I could not read this PDF (a.pdf): "), "{notice}");
    fleet.post(&document_message(900_014_502, text_doc, None)).await?;
    fleet.wait_for_message(ADA, "Read the text file").await?;
    ensure!(fleet.db.count("SELECT count(*) FROM documents").await? == 1, "the text file was not kept");
    fleet.cleanup().await
}

/// Attack: a channel post mentioning the bot, forwarded automatically into
/// the channel's linked group, arrives "from" Telegram's service account
/// (777000, `is_bot: false`). No person asked: it is ignored, nobody is
/// charged, and the next real mention is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_automatic_forward_from_a_linked_channel_is_not_a_request() -> Result<()> {
    let fleet = spawn_fleet(|_| {}).await?;
    fleet.grant(BOB, "5.00").await?;
    fleet.grant(777_000, "5.00").await?;
    fleet.anthropic.push([ScriptedResponse::from_sse(sse::text_turn("Answered Bob."))]);
    fleet.anthropic.set_default(Some(ScriptedResponse::from_sse(sse::text_turn("WRONGLY ANSWERED"))));
    let mut forward = group_message(900_014_701, GROUP, 777_000, "Telegram", &format!("@{BOT_USERNAME} news!"));
    forward["message"]["is_automatic_forward"] = json!(true);
    fleet.post(&forward).await?;
    fleet.post(&group_message(900_014_702, GROUP, BOB, "Bob", &format!("@{BOT_USERNAME} hello"))).await?;
    fleet.wait_for_message(GROUP, "Answered Bob").await?;
    let calls = fleet.anthropic.call_count();
    fleet.cleanup().await?;
    ensure!(calls == 1, "{calls} Claude calls: the automatic forward was taken as a request");
    Ok(())
}
