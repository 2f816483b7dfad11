//! What canary calls send and how their answers are read.
//!
//! A canary must look like a user's call: the same route and body shape as
//! callers send, content varied from call to call (drawn from common words
//! and everyday request templates), no marker. Every node of a pool gets the
//! same content in one round, so their answers can be compared.

use rand::seq::IndexedRandom;
use rand::Rng;
use serde_json::{json, Value};

/// Common words canary content is drawn from.
const WORDS: &[&str] = &[
    "river", "market", "garden", "winter", "engine", "letter", "window", "forest", "silver",
    "harbor", "library", "kitchen", "mountain", "bridge", "candle", "planet", "travel", "summer",
    "music", "paper", "island", "coffee", "morning", "station", "village", "storm", "teacher",
    "bicycle", "orange", "museum", "ticket", "pocket", "castle", "meadow", "signal", "cloud",
    "farmer", "doctor", "camera", "desert", "ocean", "valley", "painter", "airport", "blanket",
    "recipe", "budget", "holiday", "program", "weather", "history", "puzzle", "journey",
    "festival", "battery", "factory", "lantern", "market", "harvest", "stone", "quiet", "bright",
    "ancient", "gentle", "rapid", "simple", "careful", "early", "narrow", "golden", "hidden",
];

/// Request templates a person might send; `{}` is filled with a phrase.
const CHAT_TEMPLATES: &[&str] = &[
    "Write one sentence about {}.",
    "Summarize in a few words: {}",
    "Give a short title for a story about {}.",
    "Explain briefly what links {}.",
    "Translate to French: {}",
    "List three facts about {}.",
    "Describe {} in one line.",
];

/// A phrase of `lo..=hi` random common words.
fn phrase(rng: &mut impl Rng, lo: usize, hi: usize) -> String {
    let n = rng.random_range(lo..=hi);
    (0..n)
        .map(|_| *WORDS.choose(rng).unwrap_or(&"river"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Text to embed: a sentence of everyday words.
pub(crate) fn embedding_text(rng: &mut impl Rng) -> String {
    let mut s = phrase(rng, 5, 14);
    if let Some(c) = s.get_mut(0..1) {
        c.make_ascii_uppercase();
    }
    s.push('.');
    s
}

/// A chat prompt from a template.
pub(crate) fn chat_prompt(rng: &mut impl Rng) -> String {
    let t = CHAT_TEMPLATES.choose(rng).unwrap_or(&"{}");
    t.replacen("{}", &phrase(rng, 2, 6), 1)
}

/// The body of an embeddings call for `input`.
pub(crate) fn embedding_body(model: &str, input: &str) -> Value {
    json!({"model": model, "input": input})
}

/// The body of a chat call at temperature 0 with `seed`, so nodes of one
/// model answer alike, with a modest output limit (what the call costs);
/// streamed or not, as users call.
pub(crate) fn chat_body(
    model: &str,
    prompt: &str,
    seed: u32,
    max_tokens: u32,
    stream: bool,
) -> Value {
    let mut b = json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "seed": seed,
        "max_tokens": max_tokens,
    });
    if stream {
        b["stream"] = Value::Bool(true);
    }
    b
}

/// The text of a streamed chat answer: its first choice's content deltas
/// joined (`None`: no content event could be read).
pub(crate) fn chat_stream_text_of(body: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    let mut out: Option<String> = None;
    for line in text.lines() {
        let Some(data) = line.strip_prefix("data:").map(str::trim) else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            continue;
        };
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            out.get_or_insert_with(String::new).push_str(c);
        }
    }
    out
}

/// Voices speech canaries use: common ones, so a canary's voice says nothing.
const VOICES: &[&str] = &[
    "af_bella", "af_heart", "am_adam", "alloy", "nova", "bf_emma",
];

/// The body of a speech call (`POST /v1/audio/speech`) for `text`, in the
/// default format (WAV), with a common voice.
pub(crate) fn speech_body(model: &str, text: &str, rng: &mut impl Rng) -> Value {
    let voice = VOICES.choose(rng).unwrap_or(&"alloy");
    json!({"model": model, "input": text, "voice": voice})
}

