//! Credit leases: admission on a store hosts share.
//!
//! A lease is a reservation of its own in the store (request id
//! `lease-...`, per account and key), taken with `reserve`: the balance and
//! the key's limit give it up atomically, so the sum of every host's leases
//! never exceeds either. Calls of that account and key are then held from
//! the lease in memory, with no store call, and settled against it in
//! batches ([`LedgerStore::settle_leased`]): the calls waiting to settle
//! against one lease go to the store together, and each call's answer is
//! released once its batch committed.
//!
//! - **Size.** The first lease of an account and key holds one call's hold;
//!   each refill doubles it (up to [`MAX_CALLS`] holds), and a refused
//!   reservation brings it back to one. A call the leases cannot cover
//!   falls back to a reservation of its own, so a small balance is never
//!   stranded on one host.
//! - **Hand-back.** On the maintenance tick a lease with no call in flight
//!   goes back to the account (settled at zero) once its account and key
//!   were idle for [`LeaseConfig::idle`], or once it is spent.
//! - **Renewal.** A lease admits calls for [`LeaseConfig::renew_after`]
//!   after it was taken (the reservation TTL less the longest a call may
//!   last, less a margin for its settlement), so every call it admitted
//!   settles before the stale sweep could take it; then a new lease takes
//!   its place and it goes back once its calls are over.
//! - **Changes on this host.** A removal of credits, a suspension or a change
//!   of a key retires this host's leases of the account (they admit no more
//!   calls) and hands back those with no call in flight at once; the others
//!   go back when their last call settles, before its answer is released.
//!
//! [`LedgerStore::settle_leased`]: crate::store::LedgerStore::settle_leased

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::store::Store;
use crate::store_support::release_settlement;

use super::batch::Batch;
use crate::types::*;

/// The most calls' holds one lease is sized for.
const MAX_CALLS: i64 = 64;

/// How leases are kept (from [`BrokerConfig`](crate::BrokerConfig)).
#[derive(Clone, Copy, Debug)]
pub(crate) struct LeaseConfig {
    /// An account and key idle this long hands its leases back.
    pub(crate) idle: Duration,
    /// A lease admits calls this long after it was taken.
    pub(crate) renew_after: Duration,
}

/// This host's credit leases (see the module docs).
pub(crate) struct Leases {
    pub(super) store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    config: LeaseConfig,
    slots: Mutex<HashMap<(UserId, ApiKeyId), Slot>>,
}

/// The leases of one account and key.
struct Slot {
    leases: Vec<Lease>,
    /// Calls' holds the next lease is sized for.
    calls: i64,
    /// Taken while a lease is reserved, so that calls arriving together
    /// wait for one refill instead of each reserving its own.
    refill: Arc<tokio::sync::Mutex<()>>,
    last_used: Timestamp,
    /// The settlements of its calls, whichever lease admitted them: one
    /// queue per account and key, so that its batches never race each
    /// other for the same items.
    batch: Arc<Batch>,
}

struct Lease {
    /// As reserved.
    r: Reservation,
    /// What the store says the lease still holds: its amount less the
    /// charges committed against it.
    remaining: Credits,
    /// Held by calls in flight (and by settlements of unknown fate).
    held: Credits,
    /// Calls in flight.
    calls: usize,
    /// Admits no more calls; goes back once its calls are over.
    retired: bool,
}

impl Lease {
    fn spendable(&self) -> Credits {
        self.remaining.saturating_sub(self.held)
    }

    fn admits(&self, now: Timestamp, renew_after: Duration) -> bool {
        !self.retired && now < self.r.created_at.plus(renew_after)
    }
}

