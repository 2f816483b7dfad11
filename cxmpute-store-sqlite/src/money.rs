//! Reservations and settlements, the broker's hot path, applied a run at a
//! time.
//!
//! A run is a sequence of reserve and settle operations (settlements of
//! calls held in the broker's memory among them, [`LedgerStore::settle_held`])
//! the writer found next to each other in its queue. Every operation in it is decided in
//! order with the core's shared rules ([`apply_reservation`], [`SettlePlan`])
//! against the rows it touches, read once for the whole run inside the
//! writer's transaction and kept up to date in memory as each operation is
//! decided. A refused operation (insufficient credits,
//! a duplicate id) changes nothing: it never gets as far as a write. The
//! accepted ones are then written together, a handful of set-wise statements
//! fed JSON arrays, inside one savepoint: all of the run lands or none of it.
//!
//! Per request this costs no round trip to SQLite of its own, which is what
//! the throughput target needs: sqlx hands every statement to a worker
//! thread and back, and those hand-offs, not SQLite, were the cost of the
//! one-operation-at-a-time path.

use std::collections::{HashMap, HashSet};

use cxmpute_core::store_support::{apply_reservation, not_open, SettlePlan};
use cxmpute_core::*;
use sqlx::SqliteConnection;

use crate::error::map;
use crate::rows::{self, col, json, key_cols, reservation_cols, to_i64, usage_cols, user_cols};

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

/// Everything a run decides on, in one round trip: the open reservations
/// (`r`) and settled markers (`s`) of its request ids, and (`k`) the keys its
/// reservations and held settlements name, with their users (NULL user columns: the user is gone).
/// Binds, in order: request ids, request ids, the reserving keys' ids,
/// request ids (JSON arrays).
macro_rules! read_run {
    () => {
        concat!(
            "SELECT 'r', ",
            reservation_cols!(),
            " FROM json_each(?) j JOIN reservations r ON r.request_id = j.value; ",
            "SELECT 's', u.request_id FROM json_each(?) j JOIN usage u ON u.request_id = j.value; ",
            "SELECT 'k', ",
            key_cols!(),
            ", ",
            user_cols!(),
            " FROM api_keys k LEFT JOIN users u ON u.id = k.user_id WHERE k.id IN (",
            "SELECT value FROM json_each(?) UNION ",
            "SELECT r.key_id FROM json_each(?) j JOIN reservations r ON r.request_id = j.value)"
        )
    };
}
const READ_RUN: &str = read_run!();
/// [`READ_RUN`] opening the transaction it reads in (see [`Txn::Own`]).
const BEGIN_READ_RUN: &str = concat!("BEGIN IMMEDIATE; ", read_run!());
const KEY_N: usize = rows::KEY_COLS;

/// Every write of a run. Plain `?`s, bound in order: sqlx numbers each
/// statement's arguments on from the previous one's.
macro_rules! write_run {
    () => {
        concat!(
            // Reservations settled in this run that were open before it.
            "DELETE FROM reservations WHERE request_id IN (SELECT value FROM json_each(?)); ",
            // Reservations taken in this run and still open at its end.
            "INSERT INTO reservations (request_id, user_id, key_id, route, amount, created_at) ",
            "SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5 ",
            "FROM json_each(?); ",
            // Usage rows are materialized first: `json_each`'s `value` is
            // made again (as text) each time it is named, so `value ->> n`
            // rebuilt each row once per column, 18 times (17 % of a held
            // batch's time in the `settle` benchmark). Reservations, 6
            // columns and written only for calls reserved in the store,
            // showed no difference beyond the benchmark's noise.
            "WITH u(v) AS MATERIALIZED (SELECT value FROM json_each(?)) ",
            "INSERT INTO usage (",
            usage_cols!(),
            ") ",
            "SELECT v ->> 0, v ->> 1, v ->> 2, v ->> 3, v ->> 4, v ->> 5, ",
            "v ->> 6, v ->> 7, v ->> 8, v ->> 9, v ->> 10, v ->> 11, ",
            "v ->> 12, v ->> 13, v ->> 14, v ->> 15, v ->> 16, v ->> 17 ",
            "FROM u; ",
            // Balances move by the run's net change per user (relative: commutes).
            "UPDATE users SET credits = credits + (d.value ->> 1) ",
            "FROM json_each(?) d WHERE users.id = d.value ->> 0; ",
            // A key's remaining limit as decided last (absolute: the refund rule
            // caps at the limit, which does not commute with reservations).
            "UPDATE api_keys SET credits_left = k.value ->> 1, last_used_at = k.value ->> 2 ",
            "FROM json_each(?) k WHERE api_keys.id = k.value ->> 0; ",
            "UPDATE providers SET earnings = earnings + (p.value ->> 1) ",
            "FROM json_each(?) p WHERE providers.id = p.value ->> 0; ",
            "UPDATE ledger SET settlements = settlements + ?, charged = charged + ?, ",
            "rewarded = rewarded + ?, reserved = reserved + ? WHERE id = 1"
        )
    };
}
const WRITE_RUN: &str = write_run!();
/// [`WRITE_RUN`] committing the transaction it writes in (see [`Txn::Own`]).
const WRITE_RUN_COMMIT: &str = concat!(write_run!(), "; COMMIT");

