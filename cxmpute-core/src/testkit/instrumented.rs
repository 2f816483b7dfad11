//! [`InstrumentedStore`]: a store (memory by default) that counts calls,
//! can slow them down, fail them and lose answers.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;

use crate::*;

/// A store with instruments (a [`MemoryStore`] unless another is
/// [wrapped](InstrumentedStore::wrap)), for tests that watch what the broker
/// asks of its store: it counts every call by name, and the most of one
/// name under way at once; it can make a call take longer (as a distant
/// database does), fail calls without applying them, and lose the answer
/// of a call (apply it, then report a failure, as when a connection drops
/// after the database committed).
#[derive(Default)]
pub struct InstrumentedStore<S = MemoryStore> {
    /// The store that does the work (read it directly to look without counting).
    pub inner: S,
    calls: Mutex<BTreeMap<&'static str, usize>>,
    /// By name: calls under way now, and the most at once so far.
    in_flight: Mutex<BTreeMap<&'static str, (usize, usize)>>,
    delays: Mutex<BTreeMap<&'static str, Duration>>,
    /// The call whose next answer is lost, and how many answers were lost.
    lose: Mutex<(Option<&'static str>, usize)>,
    /// By name: how many of the next calls fail without being applied.
    fail: Mutex<BTreeMap<&'static str, usize>>,
    /// Says it is shared even when the wrapped store is owned by one host.
    shared: bool,
}

impl<S> std::fmt::Debug for InstrumentedStore<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstrumentedStore")
            .field("calls", &*self.calls.lock())
            .finish_non_exhaustive()
    }
}

impl InstrumentedStore {
    /// An empty memory store with nothing counted.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<S> InstrumentedStore<S> {
    /// `inner` with instruments, nothing counted yet.
    pub fn wrap(inner: S) -> Self {
        InstrumentedStore {
            inner,
            calls: Mutex::default(),
            in_flight: Mutex::default(),
            delays: Mutex::default(),
            lose: Mutex::default(),
            fail: Mutex::default(),
            shared: false,
        }
    }

    /// Says the store is shared by hosts, whatever the wrapped one says, so
    /// that a broker admits calls through it (`reserve`, `settle`) as it
    /// does on DynamoDB.
    pub fn shared(mut self) -> Self {
        self.shared = true;
        self
    }

    /// The calls counted since the last take, by name; counting starts again.
    pub fn take_calls(&self) -> BTreeMap<&'static str, usize> {
        std::mem::take(&mut *self.calls.lock())
    }

    /// Every later `call` (a [`Store`] method's name) waits `d` before it runs.
    pub fn delay(&self, call: &'static str, d: Duration) {
        self.delays.lock().insert(call, d);
    }

    /// The most `call`s that were under way at once so far.
    pub fn peak_in_flight(&self, call: &'static str) -> usize {
        self.in_flight.lock().get(call).map_or(0, |c| c.1)
    }

    /// The next successful `call` (a [`Store`] method's name) is applied and
    /// then answered with [`Error::Unavailable`].
    pub fn lose_next_answer(&self, call: &'static str) {
        self.lose.lock().0 = Some(call);
    }

    /// The next `times` calls of `call` (a [`Store`] method's name) fail
    /// with [`Error::Unavailable`] without being applied, as when the
    /// database is unreachable.
    pub fn fail_next(&self, call: &'static str, times: usize) {
        self.fail.lock().insert(call, times);
    }

    /// How many answers were lost so far.
    pub fn lost_answers(&self) -> usize {
        self.lose.lock().1
    }

    async fn call<T>(
        &self,
        name: &'static str,
        work: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        *self.calls.lock().entry(name).or_default() += 1;
        let _under_way = UnderWay::start(&self.in_flight, name);
        let delay = self.delays.lock().get(name).copied();
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        if let Some(left) = self.fail.lock().get_mut(name).filter(|n| **n > 0) {
            *left -= 1;
            return Err(Error::Unavailable {
                message: format!("{name} (failed on purpose)"),
                source: None,
            });
        }
        let answer = work.await?;
        let mut lose = self.lose.lock();
        if lose.0 == Some(name) {
            *lose = (None, lose.1 + 1);
            return Err(Error::Unavailable {
                message: format!("{name} (the answer was lost)"),
                source: None,
            });
        }
        Ok(answer)
    }
}

