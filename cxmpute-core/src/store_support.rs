//! Rules shared by every [`Store`](crate::store::Store) implementation, written
//! once so memory, SQLite and DynamoDB decide alike.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::types::*;

/// `Err(NotFound)` for an absent value: how a store answers a lookup or a
/// change of something it does not hold.
pub fn found<T>(v: Option<T>, what: impl FnOnce() -> String) -> Result<T> {
    v.ok_or_else(|| Error::NotFound(what()))
}

/// How every request id of a credit lease begins. A lease is a reservation
/// of its own (see the broker's admission), and the store tells it from a
/// call's by this prefix alone ([`is_lease`]): the broker names every request,
/// and no call's id starts so.
pub const LEASE_PREFIX: &str = "lease-";

/// A new, unique request id for a credit lease.
pub fn lease_id() -> RequestId {
    RequestId::new(format!("{LEASE_PREFIX}{}", RequestId::generate()))
}

/// Whether `id` names a credit lease rather than a call. Settling a lease
/// (handing it back, or the stale sweep taking it) returns what it still
/// holds to the balance and the key and is no request: it charges and
/// rewards nothing, stores no usage record, and is not counted among the
/// ledger's settlements ([`SettlePlan::records_usage`]). Since nothing of
/// it is kept, settling a lease that is no longer open is
/// [`SettleOutcome::AlreadySettled`] ([`not_open`]): leases are only ever
/// settled by the broker that took them and by the sweep.
pub fn is_lease(id: &RequestId) -> bool {
    id.as_str().starts_with(LEASE_PREFIX)
}

/// How a store answers [`settle`](crate::store::LedgerStore::settle) of a
/// request with no open reservation and no settlement: `NotFound`, except
/// for a lease, which was handed back or swept already ([`is_lease`]).
pub fn not_open(id: &RequestId) -> Result<SettleOutcome> {
    if is_lease(id) {
        return Ok(SettleOutcome::AlreadySettled);
    }
    Err(Error::NotFound(format!("reservation {id}")))
}

/// Checks a reservation against the user and key it names, without changing
/// anything: revoked key, suspended account, unpermitted route, balance, key limit.
pub fn check_reservation(user: &User, key: &ApiKey, r: &Reservation) -> Result<()> {
    check_spendable(user, key, r, user.credits, key.credits_left)
}

/// [`check_reservation`] against a balance and a key's credits left other
/// than the stored ones: what the broker's memory holds spendable once the
/// holds of the calls in flight are taken off (see
/// [`LedgerStore::owned_by_one_host`](crate::store::LedgerStore::owned_by_one_host)).
/// The same checks in the same order, with the same errors.
pub fn check_spendable(
    user: &User,
    key: &ApiKey,
    r: &Reservation,
    balance: Credits,
    key_left: Option<Credits>,
) -> Result<()> {
    if key.revoked_at.is_some() {
        return Err(Error::Unauthorized("API key revoked".into()));
    }
    if user.suspended.is_some() {
        return Err(Error::Forbidden("account suspended".into()));
    }
    if !key.permits(r.route) {
        return Err(Error::Forbidden(format!(
            "this API key may not call {}",
            r.route
        )));
    }
    if r.amount.is_negative() {
        return Err(Error::InvalidInput("negative reservation".into()));
    }
    if balance < r.amount {
        return Err(Error::InsufficientCredits(format!(
            "this request needs up to {} credits; the account has {}",
            r.amount, balance
        )));
    }
    if let Some(left) = key_left {
        if left < r.amount {
            return Err(Error::KeyLimitReached(format!(
                "this request needs up to {} credits; the key has {} left of its limit",
                r.amount, left
            )));
        }
    }
    Ok(())
}

