//! An answered call is a charged call: an answer (or a stream's end) goes
//! out only once its settlement committed. A store made to fail settles
//! (the instrumented store around the real memory store) turns a served
//! call into a clear 503 that says nothing was charged (a chat stream ends
//! with an error event instead of `[DONE]`, an audio body breaks once part
//! of it went out), on
//! every way a host admits calls: from memory (a store it owns), from
//! credit leases, and through reservations in the store.

use std::sync::Arc;

use cxmpute_core::testkit::{expect_error, InstrumentedStore, TestHost, MODEL};
use cxmpute_core::*;
use serde_json::{json, Value};

use crate::common::{chat_status, price_per_call};

/// How a host admits calls, and the store call that settles them.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// From memory, on a store it owns.
    Owned,
    /// From credit leases, on a store said to be shared.
    Leased,
    /// Through a reservation in the store, leases off.
    Reserved,
}

const MODES: [Mode; 3] = [Mode::Owned, Mode::Leased, Mode::Reserved];

impl Mode {
    fn settle_call(self) -> &'static str {
        match self {
            Mode::Owned => "settle_held",
            Mode::Leased => "settle_leased",
            Mode::Reserved => "settle",
        }
    }
}

async fn host(mode: Mode) -> (TestHost, Arc<InstrumentedStore>) {
    let store = match mode {
        Mode::Owned => InstrumentedStore::new(),
        Mode::Leased | Mode::Reserved => InstrumentedStore::new().shared(),
    };
    let store = Arc::new(store);
    let mut config = cxmpute_core::testkit::test_config();
    config.credit_leases = mode == Mode::Leased;
    // The clock moves past the reservation TTL: the node stays routable.
    config.heartbeat_ttl = std::time::Duration::from_secs(1 << 30);
    let h = TestHost::start_with(store.clone(), |b| b.config(config)).await;
    (h, store)
}

/// Every try a settlement gets fails.
const TRIES: usize = 5;

/// After the TTL, every hold a failed settlement left (a reservation, a
/// lease) is back with its account: only the served calls were charged.
async fn settles_to(h: &TestHost, user: &UserId, start: i64, served: u64) {
    h.clock.advance(h.broker.config().reservation_ttl);
    h.broker.run_maintenance().await.unwrap();
    h.clock.advance(std::time::Duration::from_secs(1));
    h.broker.run_maintenance().await.unwrap();
    let t = h.broker.store().ledger_totals().await.unwrap();
    let charged = Credits(1_000 * i64::try_from(served).unwrap());
    assert_eq!((t.charged, t.reserved), (charged, Credits::ZERO));
    // A reservation left behind is released by the sweep, with a record of
    // its own that charged nothing.
    let records = h.broker.store().usage_records(user, 100).await.unwrap();
    let paid = records.iter().filter(|r| r.charged > Credits::ZERO).count();
    assert_eq!(paid, usize::try_from(served).unwrap());
    assert_eq!(h.balance(user).await, Credits(start - charged.0));
    h.assert_ledger().await;
}

#[tokio::test]
async fn a_served_call_whose_settlement_fails_is_a_503_that_charges_nothing() {
    for mode in MODES {
        let (h, store) = host(mode).await;
        let (node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
        price_per_call(&h).await;
        let (user, key) = h.user(Credits(10_000)).await;
        assert_eq!(chat_status(&h, &key).await, 200, "{mode:?}");

        store.fail_next(mode.settle_call(), TRIES);
        let r = h
            .post("/v1/chat/completions", &key, &crate::common::chat())
            .await;
        assert_eq!(r.headers().get("retry-after").unwrap(), "1", "{mode:?}");
        let message = expect_error(r, 503, "not_charged").await;
        assert!(message.contains("nothing was charged"), "{message}");
        // The node did answer: the answer was withheld, not lost upstream.
        assert_eq!(node.hits(), 2, "{mode:?}");

        // The store is back: the next call is served and charged.
        assert_eq!(chat_status(&h, &key).await, 200, "{mode:?}");
        settles_to(&h, &user.id, 10_000, 2).await;
    }
}

#[tokio::test]
async fn a_settlement_whose_answer_was_lost_is_found_committed_and_the_call_answered() {
    for mode in MODES {
        let (h, store) = host(mode).await;
        let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
        price_per_call(&h).await;
        let (user, key) = h.user(Credits(10_000)).await;
        assert_eq!(chat_status(&h, &key).await, 200, "{mode:?}");
        store.take_calls();
        store.lose_next_answer(mode.settle_call());
        assert_eq!(chat_status(&h, &key).await, 200, "{mode:?}");
        assert_eq!(store.lost_answers(), 1);
        // A call held outside the store has no reservation the stale sweep
        // could settle: the repeat is its own, and not read back. A
        // reservation's repeat is read, to tell it from the sweep's.
        let calls = store.take_calls();
        assert_eq!(
            calls.contains_key("settlement"),
            mode == Mode::Reserved,
            "{mode:?}: {calls:?}"
        );
        settles_to(&h, &user.id, 10_000, 2).await;
    }
}

/// The `data:` events of a stream, in order.
fn events(text: &str) -> Vec<&str> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect()
}

