//! Credit grants, reservations, settlements, the ledger and usage records:
//! the hot path.
//!
//! `reserve` is one `TransactWriteItems` whose conditions are the whole
//! admission rule (balance, suspension, key owner, revocation, routes, key
//! limit, request id unused); `settle` is one more, conditioned on the
//! reservation still being open with the values it was computed from. Reads
//! happen only to explain a refusal precisely or when a settlement arrives at
//! a process that did not take the reservation.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use aws_sdk_dynamodb::types::AttributeValue;
use cxmpute_core::store_support::{
    check_reservation, granted_balance, not_open, release_settlement, LedgerDelta, SettlePlan,
};
use cxmpute_core::{
    ApiKeyId, CreditGrant, Credits, Error, KeyHash, LedgerStore, LedgerTotals, ProviderId,
    ProvisionId, RequestId, Reservation, Result, SettleOutcome, Settlement, Timestamp, UsageRecord,
    UserId, UserStore,
};

use crate::db::{DynamoStore, Fail, Held, Query, Tx, MAX_TX_ITEMS};
use crate::item::{n, s, sortable_i64, Ex, Item, ItemBuilder, Rd, PK};
use crate::schema::{self, GSI, GSI_PK, GSI_SK};
use crate::users::{decode_key, decode_user};

fn decode_grant(it: &Item) -> Result<CreditGrant> {
    let r = Rd::new(it, "credit grant");
    Ok(CreditGrant {
        user_id: UserId::new(r.s("user_id")?),
        amount: Credits(r.num("amount")?),
        by: r.s("by")?,
        reason: r.s("reason")?,
        at: Timestamp(r.num("at")?),
    })
}

/// A number that only grows within this process, seeded from the wall clock
/// in nanoseconds: it orders grants made in the same millisecond the way
/// they were made (the grant's own time comes first in the sort key).
fn next_seq() -> u64 {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or_default();
    let prev = SEQ
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |p| {
            Some(p.saturating_add(1).max(now))
        })
        .unwrap_or_default();
    prev.saturating_add(1).max(now)
}

const RESERVED: &str = "reserved";

/// The indexes of `calls` to apply: the first of each request id. A repeat
/// inside the list is marked `AlreadySettled` in `out`.
fn first_of_each(calls: &[(Reservation, Settlement)], out: &mut [SettleOutcome]) -> Vec<usize> {
    let mut seen = HashSet::new();
    let mut pending = Vec::with_capacity(calls.len());
    for (i, (_, st)) in calls.iter().enumerate() {
        if seen.insert(&st.request_id) {
            pending.push(i);
        } else {
            out[i] = SettleOutcome::AlreadySettled;
        }
    }
    pending
}

/// How many of `calls` (at least one) one transaction takes under
/// DynamoDB's cap on its items: two each (the request and its usage
/// record), one per distinct item they share (`shared`: an account, a key,
/// a provider, by any name unique to it), and `fixed` more.
fn fitting<T>(calls: &[T], fixed: usize, shared: impl Fn(&T) -> Vec<String>) -> usize {
    let mut distinct = HashSet::new();
    let mut n = 0;
    for c in calls {
        distinct.extend(shared(c));
        if n > 0 && fixed + 2 * (n + 1) + distinct.len() > MAX_TX_ITEMS {
            break;
        }
        n += 1;
    }
    n
}

/// How a settlement gives a refund back to the key.
///
/// A key's `credits_left` never exceeds its limit, and the limit may have
/// been lowered (or set) while the request was in flight. DynamoDB has no
/// `min` in update expressions, so the key item also keeps `spent`
/// (= limit - left), and each variant is guarded by the condition under
/// which it is the right one: the usual `Add` is tried first, and a refusal
/// of the key's condition says to read the key and pick another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyRefund {
    /// Unlimited key, or the refund fits under the limit: add it.
    Add,
    /// The refund would pass the limit: left = limit, nothing spent.
    Cap,
    /// A key tracking what is left without any limit stops tracking it.
    Drop,
}

impl KeyRefund {
    /// The update, its guard and their names and values.
    fn expression(self, refund: Credits) -> (String, String, Ex) {
        // Each variant names only what it uses: DynamoDB refuses names and
        // values an expression does not mention.
        let mut ex = Ex::new();
        let (limited, limit) = (ex.n("limited"), ex.n("credit_limit"));
        let (upd, cond) = match self {
            KeyRefund::Add => {
                let (left, spent) = (ex.n("credits_left"), ex.n("spent"));
                let r = ex.v(n(refund.0));
                let f = ex.v(AttributeValue::Bool(false));
                let back = ex.v(n(refund.0.saturating_neg()));
                (
                    format!("ADD {left} {r}, {spent} {back}"),
                    format!("{limited} = {f} OR (attribute_exists({limit}) AND {spent} >= {r})"),
                )
            }
            KeyRefund::Cap => {
                let (left, spent) = (ex.n("credits_left"), ex.n("spent"));
                let r = ex.v(n(refund.0));
                let t = ex.v(AttributeValue::Bool(true));
                let zero = ex.v(n(0));
                (
                    format!("SET {left} = {limit}, {spent} = {zero}"),
                    format!("{limited} = {t} AND attribute_exists({limit}) AND {spent} < {r}"),
                )
            }
            KeyRefund::Drop => {
                let t = ex.v(AttributeValue::Bool(true));
                let f = ex.v(AttributeValue::Bool(false));
                (
                    format!("SET {limited} = {f}"),
                    format!("{limited} = {t} AND attribute_not_exists({limit})"),
                )
            }
        };
        (upd, cond, ex)
    }
}