/// Takes reservation `r` from the user and key it names, found in `users`
/// and `keys`: the key must be the user's (else `Unauthorized("unknown API
/// key")`) and the user must exist (else `Unauthorized("unknown account")`);
/// then [`check_reservation`], and on success the amount comes off the
/// balance and the key's `credits_left`, and the key is marked used. A
/// refusal changes nothing.
pub fn apply_reservation(
    users: &mut HashMap<UserId, User>,
    keys: &mut HashMap<ApiKeyId, ApiKey>,
    r: &Reservation,
) -> Result<()> {
    let key = keys
        .get_mut(&r.key_id)
        .filter(|k| k.user_id == r.user_id)
        .ok_or_else(|| Error::Unauthorized("unknown API key".into()))?;
    let user = users
        .get_mut(&r.user_id)
        .ok_or_else(|| Error::Unauthorized("unknown account".into()))?;
    check_reservation(user, key, r)?;
    user.credits = user.credits.saturating_sub(r.amount);
    if let Some(left) = key.credits_left.as_mut() {
        *left = left.saturating_sub(r.amount);
    }
    key.last_used_at = Some(r.created_at);
    Ok(())
}

/// What a settlement does to balances, computed from its reservation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettlePlan {
    /// Returned to the user and the key: `reserved - charged`.
    pub refund: Credits,
    /// Credited to the provider: clamped to `0..=charged`, so the platform never
    /// pays out more for a request than the user paid for it.
    pub reward: Option<(ProviderId, Credits)>,
    /// The usage record to store, with the final charge and reward filled in:
    /// `usage.charged` is what the user pays, the settlement's charge clamped
    /// to `0..=reserved`.
    pub usage: UsageRecord,
}

/// What one settlement adds to the ledger's running totals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LedgerDelta {
    /// Settlements applied: one.
    pub settlements: u64,
    /// Added to the total charged.
    pub charged: Credits,
    /// Added to the total rewarded.
    pub rewarded: Credits,
    /// Added to the total reserved: minus the reservation settled.
    pub reserved: Credits,
}

impl LedgerDelta {
    /// Adds this delta to the running totals `t` (credit sums saturate, as
    /// every balance does).
    pub fn add_to(&self, t: &mut LedgerTotals) {
        t.settlements += self.settlements;
        t.charged = t.charged.saturating_add(self.charged);
        t.rewarded = t.rewarded.saturating_add(self.rewarded);
        t.reserved = t.reserved.saturating_add(self.reserved);
    }
}

impl SettlePlan {
    /// The plan for settling `st` against reservation `r`.
    /// A lease ([`is_lease`]) is charged nothing and rewards nothing: its
    /// calls were charged against it as they settled.
    pub fn new(r: &Reservation, st: &Settlement) -> Self {
        let most = if is_lease(&r.request_id) {
            0
        } else {
            r.amount.0.max(0)
        };
        let charged = Credits(st.charged.0.clamp(0, most));
        let refund = r.amount.saturating_sub(charged);
        let reward = st
            .reward
            .as_ref()
            .map(|(p, a)| (p.clone(), Credits(a.0.clamp(0, charged.0))))
            .filter(|(_, a)| a.0 > 0);
        let u = &st.usage;
        // Field by field rather than a clone then overwritten: the ids
        // replaced would be copied for nothing, on every call's settlement.
        let usage = UsageRecord {
            // Who paid and through which key and route are the
            // reservation's, whatever the caller put in the record.
            request_id: st.request_id.clone(),
            user_id: r.user_id.clone(),
            key_id: r.key_id.clone(),
            route: r.route,
            model: u.model.clone(),
            provision_id: u.provision_id.clone(),
            provider_id: u.provider_id.clone(),
            input_tokens: u.input_tokens,
            output_tokens: u.output_tokens,
            units: u.units,
            success: u.success,
            latency_ms: u.latency_ms,
            app: u.app.clone(),
            at: u.at,
            charged,
            reward: reward.as_ref().map(|r| r.1).unwrap_or_default(),
            requested_model: u.requested_model.clone(),
            cache_hit: u.cache_hit,
        };
        SettlePlan {
            refund,
            reward,
            usage,
        }
    }

