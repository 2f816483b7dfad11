//! Every gateway service end to end over loopback: a host (the broker's
//! router), a provider node (the node library, run as a task) and the
//! node's backends: a stand-in OpenAI-compatible server for chat and
//! embeddings, a small scripted vision server, real espeak-ng for speech,
//! and pages served by the test for scraping.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Redirect};
use axum::routing::get;
use cxmpute_core::testkit::{
    chat_price, expect_error, test_config, StandInNode, TestHost, EMBED, MODEL,
};
use cxmpute_core::wire::ErrorBody;
use cxmpute_core::*;
use cxmpute_node::{Node, NodeConfig, NodeHandle};
use parking_lot::Mutex;
use serde_json::{json, Value};

/// A valid 1x1 PNG.
const PNG: [u8; 70] = [
    0x89, 0x50, 0x4e, 0x47, 0xd, 0xa, 0x1a, 0xa, 0x0, 0x0, 0x0, 0xd, 0x49, 0x48, 0x44, 0x52, 0x0,
    0x0, 0x0, 0x1, 0x0, 0x0, 0x0, 0x1, 0x8, 0x6, 0x0, 0x0, 0x0, 0x1f, 0x15, 0xc4, 0x89, 0x0, 0x0,
    0x0, 0xd, 0x49, 0x44, 0x41, 0x54, 0x78, 0xda, 0x63, 0xfc, 0xcf, 0xc0, 0x50, 0xf, 0x0, 0x4,
    0x85, 0x1, 0x80, 0x84, 0xa9, 0x8c, 0x21, 0x0, 0x0, 0x0, 0x0, 0x49, 0x45, 0x4e, 0x44, 0xae,
    0x42, 0x60, 0x82,
];
const PNG_B64: &str =
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==";

fn price(service: Service, per_request: i64, input: i64, output: i64, units: i64) -> PriceEntry {
    PriceEntry {
        service,
        model: None,
        per_request: Credits(per_request),
        per_million_input_tokens: Credits(input),
        per_million_output_tokens: Credits(output),
        per_million_units: Credits(units),
    }
}

/// The price table of these tests, in micro-credits:
///
/// | service | per request | per unit |
/// |---|---|---|
/// | chat ([`chat_price`]) | 1,000 | 1 per input token, 2 per output token |
/// | embeddings | 7 | 3 per input token |
/// | tts | 100 | 20 per character |
/// | scrape | 0 | 1,000 per URL fetched |
/// | vision | 1,000 | 500 per image |
fn prices() -> Vec<PriceEntry> {
    vec![
        chat_price(),
        price(Service::Embeddings, 7, 3_000_000, 0, 0),
        price(Service::Tts, 100, 0, 0, 20_000_000),
        price(Service::Scrape, 0, 0, 0, 1_000_000_000),
        price(Service::Vision, 1_000, 0, 0, 500_000_000),
    ]
}

/// What the vision server was asked.
#[derive(Default)]
struct VisionSeen {
    prompts: Vec<String>,
    images: Vec<String>,
}

