//! Server-sent events: the meter that finds usage in a chat stream, over the
//! incremental decoder the broker shares with `cxmpute-client` (defined with
//! the API's types, re-exported here).

use bytes::{BufMut, Bytes, BytesMut};

pub use cxmpute_api::sse::{LineTooLong, SseDecoder, SseEvent};

use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::pricing::Meter;
use crate::wire::Usage;

/// What the meter reads of a chunk: less than a whole
/// [`ChatCompletionChunk`](crate::wire::ChatCompletionChunk), plus whether
/// it is an error event.
#[derive(serde::Deserialize)]
struct MeteredChunk {
    #[serde(default)]
    choices: Vec<MeteredChoice>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<serde::de::IgnoredAny>,
}

#[derive(serde::Deserialize)]
struct MeteredChoice {
    #[serde(default)]
    delta: Option<DeltaOutput>,
}

/// Whether a chunk's delta carries generated output, at least one token:
/// text, reasoning, a refusal or tool-call arguments. The meter counts
/// these to meter a stream whose node reports no usage, and to stop a node
/// streaming more than the output reserved.
///
/// Read straight from the chunk's text, without building the delta: its
/// strings are looked at where they lie, never copied, and its other fields
/// are skipped. (Building a [`ChatDelta`](crate::wire::ChatDelta), whose
/// open fields go through a map of values, was most of what metering a
/// streamed chunk cost.) The same deltas are refused as when building one:
/// a `content` or `role` that is neither a string nor `null`.
struct DeltaOutput(bool);

/// A field of a delta, as far as [`DeltaOutput`] cares: besides `content`
/// and `role`, the fields that carry output when filled.
#[derive(serde::Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum DeltaField {
    Content,
    Role,
    ToolCalls,
    ReasoningContent,
    Reasoning,
    Refusal,
    FunctionCall,
    #[serde(other)]
    Other,
}

impl<'de> serde::Deserialize<'de> for DeltaOutput {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = DeltaOutput;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a chat delta")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<DeltaOutput, A::Error> {
                let mut output = false;
                while let Some(field) = m.next_key::<DeltaField>()? {
                    match field {
                        DeltaField::Content => output |= m.next_value::<Text>()?.0,
                        DeltaField::Role => {
                            m.next_value::<Text>()?;
                        }
                        DeltaField::Other => {
                            m.next_value::<IgnoredAny>()?;
                        }
                        _ => output |= m.next_value::<Filled>()?.0,
                    }
                }
                Ok(DeltaOutput(output))
            }
        }
        d.deserialize_map(V)
    }
}

/// A string or `null`: whether it is a non-empty string.
struct Text(bool);

impl<'de> serde::Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or null")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Text, E> {
                Ok(Text(!s.is_empty()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Text, E> {
                Ok(Text(false))
            }
        }
        // Any other kind of value is refused (the visitor's default).
        d.deserialize_any(V)
    }
}

/// Any value: whether it is filled (not `null`, `""` or `[]`).
struct Filled(bool);