/// How a held call's charge comes off the key's `credits_left`: never below
/// zero, since the limit may have been lowered under what the call held.
/// DynamoDB has no `max` in update expressions, so each variant is guarded
/// by the condition under which it is the right one, the usual `Subtract`
/// first; a refusal of the key's condition says to read it and pick again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyCharge {
    /// Unlimited key, or the charge fits in what is left: subtract it.
    Subtract,
    /// The charge is more than is left: nothing left, the whole limit spent.
    Floor,
}

impl KeyCharge {
    /// The update (which also marks the key used at `used_at`), its guard
    /// and their names and values.
    fn expression(self, charged: Credits, used_at: Timestamp) -> (String, String, Ex) {
        let mut ex = Ex::new();
        let (limited, left, spent) = (ex.n("limited"), ex.n("credits_left"), ex.n("spent"));
        let used = format!("{} = {}", ex.n("last_used_at"), ex.v(n(used_at.0)));
        let c = ex.v(n(charged.0));
        match self {
            KeyCharge::Subtract => {
                let back = ex.v(n(charged.0.saturating_neg()));
                let f = ex.v(AttributeValue::Bool(false));
                (
                    format!("ADD {left} {back}, {spent} {c} SET {used}"),
                    format!("{limited} = {f} OR {left} >= {c}"),
                    ex,
                )
            }
            KeyCharge::Floor => {
                let zero = ex.v(n(0));
                let t = ex.v(AttributeValue::Bool(true));
                let limit = ex.n("credit_limit");
                (
                    format!(
                        "SET {left} = {zero}, {spent} = if_not_exists({limit}, {zero}), {used}"
                    ),
                    format!("{limited} = {t} AND {left} < {c}"),
                    ex,
                )
            }
        }
    }
}

const SETTLED: &str = "settled";

/// What the request item says.
enum Req {
    Missing,
    Settled(Item),
    Open(Held),
}

fn decode_req(it: Item) -> Result<Req> {
    let r = Rd::new(&it, "request");
    if r.s("status")? == SETTLED {
        return Ok(Req::Settled(it));
    }
    Ok(Req::Open(Held {
        r: Reservation {
            request_id: RequestId::new(r.s("request_id")?),
            user_id: UserId::new(r.s("user_id")?),
            key_id: ApiKeyId::new(r.s("key_id")?),
            route: r.parse("route")?,
            amount: Credits(r.num("amount")?),
            created_at: Timestamp(r.num("created_at")?),
        },
        key_hash: r.hash("key_hash")?,
        shard: r.num("shard")?,
    }))
}

fn usage_sk(u: &UsageRecord) -> String {
    // Newest first is a descending query; ties on time fall back to the request id.
    format!("USAGE#{}#{}", sortable_i64(u.at.0), u.request_id)
}

fn usage_item(u: &UsageRecord) -> Item {
    ItemBuilder::new(schema::user_pk(&u.user_id), usage_sk(u))
        .s("request_id", u.request_id.as_str())
        .s("user_id", u.user_id.as_str())
        .s("key_id", u.key_id.as_str())
        .s("route", u.route.path())
        .s("model", &u.model)
        .opt_s("provision_id", u.provision_id.as_ref().map(|p| p.as_str()))
        .opt_s("provider_id", u.provider_id.as_ref().map(|p| p.as_str()))
        .n("input_tokens", u.input_tokens)
        .n("output_tokens", u.output_tokens)
        .n("units", u.units)
        .b("success", u.success)
        .n("latency_ms", u.latency_ms)
        .opt_s("app", u.app.clone())
        .n("at", u.at.0)
        .n("charged", u.charged.0)
        .n("reward", u.reward.0)
        .opt_s("requested_model", u.requested_model.clone())
        .b("cache_hit", u.cache_hit)
        .build()
}

fn decode_usage(it: &Item) -> Result<UsageRecord> {
    let r = Rd::new(it, "usage record");
    Ok(UsageRecord {
        request_id: RequestId::new(r.s("request_id")?),
        user_id: UserId::new(r.s("user_id")?),
        key_id: ApiKeyId::new(r.s("key_id")?),
        route: r.parse("route")?,
        model: r.s("model")?,
        provision_id: r.opt_s("provision_id")?.map(ProvisionId::new),
        provider_id: r.opt_s("provider_id")?.map(ProviderId::new),
        input_tokens: r.num("input_tokens")?,
        output_tokens: r.num("output_tokens")?,
        units: r.num("units")?,
        success: r.b("success")?,
        latency_ms: r.num("latency_ms")?,
        app: r.opt_s("app")?,
        at: Timestamp(r.num("at")?),
        charged: Credits(r.num("charged")?),
        reward: Credits(r.num("reward")?),
        requested_model: r.opt_s("requested_model")?,
        cache_hit: r.b("cache_hit")?,
    })
}

