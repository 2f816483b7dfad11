//! Reservations and settlements, the broker's hot path, applied a run at a
//! time.
//!
//! A run is a sequence of reserve and settle operations (settlements of
//! calls held in the broker's memory among them, [`LedgerStore::settle_held`])
//! the writer found next to each other in its queue. Every operation in it is decided in
//! order with the core's shared rules ([`apply_reservation`], [`SettlePlan`])
//! against the rows it touches, read once for the whole run inside the
//! run's transaction and kept up to date in memory as each operation is
//! decided. A refused operation (insufficient credits,
//! a duplicate id) changes nothing: it never gets as far as a write. The
//! accepted ones are then written together, the sums of each account and
//! provider once, in the same transaction: all of the run lands or none of it.
//!
//! The writer runs this on its own thread, on its connection directly (see
//! [`crate::writer`]): each statement is a call into SQLite, with no hand-off
//! to sqlx's connection thread and back, and the run's rows are bound one
//! by one to statements prepared once.

use std::collections::{HashMap, HashSet};

use cxmpute_core::store_support::{apply_reservation, not_open, SettlePlan};
use cxmpute_core::*;
use rusqlite::{params, Connection};

use crate::error::map_direct;
use crate::rows::{self, col, key_cols, reservation_cols, to_i64, usage_cols, user_cols};

/// One money operation.
// Settlements are the common operation and each is moved in once: boxing
// them to shrink the rarer variants would cost an allocation per call.
#[allow(clippy::large_enum_variant)]
pub(crate) enum MoneyOp {
    /// [`LedgerStore::reserve`].
    Reserve(Reservation),
    /// [`LedgerStore::settle`].
    Settle(Settlement),
    /// [`LedgerStore::settle_held`]: each call's hold, and its settlement.
    SettleHeld(Vec<(Reservation, Settlement)>),
    /// [`LedgerStore::settle_leased`]: the lease, and its calls.
    SettleLeased(RequestId, Vec<(Reservation, Settlement)>),
}

impl MoneyOp {
    /// The request ids whose reservations and settlements it reads.
    fn request_ids(&self) -> Vec<&RequestId> {
        match self {
            MoneyOp::Reserve(r) => vec![&r.request_id],
            MoneyOp::Settle(s) => vec![&s.request_id],
            MoneyOp::SettleHeld(calls) => calls.iter().map(|(_, s)| &s.request_id).collect(),
            MoneyOp::SettleLeased(lease, calls) => std::iter::once(lease)
                .chain(calls.iter().map(|(_, s)| &s.request_id))
                .collect(),
        }
    }
}

/// What a money operation answers.
#[derive(Debug)]
pub(crate) enum MoneyAnswer {
    /// The reservation is held.
    Reserved,
    /// The settlement's outcome.
    Settled(SettleOutcome),
    /// The outcome of each call settled against a lease, or held.
    Outcomes(Vec<SettleOutcome>),
}

/// The run's view of the rows it touches, and what it will write.
#[derive(Default)]
struct Run {
    users: HashMap<UserId, User>,
    keys: HashMap<ApiKeyId, ApiKey>,
    /// Open reservations: read before the run or taken in it.
    open: HashMap<RequestId, Reservation>,
    /// Request ids settled before the run or in it.
    settled: HashSet<RequestId>,
    /// Taken in this run (and so not in the table yet).
    taken_here: HashSet<RequestId>,
    /// Open before the run, settled in it: to delete.
    closed: Vec<RequestId>,
    usage: Vec<UsageRecord>,
    user_delta: HashMap<UserId, i64>,
    touched_keys: HashSet<ApiKeyId>,
    provider_delta: HashMap<ProviderId, i64>,
    /// What the run adds to the ledger's totals.
    ledger: LedgerTotals,
}

impl Run {
    fn reserve(&mut self, r: &Reservation) -> Result<MoneyAnswer> {
        if self.open.contains_key(&r.request_id) || self.settled.contains(&r.request_id) {
            return Err(Error::AlreadyExists(format!(
                "reservation {}",
                r.request_id
            )));
        }
        apply_reservation(&mut self.users, &mut self.keys, r)?;
        *self.user_delta.entry(r.user_id.clone()).or_default() -= r.amount.0;
        self.touched_keys.insert(r.key_id.clone());
        self.ledger.reserved = self.ledger.reserved.saturating_add(r.amount);
        self.open.insert(r.request_id.clone(), r.clone());
        self.taken_here.insert(r.request_id.clone());
        Ok(MoneyAnswer::Reserved)
    }

