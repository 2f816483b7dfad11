//! # cxmpute-store-dynamo
//!
//! [`DynamoStore`]: the broker's [`Store`](cxmpute_core::Store) on DynamoDB,
//! so any number of hosts can serve one deployment from one database.
//!
//! ```no_run
//! # async fn run() -> cxmpute_core::Result<()> {
//! use cxmpute_store_dynamo::{DynamoConfig, DynamoStore};
//!
//! // Region and credentials come from the standard AWS chain.
//! let store = DynamoStore::connect(DynamoConfig::new("prod-")).await?;
//! store.create_tables_if_missing().await?; // once, on a fresh account
//! # Ok(()) }
//! ```
//!
//! ## Table design
//!
//! **One table** (`{prefix}cxmpute`, string keys `pk` and `sk`, on-demand
//! capacity) holds every kind of item, told apart by key prefixes. One table
//! because the operations that must be atomic span kinds (a reservation
//! touches an account, a key, a request and a ledger shard) and a
//! transaction is as easy on one table as on many, while one table is one
//! thing to create, grant access to, back up and name per deployment (the
//! prefix lets staging and production share an account).
//!
//! | `pk` | `sk` | what |
//! |------|------|------|
//! | `USER#{id}` | `USER` | an account: `credits` (a number, micro-credits), suspension |
//! | `USER#{id}` | `KEY#{key id}` | the account's key list (the key's hash) |
//! | `USER#{id}` | `GRANT#{time}#{seq}` | a credit grant, oldest first |
//! | `USER#{id}` | `USAGE#{time}#{request}` | a usage record, read newest first |
//! | `USER#{id}` | `PROVIDER` | the account's provider id (one per user) |
//! | `USERS` | `EMAIL#{email}` | unique email → user id; admin search reads this partition |
//! | `APIKEY#{hash}` | `APIKEY` | an API key, under its hash: authenticating is one read |
//! | `KEYID#{key id}` | `KEYID` | key id → owner and hash (never changes) |
//! | `RATE#{scope}` | `RATE` | a key's or account's rate counters: the current minute (`window`), `requests`, `tokens` |
//! | `PROVIDER#{id}` | `PROVIDER` | a provider: `earnings`, current key hash |
//! | `PROVIDER#{id}` | `NODE#{node}` | the provider's node list |
//! | `PKEYHASH#{hash}` | `PKEYHASH` | unique provider key hash → provider id |
//! | `NODE#{id}` | `NODE` | a provision, with a version and its pool entry keys |
//! | `NODES` | `NODE#{id}` | every node with its state (live listing, expiry sweep) |
//! | `POOL` | `ENTRY#{node}#{service}#{model}` | a routable pool entry |
//! | `REQ#{request}` | `REQ` | a reservation while open; a settled marker after |
//! | `LEDGER#{shard}` | `LEDGER` | ledger totals, split into shards |
//! | `PRICES` | `PRICE#{service}#…` | a price |
//! | `CATALOGUE` | `MODEL#{service}#{model}` | a catalogue entry |
//! | `LOGIN#{email}` | `CODE` / `ISSUED` | the current sign-in code / recent issue times |
//! | `RTOKEN#{hash}` | `RTOKEN` | a refresh token |
//! | `FAMILY#{id}` | `FAMILY` | a revoked refresh token family |
//! | `NOTIFS` | `NTF#{id}` | a notification |
//! | `STATS#{scope}` | `DAY#{day}` | a scope's counters per day (range reads) |
//! | `STATSDAY#{day}` | `SCOPE#{scope}` | the same counters by day (prefix reads) |
//! | `STATSDAYS` | `DAY#{day}` | the days that have stats |
//! | `STATSBATCH#{id}` | `CHUNK#{n}` | a stats batch (chunk) already applied |
//!
//! Times and days in sort keys are fixed-width and order-preserving, so
//! sort key order is time order.
//!
//! **Unique lookups are items, not indexes.** Email, API key hash, provider
//! key hash and a user's provider are items of their own, written in the
//! same transaction as what they point at under `attribute_not_exists`. That
//! makes them unique (a secondary index cannot), and they are read with
//! strongly consistent `GetItem`s: a revoked key or a rotated provider key
//! stops working on every host at once, which an eventually consistent index
//! read could not promise.
//!
//! **One secondary index**, `gsi1` (`gsi1pk`, `gsi1sk`, keys only, sparse):
//! open reservations by age, partitioned like the ledger shards. Only the
//! stale-reservation sweep reads it; every candidate it finds is read again
//! consistently and released under the usual conditions, so its lag is
//! harmless. A reservation enters it on reserve and leaves it on settle:
//! one index write each, no extra call. It also holds each email's sign-in
//! issues by latest issue (partition `LOGINS`) and refresh tokens by expiry
//! (partitions `RTOKENS#0..7`, by hash), which the housekeeping sweeps read
//! to delete codes too old to use or count and expired tokens, in bounded
//! batches.
//!
//! **Single-partition listings** (`USERS`, `NODES`, `POOL`, `PRICES`, `CATALOGUE`,
//! `NOTIFS`, `STATSDAYS`) are read with one paged, strongly consistent
//! `Query`; each is written only on rare events (sign-up, node lifecycle,
//! admin changes), never per request. `pool_entries()` is such a read of
//! `POOL`, used to rebuild the in-memory routing index at start and on a
//! periodic refresh: it costs about one read unit per 4 KB of entries
//! (a few hundred bytes each), e.g. ~25 units per refresh for 500 entries.
//! `search_users` reads all of `USERS` in the worst case: admin use only.
//!
//! ## The hot path, in DynamoDB calls
//!
//! Per proxied request, when the host that admits it also settles it (the
//! usual case):
//!
//! | step | store call | DynamoDB calls |
//! |------|------------|----------------|
//! | authenticate | none: the host holds the key in memory | 0 |
//! | admit | `reserve` | 1 `TransactWriteItems` (account, key, request, ledger shard) |
//! | settle | `settle` | 1 `TransactWriteItems` (request, account, key, provider, usage, ledger shard) |
//!
//! A key in use is read again (`api_key_by_hash` and `user`: two strongly
//! consistent `GetItem`s) in the background every half `key_cache_ttl`
//! (0.5 s by default), and by its first call after an idle spell.
//! `reserve` also reads the key id item the first time a process sees a key
//! (the mapping never changes, so it is remembered). A settlement arriving at
//! another host than the one that reserved adds one `GetItem` of the request.
//! Refusals (insufficient credits, revoked key...) cost one batch read to
//! name the precise error, after the transaction refused.
//! A key (or account) under rate limits adds no call per request: its host
//! takes a slice of the minute's allowance (`add_rate_usage`: one
//! `UpdateItem` adding to the `RATE#` item, a second when a new minute
//! starts the counters again) about once per sixteenth of the limit, in the
//! background.
//!
//! The store is shared by hosts (it keeps the default of
//! [`LedgerStore::owned_by_one_host`](cxmpute_core::LedgerStore::owned_by_one_host)),
//! so brokers admit through `reserve` as above. It also implements
//! `settle_held` (calls held in a broker's memory, never reserved here),
//! the store contract every backend keeps: per transaction as many calls as
//! fit DynamoDB's 100 items, each its request (written settled at once,
//! absent before) and usage record, and their sums written once per
//! account, per key (never below zero: guarded like a refund), per provider
//! and to the ledger's shard. `settle_leased` settles a batch of calls
//! admitted from a credit lease (a reservation) the same way: per
//! transaction as many calls as fit, each its request and usage record, the
//! lease's item once (its amount down by the summed charges, conditioned on
//! the amount this process read), each provider once and the ledger's
//! shard once.

