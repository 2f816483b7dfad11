//! Chat completions: `POST /v1/chat/completions`.
//!
//! The node is a stranger's model server, so it receives a body rebuilt from
//! what the broker understood and priced, never the caller's body as it came:
//!
//! * exactly one output limit, the one reserved: `max_completion_tokens`
//!   when given, else `max_tokens`, else the configured default, sent in
//!   both fields (servers read one or the other);
//! * `n` choices up to [`BrokerConfig::max_choices`], each reserved as a
//!   whole completion; `best_of`, audio output and web search are refused;
//! * tools of type `function` (or `custom`) only, whose definitions are
//!   data, not something a server would call or fetch;
//! * content parts `text`, `image_url`, `input_audio` and `refusal`, each
//!   rebuilt from its known fields; an image is a checked `data:` URL or an
//!   `http(s)` URL passing the egress check, and is priced as
//!   [`BrokerConfig::image_input_tokens`] input tokens;
//! * of every other field, only the sampling options in [`PASSED`]: anything
//!   else (`n_predict`, `options`, `min_tokens`...) is dropped, since a
//!   server may read it as a limit or a fetch the price does not cover.

use bytes::Bytes;
use serde_json::{json, Map, Value};

use super::vision::{data_url, decode_inline_image};
use super::{ceil_div4, check_fetch_url, encode, invalid, parse_body, AnswerKind, Prepared};
use crate::broker::BrokerConfig;
use crate::error::{Error, Result};
use crate::pricing::Meter;
use crate::types::Route;
use crate::wire::*;

/// The request fields passed to the node as they are (beside those the
/// broker sets or checks itself): sampling and output-format options that
/// change neither how much is generated nor what the server reaches.
const PASSED: &[&str] = &[
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "logprobs",
    "seed",
    "stop",
    "response_format",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "reasoning_effort",
    "user",
];

/// The message fields passed to the node beside `role` and `content`.
const MESSAGE_FIELDS: &[&str] = &[
    "name",
    "tool_calls",
    "tool_call_id",
    "function_call",
    "refusal",
];

/// The most `top_logprobs` asked for (OpenAI's limit).
const MAX_TOP_LOGPROBS: u64 = 20;

/// What the content parts of a request hold besides text.
#[derive(Default)]
struct Inputs {
    /// Images, inline or by URL.
    images: u64,
    /// Bytes of the inline (`data:`) image URLs as the caller sent them:
    /// taken out of the body's length, since an image is priced per image.
    inline_bytes: u64,
}

/// `POST /v1/chat/completions`.
pub(super) fn prepare_chat(cfg: &BrokerConfig, body: &Bytes) -> Result<Prepared> {
    let mut req: ChatCompletionRequest = parse_body(body)?;
    let models = super::requested_models(&req.model, &req.models)?;
    req.model = models[0].clone();
    req.models.clear();
    if req.messages.is_empty() {
        return Err(invalid("`messages` must not be empty"));
    }
    let mut inputs = Inputs::default();
    for (i, m) in req.messages.iter_mut().enumerate() {
        check_message(cfg, i, m, &mut inputs)?;
    }
    let choices = check_options(cfg, &mut req.extra)?;
    let per_choice = match (req.max_completion_tokens, req.max_tokens) {
        (Some(0), _) => return Err(invalid("`max_completion_tokens` must be at least 1")),
        (None, Some(0)) => return Err(invalid("`max_tokens` must be at least 1")),
        (Some(n), _) | (None, Some(n)) => n,
        (None, None) => cfg.default_max_tokens,
    };
    // The reservation covers this many output tokens per choice, so the node
    // is told to stop there in both fields: servers read one or the other,
    // and neither may say more than was reserved.
    req.max_tokens = Some(per_choice);
    req.max_completion_tokens = Some(per_choice);
    let stream = req.stream.unwrap_or(false);
    let caller_wants_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
    if stream {
        req.stream_options
            .get_or_insert_with(StreamOptions::default)
            .include_usage = true;
    }
    let image_tokens = inputs.images.saturating_mul(cfg.image_input_tokens);
    let text_bytes: u64 = req
        .messages
        .iter()
        .map(|m| m.text_len().map_or(0, |n| n as u64) + 16)
        .sum();
    let encoded = encode(&req)?;
    Ok(Prepared {
        route: Route::ChatCompletions,
        model: req.model,
        models,
        bound: Meter {
            // A token of text is at least one byte, so the body's length
            // bounds the text; an image counts as its flat figure instead of
            // its bytes.
            input_tokens: (body.len() as u64)
                .saturating_sub(inputs.inline_bytes)
                .saturating_add(image_tokens),
            output_tokens: u64::from(per_choice).saturating_mul(u64::from(choices)),
            units: 0,
        },
        fallback_input: ceil_div4(text_bytes).saturating_add(image_tokens),
        body: encoded,
        kind: if stream {
            AnswerKind::ChatSse { caller_wants_usage }
        } else {
            AnswerKind::Json(meter_chat)
        },
    })
}

