//! Threshold emails: an account's balance fell below `alerts.balance_below`,
//! or its account budget's spending this period reached
//! `alerts.budget_percent` of the limit ([`Alerts`]).
//!
//! **Once per crossing.** Each kind has a mark on the account in the store
//! ([`AlertMarks`]): the balance mark is set while the current crossing was
//! mailed and cleared when the balance is back at the threshold or above (a
//! grant, seen at once on the granting host, or by any host's next look);
//! the budget mark holds the start of the last period mailed, so a new
//! period mails again. A host takes a mark with the store's atomic
//! conditional write ([`UserStore::swap_alert_mark`]) before it sends: of
//! hosts sharing a store, the one whose write lands sends, the others see
//! it taken. A mailer failure is logged and gives the mark back, so a later
//! call tries again.
//!
//! **Off the call's path.** A settled call only decides, from memory, whether
//! an alert may be due, and if so spawns the look: one store read of the
//! account, then the swap and the mail when due. A host remembers (by the
//! broker's clock, for [`BrokerConfig::key_cache_ttl`]) the accounts it saw
//! mailed, so calls below a threshold already mailed cost no store trip; a
//! grant on another host re-arms the balance alert here within that bound.
//!
//! [`UserStore::swap_alert_mark`]: crate::store::UserStore::swap_alert_mark
//! [`BrokerConfig::key_cache_ttl`]: crate::BrokerConfig::key_cache_ttl

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;

use crate::budget::period_bounds;
use crate::clock::Clock;
use crate::error::Result;
use crate::keycache::AccountLimits;
use crate::mail::{AlertMail, Mailer};
use crate::store::Store;
use crate::types::*;

/// Accounts remembered as mailed, per kind: plenty for the accounts a host
/// serves; one forgotten early costs one store read.
const REMEMBERED: u64 = 100_000;

/// The alerts of one host.
#[derive(Clone)]
pub(crate) struct Alerter(Arc<Shared>);

struct Shared {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    mailer: Arc<dyn Mailer>,
    ttl_ms: i64,
    /// Accounts whose balance alert was seen taken, and when (broker clock).
    balance_sent: Cache<UserId, i64>,
    /// Accounts whose budget alert was seen taken: the period's start.
    budget_sent: Cache<UserId, i64>,
    /// Looks under way (tests wait for them).
    running: AtomicUsize,
    idle: tokio::sync::Notify,
}

impl std::fmt::Debug for Alerter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alerter").finish_non_exhaustive()
    }
}