//! ## Atomicity and concurrency
//!
//! Every rule that guards money is a condition of the write itself, never a
//! check before it. `reserve`'s transaction requires: the account exists,
//! is not suspended and holds the amount; the key is the account's, not
//! revoked, permitted on the route and (when limited) has the amount left;
//! the request id was never used. When DynamoDB cancels it, a consistent
//! read of the request, account and key names the first broken rule in the
//! order every store uses (shared in
//! [`store_support`](cxmpute_core::store_support)); if none is broken any
//! more, the transaction is tried again.
//!
//! `settle`'s transaction requires the reservation to be still open with the
//! amount, account, key and shard the settlement was computed from, marks it
//! settled, refunds the account and the key, rewards the provider, stores
//! the usage record and adds to the ledger shard; all counters move with
//! `ADD`. A repeat finds the request settled: `AlreadySettled`, nothing
//! changed. A key's refund never lifts it above its limit: the key keeps
//! `spent` (limit minus left) beside `credits_left`, and the refund is an
//! `ADD` guarded by `spent >= refund`, or else `credits_left = credit_limit`.
//!
//! Read-then-write changes (provision updates, limit changes, sign-in code
//! issues, refresh token rotation) are optimistic: they write under a
//! condition on what they read (a version, the old value) and read again
//! when it fails. Lost transaction conflicts and throttling are retried with
//! jittered exponential backoff, a bounded number of times
//! ([`DynamoConfig::conflict_retries`]), then reported as a retryable
//! [`Error::Conflict`](cxmpute_core::Error::Conflict) or
//! [`Error::Unavailable`](cxmpute_core::Error::Unavailable). An unreachable
//! or failing endpoint is `Unavailable` (the host answers 503) after the
//! SDK's own bounded retries and timeouts; anything else is
//! [`Error::Backend`](cxmpute_core::Error::Backend), with the SDK error kept
//! as the source.
//!
//! The ledger totals are split over [`DynamoConfig::ledger_shards`] items
//! (by request id) because concurrent transactions on one item conflict;
//! `ledger_totals()` sums them with one batch read. Requests of one busy
//! account still meet on the account item: that is the price of an exact,
//! never-overdrawn balance.
//!
//! ## Limits
//!
//! A transaction holds at most 100 actions: a node's pool entries are
//! capped accordingly (about 95 per node); a stats batch larger than one
//! transaction is applied in chunks, each exactly once, so a retried batch
//! never double-counts though a crash may leave it partly applied until the
//! retry. `grant_credits` returns the balance read right after the grant's
//! transaction (a transaction returns no values): exact unless a reservation
//! on the same account lands in between.

// Items are `pub` only where an embedder can reach them; the rest say `pub(crate)`.
#![warn(unreachable_pub)]

mod config;
mod db;
mod item;
mod schema;

// One module per area of the store, each implementing its trait directly.
mod catalogue;
mod ledger;
mod network;
mod signin;
mod stats;
mod users;

pub use config::{DynamoConfig, RequestGate, StaticCredentials};
pub use db::DynamoStore;
