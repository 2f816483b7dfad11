//! `GET /metrics`: well-formed Prometheus text that moves with traffic.
//!
//! Each broker has its own recorder, so a test can compare absolute values
//! with its own ledger even while other tests' brokers run in the process.

use std::collections::HashMap;
use std::sync::Arc;

use cxmpute_core::testkit::{Behavior, StandInNode, TestHost, MODEL};
use cxmpute_core::*;
use prometheus_parse::{LineInfo, Scrape, Value as PromValue};
use serde_json::json;

const CHAT: &str = "/v1/chat/completions";

/// Parses a page strictly: every line must be a comment, a type or help
/// line, or a sample; then into samples.
async fn scrape(h: &TestHost) -> Scrape {
    let resp = reqwest::get(format!("{}/metrics", h.url)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    let text = resp.text().await.unwrap();
    for line in text.lines() {
        assert_ne!(
            LineInfo::parse(line),
            LineInfo::Ignored,
            "not Prometheus text: {line:?}"
        );
        if let LineInfo::Sample {
            metric_name, value, ..
        } = LineInfo::parse(line)
        {
            assert!(metric_name.starts_with("cxmpute_"), "{line}");
            let v = value.to_ascii_lowercase();
            assert!(
                v.parse::<f64>().is_ok() || v == "+inf" || v == "nan",
                "{line}"
            );
        }
    }
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap()
}

/// The sum of the samples of `metric` whose labels include `labels`
/// (0 when there is none yet: counters appear with their first increment).
fn value(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == metric)
        .filter(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match &x.value {
            PromValue::Counter(v) | PromValue::Gauge(v) | PromValue::Untyped(v) => *v,
            PromValue::Histogram(_) | PromValue::Summary(_) => 0.0,
        })
        .sum()
}

/// The `+Inf` bucket of a histogram (its count).
fn histogram_count(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == metric)
        .filter(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match &x.value {
            PromValue::Histogram(b) => {
                assert!(b.len() > 5, "a real histogram has buckets");
                b.iter()
                    .find(|c| c.less_than.is_infinite())
                    .map_or(0.0, |c| c.count)
            }
            other => panic!("{metric} is not a histogram: {other:?}"),
        })
        .sum()
}

#[tokio::test]
async fn metrics_parse_and_move_with_traffic() {
    let h = TestHost::start_market(Credits(300)).await;
    let bad = StandInNode::start("bad").await;
    let good = StandInNode::start("good").await;
    bad.set(Behavior::Status(500));
    let (p, _) = h.provider().await;
    h.add_node(&p, &bad, Service::Chat, MODEL).await;
    h.add_node(&p, &good, Service::Chat, MODEL).await;
    let (u, key) = h.user(Credits::whole(10)).await;

    let before = scrape(&h).await;
    assert_eq!(
        value(
            &before,
            "cxmpute_pool_nodes",
            &[("service", "chat"), ("model", MODEL)]
        ),
        2.0
    );
    assert_eq!(value(&before, "cxmpute_nodes", &[]), 2.0);
    assert_eq!(value(&before, "cxmpute_requests_total", &[]), 0.0);

    let body = |stream: bool| json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream});
    // Calls until the failing node was picked first at least once (a
    // failover); which node goes first is the selector's business.
    let mut calls = 0;
    while bad.hits() == 0 {
        assert!(calls < 50, "the failing node was never tried");
        let r = h.post(CHAT, &key, &body(calls % 2 == 1)).await;
        assert_eq!(r.status(), 200);
        r.text().await.unwrap();
        calls += 1;
    }
    let refused = h.post(CHAT, &Secret::new("sk-wrong"), &json!({})).await;
    assert_eq!(refused.status(), 401);

    let after = scrape(&h).await;
    let calls = calls as f64;
    let failed_attempts = bad.hits() as f64;
    let chat = ("route", CHAT);
    assert_eq!(
        value(
            &after,
            "cxmpute_http_requests_total",
            &[chat, ("status", "200")]
        ),
        calls
    );
    assert_eq!(
        value(
            &after,
            "cxmpute_http_requests_total",
            &[chat, ("status", "401")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "cxmpute_requests_total",
            &[chat, ("outcome", "success")]
        ),
        calls
    );
    assert_eq!(
        value(&after, "cxmpute_requests_total", &[("outcome", "failure")]),
        0.0
    );
    assert_eq!(
        value(&after, "cxmpute_failovers_total", &[chat]),
        failed_attempts
    );
    let attempts = |o: &str| {
        value(
            &after,
            "cxmpute_upstream_attempts_total",
            &[("service", "chat"), ("outcome", o)],
        )
    };
    assert_eq!(attempts("failure"), failed_attempts);
    assert_eq!(attempts("success"), calls);
    assert_eq!(
        histogram_count(&after, "cxmpute_time_to_first_byte_seconds", &[chat]),
        calls
    );
    assert_eq!(
        histogram_count(&after, "cxmpute_request_duration_seconds", &[chat]),
        calls
    );

    // Money and tokens agree with the ledger exactly.
    let ledger = h.broker.store().ledger_totals().await.unwrap();
    assert_eq!(
        value(&after, "cxmpute_charged_microcredits_total", &[]),
        ledger.charged.0 as f64
    );
    assert_eq!(
        value(&after, "cxmpute_rewarded_microcredits_total", &[]),
        ledger.rewarded.0 as f64
    );
    let records = h.broker.store().usage_records(&u.id, 100).await.unwrap();
    let tokens: HashMap<&str, u64> = HashMap::from([
        ("input", records.iter().map(|r| r.input_tokens).sum()),
        ("output", records.iter().map(|r| r.output_tokens).sum()),
    ]);
    for (kind, sum) in tokens {
        assert_eq!(
            value(&after, "cxmpute_tokens_total", &[chat, ("kind", kind)]),
            sum as f64
        );
    }
    let breakers = value(&after, "cxmpute_circuit_breakers", &[]);
    assert_eq!(breakers, 2.0, "every node has a breaker state");

    // A node leaving shows at once, and the pool's gauge drops rather than
    // staying at its last value.
    h.unroute_node(&h.routed_node_ids()[0]);
    let later = scrape(&h).await;
    assert_eq!(
        value(
            &later,
            "cxmpute_pool_nodes",
            &[("service", "chat"), ("model", MODEL)]
        ),
        1.0
    );
}

