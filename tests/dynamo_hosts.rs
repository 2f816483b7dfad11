//! Many hosts, one database: brokers on separate ports sharing one DynamoDB
//! table (a DynamoDB-compatible server on loopback), and a database that goes
//! away and comes back.
//!
//! Needs `CXMPUTE_TEST_DYNAMO_ENDPOINT`; without it the tests print a skip
//! notice, unless `CXMPUTE_REQUIRE_SERVICES=1` (then they fail).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cxmpute::dynamo::{DynamoConfig, DynamoStore, RequestGate, StaticCredentials};
use cxmpute_core::testkit::{InstrumentedStore, RecordingMailer, StandInNode, TestHost, MODEL};
use cxmpute_core::wire::ErrorBody;
use cxmpute_core::*;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};

#[path = "../cxmpute-core/tests/common/mod.rs"]
mod common;

fn endpoint() -> Option<String> {
    cxmpute_core::testkit::service_env("CXMPUTE_TEST_DYNAMO_ENDPOINT")
}

/// One request at a time to the test server from every store of this binary:
/// the server does not isolate concurrent transactions (see
/// `DynamoConfig::request_gate`); against DynamoDB no gate is used.
fn gate() -> RequestGate {
    static GATE: std::sync::OnceLock<RequestGate> = std::sync::OnceLock::new();
    GATE.get_or_init(|| RequestGate::new(1)).clone()
}

fn config(endpoint: &str, prefix: &str) -> DynamoConfig {
    let mut cfg = DynamoConfig::new(prefix)
        .with_endpoint(endpoint)
        .with_region("us-east-1")
        .with_credentials(StaticCredentials::new("testing", "testing"));
    cfg.request_gate = Some(gate());
    cfg.conflict_retries = 40;
    // Late in a run the test server takes seconds per transaction: wait
    // for it rather than abandon a request it is still running.
    cfg.attempt_timeout = Duration::from_secs(60);
    cfg.operation_timeout = Duration::from_secs(120);
    cfg
}

async fn store(cfg: DynamoConfig) -> Arc<DynamoStore> {
    let s = DynamoStore::connect(cfg).await.expect("connect");
    s.create_tables_if_missing().await.expect("table");
    Arc::new(s)
}

fn per_request_price(micros: i64) -> PriceEntry {
    PriceEntry {
        service: Service::Chat,
        model: None,
        per_request: Credits(micros),
        per_million_input_tokens: Credits::ZERO,
        per_million_output_tokens: Credits::ZERO,
        per_million_units: Credits::ZERO,
    }
}

/// A table prefix of its own for one test, starting with `tag`.
fn prefix(tag: char) -> String {
    format!("{tag}{}_", secret::random_token(10).to_lowercase())
}

/// A host on the shared tables under `prefix`.
async fn host(endpoint: &str, prefix: &str) -> TestHost {
    TestHost::start(store(config(endpoint, prefix)).await).await
}

/// Sets the chat price the tests charge (1,000 micro-credits a request)
/// through `h`.
async fn priced(h: &TestHost) {
    h.broker
        .admin()
        .put_price(per_request_price(1_000))
        .await
        .unwrap();
}

