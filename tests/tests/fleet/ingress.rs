//! The webhook: what it answers Telegram, and that an update reaches the
//! `updates` queue verbatim only when it answers 200.

use anyhow::{Context as _, Result};
use fleet_tests::harness::{
    fixture_bytes, http_client, init_logs, post_webhook, spawn_ingress, spawn_ingress_with_admin, stop, within, Broker,
    INGRESS_MAX_BODY, WEBHOOK_SECRET,
};
use lapin::types::{FieldTable, ShortString};
use reqwest::StatusCode;
use shared::amqp::Topology;

/// A running ingress on a fresh prefix (its topology declared by `build`).
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

    async fn post(&self, secret: Option<&str>, body: &[u8]) -> Result<StatusCode> {
        post_webhook(&self.http, self.port, secret, body.to_vec()).await
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

    async fn cleanup(self) -> Result<()> {
        stop("ingress", self.ingress).await?;
        self.broker.cleanup().await
    }
}

#[tokio::test]
async fn metrics_are_served_on_the_admin_address_and_not_on_the_webhook_port() -> Result<()> {
    init_logs();
    let broker = Broker::new().await?;
    let (ports, token, handle) = spawn_ingress_with_admin(broker.prefix(), &broker.url).await?;
    let http = http_client()?;
    // Traffic first, so the counters have something to say.
    let body = fixture_bytes("telegram/ada_capital.json")?;
    assert_eq!(post_webhook(&http, ports.public, Some(WEBHOOK_SECRET), body).await?, StatusCode::OK);
    let public = http.get(format!("http://127.0.0.1:{}/metrics", ports.public)).send().await?;
    assert_eq!(public.status(), StatusCode::NOT_FOUND, "no /metrics on the public port");
    let admin = http.get(format!("http://127.0.0.1:{}/metrics", ports.admin)).send().await?;
    assert_eq!(admin.status(), StatusCode::OK);
    let text = admin.text().await?;
    assert!(text.contains("fleet_updates_published_total"), "{text}");
    for path in ["/healthz", "/readyz"] {
        let r = http.get(format!("http://127.0.0.1:{}{path}", ports.admin)).send().await?;
        assert_eq!(r.status(), StatusCode::OK, "{path} on the admin port");
    }
    stop("ingress", (token, handle)).await?;
    broker.cleanup().await
}

#[tokio::test]
async fn a_wrong_secret_is_rejected_with_401_and_nothing_is_queued() -> Result<()> {
    let h = Harness::start().await?;
    let body = fixture_bytes("telegram/ada_capital.json")?;

    assert_eq!(h.post(Some("not-the-secret"), &body).await?, StatusCode::UNAUTHORIZED);
    // Same length as the real secret: only the bytes differ.
    let same_length = "x".repeat(WEBHOOK_SECRET.len());
    assert_eq!(h.post(Some(&same_length), &body).await?, StatusCode::UNAUTHORIZED);
    assert_eq!(h.queued().await?, 0);
    h.cleanup().await
}

#[tokio::test]
async fn a_missing_secret_is_rejected_with_401_and_nothing_is_queued() -> Result<()> {
    let h = Harness::start().await?;
    let body = fixture_bytes("telegram/ada_capital.json")?;

    assert_eq!(h.post(None, &body).await?, StatusCode::UNAUTHORIZED);
    assert_eq!(h.post(Some(""), &body).await?, StatusCode::UNAUTHORIZED);
    assert_eq!(h.queued().await?, 0);
    h.cleanup().await
}

#[tokio::test]
async fn a_body_over_the_cap_is_rejected_with_413_and_nothing_is_queued() -> Result<()> {
    let h = Harness::start().await?;
    // A valid update padded past the cap with whitespace.
    let mut body = fixture_bytes("telegram/ada_capital.json")?;
    body.resize(INGRESS_MAX_BODY + 1, b' ');

    assert_eq!(h.post(Some(WEBHOOK_SECRET), &body).await?, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(h.queued().await?, 0);
    // The same update within the cap is accepted.
    body.truncate(INGRESS_MAX_BODY);
    assert_eq!(h.post(Some(WEBHOOK_SECRET), &body).await?, StatusCode::OK);
    assert_eq!(h.queued().await?, 1);
    h.cleanup().await
}

#[tokio::test]
async fn bodies_that_are_not_updates_are_rejected_with_400_and_nothing_is_queued() -> Result<()> {
    let h = Harness::start().await?;
    let bad: [&[u8]; 8] = [
        b"[1, 2, 3]",
        br#""an update""#,
        b"42",
        b"not json at all",
        br#"{"update_id": "5", "message": {"chat": {"id": 1}}}"#,
        br#"{"update_id": 5.5, "message": {"chat": {"id": 1}}}"#,
        br#"{"message": {"chat": {"id": 1}}}"#,
        b"",
    ];
    for body in bad {
        let status = h.post(Some(WEBHOOK_SECRET), body).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "body {:?}", String::from_utf8_lossy(body));
    }
    assert_eq!(h.queued().await?, 0);
    h.cleanup().await
}

