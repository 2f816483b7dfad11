//! The [`Store`] trait, delegated method by method to the modules that
//! implement each area.

use async_trait::async_trait;
use cxmpute_core::{
    ApiKey, ApiKeyId, ApiKeyUpdate, CatalogueStore, CreditGrant, Credits, Day, KeyHash,
    LedgerStore, LedgerTotals, LoginCode, NetworkStore, Notification, NotificationId, PoolEntry,
    PriceEntry, Provider, ProviderId, Provision, ProvisionId, ProvisionState, RefreshToken,
    RequestId, Reservation, Result, SettleOutcome, Settlement, SignInStore, StatsBatch,
    StatsCounters, StatsStore, Suspension, Timestamp, TokenFamilyId, UsageRecord, User, UserId,
    UserStore,
};

use crate::DynamoStore;

#[async_trait]
impl UserStore for DynamoStore {
    async fn create_user(&self, user: &User) -> Result<()> {
        self.create_user_impl(user).await
    }
    async fn user(&self, id: &UserId) -> Result<User> {
        self.user_impl(id).await
    }
    async fn user_by_email(&self, email: &str) -> Result<User> {
        self.user_by_email_impl(email).await
    }
    async fn search_users(&self, query: &str, limit: usize) -> Result<Vec<User>> {
        self.search_users_impl(query, limit).await
    }
    async fn set_user_suspended(&self, id: &UserId, suspension: Option<Suspension>) -> Result<()> {
        self.set_user_suspended_impl(id, suspension).await
    }
    async fn create_api_key(&self, key: &ApiKey) -> Result<()> {
        self.create_api_key_impl(key).await
    }
    async fn api_key_by_hash(&self, hash: &KeyHash) -> Result<ApiKey> {
        self.api_key_by_hash_impl(hash).await
    }
    async fn api_keys(&self, user: &UserId) -> Result<Vec<ApiKey>> {
        self.api_keys_impl(user).await
    }
    async fn update_api_key(&self, id: &ApiKeyId, update: &ApiKeyUpdate) -> Result<ApiKey> {
        self.update_api_key_impl(id, update).await
    }
    async fn revoke_api_key(&self, id: &ApiKeyId, at: Timestamp) -> Result<()> {
        self.revoke_api_key_impl(id, at).await
    }
}

#[async_trait]
impl NetworkStore for DynamoStore {
    async fn create_provider(&self, provider: &Provider) -> Result<()> {
        self.create_provider_impl(provider).await
    }
    async fn provider(&self, id: &ProviderId) -> Result<Provider> {
        self.provider_impl(id).await
    }
    async fn provider_by_key_hash(&self, hash: &KeyHash) -> Result<Provider> {
        self.provider_by_key_hash_impl(hash).await
    }
    async fn provider_by_user(&self, user: &UserId) -> Result<Provider> {
        self.provider_by_user_impl(user).await
    }
    async fn rotate_provider_key(&self, id: &ProviderId, new_hash: &KeyHash) -> Result<()> {
        self.rotate_provider_key_impl(id, new_hash).await
    }
    async fn set_provider_suspended(
        &self,
        id: &ProviderId,
        suspension: Option<Suspension>,
    ) -> Result<()> {
        self.set_provider_suspended_impl(id, suspension).await
    }
    async fn create_provision(&self, provision: &Provision, entries: &[PoolEntry]) -> Result<()> {
        self.create_provision_impl(provision, entries).await
    }
    async fn provision(&self, id: &ProvisionId) -> Result<Provision> {
        self.provision_impl(id).await
    }
    async fn provisions_by_provider(&self, provider: &ProviderId) -> Result<Vec<Provision>> {
        self.provisions_by_provider_impl(provider).await
    }
    async fn provisions(&self) -> Result<Vec<Provision>> {
        self.provisions_impl().await
    }
    async fn update_provision(
        &self,
        id: &ProvisionId,
        state: ProvisionState,
        endpoint: Option<String>,
        entries: &[PoolEntry],
    ) -> Result<()> {
        self.update_provision_impl(id, state, endpoint, entries)
            .await
    }
    async fn heartbeat(&self, id: &ProvisionId, at: Timestamp) -> Result<()> {
        self.heartbeat_impl(id, at).await
    }
    async fn delete_provision(&self, id: &ProvisionId) -> Result<()> {
        self.delete_provision_impl(id).await
    }
    async fn pool_entries(&self) -> Result<Vec<PoolEntry>> {
        self.pool_entries_impl().await
    }
    async fn expire_provisions(&self, before: Timestamp) -> Result<Vec<ProvisionId>> {
        self.expire_provisions_impl(before).await
    }
}

