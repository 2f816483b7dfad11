//! The [`Store`]: everything the broker keeps, behind dyn-compatible traits
//! that SQLite, DynamoDB and memory implement alike.
//!
//! A store is six areas, each a trait of its own:
//!
//! | trait | holds |
//! |-------|-------|
//! | [`UserStore`] | users and their API keys |
//! | [`NetworkStore`] | providers, their nodes (provisions) and the nodes' pool entries |
//! | [`LedgerStore`] | credit grants, reservations and settlements, usage records, the ledger's totals |
//! | [`SignInStore`] | sign-in codes and the refresh tokens of sessions |
//! | [`CatalogueStore`] | what the operator publishes: the model catalogue, prices and notifications |
//! | [`StatsStore`] | usage counters per scope and day |
//!
//! [`Store`] is their sum with a blanket impl: whatever implements the six
//! is a store. Embedders hold an `Arc<dyn Store>` and call any area's method
//! on it without importing the area's trait (a trait object carries its
//! supertraits' methods); calling one on a concrete store (`MemoryStore`,
//! `SqliteStore`) needs the area's trait in scope, e.g.
//! `use cxmpute_core::store::UserStore`. A backend keeps one file (or impl
//! block) per area, and the conformance suite checks it area by area.
//!
//! Rules every implementation follows (the conformance suite checks them):
//!
//! - Creates are create-if-absent: a second create of the same id (or the
//!   same unique email / key hash) fails with [`Error::AlreadyExists`] and
//!   changes nothing.
//! - Lookups of missing things fail with [`Error::NotFound`].
//! - Every method that moves credits is atomic on its own: the broker never
//!   reads a balance and writes it back.
//! - [`LedgerStore::settle`] and [`LedgerStore::settle_held`] are
//!   idempotent per request id.
//!
//! Where a rule decides about money or state (a reservation's checks, a
//! settlement's refund and reward, a key's remaining credit when its limit
//! changes, an ended node's entries), it is written once in
//! [`store_support`](crate::store_support) and every backend calls it, so
//! they all decide alike.
//!
//! [`Error::AlreadyExists`]: crate::error::Error::AlreadyExists
//! [`Error::NotFound`]: crate::error::Error::NotFound

use async_trait::async_trait;

use crate::error::Result;
use crate::secret::KeyHash;
use crate::types::*;

/// Where the broker keeps its state: the sum of the six area traits. See the
/// [module docs](self) for the areas and the rules.
///
/// Implemented for every type that implements all six; implement those.
pub trait Store:
    UserStore + NetworkStore + LedgerStore + SignInStore + CatalogueStore + StatsStore
{
}

impl<T> Store for T where
    T: UserStore + NetworkStore + LedgerStore + SignInStore + CatalogueStore + StatsStore
{
}

/// Users and their API keys: who may call the gateway, with which key, and
/// how fast (the rate counters hosts share).
///
/// A user's balance is set when the user is created and moves afterwards
/// only through the [`LedgerStore`]. A key's `credits_left` moves with its
/// limit, by what was spent of it
/// ([`store_support::moved_credits_left`](crate::store_support::moved_credits_left)),
/// in the same atomic step as the limit.
#[async_trait]
pub trait UserStore: Send + Sync + 'static {
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
    /// Changes an account's budget or alerts atomically and returns the
    /// account; its alert marks stay. `NotFound` when there is no such user.
    async fn update_user_settings(&self, id: &UserId, update: &UserSettingsUpdate) -> Result<User>;
    /// Sets the account's alert mark of `kind` to `to` if it is `from` now,
    /// in one atomic conditional write, and says whether it did (`false`
    /// too when there is no such user). Hosts sharing the store take a mark
    /// this way before sending an alert email, so that one of them sends it.
    async fn swap_alert_mark(
        &self,
        id: &UserId,
        kind: AlertKind,
        from: Option<Timestamp>,
        to: Option<Timestamp>,
    ) -> Result<bool>;

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

    // ---- rate limits -------------------------------------------------------

    /// Adds `add` to the rate counters of `scope` (a key or an account, as
    /// the broker names it) for the window starting at `window`, atomically,
    /// and returns the window's totals after the addition. The store keeps
    /// one window per scope: counters of an earlier window start again from
    /// zero; when a later window is stored, nothing changes and the answer
    /// is `None` (that window is over for the hosts already in the next).
    ///
    /// Hosts sharing a store take their slices of a per-minute allowance
    /// with it (`docs/ARCHITECTURE.md`, "Rate limits"); a host that owns its
    /// store counts in memory and never calls it.
    async fn add_rate_usage(
        &self,
        scope: &str,
        window: Timestamp,
        add: RateUsage,
    ) -> Result<Option<RateUsage>>;
}