#[async_trait]
impl LedgerStore for DynamoStore {
    // ---- grants -------------------------------------------------------------

    async fn grant_credits(&self, g: &CreditGrant) -> Result<Credits> {
        let what = "granting credits";
        let grant = ItemBuilder::new(
            schema::user_pk(&g.user_id),
            format!("GRANT#{}#{:020}", sortable_i64(g.at.0), next_seq()),
        )
        .s("user_id", g.user_id.as_str())
        .n("amount", g.amount.0)
        .s("by", &g.by)
        .s("reason", &g.reason)
        .n("at", g.at.0)
        .build();
        let mut attempt = 0;
        loop {
            let mut tx = Tx::new(self);
            let mut ex = Ex::new();
            let mut cond = ex.exists();
            if g.amount.is_negative() {
                // The balance never goes below zero: the condition is the guard.
                let need = ex.v(n(g.amount.0.saturating_neg()));
                cond = format!("{cond} AND {} >= {need}", ex.n("credits"));
            }
            let upd = format!("ADD {} {}", ex.n("credits"), ex.v(n(g.amount.0)));
            tx.update(schema::user(&g.user_id), upd, Some(cond), ex)?;
            tx.put(grant.clone(), None, Ex::new())?;
            match self.transact(what, tx).await {
                Ok(()) => break,
                Err(Fail::Condition(_)) => {
                    let u = self.user(&g.user_id).await?;
                    granted_balance(u.credits, g.amount)?;
                    // The balance moved between the failed write and the read: again.
                    self.again(&mut attempt, what).await?;
                }
                Err(f) => return Err(f.into_error(what)),
            }
        }
        // A transaction returns no values, so the balance is read after it:
        // exact unless a reservation on the same account landed in between.
        Ok(self.user(&g.user_id).await?.credits)
    }

    async fn credit_grants(&self, user: &UserId) -> Result<Vec<CreditGrant>> {
        let q = Query::prefix(schema::user_pk(user), "GRANT#");
        self.query("reading credit grants", q)
            .await?
            .iter()
            .map(decode_grant)
            .collect()
    }

    // ---- reservations and settlements ---------------------------------------

    async fn reserve(&self, r: &Reservation) -> Result<()> {
        let what = "reserving credits";
        let owner = self.key_owner(&r.key_id).await?;
        let key_hash = owner.as_ref().map(|(_, h)| *h);
        let usable = owner.as_ref().is_some_and(|(u, _)| *u == r.user_id);
        if r.amount.is_negative() || !usable {
            // Never reaches a write: the checks name the first problem in the
            // same order every store uses (a negative amount comes late in it).
            self.explain_refusal(r, key_hash).await?;
            return Err(if usable {
                Error::InvalidInput("negative reservation".into())
            } else {
                Error::Unauthorized("unknown API key".into())
            });
        }
        let Some(key_hash) = key_hash else {
            return Err(Error::Unauthorized("unknown API key".into()));
        };
        let shard = schema::shard_of(&r.request_id, self.cfg.ledger_shards);
        let amount = n(r.amount.0);
        let mut attempt = 0;
        loop {
            let mut tx = Tx::new(self);

            // The account: there, not suspended, able to pay.
            let mut ex = Ex::new();
            let credits = ex.n("credits");
            let amt = ex.v(amount.clone());
            let cond = format!(
                "{} AND attribute_not_exists({}) AND {credits} >= {amt}",
                ex.exists(),
                ex.n("suspended")
            );
            let upd = format!("ADD {credits} {}", ex.v(n(r.amount.0.saturating_neg())));
            tx.update(schema::user(&r.user_id), upd, Some(cond), ex)?;

            // The key: the user's, not revoked, allowed on this route, within its limit.
            let mut ex = Ex::new();
            let (left, routes) = (ex.n("credits_left"), ex.n("routes"));
            let amt = ex.v(amount.clone());
            let cond = format!(
                "{} = {} AND attribute_not_exists({}) \
                 AND (size({routes}) = {} OR contains({routes}, {})) \
                 AND ({} = {} OR {left} >= {amt})",
                ex.n("user_id"),
                ex.v(s(r.user_id.as_str())),
                ex.n("revoked_at"),
                ex.v(n(0)),
                ex.v(s(r.route.path())),
                ex.n("limited"),
                ex.v(AttributeValue::Bool(false)),
            );
            let upd = format!(
                "ADD {left} {}, {} {amt} SET {} = {}",
                ex.v(n(r.amount.0.saturating_neg())),
                ex.n("spent"),
                ex.n("last_used_at"),
                ex.v(n(r.created_at.0))
            );
            tx.update(schema::api_key(&key_hash), upd, Some(cond), ex)?;

            // The request: never reserved before (settled ones included). While
            // open it sits in the sparse index by age, for the stale sweep.
            let mut ex = Ex::new();
            let cond = ex.absent();
            let req = ItemBuilder::at(schema::request(&r.request_id))
                .s("status", RESERVED)
                .s("request_id", r.request_id.as_str())
                .s("user_id", r.user_id.as_str())
                .s("key_id", r.key_id.as_str())
                .s("key_hash", key_hash.to_hex())
                .s("route", r.route.path())
                .n("amount", r.amount.0)
                .n("created_at", r.created_at.0)
                .n("shard", shard)
                .s(GSI_PK, schema::open_pk(shard))
                .s(
                    GSI_SK,
                    format!("{}#{}", sortable_i64(r.created_at.0), r.request_id),
                )
                .build();
            tx.put(req, Some(cond), ex)?;

            let mut ex = Ex::new();
            let upd = format!("ADD {} {}", ex.n("reserved"), ex.v(amount.clone()));
            tx.update(schema::ledger(shard), upd, None, ex)?;

            match self.transact(what, tx).await {
                Ok(()) => {
                    self.hold(Held {
                        r: r.clone(),
                        key_hash,
                        shard,
                    });
                    return Ok(());
                }
                Err(Fail::Condition(_)) => {
                    self.explain_refusal(r, Some(key_hash)).await?;
                    // Every check passes now: what failed changed since. Again.
                    self.again(&mut attempt, what).await?;
                }
                Err(f) => return Err(f.into_error(what)),
            }
        }
    }

