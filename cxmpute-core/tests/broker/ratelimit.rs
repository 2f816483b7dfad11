//! Rate limits per key (requests and tokens per minute) over real sockets:
//! set by the key's owner and by an admin, a call over a limit refused with
//! OpenAI's 429 and headers before anything is held or forwarded, every
//! answer after authentication carrying the `x-ratelimit-*` headers, and
//! the window starting again on the test clock.

use std::sync::Arc;
use std::time::Duration;

use cxmpute_core::testkit::{InstrumentedStore, StandInNode, TestHost};
use cxmpute_core::wire::*;
use cxmpute_core::*;
use serde_json::{json, Value};

use crate::common::{self, call, chat, expect_error, host, sign_in, MODEL};

/// The key id of the first key `user` holds.
async fn key_id(h: &TestHost, user: &UserId) -> ApiKeyId {
    let keys = h.broker.store().api_keys(user).await.unwrap();
    keys[0].id.clone()
}

/// An admin's `PATCH /v1/admin/keys/{id}` with `body`.
async fn admin_patch(h: &TestHost, id: &ApiKeyId, body: Value) -> reqwest::Response {
    call(h, "PATCH", format!("/v1/admin/keys/{id}"))
        .bearer(h.admin_key.expose())
        .json(body)
        .send()
        .await
}

fn header<'a>(r: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    r.headers().get(name).map(|v| v.to_str().unwrap())
}

/// The six `x-ratelimit-*` headers of an answer, `None` where absent:
/// limit, remaining and reset of requests, then of tokens.
fn limits(r: &reqwest::Response) -> [Option<String>; 6] {
    [
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
    ]
    .map(|n| header(r, n).map(str::to_owned))
}

fn some(v: &str) -> Option<String> {
    Some(v.to_owned())
}

/// A host, its clock 10 s into a minute, one chat node, and a user.
async fn setup(store: Arc<dyn Store>) -> (TestHost, StandInNode, User, Secret) {
    let h = common::host_on(store, Arc::new(common::RecordingMailer::default())).await;
    h.clock.advance(Duration::from_secs(10));
    let (node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    let (user, key) = h.user(Credits::whole(10)).await;
    (h, node, user, key)
}

#[tokio::test]
async fn the_61st_call_in_a_minute_is_refused_with_openai_headers() {
    let store = Arc::new(InstrumentedStore::new());
    let (h, node, user, key) = setup(store.clone()).await;
    let id = key_id(&h, &user.id).await;
    let r = admin_patch(&h, &id, json!({"rpm": 60})).await;
    assert_eq!(r.status(), 200);
    let view: ApiKeyView = r.json().await.unwrap();
    assert_eq!((view.rpm, view.tpm), (Some(60), None));

    for i in 1..=60u32 {
        let r = h.post("/v1/chat/completions", &key, &chat()).await;
        assert_eq!(r.status(), 200, "call {i}");
        let remaining = (60 - i).to_string();
        assert_eq!(
            limits(&r),
            [some("60"), Some(remaining), some("50s"), None, None, None],
            "call {i}: no tokens limit, no tokens headers"
        );
    }
    let balance = h.balance(&user.id).await;
    let settled = h.broker.store().ledger_totals().await.unwrap().settlements;
    store.take_calls();

    let r = h.post("/v1/chat/completions", &key, &chat()).await;
    let store_calls = store.take_calls();
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "retry-after"), Some("50"));
    assert_eq!(
        limits(&r),
        [some("60"), some("0"), some("50s"), None, None, None]
    );
    let e: ErrorBody = r.json().await.unwrap();
    assert_eq!(e.error.code.as_deref(), Some("rate_limit_exceeded"));
    assert_eq!(e.error.kind, "requests");
    assert!(
        e.error.message.contains("Limit 60, Used 60, Requested 1"),
        "{}",
        e.error.message
    );
    // Refused before anything: not forwarded, held, charged or recorded,
    // and no store call at all.
    assert_eq!(node.hits(), 60);
    assert_eq!(h.balance(&user.id).await, balance);
    let totals = h.broker.store().ledger_totals().await.unwrap();
    assert_eq!(
        (totals.settlements, totals.reserved),
        (settled, Credits::ZERO)
    );
    assert_eq!(store_calls, Default::default());

    // Seconds later it is still refused, and says for how much longer.
    h.clock.advance(Duration::from_millis(2_500));
    let r = h.post("/v1/chat/completions", &key, &chat()).await;
    assert_eq!(header(&r, "retry-after"), Some("48"));
    assert_eq!(header(&r, "x-ratelimit-reset-requests"), Some("48s"));
    expect_error(r, 429, "rate_limit_exceeded").await;

    // The next minute starts the window again.
    h.clock.advance(Duration::from_millis(47_500));
    let r = h.post("/v1/chat/completions", &key, &chat()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(limits(&r)[..3], [some("60"), some("59"), some("1m0s")]);
    h.assert_ledger().await;
}

