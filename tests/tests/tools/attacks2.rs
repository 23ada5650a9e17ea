//! A second attack pass (issue 13, verification), on surfaces the first
//! (`attacks`) did not cover: the operator's side (secret files, URLs as
//! flags), the ingress's public port (a wrong secret with a stalled body, a
//! client that never finishes its headers, huge headers), callback buttons,
//! a thread id outside a forum topic, `/usage` and `/balance` in a group,
//! and the sandbox child invoked directly. The billing database's
//! functions are attacked in `billing::roles_attacks`.
//!
//! Each test is one attack. A test that fails shows a bug that is still
//! there: its doc comment says what the correct behaviour is. A test that
//! passes is a regression test for an attack that is handled.

use anyhow::{ensure, Context as _, Result};
use fleet_tests::fake_anthropic::ScriptedResponse;
use fleet_tests::fake_telegram::BOT_USER_ID;
use fleet_tests::harness::tools::{message, spawn_fleet, sse};
use fleet_tests::harness::{spawn_ingress, stop, wait_until, Broker, BOT_USERNAME, WAIT, WEBHOOK_SECRET};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

// ---------------------------------------------------------------------------
// Operator: secret files and URL flags
// ---------------------------------------------------------------------------

fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + Send + 'static {
    let map: HashMap<String, String> = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    move |k: &str| map.get(k).cloned()
}