    async fn settle(&self, st: &Settlement) -> Result<SettleOutcome> {
        let held = self.unhold(&st.request_id);
        self.settle_from(held, st).await
    }

    async fn settle_held(&self, calls: &[(Reservation, Settlement)]) -> Result<Vec<SettleOutcome>> {
        let what = "settling held calls";
        let mut plans = Vec::with_capacity(calls.len());
        let mut hashes: HashMap<&ApiKeyId, Option<KeyHash>> = HashMap::new();
        for (hold, st) in calls {
            plans.push(SettlePlan::for_held(hold, st)?);
            if !hashes.contains_key(&hold.key_id) {
                let owner = self.key_owner(&hold.key_id).await?;
                hashes.insert(&hold.key_id, owner.map(|(_, h)| h));
            }
        }
        let mut out = vec![SettleOutcome::Applied; calls.len()];
        let mut pending = first_of_each(calls, &mut out);
        let mut key_charges: HashMap<KeyHash, KeyCharge> = HashMap::new();
        let mut missing_providers = HashSet::new();
        let mut attempt = 0;
        while !pending.is_empty() {
            // One transaction: as many calls as fit, their sums written once
            // per account, key and provider (`fitting`).
            let taken = fitting(&pending, 1, |&i| {
                let (hold, _) = &calls[i];
                let plan = &plans[i];
                let mut shared = Vec::new();
                if hashes[&hold.key_id].is_some() {
                    shared.push(format!("K{}", hold.key_id));
                }
                if plan.usage.charged.0 > 0 {
                    shared.push(format!("U{}", hold.user_id));
                }
                if let Some((pid, _)) = &plan.reward {
                    shared.push(format!("P{pid}"));
                }
                shared
            });
            let chunk = &pending[..taken];
            let shard = schema::shard_of(&calls[chunk[0]].0.request_id, self.cfg.ledger_shards);
            let mut tx = Tx::new(self);
            let mut users: HashMap<&UserId, i64> = HashMap::new();
            let mut keys: HashMap<KeyHash, (i64, Timestamp)> = HashMap::new();
            let mut rewards: HashMap<&ProviderId, i64> = HashMap::new();
            let mut delta = LedgerTotals::default();
            let mut req_is = Vec::with_capacity(chunk.len());
            for &i in chunk {
                let (hold, _) = &calls[i];
                let plan = &plans[i];
                let charged = plan.usage.charged.0;
                // The request: never seen before, written settled at once
                // (it was never open, so it never enters the index of open
                // ones).
                let mut ex = Ex::new();
                let cond = ex.absent();
                let req = settled_request(hold, shard, &plan.usage).build();
                req_is.push((i, tx.put(req, Some(cond), ex)?));
                let mut ex = Ex::new();
                let cond = ex.absent();
                tx.put(usage_item(&plan.usage), Some(cond), ex)?;
                *users.entry(&hold.user_id).or_default() += charged;
                if let Some(h) = hashes[&hold.key_id] {
                    let k = keys.entry(h).or_insert((0, hold.created_at));
                    // Marked used by its last call, as one by one.
                    *k = (k.0 + charged, hold.created_at);
                }
                if let Some((pid, amount)) = &plan.reward {
                    *rewards.entry(pid).or_default() += amount.0;
                }
                plan.held_ledger_delta().add_to(&mut delta);
            }

            // The charges, off each account (users are never deleted, so a
            // plain ADD is safe) and off each key, never below zero there.
            for (user, charged) in &users {
                if *charged > 0 {
                    let mut ex = Ex::new();
                    let upd = format!(
                        "ADD {} {}",
                        ex.n("credits"),
                        ex.v(n(charged.saturating_neg()))
                    );
                    tx.update(schema::user(user), upd, None, ex)?;
                }
            }
            let mut key_is = Vec::with_capacity(keys.len());
            for (h, (charged, used_at)) in &keys {
                let charge = key_charges.get(h).copied().unwrap_or(KeyCharge::Subtract);
                let (upd, cond, ex) = charge.expression(Credits(*charged), *used_at);
                key_is.push((
                    *h,
                    *charged,
                    tx.update(schema::api_key(h), upd, Some(cond), ex)?,
                ));
            }

            // The rewards, to providers that exist (see `settle_from`).
            let mut provider_is = Vec::new();
            for (pid, amount) in &rewards {
                if missing_providers.contains(*pid) {
                    continue;
                }
                let mut ex = Ex::new();
                let cond = ex.exists();
                let upd = format!("ADD {} {}", ex.n("earnings"), ex.v(n(*amount)));
                provider_is.push((*pid, tx.update(schema::provider(pid), upd, Some(cond), ex)?));
            }

            add_totals_to_ledger(&mut tx, shard, &delta)?;

            let flags = match self.transact(what, tx).await {
                Ok(()) => {
                    pending.drain(..taken);
                    continue;
                }
                Err(Fail::Condition(flags)) => flags,
                Err(f) => return Err(f.into_error(what)),
            };
            let settled = self
                .settled_before(calls, &req_is, &flags, &mut out)
                .await?;
            self.again(&mut attempt, what).await?;
            pending.retain(|i| !settled.contains(i));
            for (h, charged, i) in key_is {
                if Fail::failed(&flags, i) {
                    key_charges.insert(h, self.key_charge_for(&h, Credits(charged)).await?);
                }
            }
            for (pid, i) in provider_is {
                if Fail::failed(&flags, i) && self.get(what, schema::provider(pid)).await?.is_none()
                {
                    missing_providers.insert(pid.clone());
                }
            }
        }
        Ok(out)
    }

