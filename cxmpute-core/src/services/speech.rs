//! Text to speech: OpenAI's `/v1/audio/speech` and the original `/v1/tts`.
//!
//! Both are answered with audio bytes streamed through
//! ([`AnswerKind::Binary`]) and metered as the characters to speak, known
//! before the node starts: a node cannot inflate them.

use bytes::Bytes;

use super::{check_model, encode, invalid, parse_body, AnswerKind, Prepared};
use crate::error::Result;
use crate::pricing::Meter;
use crate::types::Route;
use crate::wire::*;

/// The voices the speech routes accept, and the espeak-ng voice each is
/// rendered with by the node's built-in backend.
///
/// Kokoro names are `<language><gender>_<name>`: the language letter picks
/// the espeak language, the gender letter its female or male variant. The
/// OpenAI names map onto American English variants.
const VOICES: &[(&str, &str)] = &[
    // Kokoro, American English.
    ("af_alloy", "en-us+f2"),
    ("af_aoede", "en-us+f4"),
    ("af_bella", "en-us+f3"),
    ("af_heart", "en-us+f5"),
    ("af_jessica", "en-us+f2"),
    ("af_kore", "en-us+f4"),
    ("af_nicole", "en-us+f1"),
    ("af_nova", "en-us+f5"),
    ("af_river", "en-us+f2"),
    ("af_sarah", "en-us+f1"),
    ("af_sky", "en-us+f4"),
    ("am_adam", "en-us+m3"),
    ("am_echo", "en-us+m1"),
    ("am_eric", "en-us+m2"),
    ("am_fenrir", "en-us+m4"),
    ("am_liam", "en-us+m5"),
    ("am_michael", "en-us+m1"),
    ("am_onyx", "en-us+m6"),
    ("am_puck", "en-us+m7"),
    ("am_santa", "en-us+m8"),
    // Kokoro, British English.
    ("bf_alice", "en-gb+f1"),
    ("bf_emma", "en-gb+f3"),
    ("bf_isabella", "en-gb+f2"),
    ("bf_lily", "en-gb+f4"),
    ("bm_daniel", "en-gb+m1"),
    ("bm_fable", "en-gb+m2"),
    ("bm_george", "en-gb+m3"),
    ("bm_lewis", "en-gb+m4"),
    // Kokoro, other languages.
    ("ef_dora", "es+f3"),
    ("em_alex", "es+m3"),
    ("em_santa", "es+m4"),
    ("ff_siwis", "fr-fr+f3"),
    ("hf_alpha", "hi+f3"),
    ("hf_beta", "hi+f4"),
    ("hm_omega", "hi+m3"),
    ("hm_psi", "hi+m4"),
    ("if_sara", "it+f3"),
    ("im_nicola", "it+m3"),
    ("jf_alpha", "ja+f3"),
    ("jf_gongitsune", "ja+f4"),
    ("jm_kumo", "ja+m3"),
    ("pf_dora", "pt-br+f3"),
    ("pm_alex", "pt-br+m3"),
    ("pm_santa", "pt-br+m4"),
    ("zf_xiaobei", "cmn+f3"),
    ("zf_xiaoni", "cmn+f4"),
    ("zm_yunjian", "cmn+m3"),
    ("zm_yunxi", "cmn+m4"),
    // OpenAI.
    ("alloy", "en-us+f2"),
    ("ash", "en-us+m2"),
    ("ballad", "en-us+m4"),
    ("coral", "en-us+f4"),
    ("echo", "en-us+m1"),
    ("fable", "en-gb+m2"),
    ("nova", "en-us+f5"),
    ("onyx", "en-us+m6"),
    ("sage", "en-us+f1"),
    ("shimmer", "en-us+f3"),
    ("verse", "en-us+m3"),
];

/// The espeak-ng voice a speech voice name is rendered with; `None` for a
/// voice nobody serves.
pub fn espeak_voice(name: &str) -> Option<&'static str> {
    let name = name.trim();
    VOICES
        .iter()
        .find(|(v, _)| v.eq_ignore_ascii_case(name))
        .map(|(_, e)| *e)
}

fn check_voice(voice: &str) -> Result<()> {
    if espeak_voice(voice).is_none() {
        let shown: String = voice.chars().take(40).collect();
        return Err(invalid(format!(
            "unknown voice `{shown}`: use a Kokoro voice (e.g. `af_bella`, `am_adam`, \
             `bf_emma`, `bm_george`) or an OpenAI voice (e.g. `alloy`, `nova`)"
        )));
    }
    Ok(())
}

/// Checks the text to speak (not blank, at most [`MAX_SPEECH_CHARS`]
/// characters, no NUL); returns its length in characters. `field` names it in
/// the error.
pub fn check_speech_text(text: &str, field: &str) -> Result<u64> {
    if text.trim().is_empty() {
        return Err(invalid(format!("`{field}` must not be empty")));
    }
    let chars = text.chars().count();
    if chars > MAX_SPEECH_CHARS {
        return Err(invalid(format!(
            "`{field}` has {chars} characters; at most {MAX_SPEECH_CHARS} are allowed"
        )));
    }
    if text.contains('\0') {
        return Err(invalid(format!(
            "`{field}` must not contain NUL characters"
        )));
    }
    Ok(chars as u64)
}

