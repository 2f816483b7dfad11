//! The single writer: one thread owns the one connection that writes, and
//! applies queued operations in batches, one transaction per batch.
//!
//! SQLite lets one connection write at a time however many ask, so many
//! writing connections would only queue on its lock (and time out as
//! `SQLITE_BUSY` under load). Here callers queue on a channel instead; the
//! writer takes whatever is waiting (up to [`MAX_BATCH`]) and applies it in
//! order, and only once a batch is committed answers its callers. One commit
//! (one fsync) is shared by the whole batch.
//!
//! A batch is made of two kinds of work:
//! - a run of neighbouring reservations and settlements (the hot path),
//!   which [`crate::money`] decides one by one and writes together, in a
//!   transaction of its own, calling SQLite directly on the connection
//!   (through `rusqlite`) while sqlx's connection thread is held off it;
//! - neighbouring other operations (sqlx futures), applied in one
//!   transaction with a `SAVEPOINT` each, so a refused or failed one undoes
//!   only itself.
//!
//! Why the thread and the direct calls: each statement sent through sqlx is
//! a hand-off to its connection thread and a wake-up back, and with the
//! writer as a task those wake-ups went through the runtime's event loop.
//! A run now costs one hand-off (taking the connection) whatever its size.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use cxmpute_core::{Error, Result};
use futures::future::BoxFuture;
use futures::FutureExt;
use sqlx::{Connection, SqliteConnection};
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::{map, map_shared};
use crate::money::{self, MoneyAnswer, MoneyOp};

/// The most operations one transaction takes. Large enough to amortise the
/// commit's fsync, small enough that one batch never holds readers' view of
/// the newest data back for long.
pub(crate) const MAX_BATCH: usize = 1024;

/// How many operations may wait for the writer before callers wait to enqueue.
const QUEUE: usize = 16 * 1024;

/// An operation's own answer and what it wants done with its changes.
///
/// `Err` undoes the operation's changes; `Ok(Err(e))` keeps them and still
/// answers `e` (a wrong sign-in code counts the attempt and is refused).
pub(crate) type Outcome<T> = Result<Result<T>>;

/// A write operation as the writer sees it.
trait WriteOp: Send {
    /// Runs the operation on the writer's connection, inside its savepoint.
    fn run<'c>(self: Box<Self>, conn: &'c mut SqliteConnection) -> BoxFuture<'c, Ran>;
    /// Answers the caller without running (the batch broke before its turn).
    fn fail(self: Box<Self>, e: Error);
}

/// What became of an operation that ran: keep its changes or not, and how to
/// answer its caller once the batch's fate is known.
struct Ran {
    keep: bool,
    answer: Answer,
}

/// Answers an operation's caller, given the commit's error if it failed.
type Answer = Box<dyn FnOnce(Option<&Arc<sqlx::Error>>) + Send>;

struct Op<F, T> {
    f: F,
    reply: oneshot::Sender<Result<T>>,
}

impl<F, T> WriteOp for Op<F, T>
where
    F: for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Outcome<T>> + Send + 'static,
    T: Send + 'static,
{
    fn run<'c>(self: Box<Self>, conn: &'c mut SqliteConnection) -> BoxFuture<'c, Ran> {
        let Op { f, reply } = *self;
        Box::pin(async move {
            // A panicking operation must not take the writer (and so every
            // later write) down with it: it is undone like a failed one.
            let out = match AssertUnwindSafe(f(conn)).catch_unwind().await {
                Ok(out) => out,
                Err(_) => Err(Error::Backend {
                    message: "a store operation panicked; it was undone".into(),
                    source: None,
                }),
            };
            let keep = out.is_ok();
            Ran {
                keep,
                answer: Box::new(move |commit_failed| {
                    let answer = match (out, commit_failed) {
                        // Nothing of a kept operation survives a failed commit.
                        (Ok(_), Some(e)) => Err(map_shared("committing a batch of writes", e)),
                        (Ok(inner), None) => inner,
                        (Err(e), _) => Err(e),
                    };
                    // The caller may have stopped waiting; the write stands anyway.
                    let _ = reply.send(answer);
                }),
            }
        })
    }

    fn fail(self: Box<Self>, e: Error) {
        let _ = self.reply.send(Err(e));
    }
}

/// Where a money operation's answer goes.
type MoneyReply = oneshot::Sender<Result<MoneyAnswer>>;

/// A money operation and where its answer goes.
type Money = (MoneyOp, MoneyReply);