#[tokio::test]
async fn a_tokens_limit_counts_the_bound_then_what_was_used() {
    let (h, node, user, key) = setup(Arc::new(MemoryStore::new())).await;
    let id = key_id(&h, &user.id).await;
    assert_eq!(
        admin_patch(&h, &id, json!({"tpm": 1_000})).await.status(),
        200
    );
    let ask = |max_tokens: u32| {
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
               "max_tokens": max_tokens})
    };
    let body_len = |v: &Value| serde_json::to_vec(v).unwrap().len() as u64;

    // Counted at admission: the body's bytes and the output limit.
    let big = ask(800);
    let bound = body_len(&big) + 800;
    let r = h.post("/v1/chat/completions", &key, &big).await;
    assert_eq!(r.status(), 200);
    let shown = limits(&r);
    assert_eq!(shown[..3], [None, None, None], "no requests limit");
    assert_eq!(shown[3], some("1000"));
    assert_eq!(shown[4], Some((1_000 - bound).to_string()));
    assert_eq!(shown[5], some("50s"));
    // Settled at 10 + 5 tokens: the rest came back, so another fits.
    let r = h.post("/v1/chat/completions", &key, &big).await;
    assert_eq!(r.status(), 200);
    assert_eq!(limits(&r)[4], Some((1_000 - 15 - bound).to_string()));

    // A node using all it may: its bound stays counted, the next is refused.
    node.set_usage(Some(Usage {
        prompt_tokens: 100_000,
        completion_tokens: 100_000,
        total_tokens: 200_000,
    }));
    let small = ask(100);
    let small_bound = body_len(&small) + 100;
    let mut used = 30;
    while used + small_bound <= 1_000 {
        assert_eq!(
            h.post("/v1/chat/completions", &key, &small).await.status(),
            200
        );
        used += small_bound;
    }
    let hits = node.hits();
    let r = h.post("/v1/chat/completions", &key, &small).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "retry-after"), Some("50"));
    assert_eq!(limits(&r)[4], Some((1_000 - used).to_string()));
    let e: ErrorBody = r.json().await.unwrap();
    assert_eq!(
        (e.error.code.as_deref(), e.error.kind.as_str()),
        (Some("rate_limit_exceeded"), "tokens")
    );
    assert_eq!(node.hits(), hits, "not forwarded");

    // A call larger than the whole limit can never pass, and says so.
    let r = h.post("/v1/chat/completions", &key, &ask(2_000)).await;
    let msg = expect_error(r, 429, "rate_limit_exceeded").await;
    assert!(msg.contains("Request too large"), "{msg}");

    // Removing the limit (null) lets calls through at once, headers gone.
    assert_eq!(
        admin_patch(&h, &id, json!({"tpm": null})).await.status(),
        200
    );
    let r = h.post("/v1/chat/completions", &key, &small).await;
    assert_eq!(r.status(), 200);
    assert_eq!(limits(&r), [None, None, None, None, None, None]);
    h.assert_ledger().await;
}

