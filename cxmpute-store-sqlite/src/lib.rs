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
//! SQLite lets one connection write at a time. So one thread owns the one
//! writing connection; every write is queued to it and answered only after
//! the transaction holding it has committed: **an `Ok` from a write means it
//! is on disk**. The writer takes everything queued (up to a batch size) and
//! commits each kind of work together: one fsync per batch instead of one
//! per request.
//!
//! Reservations and settlements, the broker's per-request writes, are
//! decided a run at a time: a run of them queued next to each other is
//! decided in order with the core's shared rules against the rows it
//! touches (read once for the whole run, kept current in memory as each one
//! is decided), and what was accepted is written in one transaction, each
//! account, key and provider once. A refused reservation (insufficient
//! credits, key limit) never reaches a write, so it costs nothing to undo.
//! The writer runs them by calling SQLite on its connection directly,
//! statements prepared once, with no hand-off to sqlx's connection thread
//! per statement; this is what lets the store settle tens of thousands of
//! requests a second (see the `settle` benchmark). Every other write runs
//! through sqlx, neighbouring ones in one transaction with a savepoint each,
//! so a refused operation (a duplicate id, an unknown key) undoes only
//! itself.
//!
//! Reads use a small pool of separate connections: in WAL mode they read a
//! committed snapshot beside the writer and never wait for it.
//!
//! ## One host owns the file
//!
//! The store says so ([`LedgerStore::owned_by_one_host`]), so a broker on it
//! admits calls from memory: it reads an account once, holds what calls in
//! flight may cost in its own memory, and writes only each call's
//! settlements ([`LedgerStore::settle_held`], a money operation run with
//! the others): the broker sends the calls that queued up together, and
//! one transaction writes them, each account, key and provider once. Every change of balances and keys must
//! then go through that broker, and no second store may serve from the
//! same file, since each would admit against its own memory: opening one
//! while another (in this process or another) has the file is refused.
//!
//! ## Durability
//!
//! - `journal_mode=WAL`: readers do not block the writer nor it them, and a
//!   commit appends to the log instead of rewriting pages.
//! - `synchronous=FULL` by default ([`Durability::Disk`]): every commit
//!   fsyncs the log before the writer answers, since a settled charge the
//!   broker has acknowledged must not vanish; batching makes it one fsync per
//!   batch. An operator may choose `NORMAL` ([`Durability::Process`], the
//!   usual WAL pairing): it survives a killed process but may lose the last
//!   commits on power loss or an OS crash.
//! - `foreign_keys=ON`, a `busy_timeout` (five seconds, see [`SqliteOptions`])
//!   for another process holding the lock; a lock still held after it is
//!   [`Error::Unavailable`] (retryable). A unique-key clash is [`Error::AlreadyExists`]; anything
//!   else SQLite reports is [`Error::Backend`] with SQLite's error as source.
//!
//! Every operation that moves credits (reserve, settle, a held call's
//! settlement, stale release, grant)
//! happens inside one transaction: all of it lands or none of it does. Money
//! is INTEGER micro-credits in every column.

// Items are `pub` only where an embedder can reach them; the rest say `pub(crate)`.
#![warn(unreachable_pub)]

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use cxmpute_core::*;
use futures::future::BoxFuture;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions, SqliteConnection};

mod error;
mod money;
mod rows;
mod sql;
mod writer;

// One module per area of the store, each with its trait's impl.
mod catalogue;
mod ledger;
mod network;
mod signin;
mod stats;
mod users;

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
    /// What a commit survives before the store acknowledges it.
    /// [`Durability::Disk`] by default.
    pub durability: Durability,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            busy_timeout: Duration::from_secs(5),
            durability: Durability::Disk,
        }
    }
}

impl SqliteOptions {
    /// Sets [`busy_timeout`](Self::busy_timeout).
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// Sets [`durability`](Self::durability).
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }
}