/// A scripted OpenAI-compatible vision server: answers image chats the way
/// small vision models do (prose, fenced JSON, a 0-1000 point list).
async fn vision_upstream() -> (String, Arc<Mutex<VisionSeen>>) {
    let seen = Arc::new(Mutex::new(VisionSeen::default()));
    let app = axum::Router::new()
        .route(
            "/v1/chat/completions",
            axum::routing::post(|State(seen): State<Arc<Mutex<VisionSeen>>>, body: axum::body::Bytes| async move {
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let parts = v["messages"][0]["content"].as_array().cloned().unwrap_or_default();
                let text = parts.iter().find_map(|p| p["text"].as_str()).unwrap_or("").to_owned();
                let image =
                    parts.iter().find_map(|p| p["image_url"]["url"].as_str()).unwrap_or("").to_owned();
                let answer = if text.starts_with("Describe") {
                    "A single transparent pixel."
                } else if text.starts_with("Find every") {
                    "Here you go:\n```json\n{\"objects\": [{\"x_min\": 0.1, \"y_min\": 0.2, \"x_max\": 0.3, \"y_max\": 0.4}]}\n```"
                } else if text.starts_with("Point at every") {
                    "[[500, 250]]"
                } else {
                    "It is a pixel."
                };
                {
                    let mut s = seen.lock();
                    s.prompts.push(text);
                    s.images.push(image);
                }
                axum::Json(json!({
                    "id": "v", "object": "chat.completion", "created": 1, "model": v["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
                }))
            }),
        )
        .with_state(seen.clone());
    (serve(app).await + "/v1", seen)
}

/// Pages for the scraper and images for vision, on loopback.
async fn site() -> String {
    let app = axum::Router::new()
        .route(
            "/article",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                    "<html><head><title>T</title><script>track()</script></head><body>\
                     <h1>Hello scraper</h1><p>Some <b>bold</b> words and a \
                     <a href=\"https://example.org/\">link</a>.</p></body></html>",
                )
            }),
        )
        .route("/notes.txt", get(|| async { "plain notes" }))
        .route("/moved", get(|| async { Redirect::temporary("/article") }))
        .route(
            "/to-private",
            get(|| async { Redirect::temporary("http://10.0.0.1/admin") }),
        )
        .route(
            "/to-metadata",
            get(|| async { Redirect::temporary("http://169.254.169.254/latest/meta-data/") }),
        )
        .route(
            "/to-v6-loopback",
            get(|| async { Redirect::temporary("http://[::1]/") }),
        )
        .route(
            "/pixel.png",
            get(|| async { ([(header::CONTENT_TYPE, "image/png")], PNG.to_vec()) }),
        )
        .route(
            "/huge.png",
            get(|| async {
                let mut v = PNG.to_vec();
                v.resize(3 << 20, 0);
                ([(header::CONTENT_TYPE, "image/png")], v).into_response()
            }),
        );
    serve(app).await
}

async fn serve(app: axum::Router) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    format!("http://{addr}")
}

struct World {
    h: TestHost,
    upstream: StandInNode,
    vision_seen: Arc<Mutex<VisionSeen>>,
    site: String,
    provider: Provider,
    node: NodeHandle,
}

async fn world() -> World {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    // Callers may name the test's own pages (127.0.0.1) and nothing else
    // that is not public.
    let mut config = test_config();
    config.url_egress = egress::EgressRules::public_only()
        .allowing("127.0.0.1")
        .unwrap();
    let h = TestHost::start_with(store, |b| {
        b.config(config)
            .reward_policy(Arc::new(FlatReward(Credits(100))))
    })
    .await;
    for p in prices() {
        h.broker.admin().put_price(p).await.unwrap();
    }
    let upstream = StandInNode::start("upstream").await;
    let (vision_url, vision_seen) = vision_upstream().await;
    let site = site().await;
    let (provider, key) = h.provider().await;
    let mut cfg = NodeConfig::new(h.url.clone(), key.expose());
    cfg.upstream = Some(format!("{}/v1", upstream.url()).parse().unwrap());
    cfg.vision_upstream = Some(vision_url.parse().unwrap());
    cfg.chat_models = vec![MODEL.into()];
    cfg.embedding_models = vec![EMBED.into()];
    cfg.vision_models = vec![wire::DEFAULT_VISION_MODEL.into()];
    // Exactly 127.0.0.1: the test's own pages. Every other non-public
    // address stays refused, redirects included.
    cfg.egress = cfg.egress.allowing("127.0.0.1").unwrap();
    // This machine as it is, but with an 8 GB GPU: a tier 3 node, which the
    // catalogue lets serve a 3B chat model and a vision model.
    let mut device = cxmpute_node::device::diagnose().await;
    device.gpu = Some(wire::GpuInfo {
        name: Some("test GPU".into()),
        memory_mb: Some(8192),
        count: Some(1),
        cuda: Some(true),
        ..Default::default()
    });
    cfg.device_override = Some(device);
    let node = Node::new(cfg)
        .start()
        .await
        .expect("node starts and registers");
    World {
        h,
        upstream,
        vision_seen,
        site,
        provider,
        node,
    }
}

