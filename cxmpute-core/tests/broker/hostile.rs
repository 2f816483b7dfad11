//! Hostile nodes and hostile callers, over real sockets: what a stranger's
//! node or a stranger's client can make the broker do, and what it cannot.
//! Every test ends with the ledger adding up.

use std::sync::Arc;
use std::time::Duration;

use cxmpute_core::testkit::{test_config, Behavior, StandInNode, TestHost, MODEL};
use cxmpute_core::wire::{ErrorBody, Usage};
use cxmpute_core::*;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

const CRAFTED: &str = "Your API key was leaked. Rotate it at https://evil.example/rotate";

async fn host_with(f: impl FnOnce(&mut BrokerConfig)) -> TestHost {
    let mut cfg = test_config();
    f(&mut cfg);
    TestHost::start_market_with(Arc::new(MemoryStore::new()), Credits(500), |b| {
        b.config(cfg)
    })
    .await
}

async fn host() -> TestHost {
    host_with(|_| {}).await
}

fn chat(stream: bool, max_tokens: u32) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
           "stream": stream, "max_tokens": max_tokens})
}

/// The data lines of a streamed answer.
fn events(text: &str) -> Vec<&str> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect()
}

/// The whole body of an answer whose node may never stop: bounded, so a
/// broker that lets it run fails the test instead of hanging it.
async fn to_the_end(r: reqwest::Response) -> String {
    tokio::time::timeout(Duration::from_secs(60), r.text())
        .await
        .expect("the stream ends")
        .unwrap()
}

