//! A host killed with SIGKILL under load: every call a client got an answer
//! for is charged exactly once, what the dead host held goes back to its
//! account (at once on a store it owned; after the reservation TTL, through
//! another host's sweep, on a store hosts share), and the ledger adds up.
//!
//! The host runs in a child process: this test binary started again with
//! [`CHILD`] set, running only [`child_host`]. The parent drives load over
//! loopback, kills the child once enough answers arrived, then opens the same
//! store itself and checks it.
//!
//! The DynamoDB case needs `CXMPUTE_TEST_DYNAMO_ENDPOINT` (skipped without it,
//! unless `CXMPUTE_REQUIRE_SERVICES=1`).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cxmpute::dynamo::{DynamoConfig, DynamoStore, RequestGate, StaticCredentials};
use cxmpute::sqlite::SqliteStore;
use cxmpute_core::testkit::{TestHost, MODEL};
use cxmpute_core::*;
use serde_json::json;

/// Set in the child: which store to open (`sqlite <path>` or
/// `dynamo <endpoint> <prefix>`).
const CHILD: &str = "CXMPUTE_KILL_TEST_CHILD";
/// Clients calling at once; at most this many calls are in flight when the
/// host dies.
const CLIENTS: usize = 16;
/// Answers to wait for before the kill.
const BEFORE_KILL: usize = 300;
/// What one call costs (a price per request).
const PRICE: Credits = Credits(1_000);
/// What the child's user starts with: far more than the run spends.
const START: Credits = Credits(1_000 * 100_000);

fn dynamo_config(endpoint: &str, prefix: &str) -> DynamoConfig {
    let mut cfg = DynamoConfig::new(prefix)
        .with_endpoint(endpoint)
        .with_region("us-east-1")
        .with_credentials(StaticCredentials::new("testing", "testing"));
    // The test server does not isolate concurrent transactions: one request
    // at a time per process (see `DynamoConfig::request_gate`).
    cfg.request_gate = Some(RequestGate::new(1));
    cfg.conflict_retries = 40;
    cfg.attempt_timeout = Duration::from_secs(60);
    cfg.operation_timeout = Duration::from_secs(120);
    cfg
}

async fn open(spec: &str) -> Arc<dyn Store> {
    let parts: Vec<&str> = spec.split(' ').collect();
    match parts.as_slice() {
        ["sqlite", path] => Arc::new(SqliteStore::open(path).await.expect("open SQLite")),
        ["dynamo", endpoint, prefix] => {
            let s = DynamoStore::connect(dynamo_config(endpoint, prefix))
                .await
                .expect("connect");
            s.create_tables_if_missing().await.expect("tables");
            Arc::new(s)
        }
        _ => panic!("bad {CHILD}: {spec}"),
    }
}

/// The child's part: a host with a stand-in node and a user, announced on
/// stdout, serving until killed. Returns at once in a normal test run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_host() {
    let Ok(spec) = std::env::var(CHILD) else {
        return;
    };
    let h = TestHost::start(open(&spec).await).await;
    h.broker
        .admin()
        .put_price(PriceEntry {
            service: Service::Chat,
            model: None,
            per_request: PRICE,
            per_million_input_tokens: Credits::ZERO,
            per_million_output_tokens: Credits::ZERO,
            per_million_units: Credits::ZERO,
        })
        .await
        .expect("price");
    let (_node, _, _) = h.stand_in("n", Service::Chat, MODEL).await;
    let (user, key) = h.user(START).await;
    println!("CHILD {} {} {}", h.url, key.expose(), user.id);
    std::future::pending::<()>().await;
}

struct Host {
    child: Child,
    url: String,
    key: Secret,
    user: UserId,
}

/// Starts the child host on `spec` and waits for its announcement.
async fn spawn_host(spec: &str) -> Host {
    let exe = std::env::current_exe().expect("the test binary");
    let mut child = Command::new(exe)
        .args(["child_host", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, spec)
        .env("RUST_LOG", "off")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the child host");
    let stdout = child.stdout.take().expect("stdout");
    let line = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(|l| l.ok())
            // The harness may print the test's name on the same line.
            .find_map(|l| l.find("CHILD ").map(|at| l[at..].to_owned()))
    })
    .await
    .unwrap()
    .expect("the child host announced itself");
    let mut it = line.split(' ').skip(1);
    let (url, key, user) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
    Host {
        child,
        url: url.to_owned(),
        key: Secret::new(key),
        user: UserId::new(user),
    }
}