#[async_trait]
impl LedgerStore for DynamoStore {
    async fn grant_credits(&self, grant: &CreditGrant) -> Result<Credits> {
        self.grant_credits_impl(grant).await
    }
    async fn credit_grants(&self, user: &UserId) -> Result<Vec<CreditGrant>> {
        self.credit_grants_impl(user).await
    }
    async fn reserve(&self, reservation: &Reservation) -> Result<()> {
        self.reserve_impl(reservation).await
    }
    async fn settle(&self, settlement: &Settlement) -> Result<SettleOutcome> {
        self.settle_impl(settlement).await
    }
    async fn settlement(&self, request: &RequestId) -> Result<UsageRecord> {
        self.settlement_impl(request).await
    }
    async fn release_stale_reservations(&self, before: Timestamp) -> Result<u64> {
        self.release_stale_reservations_impl(before).await
    }
    async fn ledger_totals(&self) -> Result<LedgerTotals> {
        self.ledger_totals_impl().await
    }
    async fn usage_records(&self, user: &UserId, limit: usize) -> Result<Vec<UsageRecord>> {
        self.usage_records_impl(user, limit).await
    }
}

#[async_trait]
impl SignInStore for DynamoStore {
    async fn issue_login_code(
        &self,
        code: &LoginCode,
        window_start: Timestamp,
        max_per_window: u32,
    ) -> Result<()> {
        self.issue_login_code_impl(code, window_start, max_per_window)
            .await
    }
    async fn verify_login_code(
        &self,
        email: &str,
        code_hash: &KeyHash,
        now: Timestamp,
        max_attempts: u32,
    ) -> Result<()> {
        self.verify_login_code_impl(email, code_hash, now, max_attempts)
            .await
    }
    async fn prune_login_codes(&self, before: Timestamp) -> Result<u64> {
        self.prune_login_codes_impl(before).await
    }
    async fn create_refresh_token(&self, token: &RefreshToken) -> Result<()> {
        self.create_refresh_token_impl(token).await
    }
    async fn prune_refresh_tokens(&self, before: Timestamp) -> Result<u64> {
        self.prune_refresh_tokens_impl(before).await
    }
    async fn rotate_refresh_token(
        &self,
        old: &KeyHash,
        next: &RefreshToken,
        now: Timestamp,
    ) -> Result<UserId> {
        self.rotate_refresh_token_impl(old, next, now).await
    }
    async fn revoke_token_family(&self, family: &TokenFamilyId) -> Result<()> {
        self.revoke_token_family_impl(family).await
    }
    async fn refresh_token_family(&self, hash: &KeyHash) -> Result<TokenFamilyId> {
        self.refresh_token_family_impl(hash).await
    }
}

#[async_trait]
impl CatalogueStore for DynamoStore {
    async fn prices(&self) -> Result<Vec<PriceEntry>> {
        self.prices_impl().await
    }
    async fn put_price(&self, price: &PriceEntry) -> Result<()> {
        self.put_price_impl(price).await
    }
    async fn put_notification(&self, n: &Notification) -> Result<()> {
        self.put_notification_impl(n).await
    }
    async fn delete_notification(&self, id: &NotificationId) -> Result<()> {
        self.delete_notification_impl(id).await
    }
    async fn notifications(&self) -> Result<Vec<Notification>> {
        self.notifications_impl().await
    }
}

#[async_trait]
impl StatsStore for DynamoStore {
    async fn record_stats(&self, batch: &StatsBatch) -> Result<()> {
        self.record_stats_impl(batch).await
    }
    async fn stats(&self, scope: &str, from: Day, to: Day) -> Result<Vec<(Day, StatsCounters)>> {
        self.stats_impl(scope, from, to).await
    }
    async fn stats_by_prefix(
        &self,
        prefix: &str,
        from: Day,
        to: Day,
    ) -> Result<Vec<(String, StatsCounters)>> {
        self.stats_by_prefix_impl(prefix, from, to).await
    }
}
