//! The provider node's own contract, over loopback: it answers only its
//! broker, registers with this machine's diagnostics, heartbeats, registers
//! again when the broker forgot it, and leaves every pool when it stops.

use std::sync::Arc;
use std::time::Duration;

use cxmpute_core::testkit::TestHost;
use cxmpute_core::*;
use cxmpute_node::{device, Node, NodeConfig};
use serde_json::{json, Value};

async fn host() -> TestHost {
    TestHost::start(Arc::new(MemoryStore::new())).await
}

/// A node serving speech and scraping only (no model server needed).
async fn config(h: &TestHost) -> (Provider, NodeConfig) {
    let (p, key) = h.provider().await;
    let cfg = NodeConfig::new(h.url.clone(), key.expose());
    (p, cfg)
}

/// Polls `f` (bounded) until it holds: for effects of the node's own
/// background tasks, which the test cannot await directly.
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..2_000 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{what} never happened");
}

#[tokio::test]
async fn the_node_answers_only_its_broker() {
    let h = host().await;
    let (_, cfg) = config(&h).await;
    let node = Node::new(cfg).start().await.unwrap();
    let secret = h
        .broker
        .store()
        .provision(&node.provision_id)
        .await
        .unwrap()
        .node_secret;
    let c = reqwest::Client::new();
    let speech = json!({"text": "hello"});
    let url = format!("{}/v1/tts", node.endpoint);
    let none = c.post(&url).json(&speech).send().await.unwrap();
    assert_eq!(none.status(), 401);
    let e: Value = none.json().await.unwrap();
    assert_eq!(e["error"]["code"], "invalid_api_key");
    let wrong = c
        .post(&url)
        .bearer_auth("not-the-secret")
        .json(&speech)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let prefix = &secret[..secret.len() - 1];
    let close = c
        .post(&url)
        .bearer_auth(prefix)
        .json(&speech)
        .send()
        .await
        .unwrap();
    assert_eq!(close.status(), 401);
    let hb = format!("{}/heartbeat", node.endpoint);
    assert_eq!(c.get(&hb).send().await.unwrap().status(), 401);
    assert_eq!(
        c.get(&hb)
            .bearer_auth(&secret)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // With the secret: real audio, and clear errors for what it cannot do.
    let ok = c
        .post(&url)
        .bearer_auth(&secret)
        .json(&speech)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let audio = ok.bytes().await.unwrap();
    assert_eq!((&audio[..4], &audio[8..12]), (&b"RIFF"[..], &b"WAVE"[..]));
    let bad = json!({"text": "hello", "voice": "nobody"});
    let r = c
        .post(&url)
        .bearer_auth(&secret)
        .json(&bad)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let chat = json!({"model": "llama3.2:3b", "messages": [{"role": "user", "content": "hi"}]});
    let r = c
        .post(format!("{}/v1/chat/completions", node.endpoint))
        .bearer_auth(&secret)
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "no chat on this node");
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn it_registers_with_this_machines_diagnostics_and_leaves_every_pool_on_stop() {
    let h = host().await;
    let (p, cfg) = config(&h).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(Node::new(cfg).run(async {
        let _ = stopped.await;
    }));
    // Ready once it has registered, been told what to start and reported
    // what it serves (or, with a broker without those steps, registered
    // with its services).
    let ready = || async {
        let all = h.broker.network().provisions(&p).await.unwrap();
        all.into_iter()
            .filter(|v| v.state == ProvisionState::Ready)
            .collect::<Vec<_>>()
    };
    eventually("registration", || async { !ready().await.is_empty() }).await;
    let mut views = ready().await;
    assert_eq!(views.len(), 1);
    let view = views.remove(0);
    let mut served: Vec<Service> = view.services.iter().map(|s| s.service).collect();
    served.sort();
    assert_eq!(served, [Service::Tts, Service::Scrape]);
    assert_eq!(h.broker.models().data.len(), 2);

    let stored = h
        .broker
        .store()
        .provision(&view.provision_id)
        .await
        .unwrap();
    // Stored as sent, read as the broker reads it.
    let d = wire::DeviceDiagnostics::from_json(&stored.device).unwrap();
    let here = device::diagnose().await;
    let (cpu, memory) = (d.cpu.as_ref().unwrap(), d.memory.as_ref().unwrap());
    assert_eq!(cpu.threads, here.cpu.as_ref().unwrap().threads);
    assert_eq!(memory.total_mb, here.memory.as_ref().unwrap().total_mb);
    assert!(cpu.threads.unwrap() >= 1 && memory.total_mb.unwrap() > 0);
    assert!(d.os.as_ref().and_then(|o| o.family.as_ref()).is_some());
    assert_eq!(d.gpu.is_some(), here.gpu.is_some());
    assert_eq!(d.tier(), here.tier());

    stop.send(()).unwrap();
    run.await.unwrap().unwrap();
    assert!(
        h.broker.models().data.is_empty(),
        "a stopped node leaves every pool"
    );
    assert!(h.routed_node_ids().is_empty());
}

#[tokio::test]
async fn it_heartbeats_and_registers_again_when_forgotten() {
    let h = host().await;
    let (p, mut cfg) = config(&h).await;
    cfg.heartbeat_every = Duration::from_millis(20);
    cfg.scrape = None;
    let node = Node::new(cfg).start().await.unwrap();
    let first = node.provision_id.clone();
    let registered_at = h
        .broker
        .store()
        .provision(&first)
        .await
        .unwrap()
        .last_heartbeat;
    h.clock.advance(Duration::from_secs(5));
    eventually("a heartbeat", || async {
        h.broker
            .store()
            .provision(&first)
            .await
            .unwrap()
            .last_heartbeat
            > registered_at
    })
    .await;

    // The broker forgets it (ended behind its back): the next heartbeat is
    // refused and the node registers again, with a new id and secret.
    h.broker
        .network()
        .delete_provision(&p, &first)
        .await
        .unwrap();
    assert!(h.broker.models().data.is_empty());
    eventually("registering again", || async {
        !h.broker.models().data.is_empty()
    })
    .await;
    let ids = h.routed_node_ids();
    assert_eq!(ids.len(), 1);
    assert_ne!(ids[0], first);
    node.shutdown().await.unwrap();
    assert!(h.broker.models().data.is_empty());
}

#[tokio::test]
async fn a_node_with_nothing_to_serve_or_a_wrong_key_does_not_start() {
    let h = host().await;
    let (_, mut cfg) = config(&h).await;
    cfg.tts = None;
    cfg.scrape = None;
    let e = Node::new(cfg).start().await.unwrap_err();
    assert!(matches!(e, Error::InvalidInput(_)), "{e}");

    let mut cfg = NodeConfig::new(h.url.clone(), "cxp-not-a-key");
    cfg.scrape = None;
    let e = Node::new(cfg).start().await.unwrap_err();
    assert!(matches!(e, Error::Unauthorized(_)), "{e}");

    let (_, mut cfg) = config(&h).await;
    cfg.chat_models = vec!["llama3.2:3b".into()];
    cfg.tts = None;
    cfg.scrape = None;
    let e = Node::new(cfg).start().await.unwrap_err();
    assert!(
        matches!(e, Error::InvalidInput(_)),
        "chat without an upstream: {e}"
    );
}

#[tokio::test]
async fn a_missing_speech_program_means_no_speech_is_offered() {
    let h = host().await;
    let (_, mut cfg) = config(&h).await;
    if let Some(t) = cfg.tts.as_mut() {
        t.program = "/nonexistent/espeak-ng".into();
    }
    let node = Node::new(cfg).start().await.unwrap();
    let served: Vec<Service> = node.services.iter().map(|s| s.service).collect();
    assert_eq!(served, [Service::Scrape]);
    node.shutdown().await.unwrap();
}
