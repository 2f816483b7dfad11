//! Authentication from memory: API keys by hash, with what the gateway
//! needs of their account (whether it is suspended, its budget and alerts),
//! so that a call with a key seen lately makes no store trip before it is
//! admitted.
//!
//! ## Freshness
//!
//! An entry is served while it is younger than
//! [`BrokerConfig::key_cache_ttl`](crate::BrokerConfig::key_cache_ttl) by the
//! broker's [`Clock`], its age counted from *before* the store read that
//! filled it. A change committed at `t` is therefore seen by every call from
//! `t + ttl` on, on every host sharing the store (the reads are strongly
//! consistent). Past half its life, an entry in use is read again in the
//! background while it keeps being served, so a busy key never waits for
//! the store; an idle one simply expires, and the next call reads it.
//!
//! The host that makes a change applies it at once: every path that changes
//! a key or an account's suspension, budget or alerts ([`crate::Accounts`],
//! the broker's key creation) calls [`KeyCache::forget`] or
//! [`KeyCache::forget_user`]. A read
//! that was under way while something was forgotten is not kept (the
//! `generation` below), so it cannot put back what was just forgotten.
//! A change made through the store directly (another program, or an
//! embedder calling [`crate::Store`] itself) is seen within the TTL, as from
//! another host.
//!
//! ## Unknown keys
//!
//! A flood of random bearer tokens is bounded in both ways it could hurt:
//! - memory: unknown hashes are remembered (for the same TTL, so a key made
//!   on another host works within the same bound) in a table of their own,
//!   a sixteenth of the known table's size, so a flood can neither grow
//!   memory nor push known keys out;
//! - the store: a hash the table holds nothing for is looked up only with
//!   one of [`LOOKUPS_AT_ONCE`] places; more wait in line (fairly, and the
//!   line is bounded by the host's connection cap). A flood thus costs the
//!   store what that many busy clients cost, whatever its rate, while known
//!   keys, never in that line, are not slowed by it. A wrong token sent
//!   again and again (a misconfigured client) is answered from memory.
//!
//! Calls that arrive together with one key not held yet read it once: the
//! first reads, the others wait for it and find it held.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;

use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::secret::{KeyHash, Secret};
use crate::store::Store;
use crate::types::{Alerts, ApiKey, Budget, UserId};

/// Store lookups of uncached keys under way at once, per host (see the
/// module docs): enough that real keys met for the first time are not held
/// up, few enough that a flood of made-up ones cannot swamp the store.
pub(crate) const LOOKUPS_AT_ONCE: usize = 16;

/// Stripes of hashes whose reads wait for each other: enough that hashes
/// rarely share one, so different keys are read side by side.
const READ_STRIPES: usize = 64;

/// A key as the gateway needs it.
#[derive(Debug)]
pub(crate) struct KnownKey {
    /// The key as read. Its `credits_left` and `last_used_at` are as of the
    /// read: admission takes them from the store, never from here.
    pub(crate) key: ApiKey,
    /// Whether its account was suspended.
    pub(crate) suspended: bool,
    /// Its account's budget and alerts, as of the read (a change reaches
    /// calls as a suspension does).
    pub(crate) account: AccountLimits,
}

/// What admission and settlement need of a key's account besides its
/// suspension: its budget, and the alerts a settlement may send.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct AccountLimits {
    /// The account's budget.
    pub(crate) budget: Option<Budget>,
    /// The account's alert thresholds.
    pub(crate) alerts: Alerts,
}

/// A key held in memory, and when it was read.
struct Entry {
    key: Arc<KnownKey>,
    /// The broker's clock (milliseconds) before the read began.
    read_at: i64,
    /// Set while a background read of it is under way (one at a time).
    refreshing: AtomicBool,
}

/// The in-memory table of API keys. Cheap to clone: clones share it.
#[derive(Clone)]
pub(crate) struct KeyCache(Arc<Shared>);

