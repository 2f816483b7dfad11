//! Admission: where a gateway call's credits are held while it runs.
//!
//! A call is admitted by holding the most it can cost on its account's
//! balance and its key's limit, and settled by charging what it used. Where
//! the hold lives depends on the store ([`LedgerStore::owned_by_one_host`]):
//!
//! - **A store hosts share** (DynamoDB): the hold is a reservation in the
//!   store (`reserve`, then `settle`), so no number of hosts can overspend;
//!   or, with [`BrokerConfig::credit_leases`](crate::BrokerConfig::credit_leases),
//!   it comes from a credit lease of this host, in memory (see [`lease`]).
//! - **A store one host owns** (memory, SQLite): the hold lives in this
//!   module's [`Ledger`], in memory, checked with the same rules
//!   ([`store_support::check_spendable`]) and refused with the same errors,
//!   with no store call; settlements are persisted in group commits
//!   ([`batch`]: what queued up while the last batch committed goes in one
//!   [`LedgerStore::settle_held`]). A host that dies mid-call leaves nothing
//!   held in the store and charged nothing for the calls it never answered.
//!
//! Either way a call is answered only once its settlement committed (the
//! gateway's rule: an answered call is a charged call).
//!
//! ## The in-memory ledger
//!
//! Per account in use it keeps what the store last said (balance,
//! suspension, and each key used: its limit, credits left, routes,
//! revocation) and what calls in flight hold. What is spendable is the
//! stored balance (or key's credits left) minus the holds. Loading an
//! account, or a key it has not used yet, is a store read, then kept;
//! calls arriving together for an account not held load it once.
//!
//! The store moves only through this host's broker, so the memory follows it
//! exactly:
//! - a settlement, once committed, takes its charge off the stored figures
//!   and its hold off the holds, in one step;
//! - a grant goes through the ledger ([`Admission::grant`]): a removal is
//!   held first, so no call admitted meanwhile can spend it, and the amount
//!   is added to the stored balance once committed (an addition commutes
//!   with settlements, whatever their order);
//! - a suspension, a key's change or its revocation is followed by a
//!   refresh ([`Admission::refresh`]), which reads the account again and takes from the
//!   store everything but the money figures (those are this module's, and
//!   settlements in flight may not be in what was read); a key whose limit
//!   changed moves its credits left as the store moved them
//!   ([`store_support::moved_credits_left`]).
//!
//! A settlement whose fate is unknown (the store failed, or answered a
//! repeat with a record that is not ours) keeps its hold, since it may have
//! been charged, and marks the account to be read again: it is dropped as
//! soon as no call is in flight, and the next call loads it afresh.
//!
//! Memory is bounded: past [`BrokerConfig::account_capacity`] accounts, the
//! least recently used half of those with no call in flight are dropped
//! (they are read again when next used). An account with calls in flight is
//! never dropped: its holds live nowhere else.
//!
//! A load that was under way while its shard dropped or refreshed an account
//! is not kept (a generation per shard), since it may predate the change.
//!
//! [`LedgerStore::owned_by_one_host`]: crate::store::LedgerStore::owned_by_one_host
//! [`LedgerStore::settle_held`]: crate::store::LedgerStore::settle_held
//! [`store_support::check_spendable`]: crate::store_support::check_spendable
//! [`store_support::moved_credits_left`]: crate::store_support::moved_credits_left
//! [`BrokerConfig::account_capacity`]: crate::BrokerConfig::account_capacity

use std::collections::hash_map::{DefaultHasher, Entry};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

mod batch;
mod lease;

use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::secret::KeyHash;
use crate::store::Store;
use crate::store_support::moved_credits_left;
use crate::store_support::{charged_credits_left, check_spendable, granted_balance};
use crate::types::*;
pub(crate) use lease::LeaseConfig;
use lease::Leases;