    fn settle(&mut self, st: &Settlement) -> Result<MoneyAnswer> {
        if self.settled.contains(&st.request_id) {
            return Ok(MoneyAnswer::Settled(SettleOutcome::AlreadySettled));
        }
        let Some(r) = self.open.remove(&st.request_id) else {
            return not_open(&st.request_id).map(MoneyAnswer::Settled);
        };
        let plan = SettlePlan::new(&r, st);
        let key = self.keys.get_mut(&r.key_id);
        if key.is_some() {
            self.touched_keys.insert(r.key_id.clone());
        }
        plan.refund_to(self.users.get_mut(&r.user_id), key);
        *self.user_delta.entry(r.user_id.clone()).or_default() += plan.refund.0;
        if let Some((provider, amount)) = &plan.reward {
            *self.provider_delta.entry(provider.clone()).or_default() += amount.0;
        }
        plan.ledger_delta().add_to(&mut self.ledger);
        if !self.taken_here.remove(&st.request_id) {
            self.closed.push(st.request_id.clone());
        }
        // A lease keeps no mark once settled (see `not_open`).
        if plan.records_usage() {
            self.settled.insert(st.request_id.clone());
            self.usage.push(plan.usage);
        }
        Ok(MoneyAnswer::Settled(SettleOutcome::Applied))
    }

    fn settle_held(&mut self, calls: &[(Reservation, Settlement)]) -> Result<MoneyAnswer> {
        let plans = SettlePlan::for_held_batch(
            calls,
            |id| self.open.contains_key(id),
            |id| self.settled.contains(id),
        )?;
        let mut out = Vec::with_capacity(calls.len());
        for ((hold, st), plan) in calls.iter().zip(plans) {
            let Some(plan) = plan else {
                out.push(SettleOutcome::AlreadySettled);
                continue;
            };
            let key = self.keys.get_mut(&hold.key_id);
            if key.is_some() {
                self.touched_keys.insert(hold.key_id.clone());
            }
            // Summed per account, key and provider: one write each per run.
            plan.charge_to(hold, self.users.get_mut(&hold.user_id), key);
            *self.user_delta.entry(hold.user_id.clone()).or_default() -= plan.usage.charged.0;
            if let Some((provider, amount)) = &plan.reward {
                *self.provider_delta.entry(provider.clone()).or_default() += amount.0;
            }
            plan.held_ledger_delta().add_to(&mut self.ledger);
            self.settled.insert(st.request_id.clone());
            self.usage.push(plan.usage);
            out.push(SettleOutcome::Applied);
        }
        Ok(MoneyAnswer::Outcomes(out))
    }
}

impl Run {
    fn settle_leased(
        &mut self,
        lease: &RequestId,
        calls: &[(Reservation, Settlement)],
    ) -> Result<MoneyAnswer> {
        let l = self
            .open
            .get(lease)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("lease {lease}")))?;
        let (plans, remaining) = SettlePlan::for_leased_batch(
            &l,
            calls,
            |id| self.open.contains_key(id),
            |id| self.settled.contains(id),
        )?;
        let mut out = Vec::with_capacity(calls.len());
        for ((_, st), plan) in calls.iter().zip(plans) {
            let Some(plan) = plan else {
                out.push(SettleOutcome::AlreadySettled);
                continue;
            };
            if let Some((provider, amount)) = &plan.reward {
                *self.provider_delta.entry(provider.clone()).or_default() += amount.0;
            }
            plan.leased_ledger_delta().add_to(&mut self.ledger);
            self.settled.insert(st.request_id.clone());
            self.usage.push(plan.usage);
            out.push(SettleOutcome::Applied);
        }
        if remaining != l.amount {
            if let Some(r) = self.open.get_mut(lease) {
                r.amount = remaining;
            }
            // The lease's row is written again with what it still holds.
            if self.taken_here.insert(lease.clone()) {
                self.closed.push(lease.clone());
            }
        }
        Ok(MoneyAnswer::Outcomes(out))
    }
}