/// One call counted as under way until dropped (a cancelled call included).
struct UnderWay<'a> {
    table: &'a Mutex<BTreeMap<&'static str, (usize, usize)>>,
    name: &'static str,
}

impl<'a> UnderWay<'a> {
    fn start(table: &'a Mutex<BTreeMap<&'static str, (usize, usize)>>, name: &'static str) -> Self {
        let mut t = table.lock();
        let (now, peak) = t.entry(name).or_default();
        *now += 1;
        *peak = (*peak).max(*now);
        UnderWay { table, name }
    }
}

impl Drop for UnderWay<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.table.lock().get_mut(self.name) {
            c.0 -= 1;
        }
    }
}

#[async_trait]
impl<S: Store> UserStore for InstrumentedStore<S> {
    async fn create_user(&self, user: &User) -> Result<()> {
        self.call("create_user", self.inner.create_user(user)).await
    }

    async fn user(&self, id: &UserId) -> Result<User> {
        self.call("user", self.inner.user(id)).await
    }

    async fn user_by_email(&self, email: &str) -> Result<User> {
        self.call("user_by_email", self.inner.user_by_email(email))
            .await
    }

    async fn search_users(&self, query: &str, limit: usize) -> Result<Vec<User>> {
        self.call("search_users", self.inner.search_users(query, limit))
            .await
    }

    async fn set_user_suspended(&self, id: &UserId, suspension: Option<Suspension>) -> Result<()> {
        self.call(
            "set_user_suspended",
            self.inner.set_user_suspended(id, suspension),
        )
        .await
    }

    async fn update_user_settings(&self, id: &UserId, update: &UserSettingsUpdate) -> Result<User> {
        self.call(
            "update_user_settings",
            self.inner.update_user_settings(id, update),
        )
        .await
    }

    async fn swap_alert_mark(
        &self,
        id: &UserId,
        kind: AlertKind,
        from: Option<Timestamp>,
        to: Option<Timestamp>,
    ) -> Result<bool> {
        self.call(
            "swap_alert_mark",
            self.inner.swap_alert_mark(id, kind, from, to),
        )
        .await
    }

    async fn create_api_key(&self, key: &ApiKey) -> Result<()> {
        self.call("create_api_key", self.inner.create_api_key(key))
            .await
    }

    async fn api_key_by_hash(&self, hash: &KeyHash) -> Result<ApiKey> {
        self.call("api_key_by_hash", self.inner.api_key_by_hash(hash))
            .await
    }

    async fn api_keys(&self, user: &UserId) -> Result<Vec<ApiKey>> {
        self.call("api_keys", self.inner.api_keys(user)).await
    }

    async fn update_api_key(&self, id: &ApiKeyId, update: &ApiKeyUpdate) -> Result<ApiKey> {
        self.call("update_api_key", self.inner.update_api_key(id, update))
            .await
    }

    async fn revoke_api_key(&self, id: &ApiKeyId, at: Timestamp) -> Result<()> {
        self.call("revoke_api_key", self.inner.revoke_api_key(id, at))
            .await
    }

    async fn add_rate_usage(
        &self,
        scope: &str,
        window: Timestamp,
        add: RateUsage,
    ) -> Result<Option<RateUsage>> {
        self.call(
            "add_rate_usage",
            self.inner.add_rate_usage(scope, window, add),
        )
        .await
    }
}

#[async_trait]
impl<S: Store> NetworkStore for InstrumentedStore<S> {
    async fn create_provider(&self, provider: &Provider) -> Result<()> {
        self.call("create_provider", self.inner.create_provider(provider))
            .await
    }

    async fn provider(&self, id: &ProviderId) -> Result<Provider> {
        self.call("provider", self.inner.provider(id)).await
    }

    async fn provider_by_key_hash(&self, hash: &KeyHash) -> Result<Provider> {
        self.call(
            "provider_by_key_hash",
            self.inner.provider_by_key_hash(hash),
        )
        .await
    }

    async fn provider_by_user(&self, user: &UserId) -> Result<Provider> {
        self.call("provider_by_user", self.inner.provider_by_user(user))
            .await
    }

    async fn rotate_provider_key(&self, id: &ProviderId, new_hash: &KeyHash) -> Result<()> {
        self.call(
            "rotate_provider_key",
            self.inner.rotate_provider_key(id, new_hash),
        )
        .await
    }