#[tokio::test]
async fn refusals_after_authentication_carry_the_headers_and_count_nothing() {
    let (h, _node, user, key) = setup(Arc::new(MemoryStore::new())).await;
    let id = key_id(&h, &user.id).await;
    let r = admin_patch(&h, &id, json!({"rpm": 2, "tpm": 100_000})).await;
    assert_eq!(r.status(), 200);
    // An unknown model: refused, shown, not counted.
    let unknown = json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]});
    let r = h.post("/v1/chat/completions", &key, &unknown).await;
    assert_eq!(r.status(), 404);
    assert_eq!(
        limits(&r),
        [
            some("2"),
            some("2"),
            some("50s"),
            some("100000"),
            some("100000"),
            some("50s")
        ]
    );
    // Short of credits: refused after the limits, which give the call back.
    let (poor, poor_key) = h.user(Credits::ZERO).await;
    let poor_id = key_id(&h, &poor.id).await;
    assert_eq!(
        admin_patch(&h, &poor_id, json!({"rpm": 2})).await.status(),
        200
    );
    let r = h.post("/v1/chat/completions", &poor_key, &chat()).await;
    assert_eq!(r.status(), 402);
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), Some("2"));
    // Before authentication nothing is known: no headers.
    let stranger = Secret::new("cx-not-a-key");
    let r = h.post("/v1/chat/completions", &stranger, &chat()).await;
    assert_eq!(r.status(), 401);
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), None);
    // An unlimited key shows none.
    let (_, free) = h.user(Credits::whole(1)).await;
    let r = h.post("/v1/chat/completions", &free, &chat()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(limits(&r), [None, None, None, None, None, None]);
    h.assert_ledger().await;
}

#[tokio::test]
async fn owners_set_their_own_keys_limits_and_bad_values_are_refused() {
    let (h, outbox) = host().await;
    h.clock.advance(Duration::from_secs(10));
    let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    let (alice, alice_key) = h.user(Credits::whole(5)).await;
    let (bob, _) = h.user(Credits::whole(5)).await;
    let session = sign_in(&h, &outbox, &alice.email).await;
    let token = session.access_token.expose().to_owned();
    let alice_id = key_id(&h, &alice.id).await;
    let bob_id = key_id(&h, &bob.id).await;
    let patch = |id: &ApiKeyId, body: Value| {
        call(&h, "PATCH", format!("/v1/me/keys/{id}"))
            .bearer(&token)
            .json(body)
    };

    let view: ApiKeyView = patch(&alice_id, json!({"rpm": 1, "tpm": 5_000})).ok().await;
    assert_eq!((view.rpm, view.tpm), (Some(1), Some(5_000)));
    let listed: Vec<ApiKeyView> = call(&h, "GET", "/v1/me/keys").bearer(&token).ok().await;
    assert_eq!((listed[0].rpm, listed[0].tpm), (Some(1), Some(5_000)));
    // Applied at once on this host.
    assert_eq!(
        h.post("/v1/chat/completions", &alice_key, &chat())
            .await
            .status(),
        200
    );
    let r = h.post("/v1/chat/completions", &alice_key, &chat()).await;
    expect_error(r, 429, "rate_limit_exceeded").await;

    // Another's key: as if it did not exist.
    let r = patch(&bob_id, json!({"rpm": 1})).send().await;
    expect_error(r, 404, "not_found").await;
    let bob_key = h.broker.store().api_keys(&bob.id).await.unwrap();
    assert_eq!(bob_key[0].rate_limits, RateLimits::NONE);

    // Bad values: OpenAI error JSON, nothing changed.
    for bad in [
        json!({"rpm": 0}),
        json!({"tpm": 0}),
        json!({"rpm": 100_000_001}),
        json!({"tpm": 1_000_000_000_000_001u64}),
    ] {
        let r = patch(&alice_id, bad.clone()).send().await;
        let msg = expect_error(r, 400, "invalid_request").await;
        assert!(
            msg.contains("`rpm`") || msg.contains("`tpm`"),
            "{bad}: {msg}"
        );
    }
    // Not a count at all: refused as the body's JSON.
    for bad in [
        json!({"rpm": -1}),
        json!({"rpm": "60"}),
        json!({"rpm": 1.5}),
        json!({"rpm": 4_294_967_296u64}),
        json!({"tpm": -5}),
    ] {
        let r = patch(&alice_id, bad.clone()).send().await;
        let msg = expect_error(r, 400, "invalid_request").await;
        assert!(msg.contains("invalid"), "{bad}: {msg}");
    }
    let r = admin_patch(&h, &alice_id, json!({"rpm": 0})).await;
    expect_error(r, 400, "invalid_request").await;
    let r = admin_patch(&h, &ApiKeyId::new("key_missing"), json!({"rpm": 5})).await;
    expect_error(r, 404, "not_found").await;
    let k = h.broker.store().api_keys(&alice.id).await.unwrap();
    assert_eq!(
        k[0].rate_limits,
        RateLimits {
            rpm: Some(1),
            tpm: Some(5_000)
        }
    );

    // `null` removes one limit and leaves the other.
    let view: ApiKeyView = patch(&alice_id, json!({"rpm": null})).ok().await;
    assert_eq!((view.rpm, view.tpm), (None, Some(5_000)));
    assert_eq!(
        h.post("/v1/chat/completions", &alice_key, &chat())
            .await
            .status(),
        200
    );
    // A user's session is no admin: the admin route refuses it.
    let r = call(&h, "PATCH", format!("/v1/admin/keys/{bob_id}"))
        .bearer(&token)
        .json(json!({"rpm": 1}))
        .send()
        .await;
    assert_eq!(r.status(), 403);
    h.assert_ledger().await;
}