/// What a commit survives once the store has acknowledged it, and so what
/// an answered (charged) call survives. The choice is the operator's: it
/// trades the last moments of the ledger on a power loss for throughput.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Durability {
    /// The log is on disk (`synchronous=FULL`, an fsync per batch of
    /// commits): a commit survives a power loss or an operating-system
    /// crash. A call's answer waits for its batch's fsync, so the host
    /// serves at most its concurrent calls ÷ the fsync time per second.
    #[default]
    Disk,
    /// The log is in the operating system's cache (`synchronous=NORMAL`,
    /// WAL's usual pairing; the disk is synced at each checkpoint): a
    /// commit survives the host's process being killed, but a power loss
    /// or an operating-system crash may lose the commits since the last
    /// checkpoint: calls answered and then neither charged nor rewarded,
    /// and grants and key changes made then.
    Process,
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
    /// `<file>.lock`, locked while any clone of this store lives, until the
    /// store is closed.
    lock: Option<Arc<std::sync::Mutex<Option<std::fs::File>>>>,
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

/// Locks `<path>.lock` (created if missing) for a store's life, so that a
/// second store on the same file, in this process or another, is refused:
/// each would admit calls against balances held in its own memory (see
/// "One host owns the file" above). It is let go when the store is closed
/// or its last clone dropped, and goes with the process, so a host that was
/// killed leaves nothing to clean up.
fn lock_file(path: &Path) -> Result<std::fs::File> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(&name)
        .map_err(|e| open_error(path, "creating its lock file", e))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(open_error(
            path,
            "locking",
            std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                "another store has the file open (in this process or another): one host owns a file",
            ),
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(open_error(path, "locking", e)),
    }
}

impl SqliteStore {
    /// Opens the database at `path`, creating the file if it is missing (its
    /// directory must exist), and brings its schema up to date.
    ///
    /// A file that is not a SQLite database, a path that cannot be created
    /// or written, or a file another store has open (one host owns a file),
    /// is an [`Error::Backend`] saying so.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, SqliteOptions::default()).await
    }

    /// [`open`](Self::open) with settings.
    pub async fn open_with(path: impl AsRef<Path>, options: SqliteOptions) -> Result<Self> {
        let path = path.as_ref();
        let lock = lock_file(path)?;
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match options.durability {
                Durability::Disk => SqliteSynchronous::Full,
                Durability::Process => SqliteSynchronous::Normal,
            })
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
            // A batch's savepoints keep the pages they change in a
            // sub-journal; past 64 KiB SQLite spills it to a temporary file,
            // a write syscall per page per batch. In memory it is only
            // copies. (It only serves rolling back a savepoint of the open
            // transaction: durability is the log's, unchanged.)
            .pragma("temp_store", "MEMORY")
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
            writer: Writer::spawn(conn)?,
            reads: Some(reads),
            path: Some(Arc::new(path.to_owned())),
            lock: Some(Arc::new(std::sync::Mutex::new(Some(lock)))),
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
            writer: Writer::spawn(conn)?,
            reads: None,
            path: None,
            lock: None,
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
    /// shares the one writer, so closing one closes them all, and lets go
    /// of the file: another store may open it at once, even while clones of
    /// this one (say, in a broker's tasks still winding down) live on.
    pub async fn close(&self) {
        self.writer.close().await;
        if let Some(pool) = &self.reads {
            pool.close().await;
        }
        if let Some(lock) = &self.lock {
            // Poisoned only by a panic while taking it; the file is all there is.
            let file = lock.lock().unwrap_or_else(|p| p.into_inner()).take();
            drop(file);
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

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    /// The writer's savepoints journal in memory (see `open_with`): a
    /// temporary file would cost a write syscall per changed page per batch.
    #[tokio::test]
    async fn the_writer_keeps_its_sub_journal_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("cxmpute.db"))
            .await
            .unwrap();
        let temp_store: i64 = store
            .writer
            .write(|c| {
                async move {
                    sqlx::query_scalar("PRAGMA temp_store")
                        .fetch_one(c)
                        .await
                        .map_err(|e| error::map("reading temp_store", e))
                }
                .boxed()
            })
            .await
            .unwrap();
        // 2 is MEMORY (0 DEFAULT, 1 FILE).
        assert_eq!(temp_store, 2);
        store.close().await;
    }
}