enum Msg {
    Op(Box<dyn WriteOp>),
    /// Reserve or settle: queued apart so runs of them are applied together.
    /// Boxed: a settlement is large, and every queue slot is as large as
    /// the largest message.
    Money(Box<Money>),
    /// Answered once everything queued before it is committed.
    Flush(oneshot::Sender<()>),
    /// Refuses later messages; the writer commits what is queued, then
    /// stops and closes its connection.
    Close,
}

/// The handle callers use to queue writes. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Writer {
    tx: mpsc::Sender<Msg>,
    /// Its sender lives as long as the writer's thread: `changed` fails
    /// once the thread has closed its connection.
    stopped: watch::Receiver<()>,
}

fn closed() -> Error {
    Error::Unavailable {
        message: "the SQLite store is closed".into(),
        source: None,
    }
}

impl Writer {
    /// Starts the writer's thread on `conn`.
    pub(crate) fn spawn(conn: SqliteConnection) -> Result<Self> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (running, stopped) = watch::channel(());
        let failed = |e| Error::backend("starting the SQLite writer", e);
        // The thread's own runtime drives sqlx's futures (the other
        // operations, and taking the connection for a run) to completion.
        let rt = tokio::runtime::Builder::new_current_thread()
            // No I/O: sqlx's connection talks to its thread over channels.
            .enable_time()
            .build()
            .map_err(failed)?;
        std::thread::Builder::new()
            .name("cxmpute-sqlite-writer".into())
            .spawn(move || run(rt, conn, rx, running))
            .map_err(failed)?;
        Ok(Writer { tx, stopped })
    }

    /// Queues `f`, waits until its batch is committed and returns its answer.
    /// `f` runs alone on the writer's connection; an `Err` undoes its changes.
    pub(crate) async fn write<T, F>(&self, f: F) -> Result<T>
    where
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        self.write_keeping(move |c| f(c).map(|r| r.map(Ok)).boxed())
            .await
    }

    /// Like [`write`](Self::write), but `f` can answer an error and keep its
    /// changes (see [`Outcome`]).
    pub(crate) async fn write_keeping<T, F>(&self, f: F) -> Result<T>
    where
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Outcome<T>> + Send + 'static,
        T: Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        self.ask(Msg::Op(Box::new(Op { f, reply })), answer).await
    }

    /// Queues a reservation or settlement and waits for its committed answer.
    pub(crate) async fn money(&self, op: MoneyOp) -> Result<MoneyAnswer> {
        let (reply, answer) = oneshot::channel();
        self.ask(Msg::Money(Box::new((op, reply))), answer).await
    }

    /// Queues `msg`, whose reply goes to `answer`, and waits for the reply.
    async fn ask<T>(&self, msg: Msg, answer: oneshot::Receiver<Result<T>>) -> Result<T> {
        self.tx.send(msg).await.map_err(|_| closed())?;
        answer.await.map_err(|_| Error::Unavailable {
            message: "the SQLite writer stopped before answering".into(),
            source: None,
        })?
    }

    /// Waits until every write queued before this call has been applied:
    /// committed, or answered with the error that kept it out.
    pub(crate) async fn flush(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Msg::Flush(tx)).await.map_err(|_| closed())?;
        rx.await.map_err(|_| closed())
    }

    /// Commits everything queued, then stops the writer and closes its
    /// connection. Later writes fail with `Unavailable`. Closing twice, or
    /// from two clones at once, is fine: each returns once the connection
    /// is closed.
    pub(crate) async fn close(&self) {
        // Refused only when the writer already refuses work: it is closing.
        let _ = self.tx.send(Msg::Close).await;
        let _ = self.stopped.clone().changed().await;
    }
}

/// The writer's thread: runs [`serve`] to the end, then closes the
/// connection and says so.
fn run(
    rt: Runtime,
    conn: SqliteConnection,
    mut rx: mpsc::Receiver<Msg>,
    running: watch::Sender<()>,
) {
    rt.block_on(async {
        let mut conn = conn;
        let mut direct = None;
        serve(&mut conn, &mut direct, &mut rx).await;
        if direct.is_some() {
            // SQLite will not close a connection with statements still
            // prepared: the direct connection's go first, with sqlx's
            // connection thread held off while they are finalized.
            let _held = conn.lock_handle().await;
            drop(direct);
        }
        if let Err(e) = conn.close().await {
            tracing::warn!(error = %e, "closing the SQLite writer connection failed");
        }
    });
    // Tells every `close` waiting that the connection is closed.
    drop(running);
}

