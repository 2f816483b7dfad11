//! The single writer: one task owns the one connection that writes, and
//! applies queued operations in batches, one transaction per batch.
//!
//! SQLite lets one connection write at a time however many ask, so many
//! writing connections would only queue on its lock (and time out as
//! `SQLITE_BUSY` under load). Here callers queue on a channel instead; the
//! writer takes whatever is waiting (up to [`MAX_BATCH`]), runs each unit of
//! work inside its own `SAVEPOINT` so a refused or failed one undoes only
//! itself, commits once, and only then answers every caller. One commit (one
//! fsync) is shared by the whole batch.
//!
//! A unit is one operation, or a run of neighbouring reservations and
//! settlements that [`crate::money`] decides one by one and writes together.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use cxmpute_core::{Error, Result};
use futures::future::BoxFuture;
use futures::FutureExt;
use sqlx::{Connection, SqliteConnection};
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::map_shared;
use crate::money::{self, MoneyAnswer, MoneyOp, Txn};

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

/// A money operation and where its answer goes.
type Money = (MoneyOp, oneshot::Sender<Result<MoneyAnswer>>);

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
    /// Its sender lives as long as the writer task: `changed` fails once
    /// the task has closed its connection and ended.
    stopped: watch::Receiver<()>,
}

fn closed() -> Error {
    Error::Unavailable {
        message: "the SQLite store is closed".into(),
        source: None,
    }
}

impl Writer {
    /// Starts the writer task on `conn`.
    pub(crate) fn spawn(conn: SqliteConnection) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (running, stopped) = watch::channel(());
        tokio::spawn(run(conn, rx, running));
        Writer { tx, stopped }
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

/// The writer task.
async fn run(mut conn: SqliteConnection, mut rx: mpsc::Receiver<Msg>, running: watch::Sender<()>) {
    loop {
        let Some(first) = rx.recv().await else { break };
        let mut units: Vec<Unit> = Vec::new();
        let mut queued = 0;
        let mut flushed = Vec::new();
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Op(op) => {
                    units.push(Unit::Op(op));
                    queued += 1;
                }
                Msg::Money(m) => {
                    // Neighbouring money operations form one run.
                    match units.last_mut() {
                        Some(Unit::Money(run)) => run.push(*m),
                        _ => units.push(Unit::Money(vec![*m])),
                    }
                    queued += 1;
                }
                Msg::Flush(tx) => flushed.push(tx),
                Msg::Close => {
                    // Refuse new work; what is already queued still runs below.
                    rx.close();
                }
            }
            if queued < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        run_batch(&mut conn, units).await;
        for tx in flushed {
            let _ = tx.send(());
        }
    }
    // Every sender is gone or the store was closed, and the queue is drained.
    if let Err(e) = conn.close().await {
        tracing::warn!(error = %e, "closing the SQLite writer connection failed");
    }
    // Tells every `close` waiting that the connection is closed.
    drop(running);
}

/// Runs one batch in one transaction: `BEGIN IMMEDIATE` takes the write lock
/// up front (no lock upgrade can fail half way), each operation gets a
/// savepoint, and the savepoint steps are sent together with the next one so
/// each operation costs one extra round trip to SQLite, not two.
async fn run_batch(conn: &mut SqliteConnection, units: Vec<Unit>) {
    if units.is_empty() {
        return;
    }
    // A batch of one run of money operations (under load, the usual batch:
    // settlements) needs no savepoint, the transaction is its undo, and
    // its read and write begin and commit the transaction themselves.
    let units = match <[Unit; 1]>::try_from(units) {
        Ok([Unit::Money(run)]) => return run_money_alone(conn, run).await,
        Ok([op]) => vec![op],
        Err(units) => units,
    };
    let total = units.len();
    let mut ran: Vec<Ran> = Vec::with_capacity(total);
    let mut units = units.into_iter();
    let mut broken = exec(conn, "BEGIN IMMEDIATE; SAVEPOINT op").await.err();
    if broken.is_none() {
        for unit in units.by_ref() {
            let r = unit.run(conn).await;
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
    for unit in units {
        unit.fail(&e);
    }
}

/// What runs inside one savepoint: one generic operation, or a run of
/// neighbouring money operations.
enum Unit {
    Op(Box<dyn WriteOp>),
    Money(Vec<Money>),
}

impl Unit {
    async fn run(self, conn: &mut SqliteConnection) -> Ran {
        let run = match self {
            Unit::Op(op) => return op.run(conn).await,
            Unit::Money(run) => run,
        };
        run_money(conn, run, Txn::Open).await.0
    }

    /// Answers every caller of the unit that the batch broke (with `e`)
    /// before the unit ran; each answer keeps SQLite's error as its source.
    fn fail(self, e: &Arc<sqlx::Error>) {
        let failed = || map_shared("a batch of writes failed before this one ran", e);
        match self {
            Unit::Op(op) => op.fail(failed()),
            Unit::Money(run) => {
                for (_, reply) in run {
                    let _ = reply.send(Err(failed()));
                }
            }
        }
    }
}

/// Applies a run of money operations in the transaction `txn` says: what
/// to keep and how to answer, and whether the transaction is still open
/// (see [`money::Applied`]).
async fn run_money(conn: &mut SqliteConnection, run: Vec<Money>, txn: Txn) -> (Ran, bool) {
    let (ops, replies): (Vec<MoneyOp>, Vec<_>) = run.into_iter().unzip();
    let out = match AssertUnwindSafe(money::apply(conn, &ops, txn))
        .catch_unwind()
        .await
    {
        Ok(out) => out,
        Err(_) => Err(Error::Backend {
            message: "applying reservations and settlements panicked; undone".into(),
            source: None,
        }),
    };
    match out {
        Ok(money::Applied { answers, open }) => {
            let ran = Ran {
                keep: true,
                answer: Box::new(move |commit_failed| {
                    for (reply, answer) in replies.into_iter().zip(answers) {
                        let answer = match (answer, commit_failed) {
                            (Ok(_), Some(e)) => Err(map_shared("committing a batch of writes", e)),
                            (answer, _) => answer,
                        };
                        let _ = reply.send(answer);
                    }
                }),
            };
            (ran, open)
        }
        // The run's writes failed as a whole: every operation in it learns why.
        Err(e) => {
            let ran = Ran {
                keep: false,
                answer: Box::new(move |_| {
                    for reply in replies {
                        let _ = reply.send(Err(replicate(&e)));
                    }
                }),
            };
            (ran, true)
        }
    }
}

/// A batch that is one run of money operations, in its own transaction
/// ([`Txn::Own`]): two statements sent to SQLite instead of four.
async fn run_money_alone(conn: &mut SqliteConnection, run: Vec<Money>) {
    let (ran, open) = run_money(conn, run, Txn::Own).await;
    let mut failed = None;
    if open {
        // A run that wrote nothing commits nothing; a failed one is undone.
        // (A `ROLLBACK` with no transaction open fails harmlessly.)
        let end = if ran.keep { "COMMIT" } else { "ROLLBACK" };
        if let Err(e) = exec(conn, end).await {
            if ran.keep {
                tracing::error!(error = %e, "a batch of SQLite writes failed; none of it was applied");
                let _ = exec(conn, "ROLLBACK").await;
                failed = Some(Arc::new(e));
            }
        }
    }
    (ran.answer)(failed.as_ref());
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