/// An open reservation by its request id.
const READ_RESERVATION: &str = concat!(
    "SELECT ",
    reservation_cols!(),
    " FROM reservations r WHERE r.request_id = ?1"
);
/// Whether a request id is settled (has its usage row).
const READ_SETTLED: &str = "SELECT 1 FROM usage WHERE request_id = ?1";
/// A key and its user (NULL user columns: the user is gone).
const READ_KEY: &str = concat!(
    "SELECT ",
    key_cols!(),
    ", ",
    user_cols!(),
    " FROM api_keys k LEFT JOIN users u ON u.id = k.user_id WHERE k.id = ?1"
);
const KEY_N: usize = rows::KEY_COLS;

/// Decides and applies a run of money operations on the writer's
/// connection, in a transaction of its own. Returns one answer per
/// operation; an `Err` means nothing of the run was applied (its
/// transaction is rolled back) and every operation in it fails with it.
pub(crate) fn apply(c: &Connection, ops: &[MoneyOp]) -> Result<Vec<Result<MoneyAnswer>>> {
    exec(
        c,
        "BEGIN IMMEDIATE",
        "beginning a run of reservations and settlements",
    )?;
    let applied = decide_and_write(c, ops).and_then(|(answers, wrote)| {
        // A run that wrote nothing (every operation refused or a repeat)
        // has nothing to commit.
        if wrote {
            exec(c, "COMMIT", "committing reservations and settlements")?;
        }
        Ok(answers)
    });
    if !c.is_autocommit() {
        // Nothing written, or a failure: SQLite may already have rolled
        // back, in which case there is no transaction left to end.
        let _ = c.execute_batch("ROLLBACK");
    }
    applied
}

/// Runs a statement without arguments (prepared once, kept).
fn exec(c: &Connection, sql: &str, what: &str) -> Result<()> {
    c.prepare_cached(sql)
        .and_then(|mut s| s.execute([]))
        .map(|_| ())
        .map_err(|e| map_direct(what, e))
}

/// Reads what the run touches, decides each operation in order and writes
/// what was accepted; says whether anything was written.
fn decide_and_write(c: &Connection, ops: &[MoneyOp]) -> Result<(Vec<Result<MoneyAnswer>>, bool)> {
    let mut run = Run::default();
    read(c, ops, &mut run)?;

    // Decide, in order.
    let answers: Vec<Result<MoneyAnswer>> = ops
        .iter()
        .map(|op| match op {
            MoneyOp::Reserve(r) => run.reserve(r),
            MoneyOp::Settle(s) => run.settle(s),
            MoneyOp::SettleHeld(calls) => run.settle_held(calls),
            MoneyOp::SettleLeased(lease, calls) => run.settle_leased(lease, calls),
        })
        .collect();

    // A lease handed back changes rows but records no usage.
    if run.taken_here.is_empty()
        && run.usage.is_empty()
        && run.closed.is_empty()
        && run.touched_keys.is_empty()
    {
        return Ok((answers, false));
    }
    write(c, &run).map_err(|e| map_direct("writing reservations and settlements", e))?;
    Ok((answers, true))
}