    async fn set_provider_suspended(
        &self,
        id: &ProviderId,
        suspension: Option<Suspension>,
    ) -> Result<()> {
        self.call(
            "set_provider_suspended",
            self.inner.set_provider_suspended(id, suspension),
        )
        .await
    }

    async fn create_provision(&self, provision: &Provision, entries: &[PoolEntry]) -> Result<()> {
        self.call(
            "create_provision",
            self.inner.create_provision(provision, entries),
        )
        .await
    }

    async fn provision(&self, id: &ProvisionId) -> Result<Provision> {
        self.call("provision", self.inner.provision(id)).await
    }

    async fn provisions_by_provider(&self, provider: &ProviderId) -> Result<Vec<Provision>> {
        self.call(
            "provisions_by_provider",
            self.inner.provisions_by_provider(provider),
        )
        .await
    }

    async fn provisions(&self) -> Result<Vec<Provision>> {
        self.call("provisions", self.inner.provisions()).await
    }

    async fn update_provision(
        &self,
        id: &ProvisionId,
        state: ProvisionState,
        endpoint: Option<String>,
        entries: &[PoolEntry],
    ) -> Result<()> {
        self.call(
            "update_provision",
            self.inner.update_provision(id, state, endpoint, entries),
        )
        .await
    }

    async fn heartbeat(&self, id: &ProvisionId, at: Timestamp) -> Result<()> {
        self.call("heartbeat", self.inner.heartbeat(id, at)).await
    }

    async fn delete_provision(&self, id: &ProvisionId) -> Result<()> {
        self.call("delete_provision", self.inner.delete_provision(id))
            .await
    }

    async fn pool_entries(&self) -> Result<Vec<PoolEntry>> {
        self.call("pool_entries", self.inner.pool_entries()).await
    }

    async fn expire_provisions(&self, before: Timestamp) -> Result<Vec<ProvisionId>> {
        self.call("expire_provisions", self.inner.expire_provisions(before))
            .await
    }
}

#[async_trait]
impl<S: Store> LedgerStore for InstrumentedStore<S> {
    /// The wrapped store's answer unless made [`shared`](Self::shared); not
    /// counted: it is a property, not a call.
    fn owned_by_one_host(&self) -> bool {
        !self.shared && self.inner.owned_by_one_host()
    }

    /// The wrapped store's answer; not counted.
    fn groups_settlements(&self) -> bool {
        self.inner.groups_settlements()
    }

    async fn grant_credits(&self, grant: &CreditGrant) -> Result<Credits> {
        self.call("grant_credits", self.inner.grant_credits(grant))
            .await
    }

    async fn credit_grants(&self, user: &UserId) -> Result<Vec<CreditGrant>> {
        self.call("credit_grants", self.inner.credit_grants(user))
            .await
    }

    async fn reserve(&self, reservation: &Reservation) -> Result<()> {
        self.call("reserve", self.inner.reserve(reservation)).await
    }

    async fn settle(&self, settlement: &Settlement) -> Result<SettleOutcome> {
        self.call("settle", self.inner.settle(settlement)).await
    }

    async fn settle_held(&self, calls: &[(Reservation, Settlement)]) -> Result<Vec<SettleOutcome>> {
        self.call("settle_held", self.inner.settle_held(calls))
            .await
    }

    async fn settle_leased(
        &self,
        lease: &RequestId,
        calls: &[(Reservation, Settlement)],
    ) -> Result<Vec<SettleOutcome>> {
        self.call("settle_leased", self.inner.settle_leased(lease, calls))
            .await
    }

    async fn settlement(&self, request: &RequestId) -> Result<UsageRecord> {
        self.call("settlement", self.inner.settlement(request))
            .await
    }

    async fn release_stale_reservations(&self, before: Timestamp) -> Result<u64> {
        self.call(
            "release_stale_reservations",
            self.inner.release_stale_reservations(before),
        )
        .await
    }

    async fn ledger_totals(&self) -> Result<LedgerTotals> {
        self.call("ledger_totals", self.inner.ledger_totals()).await
    }

    async fn usage_records(&self, user: &UserId, limit: usize) -> Result<Vec<UsageRecord>> {
        self.call("usage_records", self.inner.usage_records(user, limit))
            .await
    }
}