/// The duration in seconds of the PCM samples a WAV file holds, counted
/// from the bytes present (a header claiming more than was sent counts for
/// nothing); `None` when it is not a 16-bit-or-wider PCM WAV.
pub(crate) fn wav_seconds(audio: &[u8]) -> Option<f64> {
    if audio.len() < 12 || &audio[0..4] != b"RIFF" || &audio[8..12] != b"WAVE" {
        return None;
    }
    let (mut at, mut bytes_per_second) = (12usize, None);
    while at + 8 <= audio.len() {
        let id = &audio[at..at + 4];
        let size = u32::from_le_bytes(audio[at + 4..at + 8].try_into().ok()?) as usize;
        let body = at + 8;
        if id == b"fmt " {
            let f = audio.get(body..body + 16)?;
            let format = u16::from_le_bytes([f[0], f[1]]);
            let channels = u64::from(u16::from_le_bytes([f[2], f[3]]));
            let rate = u64::from(u32::from_le_bytes([f[4], f[5], f[6], f[7]]));
            let bits = u64::from(u16::from_le_bytes([f[14], f[15]]));
            if format != 1 || channels == 0 || rate == 0 || bits < 8 {
                return None;
            }
            bytes_per_second = Some(rate * channels * bits.div_ceil(8));
        } else if id == b"data" {
            let present = audio.len().saturating_sub(body).min(size);
            return Some(present as f64 / bytes_per_second? as f64);
        }
        at = body.checked_add(size)?.checked_add(size % 2)?;
    }
    None
}

/// The text of a canary page: three paragraphs of common words.
pub(crate) fn page_text(rng: &mut impl Rng) -> String {
    (0..3)
        .map(|_| embedding_text(rng))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A plain HTML page holding `text`, a paragraph per line, with a title
/// from its first words.
pub(crate) fn page_html(text: &str) -> String {
    let title: String = text
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    let paras: String = text.lines().map(|l| format!("<p>{l}</p>\n")).collect();
    format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title></head>\n\
         <body>\n{paras}</body></html>\n"
    )
}

/// The body of a scrape call for one URL, in a format drawn at random.
pub(crate) fn scrape_body(model: &str, url: &str, rng: &mut impl Rng) -> Value {
    let format = ["html", "markdown", "text"].choose(rng).unwrap_or(&"text");
    json!({"model": model, "urls": [url], "format": format})
}

/// The content a scrape answer gives for its only URL: `Err(())` when the
/// answer is not a scrape answer, `Ok(None)` when the node says it could
/// not fetch the page.
pub(crate) fn scraped_content(body: &[u8]) -> Result<Option<String>, ()> {
    let r: crate::wire::ScrapeResponse = serde_json::from_slice(body).map_err(|_| ())?;
    let first = r.results.into_iter().next().ok_or(())?;
    Ok(first.success.then_some(first.content).flatten())
}

/// The first vector of an embeddings answer (`None`: not one).
pub(crate) fn embedding_of(body: &[u8]) -> Option<Vec<f64>> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let e = v.get("data")?.get(0)?.get("embedding")?.as_array()?;
    e.iter().map(Value::as_f64).collect()
}

/// The text of a chat answer's first choice (`None`: not one).
pub(crate) fn chat_text_of(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let c = v.get("choices")?.get(0)?.get("message")?.get("content")?;
    c.as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn canary_content_varies_and_answers_parse() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let texts: std::collections::HashSet<String> =
            (0..50).map(|_| embedding_text(&mut rng)).collect();
        assert!(texts.len() >= 49, "content varies: {}", texts.len());
        let p = chat_prompt(&mut rng);
        assert!(!p.contains("{}"));
        let body = br#"{"data":[{"embedding":[0.5,-1,2]}]}"#;
        assert_eq!(embedding_of(body), Some(vec![0.5, -1.0, 2.0]));
        assert_eq!(embedding_of(br#"{"data":[{"embedding":["x"]}]}"#), None);
        let chat = br#"{"choices":[{"message":{"content":"hi there"}}]}"#;
        assert_eq!(chat_text_of(chat).as_deref(), Some("hi there"));
        assert_eq!(chat_text_of(b"nope"), None);
        let sse = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n\
                    data: {\"choices\":[{\"delta\":{\"content\":\" there\"}}]}\n\n\
                    data: {\"choices\":[],\"usage\":{}}\n\ndata: [DONE]\n\n";
        assert_eq!(chat_stream_text_of(sse).as_deref(), Some("hi there"));
        assert_eq!(chat_stream_text_of(b"data: [DONE]\n\n"), None);
    }

    #[cfg(feature = "testkit")]
    #[test]
    fn a_wavs_duration_counts_the_samples_sent() {
        let wav = crate::testkit::wav(24_000, 48_000);
        assert_eq!(wav_seconds(&wav), Some(2.0));
        // Cut short: the header still claims 2 s.
        assert_eq!(wav_seconds(&wav[..44 + 24_000]), Some(0.5));
        assert_eq!(wav_seconds(b"ID3\x03 not a wav"), None);
        assert_eq!(wav_seconds(&wav[..20]), None);
    }
}