struct Shared {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    known: Cache<KeyHash, Arc<Entry>>,
    /// Hashes the store did not know, with when they were read.
    unknown: Cache<KeyHash, i64>,
    /// Entries live this long (milliseconds); 0 turns the table off.
    ttl_ms: i64,
    lookups: tokio::sync::Semaphore,
    /// Reads of one hash wait for each other (a lock per stripe of hashes):
    /// calls arriving together with a key not held read it once, not once
    /// each.
    reading: Box<[tokio::sync::Mutex<()>]>,
    /// Moves on every forget; a read that began before a move is not kept.
    generation: AtomicU64,
}

impl KeyCache {
    /// A table of at most `capacity` known keys (and a sixteenth as many
    /// unknown ones) whose entries live `ttl`; either being zero turns it
    /// off (every call reads the store).
    pub(crate) fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        capacity: u64,
        ttl: Duration,
    ) -> Self {
        let ttl_ms = if capacity == 0 {
            0
        } else {
            i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)
        };
        KeyCache(Arc::new(Shared {
            store,
            clock,
            known: table(capacity, ttl),
            unknown: table((capacity / 16).max(1), ttl),
            ttl_ms,
            lookups: tokio::sync::Semaphore::new(LOOKUPS_AT_ONCE),
            reading: (0..READ_STRIPES).map(|_| Default::default()).collect(),
            generation: AtomicU64::new(0),
        }))
    }

    /// The key for a bearer secret: from memory when held and fresh, else
    /// read from the store. `Unauthorized` for missing, unknown or revoked
    /// keys; the caller checks the suspension.
    pub(crate) async fn get(&self, secret: Option<&Secret>) -> Result<Arc<KnownKey>> {
        let secret = secret.ok_or_else(|| {
            Error::Unauthorized("missing API key: send `Authorization: Bearer <key>`".into())
        })?;
        let hash = secret.hash();
        let s = &self.0;
        if s.ttl_ms == 0 {
            return live(s.read(hash).await?);
        }
        if let Some(found) = self.held(&hash) {
            return found;
        }
        // One read per hash at a time; whoever read it before this call's
        // turn may have read this very hash.
        let _reading = s.reading[usize::from(hash.0[0]) % READ_STRIPES]
            .lock()
            .await;
        if let Some(found) = self.held(&hash) {
            return found;
        }
        // Expired keys are read at once; hashes not held wait for a place.
        let _place = if s.known.contains_key(&hash) {
            None
        } else {
            let place = s.lookups.acquire().await.ok();
            // Whoever held the place before may have read this very hash.
            if let Some(found) = self.held(&hash) {
                return found;
            }
            place
        };
        live(s.read(hash).await?)
    }

    /// What the table holds for `hash` while it is fresh; past half its
    /// life, a known key is read again in the background.
    fn held(&self, hash: &KeyHash) -> Option<Result<Arc<KnownKey>>> {
        let s = &self.0;
        let now = s.clock.now().0;
        if let Some(e) = s.known.get(hash) {
            let age = now.saturating_sub(e.read_at);
            if !s.fresh(age) {
                return None;
            }
            if age >= s.ttl_ms / 2 && !e.refreshing.swap(true, Ordering::AcqRel) {
                self.refresh_in_background(*hash);
            }
            return Some(live(Some(e.key.clone())));
        }
        let at = s.unknown.get(hash)?;
        s.fresh(now.saturating_sub(at)).then(|| live(None))
    }

    /// Forgets the key with this hash (it was changed, revoked or made on
    /// this host): the next call with it reads the store.
    pub(crate) fn forget(&self, hash: &KeyHash) {
        let s = &self.0;
        s.generation.fetch_add(1, Ordering::SeqCst);
        s.known.invalidate(hash);
        s.unknown.invalidate(hash);
    }

    /// Forgets every key of a user (its account was suspended or restored).
    /// A scan of the table: for admin actions, never on a call's path.
    pub(crate) fn forget_user(&self, user: &UserId) {
        let s = &self.0;
        s.generation.fetch_add(1, Ordering::SeqCst);
        for (hash, e) in s.known.iter() {
            if &e.key.key.user_id == user {
                s.known.invalidate(&*hash);
            }
        }
    }

    /// Known and unknown hashes held now, after pending evictions ran.
    #[cfg(feature = "testkit")]
    pub(crate) fn sizes(&self) -> (u64, u64) {
        let s = &self.0;
        s.known.run_pending_tasks();
        s.unknown.run_pending_tasks();
        (s.known.entry_count(), s.unknown.entry_count())
    }

    fn refresh_in_background(&self, hash: KeyHash) {
        let cache = self.clone();
        tokio::spawn(async move {
            let s = &cache.0;
            if let Err(e) = s.read(hash).await {
                // The entry is served until it expires, then read by a call.
                tracing::warn!(error = %e, "reading an API key again failed");
                if let Some(e) = s.known.get(&hash) {
                    e.refreshing.store(false, Ordering::Release);
                }
            }
        });
    }
}

