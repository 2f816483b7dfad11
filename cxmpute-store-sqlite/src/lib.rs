//! # cxmpute-store-sqlite
//!
//! [`SqliteStore`]: the broker's [`Store`] in one SQLite file, through sqlx.
//! The embedded default: nothing to run beside the host.
//!
//! ```no_run
//! # async fn demo() -> cxmpute_core::Result<()> {
//! use std::sync::Arc;
//! use cxmpute_core::Store;
//! use cxmpute_store_sqlite::SqliteStore;
//!
//! let store = SqliteStore::open("cxmpute.db").await?;
//! let shared: Arc<dyn Store> = Arc::new(store.clone());
//! // ... serve with `shared` ...
//! store.close().await; // on shutdown: every acknowledged write is on disk
//! # Ok(()) }
//! ```
//!
//! ## How it writes
//!
//! SQLite lets one connection write at a time. So one task owns the one
//! writing connection; every write is queued to it and answered only after
//! the transaction holding it has committed: **an `Ok` from a write means it
//! is on disk**. The writer takes everything queued (up to a batch size) into
//! one transaction and commits once: one fsync per batch instead of one per
//! request.
//!
//! Inside the transaction, each operation gets its own savepoint, so a
//! refused operation (a duplicate id, an unknown key) undoes only itself.
//! Reservations and settlements, the broker's per-request writes, go one step
//! further: a run of them queued next to each other is decided in order with
//! the core's shared rules against the rows it touches (read once for the
//! whole run, kept current in memory as each one is decided), and what was
//! accepted is written set-wise under one savepoint. A refused reservation
//! (insufficient credits, key limit) never reaches a write, so it costs
//! nothing to undo. This keeps a request's cost to a few statements' work
//! instead of several round trips to SQLite's worker thread, and is what lets
//! the store settle tens of thousands of requests a second (see the `settle`
//! benchmark).
//!
//! Reads use a small pool of separate connections: in WAL mode they read a
//! committed snapshot beside the writer and never wait for it.
//!
//! ## Durability
//!
//! - `journal_mode=WAL`: readers do not block the writer nor it them, and a
//!   commit appends to the log instead of rewriting pages.
//! - `synchronous=FULL`: every commit fsyncs the log before the writer answers.
//!   `NORMAL` (the usual WAL pairing) survives a killed process but may lose
//!   the last commits on power loss or an OS crash; a settled charge the
//!   broker has acknowledged must not vanish, and batching makes FULL's one
//!   fsync per batch cheap.
//! - `foreign_keys=ON`, a `busy_timeout` (five seconds, see [`SqliteOptions`])
//!   for another process holding the lock; a lock still held after it is
//!   [`Error::Unavailable`] (retryable). A unique-key clash is [`Error::AlreadyExists`]; anything
//!   else SQLite reports is [`Error::Backend`] with SQLite's error as source.
//!
//! Every operation that moves credits (reserve, settle, stale release, grant)
//! happens inside one transaction: all of it lands or none of it does. Money
//! is INTEGER micro-credits in every column.

// Items are `pub` only where an embedder can reach them; the rest say `pub(crate)`.
#![warn(unreachable_pub)]

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cxmpute_core::secret::KeyHash;
use cxmpute_core::*;
use futures::future::BoxFuture;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions, SqliteConnection};

mod error;
mod money;
mod ops;
mod rows;
mod writer;

use money::{MoneyAnswer, MoneyOp};
use writer::Writer;

/// Settings for [`SqliteStore::open_with`]. The default is what
/// [`SqliteStore::open`] uses.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SqliteOptions {
    /// How long a call waits for another process holding the database's
    /// lock before it fails with the retryable [`Error::Unavailable`].
    /// Five seconds by default.
    pub busy_timeout: Duration,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            busy_timeout: Duration::from_secs(5),
        }
    }
}

impl SqliteOptions {
    /// Sets [`busy_timeout`](Self::busy_timeout).
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }
}