    /// Gives the refund back to the user and the key that reserved, where
    /// they still exist: to the balance, and to the key's `credits_left`
    /// under [`refunded_credits_left`].
    pub fn refund_to(&self, user: Option<&mut User>, key: Option<&mut ApiKey>) {
        if let Some(u) = user {
            u.credits = u.credits.saturating_add(self.refund);
        }
        if let Some(k) = key {
            k.credits_left = refunded_credits_left(k.credit_limit, k.credits_left, self.refund);
        }
    }

    /// The plan for settling `st`, a call whose hold `hold` lived in the
    /// broker's memory and was never reserved in the store
    /// ([`LedgerStore::settle_held`](crate::store::LedgerStore::settle_held)):
    /// the same charge, reward and usage record as [`SettlePlan::new`].
    /// `InvalidInput` when the two name different requests.
    pub fn for_held(hold: &Reservation, st: &Settlement) -> Result<Self> {
        if hold.request_id != st.request_id {
            return Err(Error::InvalidInput(format!(
                "settlement {} for the hold of {}",
                st.request_id, hold.request_id
            )));
        }
        Ok(Self::new(hold, st))
    }

    /// Charges a settled call whose hold lived in the broker's memory to
    /// the user and the key that held, where they still exist: the charge
    /// comes off the balance (which is not floored: the broker checked the
    /// hold against it, and an answered call is a charged call) and off the
    /// key's `credits_left` under [`charged_credits_left`], and the key is
    /// marked used at the hold's time, as a reservation marks it.
    pub fn charge_to(&self, hold: &Reservation, user: Option<&mut User>, key: Option<&mut ApiKey>) {
        let charged = self.usage.charged;
        if let Some(u) = user {
            u.credits = u.credits.saturating_sub(charged);
        }
        if let Some(k) = key {
            k.credits_left = charged_credits_left(k.credits_left, charged);
            k.last_used_at = Some(hold.created_at);
        }
    }

    /// The plan for settling `st`, a call admitted from `lease` (a
    /// reservation that moved part of an account's balance and key limit to
    /// one host) which still holds `remaining`
    /// ([`LedgerStore::settle_leased`](crate::store::LedgerStore::settle_leased)):
    /// the charge is cut to the call's hold and to what the lease still
    /// holds, the reward to the charge. `InvalidInput` when `hold` and `st`
    /// name different requests or `hold` is not the lease's user and key.
    pub fn for_leased(
        lease: &Reservation,
        remaining: Credits,
        hold: &Reservation,
        st: &Settlement,
    ) -> Result<Self> {
        if hold.user_id != lease.user_id || hold.key_id != lease.key_id {
            return Err(Error::InvalidInput(format!(
                "call {} is not of the user and key of lease {}",
                hold.request_id, lease.request_id
            )));
        }
        let mut capped = hold.clone();
        capped.amount = Credits(hold.amount.0.min(remaining.0).max(0));
        Self::for_held(&capped, st)
    }

    /// The plans of a batch of calls held in the broker's memory
    /// ([`LedgerStore::settle_held`](crate::store::LedgerStore::settle_held)),
    /// for a store that applies a batch at once: every refusal comes first
    /// (a settlement that does not match its hold, or an id `is_open` says is
    /// a reservation in the store), then `None` for a call settled before
    /// (`is_settled`, or earlier in the batch).
    pub fn for_held_batch(
        calls: &[(Reservation, Settlement)],
        is_open: impl Fn(&RequestId) -> bool,
        is_settled: impl Fn(&RequestId) -> bool,
    ) -> Result<Vec<Option<Self>>> {
        let mut plans = Vec::with_capacity(calls.len());
        for (hold, st) in calls {
            plans.push(Self::for_held(hold, st)?);
            if is_open(&st.request_id) {
                return Err(Error::AlreadyExists(format!(
                    "reservation {}",
                    st.request_id
                )));
            }
        }
        let mut seen = std::collections::HashSet::new();
        Ok(calls
            .iter()
            .zip(plans)
            .map(|((_, st), plan)| {
                (!is_settled(&st.request_id) && seen.insert(&st.request_id)).then_some(plan)
            })
            .collect())
    }

