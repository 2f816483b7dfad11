//! Streamed answers: typed server-sent events and raw bytes.

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use cxmpute_api::sse::{SseDecoder, SseEvent};
use cxmpute_api::wire::{ChatCompletionChunk, ErrorDetail};
use futures_core::Stream;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::client::decode_error;
use crate::error::{Error, Result, TimeoutPhase};
use crate::transport::{body_error, Answer};

/// A streamed chat completion: one [`ChatCompletionChunk`] per event.
pub type ChatStream = SseStream<ChatCompletionChunk>;

/// The body of an answer, chunk by chunk, bounded by the idle timeout.
struct Body {
    inner: Incoming,
    idle: Option<Duration>,
}

impl Body {
    fn new(resp: Answer, idle: Option<Duration>) -> Self {
        Body {
            inner: resp.into_body(),
            idle,
        }
    }

    /// The next chunk; `None` at the end of the body.
    async fn next(&mut self) -> Option<Result<Bytes>> {
        loop {
            let next = self.inner.frame();
            let frame = match self.idle {
                Some(t) => match tokio::time::timeout(t, next).await {
                    Ok(frame) => frame,
                    Err(_) => return Some(Err(Error::Timeout(TimeoutPhase::StreamIdle))),
                },
                None => next.await,
            };
            match frame?.map_err(body_error) {
                // Trailers carry no data: read on.
                Ok(f) => match f.into_data() {
                    Ok(data) => return Some(Ok(data)),
                    Err(_) => continue,
                },
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// Decodes events off a body as bytes arrive: a line may be split anywhere
/// across network chunks.
struct Events {
    body: Body,
    decoder: SseDecoder,
    pending: VecDeque<SseEvent>,
    eof: bool,
}

impl Events {
    /// The next event; `None` once the body has ended and every event is out.
    async fn next(&mut self) -> Option<Result<SseEvent>> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(Ok(e));
            }
            if self.eof {
                return None;
            }
            let pending = &mut self.pending;
            match self.body.next().await {
                Some(Ok(chunk)) => {
                    if let Err(e) = self.decoder.push(&chunk, &mut |ev| pending.push_back(ev)) {
                        return Some(Err(Error::Stream(detail(
                            e.to_string(),
                            "stream_error",
                            "line_too_long",
                        ))));
                    }
                }
                Some(Err(e)) => return Some(Err(e)),
                None => {
                    self.eof = true;
                    self.decoder.finish(&mut |ev| pending.push_back(ev));
                }
            }
        }
    }
}

fn detail(message: String, kind: &str, code: &str) -> ErrorDetail {
    ErrorDetail {
        message,
        kind: kind.into(),
        code: Some(code.into()),
        param: None,
    }
}

/// The error an event carries, if it is one: an `event: error`, or a data
/// object with an `error` member (the host's `stream_interrupted` and the
/// nodes' own). Lenient on purpose: a node's error object may lack fields
/// OpenAI's has.
fn error_event(ev: &SseEvent) -> Option<ErrorDetail> {
    let named = ev.event.as_deref() == Some("error");
    if !named && !ev.data.contains("\"error\"") {
        return None;
    }
    let v: Value = serde_json::from_str(&ev.data).unwrap_or(Value::Null);
    let err = match v.get("error") {
        Some(e) => e.clone(),
        None if named => v,
        None => return None,
    };
    let text = |k: &str| err.get(k).and_then(Value::as_str).map(str::to_owned);
    Some(ErrorDetail {
        message: text("message")
            .or_else(|| err.as_str().map(str::to_owned))
            .unwrap_or_else(|| ev.data.clone()),
        kind: text("type").unwrap_or_else(|| "stream_error".into()),
        code: text("code"),
        param: text("param"),
    })
}

/// A stream of typed server-sent events, as OpenAI streams them: each event's
/// `data` is one JSON `T`; the stream ends after `data: [DONE]`.
///
/// It yields `Err` once and then ends when the host sends an error event
/// ([`Error::Stream`]), when the connection ends before `[DONE]`
/// ([`Error::Stream`] with code `stream_incomplete`), when an event is not a
/// `T` ([`Error::Decode`]), when the connection fails ([`Error::Transport`])
/// or when it stays silent longer than the read timeout ([`Error::Timeout`]).
///
/// Dropping it closes the connection, which cancels the call upstream.
///
/// ```no_run
/// use futures::StreamExt;
/// use cxmpute_client::Client;
/// use cxmpute_client::wire::{ChatCompletionRequest, ChatMessage};
///
/// # async fn run(client: Client) -> Result<(), cxmpute_client::Error> {
/// let req = ChatCompletionRequest::new("llama3.2:3b", vec![ChatMessage::user("Tell a story")]);
/// let mut stream = client.user().chat_stream(&req).await?;
/// while let Some(chunk) = stream.next().await {
///     for choice in chunk?.choices {
///         print!("{}", choice.delta.content.unwrap_or_default());
///     }
/// }
/// # Ok(())
/// # }
/// ```
pub struct SseStream<T> {
    inner: BoxStream<'static, Result<T>>,
    _t: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for SseStream<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseStream").finish_non_exhaustive()
    }
}