/// Read connections. Reads are short index lookups; two cores gain nothing
/// from more.
const READERS: u32 = 4;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A [`Store`] in a SQLite database. Cheap to clone: clones share the writer
/// and the read pool.
#[derive(Clone)]
pub struct SqliteStore {
    writer: Writer,
    /// `None` for an in-memory database: it lives in the writer's connection
    /// alone, so reads are queued to the writer too.
    reads: Option<SqlitePool>,
    path: Option<Arc<PathBuf>>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// A clear error for a database that cannot be opened, with SQLite's reason.
fn open_error(
    path: &Path,
    doing: &str,
    e: impl std::error::Error + Send + Sync + 'static,
) -> Error {
    Error::Backend {
        message: format!(
            "cannot open the SQLite database at {}: {doing} failed: {e}",
            path.display()
        ),
        source: Some(Box::new(e)),
    }
}

impl SqliteStore {
    /// Opens the database at `path`, creating the file if it is missing (its
    /// directory must exist), and brings its schema up to date.
    ///
    /// A file that is not a SQLite database, or a path that cannot be
    /// created or written, is an [`Error::Backend`] saying so.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, SqliteOptions::default()).await
    }

    /// [`open`](Self::open) with settings.
    pub async fn open_with(path: impl AsRef<Path>, options: SqliteOptions) -> Result<Self> {
        let path = path.as_ref();
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            // 64 MiB of page cache per connection (the default is 2 MiB): the
            // hot indexes stay in memory instead of being read back per batch.
            .pragma("cache_size", "-65536")
            // Checkpoint every 16 MiB of log instead of every 4 MiB: fewer
            // pauses of the writer, each copying pages it would copy anyway.
            .pragma("wal_autocheckpoint", "4096")
            .foreign_keys(true)
            .busy_timeout(options.busy_timeout)
            // Every statement would otherwise be formatted for the log: a
            // measurable cost at tens of thousands of statements a second.
            .disable_statement_logging();
        let mut conn = opts
            .clone()
            // A run's read returns a row per request; let them all through
            // at once instead of fifty at a time.
            .row_buffer_size(4096)
            .connect()
            .await
            .map_err(|e| open_error(path, "connecting", e))?;
        MIGRATOR
            .run(&mut conn)
            .await
            .map_err(|e| open_error(path, "migrating the schema", e))?;
        let reads = SqlitePoolOptions::new()
            .max_connections(READERS)
            .min_connections(1)
            .connect_with(
                opts.create_if_missing(false)
                    // Point lookups; the OS caches the file too. Four readers
                    // at the writer's 64 MiB each would be a lot to embed.
                    .pragma("cache_size", "-16384")
                    // Belt and braces: nothing but the writer ever writes.
                    .pragma("query_only", "ON"),
            )
            .await
            .map_err(|e| open_error(path, "opening read connections", e))?;
        Ok(SqliteStore {
            writer: Writer::spawn(conn),
            reads: Some(reads),
            path: Some(Arc::new(path.to_owned())),
        })
    }

    /// A private database in memory, gone when the store is dropped: for
    /// tests and trying things out.
    pub async fn in_memory() -> Result<Self> {
        let memory = Path::new(":memory:");
        let opts = SqliteConnectOptions::from_str("sqlite::memory:")
            .map_err(|e| open_error(memory, "configuring", e))?
            .foreign_keys(true)
            .disable_statement_logging();
        let mut conn = opts
            .connect()
            .await
            .map_err(|e| open_error(memory, "connecting", e))?;
        MIGRATOR
            .run(&mut conn)
            .await
            .map_err(|e| open_error(memory, "migrating the schema", e))?;
        Ok(SqliteStore {
            writer: Writer::spawn(conn),
            reads: None,
            path: None,
        })
    }

    /// The database file, or `None` in memory.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref().map(PathBuf::as_path)
    }

    /// Waits until every write queued before this call has been applied:
    /// committed, or answered with the error that kept it out.
    pub async fn flush(&self) -> Result<()> {
        self.writer.flush().await
    }

    /// Commits every queued write, then closes the writer and the read
    /// connections. Later calls fail with [`Error::Unavailable`]. Every clone
    /// shares the one writer, so closing one closes them all.
    pub async fn close(&self) {
        self.writer.close().await;
        if let Some(pool) = &self.reads {
            pool.close().await;
        }
    }

    /// Runs a read on a read connection (or, in memory, on the writer's).
    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        match &self.reads {
            Some(pool) => {
                let mut conn = pool
                    .acquire()
                    .await
                    .map_err(|e| error::map("taking a read connection", e))?;
                f(&mut conn).await
            }
            None => self.writer.write(f).await,
        }
    }
}

