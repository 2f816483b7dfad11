//! What is particular to each gateway route: how its body is validated, what
//! it may consume at most (for the reservation), what is sent to the node,
//! and how the node's answer is checked and metered.
//!
//! Everything else (auth, reservation, selection, failover, streaming,
//! settling, usage) is one generic path in [`crate::broker`]. Adding a route
//! means adding a `prepare_*` function here and an arm in `prepare`.
//!
//! | route | service | pool model | metered as |
//! |---|---|---|---|
//! | `/v1/chat/completions` | chat | `model` | input and output tokens (an image: a flat figure) |
//! | `/v1/embeddings` | embeddings | `model` | input tokens |
//! | `/v1/audio/speech` | tts | `model` | units: characters spoken |
//! | `/v1/tts` | tts | `model`, else `kokoro` | units: characters spoken |
//! | `/v1/scrape` | scrape | `model`, else `default` | units: URLs fetched |
//! | `/v1/m/{caption,query,detect,point}` | vision | `model`, else `moondream` | units: one image |
//!
//! Each is then charged by the price table: `per_request` plus the per-million
//! rates of what was metered.
//!
//! The public items are the rules a provider node (the `cxmpute-node` crate)
//! applies again to what it is sent: JSON bodies, inline images, speech text
//! and voices. One definition keeps the broker and its nodes agreeing on what
//! a valid request is.

use bytes::Bytes;

use crate::broker::BrokerConfig;
use crate::egress::{self, AddressFilter};
use crate::error::{Error, Result};
use crate::pricing::Meter;
use crate::types::Route;
use crate::wire::*;

mod chat;
mod scrape;
mod speech;
mod vision;

pub use speech::{check_speech_text, espeak_voice};
pub use vision::{data_url, decode_inline_image, sniff_image};

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
    /// The pool's model name: the model being tried, the one `body` names.
    pub model: String,
    /// Every name the request gave, in order (see [`requested_models`]);
    /// the first is `model` until the broker resolves aliases.
    pub models: Vec<String>,
    /// The body sent to the node.
    pub body: Bytes,
    /// How the answer is checked and metered.
    pub kind: AnswerKind,
    /// Upper bounds of what the request can consume: what was reserved, and
    /// the most a node's answer is metered as. For chat, `output_tokens` is
    /// every choice's output together (the limit sent to the node times
    /// `n`): a stream must not pass on more.
    pub bound: Meter,
    /// The input tokens assumed when a node reports none.
    pub fallback_input: u64,
}

/// A 400 with a message.
pub(crate) fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidInput(msg.into())
}

/// Parses a JSON body with a clear 400 ([`Error::InvalidInput`]) on failure.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T> {
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

/// The most models a request may name: `model` and `models` together,
/// counted once each, and again after aliases are resolved.
pub(crate) const MAX_MODELS: usize = 4;

/// The models a request names, in the order they are tried: `model` first
/// when given (as OpenRouter does), then `models`. Each is checked like
/// `model` ([`check_model`]); a name given twice keeps its first place (a
/// client repeating `model` in `models` is common and harmless). Refused
/// (400): no name at all, an empty or invalid one, more than [`MAX_MODELS`].
pub(crate) fn requested_models(model: &str, models: &[String]) -> Result<Vec<String>> {
    if models.len() > MAX_MODELS {
        return Err(invalid(format!(
            "`models` may name at most {MAX_MODELS} models"
        )));
    }
    let mut out: Vec<String> = Vec::with_capacity(models.len() + 1);
    if !model.trim().is_empty() || models.is_empty() {
        out.push(check_model(model)?);
    }
    for (i, m) in models.iter().enumerate() {
        let m = check_model(m).map_err(|_| {
            invalid(format!(
                "`models[{i}]` must be a model name (not empty, at most 200 characters)"
            ))
        })?;
        if !out.contains(&m) {
            out.push(m);
        }
    }
    if out.len() > MAX_MODELS {
        return Err(invalid(format!(
            "`model` and `models` together may name at most {MAX_MODELS} models"
        )));
    }
    Ok(out)
}