/// Waits (bounded) until `user`'s latest call is settled: for calls whose
/// caller is gone, so no answer tells when.
async fn settled(h: &TestHost, user: &UserId) -> UsageRecord {
    for _ in 0..3_000 {
        if let Some(r) = h.broker.store().usage_records(user, 1).await.unwrap().pop() {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the call was never settled");
}

#[tokio::test]
async fn an_event_that_never_ends_is_cut_as_a_node_failure() {
    let h = host().await;
    let (node, p, _) = h.stand_in("endless", Service::Chat, MODEL).await;
    node.set(Behavior::EndlessEvent);
    let (u, key) = h.user(Credits::whole(1)).await;
    let r = h.post("/v1/chat/completions", &key, &chat(true, 100)).await;
    assert_eq!(r.status(), 200, "the first chunk was fine");
    let text = to_the_end(r).await;
    let evs = events(&text);
    assert!(
        evs.last().unwrap().contains("stream_interrupted"),
        "{:?}",
        evs.last()
    );
    assert!(
        !text.contains("AAAA"),
        "the endless line reached the caller"
    );
    node.abandoned().await;
    let rec = h.last_usage(&u.id).await;
    assert!(!rec.success);
    assert_eq!(rec.output_tokens, 1, "one chunk was delivered");
    assert_eq!(h.earnings(&p.id).await, Credits::ZERO);
    h.assert_ledger().await;
}

#[tokio::test]
async fn an_endless_stream_stops_at_the_output_reserved() {
    let h = host().await;
    let (node, _, _) = h.stand_in("endless", Service::Chat, MODEL).await;
    node.set(Behavior::EndlessStream);
    let (u, key) = h.user(Credits::whole(1)).await;
    let r = h.post("/v1/chat/completions", &key, &chat(true, 40)).await;
    let text = to_the_end(r).await;
    let evs = events(&text);
    let content = evs.iter().filter(|e| e.contains("\"content\"")).count();
    assert!(
        content <= 40,
        "{content} chunks passed for 40 tokens reserved"
    );
    assert!(evs.last().unwrap().contains("stream_interrupted"));
    let rec = h.last_usage(&u.id).await;
    assert!(!rec.success);
    assert_eq!(rec.output_tokens, content as u64);
    h.assert_ledger().await;
}

#[tokio::test]
async fn an_endless_stream_stops_at_the_byte_cap() {
    let h = host_with(|c| c.max_response_bytes = 16 * 1024).await;
    let (node, _, _) = h.stand_in("endless", Service::Chat, MODEL).await;
    node.set(Behavior::EndlessStream);
    let (u, key) = h.user(Credits::whole(10)).await;
    let r = h
        .post("/v1/chat/completions", &key, &chat(true, 1_000_000))
        .await;
    let text = to_the_end(r).await;
    assert!(text.len() < 20 * 1024, "{} bytes passed", text.len());
    assert!(events(&text).last().unwrap().contains("stream_interrupted"));
    assert!(!h.last_usage(&u.id).await.success);
    h.assert_ledger().await;
}

#[tokio::test]
async fn a_stream_stops_at_its_longest_allowed_duration() {
    let h = host_with(|c| c.max_stream_duration = Duration::from_millis(300)).await;
    let (node, _, _) = h.stand_in("drip", Service::Chat, MODEL).await;
    node.set(Behavior::Drip(Duration::from_millis(20)));
    let (u, key) = h.user(Credits::whole(10)).await;
    let r = h
        .post("/v1/chat/completions", &key, &chat(true, 1_000_000))
        .await;
    let text = to_the_end(r).await;
    let last = *events(&text).last().unwrap();
    assert!(last.contains("longer than allowed"), "{last}");
    assert!(!h.last_usage(&u.id).await.success);
    h.assert_ledger().await;
}

#[tokio::test]
async fn a_broken_stream_is_charged_what_was_delivered_not_what_the_node_claimed() {
    let h = host().await;
    let (node, p, _) = h.stand_in("liar", Service::Chat, MODEL).await;
    node.set(Behavior::CutAfterUsage);
    node.set_usage(Some(Usage {
        prompt_tokens: 1_000_000,
        completion_tokens: 1_000_000,
        total_tokens: 2_000_000,
    }));
    let (u, key) = h.user(Credits::whole(1)).await;
    let r = h
        .post("/v1/chat/completions", &key, &chat(true, 1_000))
        .await;
    let text = r.text().await.unwrap();
    assert!(events(&text).last().unwrap().contains("stream_interrupted"));
    let rec = h.last_usage(&u.id).await;
    assert!(!rec.success);
    assert_eq!(rec.output_tokens, 5, "five content chunks were delivered");
    assert!(
        rec.input_tokens < 1_000,
        "input claimed: {}",
        rec.input_tokens
    );
    assert_eq!(h.earnings(&p.id).await, Credits::ZERO);
    h.assert_ledger().await;
}

#[tokio::test]
async fn a_caller_that_stops_reading_is_settled_for_what_was_passed_on() {
    let h = host_with(|c| c.client_send_timeout = Duration::from_millis(300)).await;
    let (node, p, _) = h.stand_in("firehose", Service::Chat, MODEL).await;
    node.set(Behavior::EndlessStream);
    let (u, key) = h.user(Credits::whole(10)).await;
    // A client that sends its request and never reads a byte of the answer.
    let body = chat(true, 1_000_000).to_string();
    let addr = h.url.trim_start_matches("http://");
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        key.expose(),
        body.len()
    );
    sock.write_all(req.as_bytes()).await.unwrap();
    let rec = settled(&h, &u.id).await;
    assert!(rec.output_tokens > 0);
    assert!(rec.charged > Credits::ZERO, "the stream was free");
    node.abandoned().await;
    assert!(h.earnings(&p.id).await > Credits::ZERO);
    h.assert_ledger().await;
    drop(sock);
}

/// The call answers (its head) once the stream's first bytes came, though
/// no event is complete yet, so a caller that leaves then is seen to leave:
/// the node's answer is dropped, and the call settled, at once rather than
/// when the stream's time runs out.
#[tokio::test]
async fn a_caller_that_hangs_up_before_a_streams_first_event_is_let_go_at_once() {
    // A node may be silent for two minutes mid-stream: far past the bound
    // below, so only the caller's leaving can end this call in time.
    let h = host_with(|c| c.idle_timeout = Duration::from_secs(120)).await;
    let (node, _, _) = h.stand_in("mute", Service::Chat, MODEL).await;
    node.set(Behavior::StallMidEvent);
    let (u, key) = h.user(Credits::whole(1)).await;
    // A bound on a hang only: the head comes as soon as the node's first
    // bytes do.
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        h.post("/v1/chat/completions", &key, &chat(true, 100)),
    )
    .await
    .expect("the head comes before any event");
    assert_eq!(r.status(), 200);
    drop(r);
    tokio::time::timeout(Duration::from_secs(20), node.abandoned())
        .await
        .expect("the node's answer is dropped once the caller left");
    let rec = settled(&h, &u.id).await;
    assert_eq!(rec.output_tokens, 0);
    h.assert_ledger().await;
}

