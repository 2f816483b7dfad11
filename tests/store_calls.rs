//! Counts the store calls one gateway request makes: no read to route it,
//! one atomic write to admit it, one to settle it.
//!
//! `CountingStore` is instrumentation around the real `MemoryStore`: it
//! forwards every call unchanged and counts it by name.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use cxmpute_core::testkit::{TestHost, MODEL};
use cxmpute_core::*;
use parking_lot::Mutex;
use serde_json::json;

struct CountingStore {
    inner: MemoryStore,
    calls: Mutex<BTreeMap<&'static str, usize>>,
}

impl CountingStore {
    fn hit(&self, name: &'static str) {
        *self.calls.lock().entry(name).or_default() += 1;
    }

    fn take(&self) -> BTreeMap<&'static str, usize> {
        std::mem::take(&mut *self.calls.lock())
    }
}

#[async_trait]
impl Store for CountingStore {
    async fn create_user(&self, user: &User) -> Result<()> {
        self.hit("create_user");
        self.inner.create_user(user).await
    }

    async fn user(&self, id: &UserId) -> Result<User> {
        self.hit("user");
        self.inner.user(id).await
    }

    async fn user_by_email(&self, email: &str) -> Result<User> {
        self.hit("user_by_email");
        self.inner.user_by_email(email).await
    }

    async fn search_users(&self, query: &str, limit: usize) -> Result<Vec<User>> {
        self.hit("search_users");
        self.inner.search_users(query, limit).await
    }

    async fn set_user_suspended(&self, id: &UserId, suspension: Option<Suspension>) -> Result<()> {
        self.hit("set_user_suspended");
        self.inner.set_user_suspended(id, suspension).await
    }

    async fn grant_credits(&self, grant: &CreditGrant) -> Result<Credits> {
        self.hit("grant_credits");
        self.inner.grant_credits(grant).await
    }

    async fn credit_grants(&self, user: &UserId) -> Result<Vec<CreditGrant>> {
        self.hit("credit_grants");
        self.inner.credit_grants(user).await
    }

    async fn create_api_key(&self, key: &ApiKey) -> Result<()> {
        self.hit("create_api_key");
        self.inner.create_api_key(key).await
    }

    async fn api_key_by_hash(&self, hash: &KeyHash) -> Result<ApiKey> {
        self.hit("api_key_by_hash");
        self.inner.api_key_by_hash(hash).await
    }

    async fn api_keys(&self, user: &UserId) -> Result<Vec<ApiKey>> {
        self.hit("api_keys");
        self.inner.api_keys(user).await
    }

    async fn update_api_key(&self, id: &ApiKeyId, update: &ApiKeyUpdate) -> Result<ApiKey> {
        self.hit("update_api_key");
        self.inner.update_api_key(id, update).await
    }

    async fn revoke_api_key(&self, id: &ApiKeyId, at: Timestamp) -> Result<()> {
        self.hit("revoke_api_key");
        self.inner.revoke_api_key(id, at).await
    }

    async fn create_provider(&self, provider: &Provider) -> Result<()> {
        self.hit("create_provider");
        self.inner.create_provider(provider).await
    }

    async fn provider(&self, id: &ProviderId) -> Result<Provider> {
        self.hit("provider");
        self.inner.provider(id).await
    }

    async fn provider_by_key_hash(&self, hash: &KeyHash) -> Result<Provider> {
        self.hit("provider_by_key_hash");
        self.inner.provider_by_key_hash(hash).await
    }

    async fn provider_by_user(&self, user: &UserId) -> Result<Provider> {
        self.hit("provider_by_user");
        self.inner.provider_by_user(user).await
    }

    async fn rotate_provider_key(&self, id: &ProviderId, new_hash: &KeyHash) -> Result<()> {
        self.hit("rotate_provider_key");
        self.inner.rotate_provider_key(id, new_hash).await
    }

    async fn set_provider_suspended(
        &self,
        id: &ProviderId,
        suspension: Option<Suspension>,
    ) -> Result<()> {
        self.hit("set_provider_suspended");
        self.inner.set_provider_suspended(id, suspension).await
    }

    async fn create_provision(&self, provision: &Provision, entries: &[PoolEntry]) -> Result<()> {
        self.hit("create_provision");
        self.inner.create_provision(provision, entries).await
    }

    async fn provision(&self, id: &ProvisionId) -> Result<Provision> {
        self.hit("provision");
        self.inner.provision(id).await
    }

    async fn provisions_by_provider(&self, provider: &ProviderId) -> Result<Vec<Provision>> {
        self.hit("provisions_by_provider");
        self.inner.provisions_by_provider(provider).await
    }

    async fn provisions(&self) -> Result<Vec<Provision>> {
        self.hit("provisions");
        self.inner.provisions().await
    }

    async fn update_provision(
        &self,
        id: &ProvisionId,
        state: ProvisionState,
        endpoint: Option<String>,
        entries: &[PoolEntry],
    ) -> Result<()> {
        self.hit("update_provision");
        self.inner
            .update_provision(id, state, endpoint, entries)
            .await
    }

    async fn heartbeat(&self, id: &ProvisionId, at: Timestamp) -> Result<()> {
        self.hit("heartbeat");
        self.inner.heartbeat(id, at).await
    }