/// The provider network: providers, their nodes (provisions) and the pool
/// entries the broker's routing index is built from.
///
/// A node and its pool entries change together, in one atomic step; an
/// ended node has none
/// ([`store_support::check_provision_update`](crate::store_support::check_provision_update)).
/// A provider's `earnings` grow only through [`LedgerStore::settle`].
#[async_trait]
pub trait NetworkStore: Send + Sync + 'static {
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
}

/// The ledger: credit grants, reservations and their settlements, the usage
/// records settlements leave, and the running totals over all of them.
///
/// Every method here that moves credits is atomic on its own, and the
/// decisions are the shared ones of [`store_support`](crate::store_support):
/// a reservation's checks and holds
/// ([`apply_reservation`](crate::store_support::apply_reservation)), a
/// settlement's charge, refund and reward
/// ([`SettlePlan`](crate::store_support::SettlePlan): the charge clamped to
/// the reservation, the reward to the charge, a key's refund to its limit),
/// the release of a stale reservation
/// ([`release_settlement`](crate::store_support::release_settlement)) and a
/// grant's new balance
/// ([`granted_balance`](crate::store_support::granted_balance)). A settlement
/// applies once per request id.
///
/// ## Owned and shared stores
///
/// A store that one host owns ([`owned_by_one_host`](Self::owned_by_one_host):
/// memory, SQLite) is written by that host's broker alone, so the broker
/// keeps spendable balances in its memory, holds what calls in flight may
/// cost there, and persists only settlements ([`settle_held`](Self::settle_held)),
/// in batches: one store write per batch of calls. Every change of a balance or a key must then go
/// through the broker (its grants, key changes, revocations and
/// suspensions), which applies it to its memory too. A store several hosts
/// share (DynamoDB) says no, and each call reserves in the store
/// ([`reserve`](Self::reserve)) and settles there ([`settle`](Self::settle)).
#[async_trait]
pub trait LedgerStore: Send + Sync + 'static {
    /// Whether one host owns this store: only its broker writes to it, so
    /// the broker may admit calls from memory (see above). The default is
    /// `false`: a store that hosts may share, admitted through the store.
    fn owned_by_one_host(&self) -> bool {
        false
    }

    /// Whether the store commits settlements that reach it at the same time
    /// together by itself, so the broker may hand each call's
    /// [`settle_held`](Self::settle_held) over as it comes instead of
    /// queueing calls to send them in batches. SQLite says yes: its one
    /// writer applies whatever is queued in one transaction, and the
    /// broker's queue would only add a hand-off and keep the writer waiting
    /// for the next batch. The default is `false`: each store call is a
    /// write of its own (DynamoDB: a transaction), and the broker's batches
    /// are what make a busy account one write per batch.
    fn groups_settlements(&self) -> bool {
        false
    }

    // ---- grants ------------------------------------------------------------

    /// Adds (or, when negative, removes) credits and records the grant, atomically.
    /// Removing more than the balance fails with `InsufficientCredits` and changes
    /// nothing. Returns the new balance.
    async fn grant_credits(&self, grant: &CreditGrant) -> Result<Credits>;
    /// The grants recorded for a user, oldest first.
    async fn credit_grants(&self, user: &UserId) -> Result<Vec<CreditGrant>>;

    // ---- reservations and settlements --------------------------------------

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
    /// Applies, in order, the settlements of calls whose holds lived in the
    /// broker's memory and were never reserved here (`calls`: each hold with
    /// its settlement), each once and wholly: charges `min(charged,
    /// hold.amount)` to the user's balance and the key's `credits_left`
    /// (never below zero), marks the key used at the hold's time, credits
    /// the provider's reward (at most the charge), stores the usage record
    /// and adds to the totals, with nothing to `reserved`
    /// ([`SettlePlan::for_held`](crate::store_support::SettlePlan::for_held),
    /// [`SettlePlan::charge_to`](crate::store_support::SettlePlan::charge_to)).
    /// Never refused for want of credits: the broker checked the holds, and
    /// the calls were answered. The broker sends the settlements that queued
    /// up together (a group commit): a backend sums the changes of one
    /// account, key and provider, so each is written once per list.
    ///
    /// Returns one outcome per call: `AlreadySettled` for a request id
    /// settled before (or earlier in `calls`), which changes nothing.
    /// `InvalidInput` when a hold and its settlement name different
    /// requests, and `AlreadyExists` when a call's id is an open
    /// reservation: both before anything changes. A backend may commit a
    /// long list in several atomic steps (DynamoDB caps a transaction's
    /// items): each call is applied wholly or not at all, a refusal leaves
    /// the steps before it committed, and a retry of the list applies the
    /// rest once.
    async fn settle_held(&self, calls: &[(Reservation, Settlement)]) -> Result<Vec<SettleOutcome>>;
    /// Applies, in order, the settlements of calls a host admitted from the
    /// credit lease `lease` (an open reservation: see the broker's admission),
    /// each once: its charge, `min(charged, hold.amount, what the lease still
    /// holds)`, comes off the lease's held amount (the balance and the key's
    /// limit gave it up when the lease was reserved), the provider is
    /// credited its reward (at most the charge), the usage record is stored
    /// and the totals move (`reserved` down by the charge)
    /// ([`SettlePlan::for_leased`](crate::store_support::SettlePlan::for_leased)).
    /// Returns one outcome per call: `AlreadySettled` for a request id
    /// settled before (or earlier in `calls`), which changes nothing.
    /// `NotFound` when the lease is not open (released, or swept as stale),
    /// `InvalidInput` when a call is not of the lease's user and key, and
    /// `AlreadyExists` when a call's id is an open reservation: all of
    /// these before anything changes. Releasing a lease is [`settle`](Self::settle)ing it at
    /// zero; what a lease still holds is its reservation's amount.
    ///
    /// A backend may commit a long list in several atomic steps (DynamoDB
    /// caps a transaction's items): each call is applied wholly or not at
    /// all, and a retry of the list applies the rest once.
    async fn settle_leased(
        &self,
        lease: &RequestId,
        calls: &[(Reservation, Settlement)],
    ) -> Result<Vec<SettleOutcome>>;
    /// The usage record of a settled request.
    async fn settlement(&self, request: &RequestId) -> Result<UsageRecord>;
    /// Releases (settles at zero cost, no reward) every reservation taken
    /// before `before`: requests whose host died mid-flight. Returns how many.
    async fn release_stale_reservations(&self, before: Timestamp) -> Result<u64>;
    /// Sums over all settlements and open reservations.
    async fn ledger_totals(&self) -> Result<LedgerTotals>;
    /// A user's settled requests, newest first, at most `limit`.
    async fn usage_records(&self, user: &UserId, limit: usize) -> Result<Vec<UsageRecord>>;
}