/// Applies what is queued, in order, until every sender is gone or the
/// store was closed, and the queue is drained.
///
/// For runs of money operations the connection is taken from sqlx's
/// connection thread and called directly (`direct`, made from sqlx's handle
/// the first time and kept, with the statements it prepared); it stays
/// taken while nothing else comes, so a busy writer hands it back and forth
/// only around the other operations, which run through sqlx.
async fn serve(
    conn: &mut SqliteConnection,
    direct: &mut Option<rusqlite::Connection>,
    rx: &mut mpsc::Receiver<Msg>,
) {
    let mut units = VecDeque::new();
    loop {
        if units.is_empty() && !gather(rx, &mut units).await {
            return;
        }
        match units.pop_front() {
            Some(Unit::Ops(ops)) => run_ops(conn, ops).await,
            Some(Unit::Flush(tx)) => {
                let _ = tx.send(());
            }
            Some(Unit::Money(run)) => {
                let mut handle = match conn.lock_handle().await {
                    Ok(handle) => handle,
                    Err(e) => {
                        fail_run(run, map("taking the SQLite writer's connection", e));
                        continue;
                    }
                };
                let c = match &mut *direct {
                    Some(c) => c,
                    slot => {
                        let raw = handle.as_raw_handle().as_ptr();
                        // SAFETY: `raw` is the handle of sqlx's open
                        // connection, which this thread owns and closes
                        // only after `direct` is dropped (see `run`).
                        // `from_handle` does not take the handle over
                        // (dropping the result leaves it open). `direct` is
                        // only used while a `handle` holds sqlx's connection
                        // thread off the connection, so the two never use
                        // it at once.
                        #[allow(unsafe_code)]
                        let made = unsafe { rusqlite::Connection::from_handle(raw) };
                        match made {
                            Ok(c) => slot.insert(c),
                            Err(e) => {
                                let e = Error::backend("taking the SQLite writer's connection", e);
                                fail_run(run, e);
                                continue;
                            }
                        }
                    }
                };
                // Keep the connection while runs of money operations come.
                units.push_front(Unit::Money(run));
                loop {
                    if units.is_empty() && !gather(rx, &mut units).await {
                        return;
                    }
                    match units.pop_front() {
                        Some(Unit::Money(run)) => run_money(c, run),
                        Some(Unit::Flush(tx)) => {
                            let _ = tx.send(());
                        }
                        // sqlx's turn: the connection goes back to its thread.
                        Some(ops) => {
                            units.push_front(ops);
                            break;
                        }
                        None => {}
                    }
                }
                drop(handle);
            }
            None => {}
        }
    }
}

/// Waits for the next message, then takes whatever else is queued (up to
/// [`MAX_BATCH`] operations) into `units`, in order, neighbouring operations
/// of a kind together. `false` once every sender is gone or the store was
/// closed, and the queue is drained.
async fn gather(rx: &mut mpsc::Receiver<Msg>, units: &mut VecDeque<Unit>) -> bool {
    let Some(first) = rx.recv().await else {
        return false;
    };
    let mut queued = 0;
    let mut next = Some(first);
    while let Some(msg) = next.take() {
        match msg {
            Msg::Op(op) => match units.back_mut() {
                Some(Unit::Ops(ops)) => ops.push(op),
                _ => units.push_back(Unit::Ops(vec![op])),
            },
            Msg::Money(m) => match units.back_mut() {
                Some(Unit::Money(run)) => run.push(*m),
                _ => units.push_back(Unit::Money(vec![*m])),
            },
            Msg::Flush(tx) => units.push_back(Unit::Flush(tx)),
            // Refuse new work; what is already queued still runs.
            Msg::Close => rx.close(),
        }
        queued += 1;
        if queued < MAX_BATCH {
            next = rx.try_recv().ok();
        }
    }
    true
}

/// What the writer applies, in the order queued; each unit of operations
/// is a transaction of its own.
enum Unit {
    /// Neighbouring operations: one transaction, a savepoint each.
    Ops(Vec<Box<dyn WriteOp>>),
    /// Neighbouring reservations and settlements: one transaction.
    Money(Vec<Money>),
    /// Everything queued before it has been applied by the time it is reached.
    Flush(oneshot::Sender<()>),
}

