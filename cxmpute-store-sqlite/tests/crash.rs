//! A process killed with SIGKILL in the middle of settling loses nothing it
//! acknowledged and applies nothing twice.
//!
//! The test re-runs its own binary as a child (selected by an environment
//! variable) that reserves and settles requests as fast as it can from many
//! tasks, printing each request id only after `settle` returned `Ok`. The
//! parent reads some hundreds of those acknowledgements, kills the child
//! mid-flight, reopens the database and audits it. It runs under both
//! durabilities: a killed process is what `Durability::Process` promises to
//! survive too (only a power loss separates the two, which a test cannot
//! cause).

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use cxmpute_core::conformance::fixtures::{self, new_key, new_provider, new_user};
use cxmpute_core::*;
use cxmpute_store_sqlite::{Durability, SqliteOptions, SqliteStore};

/// Set (to the database path) only in the child process.
const CHILD_DB: &str = "CXMPUTE_CRASH_CHILD_DB";
const CHILD_USER: &str = "CXMPUTE_CRASH_CHILD_USER";
const CHILD_KEY: &str = "CXMPUTE_CRASH_CHILD_KEY";
const CHILD_PROVIDER: &str = "CXMPUTE_CRASH_CHILD_PROVIDER";
/// `process` for [`Durability::Process`]; absent for the default.
const CHILD_DURABILITY: &str = "CXMPUTE_CRASH_CHILD_DURABILITY";

const INITIAL: Credits = Credits::whole(1_000_000);
const LIMIT: Credits = Credits::whole(900_000);
/// Acknowledgements the parent waits for before it kills the child.
const ACKS_BEFORE_KILL: usize = 600;
/// A bound on the child's work in case nobody kills it.
const CHILD_MAX_REQUESTS: u64 = 200_000;
const CHILD_TASKS: u64 = 32;