/// A table of at most `capacity` entries. Entries nobody asked for in a
/// while go, to give the memory back: they would be read again anyway. (By
/// the process's own time, not the broker's clock: it decides what is kept,
/// never what is trusted.)
fn table<V: Clone + Send + Sync + 'static>(capacity: u64, ttl: Duration) -> Cache<KeyHash, V> {
    Cache::builder()
        .max_capacity(capacity)
        .time_to_idle(ttl.max(Duration::from_secs(60)))
        .build()
}

impl Shared {
    fn fresh(&self, age: i64) -> bool {
        // A clock set back makes ages negative: such an entry is not trusted.
        (0..self.ttl_ms).contains(&age)
    }

    /// Reads a key and its account's suspension from the store and keeps
    /// what it found (`None`: no such key).
    async fn read(&self, hash: KeyHash) -> Result<Option<Arc<KnownKey>>> {
        let generation = self.generation.load(Ordering::SeqCst);
        let read_at = self.clock.now().0;
        let key = match self.store.api_key_by_hash(&hash).await {
            Ok(k) => k,
            Err(Error::NotFound(_)) => {
                if self.ttl_ms > 0 {
                    self.known.invalidate(&hash);
                    self.unknown.insert(hash, read_at);
                    self.keep_if_current(generation, &hash);
                }
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        // A revoked key never works again, whatever its account.
        let (suspended, account) = match key.revoked_at {
            Some(_) => (false, AccountLimits::default()),
            None => match self.store.user(&key.user_id).await {
                Ok(u) => (
                    u.suspended.is_some(),
                    AccountLimits {
                        budget: u.budget,
                        alerts: u.alerts,
                    },
                ),
                // As the reservation would say: keys outlive no account.
                Err(Error::NotFound(_)) => {
                    return Err(Error::Unauthorized("unknown account".into()))
                }
                Err(e) => return Err(e),
            },
        };
        let key = Arc::new(KnownKey {
            key,
            suspended,
            account,
        });
        if self.ttl_ms == 0 {
            return Ok(Some(key));
        }
        let entry = Entry {
            key: key.clone(),
            read_at,
            refreshing: AtomicBool::new(false),
        };
        self.unknown.invalidate(&hash);
        self.known.insert(hash, Arc::new(entry));
        self.keep_if_current(generation, &hash);
        Ok(Some(key))
    }

    /// Drops what a read just kept if something was forgotten since it
    /// began: the read may predate the change. (A forget after this check
    /// finds the entry in the table and drops it itself.)
    fn keep_if_current(&self, generation: u64, hash: &KeyHash) {
        if self.generation.load(Ordering::SeqCst) != generation {
            self.known.invalidate(hash);
            self.unknown.invalidate(hash);
        }
    }
}

/// The key if it may be used: `Unauthorized` when unknown or revoked.
fn live(key: Option<Arc<KnownKey>>) -> Result<Arc<KnownKey>> {
    match key {
        None => Err(Error::Unauthorized("invalid API key".into())),
        Some(k) if k.key.revoked_at.is_some() => Err(Error::Unauthorized("API key revoked".into())),
        Some(k) => Ok(k),
    }
}

#[cfg(all(test, feature = "testkit"))]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::store::UserStore;
    use crate::testkit::InstrumentedStore;
    use crate::types::*;

    /// A store holding one user with one key, and a table over it.
    async fn one_key() -> (Arc<InstrumentedStore>, ManualClock, KeyCache, Secret) {
        let store = Arc::new(InstrumentedStore::new());
        let clock = ManualClock::default();
        let user = User {
            created_at: clock.now(),
            ..crate::fixtures::new_user("a@b.io", Credits::ZERO)
        };
        store.inner.create_user(&user).await.unwrap();
        let secret = Secret::generate_api_key();
        let key = ApiKey {
            hash: secret.hash(),
            prefix: secret.display_prefix(),
            ..crate::fixtures::new_key(&user, None, clock.now())
        };
        store.inner.create_api_key(&key).await.unwrap();
        let keys = KeyCache::new(
            store.clone(),
            Arc::new(clock.clone()),
            100,
            Duration::from_secs(1),
        );
        (store, clock, keys, secret)
    }

    fn reads(store: &InstrumentedStore) -> usize {
        store
            .take_calls()
            .get("api_key_by_hash")
            .copied()
            .unwrap_or(0)
    }

    #[tokio::test]
    async fn a_read_under_way_when_a_key_is_forgotten_is_not_kept() {
        let (store, _clock, keys, secret) = one_key().await;
        // The store is slow, so the read is still under way when the key
        // is forgotten (as when it is revoked meanwhile).
        store.delay("api_key_by_hash", Duration::from_millis(200));
        let k = keys.clone();
        let s = secret.clone();
        let read = tokio::spawn(async move { k.get(Some(&s)).await.map(|_| ()) });
        while store.peak_in_flight("api_key_by_hash") == 0 {
            tokio::task::yield_now().await;
        }
        keys.forget(&secret.hash());
        read.await.unwrap().unwrap();
        assert_eq!(keys.sizes(), (0, 0), "what it read may predate the change");
        // Read undisturbed, it is kept.
        store.delay("api_key_by_hash", Duration::ZERO);
        store.take_calls();
        keys.get(Some(&secret)).await.unwrap();
        keys.get(Some(&secret)).await.unwrap();
        assert_eq!(reads(&store), 1);
    }

    #[tokio::test]
    async fn an_entry_is_not_trusted_when_the_clock_goes_back() {
        let (store, clock, keys, secret) = one_key().await;
        keys.get(Some(&secret)).await.unwrap();
        keys.get(Some(&secret)).await.unwrap();
        assert_eq!(reads(&store), 1);
        clock.set(Timestamp(clock.now().0 - 1));
        keys.get(Some(&secret)).await.unwrap();
        assert_eq!(reads(&store), 1, "read again");
    }

    #[tokio::test]
    async fn a_zero_ttl_or_capacity_reads_every_time_and_holds_nothing() {
        for (capacity, ttl) in [(100, Duration::ZERO), (0, Duration::from_secs(1))] {
            let (store, clock, _, secret) = one_key().await;
            let keys = KeyCache::new(store.clone(), Arc::new(clock), capacity, ttl);
            for _ in 0..3 {
                keys.get(Some(&secret)).await.unwrap();
                assert!(keys.get(Some(&Secret::generate_api_key())).await.is_err());
            }
            assert_eq!(reads(&store), 6);
            assert_eq!(keys.sizes(), (0, 0));
        }
    }

    #[tokio::test]
    async fn forgetting_a_user_forgets_its_keys_only() {
        let (store, _clock, keys, secret) = one_key().await;
        let other = Secret::generate_api_key();
        let k = store.inner.api_key_by_hash(&secret.hash()).await.unwrap();
        let mut u = store.inner.user(&k.user_id).await.unwrap();
        u.id = UserId::generate();
        u.email = "c@d.io".into();
        store.inner.create_user(&u).await.unwrap();
        let k2 = ApiKey {
            id: ApiKeyId::generate(),
            user_id: u.id.clone(),
            hash: other.hash(),
            ..k.clone()
        };
        store.inner.create_api_key(&k2).await.unwrap();
        keys.get(Some(&secret)).await.unwrap();
        keys.get(Some(&other)).await.unwrap();
        store.take_calls();
        keys.forget_user(&k.user_id);
        keys.get(Some(&secret)).await.unwrap();
        keys.get(Some(&other)).await.unwrap();
        assert_eq!(reads(&store), 1, "only the forgotten user's key is read");
    }
}