/// An answer of the wrong kind: a bug in this crate, reported, not panicked on.
fn unexpected(answer: MoneyAnswer) -> Error {
    Error::Backend {
        message: format!("the writer answered {answer:?} to the wrong operation"),
        source: None,
    }
}

#[async_trait]
impl UserStore for SqliteStore {
    async fn create_user(&self, user: &User) -> Result<()> {
        let user = user.clone();
        self.writer
            .write(move |c| Box::pin(async move { ops::create_user(c, &user).await }))
            .await
    }

    async fn user(&self, id: &UserId) -> Result<User> {
        let id = id.clone();
        self.read(move |c| Box::pin(async move { ops::user(c, id.as_str()).await }))
            .await
    }

    async fn user_by_email(&self, email: &str) -> Result<User> {
        let email = email.to_owned();
        self.read(move |c| Box::pin(async move { ops::user_by_email(c, &email).await }))
            .await
    }

    async fn search_users(&self, query: &str, limit: usize) -> Result<Vec<User>> {
        let query = query.to_owned();
        self.read(move |c| Box::pin(async move { ops::search_users(c, &query, limit).await }))
            .await
    }

    async fn set_user_suspended(&self, id: &UserId, suspension: Option<Suspension>) -> Result<()> {
        let id = id.clone();
        self.writer
            .write(move |c| {
                Box::pin(async move { ops::set_user_suspended(c, id.as_str(), &suspension).await })
            })
            .await
    }

    async fn create_api_key(&self, key: &ApiKey) -> Result<()> {
        let key = key.clone();
        self.writer
            .write(move |c| Box::pin(async move { ops::create_api_key(c, &key).await }))
            .await
    }

    async fn api_key_by_hash(&self, hash: &KeyHash) -> Result<ApiKey> {
        let hash = *hash;
        self.read(move |c| Box::pin(async move { ops::api_key_by_hash(c, &hash).await }))
            .await
    }

    async fn api_keys(&self, user: &UserId) -> Result<Vec<ApiKey>> {
        let user = user.clone();
        self.read(move |c| Box::pin(async move { ops::api_keys(c, user.as_str()).await }))
            .await
    }

    async fn update_api_key(&self, id: &ApiKeyId, update: &ApiKeyUpdate) -> Result<ApiKey> {
        let (id, update) = (id.clone(), update.clone());
        self.writer
            .write(move |c| {
                Box::pin(async move { ops::update_api_key(c, id.as_str(), &update).await })
            })
            .await
    }

    async fn revoke_api_key(&self, id: &ApiKeyId, at: Timestamp) -> Result<()> {
        let id = id.clone();
        self.writer
            .write(move |c| Box::pin(async move { ops::revoke_api_key(c, id.as_str(), at).await }))
            .await
    }
}

#[async_trait]
impl NetworkStore for SqliteStore {
    async fn create_provider(&self, provider: &Provider) -> Result<()> {
        let provider = provider.clone();
        self.writer
            .write(move |c| Box::pin(async move { ops::create_provider(c, &provider).await }))
            .await
    }

    async fn provider(&self, id: &ProviderId) -> Result<Provider> {
        let id = id.clone();
        self.read(move |c| Box::pin(async move { ops::provider(c, id.as_str()).await }))
            .await
    }

    async fn provider_by_key_hash(&self, hash: &KeyHash) -> Result<Provider> {
        let hash = *hash;
        self.read(move |c| Box::pin(async move { ops::provider_by_key_hash(c, &hash).await }))
            .await
    }

    async fn provider_by_user(&self, user: &UserId) -> Result<Provider> {
        let user = user.clone();
        self.read(move |c| Box::pin(async move { ops::provider_by_user(c, user.as_str()).await }))
            .await
    }

    async fn rotate_provider_key(&self, id: &ProviderId, new_hash: &KeyHash) -> Result<()> {
        let (id, hash) = (id.clone(), *new_hash);
        self.writer
            .write(move |c| {
                Box::pin(async move { ops::rotate_provider_key(c, id.as_str(), &hash).await })
            })
            .await
    }

    async fn set_provider_suspended(
        &self,
        id: &ProviderId,
        suspension: Option<Suspension>,
    ) -> Result<()> {
        let id = id.clone();
        self.writer
            .write(move |c| {
                Box::pin(
                    async move { ops::set_provider_suspended(c, id.as_str(), &suspension).await },
                )
            })
            .await
    }