/// One `usage` row as `WRITE_RUN` reads it: a JSON array in the order of
/// `usage_cols!()` (a tuple struct, since serde's tuples stop at 16).
#[derive(serde::Serialize)]
struct UsageRow<'a>(
    &'a str,
    &'a str,
    &'a str,
    &'a str,
    &'a str,
    Option<&'a str>,
    Option<&'a str>,
    i64,
    i64,
    i64,
    bool,
    i64,
    Option<&'a str>,
    i64,
    i64,
    i64,
    Option<&'a str>,
    bool,
);

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

/// Whose transaction a run is applied in.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Txn {
    /// The writer's, already open (the run sits in a savepoint of a batch).
    Open,
    /// Its own: the run is the whole batch, and its read begins the
    /// transaction and its write commits it. Each statement sent to SQLite
    /// is a hand-off to sqlx's connection thread and back, about 130 µs of
    /// waiting on a busy 2-core box, and the transaction's `BEGIN` and
    /// `COMMIT` sent alone were two of a batch's four.
    Own,
}

/// What [`apply`] did.
pub(crate) struct Applied {
    /// One answer per operation.
    pub(crate) answers: Vec<Result<MoneyAnswer>>,
    /// Whether the run's transaction is still open: with [`Txn::Own`], the
    /// run found nothing to write (every operation refused or a repeat),
    /// and the caller ends the transaction.
    pub(crate) open: bool,
}

/// Decides and applies a run of money operations on the writer's connection,
/// in the transaction `txn` says. Returns one answer per operation; an
/// `Err` means the run's writes failed and must be undone as a whole (with
/// [`Txn::Own`], the transaction may be open: the caller rolls it back).
pub(crate) async fn apply(c: &mut SqliteConnection, ops: &[MoneyOp], txn: Txn) -> Result<Applied> {
    let mut run = Run::default();

    // Read what the run touches.
    let ids: Vec<&str> = ops
        .iter()
        .flat_map(|op| op.request_ids())
        .map(|id| id.as_str())
        .collect();
    let ids = json(&ids)?;
    let key_ids: HashSet<&str> = ops
        .iter()
        .flat_map(|op| match op {
            MoneyOp::Reserve(r) => vec![r.key_id.as_str()],
            MoneyOp::SettleHeld(calls) => calls.iter().map(|(h, _)| h.key_id.as_str()).collect(),
            MoneyOp::Settle(_) | MoneyOp::SettleLeased(..) => Vec::new(),
        })
        .collect();
    let read = match txn {
        Txn::Open => READ_RUN,
        Txn::Own => BEGIN_READ_RUN,
    };
    let found = sqlx::query(read)
        .bind(&ids)
        .bind(&ids)
        .bind(json(&key_ids)?)
        .bind(&ids)
        .fetch_all(&mut *c)
        .await
        .map_err(|e| map("reading reservations and their accounts", e))?;
    for row in &found {
        match col::<String>(row, 0)?.as_str() {
            "r" => {
                let r = rows::reservation(row, 1)?;
                run.open.insert(r.request_id.clone(), r);
            }
            "s" => {
                run.settled.insert(RequestId::new(col::<String>(row, 1)?));
            }
            _ => {
                let key = rows::api_key(row, 1)?;
                if col::<Option<String>>(row, 1 + KEY_N)?.is_some() {
                    let user = rows::user(row, 1 + KEY_N)?;
                    run.users.entry(user.id.clone()).or_insert(user);
                }
                run.keys.insert(key.id.clone(), key);
            }
        }
    }

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
        // Everything was refused or a repeat: nothing to write.
        return Ok(Applied {
            answers,
            open: txn == Txn::Own,
        });
    }
    write(c, &run, txn).await?;
    Ok(Applied {
        answers,
        open: false,
    })
}

async fn write(c: &mut SqliteConnection, run: &Run, txn: Txn) -> Result<()> {
    let closed = json(&run.closed)?;
    let taken: Vec<_> = run
        .taken_here
        .iter()
        .filter_map(|id| run.open.get(id))
        .map(|r| {
            (
                r.request_id.as_str(),
                r.user_id.as_str(),
                r.key_id.as_str(),
                r.route.path(),
                r.amount.0,
                r.created_at.0,
            )
        })
        .collect();
    let usage: Vec<_> = run
        .usage
        .iter()
        .map(|u| {
            UsageRow(
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
            )
        })
        .collect();
    let users: Vec<(&str, i64)> = run
        .user_delta
        .iter()
        .filter(|(_, d)| **d != 0)
        .map(|(id, d)| (id.as_str(), *d))
        .collect();
    let keys: Vec<(&str, Option<i64>, Option<i64>)> = run
        .touched_keys
        .iter()
        .filter_map(|id| run.keys.get(id))
        .map(|k| {
            (
                k.id.as_str(),
                k.credits_left.map(|c| c.0),
                k.last_used_at.map(|t| t.0),
            )
        })
        .collect();
    let providers: Vec<(&str, i64)> = run
        .provider_delta
        .iter()
        .map(|(id, d)| (id.as_str(), *d))
        .collect();
    let sql = match txn {
        Txn::Open => WRITE_RUN,
        Txn::Own => WRITE_RUN_COMMIT,
    };
    sqlx::query(sql)
        .bind(closed)
        .bind(json(&taken)?)
        .bind(json(&usage)?)
        .bind(json(&users)?)
        .bind(json(&keys)?)
        .bind(json(&providers)?)
        .bind(to_i64(run.ledger.settlements))
        .bind(run.ledger.charged.0)
        .bind(run.ledger.rewarded.0)
        .bind(run.ledger.reserved.0)
        .execute(c)
        .await
        .map_err(|e| map("writing reservations and settlements", e))?;
    Ok(())
}