/// Runs neighbouring operations in one transaction: `BEGIN IMMEDIATE` takes
/// the write lock up front (no lock upgrade can fail half way), each
/// operation gets a savepoint, and the savepoint steps are sent together
/// with the next one so each operation costs one extra round trip to
/// SQLite, not two.
async fn run_ops(conn: &mut SqliteConnection, ops: Vec<Box<dyn WriteOp>>) {
    let total = ops.len();
    let mut ran: Vec<Ran> = Vec::with_capacity(total);
    let mut ops = ops.into_iter();
    let mut broken = exec(conn, "BEGIN IMMEDIATE; SAVEPOINT op").await.err();
    if broken.is_none() {
        for op in ops.by_ref() {
            let r = op.run(conn).await;
            let last = ran.len() + 1 == total;
            let step = match (r.keep, last) {
                (true, false) => "RELEASE op; SAVEPOINT op",
                (true, true) => "RELEASE op; COMMIT",
                (false, false) => "ROLLBACK TO op; RELEASE op; SAVEPOINT op",
                (false, true) => "ROLLBACK TO op; RELEASE op; COMMIT",
            };
            ran.push(r);
            if let Err(e) = exec(conn, step).await {
                // A savepoint step or the commit failed: SQLite may have
                // rolled the whole transaction back, so nothing of it counts.
                broken = Some(e);
                break;
            }
        }
    }
    let Some(e) = broken else {
        for r in ran {
            (r.answer)(None);
        }
        return;
    };
    tracing::error!(error = %e, "a batch of SQLite writes failed; none of it was applied");
    // Leave no transaction open for the next batch; fails harmlessly when
    // SQLite already rolled back.
    let _ = exec(conn, "ROLLBACK").await;
    let e = Arc::new(e);
    for r in ran {
        (r.answer)(Some(&e));
    }
    for op in ops {
        op.fail(map_shared(
            "a batch of writes failed before this one ran",
            &e,
        ));
    }
}

/// Applies a run of money operations (see [`money::apply`]) on the
/// connection directly, and answers each of its callers.
///
/// A run the store refuses as a whole with an error not worth retrying
/// (SQLite refusing one of its rows) is applied again one operation at a
/// time, so that each caller gets its own outcome: a run holds the
/// settlements of unrelated calls that happened to queue together, and one
/// bad call must not fail the others.
fn run_money(c: &rusqlite::Connection, run: Vec<Money>) {
    let (ops, replies): (Vec<MoneyOp>, Vec<_>) = run.into_iter().unzip();
    let out = match apply_guarded(c, &ops) {
        Err(e) if ops.len() > 1 && !e.is_retryable() => {
            tracing::warn!(error = %e, "a run of reservations and settlements failed; applying them one by one");
            Ok(ops
                .iter()
                .map(|op| match apply_guarded(c, std::slice::from_ref(op)) {
                    Ok(mut one) => one.remove(0),
                    Err(e) => Err(e),
                })
                .collect())
        }
        out => out,
    };
    if let Err(e) = &out {
        tracing::error!(error = %e, "a run of reservations and settlements failed; none of it was applied");
    }
    answer_run(replies, out);
}

/// [`money::apply`], with a panic undone and answered like a failure.
fn apply_guarded(c: &rusqlite::Connection, ops: &[MoneyOp]) -> Result<Vec<Result<MoneyAnswer>>> {
    std::panic::catch_unwind(AssertUnwindSafe(|| money::apply(c, ops))).unwrap_or_else(|_| {
        // Undo whatever the run had written before it panicked.
        if !c.is_autocommit() {
            let _ = c.execute_batch("ROLLBACK");
        }
        Err(Error::Backend {
            message: "applying reservations and settlements panicked; undone".into(),
            source: None,
        })
    })
}

/// Answers every caller of a run that could not be applied with `e`.
fn fail_run(run: Vec<Money>, e: Error) {
    answer_run(run.into_iter().map(|(_, reply)| reply).collect(), Err(e));
}

/// Answers each caller of a run: with its own answer, or with the error
/// that failed the run as a whole.
fn answer_run(replies: Vec<MoneyReply>, out: Result<Vec<Result<MoneyAnswer>>>) {
    match out {
        Ok(answers) => {
            for (reply, answer) in replies.into_iter().zip(answers) {
                let _ = reply.send(answer);
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(replicate(&e)));
            }
        }
    }
}

/// A copy of a run's error for each of the callers that share it (the core
/// error is not `Clone`); its kind, so its retryability, is kept, and so is
/// its cause, as text (what SQLite said is what the caller needs to know).
fn replicate(e: &Error) -> Error {
    let mut message = match e {
        Error::Unavailable { message, .. } | Error::Backend { message, .. } => message.clone(),
        other => other.to_string(),
    };
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        message = format!("{message}: {c}");
        cause = c.source();
    }
    match e {
        Error::Unavailable { .. } => Error::Unavailable {
            message,
            source: None,
        },
        _ => Error::Backend {
            message,
            source: None,
        },
    }
}

/// Runs statements without arguments; cached like any prepared statement.
async fn exec(conn: &mut SqliteConnection, sql: &'static str) -> Result<(), sqlx::Error> {
    sqlx::query(sql).execute(conn).await.map(|_| ())
}