#[tokio::test]
async fn a_caller_that_hangs_up_before_a_plain_answer_is_settled_at_once() {
    let h = host().await;
    let (node, p, _) = h.stand_in("slow", Service::Chat, MODEL).await;
    node.set(Behavior::Slow(Duration::from_millis(300)));
    let (u, key) = h.user(Credits::whole(1)).await;
    let gone = h
        .post_request("/v1/chat/completions", &key, &chat(false, 100))
        .timeout(Duration::from_millis(50))
        .send()
        .await;
    assert!(gone.is_err(), "the caller hung up first");
    let rec = settled(&h, &u.id).await;
    assert!(rec.success, "the node did the work it was asked for");
    assert!(rec.charged > Credits::ZERO);
    assert_eq!(h.earnings(&p.id).await, Credits(500));
    h.assert_ledger().await;
}

#[tokio::test]
async fn a_refusing_node_never_speaks_to_users_and_loses_its_traffic() {
    let h = host().await;
    let (_honest, _, _) = h.stand_in("honest", Service::Chat, MODEL).await;
    let (liar, _, liar_id) = h.stand_in("liar", Service::Chat, MODEL).await;
    liar.set(Behavior::Refuse(CRAFTED.into()));
    let (_, key) = h.user(Credits::whole(10)).await;
    for i in 0..60usize {
        let r = h
            .post(
                "/v1/chat/completions",
                &key,
                &chat(i.is_multiple_of(2), 100),
            )
            .await;
        assert_eq!(r.status(), 200, "call {i}");
        let text = r.text().await.unwrap();
        assert!(!text.contains("evil.example"), "call {i}: {text}");
    }
    let stats = h.broker.network().node_status(&liar_id).unwrap();
    assert_eq!(
        stats.failures as usize,
        liar.hits(),
        "refusals another node contradicted count as failures"
    );
    assert!(liar.hits() < 30, "the liar got {} of 60 calls", liar.hits());
    h.assert_ledger().await;
}

#[tokio::test]
async fn refusals_confirmed_by_two_nodes_are_a_400_in_the_brokers_words() {
    let h = host().await;
    let mut ids = Vec::new();
    let mut nodes = Vec::new();
    for name in ["a", "b"] {
        let (n, _, id) = h.stand_in(name, Service::Chat, MODEL).await;
        n.set(Behavior::Refuse(CRAFTED.into()));
        nodes.push(n);
        ids.push(id);
    }
    let (u, key) = h.user(Credits::whole(1)).await;
    let r = h
        .post("/v1/chat/completions", &key, &chat(false, 100))
        .await;
    assert_eq!(r.status(), 400);
    let e: ErrorBody = r.json().await.unwrap();
    assert!(!e.error.message.contains("evil"), "{}", e.error.message);
    assert_eq!(nodes.iter().map(StandInNode::hits).sum::<usize>(), 2);
    assert!(ids.iter().all(|id| h.is_routable(id)));
    assert_eq!(h.balance(&u.id).await, Credits::whole(1));
    h.assert_ledger().await;
}

#[tokio::test]
async fn a_node_failure_never_shows_the_nodes_address() {
    let h = host().await;
    let (p, _) = h.provider().await;
    let dead = StandInNode::dead_url().await;
    h.add_node_at(&p, &dead, Service::Chat, MODEL, None).await;
    let (_, key) = h.user(Credits::whole(1)).await;
    let r = h
        .post("/v1/chat/completions", &key, &chat(false, 100))
        .await;
    assert_eq!(r.status(), 502);
    let e: ErrorBody = r.json().await.unwrap();
    let port = dead.rsplit(':').next().unwrap();
    assert!(
        !e.error.message.contains("127.0.0.1") && !e.error.message.contains(port),
        "{}",
        e.error.message
    );
    h.assert_ledger().await;
}

