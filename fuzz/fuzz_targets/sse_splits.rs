//! SSE bytes cut into arbitrary chunks (the first byte seeds the cut
//! points): the events decoded, and the message state built from them, are
//! the same as from the unsplit bytes — UTF-8 sequences cut across chunks
//! decode exactly. Never a panic.
#![no_main]
use bytes::Bytes;
use eventsource_stream::Eventsource;
use futures::executor::block_on;
use futures::stream::{self, StreamExt};
use libfuzzer_sys::fuzz_target;
use shared::anthropic::events::parse_event;
use shared::anthropic::MessageState;

fn decode(chunks: Vec<Bytes>) -> (Vec<String>, String, Option<String>) {
    let items = stream::iter(chunks.into_iter().map(Ok::<_, std::convert::Infallible>));
    let events: Vec<_> = block_on(items.eventsource().collect());
    let mut state = MessageState::default();
    let mut datas = Vec::new();
    for e in events {
        match e {
            Ok(ev) => {
                datas.push(ev.data.clone());
                if let Ok(parsed) = parse_event(&ev.data) {
                    state.apply(parsed);
                }
            }
            Err(e) => datas.push(format!("error: {e}")),
        }
    }
    (datas, state.text(), state.message_id.clone())
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, body)) = data.split_first() else { return };
    let whole = decode(vec![Bytes::copy_from_slice(body)]);
    let step = usize::from(seed % 7) + 1;
    let mut chunks = Vec::new();
    let mut i = 0;
    let mut n = 0usize;
    while i < body.len() {
        let len = (step + n % 3).min(body.len() - i);
        chunks.push(Bytes::copy_from_slice(&body[i..i + len]));
        i += len;
        n += 1;
    }
    let split = decode(chunks);
    assert_eq!(whole, split, "decoding depends on where the bytes were cut");
});