/// How the broker admits calls: through the store, from leases, or from
/// memory.
pub(crate) enum Admission {
    /// Every hold is a reservation in the store (a store hosts share, with
    /// credit leases turned off).
    Store(Arc<dyn Store>),
    /// Holds come from this host's credit leases, or are reservations in
    /// the store when no lease covers them (a store hosts share).
    Leased(Arc<Leases>),
    /// Holds live in memory; settlements alone are persisted (a store one
    /// host owns).
    Memory(Arc<Ledger>),
}

impl Admission {
    /// The admission `store` calls for, holding at most `capacity` idle
    /// accounts in memory when it admits from there, and taking credit
    /// leases as `leases` says (`None`: no leases) on a shared store.
    pub(crate) fn new(
        store: Arc<dyn Store>,
        capacity: usize,
        clock: Arc<dyn Clock>,
        leases: Option<LeaseConfig>,
    ) -> Self {
        match (store.owned_by_one_host(), leases) {
            (true, _) => Admission::Memory(Arc::new(Ledger::new(store, capacity))),
            (false, Some(config)) => Admission::Leased(Arc::new(Leases::new(store, clock, config))),
            (false, None) => Admission::Store(store),
        }
    }

    /// Holds `r.amount` of the user's credits and the limit of `key` (as
    /// the key cache holds it): the reservation's checks, errors and all.
    pub(crate) async fn hold(&self, r: Reservation, key: &ApiKey) -> Result<Hold> {
        let source = match self {
            Admission::Store(store) => {
                store.reserve(&r).await?;
                Source::Store
            }
            Admission::Leased(leases) => match leases.hold(&r, key.credit_limit).await? {
                Some(lease) => Source::Lease(leases.clone(), lease),
                None => Source::Store,
            },
            Admission::Memory(ledger) => {
                ledger.hold(&r, &key.hash).await?;
                Source::Memory(ledger.clone())
            }
        };
        Ok(Hold {
            r,
            source,
            state: AtomicU8::new(OPEN),
        })
    }

    /// One try at persisting the settlement of `hold`. Call [`Hold::finish`]
    /// once the tries are over.
    pub(crate) async fn settle(&self, hold: &Hold, st: &Settlement) -> Result<SettleOutcome> {
        match &hold.source {
            Source::Store => self.store().settle(st).await,
            Source::Memory(ledger) => {
                hold.state.store(SETTLING, Ordering::Release);
                ledger.batch.submit(None, hold.r.clone(), st.clone()).await
            }
            Source::Lease(leases, lease) => {
                hold.state.store(SETTLING, Ordering::Release);
                leases.settle(lease, &hold.r, st).await
            }
        }
    }

    fn store(&self) -> &Arc<dyn Store> {
        match self {
            Admission::Store(store) => store,
            Admission::Leased(leases) => &leases.store,
            Admission::Memory(ledger) => &ledger.store,
        }
    }

    /// Adds (or, when negative, removes) credits: the store's grant, with the
    /// memory kept in step when the broker admits from it. A removal first
    /// hands back this host's idle leases of the account, so that what they
    /// hold can be removed.
    pub(crate) async fn grant(&self, grant: &CreditGrant) -> Result<Credits> {
        match self {
            Admission::Store(store) => store.grant_credits(grant).await,
            Admission::Leased(leases) => {
                if grant.amount < Credits::ZERO {
                    leases.retire(&grant.user_id).await;
                }
                leases.store.grant_credits(grant).await
            }
            Admission::Memory(ledger) => ledger.grant(grant).await,
        }
    }

    /// Takes from the store what changed of a user's account or keys other
    /// than money (suspension, a key's limit, routes or revocation), keeping
    /// the holds of calls in flight. Call after each such change. With
    /// leases, this host's leases of the account are retired: new calls
    /// take new ones, checked against the change.
    pub(crate) async fn refresh(&self, user: &UserId) -> Result<()> {
        match self {
            Admission::Store(_) => Ok(()),
            Admission::Leased(leases) => {
                leases.retire(user).await;
                Ok(())
            }
            Admission::Memory(ledger) => ledger.refresh(user).await,
        }
    }