/// The child: runs only when the parent started this binary with `CHILD_DB`.
#[test]
fn crash_child() {
    let Ok(db) = std::env::var(CHILD_DB) else {
        return; // an ordinary test run: nothing to do
    };
    let user = UserId::new(std::env::var(CHILD_USER).unwrap());
    let key = ApiKeyId::new(std::env::var(CHILD_KEY).unwrap());
    let provider = ProviderId::new(std::env::var(CHILD_PROVIDER).unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let durability = match std::env::var(CHILD_DURABILITY).as_deref() {
            Ok("process") => Durability::Process,
            _ => Durability::Disk,
        };
        let options = SqliteOptions::default().durability(durability);
        let store = Arc::new(SqliteStore::open_with(&db, options).await.unwrap());
        let mut tasks = Vec::new();
        for t in 0..CHILD_TASKS {
            let (store, user, key, provider) =
                (store.clone(), user.clone(), key.clone(), provider.clone());
            tasks.push(tokio::spawn(async move {
                let mut i = t;
                while i < CHILD_MAX_REQUESTS {
                    let r = Reservation {
                        request_id: RequestId::generate(),
                        user_id: user.clone(),
                        key_id: key.clone(),
                        route: Route::ChatCompletions,
                        amount: Credits::micros(90_000),
                        created_at: fixtures::at(i as i64),
                    };
                    store.reserve(&r).await.unwrap();
                    // Some requests stay in flight: a reservation with no
                    // settlement yet when the kill lands.
                    if i % 50 == 7 {
                        i += CHILD_TASKS;
                        continue;
                    }
                    let charged = Credits::micros(10_000 + (i % 997) as i64 * 71);
                    let st = Settlement {
                        request_id: r.request_id.clone(),
                        charged,
                        reward: Some((provider.clone(), Credits::micros(charged.0 * 7 / 10))),
                        usage: UsageRecord {
                            request_id: r.request_id.clone(),
                            user_id: user.clone(),
                            key_id: key.clone(),
                            route: r.route,
                            model: "llama3.2:3b".into(),
                            provision_id: None,
                            provider_id: Some(provider.clone()),
                            input_tokens: i,
                            output_tokens: 2 * i,
                            units: 0,
                            success: true,
                            latency_ms: 100,
                            app: None,
                            at: fixtures::at(i as i64),
                            charged: Credits::ZERO,
                            reward: Credits::ZERO,
                            requested_model: None,
                            cache_hit: false,
                        },
                    };
                    assert_eq!(store.settle(&st).await.unwrap(), SettleOutcome::Applied);
                    // Only now is the settlement acknowledged to the parent.
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "settled {}", r.request_id).unwrap();
                    out.flush().unwrap();
                    i += CHILD_TASKS;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

/// Kills the child if the parent fails before doing so itself.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn acknowledged_settlements_survive_sigkill() {
    killed_child_loses_nothing_acknowledged(Durability::Disk);
}

#[test]
fn acknowledged_settlements_survive_sigkill_with_process_durability() {
    killed_child_loses_nothing_acknowledged(Durability::Process);
}

fn killed_child_loses_nothing_acknowledged(durability: Durability) {
    if std::env::var(CHILD_DB).is_ok() {
        return; // inside the child, only `crash_child` runs
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("crash.db");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let (user, key, provider) = rt.block_on(async {
        let store = SqliteStore::open(&db).await.unwrap();
        let user = new_user("crash@example.com", INITIAL);
        store.create_user(&user).await.unwrap();
        let key = ApiKey {
            name: "crash".into(),
            ..new_key(&user, Some(LIMIT), fixtures::T0)
        };
        store.create_api_key(&key).await.unwrap();
        let provider = Provider {
            email: "node@example.com".into(),
            ..new_provider(None)
        };
        store.create_provider(&provider).await.unwrap();
        store.close().await;
        (user, key, provider)
    });

    let child = Command::new(std::env::current_exe().unwrap())
        .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_DB, &db)
        .env(CHILD_USER, user.id.as_str())
        .env(CHILD_KEY, key.id.as_str())
        .env(CHILD_PROVIDER, provider.id.as_str())
        .env(
            CHILD_DURABILITY,
            match durability {
                Durability::Process => "process",
                _ => "disk",
            },
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let stdout = child.0.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();

    let mut acked: HashSet<RequestId> = HashSet::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(id) = line.strip_prefix("settled ") {
            acked.insert(RequestId::new(id));
            if acked.len() >= ACKS_BEFORE_KILL {
                break;
            }
        }
    }
    assert!(
        acked.len() >= ACKS_BEFORE_KILL,
        "the child stopped after {} settlements",
        acked.len()
    );
    // SIGKILL: no destructor, no close, no flush runs in the child.
    child.0.kill().unwrap();
    let status = child.0.wait().unwrap();
    assert!(!status.success(), "the child was killed, not finished");
    // Lines already in the pipe were printed after `Ok`: acknowledged too.
    for line in lines {
        let line = line.unwrap();
        if let Some(id) = line.strip_prefix("settled ") {
            acked.insert(RequestId::new(id));
        }
    }

    rt.block_on(async {
        let store = SqliteStore::open(&db).await.unwrap();
        for id in &acked {
            let usage = store
                .settlement(id)
                .await
                .unwrap_or_else(|e| panic!("acknowledged settlement {id} lost: {e}"));
            assert_eq!(&usage.request_id, id);
        }
        let t = store.ledger_totals().await.unwrap();
        let usage = store.usage_records(&user.id, usize::MAX).await.unwrap();
        eprintln!(
            "{} settlements acknowledged before the kill, {} on disk, {} still reserved",
            acked.len(),
            t.settlements,
            t.reserved
        );
        // Each settlement applied once: one usage row per counted settlement,
        // and at least every acknowledged one.
        assert_eq!(t.settlements, usage.len() as u64);
        assert!(usage.len() >= acked.len());
        let ids: HashSet<&RequestId> = usage.iter().map(|u| &u.request_id).collect();
        assert_eq!(ids.len(), usage.len());

        let charged: i64 = usage.iter().map(|u| u.charged.0).sum();
        let rewarded: i64 = usage.iter().map(|u| u.reward.0).sum();
        let platform: i64 = usage.iter().map(|u| u.charged.0 - u.reward.0).sum();
        assert_eq!(t.charged, Credits(charged));
        assert_eq!(t.rewarded, Credits(rewarded));
        assert_eq!(t.charged.0, t.rewarded.0 + platform);
        assert_eq!(
            store.provider(&provider.id).await.unwrap().earnings,
            t.rewarded
        );
        let balance = store.user(&user.id).await.unwrap().credits;
        assert_eq!(balance.0, INITIAL.0 - charged - t.reserved.0);
        let key_left = store.api_key_by_hash(&key.hash).await.unwrap().credits_left;
        assert_eq!(key_left, Some(Credits(LIMIT.0 - charged - t.reserved.0)));
        assert!(t.reserved.0 > 0, "some requests were in flight");

        // The reservations left open by the kill release cleanly, once.
        let open = store
            .release_stale_reservations(Timestamp(i64::MAX))
            .await
            .unwrap();
        assert!(open > 0);
        let after = store.ledger_totals().await.unwrap();
        assert_eq!(after.reserved, Credits::ZERO);
        assert_eq!(after.settlements, t.settlements + open);
        assert_eq!(after.charged, t.charged);
        assert_eq!(
            store.user(&user.id).await.unwrap().credits.0,
            INITIAL.0 - charged
        );
        store.close().await;
    });
}