fn os_args(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// A folder of the test's own, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("fleet-attacks2-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }

    fn file(&self, name: &str, bytes: &[u8]) -> Result<String> {
        let path = self.0.join(name);
        std::fs::write(&path, bytes)?;
        Ok(path.to_string_lossy().into_owned())
    }

    fn path(&self, name: &str) -> String {
        self.0.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The worker's start-up verdict with `TELEGRAM_BOT_TOKEN_FILE` = `path`
/// (and a good API key): the settings' error, else `validate`'s, else `None`.
fn worker_with_token_file(path: &str) -> Option<String> {
    let env = env_of(&[("TELEGRAM_BOT_TOKEN_FILE", path), ("ANTHROPIC_API_KEY", "sk-ant-test-key")]);
    match worker::Settings::load_from(os_args(&["worker"]), &env) {
        Err(e) => Some(e.to_string()),
        Ok(settings) => settings.validate().err(),
    }
}

/// Careless operator: secret files that are empty, only a newline, a
/// directory, a dangling symlink. Handled: each refused at start-up naming
/// `TELEGRAM_BOT_TOKEN` (and a symlink to a good file, as Kubernetes
/// mounts secrets, is followed and accepted).
#[test]
fn empty_unreadable_and_dangling_secret_files_are_refused_naming_the_variable() -> Result<()> {
    let dir = Dir::new()?;
    let empty = dir.file("empty", b"")?;
    let newline = dir.file("newline", b"\n")?;
    let crlf = dir.file("crlf", b" \r\n\t\n")?;
    let folder = dir.path("");
    let dangling = dir.path("dangling");
    std::os::unix::fs::symlink(dir.path("nowhere"), &dangling)?;
    let good = dir.file("good", b"7000000001:FROM-A-LINK\n")?;
    let link = dir.path("link");
    std::os::unix::fs::symlink(&good, &link)?;

    let mut wrong = Vec::new();
    for (what, path) in
        [("empty", &empty), ("newline", &newline), ("blanks", &crlf), ("directory", &folder), ("dangling", &dangling)]
    {
        match worker_with_token_file(path) {
            Some(e) if e.contains("TELEGRAM_BOT_TOKEN") => {}
            other => wrong.push(format!("{what}: {other:?}")),
        }
    }
    if let Some(e) = worker_with_token_file(&link) {
        wrong.push(format!("symlink to a good file refused: {e}"));
    }
    ensure!(wrong.is_empty(), "secret files not handled:\n{}", wrong.join("\n"));
    Ok(())
}

/// Careless operator: `TELEGRAM_BOT_TOKEN_FILE` names a FIFO (or a device,
/// a socket, `/proc/…/fd/0` of a terminal) that nobody writes. `read_to_string`
/// blocks in `open` for ever: the worker neither starts nor says why.
/// Correct: only a regular file is read (or the read has a deadline), and
/// anything else is refused at once naming `TELEGRAM_BOT_TOKEN_FILE`.
#[test]
fn a_secret_file_that_is_a_fifo_nobody_writes_is_refused_not_waited_on() -> Result<()> {
    let dir = Dir::new()?;
    let fifo = dir.path("fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().context("running mkfifo")?;
    ensure!(made.success(), "mkfifo failed");
    let (tx, rx) = std::sync::mpsc::channel();
    let path = fifo.clone();
    std::thread::spawn(move || {
        let _ = tx.send(worker_with_token_file(&path));
    });
    let verdict = rx.recv_timeout(Duration::from_secs(5));
    if verdict.is_err() {
        // Unblock the reader (a writer that closes at once: end of file).
        let _ = std::fs::OpenOptions::new().write(true).open(&fifo);
        let _ = rx.recv_timeout(Duration::from_secs(5));
    }
    match verdict {
        Ok(Some(e)) if e.contains("TELEGRAM_BOT_TOKEN") => Ok(()),
        Ok(other) => anyhow::bail!("a FIFO as the token file: {other:?}"),
        Err(_) => {
            anyhow::bail!("the worker's settings were still reading a FIFO nobody writes after 5 s (start-up hangs)")
        }
    }
}

/// Careless operator: `TELEGRAM_BOT_TOKEN_FILE` names a 16 MiB file (a log,
/// a core dump; `/dev/zero` is the same read without an end and takes all
/// memory). It is read whole and accepted as a 16-million-character token,
/// sent in the path of every Bot API call. Correct: a secret file is read
/// up to a small bound (e.g. 64 KiB) and a larger one is refused naming
/// the variable.
#[test]
fn a_huge_secret_file_is_refused_not_read_whole_and_used_as_a_token() -> Result<()> {
    let dir = Dir::new()?;
    let huge = dir.file("huge", &vec![b'a'; 16 << 20])?;
    let verdict = worker_with_token_file(&huge);
    ensure!(
        verdict.as_ref().is_some_and(|e| e.contains("TELEGRAM_BOT_TOKEN")),
        "a 16 MiB token file was accepted as the bot token: {verdict:?}"
    );
    Ok(())
}

/// Careless operator: the database password given as a flag, in the URL's
/// query (`?password=…`, which sqlx and libpq accept) instead of its
/// userinfo. The flag check only looks at `user:password@`, so the password
/// is on the command line, visible in `ps`. Correct: refused like
/// `postgres://u:pw@h/db`, naming `DATABASE_URL`.
#[test]
fn a_database_password_in_the_urls_query_is_refused_as_a_flag() {
    let none = env_of(&[]);
    let mut accepted = Vec::new();
    for url in [
        "postgres://fleet_worker@127.0.0.1:5432/fleet?password=hunter2hunter2",
        "postgres://fleet_worker@127.0.0.1:5432/fleet?sslmode=disable&password=hunter2hunter2",
    ] {
        let r = worker::Settings::load_from(os_args(&["worker", "--database-url", url]), &none);
        if r.is_ok() {
            accepted.push(url);
        }
    }
    assert!(accepted.is_empty(), "database URLs with a password accepted as a flag (visible in ps): {accepted:?}");
}

// ---------------------------------------------------------------------------
// Ingress: the public port
// ---------------------------------------------------------------------------

/// Sends `head` on a fresh connection to the ingress, then waits up to
/// `wait` for the response's status line; `None` when nothing came.
async fn status_after(port: u16, head: &str, wait: Duration) -> Result<(Option<String>, Duration)> {
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    conn.write_all(head.as_bytes()).await?;
    let started = Instant::now();
    let mut buf = vec![0u8; 512];
    let read = tokio::time::timeout(wait, conn.read(&mut buf)).await;
    let line = match read {
        Ok(Ok(n)) if n > 0 => String::from_utf8_lossy(&buf[..n]).lines().next().map(str::to_owned),
        Ok(Ok(_)) => Some("connection closed".into()),
        Ok(Err(e)) => Some(format!("error: {e}")),
        Err(_) => None,
    };
    Ok((line, started.elapsed()))
}

/// Attack: a client without the webhook secret sends headers announcing a
/// 60 KB body and then nothing. The body is read (up to 10 s, up to
/// `INGRESS_MAX_BODY_BYTES` buffered) before the secret is checked: every
/// unauthenticated connection holds a task and a buffer for 10 s and gets
/// 408, not 401. Correct: the secret header is checked first, and a request
/// without it is answered 401 at once, its body never read.
#[tokio::test]
async fn a_request_without_the_secret_is_refused_before_its_body_is_read() -> Result<()> {
    let broker = Broker::new().await?;
    let (port, token, handle) = spawn_ingress(broker.prefix(), &broker.url).await?;
    let head = "POST /telegram/webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                X-Telegram-Bot-Api-Secret-Token: not-the-secret\r\nContent-Length: 60000\r\n\r\n{\"update_id\":";
    let (line, took) = status_after(port, head, Duration::from_secs(15)).await?;
    stop("ingress", (token, handle)).await?;
    broker.cleanup().await?;
    ensure!(
        line.as_deref().is_some_and(|l| l.contains("401")) && took < Duration::from_secs(2),
        "a request with a wrong secret and a stalled body got {line:?} after {took:?} (expected 401 at once)"
    );
    Ok(())
}

/// Attack (slowloris): a client opens a connection to the public port and
/// sends the request line and one header, then nothing, holding the
/// connection (and a task) for ever; a few thousand such clients exhaust
/// file descriptors. Correct: the server closes a connection whose headers
/// have not arrived within a bound (hyper's `header_read_timeout`, 30 s by
/// default once a timer is set), here within 40 s.
#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() -> Result<()> {
    let broker = Broker::new().await?;
    let (port, token, handle) = spawn_ingress(broker.prefix(), &broker.url).await?;
    let head = format!("POST /telegram/webhook HTTP/1.1\r\nX-Telegram-Bot-Api-Secret-Token: {WEBHOOK_SECRET}\r\n");
    let (line, took) = status_after(port, &head, Duration::from_secs(40)).await?;
    stop("ingress", (token, handle)).await?;
    broker.cleanup().await?;
    ensure!(line.is_some(), "a connection with unfinished headers was still open after {took:?}");
    Ok(())
}

/// Attack: a well-formed request with a single 60 KB header (or many
/// headers). Handled: refused by the HTTP layer (431 or a closed
/// connection), nothing queued, the ingress keeps serving.
#[tokio::test]
async fn huge_headers_are_refused_and_the_ingress_keeps_serving() -> Result<()> {
    let broker = Broker::new().await?;
    let (port, token, handle) = spawn_ingress(broker.prefix(), &broker.url).await?;
    let big = "a".repeat(60_000);
    let head = format!(
        "POST /telegram/webhook HTTP/1.1\r\nHost: x\r\nX-Junk: {big}\r\n\
         X-Telegram-Bot-Api-Secret-Token: {WEBHOOK_SECRET}\r\nContent-Length: 2\r\n\r\n{{}}"
    );
    let (line, _) = status_after(port, &head, Duration::from_secs(10)).await?;
    let many: String = (0..500).map(|i| format!("X-H{i}: v\r\n")).collect();
    let head2 = format!(
        "POST /telegram/webhook HTTP/1.1\r\nHost: x\r\n{many}X-Telegram-Bot-Api-Secret-Token: {WEBHOOK_SECRET}\r\n\
         Content-Length: 2\r\n\r\n{{}}"
    );
    let (line2, _) = status_after(port, &head2, Duration::from_secs(10)).await?;
    let (health, _) = status_after(port, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", Duration::from_secs(5)).await?;
    let queued = broker.pending_updates().await?;
    stop("ingress", (token, handle)).await?;
    broker.cleanup().await?;
    let refused = |l: &Option<String>| l.as_deref().is_some_and(|l| !l.contains(" 200") && !l.contains(" 5"));
    ensure!(
        refused(&line) && refused(&line2) && health.as_deref().is_some_and(|l| l.contains("200")) && queued == 0,
        "huge header: {line:?}; 500 headers: {line2:?}; then /healthz: {health:?}; queued {queued}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Hostile users: callback queries, forum topics, /usage in a group
// ---------------------------------------------------------------------------

/// Bob: a member of the group.
const BOB: i64 = 100_000_002;
/// The group of these attacks.
const GROUP: i64 = -100_800;

/// A message of `user` in the group with `text`.
fn group_message(update_id: i64, user: i64, name: &str, text: &str) -> Value {
    let mut update = message(update_id, text);
    update["message"]["from"] = json!({ "id": user, "is_bot": false, "first_name": name });
    update["message"]["chat"] = json!({ "id": GROUP, "title": "Team", "type": "group" });
    update
}

/// `user` presses a button with `data` under the bot's message 1 in the group.
fn callback(update_id: i64, user: i64, data: &str) -> Value {
    json!({ "update_id": update_id, "callback_query": {
        "id": format!("cb-{update_id}"),
        "from": { "id": user, "is_bot": false, "first_name": "Bob" },
        "chat_instance": "42",
        "data": data,
        "message": {
            "message_id": 1, "date": 1_764_460_700, "text": "Choose a pack of credit (paid in Telegram Stars):",
            "from": { "id": BOT_USER_ID, "is_bot": true, "first_name": "Fleet", "username": BOT_USERNAME },
            "chat": { "id": GROUP, "title": "Team", "type": "group" }
        }
    }})
}

/// Attack: Bob presses the `/buy` keyboard Ada asked for, and forges
/// callback data with absurd numbers (past `i64`, negative, zero, not a
/// pack, empty, trailing junk). Handled: every forged button is answered
/// "expired" and sends no invoice; Bob's press of a real pack sends an
/// invoice whose payload names Bob (the payer), not Ada, for the table's
/// Stars.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_buy_buttons_send_no_invoice_and_a_real_one_invoices_the_presser() -> Result<()> {
    let fleet = spawn_fleet(|_| {}).await?;
    let forged = ["buy:99999999999999999999999", "buy:-500", "buy:0", "buy:7", "buy:", "buy:500:1", "buy:5e2", "buy"];
    for (i, data) in forged.iter().enumerate() {
        fleet.post(&callback(900_020_001 + i as i64, BOB, data)).await?;
    }
    fleet.post(&callback(900_020_100, BOB, "buy:500")).await?;
    let invoiced = fleet.telegram.wait_for_call(|c| c.method == "sendInvoice", WAIT).await;
    let expired = || {
        fleet
            .telegram
            .calls()
            .into_iter()
            .filter(|c| c.method == "answerCallbackQuery" && c.params.to_string().contains("expired"))
            .count()
    };
    let answered = wait_until("the forged buttons answered", WAIT, || async { Ok(expired() >= forged.len()) }).await;
    let invoices: Vec<Value> =
        fleet.telegram.calls().into_iter().filter(|c| c.method == "sendInvoice").map(|c| c.params).collect();
    let n_expired = expired();
    fleet.cleanup().await?;
    ensure!(invoiced && answered.is_ok(), "invoice sent: {invoiced}; forged buttons answered expired: {n_expired}");
    ensure!(invoices.len() == 1, "one invoice expected, got {invoices:#?}");
    let payload = invoices[0]["payload"].as_str().unwrap_or_default();
    ensure!(
        payload == format!("stars:v2:{BOB}:500") && invoices[0]["currency"] == "XTR",
        "the invoice: {:#}",
        invoices[0]
    );
    Ok(())
}

/// Attack: a group message (not a forum) that carries a `message_thread_id`
/// without `is_topic_message` (a reply thread, or a forged field). Handled:
/// the answer is sent to the chat without `message_thread_id` (Telegram
/// would refuse a thread that is not a topic, and the answer would be lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thread_id_on_a_message_that_is_not_in_a_topic_is_not_used_for_the_answer() -> Result<()> {
    let fleet = spawn_fleet(|_| {}).await?;
    fleet.grant(BOB, "5.00").await?;
    fleet.anthropic.set_default(Some(ScriptedResponse::from_sse(sse::text_turn("Answered in the chat."))));
    let mut update = group_message(900_021_001, BOB, "Bob", &format!("@{BOT_USERNAME} hello"));
    update["message"]["message_thread_id"] = json!(77);
    fleet.post(&update).await?;
    fleet.wait_for_message(GROUP, "Answered in the chat").await?;
    let threaded: Vec<Value> = fleet
        .telegram
        .calls()
        .into_iter()
        .filter(|c| c.params.get("message_thread_id").is_some_and(|t| !t.is_null()))
        .map(|c| json!({ "method": c.method, "thread": c.params["message_thread_id"] }))
        .collect();
    fleet.cleanup().await?;
    ensure!(threaded.is_empty(), "Bot API calls with a thread id for a non-topic message: {threaded:?}");
    Ok(())
}

/// Attack (privacy): in a group, Bob sends `/usage` (or `/balance`). The
/// answer — his balance, every charge of his private conversations, and the
/// Telegram payment charge ids of his top-ups (top-up memos
/// "… Stars, charge <id>") — is posted to the whole group. Correct: in a
/// group these answers go to the member privately (or the bot says to ask
/// in a private chat); nothing of one member's account is posted to the
/// group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_and_balance_asked_in_a_group_are_not_posted_to_the_group() -> Result<()> {
    let fleet = spawn_fleet(|_| {}).await?;
    fleet.grant(BOB, "5.00").await?;
    fleet.anthropic.set_default(None);
    for (id, command) in [(900_022_001, "/usage"), (900_022_002, "/balance")] {
        let text = format!("{command}@{BOT_USERNAME}");
        let mut update = group_message(id, BOB, "Bob", &text);
        update["message"]["entities"] = json!([{ "type": "bot_command", "offset": 0, "length": text.len() }]);
        fleet.post(&update).await?;
    }
    // Either answer, wherever it goes: the second command is answered after the first.
    let answered = fleet
        .telegram
        .wait_for_call(
            |c| c.method == "sendMessage" && c.params["text"].as_str().is_some_and(|t| t.contains("balance")),
            WAIT,
        )
        .await;
    let in_group: Vec<String> = fleet
        .telegram
        .messages()
        .into_iter()
        .filter(|m| m.chat_id == GROUP)
        .map(|m| m.text)
        .filter(|t| t.contains('$') || t.contains("charges"))
        .collect();
    fleet.cleanup().await?;
    ensure!(answered, "neither /usage nor /balance was answered anywhere");
    ensure!(in_group.is_empty(), "a member's account posted to the group: {in_group:#?}");
    Ok(())
}

// ---------------------------------------------------------------------------
// The sandbox child invoked directly
// ---------------------------------------------------------------------------

/// Odd invocations of `worker extract-document` (it is internal, but the
/// binary is on every worker host): unknown flags, negative or overflowing
/// numbers, limits of zero, no input. Handled: clap's usage error (exit 2)
/// for bad arguments, a one-line JSON refusal for zero limits and empty
/// input, never a panic or a hang.
#[test]
fn the_extractor_invoked_directly_with_odd_arguments_refuses_cleanly() -> Result<()> {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let worker = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/debug/worker"));
    ensure!(worker.exists(), "build the binaries first (cargo build --bins)");
    let run = |args: &[&str], input: &[u8]| -> Result<(Option<i32>, String, String)> {
        let mut child = Command::new(&worker)
            .arg("extract-document")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(input);
        }
        let out = child.wait_with_output()?;
        Ok((
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    let mut wrong = Vec::new();
    for args in [
        &["--bogus"][..],
        &["--cpu-s=-1"],
        &["--max-chars=18446744073709551616"],
        &["--memory-mib", "lots"],
        &["--max-pages"],
    ] {
        let (code, _, err) = run(args, b"%PDF-1.4")?;
        if code != Some(2) || err.contains("panicked") {
            wrong.push(format!("{args:?}: exit {code:?}, {err}"));
        }
    }
    for args in [&[][..], &["--max-input-bytes=0"], &["--max-pages=0"], &["--max-decompressed-bytes=0"]] {
        let (code, out, err) = run(args, b"")?;
        let report: Result<worker::documents::ChildReport, _> = serde_json::from_str(out.trim());
        if code != Some(0) || !matches!(report, Ok(worker::documents::ChildReport::Refused { .. })) {
            wrong.push(format!("{args:?} on empty input: exit {code:?}, {out:?}, {err}"));
        }
    }
    ensure!(wrong.is_empty(), "the extractor mishandled:\n{}", wrong.join("\n"));
    Ok(())
}