/// One call: whether a whole 200 answer arrived (`None` once the host is
/// gone).
async fn call(c: &reqwest::Client, url: &str, key: &Secret) -> Option<bool> {
    let r = c
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(key.expose())
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .ok()?;
    let ok = r.status() == 200;
    let body = r.bytes().await.ok()?;
    Some(ok && body.ends_with(b"}"))
}

/// Loads the host from [`CLIENTS`] clients and kills it with SIGKILL once
/// [`BEFORE_KILL`] answers arrived; returns how many whole answers the
/// clients got, counting those that arrived while it died.
async fn load_and_kill(host: &mut Host) -> usize {
    let answered = Arc::new(AtomicUsize::new(0));
    let enough = Arc::new(tokio::sync::Notify::new());
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (c, url, key) = (c.clone(), host.url.clone(), host.key.clone());
        let (answered, enough) = (answered.clone(), enough.clone());
        tasks.push(tokio::spawn(async move {
            while let Some(ok) = call(&c, &url, &key).await {
                assert!(ok, "a call failed before the kill");
                if answered.fetch_add(1, Ordering::SeqCst) + 1 == BEFORE_KILL {
                    enough.notify_one();
                }
            }
        }));
    }
    let mut clients = futures::future::join_all(tasks);
    tokio::select! {
        _ = enough.notified() => {}
        _ = &mut clients => panic!("the clients stopped before {BEFORE_KILL} answers"),
    }
    host.child.kill().expect("SIGKILL");
    host.child.wait().expect("reaped");
    for t in clients.await {
        t.expect("client");
    }
    answered.load(Ordering::SeqCst)
}

/// What the store says after the kill: every answered call charged exactly
/// once, at most the calls in flight at the kill charged besides, nothing
/// held, and the ledger adding up.
async fn check(h: &TestHost, host: &Host, answered: usize) {
    h.track_user(&host.user, START);
    let store = h.broker.store();
    let records = store.usage_records(&host.user, 1_000_000).await.unwrap();
    let charged = records.len();
    assert!(
        (answered..=answered + CLIENTS).contains(&charged),
        "{answered} answers, {charged} charged calls"
    );
    let mut ids: Vec<_> = records.iter().map(|r| r.request_id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), charged, "a call charged twice");
    assert!(records.iter().all(|r| r.success && r.charged == PRICE));
    let balance = h.balance(&host.user).await;
    assert_eq!(
        START.saturating_sub(balance),
        Credits(PRICE.0 * charged as i64)
    );
    h.assert_ledger().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sqlite_host_killed_under_load_charged_every_answer_once_and_holds_nothing() {
    let path = std::env::temp_dir().join(format!("cxmpute-kill-{}.db", secret::random_token(12)));
    let mut host = spawn_host(&format!("sqlite {}", path.display())).await;
    let answered = load_and_kill(&mut host).await;
    assert!(answered >= BEFORE_KILL);
    // Its holds lived in its memory: the store it owned holds nothing.
    let h = TestHost::start(open(&format!("sqlite {}", path.display())).await).await;
    assert_eq!(
        h.broker.store().ledger_totals().await.unwrap().reserved,
        Credits::ZERO
    );
    check(&h, &host, answered).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dynamo_host_killed_under_load_charged_every_answer_once_and_its_leases_come_back() {
    let Some(ep) = cxmpute_core::testkit::service_env("CXMPUTE_TEST_DYNAMO_ENDPOINT") else {
        return;
    };
    let prefix = format!("x{}_", secret::random_token(10).to_lowercase());
    let spec = format!("dynamo {ep} {prefix}");
    let mut host = spawn_host(&spec).await;
    let answered = load_and_kill(&mut host).await;
    assert!(answered >= BEFORE_KILL);
    // Another host of the deployment: the dead host's leases stay held
    // until they outlive the reservation TTL, then its sweep takes them back.
    let h = TestHost::start(open(&spec).await).await;
    let store = h.broker.store();
    let held = store.ledger_totals().await.unwrap().reserved;
    assert!(held > Credits::ZERO, "the dead host held a lease");
    h.broker.run_maintenance().await.unwrap();
    assert_eq!(store.ledger_totals().await.unwrap().reserved, held);
    h.clock
        .advance(h.broker.config().reservation_ttl + Duration::from_secs(1));
    h.broker.run_maintenance().await.unwrap();
    assert_eq!(store.ledger_totals().await.unwrap().reserved, Credits::ZERO);
    check(&h, &host, answered).await;
}
