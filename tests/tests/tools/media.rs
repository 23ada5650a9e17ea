//! Media the bot does not read yet (issue 16 part 8, interim): a photo or a
//! voice message in a private chat gets a short reply, as a reply to it,
//! saying what the bot reads; Claude is not called, nothing is charged.
//! In a group such a message is not addressed to the bot and is ignored
//! (logged with its ids).

use fleet_tests::harness::{fixture_bytes, wait_until, TestApp, WAIT};
use serde_json::{json, Value};

const ADA: i64 = 100_000_001;

fn media_update(update_id: i64, message_id: i64, field: &str, body: Value) -> anyhow::Result<Vec<u8>> {
    let mut u: Value = serde_json::from_slice(&fixture_bytes("telegram/ada_capital.json")?)?;
    u["update_id"] = update_id.into();
    let msg = u["message"].as_object_mut().ok_or_else(|| anyhow::anyhow!("fixture without a message"))?;
    msg.remove("text");
    msg.remove("entities");
    msg.insert("message_id".into(), message_id.into());
    msg.insert(field.into(), body);
    msg.insert("caption".into(), "What is in this picture?".into());
    Ok(serde_json::to_vec(&u)?)
}

#[tokio::test]
async fn a_photo_and_a_voice_message_get_a_reply_saying_what_is_read_and_cost_nothing() -> anyhow::Result<()> {
    let app = TestApp::builder().spawn().await?;
    app.grant(ADA, "5").await?;
    let photo = json!([{ "file_id": "AgAD1", "file_unique_id": "u1", "width": 90, "height": 90, "file_size": 1200 }]);
    let voice = json!({ "file_id": "AwAD2", "file_unique_id": "u2", "duration": 3, "mime_type": "audio/ogg" });
    for (update_id, message_id, field, body, kind) in
        [(870_000_001, 901, "photo", photo, "photo"), (870_000_002, 902, "voice", voice, "voice message")]
    {
        assert_eq!(app.post_update(&media_update(update_id, message_id, field, body)?).await?, 200);
        let text = app.wait_for_message(ADA, &format!("can't read a {kind}")).await?;
        assert!(text.contains("document"), "{text}");
        let call = app
            .telegram
            .calls()
            .into_iter()
            .find(|c| c.method == "sendMessage" && c.params["text"].as_str().is_some_and(|t| t.contains(kind)))
            .ok_or_else(|| anyhow::anyhow!("no sendMessage for the {kind}"))?;
        assert_eq!(call.params["reply_parameters"]["message_id"].as_i64(), Some(message_id), "a reply to it");
    }
    // Both updates are recorded (nothing silently dropped), as actions.
    let pool = app.db.pool.clone();
    wait_until("both updates recorded", WAIT, || {
        let pool = pool.clone();
        async move {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM processed_updates WHERE update_id IN (870000001, 870000002) AND outcome = 'action'")
                .fetch_one(&pool)
                .await?;
            Ok(n == 2)
        }
    })
    .await?;
    assert!(app.anthropic.calls().is_empty(), "Claude was not called");
    let jobs: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE chat_id = $1").bind(ADA).fetch_one(&app.db.pool).await?;
    assert_eq!(jobs, 0, "no job, so no charge");
    app.cleanup().await
}