    /// The plans of a batch of calls settled against `lease`
    /// ([`LedgerStore::settle_leased`](crate::store::LedgerStore::settle_leased)),
    /// for a store that applies a batch at once: every refusal comes first
    /// (a call not of the lease's user and key, or whose id `is_open` says is
    /// a reservation of its own), then each call is planned against what the
    /// lease still holds after those before it. `None` for a call settled
    /// before (`is_settled`, or earlier in the batch). Also returns what the
    /// lease holds after the batch.
    pub fn for_leased_batch(
        lease: &Reservation,
        calls: &[(Reservation, Settlement)],
        is_open: impl Fn(&RequestId) -> bool,
        is_settled: impl Fn(&RequestId) -> bool,
    ) -> Result<(Vec<Option<Self>>, Credits)> {
        for (hold, st) in calls {
            Self::for_leased(lease, Credits::ZERO, hold, st)?;
            if is_open(&st.request_id) {
                return Err(Error::AlreadyExists(format!(
                    "reservation {}",
                    st.request_id
                )));
            }
        }
        let mut remaining = lease.amount;
        let mut seen = std::collections::HashSet::new();
        let mut plans = Vec::with_capacity(calls.len());
        for (hold, st) in calls {
            if is_settled(&st.request_id) || !seen.insert(&st.request_id) {
                plans.push(None);
                continue;
            }
            let plan = Self::for_leased(lease, remaining, hold, st)?;
            remaining = remaining.saturating_sub(plan.usage.charged);
            plans.push(Some(plan));
        }
        Ok((plans, remaining))
    }

    /// What settling a call against a lease adds to the ledger: the charge
    /// and reward recorded, and the charge no longer held by the lease.
    pub fn leased_ledger_delta(&self) -> LedgerDelta {
        LedgerDelta {
            settlements: 1,
            charged: self.usage.charged,
            rewarded: self.usage.reward,
            reserved: Credits(self.usage.charged.0.saturating_neg()),
        }
    }

    /// What settling a call held in the broker's memory adds to the ledger:
    /// the charge and reward recorded; nothing was held in the store.
    pub fn held_ledger_delta(&self) -> LedgerDelta {
        LedgerDelta {
            settlements: 1,
            charged: self.usage.charged,
            rewarded: self.usage.reward,
            reserved: Credits::ZERO,
        }
    }

    /// Whether this settlement stores its usage record and counts among
    /// the ledger's settlements: every one but a lease's ([`is_lease`]).
    pub fn records_usage(&self) -> bool {
        !is_lease(&self.usage.request_id)
    }

    /// What this settlement adds to the ledger: the charge and reward
    /// recorded, and the whole reservation (charged plus refunded) no longer
    /// held. A lease's is not counted as a settlement.
    pub fn ledger_delta(&self) -> LedgerDelta {
        let released = self.usage.charged.saturating_add(self.refund);
        LedgerDelta {
            settlements: u64::from(self.records_usage()),
            charged: self.usage.charged,
            rewarded: self.usage.reward,
            reserved: Credits(released.0.saturating_neg()),
        }
    }
}

/// A balance after a grant of `amount` (negative: a removal); a removal of
/// more than the balance holds is refused.
pub fn granted_balance(balance: Credits, amount: Credits) -> Result<Credits> {
    let next = balance.saturating_add(amount);
    if next.is_negative() {
        return Err(Error::InsufficientCredits(format!(
            "cannot remove {} from a balance of {}",
            Credits(amount.0.saturating_neg()),
            balance
        )));
    }
    Ok(next)
}