    async fn settle_leased(
        &self,
        lease: &RequestId,
        calls: &[(Reservation, Settlement)],
    ) -> Result<Vec<SettleOutcome>> {
        let what = "settling calls against a lease";
        // The lease as this process last wrote it, when it took it or
        // settled against it: a wrong belief fails the lease's condition
        // and is read again. Else read it.
        let mut h = match self.held_now(lease) {
            Some(h) => h,
            None => match self.read_req(lease).await? {
                Req::Open(h) => h,
                _ => return Err(Error::NotFound(format!("lease {lease}"))),
            },
        };
        let mut out = vec![SettleOutcome::Applied; calls.len()];
        for (hold, st) in calls {
            SettlePlan::for_leased(&h.r, Credits::ZERO, hold, st)?;
        }
        let pending_all = first_of_each(calls, &mut out);
        let mut pending = &pending_all[..];
        let mut retried: Vec<usize>;
        let mut missing_providers = HashSet::new();
        let mut attempt = 0;
        while !pending.is_empty() {
            // As many calls as fit beside the lease and the ledger's shard,
            // the rewards summed per provider.
            let end = fitting(pending, 2, |&i| {
                calls[i]
                    .1
                    .reward
                    .iter()
                    .map(|(p, _)| format!("P{p}"))
                    .collect()
            });
            let chunk = &pending[..end];
            let mut tx = Tx::new(self);
            let mut remaining = h.r.amount;
            let mut rewards: HashMap<ProviderId, i64> = HashMap::new();
            let mut delta = LedgerTotals::default();
            let mut req_is = Vec::with_capacity(chunk.len());
            for &i in chunk {
                let (hold, st) = &calls[i];
                let plan = SettlePlan::for_leased(&h.r, remaining, hold, st)?;
                remaining = remaining.saturating_sub(plan.usage.charged);
                plan.leased_ledger_delta().add_to(&mut delta);
                // Written settled at once: never open, never swept.
                let mut ex = Ex::new();
                let cond = ex.absent();
                let req = settled_request(hold, h.shard, &plan.usage)
                    .s("lease", lease.as_str())
                    .build();
                req_is.push((i, tx.put(req, Some(cond), ex)?));
                let mut ex = Ex::new();
                let cond = ex.absent();
                tx.put(usage_item(&plan.usage), Some(cond), ex)?;
                if let Some((pid, amount)) = &plan.reward {
                    *rewards.entry(pid.clone()).or_default() += amount.0;
                }
            }

            // The lease: still open with what this process believes it
            // holds; it holds the charges less. One write for the batch.
            let mut ex = Ex::new();
            let (status, amount) = (ex.n("status"), ex.n("amount"));
            let cond = format!(
                "{status} = {} AND {amount} = {}",
                ex.v(s(RESERVED)),
                ex.v(n(h.r.amount.0)),
            );
            let upd = format!("SET {amount} = {}", ex.v(n(remaining.0)));
            let lease_i = tx.update(schema::request(lease), upd, Some(cond), ex)?;

            // The rewards, summed per provider, to providers that exist
            // (see `settle_from`).
            let mut provider_is = Vec::new();
            for (pid, amount) in &rewards {
                if missing_providers.contains(pid) {
                    continue;
                }
                let mut ex = Ex::new();
                let cond = ex.exists();
                let upd = format!("ADD {} {}", ex.n("earnings"), ex.v(n(*amount)));
                let i = tx.update(schema::provider(pid), upd, Some(cond), ex)?;
                provider_is.push((pid.clone(), i));
            }

            add_totals_to_ledger(&mut tx, h.shard, &delta)?;

            let flags = match self.transact(what, tx).await {
                Ok(()) => {
                    h.r.amount = remaining;
                    self.hold(h.clone());
                    pending = &pending[end..];
                    continue;
                }
                Err(Fail::Condition(flags)) => flags,
                Err(f) => return Err(f.into_error(what)),
            };
            self.again(&mut attempt, what).await?;
            if Fail::failed(&flags, lease_i) {
                match self.read_req(lease).await? {
                    Req::Open(fresh) => h = fresh,
                    _ => {
                        self.unhold(lease);
                        return Err(Error::NotFound(format!("lease {lease}")));
                    }
                }
            }
            let settled = self
                .settled_before(calls, &req_is, &flags, &mut out)
                .await?;
            if !settled.is_empty() {
                retried = pending
                    .iter()
                    .copied()
                    .filter(|i| !settled.contains(i))
                    .collect();
                pending = &retried[..];
            }
            for (pid, i) in provider_is {
                if Fail::failed(&flags, i)
                    && self.get(what, schema::provider(&pid)).await?.is_none()
                {
                    missing_providers.insert(pid);
                }
            }
        }
        Ok(out)
    }