impl Alerter {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        mailer: Arc<dyn Mailer>,
        ttl: Duration,
    ) -> Self {
        let table = || Cache::builder().max_capacity(REMEMBERED).build();
        Alerter(Arc::new(Shared {
            store,
            clock,
            mailer,
            ttl_ms: i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX),
            balance_sent: table(),
            budget_sent: table(),
            running: AtomicUsize::new(0),
            idle: tokio::sync::Notify::new(),
        }))
    }

    /// A call of `user` was settled, `charged`; `counted` is what its
    /// account budget counts this period (spent or held), when it has one.
    /// Spawns a look at the account when an alert may be due.
    pub(crate) fn settled(
        &self,
        user: &UserId,
        account: &AccountLimits,
        charged: Credits,
        counted: Option<u64>,
    ) {
        let s = &self.0;
        let now = s.clock.now().0;
        let balance = account.alerts.balance_below.is_some()
            && charged > Credits::ZERO
            && !s.remembered(&s.balance_sent, user, now);
        let budget = match (account.alerts.budget_percent, account.budget, counted) {
            (Some(pct), Some(b), Some(counted)) => {
                let limit = u128::try_from(b.limit.0).unwrap_or(0);
                let reached = u128::from(counted) * 100 >= u128::from(pct) * limit;
                let (start, _) = period_bounds(b.period, s.clock.now());
                reached && s.budget_sent.get(user) != Some(start.0)
            }
            _ => false,
        };
        if !(balance || budget) {
            return;
        }
        let (me, user) = (self.clone(), user.clone());
        s.running.fetch_add(1, Ordering::AcqRel);
        tokio::spawn(async move {
            if let Err(e) = me.look(&user, balance, budget, counted).await {
                tracing::warn!(error = %e, user = %user, "checking an account's alerts failed");
            }
            if me.0.running.fetch_sub(1, Ordering::AcqRel) == 1 {
                me.0.idle.notify_waiters();
            }
        });
    }

    /// Credits were granted to `user`, its balance now `balance`: a balance
    /// alert mailed before is re-armed once the balance is back at the
    /// threshold or above.
    pub(crate) async fn granted(&self, user: &UserId, balance: Credits) -> Result<()> {
        let s = &self.0;
        let u = s.store.user(user).await?;
        let Some(threshold) = u.alerts.balance_below else {
            return Ok(());
        };
        if balance >= threshold {
            s.balance_sent.invalidate(user);
            if let Some(mark) = u.alerted.balance {
                s.store
                    .swap_alert_mark(user, AlertKind::Balance, Some(mark), None)
                    .await?;
            }
        }
        Ok(())
    }

    /// Waits until no look is under way (tests: a mail was sent or not).
    #[cfg(feature = "testkit")]
    pub(crate) async fn idle(&self) {
        loop {
            let notified = self.0.idle.notified();
            if self.0.running.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    async fn look(
        &self,
        user: &UserId,
        balance: bool,
        budget: bool,
        counted: Option<u64>,
    ) -> Result<()> {
        let s = &self.0;
        let u = s.store.user(user).await?;
        let now = s.clock.now();
        if balance {
            if let Some(threshold) = u.alerts.balance_below {
                s.balance(&u, threshold, now).await?;
            }
        }
        if let (true, Some(pct), Some(b), Some(counted)) =
            (budget, u.alerts.budget_percent, u.budget, counted)
        {
            s.budget(&u, b, pct, counted, now).await?;
        }
        Ok(())
    }
}

impl Shared {
    fn remembered(&self, table: &Cache<UserId, i64>, user: &UserId, now: i64) -> bool {
        table
            .get(user)
            .is_some_and(|at| (0..self.ttl_ms).contains(&now.saturating_sub(at)))
    }

    async fn balance(&self, u: &User, threshold: Credits, now: Timestamp) -> Result<()> {
        if u.credits >= threshold {
            // Back above: the next fall is a new crossing.
            if let Some(mark) = u.alerted.balance {
                self.store
                    .swap_alert_mark(&u.id, AlertKind::Balance, Some(mark), None)
                    .await?;
            }
            return Ok(());
        }
        if u.alerted.balance.is_some()
            || !(self.store)
                .swap_alert_mark(&u.id, AlertKind::Balance, None, Some(now))
                .await?
        {
            // Mailed already, by this host or another.
            self.balance_sent.insert(u.id.clone(), now.0);
            return Ok(());
        }
        let mail = AlertMail::BalanceBelow {
            balance: u.credits,
            threshold,
        };
        match self.mailer.send_alert(&u.email, &mail).await {
            Ok(()) => {
                self.balance_sent.insert(u.id.clone(), now.0);
                tracing::info!(user = %u.id, "balance alert mailed");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, user = %u.id, "mailing a balance alert failed; a later call retries");
                (self.store)
                    .swap_alert_mark(&u.id, AlertKind::Balance, Some(now), None)
                    .await
                    .map(drop)
            }
        }
    }

    async fn budget(
        &self,
        u: &User,
        b: Budget,
        pct: u8,
        counted: u64,
        now: Timestamp,
    ) -> Result<()> {
        let limit = u128::try_from(b.limit.0).unwrap_or(0);
        if u128::from(counted) * 100 < u128::from(pct) * limit {
            return Ok(()); // the budget changed since the call was admitted
        }
        let (start, _) = period_bounds(b.period, now);
        let before = u.alerted.budget;
        if before == Some(start)
            || !(self.store)
                .swap_alert_mark(&u.id, AlertKind::Budget, before, Some(start))
                .await?
        {
            self.budget_sent.insert(u.id.clone(), start.0);
            return Ok(());
        }
        let mail = AlertMail::BudgetReached {
            spent: Credits(i64::try_from(counted).unwrap_or(i64::MAX)),
            limit: b.limit,
            percent: pct,
            period: b.period,
        };
        match self.mailer.send_alert(&u.email, &mail).await {
            Ok(()) => {
                self.budget_sent.insert(u.id.clone(), start.0);
                tracing::info!(user = %u.id, "budget alert mailed");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, user = %u.id, "mailing a budget alert failed; a later call retries");
                (self.store)
                    .swap_alert_mark(&u.id, AlertKind::Budget, Some(start), before)
                    .await
                    .map(drop)
            }
        }
    }
}