    async fn create_provision(&self, provision: &Provision, entries: &[PoolEntry]) -> Result<()> {
        let (provision, entries) = (provision.clone(), entries.to_vec());
        self.writer
            .write(move |c| {
                Box::pin(async move { ops::create_provision(c, &provision, &entries).await })
            })
            .await
    }

    async fn provision(&self, id: &ProvisionId) -> Result<Provision> {
        let id = id.clone();
        self.read(move |c| Box::pin(async move { ops::provision(c, id.as_str()).await }))
            .await
    }

    async fn provisions_by_provider(&self, provider: &ProviderId) -> Result<Vec<Provision>> {
        let provider = provider.clone();
        self.read(move |c| {
            Box::pin(async move { ops::provisions_by_provider(c, provider.as_str()).await })
        })
        .await
    }

    async fn provisions(&self) -> Result<Vec<Provision>> {
        self.read(move |c| Box::pin(async move { ops::provisions(c).await }))
            .await
    }

    async fn update_provision(
        &self,
        id: &ProvisionId,
        state: ProvisionState,
        endpoint: Option<String>,
        entries: &[PoolEntry],
    ) -> Result<()> {
        let (id, entries) = (id.clone(), entries.to_vec());
        self.writer
            .write(move |c| {
                Box::pin(async move {
                    ops::update_provision(c, id.as_str(), state, endpoint.as_deref(), &entries)
                        .await
                })
            })
            .await
    }

    async fn heartbeat(&self, id: &ProvisionId, at: Timestamp) -> Result<()> {
        let id = id.clone();
        self.writer
            .write(move |c| Box::pin(async move { ops::heartbeat(c, id.as_str(), at).await }))
            .await
    }

    async fn delete_provision(&self, id: &ProvisionId) -> Result<()> {
        let id = id.clone();
        self.writer
            .write(move |c| Box::pin(async move { ops::delete_provision(c, id.as_str()).await }))
            .await
    }

    async fn pool_entries(&self) -> Result<Vec<PoolEntry>> {
        self.read(move |c| Box::pin(async move { ops::pool_entries(c).await }))
            .await
    }

    async fn expire_provisions(&self, before: Timestamp) -> Result<Vec<ProvisionId>> {
        self.writer
            .write(move |c| Box::pin(async move { ops::expire_provisions(c, before).await }))
            .await
    }
}

#[async_trait]
impl LedgerStore for SqliteStore {
    async fn grant_credits(&self, grant: &CreditGrant) -> Result<Credits> {
        let grant = grant.clone();
        self.writer
            .write(move |c| Box::pin(async move { ops::grant_credits(c, &grant).await }))
            .await
    }

    async fn credit_grants(&self, user: &UserId) -> Result<Vec<CreditGrant>> {
        let user = user.clone();
        self.read(move |c| Box::pin(async move { ops::credit_grants(c, user.as_str()).await }))
            .await
    }

