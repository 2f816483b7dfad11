//! A fault run: how a broker with the default configuration fares when one
//! of its three nodes fails every call and another hangs.
//!
//! ```text
//! cargo run --release --example fault_run
//! cargo run --release --example fault_run -- --calls 200 --concurrency 4 --store sqlite --json
//! ```
//!
//! Phase 1 (baseline) sends the calls to a healthy node alone; phase 2, on a
//! fresh host, to three nodes of three providers: healthy, failing (500 to
//! every call) and hanging (never answers a call; its health probe still
//! answers "ok", as a node whose inference server is stuck does). Half the
//! calls are streamed. It prints the success rate, latencies, how many calls
//! reached the hung node, and the targets with PASS/FAIL. Exit code 0 unless
//! `--strict` is given and a target failed: it is a measurement.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use cxmpute::core::testkit::{Behavior, StandInNode, TestHost, MODEL};
use cxmpute::core::{BrokerConfig, Credits, MemoryStore, Provider, ProvisionId, Secret, Service};
use parking_lot::Mutex;
use serde_json::{json, Value};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum StoreKind {
    /// In memory.
    Memory,
    /// A SQLite file in the temporary directory, removed afterwards.
    Sqlite,
}

#[derive(Debug, Parser)]
#[command(about = "Measures the broker against a healthy, a failing and a hanging node")]
struct Args {
    /// Calls per phase (half of them streamed).
    #[arg(long, default_value_t = 1000)]
    calls: usize,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Where the broker keeps its state.
    #[arg(long, value_enum, default_value = "memory")]
    store: StoreKind,
    /// Print one JSON summary instead of the report.
    #[arg(long)]
    json: bool,
    /// Exit with code 1 when a target is missed.
    #[arg(long)]
    strict: bool,
    /// Each phase stops after this many seconds; unfinished calls count as failed.
    #[arg(long, default_value_t = 900)]
    phase_limit_secs: u64,
}

/// A client gives up on a call after this long (twice the default first-byte timeout).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// When something first happened to the hung node: seconds into the phase
/// and the calls it had received by then.
type Moment = Option<(f64, usize)>;

/// A stand-in node and what the broker knows it by.
struct Node {
    name: &'static str,
    stand_in: StandInNode,
    provider: Provider,
    id: ProvisionId,
}

/// What one phase measured.
#[derive(Default)]
struct Phase {
    calls: usize,
    successes: usize,
    /// Of every finished call, sorted.
    latencies_ms: Vec<f64>,
    elapsed: Duration,
    failures: BTreeMap<String, usize>,
    /// Calls each node received.
    hits: BTreeMap<&'static str, usize>,
    /// The hung node's first failure (it can only time out) and its leaving routing.
    hung: (Moment, Moment),
}

impl Phase {
    /// The `p`-th percentile latency (nearest rank).
    fn pct(&self, p: f64) -> f64 {
        let rank = (p / 100.0 * self.latencies_ms.len() as f64).ceil() as usize;
        let at = rank.clamp(1, self.latencies_ms.len().max(1)) - 1;
        self.latencies_ms.get(at).copied().unwrap_or(f64::NAN)
    }

    fn success_pct(&self) -> f64 {
        100.0 * self.successes as f64 / self.calls.max(1) as f64
    }

    fn per_second(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64()
    }

    /// Calls that reached the hung node after `m`.
    fn hung_after(&self, m: Moment) -> Option<usize> {
        m.map(|(_, h)| self.hits.get("hanging").copied().unwrap_or(0) - h)
    }

    fn json(&self) -> Value {
        let moment = |m: Moment| m.map(|(s, h)| json!({"at_s": s, "hung_calls_before": h}));
        json!({
            "calls": self.calls, "successes": self.successes, "success_pct": self.success_pct(),
            "p50_ms": self.pct(50.0), "p99_ms": self.pct(99.0), "max_ms": self.pct(100.0),
            "requests_per_s": self.per_second(), "failures": self.failures, "hits": self.hits,
            "hung_first_timeout": moment(self.hung.0), "hung_ejected": moment(self.hung.1),
            "hung_calls_after_first_timeout": self.hung_after(self.hung.0),
            "hung_calls_after_ejection": self.hung_after(self.hung.1),
        })
    }

    fn print(&self, title: &str) {
        println!("{title}");
        let (calls, ok) = (self.calls, self.successes);
        println!(
            "  calls {calls}, successes {ok} ({:.1} %)",
            self.success_pct()
        );
        let (p50, p99, max) = (self.pct(50.0), self.pct(99.0), self.pct(100.0));
        println!("  latency p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms");
        println!("  {:.0} requests/s", self.per_second());
        for (why, n) in &self.failures {
            println!("  failed: {n} × {why}");
        }
        let hits: Vec<String> = self.hits.iter().map(|(n, h)| format!("{n} {h}")).collect();
        println!("  calls reaching each node: {}", hits.join(", "));
        if self.hits.contains_key("hanging") {
            let say = |what: &str, m: Moment| match (m, self.hung_after(m)) {
                (Some((s, h)), Some(later)) => {
                    println!(
                        "  {what} at {s:.1} s, after {h} calls; {later} calls reached it later"
                    )
                }
                _ => println!("  {what}: never"),
            };
            say("hung node's first timeout", self.hung.0);
            say("hung node left routing", self.hung.1);
        }
    }
}

