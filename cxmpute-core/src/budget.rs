//! Spending budgets: what an API key may spend per UTC calendar day or
//! month of the broker's clock ([`ApiKey::budget`]).
//!
//! A period's spending is counted in the store, on every store alike, with
//! the rate counters' atomic add ([`UserStore::add_rate_usage`], one pair
//! of counters per key and period kind holding the current period; a new
//! period starts them again from zero, so a budget resets on its own):
//!
//! - `requests` counts what calls **held** at admission (their reservation),
//! - `tokens` counts what was **given back**: the part of a hold its
//!   settlement did not charge, or all of it for a call not admitted after
//!   all.
//!
//! Both only grow, so one atomic add answers "held so far less given back",
//! the period's spending plus what is still held. A call is admitted when,
//! after adding its reservation, that is within the limit; else its
//! reservation is given back at once and the call is refused (nothing held,
//! forwarded or charged). Every host, and every call, sees the store's one
//! count: hosts sharing a store **never spend more than the budget**
//! together, and a restart forgets nothing. What it costs: two store calls
//! per call of a key with a budget (none for other keys), and a hold whose
//! settlement is unknown (a crash) stays counted as spent for the period:
//! the error is on the side of spending less.
//!
//! [`UserStore::add_rate_usage`]: crate::store::UserStore::add_rate_usage

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::alerts::Alerter;
use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::keycache::{AccountLimits, KnownKey};
use crate::store::Store;
use crate::types::*;

/// The largest budget accepted: far beyond any real spending, small enough
/// that sums of holds never overflow.
const MAX_BUDGET: Credits = Credits(1_000_000_000_000_000);

/// Refuses a budget a key may not have: a limit of 0 (`null` removes a
/// budget) or beyond [`MAX_BUDGET`].
pub(crate) fn check_budget(b: &Budget) -> Result<()> {
    if b.limit.0 <= 0 {
        return Err(Error::InvalidInput(
            "`budget.limit` must be at least 1 micro-credit (null removes the budget)".into(),
        ));
    }
    if b.limit > MAX_BUDGET {
        return Err(Error::InvalidInput(format!(
            "`budget.limit` must be at most {}",
            MAX_BUDGET.0
        )));
    }
    Ok(())
}

/// The start of the period `now` falls in, and of the next one.
pub(crate) fn period_bounds(period: BudgetPeriod, now: Timestamp) -> (Timestamp, Timestamp) {
    const DAY_MS: i64 = 86_400_000;
    let day = now.day();
    let (start, next) = match period {
        BudgetPeriod::Day => (day, day.plus_days(1)),
        BudgetPeriod::Month => {
            let (y, m, _) = day.ymd();
            let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            // The first of a month always exists.
            let first = Day::from_ymd(y, m, 1).unwrap_or(day);
            (first, Day::from_ymd(ny, nm, 1).unwrap_or(day.plus_days(1)))
        }
    };
    (
        Timestamp(i64::from(start.0) * DAY_MS),
        Timestamp(i64::from(next.0) * DAY_MS),
    )
}

/// The store's name for the counters of one period kind of a key
/// (`whose` = `key`) or an account (`user`); a budget that changes from
/// days to months starts a fresh count.
fn scope(whose: &str, id: &str, period: BudgetPeriod) -> String {
    format!("budget:{whose}:{id}:{}", period.as_str())
}

/// The budgets of one host: the store and the clock they count by, and the
/// alerts a settlement may send.
#[derive(Clone)]
pub(crate) struct Budgets {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    alerts: Alerter,
}

impl std::fmt::Debug for Budgets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budgets").finish_non_exhaustive()
    }
}