    /// The maintenance tick's part: hands back idle, spent and retired
    /// leases (`all`: every lease with no call in flight).
    pub(crate) async fn upkeep(&self, all: bool) {
        if let Admission::Leased(leases) = self {
            leases.hand_back(all).await;
        }
    }

    /// Accounts held in memory now (0 when admitting through the store).
    #[cfg(feature = "testkit")]
    pub(crate) fn accounts_held(&self) -> usize {
        match self {
            Admission::Store(_) | Admission::Leased(_) => 0,
            Admission::Memory(ledger) => {
                ledger.shards.iter().map(|s| s.lock().accounts.len()).sum()
            }
        }
    }

    /// Credit leases held in memory now.
    #[cfg(feature = "testkit")]
    pub(crate) fn leases_held(&self) -> usize {
        match self {
            Admission::Leased(leases) => leases.count(),
            _ => 0,
        }
    }
}

/// Where a hold lives.
enum Source {
    /// A reservation in the store.
    Store,
    /// The in-memory ledger of a store this host owns.
    Memory(Arc<Ledger>),
    /// A credit lease of this host (its request id).
    Lease(Arc<Leases>, RequestId),
}

/// A hold not yet settled.
const OPEN: u8 = 0;
/// A hold whose settlement was sent to the store at least once.
const SETTLING: u8 = 1;
/// A hold whose settlement is over (its memory released).
const DONE: u8 = 2;

/// An admitted call's hold, until its settlement is over. Dropped before
/// [`Hold::finish`] (a call's task that failed half-way), it is released:
/// in full when no settlement was tried, else as one whose fate is unknown.
pub(crate) struct Hold {
    r: Reservation,
    source: Source,
    state: AtomicU8,
}

impl Hold {
    /// What was held, for whom.
    pub(crate) fn reservation(&self) -> &Reservation {
        &self.r
    }

    /// Whether the hold is a reservation in the store, which the
    /// stale-reservation sweep may settle too. Any other call's request id is
    /// written by its own settlement alone, so a repeat of it is ours.
    pub(crate) fn reserved_in_store(&self) -> bool {
        matches!(self.source, Source::Store)
    }

    /// Ends the hold once its settlement's tries are over: `Some(charge)`
    /// when the store committed it with that charge, `None` when whether it
    /// did is unknown.
    pub(crate) fn finish(&self, committed: Option<Credits>) {
        if self.state.swap(DONE, Ordering::AcqRel) == DONE {
            return;
        }
        match &self.source {
            Source::Store => {}
            Source::Memory(ledger) => ledger.release(&self.r, committed),
            Source::Lease(leases, lease) => leases.finish(lease, &self.r, committed),
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        match self.state.load(Ordering::Acquire) {
            DONE => {}
            OPEN => self.finish(Some(Credits::ZERO)),
            _ => self.finish(None),
        }
    }
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hold")
            .field("request", &self.r.request_id)
            .field("amount", &self.r.amount)
            .finish_non_exhaustive()
    }
}

/// Shards of the table of accounts: calls of different accounts rarely
/// wait for one another's lock.
const SHARDS: usize = 16;

/// Stripes of accounts whose loads wait for each other: enough that
/// accounts rarely share one, so different accounts load side by side.
const LOAD_STRIPES: usize = 64;

fn user_hash(user: &UserId) -> u64 {
    let mut h = DefaultHasher::new();
    user.hash(&mut h);
    h.finish()
}

/// The in-memory ledger of a store this host owns (see the module docs).
pub(crate) struct Ledger {
    store: Arc<dyn Store>,
    /// Where settlements queue to be committed together.
    batch: Arc<batch::Batch>,
    /// Loads of one account wait for each other (see [`LOAD_STRIPES`]).
    loading: Box<[tokio::sync::Mutex<()>]>,
    shards: Box<[Mutex<Shard>]>,
    /// Most accounts with no call in flight one shard keeps.
    per_shard: usize,
}

