//! The services of the user API (speech, text to speech, scraping, vision)
//! against a real host router on loopback, served by a stand-in node that
//! answers those routes in the shapes the host forwards and checks.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::response::Response;
use axum::routing::post;
use axum::Json;
use common::World;
use cxmpute_client::types::Service;
use cxmpute_client::wire::{
    AudioFormat, BoundingBox, CaptionResponse, DetectResponse, ImagePoint, PointResponse,
    QueryResponse, ScrapeFormat, ScrapeRequest, ScrapeResponse, ScrapeResult, SpeechRequest,
    TtsRequest, VisionRequest,
};
use cxmpute_client::Error;
use futures::{StreamExt, TryStreamExt};
use tokio::sync::Notify;

/// The audio every speech answer carries: a WAV header and some samples.
fn audio() -> Vec<u8> {
    let mut a = b"RIFF\x24\0\0\0WAVEfmt ".to_vec();
    a.extend((0..4_000u32).map(|i| (i % 251) as u8));
    a
}

/// When set, audio answers stop half-way and break once `go` is notified:
/// the test notifies after it has received the first half, so the break
/// surely comes after the first byte.
#[derive(Default)]
struct Cut {
    on: AtomicBool,
    go: Notify,
}

/// A node serving speech, scraping and vision.
struct ServicesNode {
    url: String,
    cut: Arc<Cut>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ServicesNode {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn speak(cut: Arc<Cut>) -> Response {
    let a = audio();
    let (head, tail) = a.split_at(a.len() / 2);
    let piece = |c: &[u8]| Ok::<_, std::io::Error>(Bytes::copy_from_slice(c));
    let head = futures::stream::iter(head.chunks(500).map(piece).collect::<Vec<_>>());
    let body = if cut.on.load(Ordering::SeqCst) {
        let brk = futures::stream::once(async move {
            cut.go.notified().await;
            Err(std::io::Error::other("node lost"))
        });
        Body::from_stream(head.chain(brk))
    } else {
        let tail = futures::stream::iter(tail.chunks(500).map(piece).collect::<Vec<_>>());
        Body::from_stream(head.chain(tail))
    };
    Response::builder()
        .header("content-type", "audio/wav")
        .body(body)
        .unwrap()
}

impl ServicesNode {
    async fn start() -> ServicesNode {
        let cut = Arc::new(Cut::default());
        let (c1, c2) = (cut.clone(), cut.clone());
        let app = axum::Router::new()
            .route("/v1/audio/speech", post(move || speak(c1.clone())))
            .route("/v1/tts", post(move || speak(c2.clone())))
            .route(
                "/v1/scrape",
                post(|Json(req): Json<ScrapeRequest>| async move {
                    let results = req
                        .urls
                        .iter()
                        .map(|u| ScrapeResult {
                            url: u.clone(),
                            success: !u.contains("unreachable"),
                            status: Some(200).filter(|_| !u.contains("unreachable")),
                            final_url: Some(u.clone()),
                            content: Some(format!("# {:?} of {u}", req.format)),
                            error: None,
                        })
                        .collect();
                    Json(ScrapeResponse { results })
                }),
            )
            .route(
                "/v1/m/caption",
                post(|| async {
                    Json(CaptionResponse {
                        caption: "a cat on a mat".into(),
                    })
                }),
            )
            .route(
                "/v1/m/query",
                post(|Json(r): Json<VisionRequest>| async move {
                    Json(QueryResponse {
                        answer: format!("asked: {}", r.question.unwrap_or_default()),
                    })
                }),
            )
            .route(
                "/v1/m/detect",
                post(|| async {
                    Json(DetectResponse {
                        objects: vec![BoundingBox {
                            x_min: 0.1,
                            y_min: 0.2,
                            x_max: 0.5,
                            y_max: 0.6,
                        }],
                    })
                }),
            )
            .route(
                "/v1/m/point",
                post(|| async {
                    Json(PointResponse {
                        points: vec![ImagePoint { x: 0.25, y: 0.75 }],
                    })
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        ServicesNode { url, cut, task }
    }
}

/// The world plus a node serving every service.
async fn world() -> (World, ServicesNode) {
    let w = World::start().await;
    let node = ServicesNode::start().await;
    let (p, _) = w.host.provider().await;
    for (service, model) in [
        (Service::Tts, "kokoro"),
        (Service::Scrape, "default"),
        (Service::Vision, "moondream"),
    ] {
        w.host
            .add_node_at(&p, &node.url, service, model, None)
            .await;
    }
    (w, node)
}

fn speech_request() -> SpeechRequest {
    SpeechRequest {
        model: "kokoro".into(),
        input: "Hello there.".into(),
        voice: "af_bella".into(),
        response_format: Some(AudioFormat::Wav),
        speed: None,
        extra: Default::default(),
    }
}

fn image() -> VisionRequest {
    VisionRequest {
        image_url: Some("https://example.com/cat.jpg".into()),
        ..Default::default()
    }
}

#[tokio::test]
async fn speech_returns_the_audio_whole_or_streamed() {
    let (w, _node) = world().await;
    let wav = w.client().user().speech(&speech_request()).await.unwrap();
    assert_eq!(wav.as_ref(), audio().as_slice());

    let stream = w
        .client()
        .user()
        .speech_stream(&speech_request())
        .await
        .unwrap();
    assert_eq!(stream.content_type(), Some("audio/wav"));
    let chunks: Vec<Bytes> = stream.try_collect().await.unwrap();
    assert_eq!(chunks.concat(), audio());
}

#[tokio::test]
async fn tts_returns_the_audio_whole_or_streamed() {
    let (w, _node) = world().await;
    let req = TtsRequest {
        text: "Hello there.".into(),
        voice: "af_bella".into(),
        model: None,
    };
    assert_eq!(
        w.client().user().tts(&req).await.unwrap().as_ref(),
        audio().as_slice()
    );
    let chunks: Vec<Bytes> = w
        .client()
        .user()
        .tts_stream(&req)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(chunks.concat(), audio());
}

#[tokio::test]
async fn audio_broken_half_way_is_a_transport_error() {
    let (w, node) = world().await;
    node.cut.on.store(true, Ordering::SeqCst);
    let mut stream = w
        .client()
        .user()
        .speech_stream(&speech_request())
        .await
        .unwrap();
    let first = stream.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    node.cut.go.notify_one();
    let mut got = first.to_vec();
    let err = loop {
        match stream.next().await {
            Some(Ok(b)) => got.extend_from_slice(&b),
            Some(Err(e)) => break e,
            None => panic!("a broken answer must not end cleanly"),
        }
    };
    assert!(matches!(err, Error::Transport(_)), "{err:?}");
    assert!(got.len() < audio().len());
    assert!(
        stream.next().await.is_none(),
        "the stream ends after its error"
    );
}

#[tokio::test]
async fn a_bad_voice_is_refused_before_any_node() {
    let (w, _node) = world().await;
    let mut req = speech_request();
    req.voice = "no-such-voice".into();
    let e = w.client().user().speech(&req).await.unwrap_err();
    assert_eq!(
        (e.status(), e.code()),
        (Some(400), Some("invalid_request")),
        "{e}"
    );
}

#[tokio::test]
async fn scrape_returns_one_result_per_url_in_order() {
    let (w, _node) = world().await;
    let req = ScrapeRequest {
        urls: vec![
            "https://example.com/a".into(),
            "https://unreachable.example/b".into(),
        ],
        format: ScrapeFormat::Markdown,
        model: None,
    };
    let answer = w.client().user().scrape(&req).await.unwrap();
    assert_eq!(answer.results.len(), 2);
    assert_eq!(answer.results[0].url, "https://example.com/a");
    assert!(answer.results[0].success);
    assert_eq!(
        answer.results[0].content.as_deref(),
        Some("# Markdown of https://example.com/a")
    );
    assert!(!answer.results[1].success);
    let bad = ScrapeRequest {
        urls: vec!["ftp://example.com/".into()],
        ..req
    };
    assert_eq!(
        w.client().user().scrape(&bad).await.unwrap_err().status(),
        Some(400)
    );
}

#[tokio::test]
async fn vision_captions_answers_detects_and_points() {
    let (w, _node) = world().await;
    let u = w.client();
    assert_eq!(
        u.user().caption(&image()).await.unwrap().caption,
        "a cat on a mat"
    );
    let q = VisionRequest {
        question: Some("How many cats?".into()),
        ..image()
    };
    assert_eq!(
        u.user().query(&q).await.unwrap().answer,
        "asked: How many cats?"
    );
    let t = VisionRequest {
        target: Some("cat".into()),
        ..image()
    };
    let boxes = u.user().detect(&t).await.unwrap().objects;
    assert_eq!(
        boxes,
        vec![BoundingBox {
            x_min: 0.1,
            y_min: 0.2,
            x_max: 0.5,
            y_max: 0.6
        }]
    );
    assert_eq!(
        u.user().point(&t).await.unwrap().points,
        vec![ImagePoint { x: 0.25, y: 0.75 }]
    );
    // A question is required by the query route.
    let e = u.user().query(&image()).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
}