    async fn delete_provision(&self, id: &ProvisionId) -> Result<()> {
        self.hit("delete_provision");
        self.inner.delete_provision(id).await
    }

    async fn pool_entries(&self) -> Result<Vec<PoolEntry>> {
        self.hit("pool_entries");
        self.inner.pool_entries().await
    }

    async fn expire_provisions(&self, before: Timestamp) -> Result<Vec<ProvisionId>> {
        self.hit("expire_provisions");
        self.inner.expire_provisions(before).await
    }

    async fn reserve(&self, reservation: &Reservation) -> Result<()> {
        self.hit("reserve");
        self.inner.reserve(reservation).await
    }

    async fn settle(&self, settlement: &Settlement) -> Result<SettleOutcome> {
        self.hit("settle");
        self.inner.settle(settlement).await
    }

    async fn settlement(&self, request: &RequestId) -> Result<UsageRecord> {
        self.hit("settlement");
        self.inner.settlement(request).await
    }

    async fn release_stale_reservations(&self, before: Timestamp) -> Result<u64> {
        self.hit("release_stale_reservations");
        self.inner.release_stale_reservations(before).await
    }

    async fn ledger_totals(&self) -> Result<LedgerTotals> {
        self.hit("ledger_totals");
        self.inner.ledger_totals().await
    }

    async fn usage_records(&self, user: &UserId, limit: usize) -> Result<Vec<UsageRecord>> {
        self.hit("usage_records");
        self.inner.usage_records(user, limit).await
    }

    async fn prices(&self) -> Result<Vec<PriceEntry>> {
        self.hit("prices");
        self.inner.prices().await
    }

    async fn put_price(&self, price: &PriceEntry) -> Result<()> {
        self.hit("put_price");
        self.inner.put_price(price).await
    }

    async fn issue_login_code(
        &self,
        code: &LoginCode,
        window_start: Timestamp,
        max_per_window: u32,
    ) -> Result<()> {
        self.hit("issue_login_code");
        self.inner
            .issue_login_code(code, window_start, max_per_window)
            .await
    }

    async fn verify_login_code(
        &self,
        email: &str,
        code_hash: &KeyHash,
        now: Timestamp,
        max_attempts: u32,
    ) -> Result<()> {
        self.hit("verify_login_code");
        self.inner
            .verify_login_code(email, code_hash, now, max_attempts)
            .await
    }

    async fn create_refresh_token(&self, token: &RefreshToken) -> Result<()> {
        self.hit("create_refresh_token");
        self.inner.create_refresh_token(token).await
    }

    async fn rotate_refresh_token(
        &self,
        old: &KeyHash,
        next: &RefreshToken,
        now: Timestamp,
    ) -> Result<UserId> {
        self.hit("rotate_refresh_token");
        self.inner.rotate_refresh_token(old, next, now).await
    }

    async fn revoke_token_family(&self, family: &TokenFamilyId) -> Result<()> {
        self.hit("revoke_token_family");
        self.inner.revoke_token_family(family).await
    }

    async fn refresh_token_family(&self, hash: &KeyHash) -> Result<TokenFamilyId> {
        self.hit("refresh_token_family");
        self.inner.refresh_token_family(hash).await
    }

    async fn put_notification(&self, n: &Notification) -> Result<()> {
        self.hit("put_notification");
        self.inner.put_notification(n).await
    }

    async fn delete_notification(&self, id: &NotificationId) -> Result<()> {
        self.hit("delete_notification");
        self.inner.delete_notification(id).await
    }

    async fn notifications(&self) -> Result<Vec<Notification>> {
        self.hit("notifications");
        self.inner.notifications().await
    }

    async fn record_stats(&self, batch: &StatsBatch) -> Result<()> {
        self.hit("record_stats");
        self.inner.record_stats(batch).await
    }

    async fn stats(&self, scope: &str, from: Day, to: Day) -> Result<Vec<(Day, StatsCounters)>> {
        self.hit("stats");
        self.inner.stats(scope, from, to).await
    }

    async fn stats_by_prefix(
        &self,
        prefix: &str,
        from: Day,
        to: Day,
    ) -> Result<Vec<(String, StatsCounters)>> {
        self.hit("stats_by_prefix");
        self.inner.stats_by_prefix(prefix, from, to).await
    }
}

#[tokio::test]
async fn a_gateway_call_reads_once_to_authenticate_and_writes_once_to_admit_and_once_to_settle() {
    let store = Arc::new(CountingStore {
        inner: MemoryStore::new(),
        calls: Mutex::new(BTreeMap::new()),
    });
    let h = TestHost::start(store.clone()).await;
    let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    let (_, key) = h.user(Credits::whole(10)).await;
    for stream in [false, true] {
        let settled_before = h.broker.store().ledger_totals().await.unwrap().settlements;
        store.take();
        let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream});
        let r = h.post("/v1/chat/completions", &key, &body).await;
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        // Even a stream is settled before its body ends.
        let settled = store.inner.ledger_totals().await.unwrap().settlements;
        assert_eq!(settled, settled_before + 1);
        let calls = store.take();
        let expected: BTreeMap<&'static str, usize> =
            [("api_key_by_hash", 1), ("reserve", 1), ("settle", 1)]
                .into_iter()
                .collect();
        assert_eq!(calls, expected, "stream: {stream}");
    }
}