/// Checks the request's other fields, keeps those the node may see, and
/// returns the number of choices asked for.
fn check_options(cfg: &BrokerConfig, extra: &mut Map<String, Value>) -> Result<u32> {
    // `null` is the same as absent.
    extra.retain(|_, v| !v.is_null());
    if extra.contains_key("audio") {
        return Err(invalid("`audio` output is not supported: answers are text"));
    }
    if let Some(m) = extra.get("modalities") {
        let text_only = m
            .as_array()
            .is_some_and(|a| a.iter().all(|x| x.as_str() == Some("text")));
        if !text_only {
            return Err(invalid("`modalities`: only `text` is supported"));
        }
    }
    if extra.contains_key("web_search_options") {
        return Err(invalid(
            "web search (`web_search_options`) is not supported",
        ));
    }
    if let Some(b) = extra.get("best_of") {
        if b.as_u64() != Some(1) {
            return Err(invalid(
                "`best_of` is not supported: ask for `n` choices instead",
            ));
        }
    }
    let choices = match extra.get("n") {
        None => 1,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=u64::from(cfg.max_choices)).contains(&n) => n as u32,
            _ => {
                return Err(invalid(format!(
                    "`n` must be a whole number from 1 to {}",
                    cfg.max_choices
                )))
            }
        },
    };
    if let Some(t) = extra.get("top_logprobs") {
        if t.as_u64().is_none_or(|t| t > MAX_TOP_LOGPROBS) {
            return Err(invalid(format!(
                "`top_logprobs` must be a whole number from 0 to {MAX_TOP_LOGPROBS}"
            )));
        }
    }
    if let Some(tools) = extra.get("tools") {
        let tools = tools
            .as_array()
            .ok_or_else(|| invalid("`tools` must be an array"))?;
        for (i, t) in tools.iter().enumerate() {
            let kind = t.get("type").and_then(Value::as_str);
            if !matches!(kind, Some("function" | "custom")) {
                return Err(invalid(format!(
                    "tools[{i}]: only `function` and `custom` tools are supported"
                )));
            }
        }
    }
    extra.retain(|k, _| {
        PASSED.contains(&k.as_str()) || matches!(k.as_str(), "n" | "top_logprobs" | "tools")
    });
    Ok(choices)
}

/// Checks one message and rebuilds its content parts.
fn check_message(
    cfg: &BrokerConfig,
    i: usize,
    m: &mut ChatMessage,
    inputs: &mut Inputs,
) -> Result<()> {
    if !matches!(
        m.role.as_str(),
        "system" | "user" | "assistant" | "tool" | "developer" | "function"
    ) {
        return Err(invalid(format!(
            "messages[{i}].role `{}` is not a known role",
            m.role
        )));
    }
    m.extra.retain(|k, _| MESSAGE_FIELDS.contains(&k.as_str()));
    if let Some(MessageContent::Parts(parts)) = &mut m.content {
        for (j, part) in parts.iter_mut().enumerate() {
            *part = check_part(cfg, &format!("messages[{i}].content[{j}]"), part, inputs)?;
        }
    }
    Ok(())
}

