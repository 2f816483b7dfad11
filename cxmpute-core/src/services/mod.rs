//! What is particular to each gateway route: how its body is validated, what
//! it may consume at most (for the reservation), what is sent to the node,
//! and how the node's answer is checked and metered.
//!
//! Everything else (auth, reservation, selection, failover, streaming,
//! settling, usage) is one generic path in [`crate::broker`]. Adding a route
//! means adding a `prepare_*` function here and an arm in [`prepare`].
//!
//! | route | service | pool model | metered as |
//! |---|---|---|---|
//! | `/v1/chat/completions` | chat | `model` | input and output tokens |
//! | `/v1/embeddings` | embeddings | `model` | input tokens |
//! | `/v1/audio/speech` | tts | `model` | units: characters spoken |
//! | `/v1/tts` | tts | `model`, else `kokoro` | units: characters spoken |
//! | `/v1/scrape` | scrape | `model`, else `default` | units: URLs fetched |
//! | `/v1/m/{caption,query,detect,point}` | vision | `model`, else `moondream` | units: one image |
//!
//! Each is then charged by the price table: `per_request` plus the per-million
//! rates of what was metered.

use bytes::Bytes;

use crate::broker::BrokerConfig;
use crate::error::{Error, Result};
use crate::pricing::Meter;
use crate::types::Route;
use crate::wire::*;

mod scrape;
pub(crate) mod speech;
mod vision;

#[cfg(feature = "node")]
pub(crate) use speech::espeak_voice;
#[cfg(feature = "node")]
pub(crate) use vision::{data_url, decode_inline_image, sniff_image};

/// Checks a complete (non-streamed) answer's shape and meters it; `Err` says
/// why the answer is not acceptable (the node is then treated as failed).
pub(crate) type JsonMeter = fn(&Prepared, &[u8]) -> std::result::Result<Meter, String>;

/// How a node's answer is checked and metered.
#[derive(Clone, Copy)]
pub(crate) enum AnswerKind {
    /// A JSON body, read whole (size-capped), checked and metered by the function.
    Json(JsonMeter),
    /// A chat completion stream (SSE), passed through and metered on the way.
    ChatSse {
        /// Whether the caller asked for the usage chunk itself. The node is
        /// always asked for it (to meter); when the caller did not ask, it
        /// is taken out of the stream, as OpenAI would not send it.
        caller_wants_usage: bool,
    },
    /// Opaque bytes (audio), passed through; metered as the request's bounds
    /// when it completes.
    Binary,
}

impl std::fmt::Debug for AnswerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AnswerKind::Json(_) => "Json",
            AnswerKind::ChatSse { .. } => "ChatSse",
            AnswerKind::Binary => "Binary",
        })
    }
}

/// A validated request, ready to forward.
#[derive(Debug)]
pub(crate) struct Prepared {
    /// The route called (also the path forwarded to on the node).
    pub route: Route,
    /// The pool's model name.
    pub model: String,
    /// The body sent to the node.
    pub body: Bytes,
    /// How the answer is checked and metered.
    pub kind: AnswerKind,
    /// Upper bounds of what the request can consume.
    pub bound: Meter,
    /// The input tokens assumed when a node reports none.
    pub fallback_input: u64,
}

/// A 400 with a message.
pub(crate) fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidInput(msg.into())
}

/// Parses a JSON body with a clear 400 on failure.
pub(crate) fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| invalid(format!("invalid request body: {e}")))
}

/// Checks a pool model name given in a body: not blank, not absurdly long,
/// no control characters (it becomes a pool key and a log field).
pub(crate) fn check_model(model: &str) -> Result<String> {
    let m = model.trim();
    if m.is_empty() {
        return Err(invalid("`model` must not be empty"));
    }
    if m.len() > 200 || m.chars().any(char::is_control) {
        return Err(invalid("`model` is not a valid model name"));
    }
    Ok(m.to_owned())
}

/// Encodes a normalised body for the node.
pub(crate) fn encode<T: serde::Serialize>(v: &T) -> Result<Bytes> {
    serde_json::to_vec(v)
        .map(Bytes::from)
        .map_err(|e| Error::backend("encoding request", e))
}

/// A token estimate for text: a quarter of its bytes, rounded up.
pub(crate) fn ceil_div4(n: u64) -> u64 {
    n.div_ceil(4)
}

/// Validates a gateway body for `route` and prepares it for forwarding.
pub(crate) fn prepare(cfg: &BrokerConfig, route: Route, body: &Bytes) -> Result<Prepared> {
    match route {
        Route::ChatCompletions => prepare_chat(cfg, body),
        Route::Embeddings => prepare_embeddings(body),
        Route::AudioSpeech => speech::prepare_speech(body),
        Route::Tts => speech::prepare_tts(body),
        Route::Scrape => scrape::prepare_scrape(body),
        Route::Caption | Route::Query | Route::Detect | Route::Point => {
            vision::prepare_vision(cfg, route, body)
        }
    }
}

