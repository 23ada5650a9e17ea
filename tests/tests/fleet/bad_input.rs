//! Bad input at the webhook: nesting bombs, invalid UTF-8, extreme update
//! ids, and clients that write slowly or stop mid-body. Each gets a clear
//! answer (400/413) or is accepted and forwarded verbatim; nothing crashes,
//! nothing is queued for a refused body, and one stuck client never holds
//! up the others.

use anyhow::{Context as _, Result};
use fleet_tests::harness::{
    http_client, init_logs, post_webhook, spawn_ingress, stop, within, Broker, INGRESS_MAX_BODY, WEBHOOK_SECRET,
};
use lapin::types::ShortString;
use reqwest::StatusCode;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// A running ingress on a fresh prefix.
struct Harness {
    broker: Broker,
    port: u16,
    http: reqwest::Client,
    ingress: fleet_tests::harness::Running,
}

impl Harness {
    async fn start() -> Result<Self> {
        init_logs();
        let broker = Broker::new().await?;
        let (port, token, handle) = spawn_ingress(broker.prefix(), &broker.url).await?;
        Ok(Self { broker, port, http: http_client()?, ingress: (token, handle) })
    }

    async fn post(&self, body: &[u8]) -> Result<StatusCode> {
        within("a webhook post", post_webhook(&self.http, self.port, Some(WEBHOOK_SECRET), body.to_vec())).await?
    }

    /// Messages waiting in every update queue (intake shards, work queue).
    async fn queued(&self) -> Result<u32> {
        let t = &self.broker.topology;
        let mut total = self.broker.message_count(&t.updates_queue()).await?;
        for shard in 0..t.intake_shards {
            total += self.broker.message_count(&t.intake_queue(shard)).await?;
        }
        Ok(total)
    }

    /// The one message in the shard of `chat`, checked to be `body` verbatim
    /// with `update_id` as its message id.
    async fn assert_forwarded(&self, chat: Option<i64>, body: &[u8], update_id: &str) -> Result<()> {
        let t = &self.broker.topology;
        let got = self.broker.take_only(&t.intake_queue(t.shard_of(chat))).await?.context("a forwarded message")?;
        assert_eq!(got.data, body, "forwarded byte for byte");
        assert_eq!(got.properties.message_id().as_ref().map(ShortString::as_str), Some(update_id));
        Ok(())
    }

    /// The ingress must still be alive and answering.
    async fn assert_healthy(&self) -> Result<()> {
        let r = within("healthz", self.http.get(format!("http://127.0.0.1:{}/healthz", self.port)).send()).await??;
        assert_eq!(r.status(), StatusCode::OK);
        assert!(!self.ingress.1.is_finished(), "the ingress task ended");
        Ok(())
    }

    async fn cleanup(self) -> Result<()> {
        stop("ingress", self.ingress).await?;
        self.broker.cleanup().await
    }
}

/// `{"update_id":7,"message":{"chat":{"id":1},"x":[[[…]]]}}` nested `depth` deep.
fn nested_update(depth: usize) -> Vec<u8> {
    let mut body = br#"{"update_id":7,"message":{"chat":{"id":1},"x":"#.to_vec();
    body.extend(std::iter::repeat_n(b'[', depth));
    body.extend(std::iter::repeat_n(b']', depth));
    body.extend(b"}}");
    body
}

/// The raw HTTP/1.1 request of a webhook post of `body`, `Content-Length` given.
fn raw_request(content_length: usize, body: &[u8]) -> Vec<u8> {
    let mut req = format!(
        "POST /telegram/webhook HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         X-Telegram-Bot-Api-Secret-Token: {WEBHOOK_SECRET}\r\nContent-Length: {content_length}\r\n\
         Connection: close\r\n\r\n"
    )
    .into_bytes();
    req.extend_from_slice(body);
    req
}

#[tokio::test]
async fn deeply_nested_json_is_refused_without_crashing_the_ingress() -> Result<()> {
    let h = Harness::start().await?;
    // Within the cap: the parser's recursion limit refuses it with 400.
    let within_cap = nested_update(30_000);
    assert!(within_cap.len() <= INGRESS_MAX_BODY);
    assert_eq!(h.post(&within_cap).await?, StatusCode::BAD_REQUEST);
    // 100,000 levels is over the test cap: 413 before any parsing.
    let over_cap = nested_update(100_000);
    assert_eq!(h.post(&over_cap).await?, StatusCode::PAYLOAD_TOO_LARGE);
    // Objects instead of arrays, never closed.
    let open_objects: Vec<u8> = br#"{"update_id":8,"m":"#.iter().copied().chain(b"{\"a\":".repeat(10_000)).collect();
    assert!(open_objects.len() <= INGRESS_MAX_BODY);
    assert_eq!(h.post(&open_objects).await?, StatusCode::BAD_REQUEST);
    // Nesting the parser accepts (well under its limit) is forwarded.
    let shallow = nested_update(100);
    assert_eq!(h.post(&shallow).await?, StatusCode::OK);
    h.assert_forwarded(Some(1), &shallow, "7").await?;
    assert_eq!(h.queued().await?, 0, "only the shallow update was queued");
    h.assert_healthy().await?;
    h.cleanup().await
}

