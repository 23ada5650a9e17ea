//! The fake Bot API seen from an HTTP client.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};

use super::*;

const WAIT: Duration = Duration::from_secs(5);
const TOKEN: &str = "123456:TEST-token_1";

async fn start() -> FakeTelegram {
    let any_port: SocketAddr = "127.0.0.1:0".parse().unwrap();
    FakeTelegram::start(any_port, "fleet_test_bot").await.unwrap()
}

/// Calls `method` with a JSON body; gives the HTTP status and the JSON answer.
async fn call(fake: &FakeTelegram, method: &str, params: Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{}/bot{TOKEN}/{method}", fake.api_url()))
        .json(&params)
        .timeout(WAIT)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[tokio::test]
async fn get_me_describes_the_bot() {
    let fake = start().await;
    let (status, body) = call(&fake, "getMe", json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(body["ok"], true);
    assert_eq!(body["result"]["id"], BOT_USER_ID);
    assert_eq!(body["result"]["is_bot"], true);
    assert_eq!(body["result"]["username"], "fleet_test_bot");
    let calls = fake.calls();
    assert_eq!((calls[0].method.as_str(), calls[0].token.as_str()), ("getMe", TOKEN));
}

#[tokio::test]
async fn a_429_fault_fails_only_the_second_send_message_and_changes_nothing() {
    let fake = start().await;
    fake.add_fault(Fault {
        methods: vec!["sendMessage".to_owned()],
        nth: 2,
        status: 429,
        retry_after: Some(2),
        ..Fault::default()
    });
    let mut answers = Vec::new();
    for text in ["one", "two", "three"] {
        answers.push(call(&fake, "sendMessage", json!({ "chat_id": 42, "text": text })).await);
    }
    assert_eq!(answers[0].0, 200);
    assert_eq!(
        answers[1],
        (
            429,
            json!({
                "ok": false,
                "error_code": 429,
                "description": "Too Many Requests: retry after 2",
                "parameters": { "retry_after": 2 },
            })
        )
    );
    assert_eq!(answers[2].0, 200);
    assert_eq!(answers[2].1["result"]["message_id"], 2);
    assert_eq!(answers[2].1["result"]["chat"]["type"], "private");

    let texts: Vec<String> = fake.messages().into_iter().map(|m| m.text).collect();
    assert_eq!(texts, ["one", "three"]);
    let statuses: Vec<u16> = fake.calls().iter().map(|c| c.status).collect();
    assert_eq!(statuses, [200, 429, 200]);
    assert_eq!(fake.messages()[1].sent_call, 2);
}

#[tokio::test]
async fn editing_to_the_same_content_is_not_modified() {
    let fake = start().await;
    let entities = json!([{ "type": "bold", "offset": 0, "length": 5 }]);
    let (_, sent) =
        call(&fake, "sendMessage", json!({ "chat_id": -100_123, "text": "Hello world", "entities": entities })).await;
    assert_eq!(sent["result"]["chat"]["type"], "supergroup");
    let id = sent["result"]["message_id"].clone();

    let same = json!({ "chat_id": -100_123, "message_id": id, "text": "Hello world", "entities": entities });
    let (status, body) = call(&fake, "editMessageText", same).await;
    assert_eq!(status, 400);
    assert_eq!(
        body["description"],
        "Bad Request: message is not modified: specified new message content and reply markup \
         are exactly the same as a current content and reply markup of the message"
    );

    let changed = json!({ "chat_id": -100_123, "message_id": id, "text": "Hello there" });
    let (status, body) = call(&fake, "editMessageText", changed).await;
    assert_eq!(status, 200);
    assert_eq!(body["result"]["text"], "Hello there");
    assert!(body["result"].get("edit_date").is_some());

    let unknown = json!({ "chat_id": -100_123, "message_id": 99, "text": "x" });
    let (status, body) = call(&fake, "editMessageText", unknown).await;
    assert_eq!((status, body["description"].as_str()), (400, Some("Bad Request: message to edit not found")));

    let message = &fake.messages()[0];
    assert_eq!((message.text.as_str(), message.edits, &message.entities), ("Hello there", 1, &Value::Null));
}

#[tokio::test]
async fn send_message_checks_text_and_entities() {
    let fake = start().await;
    let (status, body) = call(&fake, "sendMessage", json!({ "chat_id": 1, "text": "  " })).await;
    assert_eq!((status, body["description"].as_str()), (400, Some("Bad Request: message text is empty")));

    // 2049 emoji are 4098 UTF-16 code units, over the limit of 4096.
    let long = "😀".repeat(2049);
    let (status, body) = call(&fake, "sendMessage", json!({ "chat_id": 1, "text": long })).await;
    assert_eq!((status, body["description"].as_str()), (400, Some("Bad Request: message is too long")));

    let past_end = json!([{ "type": "italic", "offset": 2, "length": 9 }]);
    let (status, body) =
        call(&fake, "sendMessage", json!({ "chat_id": 1, "text": "short", "entities": past_end })).await;
    assert_eq!(status, 400);
    let description = body["description"].as_str().unwrap();
    assert!(description.starts_with("Bad Request: can't parse entities: "), "{description}");

    let (status, _) = call(&fake, "sendMessage", json!({ "text": "hi" })).await;
    assert_eq!(status, 400);
    assert!(fake.messages().is_empty());
}

#[tokio::test]
async fn form_bodies_and_query_strings_are_accepted() {
    let fake = start().await;
    let entities = r#"[{"type":"code","offset":0,"length":2}]"#;
    let response = reqwest::Client::new()
        .post(format!("{}/bot{TOKEN}/sendmessage?chat_id=77", fake.api_url()))
        .form(&[("text", "ok then"), ("entities", entities)])
        .timeout(WAIT)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let message = &fake.messages()[0];
    assert_eq!((message.chat_id, message.text.as_str()), (77, "ok then"));
    assert_eq!(message.entities[0]["type"], "code");
    assert_eq!(fake.calls()[0].method, "sendMessage");
}

#[tokio::test]
async fn get_updates_honours_offset_and_limit() {
    let fake = start().await;
    for id in [10, 11, 12] {
        fake.push_update(json!({ "update_id": id, "message": { "text": format!("m{id}") } }));
    }
    let ids = |body: &Value| -> Vec<i64> {
        body["result"].as_array().unwrap().iter().map(|u| u["update_id"].as_i64().unwrap()).collect()
    };
    let (_, body) = call(&fake, "getUpdates", json!({})).await;
    assert_eq!(ids(&body), [10, 11, 12]);
    let (_, body) = call(&fake, "getUpdates", json!({ "limit": 2 })).await;
    assert_eq!(ids(&body), [10, 11]);
    let (_, body) = call(&fake, "getUpdates", json!({ "offset": 12 })).await;
    assert_eq!(ids(&body), [12]);
    // 10 and 11 were confirmed by the offset: they are gone.
    let (_, body) = call(&fake, "getUpdates", json!({})).await;
    assert_eq!(ids(&body), [12]);
    let (_, body) = call(&fake, "getUpdates", json!({ "offset": 13 })).await;
    assert_eq!(ids(&body), Vec::<i64>::new());
}

#[tokio::test]
async fn get_updates_long_polls_until_an_update_arrives() {
    let fake = std::sync::Arc::new(start().await);
    let poller = {
        let fake = std::sync::Arc::clone(&fake);
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let answer = call(&fake, "getUpdates", json!({ "timeout": 30 })).await;
            (answer, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    fake.push_update(json!({ "update_id": 5 }));
    let ((status, body), elapsed) = tokio::time::timeout(WAIT, poller).await.unwrap().unwrap();
    assert_eq!(status, 200);
    assert_eq!(body["result"][0]["update_id"], 5);
    assert!(elapsed < Duration::from_millis(1500), "{elapsed:?}");

    // With nothing to serve, the poll ends at the fake's 2 s cap.
    let started = std::time::Instant::now();
    let (_, body) = call(&fake, "getUpdates", json!({ "offset": 6, "timeout": 30 })).await;
    assert_eq!(body["result"], json!([]));
    assert!(started.elapsed() >= Duration::from_millis(1900));
}

#[tokio::test]
async fn wait_for_call_wakes_on_a_matching_call() {
    let fake = std::sync::Arc::new(start().await);
    let sender = {
        let fake = std::sync::Arc::clone(&fake);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            call(&fake, "sendChatAction", json!({ "chat_id": 1, "action": "typing" })).await
        })
    };
    assert!(fake.wait_for_call(|c| c.method == "sendChatAction", WAIT).await);
    assert_eq!(sender.await.unwrap().0, 200);
    assert!(!fake.wait_for_call(|c| c.method == "deleteMessage", Duration::from_millis(50)).await);
}

#[tokio::test]
async fn other_methods_answer_like_the_bot_api() {
    let fake = start().await;
    let (_, sent) = call(&fake, "sendMessage", json!({ "chat_id": 3, "text": "bye" })).await;
    let id = sent["result"]["message_id"].clone();
    let draft = json!({ "chat_id": 3, "draft_id": 7, "text": "Thinking" });
    assert_eq!(call(&fake, "sendMessageDraft", draft).await.1["result"], true);
    let zero_draft = json!({ "chat_id": 3, "draft_id": 0, "text": "x" });
    assert_eq!(call(&fake, "sendMessageDraft", zero_draft).await.0, 400);
    let delete = json!({ "chat_id": 3, "message_id": id });
    assert_eq!(call(&fake, "deleteMessage", delete.clone()).await.0, 200);
    assert_eq!(call(&fake, "deleteMessage", delete).await.0, 400);
    assert!(fake.messages()[0].deleted);
    let (_, file) = call(&fake, "getFile", json!({ "file_id": "BQACAgI" })).await;
    assert_eq!(file["result"]["file_path"], "documents/file_1");
    assert_eq!(call(&fake, "answerCallbackQuery", json!({ "callback_query_id": "9" })).await.0, 200);
    assert_eq!(call(&fake, "setWebhook", json!({ "url": "https://x.test/hook" })).await.0, 200);
    assert_eq!(call(&fake, "getUpdates", json!({})).await.0, 409);
    assert_eq!(call(&fake, "deleteWebhook", json!({})).await.0, 200);

    let (status, body) = call(&fake, "sendRocket", json!({})).await;
    assert_eq!(
        (status, body),
        (404, json!({ "ok": false, "error_code": 404, "description": "Not Found: method not found" }))
    );
}

#[tokio::test]
async fn a_403_fault_on_any_method_repeats_for_its_times() {
    let fake = start().await;
    fake.add_fault(Fault { status: 403, times: 2, ..Fault::default() });
    let send = json!({ "chat_id": 8, "text": "hi" });
    let (status, body) = call(&fake, "sendMessage", send.clone()).await;
    assert_eq!((status, body["description"].as_str()), (403, Some("Forbidden: bot was blocked by the user")));
    assert_eq!(call(&fake, "getMe", json!({})).await.0, 403);
    assert_eq!(call(&fake, "sendMessage", send).await.0, 200);
    fake.add_fault(Fault::default());
    fake.clear_faults();
    assert_eq!(call(&fake, "getMe", json!({})).await.0, 200);
}

#[test]
fn faults_deserialize_from_a_scenario_table() {
    let fault: Fault =
        toml::from_str("methods = [\"editMessageText\", \"sendMessageDraft\"]\nnth = 2\nstatus = 429\nretry_after = 2")
            .unwrap();
    assert_eq!(fault.times, 1);
    assert!(fault.matches("editmessagetext"));
    assert!(!fault.matches("sendMessage"));
}

#[tokio::test]
async fn a_registered_file_is_described_by_get_file_and_served_at_its_path() {
    let fake = start().await;
    let path = fake.add_file("BQADoc", b"hello file".to_vec());
    assert_eq!(path, "documents/file_1");
    let (_, file) = call(&fake, "getFile", json!({ "file_id": "BQADoc" })).await;
    assert_eq!(file["result"]["file_path"], "documents/file_1");
    assert_eq!(file["result"]["file_size"], 10);
    let http = reqwest::Client::new();
    let got = http.get(format!("{}/file/bot{TOKEN}/{path}", fake.api_url())).timeout(WAIT).send().await.unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.bytes().await.unwrap().as_ref(), b"hello file");
    let missing = http.get(format!("{}/file/bot{TOKEN}/documents/file_9", fake.api_url())).timeout(WAIT).send();
    assert_eq!(missing.await.unwrap().status(), 404);
    let bad_token = http.get(format!("{}/file/botnope/{path}", fake.api_url())).timeout(WAIT).send();
    assert_eq!(bad_token.await.unwrap().status(), 404);
    let downloads: Vec<_> = fake.calls().into_iter().filter(|c| c.method == "downloadFile").collect();
    assert_eq!(downloads.iter().map(|c| c.status).collect::<Vec<_>>(), [200, 404, 404]);
    assert_eq!(downloads[0].params["file_path"], "documents/file_1");
}
