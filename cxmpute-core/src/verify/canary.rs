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
/// model answer alike, with a modest output limit (what the call costs).
pub(crate) fn chat_body(model: &str, prompt: &str, seed: u32, max_tokens: u32) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "seed": seed,
        "max_tokens": max_tokens,
    })
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
    }
}