#[tokio::test]
async fn a_stream_ends_with_done_once_charged_and_with_an_error_event_when_its_settlement_fails() {
    for mode in MODES {
        let (h, store) = host(mode).await;
        let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
        price_per_call(&h).await;
        let (user, key) = h.user(Credits(10_000)).await;
        let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
            "stream": true, "stream_options": {"include_usage": true}});

        // Charged: the usage chunk and `[DONE]` end it.
        let text = (h.post("/v1/chat/completions", &key, &body).await)
            .text()
            .await
            .unwrap();
        let ev = events(&text);
        assert_eq!(ev.last(), Some(&"[DONE]"), "{mode:?}: {text}");
        let usage: Value = serde_json::from_str(ev[ev.len() - 2]).unwrap();
        assert!(usage["usage"].is_object(), "{text}");

        // Not charged: the content came, then an error event in place of
        // the end.
        store.fail_next(mode.settle_call(), TRIES);
        let r = h.post("/v1/chat/completions", &key, &body).await;
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap();
        let ev = events(&text);
        assert!(
            !text.contains("[DONE]") && !text.contains("\"usage\""),
            "{text}"
        );
        assert!(text.contains("\" node\""), "{text}");
        let last: Value = serde_json::from_str(ev.last().unwrap()).unwrap();
        assert_eq!(last["error"]["code"], "not_charged", "{text}");
        assert_eq!(last["error"]["type"], "service_unavailable");
        settles_to(&h, &user.id, 10_000, 1).await;
    }
}

/// A node that speaks: a few kilobytes of audio for any text, all at once.
async fn audio_node() -> String {
    serve_audio(axum::routing::post(|| async {
        ([("content-type", "audio/wav")], vec![7u8; 4_000])
    }))
    .await
}

/// A node that speaks in two halves: the second only once `release` is
/// notified, so the host has passed the first on by then.
async fn audio_node_in_halves(release: Arc<tokio::sync::Notify>) -> String {
    serve_audio(axum::routing::post(move || {
        let release = release.clone();
        async move {
            let halves = futures::stream::unfold(0, move |i| {
                let release = release.clone();
                async move {
                    match i {
                        0 => Some((Ok::<_, std::io::Error>(vec![7u8; 2_000]), 1)),
                        1 => {
                            release.notified().await;
                            Some((Ok(vec![7u8; 2_000]), 2))
                        }
                        _ => None,
                    }
                }
            });
            (
                [("content-type", "audio/wav")],
                axum::body::Body::from_stream(halves),
            )
        }
    }))
    .await
}

async fn serve_audio(route: axum::routing::MethodRouter) -> String {
    let app = axum::Router::new().route("/v1/audio/speech", route);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// An audio answer whose settlement fails charges nothing: refused as a
/// whole when it came at once (nothing had gone out yet), broken off when
/// part of it had been passed on.
#[tokio::test]
async fn an_audio_answer_whose_settlement_fails_charges_nothing() {
    for mode in MODES {
        for at_once in [true, false] {
            let (h, store) = host(mode).await;
            let (provider, _) = h.provider().await;
            let release = Arc::new(tokio::sync::Notify::new());
            let url = if at_once {
                audio_node().await
            } else {
                audio_node_in_halves(release.clone()).await
            };
            h.add_node_at(&provider, &url, Service::Tts, "kokoro", None)
                .await;
            let (user, key) = h.user(Credits::whole(10)).await;
            h.broker
                .admin()
                .put_price(PriceEntry {
                    service: Service::Tts,
                    model: None,
                    per_request: Credits(1_000),
                    per_million_input_tokens: Credits::ZERO,
                    per_million_output_tokens: Credits::ZERO,
                    per_million_units: Credits::ZERO,
                })
                .await
                .unwrap();
            let body = json!({"model": "kokoro", "input": "hello there", "voice": "alloy"});
            let r = h.post("/v1/audio/speech", &key, &body).await;
            assert_eq!(r.status(), 200, "{mode:?}");
            release.notify_one();
            assert_eq!(r.bytes().await.unwrap().len(), 4_000, "{mode:?}");
            let charged = h.broker.store().ledger_totals().await.unwrap().charged;
            assert!(charged > Credits::ZERO);

            // Nothing more is charged than the first answer.
            store.fail_next(mode.settle_call(), TRIES);
            let r = h.post("/v1/audio/speech", &key, &body).await;
            if at_once {
                expect_error(r, 503, "not_charged").await;
            } else {
                assert_eq!(r.status(), 200);
                release.notify_one();
                assert!(r.bytes().await.is_err(), "{mode:?}: the body must break");
            }
            h.clock.advance(h.broker.config().reservation_ttl);
            h.broker.run_maintenance().await.unwrap();
            h.clock.advance(std::time::Duration::from_secs(1));
            h.broker.run_maintenance().await.unwrap();
            let t = h.broker.store().ledger_totals().await.unwrap();
            assert_eq!(
                (t.charged, t.reserved),
                (charged, Credits::ZERO),
                "{mode:?}"
            );
            assert_eq!(
                h.balance(&user.id).await,
                Credits(Credits::whole(10).0 - charged.0)
            );
            h.assert_ledger().await;
        }
    }
}