impl Budgets {
    pub(crate) fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, alerts: Alerter) -> Self {
        Budgets {
            store,
            clock,
            alerts,
        }
    }

    /// The alerts.
    pub(crate) fn alerts(&self) -> &Alerter {
        &self.alerts
    }

    /// Holds `amount` against the budgets of the key and of its account
    /// for their current periods, or refuses the call (`BudgetExceeded`
    /// naming the budget, nothing left held of either). A key and account
    /// without budgets cost nothing.
    pub(crate) async fn admit(&self, known: &KnownKey, amount: Credits) -> Result<BudgetTicket> {
        let key = &known.key;
        let account = known.account;
        let alert =
            account.alerts.balance_below.is_some() || account.alerts.budget_percent.is_some();
        let mut ticket = BudgetTicket {
            alert: alert.then(|| AlertCheck {
                alerts: self.alerts.clone(),
                user: key.user_id.clone(),
                account,
            }),
            ..BudgetTicket::default()
        };
        if let Some(b) = key.budget {
            let scope = scope("key", key.id.as_str(), b.period);
            ticket.key = Some(self.hold(scope, b, amount, "this API key's").await?);
        }
        if let Some(b) = account.budget {
            let scope = scope("user", key.user_id.as_str(), b.period);
            match self.hold(scope, b, amount, "this account's").await {
                Ok(held) => ticket.account = Some(held),
                Err(e) => {
                    // The key's budget gives back what it counted.
                    ticket.cancel().await;
                    return Err(e);
                }
            }
        }
        Ok(ticket)
    }

    /// Holds `amount` against one budget, or refuses (nothing left held).
    async fn hold(
        &self,
        scope: String,
        budget: Budget,
        amount: Credits,
        whose: &str,
    ) -> Result<Held> {
        let held = u64::try_from(amount.0).unwrap_or(0);
        let (start, next) = period_bounds(budget.period, self.clock.now());
        let add = RateUsage {
            requests: held,
            tokens: 0,
        };
        let Some(total) = self.store.add_rate_usage(&scope, start, add).await? else {
            // Another host already counts a later period: this host's clock
            // is behind; refusing is the side that cannot overspend.
            return Err(Error::Unavailable {
                message: "the budget's period is changing; try again".into(),
                source: None,
            });
        };
        let limit = u64::try_from(budget.limit.0).unwrap_or(0);
        let counted = total.requests.saturating_sub(total.tokens);
        if counted > limit {
            let back = RateUsage {
                requests: 0,
                tokens: held,
            };
            // Not giving it back only refuses more later; the refusal stands.
            if let Err(e) = self.store.add_rate_usage(&scope, start, back).await {
                tracing::warn!(error = %e, scope, "giving a refused call's budget hold back failed");
            }
            let spent = counted.saturating_sub(held);
            return Err(Error::BudgetExceeded(format!(
                "{whose} budget of {} micro-credits per {} is used up: {} spent or held, \
                 this call needs {}; it starts again at {} 00:00 UTC",
                limit,
                budget.period.as_str(),
                spent,
                held,
                next.day(),
            )));
        }
        Ok(Held {
            store: self.store.clone(),
            scope,
            start,
            amount: held,
            counted,
            done: AtomicBool::new(false),
        })
    }

    /// What the account's budget counts this period (spent, or held by
    /// calls under way): zero in a period nothing was counted in yet.
    pub(crate) async fn account_spent(&self, user: &UserId, budget: Budget) -> Result<Credits> {
        let scope = scope("user", user.as_str(), budget.period);
        let (start, _) = period_bounds(budget.period, self.clock.now());
        let total = self
            .store
            .add_rate_usage(&scope, start, RateUsage::default())
            .await?
            .unwrap_or_default();
        let counted = total.requests.saturating_sub(total.tokens);
        Ok(Credits(i64::try_from(counted).unwrap_or(i64::MAX)))
    }
}

/// What a call holds of its key's and its account's budgets, until its
/// settlement says what was charged; and the alerts it may then send.
#[derive(Debug, Default)]
pub(crate) struct BudgetTicket {
    key: Option<Held>,
    account: Option<Held>,
    alert: Option<AlertCheck>,
}