/// A content part rebuilt from its known fields, images checked and counted.
fn check_part(cfg: &BrokerConfig, at: &str, part: &Value, inputs: &mut Inputs) -> Result<Value> {
    let field = |name: &str| part.get(name);
    let text_of = |name: &str| {
        field(name)
            .and_then(Value::as_str)
            .ok_or_else(|| invalid(format!("{at}: a `{name}` part needs `{name}` text")))
    };
    match field("type").and_then(Value::as_str) {
        Some("text") => Ok(json!({"type": "text", "text": text_of("text")?})),
        Some("refusal") => Ok(json!({"type": "refusal", "refusal": text_of("refusal")?})),
        Some("image_url") => {
            let (url, detail) = match field("image_url") {
                Some(Value::String(u)) => (u.as_str(), None),
                Some(Value::Object(o)) => (
                    o.get("url").and_then(Value::as_str).unwrap_or_default(),
                    o.get("detail").filter(|d| !d.is_null()),
                ),
                _ => ("", None),
            };
            if url.trim().is_empty() {
                return Err(invalid(format!("{at}: `image_url` needs a `url`")));
            }
            inputs.images += 1;
            if inputs.images > cfg.max_images as u64 {
                return Err(invalid(format!(
                    "a request may carry at most {} images",
                    cfg.max_images
                )));
            }
            let url = image_url(cfg, at, url, inputs)?;
            let mut image = json!({ "url": url });
            if let Some(d) = detail {
                if !matches!(d.as_str(), Some("auto" | "low" | "high")) {
                    return Err(invalid(format!(
                        "{at}: `detail` must be `auto`, `low` or `high`"
                    )));
                }
                image["detail"] = d.clone();
            }
            Ok(json!({"type": "image_url", "image_url": image}))
        }
        Some("input_audio") => {
            let audio = field("input_audio");
            let get = |k: &str| audio.and_then(|a| a.get(k)).and_then(Value::as_str);
            match (get("data"), get("format")) {
                (Some(data), Some(format)) => Ok(json!({"type": "input_audio",
                    "input_audio": {"data": data, "format": format}})),
                _ => Err(invalid(format!(
                    "{at}: `input_audio` needs base64 `data` and a `format`"
                ))),
            }
        }
        Some(other) => Err(invalid(format!(
            "{at}: content part type `{other}` is not supported \
             (text, image_url, input_audio, refusal)"
        ))),
        None => Err(invalid(format!("{at}: a content part needs a `type`"))),
    }
}

/// An image URL as the node receives it: a `data:` URL decoded, capped,
/// checked to be an image and re-encoded, or an `http(s)` URL that passes
/// the egress check (the node fetches it through its own guard).
fn image_url(cfg: &BrokerConfig, at: &str, url: &str, inputs: &mut Inputs) -> Result<String> {
    if url.trim_start().starts_with("data:") {
        let (mime, bytes) = decode_inline_image(url, MAX_IMAGE_BYTES).map_err(|e| match e {
            Error::InvalidInput(m) => invalid(format!("{at}: {m}")),
            other => other,
        })?;
        inputs.inline_bytes = inputs.inline_bytes.saturating_add(url.len() as u64);
        return Ok(data_url(mime, &bytes));
    }
    Ok(check_fetch_url(cfg, url, &format!("{at}.image_url"))?.to_string())
}

/// The bytes of what a message of an answer produced: its text and every
/// other string it carries (tool calls' arguments, reasoning...).
fn output_bytes(m: &ChatMessage) -> u64 {
    fn strings(v: &Value) -> u64 {
        match v {
            Value::String(s) => s.len() as u64,
            Value::Array(a) => a.iter().map(strings).sum(),
            Value::Object(o) => o.values().map(strings).sum(),
            _ => 0,
        }
    }
    m.text_len().map_or(0, |n| n as u64) + m.extra.values().map(strings).sum::<u64>()
}

