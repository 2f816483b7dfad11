//! [`MemoryStore`]: a complete [`Store`](crate::store::Store) in memory, one
//! impl block per area of the store.
//!
//! One mutex guards all state, every area's, so every method is atomic
//! exactly as a database transaction would be. Good for tests and for trying
//! the broker out; state is lost when the process ends.

use std::collections::{BTreeMap, HashMap, HashSet};

use async_trait::async_trait;
use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::secret::KeyHash;
use crate::store::{CatalogueStore, LedgerStore, NetworkStore, SignInStore, StatsStore, UserStore};
use crate::store_support::found;
use crate::types::*;

/// Every settled call by request id, spread over [`Settled::SHARDS`] hash
/// maps by the id's hash. One map doubling under the store's lock moved
/// every record at once: a pause of a hundred milliseconds for every call
/// in flight past a few hundred thousand calls. A shard doubles with a
/// sixty-fourth of them. (A B-tree never pauses, but its lookup of a random
/// id costs a cache miss per level, a tenth of the memory host's CPU per
/// call.) Records are boxed: a doubling then moves and zeroes a pointer
/// per call rather than the whole record, a tenth of the bytes.
struct Settled {
    hasher: std::hash::RandomState,
    shards: Vec<HashMap<RequestId, Box<UsageRecord>>>,
}

impl Default for Settled {
    fn default() -> Self {
        Settled {
            hasher: Default::default(),
            shards: (0..Self::SHARDS).map(|_| HashMap::new()).collect(),
        }
    }
}

impl Settled {
    const SHARDS: usize = 64;

    fn shard(&self, id: &RequestId) -> usize {
        use std::hash::BuildHasher;
        (self.hasher.hash_one(id) % Self::SHARDS as u64) as usize
    }

    fn contains_key(&self, id: &RequestId) -> bool {
        self.shards[self.shard(id)].contains_key(id)
    }

    fn get(&self, id: &RequestId) -> Option<&UsageRecord> {
        self.shards[self.shard(id)].get(id).map(|u| &**u)
    }

    fn insert(&mut self, id: RequestId, usage: UsageRecord) {
        let i = self.shard(&id);
        self.shards[i].insert(id, Box::new(usage));
    }

    fn values(&self) -> impl Iterator<Item = &UsageRecord> {
        self.shards.iter().flat_map(|m| m.values().map(|u| &**u))
    }
}

#[derive(Default)]
struct Inner {
    // users and API keys
    users: HashMap<UserId, User>,
    emails: HashMap<String, UserId>,
    keys: HashMap<ApiKeyId, ApiKey>,
    key_hashes: HashMap<KeyHash, ApiKeyId>,
    /// Rate counters by scope: the window stored and its counts.
    rates: HashMap<String, (Timestamp, RateUsage)>,
    // the network
    providers: HashMap<ProviderId, Provider>,
    provider_hashes: HashMap<KeyHash, ProviderId>,
    provisions: HashMap<ProvisionId, Provision>,
    entries: HashMap<ProvisionId, Vec<PoolEntry>>,
    // the ledger (balances and earnings are the users' and providers')
    grants: Vec<CreditGrant>,
    reservations: HashMap<RequestId, Reservation>,
    settled: Settled,
    totals: LedgerTotals,
    // sign-in
    codes: HashMap<String, (LoginCode, u32)>,
    code_issues: HashMap<String, Vec<Timestamp>>,
    tokens: HashMap<KeyHash, (RefreshToken, bool)>,
    revoked_families: HashSet<TokenFamilyId>,
    // the catalogue
    models: BTreeMap<(Service, String), CatalogueModel>,
    aliases: BTreeMap<String, ModelAlias>,
    prices: BTreeMap<(Service, Option<String>), PriceEntry>,
    notifications: HashMap<NotificationId, Notification>,
    // stats
    stats: BTreeMap<(String, Day), StatsCounters>,
    stats_batches: HashSet<String>,
}

/// A [`Store`](crate::store::Store) in memory. Cheap to create; not shared between processes.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore").finish_non_exhaustive()
    }
}