#[tokio::test]
async fn an_accounts_limit_covers_all_its_keys() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let h = TestHost::start_market_with(store, Credits(500), |b| {
        let mut c = cxmpute_core::testkit::test_config();
        c.account_rate_limits = RateLimits {
            rpm: Some(3),
            tpm: None,
        };
        b.config(c)
    })
    .await;
    let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    let (user, first) = h.user(Credits::whole(5)).await;
    let (_, second) = h
        .broker
        .admin()
        .create_api_key(&user.id, "second", None, Vec::new())
        .await
        .unwrap();
    for key in [&first, &second, &first] {
        assert_eq!(
            h.post("/v1/chat/completions", key, &chat()).await.status(),
            200
        );
    }
    let r = h.post("/v1/chat/completions", &second, &chat()).await;
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), Some("3"));
    let msg = expect_error(r, 429, "rate_limit_exceeded").await;
    assert!(msg.contains("this account"), "{msg}");
    // Another account is not held back by it.
    let (_, other) = h.user(Credits::whole(5)).await;
    assert_eq!(
        h.post("/v1/chat/completions", &other, &chat())
            .await
            .status(),
        200
    );
    h.assert_ledger().await;
}

#[tokio::test]
async fn on_a_shared_store_a_limited_keys_calls_take_slices_not_a_store_call_each() {
    // Without credit leases every call reserves and settles in the store:
    // what is left over is the rate limit's own cost.
    let store = Arc::new(InstrumentedStore::new().shared());
    let h = TestHost::start_market_with(store.clone(), Credits(500), |b| {
        let mut c = cxmpute_core::testkit::test_config();
        c.credit_leases = false;
        b.config(c)
    })
    .await;
    let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    let (user, key) = h.user(Credits::whole(100)).await;
    let id = key_id(&h, &user.id).await;
    let limits = json!({"rpm": 6_400, "tpm": 100_000_000});
    assert_eq!(admin_patch(&h, &id, limits).await.status(), 200);
    store.take_calls();
    const CALLS: usize = 400;
    for _ in 0..CALLS {
        let r = h.post("/v1/chat/completions", &key, &chat()).await;
        assert_eq!(r.status(), 200);
    }
    let calls = store.take_calls();
    let takes = calls.get("add_rate_usage").copied().unwrap_or(0);
    eprintln!("{takes} rate-limit takes for {CALLS} calls: {calls:?}");
    // A slice is a sixteenth of each limit (400 requests, 6.25M tokens): the
    // first take, and one refill ahead of need.
    assert!(takes <= 3, "{takes} takes: {calls:?}");
    assert_eq!(calls.get("reserve"), Some(&CALLS));
    h.assert_ledger().await;
}