#[async_trait]
impl<S: Store> SignInStore for InstrumentedStore<S> {
    async fn issue_login_code(
        &self,
        code: &LoginCode,
        window_start: Timestamp,
        max_per_window: u32,
    ) -> Result<()> {
        self.call(
            "issue_login_code",
            self.inner
                .issue_login_code(code, window_start, max_per_window),
        )
        .await
    }

    async fn verify_login_code(
        &self,
        email: &str,
        code_hash: &KeyHash,
        now: Timestamp,
        max_attempts: u32,
    ) -> Result<()> {
        self.call(
            "verify_login_code",
            self.inner
                .verify_login_code(email, code_hash, now, max_attempts),
        )
        .await
    }

    async fn prune_login_codes(&self, before: Timestamp) -> Result<u64> {
        self.call("prune_login_codes", self.inner.prune_login_codes(before))
            .await
    }

    async fn create_refresh_token(&self, token: &RefreshToken) -> Result<()> {
        self.call(
            "create_refresh_token",
            self.inner.create_refresh_token(token),
        )
        .await
    }

    async fn prune_refresh_tokens(&self, before: Timestamp) -> Result<u64> {
        self.call(
            "prune_refresh_tokens",
            self.inner.prune_refresh_tokens(before),
        )
        .await
    }

    async fn rotate_refresh_token(
        &self,
        old: &KeyHash,
        next: &RefreshToken,
        now: Timestamp,
    ) -> Result<UserId> {
        self.call(
            "rotate_refresh_token",
            self.inner.rotate_refresh_token(old, next, now),
        )
        .await
    }

    async fn revoke_token_family(&self, family: &TokenFamilyId) -> Result<()> {
        self.call(
            "revoke_token_family",
            self.inner.revoke_token_family(family),
        )
        .await
    }

    async fn refresh_token_family(&self, hash: &KeyHash) -> Result<TokenFamilyId> {
        self.call(
            "refresh_token_family",
            self.inner.refresh_token_family(hash),
        )
        .await
    }
}

#[async_trait]
impl<S: Store> CatalogueStore for InstrumentedStore<S> {
    async fn catalogue(&self) -> Result<Vec<CatalogueModel>> {
        self.call("catalogue", self.inner.catalogue()).await
    }

    async fn put_catalogue_model(&self, m: &CatalogueModel) -> Result<()> {
        self.call("put_catalogue_model", self.inner.put_catalogue_model(m))
            .await
    }

    async fn delete_catalogue_model(&self, service: Service, model: &str) -> Result<()> {
        let call = self.inner.delete_catalogue_model(service, model);
        self.call("delete_catalogue_model", call).await
    }

    async fn aliases(&self) -> Result<Vec<ModelAlias>> {
        self.call("aliases", self.inner.aliases()).await
    }

    async fn put_alias(&self, alias: &ModelAlias) -> Result<()> {
        self.call("put_alias", self.inner.put_alias(alias)).await
    }

    async fn delete_alias(&self, alias: &str) -> Result<()> {
        self.call("delete_alias", self.inner.delete_alias(alias))
            .await
    }

    async fn prices(&self) -> Result<Vec<PriceEntry>> {
        self.call("prices", self.inner.prices()).await
    }

    async fn put_price(&self, price: &PriceEntry) -> Result<()> {
        self.call("put_price", self.inner.put_price(price)).await
    }

    async fn put_notification(&self, n: &Notification) -> Result<()> {
        self.call("put_notification", self.inner.put_notification(n))
            .await
    }

    async fn delete_notification(&self, id: &NotificationId) -> Result<()> {
        self.call("delete_notification", self.inner.delete_notification(id))
            .await
    }

    async fn notifications(&self) -> Result<Vec<Notification>> {
        self.call("notifications", self.inner.notifications()).await
    }
}

#[async_trait]
impl<S: Store> StatsStore for InstrumentedStore<S> {
    async fn record_stats(&self, batch: &StatsBatch) -> Result<()> {
        self.call("record_stats", self.inner.record_stats(batch))
            .await
    }

    async fn stats(&self, scope: &str, from: Day, to: Day) -> Result<Vec<(Day, StatsCounters)>> {
        self.call("stats", self.inner.stats(scope, from, to)).await
    }

    async fn stats_by_prefix(
        &self,
        prefix: &str,
        from: Day,
        to: Day,
    ) -> Result<Vec<(String, StatsCounters)>> {
        self.call(
            "stats_by_prefix",
            self.inner.stats_by_prefix(prefix, from, to),
        )
        .await
    }
}