#[derive(Default)]
struct Shard {
    accounts: HashMap<UserId, Account>,
    /// Moves whenever an account is dropped or refreshed; a load that began
    /// before a move is not kept.
    generation: u64,
    /// Counts uses, to find the least recently used accounts.
    tick: u64,
}

/// One account as the store last said, and what its calls in flight hold.
struct Account {
    /// As stored: `credits` is the stored balance, holds not taken off.
    user: User,
    keys: HashMap<ApiKeyId, HeldKey>,
    /// Held by calls in flight (and by settlements of unknown fate).
    held: Credits,
    /// Calls in flight, and grants under way.
    calls: usize,
    /// A settlement's fate is unknown: read again once no call is in flight.
    stale: bool,
    last_used: u64,
    /// Refreshes begun, and the latest whose read was applied.
    refreshes: u64,
    refreshed: u64,
}

/// A key as stored (its `credits_left` without holds), and what its calls
/// in flight hold.
struct HeldKey {
    key: ApiKey,
    held: Credits,
}

impl Account {
    /// An account as read, holding nothing.
    fn new(user: User, tick: u64) -> Self {
        Account {
            user,
            keys: HashMap::new(),
            held: Credits::ZERO,
            calls: 0,
            stale: false,
            last_used: tick,
            refreshes: 0,
            refreshed: 0,
        }
    }

    /// Checks `r` against what is spendable and holds it.
    fn take(&mut self, r: &Reservation, tick: u64) -> Result<()> {
        let k = self
            .keys
            .get_mut(&r.key_id)
            .ok_or_else(|| Error::Unauthorized("unknown API key".into()))?;
        let balance = self.user.credits.saturating_sub(self.held);
        // As a store floors a key's credits left at zero, so does this.
        let left = k
            .key
            .credits_left
            .map(|l| Credits(l.saturating_sub(k.held).0.max(0)));
        check_spendable(&self.user, &k.key, r, balance, left)?;
        k.held = k.held.saturating_add(r.amount);
        self.held = self.held.saturating_add(r.amount);
        self.calls += 1;
        self.last_used = tick;
        Ok(())
    }
}

/// What a load read from the store.
struct Loaded {
    user: Option<User>,
    key: ApiKey,
}

impl Ledger {
    fn new(store: Arc<dyn Store>, capacity: usize) -> Self {
        Ledger {
            batch: batch::Batch::new(store.clone()),
            loading: (0..LOAD_STRIPES).map(|_| Default::default()).collect(),
            store,
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            per_shard: capacity.div_ceil(SHARDS),
        }
    }

    fn shard(&self, user: &UserId) -> &Mutex<Shard> {
        // The modulo keeps the value below SHARDS, so it fits a usize.
        &self.shards[(user_hash(user) % SHARDS as u64) as usize]
    }

    /// The lock loads of `user`'s account wait on.
    fn loading(&self, user: &UserId) -> &tokio::sync::Mutex<()> {
        // The modulo keeps the value below LOAD_STRIPES, so it fits a usize.
        &self.loading[(user_hash(user) % LOAD_STRIPES as u64) as usize]
    }

