-- A spending limit per account per UTC day or month (both NULL: none),
-- counted in `rate_counters` under the scope `budget:user:<id>:<period>`.
ALTER TABLE users ADD COLUMN budget_limit INTEGER CHECK (budget_limit > 0);
ALTER TABLE users ADD COLUMN budget_period TEXT CHECK (budget_period IN ('day', 'month'));
-- When the account wants an email (NULL: never), and the marks of the
-- emails sent: when the balance alert of the current crossing went, and the
-- start of the last budget period alerted. Hosts take a mark with a
-- conditional UPDATE before sending, so one of them sends.
ALTER TABLE users ADD COLUMN alert_balance_below INTEGER CHECK (alert_balance_below >= 0);
ALTER TABLE users ADD COLUMN alert_budget_percent INTEGER
    CHECK (alert_budget_percent BETWEEN 1 AND 100);
ALTER TABLE users ADD COLUMN alerted_balance INTEGER;
ALTER TABLE users ADD COLUMN alerted_budget INTEGER;
