//! Credit leases: admission on a store hosts share.
//!
//! A lease is a reservation of its own in the store (request id
//! `lease-...`, per account and key), taken with `reserve`: the balance and
//! the key's limit give it up atomically, so the sum of every host's leases
//! never exceeds either. Calls of that account and key are then held from
//! the lease in memory, with no store call, and settled against it in
//! batches ([`LedgerStore::settle_leased`]): the calls of one account and
//! key waiting to settle go to the store together (one group-commit queue,
//! [`super::batch`], whichever of its leases admitted them), and each
//! call's answer is released once its batch committed.
//!
//! - **Size.** Each account and key keeps what its calls held lately on
//!   this host, decaying by half every [`SPENDING_HALF_LIFE`]. A lease is
//!   that and one call more, in whole calls' holds (at most [`MAX_CALLS`]):
//!   about as long again of spending, so a small balance is never all
//!   moved to one host. A lease refused for want of credits caps the next
//!   ones at half its size for [`LeaseConfig::idle`]; a call the leases
//!   cannot cover falls back to a reservation of its own.
//! - **Refill ahead of need.** When what the leases can still admit falls
//!   below half of what the key spent lately (and it spent at least two
//!   calls' holds lately), a background task takes the next lease, holding
//!   the refill lock: at a steady rate the next lease is there before it is
//!   needed and no call waits for one; a call that does run out waits for
//!   that refill rather than reserving a lease of its own.
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
use crate::types::*;

use super::batch::Batch;

/// The most calls' holds one lease is sized for.
const MAX_CALLS: i64 = 1_024;

/// How fast a slot forgets what it spent: a lease holds about what its
/// account and key spent on this host over the last few of these.
const SPENDING_HALF_LIFE: Duration = Duration::from_secs(2);

/// A refill to run ahead of need: the slot's refill lock, taken, and the
/// lease's size.
struct Ahead {
    guard: tokio::sync::OwnedMutexGuard<()>,
    size: Credits,
}

impl Slot {
    /// Counts `amount` in what the slot spent lately, at `now`.
    fn spend(&mut self, amount: Credits, now: Timestamp) {
        self.recent = self.spent_lately(now) + amount.0 as f64;
        self.recent_at = self.recent_at.max(now);
    }

    /// What the slot spent lately, decayed to `now`.
    fn spent_lately(&self, now: Timestamp) -> f64 {
        let ms = now.0.saturating_sub(self.recent_at.0).max(0) as f64;
        let half_life = SPENDING_HALF_LIFE.as_millis() as f64;
        self.recent * 0.5f64.powf(ms / half_life)
    }

    /// What the next lease holds, in whole calls' holds of `amount` (a
    /// remainder no call fits would only wait to go back): what the slot
    /// spent lately and one call more (so that it lasts about as long
    /// again, and a small balance is not all moved to one host), at most
    /// [`MAX_CALLS`] calls, and at most half of a lease refused within
    /// `idle` (at least one call).
    fn size(&self, amount: Credits, now: Timestamp, idle: Duration) -> Credits {
        if amount.0 <= 0 {
            return amount;
        }
        let most = match self.short {
            Some((refused, at)) if now < at.plus(idle) => refused.0 / 2 / amount.0,
            _ => MAX_CALLS,
        }
        .max(1);
        // Rounded up; the float is within i64 once capped at `most`.
        let lately = (self.spent_lately(now) / amount.0 as f64)
            .ceil()
            .min(most as f64) as i64;
        Credits(amount.0.saturating_mul(lately.saturating_add(1).min(most)))
    }

    /// Whether a lease was refused within `idle` before `now`.
    fn is_short(&self, now: Timestamp, idle: Duration) -> bool {
        self.short.is_some_and(|(_, at)| now < at.plus(idle))
    }