/// What a settlement needs to decide whether an alert may be due.
#[derive(Debug)]
struct AlertCheck {
    alerts: Alerter,
    user: UserId,
    account: AccountLimits,
}

struct Held {
    store: Arc<dyn Store>,
    scope: String,
    start: Timestamp,
    amount: u64,
    /// What the budget counted once this hold was added.
    counted: u64,
    done: AtomicBool,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held")
            .field("scope", &self.scope)
            .field("amount", &self.amount)
            .finish_non_exhaustive()
    }
}

impl BudgetTicket {
    /// The call was settled and charged `charged`: the rest of its holds
    /// goes back to the period they were held in (a period already over is
    /// left); then an alert that may be due is looked at, off this path.
    pub(crate) async fn settled(&self, charged: Credits) {
        let c = u64::try_from(charged.0).unwrap_or(0);
        if let Some(h) = &self.key {
            h.give_back(|amount| amount.saturating_sub(c)).await;
        }
        let mut counted = None;
        if let Some(h) = &self.account {
            counted = h.give_back(|amount| amount.saturating_sub(c)).await;
        }
        if let Some(a) = &self.alert {
            a.alerts.settled(&a.user, &a.account, charged, counted);
        }
    }

    /// The call was not admitted after all: all of its holds go back.
    pub(crate) async fn cancel(&self) {
        for h in [&self.key, &self.account].into_iter().flatten() {
            h.give_back(|amount| amount).await;
        }
    }
}

impl Held {
    /// Gives `back(amount)` back; what the budget counts after it (after
    /// the admission's add when nothing went back), or `None` when this
    /// hold was given back before or the store did not answer.
    async fn give_back(&self, back: impl FnOnce(u64) -> u64) -> Option<u64> {
        if self.done.swap(true, Ordering::AcqRel) {
            return None;
        }
        let tokens = back(self.amount);
        if tokens == 0 {
            return Some(self.counted);
        }
        let add = RateUsage {
            requests: 0,
            tokens,
        };
        // A lost give-back leaves the period counting more than was spent:
        // later calls are refused sooner, never admitted past the budget.
        match self
            .store
            .add_rate_usage(&self.scope, self.start, add)
            .await
        {
            Ok(total) => total.map(|t| t.requests.saturating_sub(t.tokens)),
            Err(e) => {
                tracing::warn!(error = %e, scope = self.scope, "giving a budget hold back failed");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(y: i32, m: u32, d: u32, ms: i64) -> Timestamp {
        Timestamp(i64::from(Day::from_ymd(y, m, d).unwrap().0) * 86_400_000 + ms)
    }

    #[test]
    fn periods_are_utc_calendar_days_and_months() {
        let now = at(2026, 12, 31, 86_399_999);
        assert_eq!(
            period_bounds(BudgetPeriod::Day, now),
            (at(2026, 12, 31, 0), at(2027, 1, 1, 0))
        );
        assert_eq!(
            period_bounds(BudgetPeriod::Month, now),
            (at(2026, 12, 1, 0), at(2027, 1, 1, 0))
        );
        assert_eq!(
            period_bounds(BudgetPeriod::Month, at(2028, 2, 29, 5)),
            (at(2028, 2, 1, 0), at(2028, 3, 1, 0))
        );
        assert_eq!(
            period_bounds(BudgetPeriod::Day, at(2026, 3, 1, 0)),
            (at(2026, 3, 1, 0), at(2026, 3, 2, 0))
        );
    }

    #[test]
    fn a_budget_must_be_positive_and_bounded() {
        let b = |l: i64| Budget {
            limit: Credits(l),
            period: BudgetPeriod::Day,
        };
        assert!(check_budget(&b(1)).is_ok());
        assert!(check_budget(&b(0)).is_err());
        assert!(check_budget(&b(-5)).is_err());
        assert!(check_budget(&b(MAX_BUDGET.0 + 1)).is_err());
    }
}