async fn chat(client: &reqwest::Client, url: &str, key: &Secret) -> u16 {
    let r = client
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(key.expose())
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    r.bytes().await.unwrap();
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hosts_share_nodes_credits_and_usage() {
    let Some(ep) = endpoint() else { return };
    let prefix = prefix('h');
    let a = host(&ep, &prefix).await;
    priced(&a).await;
    let b = host(&ep, &prefix).await;
    assert_eq!(
        b.broker.prices().get(Service::Chat, MODEL).per_request,
        Credits(1_000)
    );

    // A node registered through host A ...
    let node = StandInNode::start("shared").await;
    let (p, provider_key) = a.provider().await;
    let c = reqwest::Client::new();
    let reg = json!({"endpoint": node.url(), "services": [{"service": "chat", "model": MODEL}],
        "device": {"gpu": {"memory_mb": 8192}}});
    let r = c
        .post(format!("{}/v1/provider/provisions", a.url))
        .bearer_auth(provider_key.expose())
        .json(&reg)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    node.require_secret(v["node_secret"].as_str().unwrap());
    // ... is routable through host B once B refreshes its index (it does so
    // on its maintenance interval; here, explicitly).
    assert!(b.broker.models().data.is_empty());
    b.broker.refresh_pools().await.unwrap();
    assert_eq!(b.broker.models().data.len(), 1);

    // One user whose credits cover exactly 12 calls, 40 calls through both hosts.
    let (u, key) = a.user(Credits(12_000)).await;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let url = if i % 2 == 0 {
            a.url.clone()
        } else {
            b.url.clone()
        };
        let (c, key) = (c.clone(), key.clone());
        tasks.push(tokio::spawn(async move { chat(&c, &url, &key).await }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            200 => ok += 1,
            402 => {}
            s => panic!("unexpected status {s}"),
        }
    }
    assert_eq!(ok, 12, "exactly the covered calls succeed");
    let s = a.broker.store();
    assert_eq!(s.user(&u.id).await.unwrap().credits, Credits::ZERO);
    let totals = s.ledger_totals().await.unwrap();
    assert_eq!((totals.settlements, totals.charged), (12, Credits(12_000)));
    assert_eq!(totals.reserved, Credits::ZERO);
    assert_eq!(node.hits(), 12);
    assert_eq!(s.provider(&p.id).await.unwrap().earnings, totals.rewarded);

    // Usage recorded by both hosts adds up.
    a.broker.flush_stats().await.unwrap();
    b.broker.flush_stats().await.unwrap();
    let day = a.clock.now().day();
    let stats = s.stats(&format!("user:{}", u.id), day, day).await.unwrap();
    assert_eq!(stats.len(), 1);
    assert_eq!(stats[0].1.requests, 12);
    assert_eq!(stats[0].1.charged, 12_000);
    assert_eq!(s.usage_records(&u.id, 100).await.unwrap().len(), 12);
    b.assert_ledger().await;
    a.assert_ledger().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_calls_against_credits_for_fifty_serve_fifty_on_dynamodb() {
    let Some(ep) = endpoint() else { return };
    let prefix = prefix('f');
    let h = host(&ep, &prefix).await;
    let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    // From credit leases (the default), sized and refilled as calls come.
    common::fifty_of_200_calls_are_served(&h).await;
    let t = h.broker.store().ledger_totals().await.unwrap();
    assert_eq!((t.settlements, t.charged), (50, Credits(50_000)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_host_dropped_holding_a_credit_lease_gives_it_back_through_the_other_hosts_sweep() {
    let Some(ep) = endpoint() else { return };
    let prefix = prefix('d');
    let a = host(&ep, &prefix).await;
    priced(&a).await;
    let b = host(&ep, &prefix).await;
    let (_node, _, _) = a.stand_in("n", Service::Chat, MODEL).await;
    let (u, key) = a.user(Credits(10_000)).await;
    let c = reqwest::Client::new();
    // Leases of one, two and four calls: the last still holds three.
    for _ in 0..4 {
        assert_eq!(chat(&c, &a.url, &key).await, 200);
    }
    let s = b.broker.store();
    let held = s.ledger_totals().await.unwrap().reserved;
    assert!(held > Credits::ZERO, "host A holds a lease");
    assert_eq!(
        s.user(&u.id).await.unwrap().credits,
        Credits(10_000 - 4_000).saturating_sub(held)
    );

    // Host A goes away without handing anything back. Its lease outlives
    // the reservation TTL; B's maintenance sweeps it back to the account.
    drop(a);
    b.clock.advance(b.broker.config().reservation_ttl / 2);
    b.broker.run_maintenance().await.unwrap();
    assert_eq!(s.ledger_totals().await.unwrap().reserved, held, "not yet");
    b.clock
        .advance(b.broker.config().reservation_ttl / 2 + Duration::from_secs(1));
    b.broker.run_maintenance().await.unwrap();
    let totals = s.ledger_totals().await.unwrap();
    assert_eq!(totals.reserved, Credits::ZERO);
    assert_eq!((totals.settlements, totals.charged), (4, Credits(4_000)));
    assert_eq!(s.user(&u.id).await.unwrap().credits, Credits(6_000));
    assert_eq!(s.usage_records(&u.id, 100).await.unwrap().len(), 4);
}

// Slow on moto (about two minutes: each of its transactions copies the
// table), so it runs with `--ignored`; the same bound is checked on every
// run against the instrumented memory store in core's `admission` tests.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "takes minutes on moto; run with --ignored"]
async fn calls_of_one_account_from_credit_leases_cost_at_most_a_tenth_of_a_store_call_each() {
    let Some(ep) = endpoint() else { return };
    const CALLS: usize = 1_000;
    const CLIENTS: usize = 32;
    let prefix = prefix('r');
    // Late in the run moto takes seconds per transaction (it copies the
    // table for each): wait for it rather than time out, since a request
    // abandoned while moto still runs it would overlap the next.
    let inner = DynamoStore::connect(config(&ep, &prefix)).await.unwrap();
    inner.create_tables_if_missing().await.unwrap();
    let counted = Arc::new(InstrumentedStore::wrap(inner));
    let h = TestHost::start(counted.clone()).await;
    priced(&h).await;
    let (_node, _, _) = h.stand_in("n", Service::Chat, MODEL).await;
    let (_u, key) = h.user(Credits::whole(100)).await;
    let c = reqwest::Client::new();
    counted.take_calls();

    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (c, key, url, next) = (c.clone(), key.clone(), h.url.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::SeqCst) < CALLS {
                assert_eq!(chat(&c, &url, &key).await, 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let calls = counted.take_calls();
    let total: usize = calls.values().sum();
    let per_call = total as f64 / CALLS as f64;
    eprintln!("{total} store calls for {CALLS} calls ({per_call:.3} each): {calls:?}");
    assert!(
        per_call <= 0.1,
        "{per_call} store calls per call: {calls:?}"
    );
    h.assert_ledger().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_revoked_or_an_account_suspended_on_one_host_is_refused_on_another_within_the_bound()
{
    let Some(ep) = endpoint() else { return };
    let prefix = prefix('k');
    let a = host(&ep, &prefix).await;
    priced(&a).await;
    let b_store = DynamoStore::connect(config(&ep, &prefix)).await.unwrap();
    let b_store = Arc::new(InstrumentedStore::wrap(b_store));
    let b = TestHost::start(b_store.clone()).await;
    let (_node, _, _) = a.stand_in("n", Service::Chat, MODEL).await;
    b.broker.refresh_pools().await.unwrap();
    let c = reqwest::Client::new();

    // Two users, each key used on both hosts: both hold them in memory.
    let (u1, k1) = a.user(Credits::whole(1)).await;
    let (u2, k2) = a.user(Credits::whole(1)).await;
    for (h, k) in [(&a, &k1), (&a, &k2), (&b, &k1), (&b, &k2)] {
        assert_eq!(chat(&c, &h.url, k).await, 200);
    }
    // On host A: k1 revoked, u2 suspended. A refuses both at once.
    let store = a.broker.store();
    let id1 = store.api_key_by_hash(&k1.hash()).await.unwrap().id;
    let admin = store.user_by_email("admin@cxmpute.test").await.unwrap();
    let accounts = a.broker.accounts();
    accounts.revoke_key(&u1, &id1).await.unwrap();
    a.broker
        .admin()
        .suspend_user(&admin, &u2.id, "test")
        .await
        .unwrap();
    assert_eq!(chat(&c, &a.url, &k1).await, 401);
    assert_eq!(chat(&c, &a.url, &k2).await, 403);

    // Host B refuses both once the bound has passed on its own clock, from
    // what it read again: neither call reaches a reservation.
    b.clock.advance(b.broker.config().key_cache_ttl);
    b_store.take_calls();
    assert_eq!(chat(&c, &b.url, &k1).await, 401);
    assert_eq!(chat(&c, &b.url, &k2).await, 403);
    let calls = b_store.take_calls();
    assert_eq!(calls.get("reserve"), None, "{calls:?}");
    assert_eq!(calls["api_key_by_hash"], 2, "{calls:?}");
    a.assert_ledger().await;
}

/// A TCP relay in front of the database that can be cut and restored.
struct Relay {
    url: String,
    up: Arc<AtomicBool>,
    conns: Arc<parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Relay {
    async fn start(target: &str) -> Relay {
        let target = target
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (up2, conns2) = (up.clone(), conns.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !up2.load(Ordering::SeqCst) {
                    drop(inbound); // refused: closed at once
                    continue;
                }
                let target = target.clone();
                conns2.lock().push(tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                }));
            }
        });
        Relay { url, up, conns }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for c in self.conns.lock().drain(..) {
            c.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_is_a_clear_503_and_the_host_recovers() {
    let Some(ep) = endpoint() else { return };
    let relay = Relay::start(&ep).await;
    let prefix = prefix('u');
    let mut cfg = config(&relay.url, &prefix);
    cfg.max_attempts = 2;
    cfg.connect_timeout = Duration::from_millis(500);
    cfg.attempt_timeout = Duration::from_secs(2);
    cfg.operation_timeout = Duration::from_secs(4);
    let h = TestHost::start(store(cfg).await).await;
    priced(&h).await;
    let (node, _, _) = h.stand_in("n", Service::Chat, MODEL).await;
    let (u, key) = h.user(Credits::whole(1)).await;
    let c = reqwest::Client::new();

    assert_eq!(chat(&c, &h.url, &key).await, 200);
    relay.cut();
    let r = c
        .post(format!("{}/v1/chat/completions", h.url))
        .bearer_auth(key.expose())
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let e: ErrorBody = r.json().await.unwrap();
    assert_eq!(e.error.code.as_deref(), Some("unavailable"));
    relay.restore();
    assert_eq!(chat(&c, &h.url, &key).await, 200);

    // Both acknowledged calls are charged and recorded; the refused one is
    // not. What this host still holds in credit leases goes back once idle.
    h.clock.advance(h.broker.config().lease_idle);
    h.broker.run_maintenance().await.unwrap();
    let s = h.broker.store();
    let totals = s.ledger_totals().await.unwrap();
    assert_eq!((totals.settlements, totals.charged), (2, Credits(2_000)));
    assert_eq!(
        s.user(&u.id).await.unwrap().credits,
        Credits(1_000_000 - 2_000)
    );
    assert_eq!(s.usage_records(&u.id, 10).await.unwrap().len(), 2);
    assert_eq!(node.hits(), 2);
}

/// A PUT or DELETE of the catalogue on `host`, as its admin.
async fn catalogue_change(
    c: &reqwest::Client,
    host: &TestHost,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Value {
    let mut r = c
        .request(method, format!("{}/v1/admin/catalogue{path}", host.url))
        .bearer_auth(host.admin_key.expose());
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

async fn chat_model(c: &reqwest::Client, url: &str, key: &Secret, model: &str) -> (u16, Value) {
    let r = c
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(key.expose())
        .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn catalogue_changes_through_one_host_reach_routing_on_another() {
    let Some(ep) = endpoint() else { return };
    let prefix = prefix('c');
    let a = host(&ep, &prefix).await;
    let b = host(&ep, &prefix).await;
    priced(&a).await;
    let c = reqwest::Client::new();
    let model = "katan-echo:1b";

    // Added through host A: host B takes it from the store on its refresh.
    let put = json!({"service": "chat", "model": model, "min_tier": 1, "target_nodes": 2});
    let change = catalogue_change(&c, &a, reqwest::Method::PUT, "", Some(put)).await;
    assert_eq!(change["removed_nodes"], 0);
    assert!(b
        .broker
        .network()
        .catalogue()
        .get(Service::Chat, model)
        .is_none());
    b.broker.refresh_pools().await.unwrap();
    assert!(b
        .broker
        .network()
        .catalogue()
        .get(Service::Chat, model)
        .is_some());
    let builtin = network::Catalogue::original().models().len();
    assert_eq!(b.broker.admin().catalogue().len(), builtin + 1);

    // So a node registers it through host B, and both hosts serve it.
    let node = StandInNode::start("katan").await;
    let (_, provider_key) = b.provider().await;
    let reg = json!({"endpoint": node.url(), "services": [{"service": "chat", "model": model}]});
    let r = c
        .post(format!("{}/v1/provider/provisions", b.url))
        .bearer_auth(provider_key.expose())
        .json(&reg)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    node.require_secret(v["node_secret"].as_str().unwrap());
    let id = ProvisionId::new(v["provision_id"].as_str().unwrap());
    a.broker.refresh_pools().await.unwrap();
    let (_, key) = a.user(Credits::whole(1)).await;
    assert_eq!(chat_model(&c, &a.url, &key, model).await.0, 200);
    assert_eq!(chat_model(&c, &b.url, &key, model).await.0, 200);
    assert_eq!(node.hits(), 2);

    // Removed through host A: its node leaves the pool there at once and,
    // after B's refresh, on B too; calls get model_not_found on both.
    let gone = catalogue_change(
        &c,
        &a,
        reqwest::Method::DELETE,
        &format!("/chat/{model}"),
        None,
    )
    .await;
    assert_eq!(gone["removed_nodes"], 1);
    let (status, body) = chat_model(&c, &a.url, &key, model).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );
    assert!(b.is_routable(&id), "B has not refreshed yet");
    b.broker.refresh_pools().await.unwrap();
    assert!(!b.is_routable(&id));
    let (status, body) = chat_model(&c, &b.url, &key, model).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );
    assert_eq!(node.hits(), 2);
    assert_eq!(b.broker.admin().catalogue().len(), builtin);

    // A raised minimum tier through B takes lower nodes out on A as well.
    let (p, _) = a.provider().await;
    let small = StandInNode::start("small").await;
    let small_id = a.add_node(&p, &small, Service::Chat, MODEL).await; // tier 3
    b.broker.refresh_pools().await.unwrap();
    assert!(b.is_routable(&small_id));
    let put = json!({"service": "chat", "model": MODEL, "min_tier": 4, "target_nodes": 1});
    let change = catalogue_change(&c, &b, reqwest::Method::PUT, "", Some(put)).await;
    assert_eq!(change["removed_nodes"], 1);
    assert!(!b.is_routable(&small_id));
    a.broker.refresh_pools().await.unwrap();
    assert!(!a.is_routable(&small_id));
    assert_eq!(chat_model(&c, &a.url, &key, MODEL).await.0, 404);

    // The public list agrees on both hosts.
    for h in [&a, &b] {
        let list: Value = c
            .get(format!("{}/v1/catalogue", h.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let data = list["data"].as_array().unwrap();
        assert_eq!(data.len(), builtin);
        assert!(data.iter().all(|o| o["model"] != model));
        let entry = data.iter().find(|o| o["model"] == MODEL).unwrap();
        assert_eq!(entry["min_tier"], 4);
        assert_eq!(entry["price"]["per_request"], 1_000);
    }
    a.assert_ledger().await;
}

/// Rate limits across hosts: each host admits from slices of the minute's
/// allowance it took from the store, which never grants past the limit. So
/// two hosts together admit at most the limit, and at least the limit less
/// about a slice and a half per host (a slice is a sixteenth of the limit)
/// left unused in a host's memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hosts_together_never_admit_more_than_a_keys_rate_limit() {
    let Some(ep) = endpoint() else { return };
    let prefix = prefix('l');
    let counted = |s: DynamoStore| Arc::new(InstrumentedStore::wrap(s));
    let sa = counted(DynamoStore::connect(config(&ep, &prefix)).await.unwrap());
    sa.inner.create_tables_if_missing().await.unwrap();
    let sb = counted(DynamoStore::connect(config(&ep, &prefix)).await.unwrap());
    sb.inner.create_tables_if_missing().await.unwrap();
    let a = TestHost::start(sa.clone()).await;
    priced(&a).await;
    let b = TestHost::start(sb.clone()).await;
    // Both clocks 10 s into the same minute.
    a.clock.advance(Duration::from_secs(10));
    b.clock.advance(Duration::from_secs(10));
    let (node, _, _) = a.stand_in("n", Service::Chat, MODEL).await;
    b.broker.refresh_pools().await.unwrap();
    let (u, key) = a.user(Credits::whole(1)).await;
    let id = a.broker.store().api_keys(&u.id).await.unwrap()[0]
        .id
        .clone();
    const RPM: u64 = 48;
    let limits = serde_json::json!({ "rpm": RPM });
    let c = reqwest::Client::new();
    let r = c
        .patch(format!("{}/v1/admin/keys/{id}", b.url))
        .bearer_auth(b.admin_key.expose())
        .json(&limits)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // 120 calls at once, half through each host.
    sa.take_calls();
    sb.take_calls();
    let mut tasks = Vec::new();
    for i in 0..120 {
        let url = if i % 2 == 0 { &a.url } else { &b.url }.clone();
        let (c, key) = (c.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let r = c
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth(key.expose())
                .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            if status != 200 {
                let e: ErrorBody = r.json().await.unwrap();
                assert_eq!(status, 429, "{}", e.error.message);
                assert_eq!(e.error.code.as_deref(), Some("rate_limit_exceeded"));
                return (i % 2, status);
            }
            let limit = r.headers()["x-ratelimit-limit-requests"].to_owned();
            assert_eq!(limit, RPM.to_string().as_str());
            r.bytes().await.unwrap();
            (i % 2, status)
        }));
    }
    let mut ok = [0u64; 2];
    for t in tasks {
        match t.await.unwrap() {
            (h, 200) => ok[h] += 1,
            (_, 429) => {}
            (_, s) => panic!("unexpected status {s}"),
        }
    }
    let admitted = ok[0] + ok[1];
    let slice = RPM / 16;
    // Slices are taken per host as the calls need them, not per call: each
    // take but a host's last grants at least a slice, the last finds the
    // minute spent, so at most limit / slice + 2 per host.
    let takes: usize = [&sa, &sb]
        .iter()
        .map(|s| s.take_calls().get("add_rate_usage").copied().unwrap_or(0))
        .sum();
    eprintln!("admitted {ok:?} of {RPM} (slice {slice}) with {takes} takes from the store");
    assert!(takes as u64 <= RPM / slice + 4, "{takes} takes");
    assert!(admitted <= RPM, "{ok:?}");
    assert!(admitted >= RPM - 3 * slice, "{ok:?}");
    assert!(ok[0] > 0 && ok[1] > 0, "{ok:?}");
    // Refused calls went nowhere and cost nothing.
    assert_eq!(node.hits() as u64, admitted);
    let totals = a.broker.store().ledger_totals().await.unwrap();
    assert_eq!(totals.settlements, admitted);
    assert_eq!(totals.charged, Credits(1_000 * admitted as i64));

    // The next minute, on both hosts.
    a.clock.advance(Duration::from_secs(60));
    b.clock.advance(Duration::from_secs(60));
    assert_eq!(chat(&c, &a.url, &key).await, 200);
    assert_eq!(chat(&c, &b.url, &key).await, 200);
    // Both hosts hold credit leases: idle, they go back.
    for h in [&a, &b] {
        h.clock.advance(h.broker.config().lease_idle);
        h.broker.run_maintenance().await.unwrap();
    }
    b.assert_ledger().await;
    a.assert_ledger().await;
}

/// A key's credit limit lowered on one host reaches the credit leases
/// another host holds for it within the key cache's bound: they are retired,
/// and the next lease is checked by the store against the new limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_limit_lowered_on_one_host_retires_another_hosts_leases_within_the_bound() {
    let Some(ep) = endpoint() else { return };
    let prefix = prefix('q');
    let a = host(&ep, &prefix).await;
    priced(&a).await;
    let b = host(&ep, &prefix).await;
    let (_node, _, _) = a.stand_in("n", Service::Chat, MODEL).await;
    b.broker.refresh_pools().await.unwrap();
    let (u, key) = a.user(Credits::whole(1)).await;
    let store = a.broker.store();
    let id = store.api_key_by_hash(&key.hash()).await.unwrap().id;
    let limit = |micros: i64| cxmpute_core::wire::UpdateKeyRequest {
        credit_limit: Some(Some(Credits(micros))),
        ..Default::default()
    };
    let accounts = a.broker.accounts();
    accounts.update_key(&u, &id, limit(100_000)).await.unwrap();

    // Host B spends ten calls' worth and holds a lease with more in it.
    let c = reqwest::Client::new();
    for _ in 0..10 {
        assert_eq!(chat(&c, &b.url, &key).await, 200);
    }
    assert!(b.leases_held() > 0);
    assert!(store.ledger_totals().await.unwrap().reserved > Credits::ZERO);

    // On A the limit is lowered to one call: nothing is left of it while
    // B's lease holds more (a limit lowered below what is spent and held
    // leaves nothing, never a negative). A refuses at once.
    accounts.update_key(&u, &id, limit(1_000)).await.unwrap();
    assert_eq!(chat(&c, &a.url, &key).await, 429);
    // Once B's key cache read the change, its lease is retired and goes
    // back (what it held returns to the key, up to the new limit: one
    // call), and B admits by the new limit: one call, where its lease had
    // room for more.
    b.clock.advance(b.broker.config().key_cache_ttl);
    assert_eq!(chat(&c, &b.url, &key).await, 200);
    assert_eq!(chat(&c, &b.url, &key).await, 429);
    assert_eq!(store.usage_records(&u.id, 100).await.unwrap().len(), 11);
    a.assert_ledger().await;
}

/// A key's budget across hosts: every call's hold is added to one counter
/// in the store, so two hosts calling at once never spend more than the
/// budget together; with holds equal to charges (a price per request), they
/// spend exactly as many calls as fit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hosts_together_never_spend_more_than_a_keys_budget() {
    let Some(ep) = endpoint() else { return };
    let prefix = prefix('g');
    let sa = store(config(&ep, &prefix)).await;
    let sb = store(config(&ep, &prefix)).await;
    let a = TestHost::start(sa.clone()).await;
    priced(&a).await;
    let b = TestHost::start(sb.clone()).await;
    b.clock.set(a.clock.now());
    let (node, _, _) = a.stand_in("n", Service::Chat, MODEL).await;
    b.broker.refresh_pools().await.unwrap();
    let (u, key) = a.user(Credits::whole(1)).await;
    let id = a.broker.store().api_keys(&u.id).await.unwrap()[0]
        .id
        .clone();
    const FIT: u64 = 12;
    let c = reqwest::Client::new();
    let r = c
        .patch(format!("{}/v1/admin/keys/{id}", b.url))
        .bearer_auth(b.admin_key.expose())
        .json(&json!({"budget": {"limit": 1_000 * FIT, "period": "day"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let one = |url: String| {
        let (c, key) = (c.clone(), key.clone());
        async move {
            let r = c
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth(key.expose())
                .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            r.bytes().await.unwrap();
            status
        }
    };
    // One call through each host first: both count in the same period.
    assert_eq!(one(a.url.clone()).await, 200);
    assert_eq!(one(b.url.clone()).await, 200);

    // 30 calls at once, half through each host.
    let mut tasks = Vec::new();
    for i in 0..30 {
        let url = if i % 2 == 0 { &a.url } else { &b.url }.clone();
        let (c, key) = (c.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let r = c
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth(key.expose())
                .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            if status != 200 {
                let e: ErrorBody = r.json().await.unwrap();
                assert_eq!(status, 429, "{}", e.error.message);
                assert_eq!(e.error.code.as_deref(), Some("budget_exceeded"));
            } else {
                r.bytes().await.unwrap();
            }
            (i % 2, status)
        }));
    }
    let mut ok = [0u64; 2];
    for t in tasks {
        match t.await.unwrap() {
            (h, 200) => ok[h] += 1,
            (_, 429) => {}
            (_, s) => panic!("unexpected status {s}"),
        }
    }
    let admitted = 2 + ok[0] + ok[1];
    eprintln!("admitted {ok:?} at once after one each, of a budget of {FIT} calls");
    assert_eq!(admitted, FIT, "{ok:?}");
    assert_eq!(node.hits() as u64, admitted);
    let totals = a.broker.store().ledger_totals().await.unwrap();
    assert_eq!(totals.charged, Credits(1_000 * FIT as i64));

    // The next day, on both hosts.
    for h in [&a, &b] {
        h.clock.advance(Duration::from_secs(86_400));
    }
    assert_eq!(one(a.url.clone()).await, 200);
    assert_eq!(one(b.url.clone()).await, 200);
    for h in [&a, &b] {
        h.clock.advance(h.broker.config().lease_idle);
        h.broker.run_maintenance().await.unwrap();
    }
    b.assert_ledger().await;
    a.assert_ledger().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_alias_added_through_one_host_is_served_on_another_after_its_refresh() {
    let Some(ep) = endpoint() else { return };
    let prefix = prefix('l');
    let a = host(&ep, &prefix).await;
    let b = host(&ep, &prefix).await;
    priced(&a).await;
    let c = reqwest::Client::new();
    // A node of MODEL only, registered through host B; `llama3.2:1b`
    // (first in the alias) has none, so the alias falls back to MODEL.
    let node = StandInNode::start("aliased").await;
    let (p, _) = b.provider().await;
    b.add_node(&p, &node, Service::Chat, MODEL).await;
    let (u, key) = a.user(Credits::whole(1)).await;
    b.track_user(&u.id, Credits::whole(1));

    let fast = json!({"alias": "fast", "models": ["llama3.2:1b", MODEL]});
    let r = c
        .put(format!("{}/v1/admin/aliases", a.url))
        .bearer_auth(a.admin_key.expose())
        .json(&fast)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Host B has not refreshed: the alias is unknown there.
    let (status, _) = chat_model(&c, &b.url, &key, "fast").await;
    assert_eq!(status, 404);
    b.broker.refresh_pools().await.unwrap();
    let (status, answer) = chat_model(&c, &b.url, &key, "fast").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["model"], MODEL);
    assert_eq!(node.last_body().unwrap()["model"], MODEL);
    let usage = b.last_usage(&u.id).await;
    assert_eq!(
        (usage.model.as_str(), usage.requested_model.as_deref()),
        (MODEL, Some("fast"))
    );
    assert_eq!(usage.charged, Credits(1_000));
    let listed = b.broker.models();
    let alias = listed.data.iter().find(|m| m.id == "fast").unwrap();
    assert_eq!(alias.owned_by, "cxmpute-alias");

    // Removed through host A: gone on B after its refresh.
    let r = c
        .delete(format!("{}/v1/admin/aliases/fast", a.url))
        .bearer_auth(a.admin_key.expose())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    b.broker.refresh_pools().await.unwrap();
    let (status, _) = chat_model(&c, &b.url, &key, "fast").await;
    assert_eq!(status, 404);
    b.assert_ledger().await;
}

/// An account's budget across hosts and keys: set through one host, it
/// applies on the other within `key_cache_ttl`; every call of either key
/// adds its hold to the account's one counter, so both hosts calling at once
/// spend exactly the budget. Both hosts settle calls below the account's
/// balance threshold at once, and one email goes out: the mark in the store
/// is taken by one host.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hosts_together_spend_an_accounts_budget_and_mail_each_alert_once() {
    let Some(ep) = endpoint() else { return };
    let prefix = prefix('u');
    let mails = RecordingMailer::default();
    let m = mails.clone();
    let a =
        TestHost::start_with(store(config(&ep, &prefix)).await, |b| b.mailer(Arc::new(m))).await;
    priced(&a).await;
    let m = mails.clone();
    let b =
        TestHost::start_with(store(config(&ep, &prefix)).await, |b| b.mailer(Arc::new(m))).await;
    b.clock.set(a.clock.now());
    let (node, _, _) = a.stand_in("n", Service::Chat, MODEL).await;
    b.broker.refresh_pools().await.unwrap();
    let (u, key_a) = a.user(Credits(100_000)).await;
    let (_, key_b) = (a.broker.admin())
        .create_api_key(&u.id, "second", None, Vec::new())
        .await
        .unwrap();
    let c = reqwest::Client::new();
    // Host A knows the account without a budget before B sets one.
    assert_eq!(chat(&c, &a.url, &key_a).await, 200);
    const FIT: i64 = 12;
    let r = c
        .patch(format!("{}/v1/admin/users/{}", b.url, u.id))
        .bearer_auth(b.admin_key.expose())
        .json(&json!({"budget": {"limit": 1_000 * FIT, "period": "day"},
            "alerts": {"balance_below": 100_000 - 4_500}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Within the bound, A applies it too.
    a.clock.advance(a.broker.config().key_cache_ttl);
    b.clock.set(a.clock.now());
    assert_eq!(chat(&c, &b.url, &key_b).await, 200);

    // 30 calls at once, half through each host, alternating keys.
    let mut tasks = Vec::new();
    for i in 0..30 {
        let url = if i % 2 == 0 { &a.url } else { &b.url }.clone();
        let key = if i % 4 < 2 { &key_a } else { &key_b }.clone();
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let r = c
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth(key.expose())
                .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            if status != 200 {
                let e: ErrorBody = r.json().await.unwrap();
                assert_eq!(status, 429, "{}", e.error.message);
                assert_eq!(e.error.code.as_deref(), Some("budget_exceeded"));
                assert!(e.error.message.contains("account's budget"));
            } else {
                r.bytes().await.unwrap();
            }
            status
        }));
    }
    let mut admitted = 2;
    for t in tasks {
        match t.await.unwrap() {
            200 => admitted += 1,
            429 => {}
            s => panic!("unexpected status {s}"),
        }
    }
    eprintln!("admitted {admitted} of a budget of {FIT} calls after the first");
    // The first call came before the budget: it counts for the day too
    // only if it was made after it was set, which it was not.
    assert_eq!(admitted, FIT + 1);
    assert_eq!(node.hits() as i64, admitted);
    a.alerts_done().await;
    b.alerts_done().await;
    let sent = mails.alerts(&u.email);
    assert_eq!(sent.len(), 1, "one email for one crossing: {sent:?}");
    let marked = a.broker.store().user(&u.id).await.unwrap().alerted;
    assert!(marked.balance.is_some());
    for h in [&a, &b] {
        h.clock.advance(h.broker.config().lease_idle);
        h.broker.run_maintenance().await.unwrap();
    }
    b.assert_ledger().await;
    a.assert_ledger().await;
}