#[tokio::test]
async fn the_node_joins_every_pool_it_serves() {
    let w = world().await;
    let models = w.h.broker.models();
    let mut served: Vec<(Service, String)> = models
        .data
        .iter()
        .map(|m| (m.service, m.id.clone()))
        .collect();
    served.sort();
    assert_eq!(
        served,
        vec![
            (Service::Chat, MODEL.to_owned()),
            (Service::Embeddings, EMBED.to_owned()),
            (Service::Tts, "kokoro".to_owned()),
            (Service::Scrape, "default".to_owned()),
            (Service::Vision, "moondream".to_owned()),
        ]
    );
    assert_eq!(w.node.services.len(), 5);
    let view = &w.h.broker.network().provisions(&w.provider).await.unwrap()[0];
    assert_eq!(view.tier, 3, "the reported GPU sets the tier");
}

#[tokio::test]
async fn chat_plain_and_streamed_and_embeddings_pass_through_the_node() {
    let w = world().await;
    let (u, key) = w.h.user(Credits::whole(10)).await;
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]});
    let r = w.h.post("/v1/chat/completions", &key, &body).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "Hello from upstream");
    // 1,000 + 10 input tokens x 1 + 5 output tokens x 2.
    assert_eq!(w.h.balance(&u.id).await, Credits(10_000_000 - 1_020));

    let body =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": true});
    let r = w.h.post("/v1/chat/completions", &key, &body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let text = r.text().await.unwrap();
    let content: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|l| *l != "[DONE]")
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(content, "Hello from the node");
    assert!(text.trim_end().ends_with("data: [DONE]"));
    w.h.assert_settled(2).await;
    assert_eq!(w.h.balance(&u.id).await, Credits(10_000_000 - 2 * 1_020));

    let body = json!({"model": EMBED, "input": ["one", "two"]});
    let r = w.h.post("/v1/embeddings", &key, &body).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    // 7 + 6 input tokens (the node's claim of 10 is clamped to the 6 bytes) x 3.
    assert_eq!(
        w.h.balance(&u.id).await,
        Credits(10_000_000 - 2 * 1_020 - 25)
    );
    assert_eq!(w.upstream.hits(), 3);
    let earned = w.h.earnings(&w.provider.id).await;
    // 100 per call, never more than the call was charged: 100 + 100 + 25.
    assert_eq!(earned, Credits(225));
}

fn check_wav(audio: &[u8]) {
    assert!(audio.len() > 44 + 1_000, "{} bytes", audio.len());
    assert_eq!(&audio[..4], b"RIFF");
    assert_eq!(&audio[8..12], b"WAVE");
    assert!(
        audio[44..].iter().any(|b| *b != 0),
        "the audio is not silence"
    );
}

#[tokio::test]
async fn speech_is_synthesised_streamed_and_charged_per_character() {
    let w = world().await;
    let (u, key) = w.h.user(Credits::whole(10)).await;
    let text = "Hello from the marketplace.";
    let chars = text.chars().count() as i64;
    let body = json!({"model": "kokoro", "input": text, "voice": "alloy"});
    let r = w.h.post("/v1/audio/speech", &key, &body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "audio/wav");
    check_wav(&r.bytes().await.unwrap());
    w.h.assert_settled(1).await;
    let one = 100 + 20 * chars;
    assert_eq!(w.h.balance(&u.id).await, Credits(10_000_000 - one));

    // The original's route: `text`, voice defaulted to af_bella, model to kokoro.
    let r = w.h.post("/v1/tts", &key, &json!({"text": text})).await;
    assert_eq!(r.status(), 200);
    check_wav(&r.bytes().await.unwrap());
    w.h.assert_settled(2).await;
    assert_eq!(w.h.balance(&u.id).await, Credits(10_000_000 - 2 * one));

    // Raw samples on request.
    let body =
        json!({"model": "kokoro", "input": text, "voice": "bm_george", "response_format": "pcm"});
    let r = w.h.post("/v1/audio/speech", &key, &body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "audio/pcm");
    let pcm = r.bytes().await.unwrap();
    assert!(pcm.len() > 1_000 && &pcm[..4] != b"RIFF");
    w.h.assert_settled(3).await;
    assert_eq!(w.h.balance(&u.id).await, Credits(10_000_000 - 3 * one));
    let usage = w.h.broker.store().usage_records(&u.id, 10).await.unwrap();
    assert!(usage.iter().all(|r| r.units == chars as u64 && r.success));
}