    /// Holds `r` in memory, loading its account or key first when they are
    /// not held yet.
    async fn hold(&self, r: &Reservation, key_hash: &KeyHash) -> Result<()> {
        let shard = self.shard(&r.user_id);
        let mut loading = None;
        loop {
            let (generation, have_user) = {
                let mut s = shard.lock();
                s.tick += 1;
                let tick = s.tick;
                let generation = s.generation;
                match s.accounts.get_mut(&r.user_id) {
                    Some(a) if a.keys.contains_key(&r.key_id) => return a.take(r, tick),
                    Some(_) => (generation, true),
                    None => (generation, false),
                }
            };
            if loading.is_none() {
                // One load of an account at a time: calls arriving together
                // read it once, and look again once it is their turn.
                loading = Some(self.loading(&r.user_id).lock().await);
                continue;
            }
            let loaded = self.load(r, key_hash, have_user).await?;
            let mut s = shard.lock();
            if s.generation != generation {
                continue; // it may predate a change: read again
            }
            s.tick += 1;
            let tick = s.tick;
            let a = match s.accounts.entry(r.user_id.clone()) {
                Entry::Occupied(o) => o.into_mut(),
                Entry::Vacant(v) => match loaded.user {
                    Some(user) => v.insert(Account::new(user, tick)),
                    // Dropped since it was found: read it again.
                    None => continue,
                },
            };
            a.keys.entry(r.key_id.clone()).or_insert(HeldKey {
                key: loaded.key,
                held: Credits::ZERO,
            });
            let taken = a.take(r, tick);
            self.bound(&mut s);
            return taken;
        }
    }

    /// Reads a key (and its user, unless `have_user`) for `r`, refusing as
    /// a reservation would when either is missing or the key is not the
    /// user's.
    async fn load(&self, r: &Reservation, key_hash: &KeyHash, have_user: bool) -> Result<Loaded> {
        let key = self.store.api_key_by_hash(key_hash);
        let user = async {
            match have_user {
                true => Ok(None),
                false => self.store.user(&r.user_id).await.map(Some),
            }
        };
        let (key, user) = futures::join!(key, user);
        let unknown_key = || Error::Unauthorized("unknown API key".into());
        let key = match key {
            Ok(k) if k.id == r.key_id && k.user_id == r.user_id => k,
            Ok(_) | Err(Error::NotFound(_)) => return Err(unknown_key()),
            Err(e) => return Err(e),
        };
        let user = match user {
            Err(Error::NotFound(_)) => return Err(Error::Unauthorized("unknown account".into())),
            other => other?,
        };
        Ok(Loaded { user, key })
    }

    /// Drops the least recently used half of the accounts with no call in
    /// flight when the shard holds more than its share.
    fn bound(&self, s: &mut Shard) {
        if s.accounts.len() <= self.per_shard {
            return;
        }
        let mut idle: Vec<u64> = s
            .accounts
            .values()
            .filter(|a| a.calls == 0)
            .map(|a| a.last_used)
            .collect();
        if idle.is_empty() {
            return;
        }
        let half = idle.len() / 2;
        let (_, cut, _) = idle.select_nth_unstable(half);
        let cut = *cut;
        s.accounts.retain(|_, a| a.calls > 0 || a.last_used > cut);
        s.generation += 1;
    }

    /// Ends the hold of `r`: with its committed charge, or (`None`) with its
    /// fate unknown.
    fn release(&self, r: &Reservation, committed: Option<Credits>) {
        let mut s = self.shard(&r.user_id).lock();
        let Some(a) = s.accounts.get_mut(&r.user_id) else {
            return; // never happens: an account with calls in flight is kept
        };
        a.calls = a.calls.saturating_sub(1);
        match committed {
            Some(charged) => {
                a.held = a.held.saturating_sub(r.amount);
                a.user.credits = a.user.credits.saturating_sub(charged);
                if let Some(k) = a.keys.get_mut(&r.key_id) {
                    k.held = k.held.saturating_sub(r.amount);
                    k.key.credits_left = charged_credits_left(k.key.credits_left, charged);
                }
            }
            // It may have been charged: keep it held until the account is
            // read again.
            None => a.stale = true,
        }
        if a.calls == 0 && a.stale {
            s.accounts.remove(&r.user_id);
            s.generation += 1;
        }
    }