    /// A refill to start now, ahead of need: due when what the slot's
    /// leases can still admit is below half of what it spent lately, and it
    /// spent at least two calls' `amount` lately (a trickle of calls takes
    /// leases as it goes instead). `None` when none is due, the slot is
    /// short, or a refill is under way.
    fn ahead(&mut self, amount: Credits, now: Timestamp, config: &LeaseConfig) -> Option<Ahead> {
        let lately = self.spent_lately(now);
        if self.is_short(now, config.idle) || amount.0 <= 0 || lately < 2.0 * amount.0 as f64 {
            return None;
        }
        let left: i64 = self
            .leases
            .iter()
            .filter(|l| l.admits(now, config.renew_after))
            .map(|l| l.spendable().0)
            .sum();
        if left as f64 >= lately / 2.0 {
            return None;
        }
        let guard = self.refill.clone().try_lock_owned().ok()?;
        Some(Ahead {
            guard,
            size: self.size(amount, now, config.idle),
        })
    }
}

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
    /// The holds of its calls lately, decaying by half every
    /// [`SPENDING_HALF_LIFE`] (credits; a sizing hint, not money).
    recent: f64,
    recent_at: Timestamp,
    /// The size of the last lease refused for want of credits, and when:
    /// for [`LeaseConfig::idle`] after, leases are at most half of it, and
    /// none is taken ahead of need. (Once the balance cannot cover one
    /// call's hold, each call costs the one refused reservation.)
    short: Option<(Credits, Timestamp)>,
    /// Taken while a lease is reserved, so that calls arriving together
    /// wait for one refill instead of each reserving its own.
    refill: Arc<tokio::sync::Mutex<()>>,
    last_used: Timestamp,
    /// The key's credit limit as the gateway last saw it (from the key
    /// cache; `None` until a call said it). A change retires the slot's
    /// leases: one taken under the old limit must not keep admitting calls.
    limit: Option<Option<Credits>>,
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
    pub(crate) async fn hold(
        self: &Arc<Self>,
        r: &Reservation,
        key_limit: Option<Credits>,
    ) -> Result<Option<RequestId>> {
        let slot = (r.user_id.clone(), r.key_id.clone());
        for gone in self.follow_limit(&slot, key_limit) {
            self.release(gone).await;
        }
        let refill = match self.take(&slot, r) {
            Ok((lease, ahead)) => {
                self.refill_ahead(&slot, r, ahead);
                return Ok(Some(lease));
            }
            Err(refill) => refill,
        };
        let guard = refill.lock().await;
        // Another call (or a refill ahead of need) may have refilled while
        // this one waited.
        let size = match self.take(&slot, r) {
            Ok((lease, ahead)) => {
                drop(guard);
                self.refill_ahead(&slot, r, ahead);
                return Ok(Some(lease));
            }
            Err(_) => self.next_size(&slot, r),
        };
        if size > Credits::ZERO {
            match self.take_lease(&slot, r, size, true).await {
                Ok(lease) => {
                    drop(guard);
                    let ahead = self.ahead(&slot, r);
                    self.refill_ahead(&slot, r, ahead);
                    return Ok(Some(lease));
                }
                // Less is left than the lease: this call alone may still fit.
                Err(e @ (Error::InsufficientCredits(_) | Error::KeyLimitReached(_)))
                    if size == r.amount =>
                {
                    return Err(e); // it was this call's own hold
                }
                Err(Error::InsufficientCredits(_) | Error::KeyLimitReached(_)) => {}
                Err(e) => return Err(e),
            }
        }
        drop(guard);
        self.store.reserve(r).await?;
        let now = self.clock.now();
        if let Some(s) = self.slots.lock().get_mut(&slot) {
            s.spend(r.amount, now);
        }
        Ok(None)
    }

    /// Reserves a lease of `size` for the slot of `r` (on its key and
    /// route) and keeps it, holding `r` from it when `with_call`. A refusal
    /// for want of credits marks the slot short ([`Slot::short`]).
    async fn take_lease(
        &self,
        slot: &(UserId, ApiKeyId),
        r: &Reservation,
        size: Credits,
        with_call: bool,
    ) -> Result<RequestId> {
        let lease = Reservation {
            request_id: crate::store_support::lease_id(),
            amount: size,
            created_at: self.clock.now(),
            ..r.clone()
        };
        let reserved = self.store.reserve(&lease).await;
        let mut slots = self.slots.lock();
        let s = slot_of(&mut slots, slot, lease.created_at, &self.store);
        match reserved {
            Ok(()) => {
                let id = lease.request_id.clone();
                if with_call {
                    s.spend(r.amount, lease.created_at);
                }
                s.leases.push(Lease {
                    remaining: lease.amount,
                    held: if with_call { r.amount } else { Credits::ZERO },
                    calls: usize::from(with_call),
                    retired: false,
                    r: lease,
                });
                Ok(id)
            }
            Err(e) => {
                if matches!(e, Error::InsufficientCredits(_) | Error::KeyLimitReached(_)) {
                    s.short = Some((size, lease.created_at));
                }
                Err(e)
            }
        }
    }

    /// Holds `r` from a lease in memory, or hands back the slot's refill
    /// lock when none covers it. With the lease, a refill to start ahead of
    /// need, if one is due ([`Slot::ahead`]).
    fn take(
        &self,
        slot: &(UserId, ApiKeyId),
        r: &Reservation,
    ) -> std::result::Result<(RequestId, Option<Ahead>), Arc<tokio::sync::Mutex<()>>> {
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
                let id = l.r.request_id.clone();
                s.spend(r.amount, now);
                Ok((id, s.ahead(r.amount, now, &self.config)))
            }
            None => Err(s.refill.clone()),
        }
    }

    /// A refill to start ahead of need for the slot of `r`, if one is due.
    fn ahead(&self, slot: &(UserId, ApiKeyId), r: &Reservation) -> Option<Ahead> {
        let now = self.clock.now();
        let mut slots = self.slots.lock();
        let s = slots.get_mut(slot)?;
        s.ahead(r.amount, now, &self.config)
    }

    /// What the next lease of the slot of `r` holds ([`Slot::size`]).
    fn next_size(&self, slot: &(UserId, ApiKeyId), r: &Reservation) -> Credits {
        let now = self.clock.now();
        let mut slots = self.slots.lock();
        slot_of(&mut slots, slot, now, &self.store).size(r.amount, now, self.config.idle)
    }

    /// Takes the next lease in the background, holding the slot's refill
    /// lock meanwhile: a call that finds no lease covering it waits for this
    /// refill rather than reserving one of its own.
    fn refill_ahead(
        self: &Arc<Self>,
        slot: &(UserId, ApiKeyId),
        r: &Reservation,
        ahead: Option<Ahead>,
    ) {
        let Some(Ahead { guard, size }) = ahead else {
            return;
        };
        let (me, slot, r) = (self.clone(), slot.clone(), r.clone());
        tokio::spawn(async move {
            let _guard = guard;
            // A refusal marks the slot short; calls then reserve as usual.
            if let Err(e) = me.take_lease(&slot, &r, size, false).await {
                tracing::debug!(error = %e, "taking a credit lease ahead of need failed");
            }
        });
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

    /// Notes the key's credit limit a call of `slot` was admitted under. A
    /// limit changed on another host reaches this one through its key cache
    /// (within [`BrokerConfig::key_cache_ttl`](crate::BrokerConfig::key_cache_ttl)),
    /// and then the slot's leases are retired as a change on this host
    /// retires them: the idle ones are returned, to be handed back, the
    /// busy ones go back once their calls are over, and the next lease is
    /// checked by the store against the new limit.
    fn follow_limit(&self, slot: &(UserId, ApiKeyId), limit: Option<Credits>) -> Vec<Reservation> {
        let mut slots = self.slots.lock();
        let Some(s) = slots.get_mut(slot) else {
            return Vec::new();
        };
        match s.limit.replace(limit) {
            Some(before) if before != limit => {
                let (idle, busy): (Vec<_>, Vec<_>) = s.leases.drain(..).partition(|l| l.calls == 0);
                s.leases = busy;
                for l in &mut s.leases {
                    l.retired = true;
                }
                idle.into_iter().map(|l| l.r).collect()
            }
            _ => Vec::new(),
        }
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
        recent: 0.0,
        recent_at: now,
        short: None,
        refill: Arc::default(),
        last_used: now,
        limit: None,
        batch: Batch::new(store.clone()),
    })
}