    async fn reserve(&self, reservation: &Reservation) -> Result<()> {
        match self
            .writer
            .money(MoneyOp::Reserve(reservation.clone()))
            .await?
        {
            MoneyAnswer::Reserved => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    async fn settle(&self, settlement: &Settlement) -> Result<SettleOutcome> {
        match self
            .writer
            .money(MoneyOp::Settle(settlement.clone()))
            .await?
        {
            MoneyAnswer::Settled(outcome) => Ok(outcome),
            other => Err(unexpected(other)),
        }
    }

    async fn settlement(&self, request: &RequestId) -> Result<UsageRecord> {
        let request = request.clone();
        self.read(move |c| Box::pin(async move { ops::settlement(c, request.as_str()).await }))
            .await
    }

    async fn release_stale_reservations(&self, before: Timestamp) -> Result<u64> {
        self.writer
            .write(move |c| {
                Box::pin(async move { ops::release_stale_reservations(c, before).await })
            })
            .await
    }

    async fn ledger_totals(&self) -> Result<LedgerTotals> {
        self.read(move |c| Box::pin(async move { ops::ledger_totals(c).await }))
            .await
    }

    async fn usage_records(&self, user: &UserId, limit: usize) -> Result<Vec<UsageRecord>> {
        let user = user.clone();
        self.read(move |c| {
            Box::pin(async move { ops::usage_records(c, user.as_str(), limit).await })
        })
        .await
    }
}

#[async_trait]
impl SignInStore for SqliteStore {
    async fn issue_login_code(
        &self,
        code: &LoginCode,
        window_start: Timestamp,
        max_per_window: u32,
    ) -> Result<()> {
        let code = code.clone();
        self.writer
            .write(move |c| {
                Box::pin(async move {
                    ops::issue_login_code(c, &code, window_start, max_per_window).await
                })
            })
            .await
    }

    async fn verify_login_code(
        &self,
        email: &str,
        code_hash: &KeyHash,
        now: Timestamp,
        max_attempts: u32,
    ) -> Result<()> {
        let (email, hash) = (email.to_owned(), *code_hash);
        self.writer
            .write_keeping(move |c| {
                Box::pin(async move {
                    ops::verify_login_code(c, &email, &hash, now, max_attempts).await
                })
            })
            .await
    }

    async fn prune_login_codes(&self, before: Timestamp) -> Result<u64> {
        self.writer
            .write(move |c| Box::pin(async move { ops::prune_login_codes(c, before).await }))
            .await
    }

    async fn create_refresh_token(&self, token: &RefreshToken) -> Result<()> {
        let token = token.clone();
        self.writer
            .write(move |c| Box::pin(async move { ops::create_refresh_token(c, &token).await }))
            .await
    }

    async fn prune_refresh_tokens(&self, before: Timestamp) -> Result<u64> {
        self.writer
            .write(move |c| Box::pin(async move { ops::prune_refresh_tokens(c, before).await }))
            .await
    }

    async fn rotate_refresh_token(
        &self,
        old: &KeyHash,
        next: &RefreshToken,
        now: Timestamp,
    ) -> Result<UserId> {
        let (old, next) = (*old, next.clone());
        self.writer
            .write_keeping(move |c| {
                Box::pin(async move { ops::rotate_refresh_token(c, &old, &next, now).await })
            })
            .await
    }

    async fn revoke_token_family(&self, family: &TokenFamilyId) -> Result<()> {
        let family = family.clone();
        self.writer
            .write(move |c| {
                Box::pin(async move { ops::revoke_token_family(c, family.as_str()).await })
            })
            .await
    }

    async fn refresh_token_family(&self, hash: &KeyHash) -> Result<TokenFamilyId> {
        let hash = *hash;
        self.read(move |c| Box::pin(async move { ops::refresh_token_family(c, &hash).await }))
            .await
    }
}

#[async_trait]
impl CatalogueStore for SqliteStore {
    async fn prices(&self) -> Result<Vec<PriceEntry>> {
        self.read(move |c| Box::pin(async move { ops::prices(c).await }))
            .await
    }

    async fn put_price(&self, price: &PriceEntry) -> Result<()> {
        let price = price.clone();
        self.writer
            .write(move |c| Box::pin(async move { ops::put_price(c, &price).await }))
            .await
    }

    async fn put_notification(&self, n: &Notification) -> Result<()> {
        let n = n.clone();
        self.writer
            .write(move |c| Box::pin(async move { ops::put_notification(c, &n).await }))
            .await
    }

    async fn delete_notification(&self, id: &NotificationId) -> Result<()> {
        let id = id.clone();
        self.writer
            .write(move |c| Box::pin(async move { ops::delete_notification(c, id.as_str()).await }))
            .await
    }

    async fn notifications(&self) -> Result<Vec<Notification>> {
        self.read(move |c| Box::pin(async move { ops::notifications(c).await }))
            .await
    }
}

#[async_trait]
impl StatsStore for SqliteStore {
    async fn record_stats(&self, batch: &StatsBatch) -> Result<()> {
        let batch = batch.clone();
        self.writer
            .write(move |c| Box::pin(async move { ops::record_stats(c, &batch).await }))
            .await
    }

    async fn stats(&self, scope: &str, from: Day, to: Day) -> Result<Vec<(Day, StatsCounters)>> {
        let scope = scope.to_owned();
        self.read(move |c| Box::pin(async move { ops::stats(c, &scope, from, to).await }))
            .await
    }

    async fn stats_by_prefix(
        &self,
        prefix: &str,
        from: Day,
        to: Day,
    ) -> Result<Vec<(String, StatsCounters)>> {
        let prefix = prefix.to_owned();
        self.read(move |c| {
            Box::pin(async move { ops::stats_by_prefix(c, &prefix, from, to).await })
        })
        .await
    }
}