#[tokio::test]
async fn speech_instructions_are_capped_and_priced_with_the_input() {
    let w = world().await;
    let (u, key) = w.h.user(Credits::whole(10)).await;
    let long = "x".repeat(4097);
    let body = json!({"model": "kokoro", "input": "hi", "voice": "alloy", "instructions": long});
    let r = w.h.post("/v1/audio/speech", &key, &body).await;
    let m = expect_error(r, 400, "invalid_request").await;
    assert!(m.contains("instructions"), "{m}");
    // A model that reads how to speak reads those characters too.
    let body = json!({"model": "kokoro", "input": "Hello.", "voice": "alloy",
        "instructions": "Speak calmly.", "stream_format": "sse"});
    let r = w.h.post("/v1/audio/speech", &key, &body).await;
    assert_eq!(r.status(), 200);
    check_wav(&r.bytes().await.unwrap());
    let used = w.h.last_usage(&u.id).await;
    assert_eq!(used.units, 6 + 13);
    assert_eq!(used.charged, Credits(100 + 20 * 19));
    w.h.assert_ledger().await;
}

#[tokio::test]
async fn scraping_fetches_converts_and_refuses_forbidden_hops() {
    let w = world().await;
    let (u, key) = w.h.user(Credits::whole(10)).await;
    let s = &w.site;
    let urls = vec![
        format!("{s}/article"),
        format!("{s}/notes.txt"),
        format!("{s}/moved"),
        format!("{s}/to-private"),
        format!("{s}/to-metadata"),
        format!("{s}/to-v6-loopback"),
        "http://10.0.0.1/".to_owned(),
    ];
    let r =
        w.h.post(
            "/v1/scrape",
            &key,
            &json!({"urls": urls, "format": "markdown"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let v: wire::ScrapeResponse = r.json().await.unwrap();
    assert_eq!(v.results.len(), urls.len());
    for (res, url) in v.results.iter().zip(&urls) {
        assert_eq!(&res.url, url);
    }
    let article = &v.results[0];
    assert!(article.success && article.status == Some(200));
    let md = article.content.as_deref().unwrap();
    assert!(
        md.contains("# Hello scraper") && md.contains("**bold**"),
        "{md}"
    );
    assert!(
        md.contains("[link](https://example.org/)") && !md.contains("track()"),
        "{md}"
    );
    assert_eq!(v.results[1].content.as_deref(), Some("plain notes"));
    let moved = &v.results[2];
    assert!(moved.success, "{moved:?}");
    assert!(moved.final_url.as_deref().unwrap().ends_with("/article"));
    // A loopback page redirecting to a private, a metadata or an IPv6
    // loopback address, and a private address itself (only 127.0.0.1 is
    // allowed): all refused before any connection, per URL.
    for res in &v.results[3..] {
        assert!(!res.success && res.content.is_none(), "{res:?}");
        let e = res.error.as_deref().unwrap();
        assert!(e.contains("not a public address"), "{}: {e}", res.url);
    }
    w.h.assert_settled(1).await;
    // Three pages fetched, at 1,000 each; the refused ones cost nothing.
    assert_eq!(w.h.balance(&u.id).await, Credits(10_000_000 - 3_000));

    for (format, check) in [
        ("text", "Hello scraper"),
        ("html", "<h1>Hello scraper</h1>"),
    ] {
        let body = json!({"urls": [format!("{s}/article")], "format": format});
        let r = w.h.post("/v1/scrape", &key, &body).await;
        assert_eq!(r.status(), 200);
        let v: wire::ScrapeResponse = r.json().await.unwrap();
        let c = v.results[0].content.as_deref().unwrap();
        assert!(c.contains(check), "{format}: {c}");
        if format == "text" {
            assert!(!c.contains('<'), "{c}");
        }
    }
    assert_eq!(w.h.balance(&u.id).await, Credits(10_000_000 - 5_000));
}

#[tokio::test]
async fn vision_routes_answer_typed_results_and_charge_per_image() {
    let w = world().await;
    let (u, key) = w.h.user(Credits::whole(10)).await;
    let img = json!(PNG_B64);
    let r =
        w.h.post("/v1/m/caption", &key, &json!({"image": img}))
            .await;
    assert_eq!(r.status(), 200);
    let v: wire::CaptionResponse = r.json().await.unwrap();
    assert_eq!(v.caption, "A single transparent pixel.");

    let r =
        w.h.post(
            "/v1/m/query",
            &key,
            &json!({"image": img, "question": "What is it?"}),
        )
        .await;
    let v: wire::QueryResponse = r.json().await.unwrap();
    assert_eq!(v.answer, "It is a pixel.");

    let r =
        w.h.post(
            "/v1/m/detect",
            &key,
            &json!({"image": img, "target": "pixel"}),
        )
        .await;
    let v: wire::DetectResponse = r.json().await.unwrap();
    assert_eq!(
        v.objects,
        [wire::BoundingBox {
            x_min: 0.1,
            y_min: 0.2,
            x_max: 0.3,
            y_max: 0.4
        }]
    );

    // By URL: the node fetches it (from 127.0.0.1, allowed) and sends it inline.
    let url = format!("{}/pixel.png", w.site);
    let r =
        w.h.post(
            "/v1/m/point",
            &key,
            &json!({"imageUrl": url, "target": "pixel"}),
        )
        .await;
    let v: wire::PointResponse = r.json().await.unwrap();
    assert_eq!(v.points, [wire::ImagePoint { x: 0.5, y: 0.25 }]);

    {
        let seen = w.vision_seen.lock();
        assert_eq!(seen.prompts.len(), 4);
        assert_eq!(seen.prompts[1], "What is it?");
        assert!(seen.prompts[2].contains("pixel"));
        let inline = format!("data:image/png;base64,{PNG_B64}");
        assert!(
            seen.images.iter().all(|i| *i == inline),
            "the image reaches the model inline"
        );
    }
    assert_eq!(w.h.balance(&u.id).await, Credits(10_000_000 - 4 * 1_500));
}

#[tokio::test]
async fn an_image_url_the_node_may_not_fetch_costs_nothing() {
    let w = world().await;
    let (u, key) = w.h.user(Credits::whole(10)).await;
    for url in [
        format!("{}/huge.png", w.site),
        "http://127.0.0.2/x.png".to_owned(),
    ] {
        let r =
            w.h.post("/v1/m/caption", &key, &json!({"image_url": url}))
                .await;
        assert!(
            r.status().is_client_error() || r.status().is_server_error(),
            "{url}"
        );
        let _: ErrorBody = r.json().await.expect("OpenAI error JSON");
    }
    assert_eq!(w.h.balance(&u.id).await, Credits::whole(10));
    assert!(
        w.vision_seen.lock().prompts.is_empty(),
        "the model never saw them"
    );
}

#[tokio::test]
async fn chat_image_urls_are_fetched_by_the_node_through_its_guard_and_inlined() {
    let w = world().await;
    let (_, key) = w.h.user(Credits::whole(10)).await;
    let ask = |url: String| {
        json!({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is it?"},
            {"type": "image_url", "image_url": {"url": url, "detail": "low"}},
        ]}]})
    };
    let r =
        w.h.post(
            "/v1/chat/completions",
            &key,
            &ask(format!("{}/pixel.png", w.site)),
        )
        .await;
    assert_eq!(r.status(), 200);
    let sent = w.upstream.last_body().unwrap();
    assert_eq!(
        sent["messages"][0]["content"][1]["image_url"],
        json!({"url": format!("data:image/png;base64,{PNG_B64}"), "detail": "low"}),
        "the model server gets the image, never a URL to fetch"
    );
    // Refused by the node's guard (a redirect to the metadata address, a
    // private address on the way) or its size cap: the model server never
    // sees the request. The caller reads the broker's words, not the node's.
    let hits = w.upstream.hits();
    for path in ["/to-metadata", "/to-private", "/huge.png"] {
        let r =
            w.h.post(
                "/v1/chat/completions",
                &key,
                &ask(format!("{}{path}", w.site)),
            )
            .await;
        let m = expect_error(r, 400, "invalid_request").await;
        assert!(m.contains("image"), "{path}: {m}");
    }
    assert_eq!(w.upstream.hits(), hits);
    w.h.assert_ledger().await;
}