impl Leases {
    pub(crate) fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, config: LeaseConfig) -> Self {
        Leases {
            store,
            clock,
            config,
            slots: Mutex::default(),
        }
    }

    /// Holds `r` from a lease: `Some(lease)` when it did, `None` when no
    /// lease could cover it and it was reserved in the store instead.
    pub(crate) async fn hold(&self, r: &Reservation) -> Result<Option<RequestId>> {
        let slot = (r.user_id.clone(), r.key_id.clone());
        let refill = match self.take(&slot, r) {
            Ok(lease) => return Ok(Some(lease)),
            Err(refill) => refill,
        };
        let guard = refill.lock().await;
        // Another call may have refilled while this one waited.
        let calls = match self.take(&slot, r) {
            Ok(lease) => return Ok(Some(lease)),
            Err(_) => self.slots.lock().get(&slot).map_or(1, |s| s.calls),
        };
        let size = Credits(r.amount.0.saturating_mul(calls));
        if size > Credits::ZERO {
            let lease = Reservation {
                request_id: crate::store_support::lease_id(),
                amount: size,
                created_at: self.clock.now(),
                ..r.clone()
            };
            match self.store.reserve(&lease).await {
                Ok(()) => {
                    let id = lease.request_id.clone();
                    let mut slots = self.slots.lock();
                    let s = slot_of(&mut slots, &slot, lease.created_at, &self.store);
                    s.calls = (calls * 2).min(MAX_CALLS);
                    s.leases.push(Lease {
                        remaining: lease.amount,
                        held: r.amount,
                        calls: 1,
                        retired: false,
                        r: lease,
                    });
                    return Ok(Some(id));
                }
                // Less is left than the lease: this call alone may still fit.
                Err(e @ (Error::InsufficientCredits(_) | Error::KeyLimitReached(_))) => {
                    if let Some(s) = self.slots.lock().get_mut(&slot) {
                        s.calls = 1;
                    }
                    if size == r.amount {
                        return Err(e); // it was this call's own hold
                    }
                }
                Err(e) => return Err(e),
            }
        }
        drop(guard);
        self.store.reserve(r).await?;
        Ok(None)
    }

    /// Holds `r` from a lease in memory, or hands back the slot's refill
    /// lock when none covers it.
    fn take(
        &self,
        slot: &(UserId, ApiKeyId),
        r: &Reservation,
    ) -> std::result::Result<RequestId, Arc<tokio::sync::Mutex<()>>> {
        let now = self.clock.now();
        let mut slots = self.slots.lock();
        let s = slot_of(&mut slots, slot, now, &self.store);
        s.last_used = now;
        let renew_after = self.config.renew_after;
        match s
            .leases
            .iter_mut()
            .find(|l| l.admits(now, renew_after) && l.spendable() >= r.amount)
        {
            Some(l) => {
                l.held = l.held.saturating_add(r.amount);
                l.calls += 1;
                Ok(l.r.request_id.clone())
            }
            None => Err(s.refill.clone()),
        }
    }

    /// Settles the call `hold`, admitted from `lease`, in the lease's next
    /// batch. A retired lease whose last call this was goes back before
    /// this returns.
    pub(crate) async fn settle(
        &self,
        lease: &RequestId,
        hold: &Reservation,
        st: &Settlement,
    ) -> Result<SettleOutcome> {
        let slot = (hold.user_id.clone(), hold.key_id.clone());
        let batch = {
            let slots = self.slots.lock();
            slots
                .get(&slot)
                .filter(|s| s.leases.iter().any(|l| &l.r.request_id == lease))
                .map(|s| s.batch.clone())
        };
        let batch = batch.ok_or_else(|| Error::NotFound(format!("lease {lease}")))?;
        let outcome = batch
            .submit(Some(lease.clone()), hold.clone(), st.clone())
            .await?;
        let done = {
            let mut slots = self.slots.lock();
            match slots.get_mut(&slot) {
                Some(s) => match s.leases.iter().position(|l| &l.r.request_id == lease) {
                    Some(i) if s.leases[i].retired && s.leases[i].calls == 1 => {
                        Some(s.leases.swap_remove(i).r)
                    }
                    _ => None,
                },
                None => None,
            }
        };
        if let Some(r) = done {
            self.release(r).await;
        }
        Ok(outcome)
    }

    /// Ends the hold of `r` on `lease`: with its committed charge, or
    /// (`None`) with its fate unknown, which keeps it held and retires the
    /// lease (the store knows what it holds; memory no longer does).
    pub(crate) fn finish(&self, lease: &RequestId, r: &Reservation, committed: Option<Credits>) {
        let now = self.clock.now();
        let slot = (r.user_id.clone(), r.key_id.clone());
        self.with_lease(&slot, lease, |l| {
            l.calls = l.calls.saturating_sub(1);
            match committed {
                Some(charged) => {
                    l.held = l.held.saturating_sub(r.amount);
                    l.remaining = l.remaining.saturating_sub(charged);
                }
                None => l.retired = true,
            }
        });
        if let Some(s) = self.slots.lock().get_mut(&slot) {
            s.last_used = now;
        }
    }

    fn with_lease<T>(
        &self,
        slot: &(UserId, ApiKeyId),
        lease: &RequestId,
        f: impl FnOnce(&mut Lease) -> T,
    ) -> Option<T> {
        let mut slots = self.slots.lock();
        let l = slots
            .get_mut(slot)?
            .leases
            .iter_mut()
            .find(|l| &l.r.request_id == lease)?;
        Some(f(l))
    }

    /// Retires this host's leases of `user` (they admit no more calls) and
    /// hands back those with no call in flight: after a change to the
    /// account, new calls take new leases, checked against it.
    pub(crate) async fn retire(&self, user: &UserId) {
        let gone = self.collect(|(u, _), _| (u == user).then_some(true));
        for r in gone {
            self.release(r).await;
        }
    }

    /// The maintenance tick's hand-back: leases with no call in flight go
    /// back when their account and key were idle long enough, when they are
    /// retired or spent, or (`all`) in any case; leases past their renewal
    /// time admit no more calls.
    pub(crate) async fn hand_back(&self, all: bool) {
        let now = self.clock.now();
        let (idle, renew_after) = (self.config.idle, self.config.renew_after);
        let gone = self.collect(|_, s| (all || s.last_used.plus(idle) <= now).then_some(false));
        for r in gone {
            self.release(r).await;
        }
        // Spent or too old to admit: retire now, hand back once idle.
        let gone = self.collect_where(|l| {
            if !l.admits(now, renew_after) {
                l.retired = true;
            }
            l.calls == 0 && (l.retired || l.spendable() == Credits::ZERO)
        });
        for r in gone {
            self.release(r).await;
        }
    }

    /// Takes out of memory, and returns, the leases with no call in flight
    /// of the slots `pick` names (`Some(retire)`: retire the busy ones too
    /// when `retire`); slots left empty and idle go.
    fn collect(
        &self,
        pick: impl Fn(&(UserId, ApiKeyId), &Slot) -> Option<bool>,
    ) -> Vec<Reservation> {
        let mut gone = Vec::new();
        let mut slots = self.slots.lock();
        slots.retain(|k, s| {
            let Some(retire) = pick(k, s) else {
                return true;
            };
            let (idle, busy): (Vec<_>, Vec<_>) = s.leases.drain(..).partition(|l| l.calls == 0);
            gone.extend(idle.into_iter().map(|l| l.r));
            s.leases = busy;
            if retire {
                for l in &mut s.leases {
                    l.retired = true;
                }
            }
            !s.leases.is_empty()
        });
        gone
    }

    /// Takes out of memory, and returns, the leases `pick` says go.
    fn collect_where(&self, mut pick: impl FnMut(&mut Lease) -> bool) -> Vec<Reservation> {
        let mut gone = Vec::new();
        let mut slots = self.slots.lock();
        for s in slots.values_mut() {
            let mut i = 0;
            while i < s.leases.len() {
                if pick(&mut s.leases[i]) {
                    gone.push(s.leases.swap_remove(i).r);
                } else {
                    i += 1;
                }
            }
        }
        gone
    }

    /// Gives what `lease` still holds back to its account and key (settles
    /// it at zero). When that fails, the stale sweep returns it after the
    /// reservation TTL.
    async fn release(&self, lease: Reservation) {
        let st = release_settlement(&lease, self.clock.now());
        if let Err(e) = self.store.settle(&st).await {
            tracing::warn!(error = %e, lease = %lease.request_id, "handing a lease back failed");
        }
    }

    /// Leases held in memory now.
    #[cfg(feature = "testkit")]
    pub(crate) fn count(&self) -> usize {
        self.slots.lock().values().map(|s| s.leases.len()).sum()
    }
}

fn slot_of<'a>(
    slots: &'a mut HashMap<(UserId, ApiKeyId), Slot>,
    key: &(UserId, ApiKeyId),
    now: Timestamp,
    store: &Arc<dyn Store>,
) -> &'a mut Slot {
    slots.entry(key.clone()).or_insert_with(|| Slot {
        leases: Vec::new(),
        calls: 1,
        refill: Arc::default(),
        last_used: now,
        batch: Batch::new(store.clone()),
    })
}