    /// A grant through the store, kept in step in memory (see the module
    /// docs). The account is held in memory (read first when it is not)
    /// and pinned while the grant is under way, so that its amount is added
    /// to what memory holds exactly once: a load racing with the grant
    /// could not tell whether what it read includes it.
    async fn grant(&self, g: &CreditGrant) -> Result<Credits> {
        let shard = self.shard(&g.user_id);
        let removal = Credits(g.amount.0.saturating_neg().max(0));
        loop {
            let generation = {
                let mut s = shard.lock();
                if let Some(a) = s.accounts.get_mut(&g.user_id) {
                    if removal > Credits::ZERO {
                        // What calls in flight hold cannot be removed.
                        granted_balance(a.user.credits.saturating_sub(a.held), g.amount)?;
                        a.held = a.held.saturating_add(removal);
                    }
                    a.calls += 1;
                    break;
                }
                s.generation
            };
            let user = match self.store.user(&g.user_id).await {
                Ok(u) => u,
                // No such user: the store's own answer to the grant.
                Err(Error::NotFound(_)) => return self.store.grant_credits(g).await,
                Err(e) => return Err(e),
            };
            let mut s = shard.lock();
            if s.generation == generation && !s.accounts.contains_key(&g.user_id) {
                s.tick += 1;
                let tick = s.tick;
                s.accounts
                    .insert(g.user_id.clone(), Account::new(user, tick));
            }
        }
        let granted = self.store.grant_credits(g).await;
        let mut s = shard.lock();
        if let Some(a) = s.accounts.get_mut(&g.user_id) {
            a.calls = a.calls.saturating_sub(1);
            match &granted {
                Ok(_) => {
                    a.held = a.held.saturating_sub(removal);
                    a.user.credits = a.user.credits.saturating_add(g.amount);
                }
                // Failed with its fate unknown (memory checked what the
                // store would refuse): read the account again once no call
                // is in flight; a removal stays held until then.
                Err(_) => a.stale = true,
            }
            if a.calls == 0 && a.stale {
                s.accounts.remove(&g.user_id);
                s.generation += 1;
            }
        }
        self.bound(&mut s);
        granted
    }

    /// Takes from the store what changed of an account other than money,
    /// keeping its holds (see the module docs).
    async fn refresh(&self, user: &UserId) -> Result<()> {
        let shard = self.shard(user);
        let ticket = {
            let mut s = shard.lock();
            // A load under way may have read the account before the change.
            s.generation += 1;
            match s.accounts.get_mut(user) {
                None => return Ok(()),
                Some(a) => {
                    a.refreshes += 1;
                    a.refreshes
                }
            }
        };
        let read = futures::try_join!(self.store.user(user), self.store.api_keys(user));
        let mut s = shard.lock();
        let Some(a) = s.accounts.get_mut(user) else {
            return Ok(());
        };
        let (fresh, keys) = match read {
            Ok(read) => read,
            Err(e) => {
                // Not applied: read it again once no call is in flight.
                a.stale = true;
                if a.calls == 0 {
                    s.accounts.remove(user);
                }
                return Err(e);
            }
        };
        if ticket <= a.refreshed {
            return Ok(()); // a later refresh read a newer state and applied it
        }
        a.refreshed = ticket;
        let credits = a.user.credits;
        a.user = User { credits, ..fresh };
        for key in keys {
            if let Some(k) = a.keys.get_mut(&key.id) {
                let left = if key.credit_limit == k.key.credit_limit {
                    k.key.credits_left
                } else {
                    moved_credits_left(k.key.credit_limit, k.key.credits_left, key.credit_limit)
                };
                k.key = ApiKey {
                    credits_left: left,
                    ..key
                };
            }
        }
        Ok(())
    }
}

#[cfg(all(test, feature = "testkit"))]
mod tests {
    use super::*;
    use crate::store::{LedgerStore, UserStore};
    use crate::store_support::release_settlement;
    use crate::testkit::InstrumentedStore;

    fn clock() -> Arc<dyn Clock> {
        Arc::new(crate::clock::SystemClock)
    }