#[tokio::test]
async fn bad_input_on_every_route_is_a_clear_400_and_costs_nothing() {
    let w = world().await;
    let (u, key) = w.h.user(Credits::whole(10)).await;
    let img = PNG_B64;
    let many: Vec<String> = (0..51).map(|i| format!("{}/article?{i}", w.site)).collect();
    // Over the 2 MiB image cap, under the body limit.
    let huge = "A".repeat(3 << 20);
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "/v1/audio/speech",
            json!({"model": "kokoro", "voice": "alloy"}),
            "input",
        ),
        (
            "/v1/audio/speech",
            json!({"input": "hi", "voice": "alloy"}),
            "model",
        ),
        (
            "/v1/audio/speech",
            json!({"model": "kokoro", "input": "hi"}),
            "voice",
        ),
        (
            "/v1/audio/speech",
            json!({"model": "kokoro", "input": "hi", "voice": "nobody"}),
            "unknown voice",
        ),
        (
            "/v1/audio/speech",
            json!({"model": "kokoro", "input": "hi", "voice": "alloy", "response_format": "mp3"}),
            "mp3",
        ),
        (
            "/v1/audio/speech",
            json!({"model": "kokoro", "input": "x".repeat(4097), "voice": "alloy"}),
            "at most 4096",
        ),
        ("/v1/tts", json!({"voice": "af_bella"}), "text"),
        (
            "/v1/tts",
            json!({"text": "hi", "voice": "af_nobody"}),
            "unknown voice",
        ),
        ("/v1/tts", json!({"text": "   "}), "must not be empty"),
        ("/v1/scrape", json!({}), "urls"),
        ("/v1/scrape", json!({"urls": []}), "at least one"),
        ("/v1/scrape", json!({"urls": many}), "at most 50"),
        (
            "/v1/scrape",
            json!({"urls": ["ftp://example.org/"]}),
            "http",
        ),
        (
            "/v1/scrape",
            json!({"urls": [format!("{}/article", w.site)], "format": "pdf"}),
            "pdf",
        ),
        ("/v1/m/caption", json!({}), "image"),
        ("/v1/m/caption", json!({"image": huge}), "larger than"),
        ("/v1/m/caption", json!({"image": "not base64!"}), "base64"),
        (
            "/v1/m/caption",
            json!({"image": "aGVsbG8gd29ybGQ="}),
            "not a PNG",
        ),
        ("/v1/m/query", json!({"image": img}), "question"),
        ("/v1/m/detect", json!({"image": img}), "target"),
        ("/v1/m/point", json!({"image": img, "target": ""}), "target"),
        (
            "/v1/m/point",
            json!({"image_url": "file:///etc/passwd", "target": "x"}),
            "http",
        ),
    ];
    for (path, body, says) in cases {
        let msg = expect_error(w.h.post(path, &key, &body).await, 400, "invalid_request").await;
        assert!(!msg.is_empty());
        assert!(
            msg.contains(says),
            "{path} {body}: `{msg}` should mention `{says}`"
        );
    }
    let unknown = json!({"model": "nope", "input": "hi", "voice": "alloy"});
    let r = w.h.post("/v1/audio/speech", &key, &unknown).await;
    assert!(!expect_error(r, 404, "model_not_found").await.is_empty());
    assert_eq!(w.h.balance(&u.id).await, Credits::whole(10));
    assert_eq!(
        w.h.broker
            .store()
            .ledger_totals()
            .await
            .unwrap()
            .settlements,
        0
    );
    assert!(w.vision_seen.lock().prompts.is_empty());
}

#[tokio::test]
async fn a_key_limited_to_scraping_may_not_speak() {
    let w = world().await;
    let (u, _) = w.h.user(Credits::whole(1)).await;
    let (_, scrape_only) =
        w.h.broker
            .admin()
            .create_api_key(&u.id, "scraper", None, vec![Route::Scrape])
            .await
            .unwrap();
    let body = json!({"text": "hi"});
    let r = w.h.post("/v1/tts", &scrape_only, &body).await;
    assert!(!expect_error(r, 403, "forbidden").await.is_empty());
    let body = json!({"urls": [format!("{}/notes.txt", w.site)]});
    assert_eq!(
        w.h.post("/v1/scrape", &scrape_only, &body).await.status(),
        200
    );
}