/// Every choice of a complete answer, metered and clamped to the bounds: a
/// node that ignored the limit gives the excess away (the charge, and with
/// it the reward, never exceed the reservation).
fn meter_chat(prep: &Prepared, body: &[u8]) -> std::result::Result<Meter, String> {
    let r: ChatCompletionResponse =
        serde_json::from_slice(body).map_err(|e| format!("not a chat completion: {e}"))?;
    if r.choices.is_empty() {
        return Err("chat completion without choices".into());
    }
    let m = match r.usage {
        Some(u) => Meter {
            input_tokens: u.prompt_tokens,
            output_tokens: u.completion_tokens,
            units: 0,
        },
        None => Meter {
            input_tokens: prep.fallback_input,
            output_tokens: ceil_div4(r.choices.iter().map(|c| output_bytes(&c.message)).sum()),
            units: 0,
        },
    };
    Ok(m.clamp_to(prep.bound))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PNG_B64: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==";

    fn prep(v: Value) -> Result<Prepared> {
        prepare_chat(&BrokerConfig::default(), &Bytes::from(v.to_string()))
    }

    fn sent(p: &Prepared) -> Value {
        serde_json::from_slice(&p.body).unwrap()
    }

    fn user(content: Value) -> Value {
        json!({"model": "m", "messages": [{"role": "user", "content": content}]})
    }

    #[test]
    fn the_node_gets_the_reserved_limit_in_both_fields_and_n_is_priced() {
        let mut body = user(json!("hi"));
        body["max_completion_tokens"] = json!(1);
        body["max_tokens"] = json!(2000);
        body["n_predict"] = json!(100_000);
        body["options"] = json!({"num_predict": 100_000});
        let p = prep(body.clone()).unwrap();
        let s = sent(&p);
        assert_eq!(
            (s["max_tokens"].clone(), s["max_completion_tokens"].clone()),
            (json!(1), json!(1))
        );
        assert!(
            s.get("n_predict").is_none() && s.get("options").is_none(),
            "{s}"
        );
        assert_eq!(p.bound.output_tokens, 1);

        body["n"] = json!(3);
        let p = prep(body.clone()).unwrap();
        assert_eq!(
            (p.bound.output_tokens, sent(&p)["n"].clone()),
            (3, json!(3))
        );
        for bad in [json!(0), json!(9), json!(1.5), json!("2")] {
            body["n"] = bad.clone();
            let e = prep(body.clone()).unwrap_err();
            assert!(e.to_string().contains("`n`"), "{bad}: {e}");
        }
        let dflt = prep(user(json!("hi"))).unwrap();
        assert_eq!(dflt.bound.output_tokens, 4096);
        assert_eq!(sent(&dflt)["max_tokens"], 4096);
    }

    #[test]
    fn work_the_price_does_not_cover_is_refused_or_dropped() {
        for (field, value) in [
            ("best_of", json!(4)),
            ("audio", json!({"voice": "alloy", "format": "wav"})),
            ("modalities", json!(["text", "audio"])),
            ("web_search_options", json!({})),
            (
                "tools",
                json!([{"type": "mcp", "server_url": "http://169.254.169.254/"}]),
            ),
            ("top_logprobs", json!(1000)),
        ] {
            let mut body = user(json!("hi"));
            body[field] = value;
            assert!(prep(body).is_err(), "{field}");
        }
        let mut body = user(json!("hi"));
        body["tools"] = json!([{"type": "function", "function": {"name": "f"}}]);
        body["temperature"] = json!(0.5);
        body["top_k"] = json!(40);
        body["min_tokens"] = json!(500);
        body["store"] = json!(true);
        body["messages"][0]["images"] = json!(["http://169.254.169.254/"]);
        let s = sent(&prep(body).unwrap());
        assert_eq!(s["tools"][0]["type"], "function");
        assert_eq!(
            (s["temperature"].clone(), s["top_k"].clone()),
            (json!(0.5), json!(40))
        );
        assert!(
            s.get("min_tokens").is_none() && s.get("store").is_none(),
            "{s}"
        );
        assert!(s["messages"][0].get("images").is_none(), "{s}");
    }

    #[test]
    fn images_are_checked_rebuilt_and_priced_flat() {
        let data = format!("data:image/png;base64,{PNG_B64}");
        let body = user(json!([
            {"type": "text", "text": "what is it?"},
            {"type": "image_url", "image_url": {"url": data, "detail": "low", "x": 1}},
            {"type": "image_url", "image_url": "https://images.example/cat.png"},
        ]));
        let p = prep(body.clone()).unwrap();
        let len = body.to_string().len() as u64;
        assert_eq!(p.bound.input_tokens, len - data.len() as u64 + 2 * 1024);
        let s = sent(&p);
        let parts = &s["messages"][0]["content"];
        assert_eq!(
            parts[1],
            json!({"type": "image_url", "image_url": {"url": data, "detail": "low"}})
        );
        assert_eq!(
            parts[2]["image_url"]["url"],
            "https://images.example/cat.png"
        );
        for bad in [
            json!({"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest"}}),
            json!({"type": "image_url", "image_url": {"url": "http://metadata.google.internal/x"}}),
            json!({"type": "image_url", "image_url": {"url": "http://[::1]/x.png"}}),
            json!({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}),
            json!({"type": "image_url", "image_url": {"url": "data:text/html;base64,PGgxPg=="}}),
            json!({"type": "image_url", "image_url": {}}),
            json!({"type": "video_url", "video_url": {"url": "https://a.example/v.mp4"}}),
            json!({"type": "text"}),
        ] {
            assert!(prep(user(json!([bad.clone()]))).is_err(), "{bad}");
        }
        let many: Vec<Value> = (0..9)
            .map(|_| json!({"type": "image_url", "image_url": {"url": "https://a.example/x.png"}}))
            .collect();
        assert!(prep(user(Value::Array(many))).is_err());
    }

    #[test]
    fn every_choice_and_tool_call_is_metered_without_usage() {
        let mut body = user(json!("hi"));
        body["n"] = json!(2);
        body["max_tokens"] = json!(100);
        let p = prep(body).unwrap();
        let answer = json!({"choices": [
            {"index": 0, "message": {"role": "assistant", "content": "abcdefgh"}},
            {"index": 1, "message": {"role": "assistant", "content": null,
                "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}},
        ]});
        let m = meter_chat(&p, answer.to_string().as_bytes()).unwrap();
        // 8 + ("c" + "function" + "f" + "{}") = 20 bytes: 5 tokens.
        assert_eq!(m.output_tokens, 5);
    }
}