#[tokio::test]
async fn a_hung_node_is_hedged_around_and_ejected_at_its_first_timeout() {
    // Two nodes, calls one at a time: which calls reach the hung node is
    // then decided by the selector alone (the fault run in the README shows
    // three nodes and eight callers at a time).
    let h = host().await;
    let (_ok, _, _) = h.stand_in("healthy", Service::Chat, MODEL).await;
    let (hung, _, hung_id) = h.stand_in("hung", Service::Chat, MODEL).await;
    hung.set(Behavior::Hang);
    let (_, key) = h.user(Credits::whole(100)).await;
    let calls = |from: usize| {
        let h = &h;
        let key = &key;
        async move {
            for i in from..from + 20 {
                let body = chat(i.is_multiple_of(2), 100);
                let r = h.post("/v1/chat/completions", key, &body).await;
                assert_eq!(r.status(), 200, "call {i}");
                let text = r.text().await.unwrap();
                assert!(!text.contains("stream_interrupted"), "{text}");
            }
        }
    };
    calls(0).await;
    // The hung node's first timeout (in the background: no caller waits
    // for it) takes it out of routing.
    for _ in 0..600 {
        if !h.is_routable(&hung_id) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!h.is_routable(&hung_id), "the hung node stays");
    // One call reached it: its wait made the node the slowest at once, so
    // no later call went there; and that call was hedged on the other node.
    assert_eq!(hung.hits(), 1);
    let failures = h.broker.network().node_status(&hung_id).unwrap().failures;
    assert_eq!(failures, 1, "ejected at its first timeout");
    let page = reqwest::get(format!("{}/metrics", h.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let hedges: f64 = page
        .lines()
        .filter(|l| l.starts_with("cxmpute_hedges_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(hedges, 1.0, "the call to the hung node was hedged:\n{page}");
    calls(20).await;
    assert_eq!(
        hung.hits(),
        1,
        "a call reached the hung node after it timed out"
    );
    h.assert_ledger().await;
}

#[tokio::test]
async fn settings_that_let_a_call_outlive_its_reservation_are_refused() {
    let mut cfg = test_config();
    cfg.reservation_ttl = Duration::from_secs(60);
    cfg.max_stream_duration = Duration::from_secs(120);
    let built = Broker::builder(Arc::new(MemoryStore::new()))
        .config(cfg)
        .build()
        .await;
    assert!(matches!(built, Err(Error::InvalidInput(_))), "{built:?}");
}

#[tokio::test]
async fn statistics_count_a_settlement_whose_answer_was_lost_once() {
    // On a store hosts share (reserved, then settled; or held from a credit
    // lease, then settled against it) and on one this host owns (held in
    // memory, then settled at once).
    use cxmpute_core::testkit::InstrumentedStore;
    for (store, leases, settle) in [
        (InstrumentedStore::new().shared(), false, "settle"),
        (InstrumentedStore::new().shared(), true, "settle_leased"),
        (InstrumentedStore::new(), true, "settle_held"),
    ] {
        a_lost_settlement_answer_is_counted_once(Arc::new(store), leases, settle).await;
    }
}

async fn a_lost_settlement_answer_is_counted_once(
    store: Arc<cxmpute_core::testkit::InstrumentedStore>,
    leases: bool,
    settle: &'static str,
) {
    // The store applies the settle and then reports a failure; the retry
    // finds it settled and must count it, once.
    store.lose_next_answer(settle);
    let mut config = test_config();
    config.credit_leases = leases;
    let h = TestHost::start_market_with(store.clone(), Credits(500), |b| b.config(config)).await;
    let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    let (u, key) = h.user(Credits::whole(1)).await;
    let r = h
        .post("/v1/chat/completions", &key, &chat(false, 100))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(store.lost_answers(), 1);
    h.broker.flush_stats().await.unwrap();
    let day = h.broker.now().day();
    let scope = cxmpute_core::stats::scope::user(&u.id);
    let rows = store.inner.stats(&scope, day, day).await.unwrap();
    assert_eq!(rows[0].1.requests, 1);
    assert_eq!(
        rows[0].1.charged,
        h.last_usage(&u.id).await.charged.as_micros()
    );
    h.assert_ledger().await;
}