/// `body` (a JSON object the broker encoded) naming `model`: what is sent
/// to a node of another model than the one first prepared (a fallback, or
/// what an alias stands for). Only the model being tried is named.
pub(crate) fn with_model(body: &Bytes, model: &str) -> Result<Bytes> {
    let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(body)
        .map_err(|e| Error::backend("re-reading a prepared body", e))?;
    v.remove("models");
    v.insert("model".into(), serde_json::Value::String(model.to_owned()));
    encode(&v)
}

/// Checks a URL a caller gives for a node to fetch (an image): `http(s)`,
/// at most [`MAX_URL_LEN`] long, and not pointing at a private place as far
/// as can be told without resolving it: a literal address must pass
/// [`BrokerConfig::url_egress`] and, unless that allows private addresses,
/// a name that can only be local (`localhost`, `metadata.google.internal`)
/// is refused. The node resolves and checks a name again when it fetches it.
pub(crate) fn check_fetch_url(cfg: &BrokerConfig, url: &str, field: &str) -> Result<reqwest::Url> {
    let u = url.trim();
    if u.len() > MAX_URL_LEN {
        return Err(invalid(format!(
            "`{field}` is longer than {MAX_URL_LEN} characters"
        )));
    }
    let url = egress::parse_http_url(u).map_err(|e| match e {
        Error::InvalidInput(m) => invalid(format!("`{field}`: {m}")),
        other => other,
    })?;
    let rules = &cfg.url_egress;
    match egress::literal_ip(&url) {
        Some(ip) if !rules.permits_ip(ip) => {
            Err(invalid(format!("`{field}`: {ip} is not a public address")))
        }
        None if rules.base == egress::EgressPolicy::PublicOnly
            && url.host_str().is_some_and(egress::is_local_name) =>
        {
            Err(invalid(format!(
                "`{field}`: `{}` is not a public host name",
                url.host_str().unwrap_or_default()
            )))
        }
        _ => Ok(url),
    }
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
        Route::ChatCompletions => chat::prepare_chat(cfg, body),
        Route::Embeddings => prepare_embeddings(body),
        Route::AudioSpeech => speech::prepare_speech(body),
        Route::Tts => speech::prepare_tts(body),
        Route::Scrape => scrape::prepare_scrape(body),
        Route::Caption | Route::Query | Route::Detect | Route::Point => {
            vision::prepare_vision(cfg, route, body)
        }
    }
}

/// The embeddings request fields passed to the node beside `model` and
/// `input`: none of them adds work. Any other (a server's own options) is
/// dropped.
const EMBEDDING_FIELDS: &[&str] = &["encoding_format", "dimensions", "user"];

fn prepare_embeddings(body: &Bytes) -> Result<Prepared> {
    let mut req: EmbeddingsRequest = parse_body(body)?;
    let models = requested_models(&req.model, &req.models)?;
    req.model = models[0].clone();
    req.models.clear();
    req.extra
        .retain(|k, v| EMBEDDING_FIELDS.contains(&k.as_str()) && !v.is_null());
    if let Some(f) = req.extra.get("encoding_format") {
        if !matches!(f.as_str(), Some("float" | "base64")) {
            return Err(invalid("`encoding_format` must be `float` or `base64`"));
        }
    }
    if let Some(d) = req.extra.get("dimensions") {
        if !d
            .as_u64()
            .is_some_and(|d| (1..=u64::from(u32::MAX)).contains(&d))
        {
            return Err(invalid("`dimensions` must be a whole number of at least 1"));
        }
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
    let encoded = encode(&req)?;
    Ok(Prepared {
        route: Route::Embeddings,
        model: req.model,
        models,
        bound: Meter {
            input_tokens: bytes + tokens,
            output_tokens: 0,
            units: 0,
        },
        fallback_input: ceil_div4(bytes) + tokens,
        body: encoded,
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
