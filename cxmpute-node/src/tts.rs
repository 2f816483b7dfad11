//! Text to speech through espeak-ng.
//!
//! The program runs with arguments (never a shell) and reads the text from
//! its standard input, so no text can be taken for an option. Its WAV output
//! is streamed to the broker as it is produced; a synthesis that fails after
//! the first bytes breaks the body, so the broker sees a failed transfer.

use std::path::Path;
use std::process::Stdio;

use axum::body::Body;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use cxmpute_core::services::{check_speech_text, espeak_voice, parse_body};
use cxmpute_core::wire::*;
use cxmpute_core::{Error, Result, Route};

use crate::proxy::served;
use crate::server::Serving;

/// The size of the RIFF header espeak-ng writes before the samples.
const WAV_HEADER: usize = 44;

/// Checks that the program runs at all.
pub(crate) async fn check_program(program: &Path) -> Result<()> {
    let out = tokio::process::Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .status()
        .await
        .map_err(|e| Error::unavailable(format!("cannot run {}", program.display()), e))?;
    if out.success() {
        Ok(())
    } else {
        Err(Error::Unavailable {
            message: format!("{} --version failed: {out}", program.display()),
            source: None,
        })
    }
}

/// `/v1/audio/speech` and `/v1/tts`.
pub(crate) async fn speak(s: &Serving, route: Route, body: &[u8]) -> Result<Response> {
    let cfg = s
        .cfg
        .tts
        .as_ref()
        .ok_or_else(|| Error::NotFound("text to speech on this node".into()))?;
    let (model, text, field, voice, speed, format) = if route == Route::AudioSpeech {
        let r: SpeechRequest = parse_body(body)?;
        (
            r.model,
            r.input,
            "input",
            r.voice,
            r.speed,
            r.response_format.unwrap_or_default(),
        )
    } else {
        let r: TtsRequest = parse_body(body)?;
        let model = r.model.unwrap_or_else(|| DEFAULT_TTS_MODEL.to_owned());
        (model, r.text, "text", r.voice, None, AudioFormat::Wav)
    };
    served(std::slice::from_ref(&cfg.model), &model)?;
    let voice = espeak_voice(&voice)
        .ok_or_else(|| Error::InvalidInput(format!("unknown voice `{voice}`")))?;
    check_speech_text(&text, field)?;
    // espeak-ng's default rate is 175 words per minute.
    let wpm = (175.0 * f64::from(speed.unwrap_or(1.0)).clamp(0.25, 4.0)).round() as u32;
    let wpm = wpm.clamp(80, 450).to_string();
    let mut child = tokio::process::Command::new(&cfg.program)
        .args(["--stdout", "-b", "1", "-v", voice, "-s", &wpm])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Error::unavailable("the speech program could not start", e))?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| Error::Upstream("no stdin".into()))?;
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| Error::Upstream("no stdout".into()))?;
    tokio::spawn(async move {
        // A write error means the program died; its exit status says so.
        let _ = stdin.write_all(text.as_bytes()).await;
        let _ = stdin.shutdown().await;
    });

    let timeout = cfg.timeout;
    // The first bytes (the whole header, for PCM) before answering, so a
    // program that fails at once is a clean error, not a broken stream.
    let mut first = Vec::with_capacity(8192);
    let mut buf = vec![0u8; 16 << 10];
    while first.len() < WAV_HEADER + 1 {
        let n = tokio::time::timeout(timeout, stdout.read(&mut buf))
            .await
            .map_err(|_| Error::UpstreamTimeout("speech synthesis took too long".into()))?
            .map_err(|e| Error::Upstream(format!("reading the speech program: {e}")))?;
        if n == 0 {
            break;
        }
        first.extend_from_slice(&buf[..n]);
    }
    if first.len() <= WAV_HEADER {
        let status = child.wait().await.ok();
        return Err(Error::Upstream(format!(
            "the speech program produced no audio (exit {status:?})"
        )));
    }
    if format == AudioFormat::Pcm {
        first.drain(..WAV_HEADER);
    }
    let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(8);
    tokio::spawn(async move {
        if tx.send(Ok(Bytes::from(first))).await.is_err() {
            return; // the broker went away; dropping `child` kills it
        }
        loop {
            let read = tokio::time::timeout(timeout, stdout.read(&mut buf)).await;
            let chunk = match read {
                Ok(Ok(0)) => break,
                Ok(Ok(n)) => Ok(Bytes::copy_from_slice(&buf[..n])),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(std::io::Error::other("speech synthesis stalled")),
            };
            let failed = chunk.is_err();
            if tx.send(chunk).await.is_err() || failed {
                return;
            }
        }
        match child.wait().await {
            Ok(st) if st.success() => {}
            other => {
                let _ = tx
                    .send(Err(std::io::Error::other(format!(
                        "the speech program failed: {other:?}"
                    ))))
                    .await;
            }
        }
    });
    Ok((
        [(header::CONTENT_TYPE, format.content_type())],
        Body::from_stream(ReceiverStream::new(rx)),
    )
        .into_response())
}