fn sorted_by<T, K: Ord>(mut v: Vec<T>, key: impl Fn(&T) -> K) -> Vec<T> {
    v.sort_by_key(|x| key(x));
    v
}

#[async_trait]
impl UserStore for MemoryStore {
    async fn create_user(&self, user: &User) -> Result<()> {
        let mut s = self.inner.lock();
        if s.users.contains_key(&user.id) || s.emails.contains_key(&user.email) {
            return Err(Error::AlreadyExists(format!("user {}", user.email)));
        }
        s.emails.insert(user.email.clone(), user.id.clone());
        s.users.insert(user.id.clone(), user.clone());
        Ok(())
    }

    async fn user(&self, id: &UserId) -> Result<User> {
        found(self.inner.lock().users.get(id).cloned(), || {
            format!("user {id}")
        })
    }

    async fn user_by_email(&self, email: &str) -> Result<User> {
        let s = self.inner.lock();
        let u = s.emails.get(email).and_then(|id| s.users.get(id)).cloned();
        found(u, || format!("user {email}"))
    }

    async fn search_users(&self, query: &str, limit: usize) -> Result<Vec<User>> {
        let q = query.to_lowercase();
        let s = self.inner.lock();
        let v: Vec<User> = s
            .users
            .values()
            .filter(|u| u.email.contains(&q))
            .cloned()
            .collect();
        let mut v = sorted_by(v, |u| u.email.clone());
        v.truncate(limit);
        Ok(v)
    }

    async fn set_user_suspended(&self, id: &UserId, suspension: Option<Suspension>) -> Result<()> {
        let mut s = self.inner.lock();
        let u = found(s.users.get_mut(id), || format!("user {id}"))?;
        u.suspended = suspension;
        Ok(())
    }

    async fn update_user_settings(&self, id: &UserId, update: &UserSettingsUpdate) -> Result<User> {
        let mut s = self.inner.lock();
        let u = found(s.users.get_mut(id), || format!("user {id}"))?;
        if let Some(budget) = update.budget {
            u.budget = budget;
        }
        if let Some(alerts) = update.alerts {
            u.alerts = alerts;
        }
        Ok(u.clone())
    }

