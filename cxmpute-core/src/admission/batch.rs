//! Group commits: the one queue every settlement of a call held outside the
//! store goes through, whether its hold lived in this host's memory
//! ([`LedgerStore::settle_held`]) or in a credit lease
//! ([`LedgerStore::settle_leased`]).
//!
//! The first settlement to arrive at an idle queue starts a task that
//! commits what is queued, up to [`MAX_BATCH`] calls in one store call,
//! then what queued up meanwhile, until the queue is empty. Each call
//! waits for the commit of its own batch, and its answer is released only
//! then. A store sums the changes of one account, key and provider inside a
//! batch, so a busy account is written once per batch, not once per call.
//!
//! A store that groups what reaches it at the same time by itself
//! ([`LedgerStore::groups_settlements`]: SQLite's writer) gets each call
//! held in memory as it comes, without the queue.
//!
//! A batch the store refuses with an error that is not worth retrying (a
//! call it will not take) is tried again call by call, so that each call
//! gets its own outcome and one bad call cannot fail the others. A
//! retryable error (the store unreachable or busy) answers every call of
//! the batch: their settlements retry, and queue up together again.
//!
//! [`LedgerStore::settle_held`]: crate::store::LedgerStore::settle_held
//! [`LedgerStore::groups_settlements`]: crate::store::LedgerStore::groups_settlements
//! [`LedgerStore::settle_leased`]: crate::store::LedgerStore::settle_leased

use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::store::Store;
use crate::types::*;

/// The most calls one batch commits in one store call: enough that a busy
/// host commits a few hundred calls per SQLite transaction, few enough
/// that one transaction stays short. (A DynamoDB store splits a batch into
/// transactions of at most 100 items itself.)
pub(crate) const MAX_BATCH: usize = 256;

type Reply = oneshot::Sender<Result<SettleOutcome>>;

/// One call waiting to be committed.
struct Queued {
    /// The lease it was admitted from (`None`: held in memory).
    lease: Option<RequestId>,
    hold: Reservation,
    st: Settlement,
    reply: Reply,
}

/// A group-commit queue (see the module docs).
pub(crate) struct Batch {
    store: Arc<dyn Store>,
    /// The store's [`groups_settlements`](crate::store::LedgerStore::groups_settlements).
    store_groups: bool,
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    calls: Vec<Queued>,
    /// Whether a task is committing what is queued.
    running: bool,
}

impl Batch {
    pub(crate) fn new(store: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Batch {
            store_groups: store.groups_settlements(),
            store,
            queue: Mutex::default(),
        })
    }

    /// Settles a call in the next batch: `lease` is the credit lease it was
    /// admitted from, `None` when its hold lived in memory. Returns once its
    /// batch was committed (or failed).
    pub(crate) async fn submit(
        self: &Arc<Self>,
        lease: Option<RequestId>,
        hold: Reservation,
        st: Settlement,
    ) -> Result<SettleOutcome> {
        if lease.is_none() && self.store_groups {
            // The store commits what reaches it meanwhile together: the
            // queue would only add its task's hand-off, and keep the store
            // waiting for the task to come back with the next batch.
            let mut one = self.apply(None, &[(hold, st)]).await?;
            return Ok(one.remove(0));
        }
        let (reply, answer) = oneshot::channel();
        let lead = {
            let mut q = self.queue.lock();
            q.calls.push(Queued {
                lease,
                hold,
                st,
                reply,
            });
            !std::mem::replace(&mut q.running, true)
        };
        if lead {
            // A task of its own: a caller that goes away must not leave the
            // others waiting.
            let me = self.clone();
            tokio::spawn(async move { me.drain().await });
        }
        answer
            .await
            .unwrap_or_else(|e| Err(Error::unavailable("settling a batch of calls", e)))
    }

    /// Commits what is queued, batch after batch, until the queue is empty.
    async fn drain(&self) {
        loop {
            let taken: Vec<Queued> = {
                let mut q = self.queue.lock();
                if q.calls.is_empty() {
                    q.running = false;
                    return;
                }
                let n = q.calls.len().min(MAX_BATCH);
                q.calls.drain(..n).collect()
            };
            // Calls of several leases (one replacing another) commit one
            // lease after the other, in the order they came.
            let mut groups: Vec<(Option<RequestId>, Vec<Queued>)> = Vec::new();
            for call in taken {
                match groups.iter_mut().find(|(l, _)| *l == call.lease) {
                    Some((_, g)) => g.push(call),
                    None => groups.push((call.lease.clone(), vec![call])),
                }
            }
            for (lease, calls) in groups {
                self.commit(lease.as_ref(), calls).await;
            }
        }
    }

    /// Commits one group of calls and answers each.
    async fn commit(&self, lease: Option<&RequestId>, calls: Vec<Queued>) {
        let (list, replies): (Vec<_>, Vec<_>) =
            calls.into_iter().map(|c| ((c.hold, c.st), c.reply)).unzip();
        match self.apply(lease, &list).await {
            Ok(outcomes) => {
                for (reply, o) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(o));
                }
            }
            Err(e) if list.len() == 1 => {
                if let Some(reply) = replies.into_iter().next() {
                    let _ = reply.send(Err(e));
                }
            }
            Err(e) if e.is_retryable() => {
                for reply in replies {
                    let _ = reply.send(Err(retryable_like(&e)));
                }
            }
            // One call the store will not take: each alone, so that a
            // call's error is its own.
            Err(_) => {
                for (call, reply) in list.into_iter().zip(replies) {
                    let one = self.apply(lease, std::slice::from_ref(&call)).await;
                    let _ = reply.send(one.map(|mut o| o.remove(0)));
                }
            }
        }
    }

    /// One store call for `list`, with one outcome per call.
    async fn apply(
        &self,
        lease: Option<&RequestId>,
        list: &[(Reservation, Settlement)],
    ) -> Result<Vec<SettleOutcome>> {
        let outcomes = match lease {
            Some(lease) => self.store.settle_leased(lease, list).await?,
            None => self.store.settle_held(list).await?,
        };
        if outcomes.len() != list.len() {
            return Err(Error::Backend {
                message: format!(
                    "the store answered {} outcomes for {} settlements",
                    outcomes.len(),
                    list.len()
                ),
                source: None,
            });
        }
        Ok(outcomes)
    }
}

/// A retryable error like `e`, for each call of a batch it failed.
fn retryable_like(e: &Error) -> Error {
    match e {
        Error::Conflict(m) => Error::Conflict(m.clone()),
        Error::RateLimited(m) => Error::RateLimited(m.clone()),
        other => Error::Unavailable {
            message: other.to_string(),
            source: None,
        },
    }
}