#[tokio::test]
async fn a_valid_update_is_queued_once_verbatim_in_its_chats_shard() -> Result<()> {
    let h = Harness::start().await?;
    let body = fixture_bytes("telegram/ada_capital.json")?;
    let update: serde_json::Value = serde_json::from_slice(&body)?;
    let chat_id = update["message"]["chat"]["id"].as_i64().context("fixture has a chat id")?;
    let update_id = update["update_id"].as_i64().context("fixture has an update id")?;

    assert_eq!(h.post(Some(WEBHOOK_SECRET), &body).await?, StatusCode::OK);

    // 200 means confirmed: the message is in the queue already.
    assert_eq!(h.queued().await?, 1);
    let t = &h.broker.topology;
    let shard = t.shard_of(Some(chat_id));
    let got = h.broker.take_only(&t.intake_queue(shard)).await?.context("a message in the chat's shard")?;
    assert_eq!(got.data, body, "the body is forwarded byte for byte");
    assert_eq!(got.routing_key.as_str(), format!("{shard}.{chat_id}"));
    assert_eq!(got.exchange.as_str(), h.broker.topology.updates_exchange());
    assert_eq!(got.properties.message_id().as_ref().map(ShortString::as_str), Some(update_id.to_string().as_str()));
    assert_eq!(h.queued().await?, 0, "exactly one message was queued");
    h.cleanup().await
}

#[tokio::test]
async fn an_update_of_an_unknown_kind_is_accepted_and_forwarded() -> Result<()> {
    let h = Harness::start().await?;
    let body = fixture_bytes("telegram/future_update_kind.json")?;

    assert_eq!(h.post(Some(WEBHOOK_SECRET), &body).await?, StatusCode::OK);

    let got = h.broker.take_only(&h.broker.topology.intake_queue(0)).await?.context("a message in shard 0")?;
    assert_eq!(got.data, body);
    // No chat in it: routed to shard 0 with the `none` key.
    assert_eq!(got.routing_key.as_str(), "0.none");
    assert_eq!(h.queued().await?, 0);
    h.cleanup().await
}

#[tokio::test]
async fn an_unreachable_broker_makes_the_webhook_answer_503() -> Result<()> {
    init_logs();
    let broker = Broker::new().await?;
    // Nothing listens on port 1: the connection is refused.
    let (port, token, handle) = spawn_ingress(broker.prefix(), "amqp://guest:guest@127.0.0.1:1/%2f").await?;
    let http = http_client()?;
    let body = fixture_bytes("telegram/ada_capital.json")?;

    let status = within("a webhook post", post_webhook(&http, port, Some(WEBHOOK_SECRET), body.clone())).await??;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    // Telegram retries: the next attempt is refused the same way, not accepted and lost.
    let status = within("a webhook post", post_webhook(&http, port, Some(WEBHOOK_SECRET), body)).await??;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let ready = within("readyz", http.get(format!("http://127.0.0.1:{port}/readyz")).send()).await??;
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);

    stop("ingress", (token, handle)).await?;
    broker.cleanup().await
}

#[tokio::test]
async fn an_unroutable_publish_returned_by_the_broker_makes_the_webhook_answer_503() -> Result<()> {
    let h = Harness::start().await?;
    let t = &h.broker.topology;
    let body = fixture_bytes("telegram/ada_capital.json")?;
    let chat = serde_json::from_slice::<serde_json::Value>(&body)?["message"]["chat"]["id"].as_i64();
    let shard = t.shard_of(chat);
    // The ingress declared the topology at start; take away the chat's shard binding.
    within(
        "unbinding the chat's intake shard",
        h.broker.channel().queue_unbind(
            t.intake_queue(shard).into(),
            t.updates_exchange().into(),
            Topology::intake_binding(shard).into(),
            FieldTable::default(),
        ),
    )
    .await??;

    assert_eq!(h.post(Some(WEBHOOK_SECRET), &body).await?, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(h.queued().await?, 0);

    // Telegram's retry goes through a fresh connection, which declares the
    // topology again (binding included): the update is accepted then.
    assert_eq!(h.post(Some(WEBHOOK_SECRET), &body).await?, StatusCode::OK);
    assert_eq!(h.queued().await?, 1);
    h.cleanup().await
}
