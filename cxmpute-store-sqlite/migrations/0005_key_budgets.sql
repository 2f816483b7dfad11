-- A spending limit per API key per UTC day or month (both NULL: none).
-- What was spent in the current period is counted in `rate_counters`
-- under the scope `budget:key:<id>:<period>`.
ALTER TABLE api_keys ADD COLUMN budget_limit INTEGER CHECK (budget_limit > 0);
ALTER TABLE api_keys ADD COLUMN budget_period TEXT CHECK (budget_period IN ('day', 'month'));