/// Reads the open reservations and settled markers of the run's request
/// ids, and the keys (with their users) its reservations and held
/// settlements name.
fn read(c: &Connection, ops: &[MoneyOp], run: &mut Run) -> Result<()> {
    let db = |e| map_direct("reading reservations and their accounts", e);
    let mut reservation = c.prepare_cached(READ_RESERVATION).map_err(db)?;
    let mut settled = c.prepare_cached(READ_SETTLED).map_err(db)?;
    let mut key_ids: HashSet<&str> = HashSet::new();
    for op in ops {
        match op {
            MoneyOp::Reserve(r) => {
                key_ids.insert(r.key_id.as_str());
            }
            MoneyOp::SettleHeld(calls) => {
                key_ids.extend(calls.iter().map(|(h, _)| h.key_id.as_str()));
            }
            MoneyOp::Settle(_) | MoneyOp::SettleLeased(..) => {}
        }
        for id in op.request_ids() {
            let mut rows = reservation.query([id.as_str()]).map_err(db)?;
            if let Some(row) = rows.next().map_err(db)? {
                let r = rows::reservation(row, 0)?;
                run.open.insert(r.request_id.clone(), r);
            }
            if settled.exists([id.as_str()]).map_err(db)? {
                run.settled.insert(id.clone());
            }
        }
    }
    let reserving: Vec<&str> = run.open.values().map(|r| r.key_id.as_str()).collect();
    key_ids.extend(reserving);
    let mut key = c.prepare_cached(READ_KEY).map_err(db)?;
    for id in key_ids {
        let mut rows = key.query([id]).map_err(db)?;
        if let Some(row) = rows.next().map_err(db)? {
            let k = rows::api_key(row, 0)?;
            if col::<Option<String>>(row, KEY_N)?.is_some() {
                let user = rows::user(row, KEY_N)?;
                run.users.entry(user.id.clone()).or_insert(user);
            }
            run.keys.insert(k.id.clone(), k);
        }
    }
    Ok(())
}

/// Writes what the run accepted: reservations closed and taken, usage
/// rows, and each account's, key's and provider's change once.
fn write(c: &Connection, run: &Run) -> rusqlite::Result<()> {
    let mut delete = c.prepare_cached("DELETE FROM reservations WHERE request_id = ?1")?;
    for id in &run.closed {
        delete.execute([id.as_str()])?;
    }
    let mut insert = c.prepare_cached(
        "INSERT INTO reservations (request_id, user_id, key_id, route, amount, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for r in run.taken_here.iter().filter_map(|id| run.open.get(id)) {
        insert.execute(params![
            r.request_id.as_str(),
            r.user_id.as_str(),
            r.key_id.as_str(),
            r.route.path(),
            r.amount.0,
            r.created_at.0,
        ])?;
    }
    let mut usage = c.prepare_cached(concat!(
        "INSERT INTO usage (",
        usage_cols!(),
        ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)"
    ))?;
    for u in &run.usage {
        usage.execute(params![
            u.request_id.as_str(),
            u.user_id.as_str(),
            u.key_id.as_str(),
            u.route.path(),
            u.model.as_str(),
            u.provision_id.as_ref().map(|p| p.as_str()),
            u.provider_id.as_ref().map(|p| p.as_str()),
            to_i64(u.input_tokens),
            to_i64(u.output_tokens),
            to_i64(u.units),
            u.success,
            to_i64(u.latency_ms),
            u.app.as_deref(),
            u.at.0,
            u.charged.0,
            u.reward.0,
            u.requested_model.as_deref(),
            u.cache_hit,
        ])?;
    }
    // Balances move by the run's net change per user (relative: commutes).
    let mut user = c.prepare_cached("UPDATE users SET credits = credits + ?2 WHERE id = ?1")?;
    for (id, delta) in run.user_delta.iter().filter(|(_, d)| **d != 0) {
        user.execute(params![id.as_str(), delta])?;
    }
    // A key's remaining limit as decided last (absolute: the refund rule
    // caps at the limit, which does not commute with reservations).
    let mut key =
        c.prepare_cached("UPDATE api_keys SET credits_left = ?2, last_used_at = ?3 WHERE id = ?1")?;
    for k in run.touched_keys.iter().filter_map(|id| run.keys.get(id)) {
        key.execute(params![
            k.id.as_str(),
            k.credits_left.map(|c| c.0),
            k.last_used_at.map(|t| t.0),
        ])?;
    }
    let mut provider =
        c.prepare_cached("UPDATE providers SET earnings = earnings + ?2 WHERE id = ?1")?;
    for (id, delta) in &run.provider_delta {
        provider.execute(params![id.as_str(), delta])?;
    }
    c.prepare_cached(
        "UPDATE ledger SET settlements = settlements + ?1, charged = charged + ?2, \
         rewarded = rewarded + ?3, reserved = reserved + ?4 WHERE id = 1",
    )?
    .execute(params![
        to_i64(run.ledger.settlements),
        run.ledger.charged.0,
        run.ledger.rewarded.0,
        run.ledger.reserved.0,
    ])?;
    Ok(())
}