    async fn swap_alert_mark(
        &self,
        id: &UserId,
        kind: AlertKind,
        from: Option<Timestamp>,
        to: Option<Timestamp>,
    ) -> Result<bool> {
        let mut s = self.inner.lock();
        match s.users.get_mut(id) {
            Some(u) if u.alerted.get(kind) == from => {
                u.alerted.set(kind, to);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn create_api_key(&self, key: &ApiKey) -> Result<()> {
        let mut s = self.inner.lock();
        if !s.users.contains_key(&key.user_id) {
            return Err(Error::NotFound(format!("user {}", key.user_id)));
        }
        if s.keys.contains_key(&key.id) || s.key_hashes.contains_key(&key.hash) {
            return Err(Error::AlreadyExists(format!("api key {}", key.id)));
        }
        s.key_hashes.insert(key.hash, key.id.clone());
        s.keys.insert(key.id.clone(), key.clone());
        Ok(())
    }

    async fn api_key_by_hash(&self, hash: &KeyHash) -> Result<ApiKey> {
        let s = self.inner.lock();
        let k = s
            .key_hashes
            .get(hash)
            .and_then(|id| s.keys.get(id))
            .cloned();
        found(k, || "api key".to_owned())
    }

    async fn api_keys(&self, user: &UserId) -> Result<Vec<ApiKey>> {
        let s = self.inner.lock();
        let v = s
            .keys
            .values()
            .filter(|k| &k.user_id == user)
            .cloned()
            .collect();
        Ok(sorted_by(v, |k: &ApiKey| (k.created_at, k.id.clone())))
    }

    async fn update_api_key(&self, id: &ApiKeyId, update: &ApiKeyUpdate) -> Result<ApiKey> {
        let mut s = self.inner.lock();
        let k = found(s.keys.get_mut(id), || format!("api key {id}"))?;
        crate::store_support::apply_key_update(k, update);
        Ok(k.clone())
    }

    async fn revoke_api_key(&self, id: &ApiKeyId, at: Timestamp) -> Result<()> {
        let mut s = self.inner.lock();
        let k = found(s.keys.get_mut(id), || format!("api key {id}"))?;
        k.revoked_at.get_or_insert(at);
        Ok(())
    }

    async fn add_rate_usage(
        &self,
        scope: &str,
        window: Timestamp,
        add: RateUsage,
    ) -> Result<Option<RateUsage>> {
        let mut s = self.inner.lock();
        let (at, counts) = s
            .rates
            .entry(scope.to_owned())
            .or_insert((window, RateUsage::default()));
        if *at > window {
            return Ok(None);
        }
        if *at < window {
            *at = window;
            *counts = RateUsage::default();
        }
        counts.requests = counts.requests.saturating_add(add.requests);
        counts.tokens = counts.tokens.saturating_add(add.tokens);
        Ok(Some(*counts))
    }
}

#[async_trait]
impl NetworkStore for MemoryStore {
    async fn create_provider(&self, provider: &Provider) -> Result<()> {
        let mut s = self.inner.lock();
        let user_taken = provider
            .user_id
            .as_ref()
            .is_some_and(|u| s.providers.values().any(|p| p.user_id.as_ref() == Some(u)));
        if s.providers.contains_key(&provider.id)
            || s.provider_hashes.contains_key(&provider.key_hash)
            || user_taken
        {
            return Err(Error::AlreadyExists(format!("provider {}", provider.id)));
        }
        s.provider_hashes
            .insert(provider.key_hash, provider.id.clone());
        s.providers.insert(provider.id.clone(), provider.clone());
        Ok(())
    }

    async fn provider(&self, id: &ProviderId) -> Result<Provider> {
        found(self.inner.lock().providers.get(id).cloned(), || {
            format!("provider {id}")
        })
    }

    async fn provider_by_key_hash(&self, hash: &KeyHash) -> Result<Provider> {
        let s = self.inner.lock();
        let p = s
            .provider_hashes
            .get(hash)
            .and_then(|id| s.providers.get(id))
            .cloned();
        found(p, || "provider key".to_owned())
    }

    async fn provider_by_user(&self, user: &UserId) -> Result<Provider> {
        let s = self.inner.lock();
        let p = s
            .providers
            .values()
            .find(|p| p.user_id.as_ref() == Some(user))
            .cloned();
        found(p, || format!("provider of {user}"))
    }

    async fn rotate_provider_key(&self, id: &ProviderId, new_hash: &KeyHash) -> Result<()> {
        let mut s = self.inner.lock();
        if s.provider_hashes.contains_key(new_hash) {
            return Err(Error::AlreadyExists("provider key".to_owned()));
        }
        let p = found(s.providers.get_mut(id), || format!("provider {id}"))?;
        let old = std::mem::replace(&mut p.key_hash, *new_hash);
        s.provider_hashes.remove(&old);
        s.provider_hashes.insert(*new_hash, id.clone());
        Ok(())
    }

    async fn set_provider_suspended(
        &self,
        id: &ProviderId,
        suspension: Option<Suspension>,
    ) -> Result<()> {
        let mut s = self.inner.lock();
        let p = found(s.providers.get_mut(id), || format!("provider {id}"))?;
        p.suspended = suspension;
        Ok(())
    }

    async fn create_provision(&self, provision: &Provision, entries: &[PoolEntry]) -> Result<()> {
        let mut s = self.inner.lock();
        if !s.providers.contains_key(&provision.provider_id) {
            return Err(Error::NotFound(format!(
                "provider {}",
                provision.provider_id
            )));
        }
        if s.provisions.contains_key(&provision.id) {
            return Err(Error::AlreadyExists(format!("provision {}", provision.id)));
        }
        s.provisions.insert(provision.id.clone(), provision.clone());
        s.entries.insert(provision.id.clone(), entries.to_vec());
        Ok(())
    }

    async fn provision(&self, id: &ProvisionId) -> Result<Provision> {
        found(self.inner.lock().provisions.get(id).cloned(), || {
            format!("provision {id}")
        })
    }

    async fn provisions_by_provider(&self, provider: &ProviderId) -> Result<Vec<Provision>> {
        let s = self.inner.lock();
        let v = s
            .provisions
            .values()
            .filter(|p| &p.provider_id == provider)
            .cloned()
            .collect();
        Ok(sorted_by(v, |p: &Provision| (p.created_at, p.id.clone())))
    }

    async fn provisions(&self) -> Result<Vec<Provision>> {
        let s = self.inner.lock();
        let v = s
            .provisions
            .values()
            .filter(|p| p.state != ProvisionState::Ended)
            .cloned();
        Ok(sorted_by(v.collect(), |p: &Provision| {
            (p.created_at, p.id.clone())
        }))
    }

    async fn update_provision(
        &self,
        id: &ProvisionId,
        state: ProvisionState,
        endpoint: Option<String>,
        entries: &[PoolEntry],
    ) -> Result<()> {
        crate::store_support::check_provision_update(state, entries)?;
        let mut s = self.inner.lock();
        let p = found(s.provisions.get_mut(id), || format!("provision {id}"))?;
        p.state = state;
        p.endpoint = endpoint;
        s.entries.insert(id.clone(), entries.to_vec());
        Ok(())
    }

    async fn heartbeat(&self, id: &ProvisionId, at: Timestamp) -> Result<()> {
        let mut s = self.inner.lock();
        let p = found(s.provisions.get_mut(id), || format!("provision {id}"))?;
        p.last_heartbeat = p.last_heartbeat.max(at);
        Ok(())
    }

    async fn delete_provision(&self, id: &ProvisionId) -> Result<()> {
        let mut s = self.inner.lock();
        found(s.provisions.remove(id), || format!("provision {id}"))?;
        s.entries.remove(id);
        Ok(())
    }

    async fn pool_entries(&self) -> Result<Vec<PoolEntry>> {
        let s = self.inner.lock();
        let mut v: Vec<PoolEntry> = s.entries.values().flatten().cloned().collect();
        v.sort_by(|a, b| {
            (&a.provision_id, a.service, &a.model).cmp(&(&b.provision_id, b.service, &b.model))
        });
        Ok(v)
    }

    async fn expire_provisions(&self, before: Timestamp) -> Result<Vec<ProvisionId>> {
        let mut s = self.inner.lock();
        let mut gone = Vec::new();
        for p in s.provisions.values_mut() {
            if p.state != ProvisionState::Ended && p.last_heartbeat < before {
                p.state = ProvisionState::Ended;
                gone.push(p.id.clone());
            }
        }
        for id in &gone {
            s.entries.remove(id);
        }
        gone.sort();
        Ok(gone)
    }
}

#[async_trait]
impl LedgerStore for MemoryStore {
    /// A memory store lives in one process: its host's broker owns it.
    fn owned_by_one_host(&self) -> bool {
        true
    }

    async fn grant_credits(&self, grant: &CreditGrant) -> Result<Credits> {
        let mut s = self.inner.lock();
        let u = found(s.users.get_mut(&grant.user_id), || {
            format!("user {}", grant.user_id)
        })?;
        let next = crate::store_support::granted_balance(u.credits, grant.amount)?;
        u.credits = next;
        s.grants.push(grant.clone());
        Ok(next)
    }

    async fn credit_grants(&self, user: &UserId) -> Result<Vec<CreditGrant>> {
        let s = self.inner.lock();
        Ok(s.grants
            .iter()
            .filter(|g| &g.user_id == user)
            .cloned()
            .collect())
    }

    async fn reserve(&self, r: &Reservation) -> Result<()> {
        let mut guard = self.inner.lock();
        let s = &mut *guard;
        if s.reservations.contains_key(&r.request_id) || s.settled.contains_key(&r.request_id) {
            return Err(Error::AlreadyExists(format!(
                "reservation {}",
                r.request_id
            )));
        }
        crate::store_support::apply_reservation(&mut s.users, &mut s.keys, r)?;
        s.totals.reserved = s.totals.reserved.saturating_add(r.amount);
        s.reservations.insert(r.request_id.clone(), r.clone());
        Ok(())
    }

    async fn settle(&self, st: &Settlement) -> Result<SettleOutcome> {
        let mut guard = self.inner.lock();
        let s = &mut *guard;
        if s.settled.contains_key(&st.request_id) {
            return Ok(SettleOutcome::AlreadySettled);
        }
        let Some(r) = s.reservations.remove(&st.request_id) else {
            return crate::store_support::not_open(&st.request_id);
        };
        let plan = crate::store_support::SettlePlan::new(&r, st);
        plan.refund_to(s.users.get_mut(&r.user_id), s.keys.get_mut(&r.key_id));
        if let Some((pid, amount)) = &plan.reward {
            if let Some(p) = s.providers.get_mut(pid) {
                p.earnings = p.earnings.saturating_add(*amount);
            }
        }
        plan.ledger_delta().add_to(&mut s.totals);
        if plan.records_usage() {
            s.settled.insert(st.request_id.clone(), plan.usage);
        }
        Ok(SettleOutcome::Applied)
    }

    async fn settle_held(&self, calls: &[(Reservation, Settlement)]) -> Result<Vec<SettleOutcome>> {
        let mut guard = self.inner.lock();
        let s = &mut *guard;
        let plans = crate::store_support::SettlePlan::for_held_batch(
            calls,
            |id| s.reservations.contains_key(id),
            |id| s.settled.contains_key(id),
        )?;
        let mut out = Vec::with_capacity(calls.len());
        for ((hold, st), plan) in calls.iter().zip(plans) {
            let Some(plan) = plan else {
                out.push(SettleOutcome::AlreadySettled);
                continue;
            };
            plan.charge_to(
                hold,
                s.users.get_mut(&hold.user_id),
                s.keys.get_mut(&hold.key_id),
            );
            if let Some((pid, amount)) = &plan.reward {
                if let Some(p) = s.providers.get_mut(pid) {
                    p.earnings = p.earnings.saturating_add(*amount);
                }
            }
            plan.held_ledger_delta().add_to(&mut s.totals);
            s.settled.insert(st.request_id.clone(), plan.usage);
            out.push(SettleOutcome::Applied);
        }
        Ok(out)
    }

    async fn settle_leased(
        &self,
        lease: &RequestId,
        calls: &[(Reservation, Settlement)],
    ) -> Result<Vec<SettleOutcome>> {
        let mut guard = self.inner.lock();
        let s = &mut *guard;
        let l = found(s.reservations.get(lease).cloned(), || {
            format!("lease {lease}")
        })?;
        let (plans, remaining) = crate::store_support::SettlePlan::for_leased_batch(
            &l,
            calls,
            |id| s.reservations.contains_key(id),
            |id| s.settled.contains_key(id),
        )?;
        let mut out = Vec::with_capacity(calls.len());
        for ((_, st), plan) in calls.iter().zip(plans) {
            let Some(plan) = plan else {
                out.push(SettleOutcome::AlreadySettled);
                continue;
            };
            if let Some((pid, amount)) = &plan.reward {
                if let Some(p) = s.providers.get_mut(pid) {
                    p.earnings = p.earnings.saturating_add(*amount);
                }
            }
            plan.leased_ledger_delta().add_to(&mut s.totals);
            s.settled.insert(st.request_id.clone(), plan.usage);
            out.push(SettleOutcome::Applied);
        }
        if let Some(r) = s.reservations.get_mut(lease) {
            r.amount = remaining;
        }
        Ok(out)
    }

    async fn settlement(&self, request: &RequestId) -> Result<UsageRecord> {
        found(self.inner.lock().settled.get(request).cloned(), || {
            format!("settlement {request}")
        })
    }

    async fn release_stale_reservations(&self, before: Timestamp) -> Result<u64> {
        let stale: Vec<Reservation> = {
            let s = self.inner.lock();
            s.reservations
                .values()
                .filter(|r| r.created_at < before)
                .cloned()
                .collect()
        };
        let mut n = 0;
        for r in stale {
            let st = crate::store_support::release_settlement(&r, before);
            if self.settle(&st).await? == SettleOutcome::Applied {
                n += 1;
            }
        }
        Ok(n)
    }

    async fn ledger_totals(&self) -> Result<LedgerTotals> {
        Ok(self.inner.lock().totals)
    }

    async fn usage_records(&self, user: &UserId, limit: usize) -> Result<Vec<UsageRecord>> {
        let s = self.inner.lock();
        let mut v: Vec<UsageRecord> = s
            .settled
            .values()
            .filter(|u| &u.user_id == user)
            .cloned()
            .collect();
        v.sort_by(|a, b| (b.at, &b.request_id).cmp(&(a.at, &a.request_id)));
        v.truncate(limit);
        Ok(v)
    }
}

#[async_trait]
impl SignInStore for MemoryStore {
    async fn issue_login_code(
        &self,
        code: &LoginCode,
        window_start: Timestamp,
        max_per_window: u32,
    ) -> Result<()> {
        let mut s = self.inner.lock();
        let issued = s.code_issues.entry(code.email.clone()).or_default();
        issued.retain(|t| *t >= window_start);
        if issued.len() >= max_per_window as usize {
            return Err(Error::RateLimited(
                "too many sign-in codes requested".into(),
            ));
        }
        issued.push(code.created_at);
        s.codes.insert(code.email.clone(), (code.clone(), 0));
        Ok(())
    }

    async fn verify_login_code(
        &self,
        email: &str,
        code_hash: &KeyHash,
        now: Timestamp,
        max_attempts: u32,
    ) -> Result<()> {
        let mut s = self.inner.lock();
        let bad = || Error::Unauthorized("invalid or expired code".into());
        let (code, attempts) = s.codes.get_mut(email).ok_or_else(bad)?;
        if code.expires_at <= now || *attempts >= max_attempts {
            return Err(bad());
        }
        if code.code_hash != *code_hash {
            *attempts += 1;
            return Err(bad());
        }
        s.codes.remove(email);
        Ok(())
    }

    async fn prune_login_codes(&self, before: Timestamp) -> Result<u64> {
        let mut s = self.inner.lock();
        let n = s.codes.len();
        s.codes.retain(|_, (c, _)| c.created_at >= before);
        let pruned = (n - s.codes.len()) as u64;
        s.code_issues.retain(|_, issued| {
            issued.retain(|t| *t >= before);
            !issued.is_empty()
        });
        Ok(pruned)
    }

    async fn create_refresh_token(&self, token: &RefreshToken) -> Result<()> {
        let mut s = self.inner.lock();
        if s.tokens.contains_key(&token.hash) {
            return Err(Error::AlreadyExists("refresh token".into()));
        }
        s.tokens.insert(token.hash, (token.clone(), false));
        Ok(())
    }

    async fn prune_refresh_tokens(&self, before: Timestamp) -> Result<u64> {
        let mut s = self.inner.lock();
        let n = s.tokens.len();
        s.tokens.retain(|_, (t, _)| t.expires_at >= before);
        let pruned = (n - s.tokens.len()) as u64;
        let live: HashSet<TokenFamilyId> =
            s.tokens.values().map(|(t, _)| t.family.clone()).collect();
        s.revoked_families.retain(|f| live.contains(f));
        Ok(pruned)
    }

    async fn rotate_refresh_token(
        &self,
        old: &KeyHash,
        next: &RefreshToken,
        now: Timestamp,
    ) -> Result<UserId> {
        let mut s = self.inner.lock();
        let bad = || Error::Unauthorized("invalid refresh token".into());
        let (tok, used) = s.tokens.get(old).cloned().ok_or_else(bad)?;
        if s.revoked_families.contains(&tok.family) {
            return Err(bad());
        }
        if used {
            s.revoked_families.insert(tok.family.clone());
            return Err(Error::Unauthorized(
                "refresh token reused; session revoked".into(),
            ));
        }
        if tok.expires_at <= now {
            return Err(bad());
        }
        if s.tokens.contains_key(&next.hash) {
            return Err(Error::AlreadyExists("refresh token".into()));
        }
        if let Some(e) = s.tokens.get_mut(old) {
            e.1 = true;
        }
        let mut next = next.clone();
        next.family = tok.family.clone();
        s.tokens.insert(next.hash, (next, false));
        Ok(tok.user_id)
    }

    async fn revoke_token_family(&self, family: &TokenFamilyId) -> Result<()> {
        self.inner.lock().revoked_families.insert(family.clone());
        Ok(())
    }

    async fn refresh_token_family(&self, hash: &KeyHash) -> Result<TokenFamilyId> {
        let s = self.inner.lock();
        found(s.tokens.get(hash).map(|t| t.0.family.clone()), || {
            "refresh token".into()
        })
    }
}

#[async_trait]
impl CatalogueStore for MemoryStore {
    async fn catalogue(&self) -> Result<Vec<CatalogueModel>> {
        Ok(self.inner.lock().models.values().cloned().collect())
    }

    async fn put_catalogue_model(&self, m: &CatalogueModel) -> Result<()> {
        let mut s = self.inner.lock();
        s.models.insert((m.service, m.model.clone()), m.clone());
        Ok(())
    }

    async fn delete_catalogue_model(&self, service: Service, model: &str) -> Result<()> {
        let removed = self
            .inner
            .lock()
            .models
            .remove(&(service, model.to_owned()));
        found(removed.map(|_| ()), || {
            format!("catalogue entry {service} `{model}`")
        })
    }

    async fn aliases(&self) -> Result<Vec<ModelAlias>> {
        Ok(self.inner.lock().aliases.values().cloned().collect())
    }

    async fn put_alias(&self, alias: &ModelAlias) -> Result<()> {
        let mut s = self.inner.lock();
        s.aliases.insert(alias.alias.clone(), alias.clone());
        Ok(())
    }

    async fn delete_alias(&self, alias: &str) -> Result<()> {
        let removed = self.inner.lock().aliases.remove(alias);
        found(removed.map(|_| ()), || format!("alias `{alias}`"))
    }

    async fn prices(&self) -> Result<Vec<PriceEntry>> {
        Ok(self.inner.lock().prices.values().cloned().collect())
    }

    async fn put_price(&self, price: &PriceEntry) -> Result<()> {
        let mut s = self.inner.lock();
        s.prices
            .insert((price.service, price.model.clone()), price.clone());
        Ok(())
    }

    async fn put_notification(&self, n: &Notification) -> Result<()> {
        self.inner
            .lock()
            .notifications
            .insert(n.id.clone(), n.clone());
        Ok(())
    }

    async fn delete_notification(&self, id: &NotificationId) -> Result<()> {
        let removed = self.inner.lock().notifications.remove(id);
        found(removed.map(|_| ()), || format!("notification {id}"))
    }

    async fn notifications(&self) -> Result<Vec<Notification>> {
        let v = self.inner.lock().notifications.values().cloned().collect();
        Ok(sorted_by(v, |n: &Notification| (n.starts_at, n.id.clone())))
    }
}

#[async_trait]
impl StatsStore for MemoryStore {
    async fn record_stats(&self, batch: &StatsBatch) -> Result<()> {
        let mut s = self.inner.lock();
        if !s.stats_batches.insert(batch.id.clone()) {
            return Ok(());
        }
        for (day, scope, c) in &batch.deltas {
            s.stats.entry((scope.clone(), *day)).or_default().add(c);
        }
        Ok(())
    }

    async fn stats(&self, scope: &str, from: Day, to: Day) -> Result<Vec<(Day, StatsCounters)>> {
        let s = self.inner.lock();
        let lo = (scope.to_owned(), from);
        let hi = (scope.to_owned(), to);
        if from > to {
            return Ok(Vec::new());
        }
        Ok(s.stats
            .range(lo..=hi)
            .map(|((_, d), c)| (*d, c.clone()))
            .collect())
    }

    async fn stats_by_prefix(
        &self,
        prefix: &str,
        from: Day,
        to: Day,
    ) -> Result<Vec<(String, StatsCounters)>> {
        let s = self.inner.lock();
        let mut out: BTreeMap<String, StatsCounters> = BTreeMap::new();
        for ((scope, day), c) in s.stats.range((prefix.to_owned(), Day(i32::MIN))..) {
            if !scope.starts_with(prefix) {
                break;
            }
            if *day >= from && *day <= to {
                out.entry(scope.clone()).or_default().add(c);
            }
        }
        Ok(out.into_iter().collect())
    }
}