    async fn account(store: &InstrumentedStore, credits: i64) -> (User, ApiKey) {
        let email = format!(
            "{}@users.test",
            crate::secret::random_token(8).to_lowercase()
        );
        let user = crate::fixtures::new_user(&email, Credits(credits));
        store.inner.create_user(&user).await.unwrap();
        let key = crate::fixtures::new_key(&user, None, Timestamp(0));
        store.inner.create_api_key(&key).await.unwrap();
        (user, key)
    }

    async fn hold(a: &Admission, user: &User, key: &ApiKey, amount: i64) -> Result<Hold> {
        let r = Reservation {
            request_id: RequestId::generate(),
            user_id: user.id.clone(),
            key_id: key.id.clone(),
            route: Route::ChatCompletions,
            amount: Credits(amount),
            created_at: Timestamp(1),
        };
        a.hold(r, key).await
    }

    /// Settles `h` in the store, charging `charged`, as the gateway does.
    async fn settle(a: &Admission, h: &Hold, charged: i64) {
        let mut st = release_settlement(h.reservation(), Timestamp(2));
        st.charged = Credits(charged);
        let outcome = a.settle(h, &st).await.unwrap();
        assert_eq!(outcome, SettleOutcome::Applied);
        h.finish(Some(Credits(charged)));
    }

    fn grant(user: &User, amount: i64) -> CreditGrant {
        CreditGrant {
            user_id: user.id.clone(),
            amount: Credits(amount),
            by: "test".into(),
            reason: "test".into(),
            at: Timestamp(3),
        }
    }

    fn refused<T: std::fmt::Debug>(r: Result<T>) {
        assert!(matches!(r, Err(Error::InsufficientCredits(_))), "{r:?}");
    }

    /// At a steady rate of calls, each lease is taken ahead of need, in
    /// the background: after the first calls (before the key had spent
    /// anything), no call waits for a lease, although each lease takes a
    /// while to reserve. (Paused time: a call that waited would show it.)
    #[tokio::test(start_paused = true)]
    async fn at_a_steady_rate_leases_are_taken_ahead_and_no_call_waits_for_one() {
        let store = Arc::new(InstrumentedStore::new().shared());
        let clock = crate::clock::ManualClock::new(Timestamp(1_000_000));
        let config = LeaseConfig {
            idle: std::time::Duration::from_secs(5),
            renew_after: std::time::Duration::from_secs(3_600),
        };
        let a = Admission::new(store.clone(), 1_000, Arc::new(clock.clone()), Some(config));
        let (u, k) = account(&store, 10_000_000).await;
        store.delay("reserve", std::time::Duration::from_millis(50));
        store.take_calls();
        let mut waited = Vec::new();
        for i in 0..300 {
            let t0 = tokio::time::Instant::now();
            let h = hold(&a, &u, &k, 1_000).await.unwrap();
            if t0.elapsed() > std::time::Duration::ZERO {
                waited.push(i);
            }
            settle(&a, &h, 1_000).await;
            // A call every 100 ms.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            clock.advance(std::time::Duration::from_millis(100));
        }
        assert_eq!(waited, vec![0, 1], "calls that waited for a lease");
        // Leases of about what 10 calls a second spend over a few seconds.
        let reserves = store.take_calls()["reserve"];
        assert!((10..=20).contains(&reserves), "{reserves} leases");
        let t = store.inner.ledger_totals().await.unwrap();
        assert_eq!((t.settlements, t.charged), (300, Credits(300_000)));
    }