impl<'de> serde::Deserialize<'de> for Filled {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Filled;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any value")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Filled, E> {
                Ok(Filled(false))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Filled, E> {
                Ok(Filled(!s.is_empty()))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Filled, E> {
                Ok(Filled(true))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Filled, E> {
                Ok(Filled(true))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Filled, E> {
                Ok(Filled(true))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Filled, E> {
                Ok(Filled(true))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Filled, A::Error> {
                let mut filled = false;
                while a.next_element::<IgnoredAny>()?.is_some() {
                    filled = true;
                }
                Ok(Filled(filled))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Filled, A::Error> {
                while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Filled(true))
            }
        }
        d.deserialize_any(V)
    }
}

/// Watches a chat completion stream pass by and meters it: usage the node
/// reported, content chunks counted by the broker, whether `[DONE]` came, and
/// whether the node sent anything that is not a chunk.
#[derive(Debug, Default)]
pub(crate) struct ChatStreamMeter {
    decoder: SseDecoder,
    /// Usage from the node's final chunk, if it sent one.
    pub(crate) reported: Option<Usage>,
    /// Chunks carrying output (text, reasoning, tool calls: each at least
    /// one token), counted here.
    pub(crate) content_chunks: u64,
    /// Whether `data: [DONE]` arrived.
    pub(crate) done: bool,
    /// Whether the node sent an event that is not a chunk, an error event, or an endless line.
    pub(crate) garbage: bool,
    /// Whether a usage-only chunk (no choices) is written back: only when
    /// the caller asked for usage, since the broker always asks the node.
    keep_usage_chunk: bool,
    /// The stream as it is passed on: each well-formed event written back
    /// as SSE data lines. Nothing else the node sent (comments, event names,
    /// error events, garbage) reaches the caller: a stranger's node must not
    /// be able to speak to users in the broker's voice. A `BytesMut` so that
    /// handing out what was written is a split, not a copy, and the buffer
    /// is reused once those bytes were sent.
    filtered: BytesMut,
    /// The stream's end as it is passed on: the usage-only chunk, `[DONE]`
    /// and anything after them. Held back until the call's settlement
    /// committed ([`Self::take_tail`]): a caller that saw `[DONE]` was
    /// charged.
    tail: BytesMut,
    /// The completion being streamed, assembled when the answer is to be
    /// kept in the response cache ([`Self::assembling`]).
    pub(crate) assembly: Option<crate::cache::Assembly>,
}

impl ChatStreamMeter {
    /// A meter that rewrites the stream as it passes; with
    /// `keep_usage_chunk` false, without the usage-only chunk (for callers
    /// that did not ask for usage). Take the rewritten bytes with
    /// [`Self::pass`] and, at the end, [`Self::take_output`].
    pub(crate) fn new(keep_usage_chunk: bool) -> Self {
        ChatStreamMeter {
            keep_usage_chunk,
            ..Self::default()
        }
    }

    /// Also assembles the completion streamed (for the response cache).
    pub(crate) fn assembling(mut self) -> Self {
        self.assembly = Some(crate::cache::Assembly::default());
        self
    }

    /// The rewritten bytes produced since the last call.
    pub(crate) fn take_output(&mut self) -> Bytes {
        self.filtered.split().freeze()
    }

    /// The stream's end, held back so far (see `tail`).
    pub(crate) fn take_tail(&mut self) -> Bytes {
        self.tail.split().freeze()
    }

    /// Feeds bytes as they pass through.
    pub(crate) fn feed(&mut self, chunk: &[u8]) {
        // The decoder is taken out while it calls back into `self`, so events
        // are handled as they are decoded, without collecting them first.
        let mut d = std::mem::take(&mut self.decoder);
        if d.push(chunk, &mut |e| self.on_event(e)).is_err() {
            self.garbage = true;
        }
        self.decoder = d;
    }

    /// Feeds a chunk passing through and returns what to pass on: the
    /// rewritten bytes of the events it completed.
    pub(crate) fn pass(&mut self, chunk: Bytes) -> Bytes {
        self.feed(&chunk);
        self.take_output()
    }

    /// Ends the stream.
    pub(crate) fn finish(&mut self) {
        let mut d = std::mem::take(&mut self.decoder);
        d.finish(&mut |e| self.on_event(e));
        self.decoder = d;
    }

    fn on_event(&mut self, e: SseEvent) {
        let data = e.data.trim();
        if data == "[DONE]" {
            self.done = true;
            self.write_back(&e, true);
            return;
        }
        match serde_json::from_str::<MeteredChunk>(data) {
            // An error event, or an event with neither choices nor usage, is
            // not a chunk: a node's words meant for the caller.
            Ok(chunk)
                if chunk.error.is_some() || (chunk.choices.is_empty() && chunk.usage.is_none()) =>
            {
                self.garbage = true;
            }
            Ok(chunk) => {
                if let Some(a) = self.assembly.as_mut() {
                    a.push(data);
                }
                if let Some(u) = chunk.usage {
                    self.reported = Some(u);
                }
                let usage_only = chunk.usage.is_some() && chunk.choices.is_empty();
                if self.keep_usage_chunk || !usage_only {
                    self.write_back(&e, usage_only);
                }
                self.content_chunks += chunk
                    .choices
                    .iter()
                    .filter(|c| c.delta.as_ref().is_some_and(|d| d.0))
                    .count() as u64;
            }
            // Never passed on: see `filtered`.
            Err(_) => self.garbage = true,
        }
    }

    /// Writes `e` back, to the held-back end once the stream's end began
    /// (`ends`: it is its usage chunk or `[DONE]`).
    fn write_back(&mut self, e: &SseEvent, ends: bool) {
        let out = match ends || !self.tail.is_empty() {
            true => &mut self.tail,
            false => &mut self.filtered,
        };
        for line in e.data.split('\n') {
            out.put_slice(b"data: ");
            out.put_slice(line.as_bytes());
            out.put_u8(b'\n');
        }
        out.put_u8(b'\n');
    }

    /// What the stream consumed: the node's usage when it reported one, else
    /// the broker's own count (input estimated as `fallback_input`), clamped to `bound`.
    pub(crate) fn meter(&self, fallback_input: u64, bound: Meter) -> Meter {
        let m = match self.reported {
            Some(u) => Meter {
                input_tokens: u.prompt_tokens,
                output_tokens: u.completion_tokens.max(self.content_chunks),
                units: 0,
            },
            None => Meter {
                input_tokens: fallback_input,
                output_tokens: self.content_chunks,
                units: 0,
            },
        };
        m.clamp_to(bound)
    }

    /// What a stream that broke consumed, counted by the broker alone: the
    /// input as `fallback_input`, the content chunks that were passed on as
    /// output, clamped to `bound`. A node's usage claim is not believed for
    /// a stream it did not finish (it could claim the whole bound and cut).
    pub(crate) fn delivered(&self, fallback_input: u64, bound: Meter) -> Meter {
        Meter {
            input_tokens: fallback_input,
            output_tokens: self.content_chunks,
            units: 0,
        }
        .clamp_to(bound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meter_counts_chunks_and_prefers_reported_usage() {
        let mut m = ChatStreamMeter::default();
        let s = concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"total_tokens\":9}}\n\n",
            "data: [DONE]\n\n"
        );
        for c in s.as_bytes().chunks(5) {
            m.feed(c);
        }
        m.finish();
        assert!(m.done && !m.garbage);
        assert_eq!(m.content_chunks, 2);
        let bound = Meter {
            input_tokens: 100,
            output_tokens: 100,
            units: 0,
        };
        assert_eq!(
            m.meter(3, bound),
            Meter {
                input_tokens: 7,
                output_tokens: 2,
                units: 0
            }
        );
        // A node claiming more than the bound is clamped.
        let tight = Meter {
            input_tokens: 5,
            output_tokens: 1,
            units: 0,
        };
        assert_eq!(m.meter(3, tight), tight);
    }

    #[test]
    fn the_usage_chunk_is_taken_out_when_filtering() {
        let mut m = ChatStreamMeter::new(false);
        let s = concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":1,\"total_tokens\":8}}\n\n",
            "data: [DONE]\n\n"
        );
        let mut out = Vec::new();
        for c in s.as_bytes().chunks(3) {
            m.feed(c);
            out.extend(m.take_output());
        }
        let out = String::from_utf8(out).unwrap();
        // The end is held back until the call is charged.
        assert_eq!(
            out,
            "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n"
        );
        assert_eq!(&m.take_tail()[..], b"data: [DONE]\n\n");
        assert_eq!(
            m.reported.map(|u| u.prompt_tokens),
            Some(7),
            "still metered"
        );
    }

    #[test]
    fn the_usage_chunk_done_and_what_follows_are_held_back_as_the_tail() {
        let mut m = ChatStreamMeter::new(true);
        let usage = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":1,\"total_tokens\":8}}\n\n";
        let content = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n";
        let out = m.pass(bytes::Bytes::from(format!(
            "{content}{usage}{content}data: [DONE]\n\n"
        )));
        assert_eq!(&out[..], content.as_bytes());
        assert_eq!(m.take_output(), bytes::Bytes::new());
        let tail = m.take_tail();
        assert_eq!(
            std::str::from_utf8(&tail).unwrap(),
            format!("{usage}{content}data: [DONE]\n\n")
        );
        assert!(m.done && !m.garbage);
    }

    #[test]
    fn meter_flags_garbage() {
        let mut m = ChatStreamMeter::default();
        m.feed(b"data: not json\n\n");
        assert!(m.garbage);
    }

    #[test]
    fn meter_counts_tool_calls_and_reasoning_as_output() {
        let mut m = ChatStreamMeter::default();
        let s = concat!(
            "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"reasoning_content\":\"hm\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{}\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"\"}}]}\n\n",
        );
        m.feed(s.as_bytes());
        assert!(!m.garbage);
        assert_eq!(m.content_chunks, 2);
    }

    /// The content chunks counted in one chunk per delta, and whether the
    /// meter took the stream for garbage.
    fn counted(deltas: &[&str]) -> (u64, bool) {
        let mut m = ChatStreamMeter::default();
        for d in deltas {
            m.feed(format!("data: {{\"choices\":[{{\"delta\":{d}}}]}}\n\n").as_bytes());
        }
        (m.content_chunks, m.garbage)
    }

    #[test]
    fn output_is_a_filled_text_reasoning_refusal_or_tool_call() {
        for d in [
            r#"{"content":"a"}"#,
            r#"{"con\u0074ent":"a"}"#,
            r#"{"content":"\n"}"#,
            r#"{"role":"assistant","content":"a","x":[1,{"y":null}]}"#,
            r#"{"reasoning":"a"}"#,
            r#"{"refusal":"no"}"#,
            r#"{"tool_calls":[{"index":0}]}"#,
            r#"{"function_call":{}}"#,
            r#"{"function_call":{"name":"f"}}"#,
            r#"{"reasoning_content":0}"#,
            r#"{"content":null,"tool_calls":[{"index":0}]}"#,
        ] {
            assert_eq!(counted(&[d]), (1, false), "{d}");
        }
        for d in [
            "{}",
            "null",
            r#"{"content":""}"#,
            r#"{"content":null}"#,
            r#"{"role":"assistant"}"#,
            r#"{"role":null,"content":""}"#,
            r#"{"tool_calls":[]}"#,
            r#"{"refusal":""}"#,
            r#"{"reasoning":null}"#,
            r#"{"other":"text that is not output"}"#,
        ] {
            assert_eq!(counted(&[d]), (0, false), "{d}");
        }
    }

    #[test]
    fn a_delta_of_the_wrong_shape_is_garbage() {
        for d in [
            r#"{"content":5}"#,
            r#"{"content":["a"]}"#,
            r#"{"role":{"name":"x"}}"#,
            r#""text""#,
            "[]",
            r#"{"content":"a""#,
        ] {
            assert!(counted(&[d]).1, "{d}");
        }
    }

    #[test]
    fn nothing_but_well_formed_chunks_is_passed_on() {
        let mut m = ChatStreamMeter::new(true);
        let out = m.pass(bytes::Bytes::from_static(
            b": a comment\nevent: error\ndata: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"error\":{\"message\":\"rotate your key at evil\"}}\n\n",
        ));
        let text = std::str::from_utf8(&out).unwrap();
        assert_eq!(
            text,
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n"
        );
        assert!(m.garbage);
    }
}