/// Where `--store sqlite` keeps its files.
fn tmp_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("cxmpute-fault-run-{}", std::process::id()))
}

/// One call: `Err` says why it failed (status, broken or incomplete body).
async fn call(
    client: &reqwest::Client,
    url: &str,
    key: &Secret,
    stream: bool,
) -> Result<(), String> {
    let body = json!({"model": MODEL, "stream": stream, "max_tokens": 64,
        "messages": [{"role": "user", "content": "Hello!"}]});
    let sent = client
        .post(url)
        .bearer_auth(key.expose())
        .json(&body)
        .send()
        .await;
    let r = sent.map_err(|e| {
        if e.is_timeout() {
            "client timeout".into()
        } else {
            format!("{e}")
        }
    })?;
    let status = r.status().as_u16();
    let text = r.text().await.map_err(|e| format!("body: {e}"))?;
    let json = |t: &str| serde_json::from_str::<Value>(t).unwrap_or(Value::Null);
    if status != 200 {
        return Err(format!(
            "status {status} ({})",
            json(&text)["error"]["code"]
        ));
    }
    if !stream {
        let complete = json(&text)["choices"][0]["message"]["content"].is_string();
        return complete
            .then_some(())
            .ok_or_else(|| "incomplete answer".into());
    }
    let events = text.lines().filter_map(|l| l.strip_prefix("data: "));
    if events.map(json).any(|e| e.get("error").is_some()) {
        return Err("error event in the stream".into());
    }
    let done = text.trim_end().ends_with("data: [DONE]");
    done.then_some(())
        .ok_or_else(|| "stream ended without [DONE]".into())
}

/// Looks at the hung node (if any) from the broker's side: records its
/// first failure (it can only time out) and its leaving routing.
fn watch(host: &TestHost, nodes: &[Node], seen: &Mutex<(Moment, Moment)>, t0: Instant) {
    let Some(node) = nodes.iter().find(|n| n.name == "hanging") else {
        return;
    };
    let mut seen = seen.lock();
    let moment = Some((t0.elapsed().as_secs_f64(), node.stand_in.hits()));
    let status = host.broker.network().node_status(&node.id);
    if seen.0.is_none() && status.is_some_and(|s| s.failures > 0) {
        seen.0 = moment;
    }
    if seen.1.is_none() && !host.is_routable(&node.id) {
        seen.1 = moment;
    }
}