/// Refuses a provision update that ends the provision yet gives it pool
/// entries: an ended provision serves nothing.
pub fn check_provision_update(state: ProvisionState, entries: &[PoolEntry]) -> Result<()> {
    if state == ProvisionState::Ended && !entries.is_empty() {
        return Err(Error::InvalidInput(
            "an ended provision serves nothing".into(),
        ));
    }
    Ok(())
}

/// The settlement that releases a reservation whose request never finished.
pub fn release_settlement(r: &Reservation, at: Timestamp) -> Settlement {
    Settlement {
        request_id: r.request_id.clone(),
        charged: Credits::ZERO,
        reward: None,
        usage: UsageRecord {
            request_id: r.request_id.clone(),
            user_id: r.user_id.clone(),
            key_id: r.key_id.clone(),
            route: r.route,
            model: String::new(),
            provision_id: None,
            provider_id: None,
            input_tokens: 0,
            output_tokens: 0,
            units: 0,
            success: false,
            latency_ms: u64::try_from(at.0.saturating_sub(r.created_at.0)).unwrap_or(0),
            app: None,
            at,
            charged: Credits::ZERO,
            reward: Credits::ZERO,
            requested_model: None,
            cache_hit: false,
        },
    }
}

/// `k` with `u` applied: each field `u` names replaced, and
/// `credits_left` moved with the limit ([`moved_credits_left`]). For a store
/// that reads the key, changes it and writes it back whole.
pub fn apply_key_update(k: &mut ApiKey, u: &ApiKeyUpdate) {
    if let Some(name) = &u.name {
        k.name = name.clone();
    }
    if let Some(limit) = u.credit_limit {
        k.credits_left = moved_credits_left(k.credit_limit, k.credits_left, limit);
        k.credit_limit = limit;
    }
    if let Some(routes) = &u.permitted_routes {
        k.permitted_routes = routes.clone();
    }
    if let Some(rpm) = u.rpm {
        k.rate_limits.rpm = rpm;
    }
    if let Some(tpm) = u.tpm {
        k.rate_limits.tpm = tpm;
    }
    if let Some(budget) = u.budget {
        k.budget = budget;
    }
    if let Some(ttl) = u.cache_ttl_secs {
        k.cache.ttl_secs = ttl;
    }
    if let Some(shared) = u.cache_shared {
        k.cache.shared = shared;
    }
}

/// A key's `credits_left` after its limit changes from `old_limit` to
/// `new_limit`: it moves by the same amount, never below zero; no limit, nothing left to track.
pub fn moved_credits_left(
    old_limit: Option<Credits>,
    old_left: Option<Credits>,
    new_limit: Option<Credits>,
) -> Option<Credits> {
    let new_limit = new_limit?;
    let spent = match (old_limit, old_left) {
        (Some(l), Some(left)) => l.saturating_sub(left),
        _ => Credits::ZERO,
    };
    Some(Credits(new_limit.saturating_sub(spent).0.max(0)))
}

/// A key's `credits_left` once `refund` of a reservation comes back to it:
/// never above the key's limit, because the limit may have been set or
/// lowered while the request was in flight (the moved `credits_left` already
/// accounts for that); no limit, nothing to track.
pub fn refunded_credits_left(
    limit: Option<Credits>,
    left: Option<Credits>,
    refund: Credits,
) -> Option<Credits> {
    let (limit, left) = (limit?, left?);
    Some(left.saturating_add(refund).min(limit))
}

/// A key's `credits_left` once `charged` comes off it: never below zero (its
/// limit may have been lowered while the call was in flight, under what the
/// call held); no limit, nothing to track.
pub fn charged_credits_left(left: Option<Credits>, charged: Credits) -> Option<Credits> {
    left.map(|l| Credits(l.saturating_sub(charged).0.max(0)))
}