#[tokio::test]
async fn invalid_utf8_is_refused_with_400_and_nothing_is_queued() -> Result<()> {
    let h = Harness::start().await?;
    let bodies: [&[u8]; 3] = [
        b"{\"update_id\":9,\"message\":{\"chat\":{\"id\":1},\"text\":\"\xff\xfe\"}}",
        // A lone UTF-16 surrogate encoded as UTF-8 (CESU), and a truncated sequence.
        b"{\"update_id\":9,\"message\":{\"chat\":{\"id\":1},\"text\":\"\xed\xa0\x80\"}}",
        b"{\"update_id\":9,\"message\":{\"chat\":{\"id\":1},\"text\":\"\xe2\x82\"}}",
    ];
    for body in bodies {
        assert_eq!(h.post(body).await?, StatusCode::BAD_REQUEST, "{}", String::from_utf8_lossy(body));
    }
    assert_eq!(h.queued().await?, 0);
    h.assert_healthy().await?;
    h.cleanup().await
}

/// Decision documented here: any update_id that fits an i64 is accepted and
/// forwarded verbatim (negative ones too — Telegram never sends them, but the
/// ingress only routes; the worker's dedup keys on the same i64). Ids beyond
/// the i64 range are refused with 400, never wrapped or truncated.
#[tokio::test]
async fn extreme_update_ids_are_forwarded_verbatim_if_they_fit_an_i64_and_refused_otherwise() -> Result<()> {
    let h = Harness::start().await?;
    let max = br#"{"update_id":9223372036854775807,"message":{"chat":{"id":12}}}"#;
    assert_eq!(h.post(max).await?, StatusCode::OK);
    h.assert_forwarded(Some(12), max, "9223372036854775807").await?;

    let negative = br#"{"update_id":-5,"message":{"chat":{"id":12}}}"#;
    assert_eq!(h.post(negative).await?, StatusCode::OK);
    h.assert_forwarded(Some(12), negative, "-5").await?;

    for body in [
        &br#"{"update_id":9223372036854775808,"message":{"chat":{"id":12}}}"#[..],
        br#"{"update_id":-9223372036854775809,"message":{"chat":{"id":12}}}"#,
        br#"{"update_id":18446744073709551615,"message":{"chat":{"id":12}}}"#,
        br#"{"update_id":1e19,"message":{"chat":{"id":12}}}"#,
    ] {
        assert_eq!(h.post(body).await?, StatusCode::BAD_REQUEST, "{}", String::from_utf8_lossy(body));
    }
    assert_eq!(h.queued().await?, 0);
    h.cleanup().await
}

#[tokio::test]
async fn a_request_written_one_byte_every_20_ms_is_answered_and_forwarded() -> Result<()> {
    let h = Harness::start().await?;
    let body = br#"{"update_id":31,"message":{"chat":{"id":77}}}"#;
    let request = raw_request(body.len(), body);
    let mut conn = TcpStream::connect(("127.0.0.1", h.port)).await?;
    conn.set_nodelay(true)?;
    for byte in &request {
        conn.write_all(std::slice::from_ref(byte)).await?;
        // Deliberate pacing of the input, not synchronisation.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut response = Vec::new();
    within("the response to the slow request", conn.read_to_end(&mut response)).await??;
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    h.assert_forwarded(Some(77), body, "31").await?;
    assert_eq!(h.queued().await?, 0);
    h.cleanup().await
}

#[tokio::test]
async fn a_client_that_stops_mid_body_does_not_hold_up_other_requests() -> Result<()> {
    let h = Harness::start().await?;
    let stalled_body = br#"{"update_id":41,"message":{"chat":{"id":5}}}"#;
    // Promise the whole body, send half of it, then go silent (connection kept open).
    let mut stalled = TcpStream::connect(("127.0.0.1", h.port)).await?;
    stalled.write_all(&raw_request(stalled_body.len(), &stalled_body[..20])).await?;
    stalled.flush().await?;

    let good = br#"{"update_id":42,"message":{"chat":{"id":6}}}"#;
    for _ in 0..3 {
        assert_eq!(h.post(good).await?, StatusCode::OK);
    }
    h.assert_healthy().await?;
    assert_eq!(h.queued().await?, 3, "the good posts are queued; the half body is not");
    drop(stalled);
    h.cleanup().await
}

/// How long a body may take to arrive before the server should give up on it.
const BODY_READ_LIMIT: Duration = Duration::from_secs(15);

#[tokio::test]
async fn a_client_that_stops_mid_body_is_disconnected_by_a_read_timeout() -> Result<()> {
    let h = Harness::start().await?;
    let body = br#"{"update_id":51,"message":{"chat":{"id":5}}}"#;
    let mut stalled = TcpStream::connect(("127.0.0.1", h.port)).await?;
    stalled.write_all(&raw_request(body.len(), &body[..10])).await?;
    let mut buf = Vec::new();
    // The event waited for is the server closing (or answering 408 and closing).
    let closed = tokio::time::timeout(BODY_READ_LIMIT, stalled.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "the stalled connection was still open after {BODY_READ_LIMIT:?}");
    assert_eq!(h.queued().await?, 0);
    h.cleanup().await
}