#[tokio::test]
async fn brokers_in_one_process_keep_their_own_metrics() {
    let a = TestHost::start(Arc::new(MemoryStore::new())).await;
    let b = TestHost::start(Arc::new(MemoryStore::new())).await;
    let r = reqwest::Client::new()
        .post(format!("{}{CHAT}", a.url))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let sa = scrape(&a).await;
    let sb = scrape(&b).await;
    assert_eq!(
        value(&sa, "cxmpute_http_requests_total", &[("status", "401")]),
        1.0
    );
    assert_eq!(value(&sb, "cxmpute_http_requests_total", &[]), 0.0);
}

/// Registers a node at `url` for `key`'s provider serving chat models
/// `{prefix}-0`... `{prefix}-{n-1}`, which the operator adds to the
/// catalogue first (a node may serve nothing else); its id.
async fn register(h: &TestHost, key: &Secret, url: &str, prefix: &str, n: usize) -> String {
    let services: Vec<_> = (0..n)
        .map(|i| json!({"service": "chat", "model": format!("{prefix}-{i}")}))
        .collect();
    for i in 0..n {
        h.offer(Service::Chat, &format!("{prefix}-{i}")).await;
    }
    let r = h
        .post(
            "/v1/provider/provisions",
            key,
            &json!({"endpoint": url, "services": services}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    v["provision_id"].as_str().unwrap().to_owned()
}

/// The `cxmpute_pool_nodes` series on a page, by model.
fn pool_series(s: &Scrape) -> HashMap<String, f64> {
    s.samples
        .iter()
        .filter(|x| x.metric == "cxmpute_pool_nodes")
        .map(|x| {
            let v = match x.value {
                PromValue::Gauge(v) | PromValue::Untyped(v) => v,
                ref other => panic!("not a gauge: {other:?}"),
            };
            (x.labels.get("model").unwrap().to_owned(), v)
        })
        .collect()
}

#[tokio::test]
async fn the_pools_of_a_deleted_node_leave_the_page() {
    let h = TestHost::start_market(Credits(300)).await;
    let (_node, _, _) = h.stand_in("n", Service::Chat, MODEL).await;
    let (_, key) = h.provider().await;
    let url = StandInNode::dead_url().await;
    let id = register(&h, &key, &url, "junk", 60).await;
    let before = pool_series(&scrape(&h).await);
    assert_eq!(before.len(), 61);
    assert_eq!(before["junk-59"], 1.0);

    let r = reqwest::Client::new()
        .delete(format!("{}/v1/provider/provisions/{id}", h.url))
        .bearer_auth(key.expose())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let after = scrape(&h).await;
    assert_eq!(
        pool_series(&after),
        HashMap::from([(MODEL.to_owned(), 1.0)]),
        "only the pool that still has a node"
    );
    assert_eq!(value(&after, "cxmpute_pools", &[]), 1.0);

    // Money moved as usual meanwhile.
    let (_, user) = h.user(Credits::whole(1)).await;
    let chat = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(h.post(CHAT, &user, &chat).await.status(), 200);
    h.assert_ledger().await;
}

#[tokio::test]
async fn the_page_names_a_bounded_number_of_pools_largest_first() {
    let h = TestHost::start_market(Credits(300)).await;
    let (_node, _, _) = h.stand_in("n", Service::Chat, MODEL).await;
    let (_, key) = h.provider().await;
    let url = StandInNode::dead_url().await;
    // A stranger cannot add a pool: a model outside the catalogue is refused.
    let stranger = json!({"endpoint": url, "services": [{"service": "chat", "model": "mine"}]});
    let r = h.post("/v1/provider/provisions", &key, &stranger).await;
    assert_eq!(r.status(), 400);
    // An operator's large catalogue: 2 × 64 pools more, each larger than MODEL's.
    for prefix in ["a", "a", "b", "b"] {
        register(&h, &key, &url, prefix, 64).await;
    }
    let page = scrape(&h).await;
    let pools = pool_series(&page);
    let limit = h.broker.config().public_list_limit;
    assert_eq!(pools.len(), limit);
    assert!(pools.values().all(|n| *n == 2.0), "the largest are named");
    assert_eq!(value(&page, "cxmpute_pools", &[]), 129.0, "all are counted");
    assert_eq!(value(&page, "cxmpute_nodes", &[]), 5.0);
}
