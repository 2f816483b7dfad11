//! The [`Store`] trait: everything the broker keeps, behind one dyn-compatible
//! interface that SQLite, DynamoDB and memory implement alike.
//!
//! Rules every implementation follows (the conformance suite checks them):
//!
//! - Creates are create-if-absent: a second create of the same id (or the
//!   same unique email / key hash) fails with [`Error::AlreadyExists`] and
//!   changes nothing.
//! - Lookups of missing things fail with [`Error::NotFound`].
//! - Every method that moves credits is atomic on its own: the broker never
//!   reads a balance and writes it back.
//! - [`Store::settle`] is idempotent per request id.

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::secret::KeyHash;
use crate::types::*;

/// Where the broker keeps its state. See the [module docs](self) for the rules.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    // ---- users -------------------------------------------------------------

    /// Creates a user. `AlreadyExists` when the id or the email is taken.
    async fn create_user(&self, user: &User) -> Result<()>;
    /// A user by id.
    async fn user(&self, id: &UserId) -> Result<User>;
    /// A user by (lower-cased) email.
    async fn user_by_email(&self, email: &str) -> Result<User>;
    /// Users whose email contains `query` (case-insensitive), at most `limit`, by email.
    async fn search_users(&self, query: &str, limit: usize) -> Result<Vec<User>>;
    /// Suspends (`Some`) or unsuspends (`None`) a user.
    async fn set_user_suspended(&self, id: &UserId, suspension: Option<Suspension>) -> Result<()>;
    /// Adds (or, when negative, removes) credits and records the grant, atomically.
    /// Removing more than the balance fails with `InsufficientCredits` and changes
    /// nothing. Returns the new balance.
    async fn grant_credits(&self, grant: &CreditGrant) -> Result<Credits>;
    /// The grants recorded for a user, oldest first.
    async fn credit_grants(&self, user: &UserId) -> Result<Vec<CreditGrant>>;

    // ---- API keys ----------------------------------------------------------

    /// Stores a new key. `AlreadyExists` when the id or the hash is taken;
    /// `NotFound` when the user does not exist.
    async fn create_api_key(&self, key: &ApiKey) -> Result<()>;
    /// The key with this hash (revoked keys included: the caller checks).
    async fn api_key_by_hash(&self, hash: &KeyHash) -> Result<ApiKey>;
    /// A user's keys, oldest first.
    async fn api_keys(&self, user: &UserId) -> Result<Vec<ApiKey>>;
    /// Changes a key's name, limit or routes atomically and returns it.
    async fn update_api_key(&self, id: &ApiKeyId, update: &ApiKeyUpdate) -> Result<ApiKey>;
    /// Revokes a key; it never works again. Revoking twice is fine.
    async fn revoke_api_key(&self, id: &ApiKeyId, at: Timestamp) -> Result<()>;

    // ---- providers ---------------------------------------------------------

    /// Creates a provider. `AlreadyExists` when the id or key hash is taken.
    async fn create_provider(&self, provider: &Provider) -> Result<()>;
    /// A provider by id.
    async fn provider(&self, id: &ProviderId) -> Result<Provider>;
    /// The provider whose key has this hash.
    async fn provider_by_key_hash(&self, hash: &KeyHash) -> Result<Provider>;
    /// The provider account of a user.
    async fn provider_by_user(&self, user: &UserId) -> Result<Provider>;
    /// Replaces the provider key's hash; the old key stops working at once.
    async fn rotate_provider_key(&self, id: &ProviderId, new_hash: &KeyHash) -> Result<()>;
    /// Suspends (`Some`) or unsuspends (`None`) a provider.
    async fn set_provider_suspended(
        &self,
        id: &ProviderId,
        suspension: Option<Suspension>,
    ) -> Result<()>;

    // ---- provisions and pools ----------------------------------------------

    /// Registers a node together with its pool entries (possibly none), atomically.
    /// `NotFound` when the provider does not exist.
    async fn create_provision(&self, provision: &Provision, entries: &[PoolEntry]) -> Result<()>;
    /// A node by id.
    async fn provision(&self, id: &ProvisionId) -> Result<Provision>;
    /// A provider's nodes, oldest first.
    async fn provisions_by_provider(&self, provider: &ProviderId) -> Result<Vec<Provision>>;
    /// Every node that is not ended, oldest first (admin listing, pool rebuilds).
    async fn provisions(&self) -> Result<Vec<Provision>>;
    /// Replaces a node's state, endpoint and pool entries in one step (start,
    /// ready, end). An `Ended` node must be given no entries.
    async fn update_provision(
        &self,
        id: &ProvisionId,
        state: ProvisionState,
        endpoint: Option<String>,
        entries: &[PoolEntry],
    ) -> Result<()>;
    /// Records that a node is alive.
    async fn heartbeat(&self, id: &ProvisionId, at: Timestamp) -> Result<()>;
    /// Deletes a node and its pool entries together.
    async fn delete_provision(&self, id: &ProvisionId) -> Result<()>;
    /// Every pool entry of every live node: the broker's routing index is built from this.
    async fn pool_entries(&self) -> Result<Vec<PoolEntry>>;
    /// Ends every non-ended node last heard from before `before` (its pool
    /// entries go) and returns their ids.
    async fn expire_provisions(&self, before: Timestamp) -> Result<Vec<ProvisionId>>;

    // ---- credits -----------------------------------------------------------

    /// Holds `amount` of the user's credits and of the key's limit, atomically,
    /// and records the reservation. Fails, changing nothing, with
    /// `Unauthorized` (key missing or revoked, or not the user's),
    /// `Forbidden` (user suspended, route not permitted), `InsufficientCredits`
    /// (balance) or `KeyLimitReached` (key limit). A second reservation with
    /// the same request id is `AlreadyExists`. Marks the key as used.
    async fn reserve(&self, reservation: &Reservation) -> Result<()>;
    /// Applies a settlement once, atomically: charges `min(charged, reserved)`,
    /// returns the rest of the reservation to the user and the key, credits the
    /// provider's reward, stores the usage record and drops the reservation.
    /// A repeat of a settled request id is `AlreadySettled` and changes
    /// nothing; an unknown request id is `NotFound`.
    async fn settle(&self, settlement: &Settlement) -> Result<SettleOutcome>;
    /// The usage record of a settled request.
    async fn settlement(&self, request: &RequestId) -> Result<UsageRecord>;
    /// Releases (settles at zero cost, no reward) every reservation taken
    /// before `before`: requests whose host died mid-flight. Returns how many.
    async fn release_stale_reservations(&self, before: Timestamp) -> Result<u64>;
    /// Sums over all settlements and open reservations.
    async fn ledger_totals(&self) -> Result<LedgerTotals>;
    /// A user's settled requests, newest first, at most `limit`.
    async fn usage_records(&self, user: &UserId, limit: usize) -> Result<Vec<UsageRecord>>;

    // ---- pricing -----------------------------------------------------------

    /// Every stored price.
    async fn prices(&self) -> Result<Vec<PriceEntry>>;
    /// Stores a price, replacing the one for the same service and model.
    async fn put_price(&self, price: &PriceEntry) -> Result<()>;

    // ---- sign-in -----------------------------------------------------------

    /// Stores a new login code for the email, replacing any earlier one (its
    /// attempts reset). `RateLimited` when `max_per_window` codes were already
    /// issued for the email at or after `window_start`.
    async fn issue_login_code(
        &self,
        code: &LoginCode,
        window_start: Timestamp,
        max_per_window: u32,
    ) -> Result<()>;
    /// Checks a code, atomically: `Unauthorized` when there is none, it expired,
    /// `max_attempts` wrong tries were made already (even when this one is
    /// right), or it does not match (counting one more wrong try). A match
    /// consumes the code.
    async fn verify_login_code(
        &self,
        email: &str,
        code_hash: &KeyHash,
        now: Timestamp,
        max_attempts: u32,
    ) -> Result<()>;
    /// Deletes every sign-in code issued before `before`, used or not, and the
    /// record of issues before it that the per-email limit counts; returns
    /// how many codes were deleted. The broker passes a time before which no
    /// code can still be used or counted (housekeeping, so that a flood of
    /// requests for distinct emails leaves nothing behind).
    async fn prune_login_codes(&self, before: Timestamp) -> Result<u64>;
    /// Stores a new refresh token.
    async fn create_refresh_token(&self, token: &RefreshToken) -> Result<()>;
    /// Deletes every refresh token that expired before `before`, used or not,
    /// and the revocation of each family with no token left where the store
    /// keeps revocations apart; returns how many tokens were deleted. An
    /// expired token is refused anyway; a deleted one is refused as unknown
    /// (so presenting it again no longer revokes its family).
    async fn prune_refresh_tokens(&self, before: Timestamp) -> Result<u64>;
    /// Rotates a refresh token, atomically: the old one must be unused, unexpired
    /// and its family not revoked; it is marked used and `next` (same family) is
    /// stored. Presenting a used token revokes its whole family. Returns the user.
    async fn rotate_refresh_token(
        &self,
        old: &KeyHash,
        next: &RefreshToken,
        now: Timestamp,
    ) -> Result<UserId>;
    /// Revokes every token of a family (logout, reuse detected).
    async fn revoke_token_family(&self, family: &TokenFamilyId) -> Result<()>;
    /// The family of a token (to log out with it).
    async fn refresh_token_family(&self, hash: &KeyHash) -> Result<TokenFamilyId>;

    // ---- notifications -----------------------------------------------------

    /// Creates or replaces a notification.
    async fn put_notification(&self, n: &Notification) -> Result<()>;
    /// Deletes a notification.
    async fn delete_notification(&self, id: &NotificationId) -> Result<()>;
    /// Every notification, by start time.
    async fn notifications(&self) -> Result<Vec<Notification>>;

    // ---- stats -------------------------------------------------------------

    /// Adds a batch of deltas once: a batch whose id was applied before adds nothing.
    async fn record_stats(&self, batch: &StatsBatch) -> Result<()>;
    /// Counters for one scope over a range of days (inclusive), by day;
    /// days with nothing recorded are left out.
    async fn stats(&self, scope: &str, from: Day, to: Day) -> Result<Vec<(Day, StatsCounters)>>;
    /// Every scope starting with `prefix` that has counters in the range, with
    /// its counters summed over the range.
    async fn stats_by_prefix(
        &self,
        prefix: &str,
        from: Day,
        to: Day,
    ) -> Result<Vec<(String, StatsCounters)>>;
}

/// `Err(NotFound)` for an absent value.
pub fn found<T>(v: Option<T>, what: impl FnOnce() -> String) -> Result<T> {
    v.ok_or_else(|| Error::NotFound(what()))
}