impl<T: DeserializeOwned + Send + 'static> SseStream<T> {
    pub(crate) fn new(resp: Answer, idle: Option<Duration>) -> Self {
        let status = resp.status.as_u16();
        let events = Events {
            body: Body::new(resp, idle),
            decoder: SseDecoder::default(),
            pending: VecDeque::new(),
            eof: false,
        };
        // `Some(events)` while the stream goes on; `None` once it has ended,
        // so nothing is read after `[DONE]` or an error.
        let inner = futures_util::stream::unfold(Some(events), move |state| async move {
            let mut events = state?;
            loop {
                let ev = match events.next().await {
                    Some(Ok(ev)) => ev,
                    Some(Err(e)) => return Some((Err(e), None)),
                    None => {
                        let why = "the stream ended before [DONE]".to_owned();
                        let e = Error::Stream(detail(why, "stream_error", "stream_incomplete"));
                        return Some((Err(e), None));
                    }
                };
                let data = ev.data.trim();
                if data == "[DONE]" {
                    return None;
                }
                if data.is_empty() {
                    continue;
                }
                if let Some(d) = error_event(&ev) {
                    return Some((Err(Error::Stream(d)), None));
                }
                return Some(match serde_json::from_str::<T>(data) {
                    Ok(t) => (Ok(t), Some(events)),
                    Err(e) => (Err(decode_error(status, e, data.as_bytes())), None),
                });
            }
        })
        // Polling an ended stream again answers `None` again.
        .fuse()
        .boxed();
        SseStream {
            inner,
            _t: PhantomData,
        }
    }
}

impl<T> Stream for SseStream<T> {
    type Item = Result<T>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.poll_next_unpin(cx)
    }
}

/// A binary answer (audio) as it arrives, chunk by chunk.
///
/// It yields [`Error::Transport`] if the connection breaks (the host breaks
/// it when a node fails mid-answer: binary bodies cannot carry an error
/// event) and [`Error::Timeout`] if it stays silent longer than the read
/// timeout.
///
/// ```no_run
/// use futures::StreamExt;
///
/// # async fn run(mut audio: cxmpute_client::ByteStream) -> Result<(), cxmpute_client::Error> {
/// let mut bytes = Vec::new();
/// while let Some(chunk) = audio.next().await {
///     bytes.extend_from_slice(&chunk?);
/// }
/// # Ok(())
/// # }
/// ```
pub struct ByteStream {
    inner: BoxStream<'static, Result<Bytes>>,
    content_type: Option<String>,
}

impl std::fmt::Debug for ByteStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ByteStream")
            .field("content_type", &self.content_type)
            .finish_non_exhaustive()
    }
}

impl ByteStream {
    pub(crate) fn new(resp: Answer, idle: Option<Duration>) -> Self {
        let content_type = resp
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = Body::new(resp, idle);
        let inner = futures_util::stream::unfold(Some(body), |state| async move {
            let mut body = state?;
            match body.next().await? {
                Ok(b) => Some((Ok(b), Some(body))),
                Err(e) => Some((Err(e), None)),
            }
        })
        .fuse()
        .boxed();
        ByteStream {
            inner,
            content_type,
        }
    }

    /// The answer's `Content-Type` (e.g. `audio/wav`), if it named one.
    pub fn content_type(&self) -> Option<&str> {
        self.content_type.as_deref()
    }
}

impl Stream for ByteStream {
    type Item = Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.poll_next_unpin(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(event: Option<&str>, data: &str) -> SseEvent {
        SseEvent {
            event: event.map(str::to_owned),
            data: data.to_owned(),
        }
    }

    #[test]
    fn error_events_are_recognised_leniently() {
        let host =
            r#"{"error":{"message":"cut","type":"upstream_error","code":"stream_interrupted"}}"#;
        let d = error_event(&ev(None, host)).unwrap();
        assert_eq!(
            (d.message.as_str(), d.kind.as_str()),
            ("cut", "upstream_error")
        );
        assert_eq!(d.code.as_deref(), Some("stream_interrupted"));
        let bare = error_event(&ev(None, r#"{"error":"overloaded"}"#)).unwrap();
        assert_eq!(bare.message, "overloaded");
        assert_eq!(bare.kind, "stream_error");
        let named = error_event(&ev(Some("error"), r#"{"message":"bad"}"#)).unwrap();
        assert_eq!(named.message, "bad");
        let text = error_event(&ev(Some("error"), "plain words")).unwrap();
        assert_eq!(text.message, "plain words");
        // A chunk whose text mentions "error" is still a chunk.
        let chunk = r#"{"choices":[{"delta":{"content":"an \"error\" here"}}]}"#;
        assert_eq!(error_event(&ev(None, chunk)), None);
    }
}