/// One phase: a fresh host as a default deployment runs it (the default
/// timeouts and breaker, not the testkit's short ones; nodes on loopback
/// allowed; housekeeping and health probes on their usual interval), one
/// stand-in node per provider for each of `nodes`, and the calls (even ones
/// streamed), `args.concurrency` at a time. The host is returned for the
/// ledger check.
async fn phase(
    args: &Args,
    tag: &str,
    nodes: &[(&'static str, Behavior)],
) -> Result<(Phase, Arc<TestHost>), BoxError> {
    let tmp = tmp_dir();
    let store: Arc<dyn cxmpute::core::Store> = match args.store {
        StoreKind::Memory => Arc::new(MemoryStore::new()),
        StoreKind::Sqlite => {
            std::fs::create_dir_all(&tmp)?;
            Arc::new(cxmpute::sqlite::SqliteStore::open(tmp.join(format!("{tag}.db"))).await?)
        }
    };
    let config = BrokerConfig::default().allow_private_endpoints();
    let host = TestHost::start_market_with(store, Credits(100), |b| b.config(config)).await;
    let host = Arc::new(host);
    let mut started = Vec::new();
    for (name, behavior) in nodes {
        let (stand_in, provider, id) = host.stand_in(name, Service::Chat, MODEL).await;
        stand_in.set(behavior.clone());
        started.push(Node {
            name,
            stand_in,
            provider,
            id,
        });
    }
    let nodes = Arc::new(started);
    let (_, key) = host.user(Credits(1_000_000_000_000)).await;
    let maintenance = host.broker.spawn_maintenance(Duration::from_secs(15));

    let hung = Arc::new(Mutex::new((None, None)));
    let t0 = Instant::now();
    let (h, n, seen) = (host.clone(), nodes.clone(), hung.clone());
    // Watches the hung node every millisecond, keeps the clock and sends heartbeats.
    let background = tokio::spawn(async move {
        let (mut ticked, mut beat) = (t0, t0);
        let mut every = tokio::time::interval(Duration::from_millis(1));
        loop {
            every.tick().await;
            let now = Instant::now();
            watch(&h, &n, &seen, t0);
            // The host runs on a manual clock, which the breaker's window and
            // cooldowns and the heartbeat expiry read: advancing it by the
            // real time elapsed, every 50 ms, makes them behave as in production.
            if now - ticked >= Duration::from_millis(50) {
                h.clock.advance(now - ticked);
                ticked = now;
            }
            // The nodes heartbeat as real ones do, or the broker would expire them.
            if now - beat >= Duration::from_secs(30) {
                for node in n.iter() {
                    let _ = h.broker.network().heartbeat(&node.provider, &node.id).await;
                }
                beat = now;
            }
        }
    });

    let client = reqwest::Client::builder().timeout(CALL_TIMEOUT).build()?;
    let url = format!("{}/v1/chat/completions", host.url);
    let (next, done) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(Mutex::new(Vec::new())),
    );
    let calls = args.calls;
    let workers = (0..args.concurrency.max(1)).map(|_| {
        let (client, url, key) = (client.clone(), url.clone(), key.clone());
        let (next, done) = (next.clone(), done.clone());
        tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= calls {
                    break;
                }
                let t = Instant::now();
                let r = call(&client, &url, &key, i % 2 == 0).await;
                done.lock().push((t.elapsed().as_secs_f64() * 1e3, r));
            }
        })
    });
    let workers: Vec<_> = workers.collect();
    let stop: Vec<_> = workers.iter().map(|w| w.abort_handle()).collect();
    let limit = Duration::from_secs(args.phase_limit_secs);
    if tokio::time::timeout(limit, futures::future::join_all(workers))
        .await
        .is_err()
    {
        stop.iter().for_each(|w| w.abort());
    }
    let elapsed = t0.elapsed();
    background.abort();
    maintenance.abort();
    // What happened since the last millisecond's look.
    watch(&host, &nodes, &hung, t0);
    let hung = *hung.lock();

    let done = std::mem::take(&mut *done.lock());
    let mut p = Phase {
        calls,
        elapsed,
        hung,
        ..Phase::default()
    };
    if done.len() < calls {
        p.failures
            .insert("unfinished at the phase limit".into(), calls - done.len());
    }
    for (ms, r) in done {
        p.latencies_ms.push(ms);
        match r {
            Ok(()) => p.successes += 1,
            Err(why) => *p.failures.entry(why).or_insert(0) += 1,
        }
    }
    p.latencies_ms.sort_by(f64::total_cmp);
    p.hits = nodes.iter().map(|n| (n.name, n.stand_in.hits())).collect();
    Ok((p, host))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let logs = tracing_subscriber::EnvFilter::from_default_env();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(logs)
        .init();

    let (calls, at_once) = (args.calls, args.concurrency);
    eprintln!("phase 1: the healthy node alone, {calls} calls, {at_once} at a time");
    let (baseline, host) = phase(&args, "baseline", &[("healthy", Behavior::Ok)]).await?;
    // The money must add up (this panics if it does not).
    host.assert_ledger().await;
    drop(host);
    eprintln!("phase 2: healthy, failing and hanging nodes (a hung call waits out the timeout)");
    let faults = [
        ("healthy", Behavior::Ok),
        ("failing", Behavior::Status(500)),
        ("hanging", Behavior::Hang),
    ];
    let (faults, host) = phase(&args, "faults", &faults).await?;

    let targets = [
        ("100 % success", faults.successes == faults.calls),
        ("max latency < 10 s", faults.pct(100.0) < 10_000.0),
        (
            "p99 < 2 × baseline p99",
            faults.pct(99.0) < 2.0 * baseline.pct(99.0),
        ),
        ("no call to the hung node after its first timeout", {
            faults.hung_after(faults.hung.0).unwrap_or(0) == 0
        }),
    ];
    if !args.json {
        baseline.print("phase 1 (baseline: healthy node alone)");
        faults.print("phase 2 (healthy, failing, hanging)");
        println!("targets");
        for (name, ok) in targets {
            println!("  {} {name}", if ok { "PASS" } else { "FAIL" });
        }
    }
    // After the report, so that a ledger that does not add up comes with it.
    host.assert_ledger().await;
    drop(host);
    let _ = std::fs::remove_dir_all(tmp_dir());
    if args.json {
        let targets: BTreeMap<&str, bool> = targets.iter().copied().collect();
        let summary = json!({"baseline": baseline.json(), "faults": faults.json(),
            "targets": targets, "ledger": "ok"});
        println!("{summary:#}");
    } else {
        println!("ledger: ok");
    }
    if args.strict && targets.iter().any(|(_, ok)| !ok) {
        std::process::exit(1);
    }
    Ok(())
}
