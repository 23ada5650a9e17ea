//! Replays a scripted SSE body event by event, paced and possibly stalled,
//! and records in the call log what was sent, the usage it carried and when
//! the stream ended.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use eventsource_stream::Eventsource;
use futures_util::{Stream, StreamExt};
use shared::anthropic::events::parse_event;
use shared::anthropic::{MessageState, StreamEvent};

use super::{ScriptedResponse, Shared};

/// Splits an SSE body into events: each is the text up to and including a
/// blank line (`\n\n` or `\r\n\r\n`); trailing text without one is a last
/// event. Concatenating the result gives back `body` byte for byte.
pub(super) fn split_events(body: &Bytes) -> Vec<Bytes> {
    let mut events = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < body.len() {
        let end = if body[i..].starts_with(b"\n\n") {
            Some(i + 2)
        } else if body[i..].starts_with(b"\r\n\r\n") {
            Some(i + 4)
        } else {
            None
        };
        match end {
            Some(end) => {
                events.push(body.slice(start..end));
                start = end;
                i = end;
            }
            None => i += 1,
        }
    }
    if start < body.len() {
        events.push(body.slice(start..));
    }
    events
}

/// Parses one event of [`split_events`] as the client does (SSE framing by
/// `eventsource-stream`, then `shared::anthropic`'s event enum); `None` for
/// an event without data or whose data is not a Messages API event.
async fn parse_one(event: &Bytes) -> Option<StreamEvent> {
    let mut framed = futures_util::stream::iter([Ok::<_, Infallible>(event.clone())]).eventsource();
    let mut parsed = None;
    while let Some(Ok(sse)) = framed.next().await {
        if !sse.data.trim().is_empty() {
            parsed = parse_event(&sse.data).ok();
        }
    }
    parsed
}

/// The state of one replayed response.
pub(super) struct Replay {
    /// Every event of the script.
    events: Vec<Bytes>,
    /// Each event of `events` parsed, to follow the usage they carry.
    parsed: Vec<Option<StreamEvent>>,
    /// The message as the events sent so far describe it (model, usage).
    message: MessageState,
    /// Index of the next event to send.
    next: usize,
    /// How many events are sent before stopping (or stalling).
    limit: usize,
    /// Whether to keep the connection open after `limit` events.
    stall: bool,
    /// Pause before each event.
    delay: Duration,
    /// Extra pause before the first event.
    first_delay: Duration,
    /// Records progress; its drop marks the end of the response.
    progress: Progress,
}

impl Replay {
    pub(super) async fn new(scripted: &ScriptedResponse, shared: Arc<Shared>, index: usize) -> Self {
        let events = scripted.sse.as_ref().map(split_events).unwrap_or_default();
        let mut parsed = Vec::with_capacity(events.len());
        for event in &events {
            parsed.push(parse_one(event).await);
        }
        let limit = scripted.stall_after_events.map_or(events.len(), |n| n.min(events.len()));
        if events.is_empty() {
            shared.update_call(index, |call| call.completed = true);
        }
        Self {
            events,
            parsed,
            message: MessageState::default(),
            next: 0,
            limit,
            stall: scripted.stall_after_events.is_some(),
            delay: Duration::from_millis(scripted.event_delay_ms),
            first_delay: Duration::from_millis(scripted.first_event_delay_ms),
            progress: Progress { shared, index },
        }
    }

    /// The response body: events in order, each after the pause; ends early
    /// when the fake shuts down.
    pub(super) fn into_stream(self) -> impl Stream<Item = Result<Bytes, Infallible>> + Send {
        futures_util::stream::unfold(self, |mut replay| async move {
            let shutdown = replay.progress.shared.shutdown.clone();
            if replay.next >= replay.limit {
                if replay.stall {
                    shutdown.cancelled().await;
                }
                return None;
            }
            let delay = if replay.next == 0 { replay.delay + replay.first_delay } else { replay.delay };
            if !delay.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => return None,
                }
            }
            let event = replay.events.get(replay.next).cloned().unwrap_or_default();
            if let Some(parsed) = replay.parsed.get(replay.next).cloned().flatten() {
                replay.message.apply(parsed);
            }
            replay.next += 1;
            replay.progress.sent(replay.next, replay.events.len(), &replay.message);
            Some((Ok(event), replay))
        })
    }
}

/// Marks the call ended when the response body is dropped: after its last
/// event, or when the client disconnects, or at shutdown.
struct Progress {
    shared: Arc<Shared>,
    index: usize,
}

impl Progress {
    /// Records that `sent` of the `total` events were handed to the client,
    /// and the model and usage of the `message` they describe.
    fn sent(&self, sent: usize, total: usize, message: &MessageState) {
        self.shared.update_call(self.index, |call| {
            call.events_sent = sent;
            call.completed = sent == total;
            call.model.clone_from(&message.model);
            call.usage = message.started.then(|| message.usage.clone());
        });
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        let ended_at = Instant::now();
        self.shared.update_call(self.index, |call| call.ended_at = Some(ended_at));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keeps_every_byte_and_cuts_after_blank_lines() {
        let body = Bytes::from_static(b"event: a\ndata: 1\n\nevent: b\r\ndata: 2\r\n\r\ntail");
        let events = split_events(&body);
        assert_eq!(
            events,
            vec![
                Bytes::from_static(b"event: a\ndata: 1\n\n"),
                Bytes::from_static(b"event: b\r\ndata: 2\r\n\r\n"),
                Bytes::from_static(b"tail"),
            ]
        );
        assert_eq!(events.concat(), body.to_vec());
    }

    #[test]
    fn split_of_an_empty_body_has_no_event() {
        assert!(split_events(&Bytes::new()).is_empty());
    }
}