fn speech(route: Route, model: String, body: Bytes, chars: u64) -> Prepared {
    Prepared {
        route,
        models: vec![model.clone()],
        model,
        body,
        kind: AnswerKind::Binary,
        bound: Meter {
            input_tokens: 0,
            output_tokens: 0,
            units: chars,
        },
        fallback_input: 0,
    }
}

/// `POST /v1/audio/speech`.
pub(super) fn prepare_speech(body: &Bytes) -> Result<Prepared> {
    let mut req: SpeechRequest = parse_body(body)?;
    let model = check_model(&req.model)?;
    let chars = check_speech_text(&req.input, "input")?;
    check_voice(&req.voice)?;
    if let Some(speed) = req.speed {
        if !(0.25..=4.0).contains(&speed) {
            return Err(invalid("`speed` must be between 0.25 and 4.0"));
        }
    }
    let instructions = check_instructions(&mut req.extra)?;
    req.model = model.clone();
    req.response_format = Some(req.response_format.unwrap_or_default());
    Ok(speech(
        Route::AudioSpeech,
        model,
        encode(&req)?,
        chars + instructions,
    ))
}

/// Keeps of a speech request's other fields only `instructions` (how to
/// speak: text a model reads, so capped like the input and priced per
/// character with it); anything else is dropped. Returns its length in
/// characters.
fn check_instructions(extra: &mut serde_json::Map<String, serde_json::Value>) -> Result<u64> {
    let instructions = extra.remove("instructions").filter(|v| !v.is_null());
    extra.clear();
    let Some(v) = instructions else {
        return Ok(0);
    };
    let text = v
        .as_str()
        .ok_or_else(|| invalid("`instructions` must be text"))?;
    if text.trim().is_empty() {
        return Ok(0);
    }
    let chars = check_speech_text(text, "instructions")?;
    extra.insert("instructions".into(), v);
    Ok(chars)
}

/// `POST /v1/tts`: `text`, `voice` (default `af_bella`), optional `model`
/// (default `kokoro`).
pub(super) fn prepare_tts(body: &Bytes) -> Result<Prepared> {
    let mut req: TtsRequest = parse_body(body)?;
    let model = check_model(req.model.as_deref().unwrap_or(DEFAULT_TTS_MODEL))?;
    let chars = check_speech_text(&req.text, "text")?;
    check_voice(&req.voice)?;
    req.model = Some(model.clone());
    Ok(speech(Route::Tts, model, encode(&req)?, chars))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_voice_maps_to_an_espeak_voice_and_unknown_ones_are_refused() {
        assert_eq!(espeak_voice("af_bella"), Some("en-us+f3"));
        assert_eq!(espeak_voice("ALLOY"), Some("en-us+f2"));
        assert_eq!(espeak_voice("af_nobody"), None);
        assert_eq!(espeak_voice("-v en; rm -rf /"), None);
        for (name, e) in VOICES {
            assert!(!e.starts_with('-') && !e.contains(' '), "{name} -> {e}");
        }
    }

    #[test]
    fn tts_defaults_voice_and_model_and_meters_characters() {
        let p = prepare_tts(&Bytes::from_static(br#"{"text":"h\u00e9llo"}"#)).unwrap();
        assert_eq!(p.model, DEFAULT_TTS_MODEL);
        assert_eq!(p.bound.units, 5);
        let sent: TtsRequest = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(sent.voice, DEFAULT_TTS_VOICE);
        assert_eq!(sent.model.as_deref(), Some(DEFAULT_TTS_MODEL));
    }

    #[test]
    fn speech_refuses_bad_input() {
        for body in [
            r#"{"model":"kokoro","voice":"alloy"}"#,
            r#"{"model":"kokoro","input":"  ","voice":"alloy"}"#,
            r#"{"model":"kokoro","input":"hi","voice":"nobody"}"#,
            r#"{"model":"kokoro","input":"hi","voice":"alloy","response_format":"mp3"}"#,
            r#"{"model":"kokoro","input":"hi","voice":"alloy","speed":9}"#,
            r#"{"model":"","input":"hi","voice":"alloy"}"#,
        ] {
            let err = prepare_speech(&Bytes::from(body)).unwrap_err();
            assert!(
                matches!(err, crate::error::Error::InvalidInput(_)),
                "{body}: {err}"
            );
        }
        let long = serde_json::json!({"model":"kokoro","input":"a".repeat(MAX_SPEECH_CHARS + 1),"voice":"alloy"});
        assert!(prepare_speech(&Bytes::from(long.to_string())).is_err());
        let long = serde_json::json!({"model":"kokoro","input":"hi","voice":"alloy",
            "instructions": "a".repeat(MAX_SPEECH_CHARS + 1)});
        assert!(prepare_speech(&Bytes::from(long.to_string())).is_err());
    }

    #[test]
    fn instructions_are_priced_with_the_input_and_other_fields_dropped() {
        let body = br#"{"model":"kokoro","input":"hello","voice":"alloy",
            "instructions":"calm","stream_format":"sse","x":1}"#;
        let p = prepare_speech(&Bytes::from_static(body)).unwrap();
        assert_eq!(p.bound.units, 5 + 4);
        let sent: SpeechRequest = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(sent.extra.keys().collect::<Vec<_>>(), ["instructions"]);
    }
}