fn prepare_chat(cfg: &BrokerConfig, body: &Bytes) -> Result<Prepared> {
    let mut req: ChatCompletionRequest = parse_body(body)?;
    if req.model.trim().is_empty() {
        return Err(invalid("`model` must not be empty"));
    }
    if req.messages.is_empty() {
        return Err(invalid("`messages` must not be empty"));
    }
    for (i, m) in req.messages.iter().enumerate() {
        if !matches!(
            m.role.as_str(),
            "system" | "user" | "assistant" | "tool" | "developer" | "function"
        ) {
            return Err(invalid(format!(
                "messages[{i}].role `{}` is not a known role",
                m.role
            )));
        }
    }
    let max_out = match (req.max_completion_tokens, req.max_tokens) {
        (Some(0), _) | (None, Some(0)) => return Err(invalid("`max_tokens` must be at least 1")),
        (Some(n), _) | (None, Some(n)) => n,
        (None, None) => {
            // The reservation covers this many output tokens, so the node is
            // told to stop there.
            req.max_tokens = Some(cfg.default_max_tokens);
            cfg.default_max_tokens
        }
    };
    let stream = req.stream.unwrap_or(false);
    let caller_wants_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
    if stream {
        req.stream_options
            .get_or_insert_with(StreamOptions::default)
            .include_usage = true;
    }
    let text_bytes: u64 = req
        .messages
        .iter()
        .map(|m| m.text_len().map_or(0, |n| n as u64) + 16)
        .sum();
    let encoded = encode(&req)?;
    Ok(Prepared {
        route: Route::ChatCompletions,
        model: req.model,
        // A token is at least one byte, so the body's length bounds the input.
        bound: Meter {
            input_tokens: body.len() as u64,
            output_tokens: u64::from(max_out),
            units: 0,
        },
        fallback_input: ceil_div4(text_bytes),
        body: encoded,
        kind: if stream {
            AnswerKind::ChatSse { caller_wants_usage }
        } else {
            AnswerKind::Json(meter_chat)
        },
    })
}

fn meter_chat(prep: &Prepared, body: &[u8]) -> std::result::Result<Meter, String> {
    let r: ChatCompletionResponse =
        serde_json::from_slice(body).map_err(|e| format!("not a chat completion: {e}"))?;
    if r.choices.is_empty() {
        return Err("chat completion without choices".into());
    }
    let text: u64 = r
        .choices
        .iter()
        .filter_map(|c| c.message.text_len())
        .map(|n| n as u64)
        .sum();
    let m = match r.usage {
        Some(u) => Meter {
            input_tokens: u.prompt_tokens,
            output_tokens: u.completion_tokens,
            units: 0,
        },
        None => Meter {
            input_tokens: prep.fallback_input,
            output_tokens: ceil_div4(text),
            units: 0,
        },
    };
    Ok(m.clamp_to(prep.bound))
}

fn prepare_embeddings(body: &Bytes) -> Result<Prepared> {
    let req: EmbeddingsRequest = parse_body(body)?;
    if req.model.trim().is_empty() {
        return Err(invalid("`model` must not be empty"));
    }
    let (items, bytes, tokens) = match &req.input {
        EmbeddingInput::Text(t) => (1, t.len() as u64, 0),
        EmbeddingInput::Texts(v) => (v.len(), v.iter().map(|t| t.len() as u64).sum(), 0),
        EmbeddingInput::Tokens(v) => (usize::from(!v.is_empty()), 0, v.len() as u64),
        EmbeddingInput::TokenArrays(v) => (v.len(), 0, v.iter().map(|t| t.len() as u64).sum()),
    };
    if items == 0 || (bytes == 0 && tokens == 0) {
        return Err(invalid("`input` must not be empty"));
    }
    if items > 2048 {
        return Err(invalid("`input` has more than 2048 items"));
    }
    Ok(Prepared {
        route: Route::Embeddings,
        model: req.model,
        bound: Meter {
            input_tokens: bytes + tokens,
            output_tokens: 0,
            units: 0,
        },
        fallback_input: ceil_div4(bytes) + tokens,
        body: body.clone(),
        kind: AnswerKind::Json(meter_embeddings),
    })
}

fn meter_embeddings(prep: &Prepared, body: &[u8]) -> std::result::Result<Meter, String> {
    let r: EmbeddingsResponse =
        serde_json::from_slice(body).map_err(|e| format!("not an embeddings answer: {e}"))?;
    if r.data.is_empty() {
        return Err("embeddings answer without data".into());
    }
    let input = r.usage.map_or(prep.fallback_input, |u| u.prompt_tokens);
    Ok(Meter {
        input_tokens: input,
        output_tokens: 0,
        units: 0,
    }
    .clamp_to(prep.bound))
}