    #[tokio::test]
    async fn an_account_is_read_once_and_only_idle_ones_go_past_the_capacity() {
        let store = Arc::new(InstrumentedStore::new());
        let a = Admission::new(store.clone(), SHARDS, clock(), None);
        let mut busy = Vec::new();
        for _ in 0..100 {
            let (u, k) = account(&store, 100).await;
            let h = hold(&a, &u, &k, 10).await.unwrap();
            busy.push((u, k, h));
        }
        // Every account has a call in flight: none may go.
        assert_eq!(a.accounts_held(), 100);
        for _ in 0..100 {
            let (u, k) = account(&store, 100).await;
            settle(&a, &hold(&a, &u, &k, 10).await.unwrap(), 1).await;
        }
        let n = a.accounts_held();
        assert!((100..150).contains(&n), "{n} accounts held");
        // Those with calls in flight are still held, with their holds: a
        // call is admitted against what they hold, without the store.
        store.take_calls();
        for (u, k, _) in &busy {
            refused(hold(&a, u, k, 91).await);
            settle(&a, &hold(&a, u, k, 90).await.unwrap(), 0).await;
        }
        assert_eq!(store.take_calls().get("user"), None);
    }

    #[tokio::test]
    async fn a_settlement_of_unknown_fate_keeps_its_hold_until_the_account_is_read_again() {
        let store = Arc::new(InstrumentedStore::new());
        let a = Admission::new(store.clone(), 1_000, clock(), None);
        let (u, k) = account(&store, 100).await;
        let first = hold(&a, &u, &k, 60).await.unwrap();
        let second = hold(&a, &u, &k, 30).await.unwrap();
        first.finish(None);
        // 60 may have been charged: 10 is spendable.
        refused(hold(&a, &u, &k, 11).await);
        settle(&a, &second, 5).await;
        // Idle now, it was dropped: the store says what was charged.
        store.take_calls();
        settle(&a, &hold(&a, &u, &k, 95).await.unwrap(), 0).await;
        assert_eq!(store.take_calls().get("user"), Some(&1));
        refused(hold(&a, &u, &k, 96).await);
    }

    #[tokio::test]
    async fn a_hold_dropped_unsettled_is_released_and_one_dropped_settling_is_not() {
        let store = Arc::new(InstrumentedStore::new());
        let a = Admission::new(store.clone(), 1_000, clock(), None);
        let (u, k) = account(&store, 100).await;
        drop(hold(&a, &u, &k, 100).await.unwrap());
        let all = hold(&a, &u, &k, 100).await.unwrap();
        let mut st = release_settlement(all.reservation(), Timestamp(2));
        st.charged = Credits(40);
        a.settle(&all, &st).await.unwrap();
        drop(all);
        assert_eq!(store.inner.user(&u.id).await.unwrap().credits, Credits(60));
        settle(&a, &hold(&a, &u, &k, 60).await.unwrap(), 0).await;
        refused(hold(&a, &u, &k, 61).await);
    }

    #[tokio::test]
    async fn grants_are_spendable_at_once_and_a_removal_cannot_take_what_calls_hold() {
        let store = Arc::new(InstrumentedStore::new());
        let a = Admission::new(store.clone(), 1_000, clock(), None);
        let (u, k) = account(&store, 100).await;
        let h = hold(&a, &u, &k, 70).await.unwrap();
        refused(a.grant(&grant(&u, -31)).await);
        assert_eq!(a.grant(&grant(&u, -30)).await.unwrap(), Credits(70));
        settle(&a, &h, 70).await;
        refused(hold(&a, &u, &k, 1).await);
        assert_eq!(a.grant(&grant(&u, 5)).await.unwrap(), Credits(5));
        settle(&a, &hold(&a, &u, &k, 5).await.unwrap(), 5).await;
        refused(hold(&a, &u, &k, 1).await);
        // A grant to an account not held yet reads it first, once.
        let (v, kv) = account(&store, 0).await;
        store.take_calls();
        a.grant(&grant(&v, 7)).await.unwrap();
        settle(&a, &hold(&a, &v, &kv, 7).await.unwrap(), 7).await;
        let calls = store.take_calls();
        assert_eq!(
            (calls.get("user"), calls.get("api_key_by_hash")),
            (Some(&1), Some(&1))
        );
        assert_eq!(
            store.inner.user(&v.id).await.unwrap().credits,
            Credits::ZERO
        );
    }
}