    async fn settlement(&self, request: &RequestId) -> Result<UsageRecord> {
        let what = "reading a settlement";
        let nf = || Error::NotFound(format!("settlement {request}"));
        let Req::Settled(it) = self.read_req(request).await? else {
            return Err(nf());
        };
        let r = Rd::new(&it, "request");
        // A settled lease points at no usage record: it is no request.
        let (Some(pk), Some(sk)) = (r.opt_s("usage_pk")?, r.opt_s("usage_sk")?) else {
            return Err(nf());
        };
        let key = crate::item::key(pk, sk);
        match self.get(what, key).await? {
            Some(u) => decode_usage(&u),
            None => Err(nf()),
        }
    }

    async fn release_stale_reservations(&self, before: Timestamp) -> Result<u64> {
        let what = "releasing stale reservations";
        let mut released = 0;
        for shard in 0..self.cfg.ledger_shards {
            let mut q = Query {
                index: Some(GSI),
                forward: true,
                ..Query::default()
            };
            // The index sort key is `{created_at}#{request}` with a fixed-width
            // time, so everything below the bare time of `before` is older.
            q.key_cond = format!(
                "{} = {} AND {} < {}",
                q.ex.n(GSI_PK),
                q.ex.v(s(schema::open_pk(shard))),
                q.ex.n(GSI_SK),
                q.ex.v(s(sortable_i64(before.0)))
            );
            // The index is eventually consistent; each candidate is read again
            // consistently and settled under the usual conditions.
            for it in self.query(what, q).await? {
                let pk = Rd::new(&it, "open reservation").s(PK)?;
                let id = RequestId::new(pk.strip_prefix("REQ#").unwrap_or(&pk));
                let Req::Open(h) = self.read_req(&id).await? else {
                    continue;
                };
                if h.r.created_at >= before {
                    continue;
                }
                let st = release_settlement(&h.r, before);
                self.unhold(&id);
                match self.settle_from(Some(h), &st).await {
                    Ok(SettleOutcome::Applied) => released += 1,
                    Ok(SettleOutcome::AlreadySettled) | Err(Error::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(released)
    }

    async fn ledger_totals(&self) -> Result<LedgerTotals> {
        let keys = (0..self.cfg.ledger_shards).map(schema::ledger).collect();
        let mut t = LedgerTotals::default();
        for it in self.batch_get("reading the ledger", keys).await? {
            let r = Rd::new(&it, "ledger shard");
            t.settlements += r.num_or_zero::<u64>("settlements")?;
            t.charged = t.charged.saturating_add(Credits(r.num_or_zero("charged")?));
            t.rewarded = t
                .rewarded
                .saturating_add(Credits(r.num_or_zero("rewarded")?));
            t.reserved = t
                .reserved
                .saturating_add(Credits(r.num_or_zero("reserved")?));
        }
        Ok(t)
    }

    async fn usage_records(&self, user: &UserId, limit: usize) -> Result<Vec<UsageRecord>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut q = Query::prefix(schema::user_pk(user), "USAGE#");
        q.forward = false;
        q.limit = Some(limit);
        self.query("reading usage records", q)
            .await?
            .iter()
            .map(decode_usage)
            .collect()
    }
}

impl DynamoStore {
    /// After a batch's transaction failed its conditions: the calls whose
    /// request item failed because they were settled before, each marked
    /// `AlreadySettled` in `out`. An open reservation under a call's id is
    /// an error (a held call's id is never reserved in the store).
    async fn settled_before(
        &self,
        calls: &[(Reservation, Settlement)],
        req_is: &[(usize, usize)],
        flags: &[bool],
        out: &mut [SettleOutcome],
    ) -> Result<HashSet<usize>> {
        let mut settled = HashSet::new();
        for &(i, req_i) in req_is {
            if !Fail::failed(flags, req_i) {
                continue;
            }
            let id = &calls[i].1.request_id;
            match self.read_req(id).await? {
                Req::Settled(_) => {
                    out[i] = SettleOutcome::AlreadySettled;
                    settled.insert(i);
                }
                Req::Open(_) => return Err(Error::AlreadyExists(format!("reservation {id}"))),
                Req::Missing => {}
            }
        }
        Ok(settled)
    }

    /// Reads (consistently) what a reservation depends on and fails with the
    /// first rule it breaks, in the order every store checks them. `Ok` means
    /// nothing is wrong any more.
    async fn explain_refusal(&self, r: &Reservation, key_hash: Option<KeyHash>) -> Result<()> {
        let what = "checking a reservation";
        let mut keys = vec![schema::request(&r.request_id), schema::user(&r.user_id)];
        if let Some(h) = key_hash {
            keys.push(schema::api_key(&h));
        }
        let items = self.batch_get(what, keys).await?;
        let find = |pk: &str| {
            items
                .iter()
                .find(|it| matches!(it.get(PK), Some(AttributeValue::S(p)) if p == pk))
        };
        let pk_of = |k: &Item| match k.get(PK) {
            Some(AttributeValue::S(p)) => p.clone(),
            _ => String::new(),
        };
        if find(&pk_of(&schema::request(&r.request_id))).is_some() {
            return Err(Error::AlreadyExists(format!(
                "reservation {}",
                r.request_id
            )));
        }
        let key = match key_hash.and_then(|h| find(&pk_of(&schema::api_key(&h)))) {
            Some(it) => decode_key(it)?,
            None => return Err(Error::Unauthorized("unknown API key".into())),
        };
        if key.user_id != r.user_id || key.id != r.key_id {
            return Err(Error::Unauthorized("unknown API key".into()));
        }
        let user = match find(&pk_of(&schema::user(&r.user_id))) {
            Some(it) => decode_user(it)?,
            None => return Err(Error::Unauthorized("unknown account".into())),
        };
        check_reservation(&user, &key, r)
    }

    /// The request item, read consistently.
    async fn read_req(&self, id: &RequestId) -> Result<Req> {
        match self.get("reading a request", schema::request(id)).await? {
            Some(it) => decode_req(it),
            None => Ok(Req::Missing),
        }
    }

    /// Settles, starting from what this process believes the reservation is
    /// (`None`: read it). The transaction checks that belief; when it was
    /// wrong the request is read and the settlement computed again.
    async fn settle_from(&self, mut held: Option<Held>, st: &Settlement) -> Result<SettleOutcome> {
        let what = "settling a request";
        let mut attempt = 0;
        let mut reward_to_missing_provider = false;
        let mut key_refund = KeyRefund::Add;
        loop {
            let h = match held.take() {
                Some(h) => h,
                None => match self.read_req(&st.request_id).await? {
                    Req::Missing => return not_open(&st.request_id),
                    Req::Settled(_) => return Ok(SettleOutcome::AlreadySettled),
                    Req::Open(h) => h,
                },
            };
            let r = &h.r;
            let plan = SettlePlan::new(r, st);
            let mut tx = Tx::new(self);

            // The reservation: still open, and the one the plan was made from.
            let mut ex = Ex::new();
            let status = ex.n("status");
            let cond = format!(
                "{status} = {} AND {} = {} AND {} = {} AND {} = {} AND {} = {}",
                ex.v(s(RESERVED)),
                ex.n("amount"),
                ex.v(n(r.amount.0)),
                ex.n("user_id"),
                ex.v(s(r.user_id.as_str())),
                ex.n("key_hash"),
                ex.v(s(h.key_hash.to_hex())),
                ex.n("shard"),
                ex.v(n(h.shard)),
            );
            // A lease stays as settled (a repeat is `AlreadySettled`) but
            // points at no usage record: it stores none.
            let usage_at = if plan.records_usage() {
                format!(
                    ", {} = {}, {} = {}",
                    ex.n("usage_pk"),
                    ex.v(s(schema::user_pk(&plan.usage.user_id))),
                    ex.n("usage_sk"),
                    ex.v(s(usage_sk(&plan.usage))),
                )
            } else {
                String::new()
            };
            let upd = format!(
                "SET {status} = {}{usage_at} REMOVE {}, {}",
                ex.v(s(SETTLED)),
                ex.n(GSI_PK),
                ex.n(GSI_SK),
            );
            let req_i = tx.update(schema::request(&r.request_id), upd, Some(cond), ex)?;

            // The refund to the account: users are never deleted, so a plain
            // ADD is safe.
            if plan.refund.0 > 0 {
                let mut ex = Ex::new();
                let upd = format!("ADD {} {}", ex.n("credits"), ex.v(n(plan.refund.0)));
                tx.update(schema::user(&r.user_id), upd, None, ex)?;
            }
            // The refund to the key, never past its limit (see `KeyRefund`).
            let (upd, cond, ex) = key_refund.expression(plan.refund);
            let key_i = tx.update(schema::api_key(&h.key_hash), upd, Some(cond), ex)?;

            // The reward, to a provider that exists: an ADD to a missing one
            // would create a half item. If it does not exist the reward is
            // still recorded (usage and totals), as in every store.
            let mut provider_i = None;
            if let Some((pid, amount)) = &plan.reward {
                if !reward_to_missing_provider {
                    let mut ex = Ex::new();
                    let cond = ex.exists();
                    let upd = format!("ADD {} {}", ex.n("earnings"), ex.v(n(amount.0)));
                    provider_i = Some(tx.update(schema::provider(pid), upd, Some(cond), ex)?);
                }
            }

            if plan.records_usage() {
                let mut ex = Ex::new();
                let cond = ex.absent();
                tx.put(usage_item(&plan.usage), Some(cond), ex)?;
            }

            add_to_ledger(&mut tx, h.shard, &plan.ledger_delta())?;

            let flags = match self.transact(what, tx).await {
                Ok(()) => return Ok(SettleOutcome::Applied),
                Err(Fail::Condition(flags)) => flags,
                Err(f) => return Err(f.into_error(what)),
            };
            self.again(&mut attempt, what).await?;
            if Fail::failed(&flags, req_i) {
                // Settled elsewhere, released, or not what we believed: read
                // it again (and the key and provider with it, to be sure).
                if flags.is_empty() {
                    key_refund = self.key_refund_for(&h.key_hash, plan.refund).await?;
                    if let Some((pid, _)) = &plan.reward {
                        reward_to_missing_provider =
                            self.get(what, schema::provider(pid)).await?.is_none();
                    }
                }
                continue;
            }
            if Fail::failed(&flags, key_i) {
                key_refund = self.key_refund_for(&h.key_hash, plan.refund).await?;
            }
            if provider_i.is_some_and(|i| Fail::failed(&flags, i)) {
                reward_to_missing_provider = true;
            }
            held = Some(h);
        }
    }

    /// Which way a held call's charge comes off a key now, from a consistent
    /// read of it.
    async fn key_charge_for(&self, key_hash: &KeyHash, charged: Credits) -> Result<KeyCharge> {
        let Some(it) = self.get("reading a key", schema::api_key(key_hash)).await? else {
            return Ok(KeyCharge::Subtract);
        };
        let r = Rd::new(&it, "api key");
        Ok(
            if !r.b("limited")? || r.num_or_zero::<i64>("credits_left")? >= charged.0 {
                KeyCharge::Subtract
            } else {
                KeyCharge::Floor
            },
        )
    }

    /// Which refund a key needs now, from a consistent read of it.
    async fn key_refund_for(&self, key_hash: &KeyHash, refund: Credits) -> Result<KeyRefund> {
        let Some(it) = self.get("reading a key", schema::api_key(key_hash)).await? else {
            // Keys are never deleted; if one were, there would be nothing to refund.
            return Ok(KeyRefund::Add);
        };
        let r = Rd::new(&it, "api key");
        Ok(if !r.b("limited")? {
            KeyRefund::Add
        } else if r.opt_num::<i64>("credit_limit")?.is_none() {
            KeyRefund::Drop
        } else if r.num_or_zero::<i64>("spent")? >= refund.0 {
            KeyRefund::Add
        } else {
            KeyRefund::Cap
        })
    }
}

/// Adds one settlement's delta to a ledger shard's running totals, in `tx`.
fn add_to_ledger(tx: &mut Tx, shard: u32, d: &LedgerDelta) -> Result<()> {
    let mut totals = LedgerTotals::default();
    d.add_to(&mut totals);
    add_totals_to_ledger(tx, shard, &totals)
}

/// Adds `t` (one settlement's delta, or a batch's summed) to a ledger
/// shard's running totals, in `tx`: the one place the shard's sums are written.
fn add_totals_to_ledger(tx: &mut Tx, shard: u32, t: &LedgerTotals) -> Result<()> {
    let mut ex = Ex::new();
    let upd = format!(
        "ADD {} {}, {} {}, {} {}, {} {}",
        ex.n("settlements"),
        ex.v(n(t.settlements)),
        ex.n("charged"),
        ex.v(n(t.charged.0)),
        ex.n("rewarded"),
        ex.v(n(t.rewarded.0)),
        ex.n("reserved"),
        ex.v(n(t.reserved.0)),
    );
    tx.update(schema::ledger(shard), upd, None, ex)?;
    Ok(())
}

/// The request item of a call whose hold lived outside the store (in memory
/// or in a lease): written settled at once, so it never enters the index of
/// open ones, with a pointer to its usage record.
fn settled_request(hold: &Reservation, shard: u32, usage: &UsageRecord) -> ItemBuilder {
    ItemBuilder::at(schema::request(&hold.request_id))
        .s("status", SETTLED)
        .s("request_id", hold.request_id.as_str())
        .s("user_id", hold.user_id.as_str())
        .s("key_id", hold.key_id.as_str())
        .s("route", hold.route.path())
        .n("amount", hold.amount.0)
        .n("created_at", hold.created_at.0)
        .n("shard", shard)
        .s("usage_pk", schema::user_pk(&usage.user_id))
        .s("usage_sk", usage_sk(usage))
}