/// Sign-in: the one-time codes mailed to an email address and the refresh
/// tokens of the sessions they open, both kept as hashes only.
///
/// Checking a code and rotating a token are each one atomic step, so two
/// hosts presented the same code or token cannot both accept it.
#[async_trait]
pub trait SignInStore: Send + Sync + 'static {
    // ---- sign-in codes ---------------------------------------------------------

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

    // ---- refresh tokens ----------------------------------------------------

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
}

/// What the operator publishes: the catalogue of models, prices and
/// notifications.
///
/// Written rarely, by an administrator; none is read on the gateway's
/// request path (hosts keep the catalogue and the prices in memory and
/// refresh them with the pools).
#[async_trait]
pub trait CatalogueStore: Send + Sync + 'static {
    // ---- the catalogue -----------------------------------------------------

    /// Every catalogue entry, sorted by service and model.
    async fn catalogue(&self) -> Result<Vec<CatalogueModel>>;
    /// Stores a catalogue entry, replacing the one for the same service and
    /// model.
    async fn put_catalogue_model(&self, model: &CatalogueModel) -> Result<()>;
    /// Deletes the entry for (service, model); [`Error::NotFound`] when there
    /// is none.
    ///
    /// [`Error::NotFound`]: crate::error::Error::NotFound
    async fn delete_catalogue_model(&self, service: Service, model: &str) -> Result<()>;

    // ---- aliases -----------------------------------------------------------

    /// Every model alias, sorted by name.
    async fn aliases(&self) -> Result<Vec<ModelAlias>>;
    /// Stores an alias, replacing the one of the same name.
    async fn put_alias(&self, alias: &ModelAlias) -> Result<()>;
    /// Deletes an alias; [`Error::NotFound`] when there is none.
    ///
    /// [`Error::NotFound`]: crate::error::Error::NotFound
    async fn delete_alias(&self, alias: &str) -> Result<()>;

    // ---- prices ------------------------------------------------------------

    /// Every stored price.
    async fn prices(&self) -> Result<Vec<PriceEntry>>;
    /// Stores a price, replacing the one for the same service and model.
    async fn put_price(&self, price: &PriceEntry) -> Result<()>;

    // ---- notifications -----------------------------------------------------

    /// Creates or replaces a notification.
    async fn put_notification(&self, n: &Notification) -> Result<()>;
    /// Deletes a notification.
    async fn delete_notification(&self, id: &NotificationId) -> Result<()>;
    /// Every notification, by start time.
    async fn notifications(&self) -> Result<Vec<Notification>>;
}

/// Usage statistics: counters per scope and day, added to in batches.
///
/// A batch carries an id and is applied at most once, so a host retrying a
/// batch whose success it never saw counts nothing twice.
#[async_trait]
pub trait StatsStore: Send + Sync + 'static {
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
