//! Reading rows back into domain types, and the column lists that go with
//! them. Columns are read by position: the lists below and the readers are
//! written side by side so a join can put several of them in one row.

use cxmpute_core::secret::KeyHash;
use cxmpute_core::*;
use sqlx::sqlite::SqliteRow;
use sqlx::{Decode, Row, Sqlite, Type};

use crate::error::{corrupt, map, map_direct};

/// A row read back, by position: sqlx's, or one the writer read on its
/// connection directly (see `crate::writer`). The readers below take either.
pub(crate) trait StoredRow {
    /// The column at `i`.
    fn get<T: Column>(&self, i: usize) -> Result<T>;
}

/// A column type both ways of reading decode.
pub(crate) trait Column:
    for<'r> Decode<'r, Sqlite> + Type<Sqlite> + rusqlite::types::FromSql
{
}

impl<T> Column for T where T: for<'r> Decode<'r, Sqlite> + Type<Sqlite> + rusqlite::types::FromSql {}

impl StoredRow for SqliteRow {
    fn get<T: Column>(&self, i: usize) -> Result<T> {
        self.try_get(i).map_err(|e| map("reading a stored row", e))
    }
}

impl StoredRow for rusqlite::Row<'_> {
    fn get<T: Column>(&self, i: usize) -> Result<T> {
        rusqlite::Row::get(self, i).map_err(|e| map_direct("reading a stored row", e))
    }
}

/// One column by position.
pub(crate) fn col<T: Column>(row: &impl StoredRow, i: usize) -> Result<T> {
    row.get(i)
}

/// A stored key hash (32 bytes).
pub(crate) fn key_hash(bytes: Vec<u8>) -> Result<KeyHash> {
    let arr: [u8; 32] = bytes
        .try_into()
        .map_err(|b: Vec<u8>| corrupt(format!("key hash of {} bytes", b.len())))?;
    Ok(KeyHash(arr))
}

/// A `u64` counter kept in an INTEGER column (bit for bit, so it round-trips).
pub(crate) fn to_i64(v: u64) -> i64 {
    v as i64
}

/// The inverse of [`to_i64`].
pub(crate) fn to_u64(v: i64) -> u64 {
    v as u64
}

/// A value as JSON, for statements that take a whole batch of rows as one
/// array and read it back with `json_each`.
pub(crate) fn json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::Backend {
        message: "encoding a batch of writes".into(),
        source: Some(Box::new(e)),
    })
}

/// A stored `LIMIT`.
pub(crate) fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn suspension(reason: Option<String>, by: Option<String>, at: Option<i64>) -> Option<Suspension> {
    Some(Suspension {
        reason: reason?,
        by: by?,
        at: Timestamp(at?),
    })
}

/// The three suspension columns of a suspendable row.
pub(crate) fn suspension_cols(s: &Option<Suspension>) -> (Option<&str>, Option<&str>, Option<i64>) {
    match s {
        Some(s) => (Some(&s.reason), Some(&s.by), Some(s.at.0)),
        None => (None, None, None),
    }
}

/// The columns of `users u` the reader below takes, in its order, for `concat!`.
macro_rules! user_cols {
    () => {
        concat!(
            "u.id, u.email, u.credits, u.is_admin, u.suspended_reason, u.suspended_by, ",
            "u.suspended_at, u.created_at, u.budget_limit, u.budget_period, ",
            "u.alert_balance_below, u.alert_budget_percent, u.alerted_balance, u.alerted_budget"
        )
    };
}
pub(crate) use user_cols;

/// A user from the columns of `user_cols!()` starting at `at`.
pub(crate) fn user(row: &impl StoredRow, at: usize) -> Result<User> {
    Ok(User {
        id: UserId::new(col::<String>(row, at)?),
        email: col(row, at + 1)?,
        credits: Credits(col(row, at + 2)?),
        is_admin: col(row, at + 3)?,
        suspended: suspension(col(row, at + 4)?, col(row, at + 5)?, col(row, at + 6)?),
        created_at: Timestamp(col(row, at + 7)?),
        budget: budget(col(row, at + 8)?, col(row, at + 9)?)?,
        alerts: Alerts {
            balance_below: col::<Option<i64>>(row, at + 10)?.map(Credits),
            budget_percent: col::<Option<i64>>(row, at + 11)?
                .map(|p| u8::try_from(p).map_err(|_| corrupt(format!("alert percent {p}"))))
                .transpose()?,
        },
        alerted: AlertMarks {
            balance: col::<Option<i64>>(row, at + 12)?.map(Timestamp),
            budget: col::<Option<i64>>(row, at + 13)?.map(Timestamp),
        },
    })
}

/// The column of an account's alert mark of `kind`.
pub(crate) fn alert_mark_col(kind: AlertKind) -> &'static str {
    match kind {
        AlertKind::Balance => "alerted_balance",
        AlertKind::Budget => "alerted_budget",
    }
}

/// The columns of `api_keys k` the reader below takes, in its order, for `concat!`.
macro_rules! key_cols {
    () => {
        concat!(
            "k.id, k.user_id, k.hash, k.name, k.prefix, k.credit_limit, k.credits_left, ",
            "k.permitted_routes, k.created_at, k.last_used_at, k.revoked_at, k.rpm, k.tpm, ",
            "k.budget_limit, k.budget_period, k.cache_ttl_secs, k.cache_shared"
        )
    };
}
pub(crate) use key_cols;
/// How many columns `key_cols!()` names (a query reading more after them
/// starts there).
pub(crate) const KEY_COLS: usize = 17;

/// An API key from the columns of `key_cols!()` starting at `at`.
pub(crate) fn api_key(row: &impl StoredRow, at: usize) -> Result<ApiKey> {
    let routes: String = col(row, at + 7)?;
    Ok(ApiKey {
        id: ApiKeyId::new(col::<String>(row, at)?),
        user_id: UserId::new(col::<String>(row, at + 1)?),
        hash: key_hash(col(row, at + 2)?)?,
        name: col(row, at + 3)?,
        prefix: col(row, at + 4)?,
        credit_limit: col::<Option<i64>>(row, at + 5)?.map(Credits),
        credits_left: col::<Option<i64>>(row, at + 6)?.map(Credits),
        permitted_routes: serde_json::from_str(&routes)
            .map_err(|e| corrupt(format!("permitted routes `{routes}`: {e}")))?,
        created_at: Timestamp(col(row, at + 8)?),
        last_used_at: col::<Option<i64>>(row, at + 9)?.map(Timestamp),
        revoked_at: col::<Option<i64>>(row, at + 10)?.map(Timestamp),
        rate_limits: RateLimits {
            rpm: col::<Option<i64>>(row, at + 11)?
                .map(|v| u32::try_from(v).map_err(|_| corrupt(format!("rpm {v}"))))
                .transpose()?,
            tpm: col::<Option<i64>>(row, at + 12)?.map(to_u64),
        },
        budget: budget(col(row, at + 13)?, col(row, at + 14)?)?,
        cache: KeyCacheSettings {
            ttl_secs: col::<Option<i64>>(row, at + 15)?
                .map(|t| u32::try_from(t).map_err(|_| corrupt(format!("cache ttl {t}"))))
                .transpose()?,
            shared: col(row, at + 16)?,
        },
    })
}

/// A key's or account's budget from its two columns (both set, or neither).
fn budget(limit: Option<i64>, period: Option<String>) -> Result<Option<Budget>> {
    match (limit, period) {
        (Some(limit), Some(period)) => Ok(Some(Budget {
            limit: Credits(limit),
            period: BudgetPeriod::parse(&period)
                .ok_or_else(|| corrupt(format!("budget period `{period}`")))?,
        })),
        _ => Ok(None),
    }
}

/// Permitted routes as stored: a JSON array of paths.
pub(crate) fn routes_json(routes: &[Route]) -> String {
    // Serialising plain enums into a JSON array cannot fail.
    serde_json::to_string(routes).unwrap_or_else(|_| "[]".into())
}

/// The columns of `providers p` the reader below takes, in its order, for `concat!`.
macro_rules! provider_cols {
    () => {
        concat!(
            "p.id, p.user_id, p.email, p.key_hash, p.earnings, p.suspended_reason, ",
            "p.suspended_by, p.suspended_at, p.created_at"
        )
    };
}
pub(crate) use provider_cols;

/// A provider from the columns of `provider_cols!()`.
pub(crate) fn provider(row: &SqliteRow) -> Result<Provider> {
    Ok(Provider {
        id: ProviderId::new(col::<String>(row, 0)?),
        user_id: col::<Option<String>>(row, 1)?.map(UserId::new),
        email: col(row, 2)?,
        key_hash: key_hash(col(row, 3)?)?,
        earnings: Credits(col(row, 4)?),
        suspended: suspension(col(row, 5)?, col(row, 6)?, col(row, 7)?),
        created_at: Timestamp(col(row, 8)?),
    })
}

/// The columns of `provisions n` the reader below takes, in its order, for `concat!`.
macro_rules! provision_cols {
    () => {
        concat!(
            "n.id, n.provider_id, n.endpoint, n.node_secret, n.device, n.country, n.region, ",
            "n.city, n.tier, n.state, n.last_heartbeat, n.created_at"
        )
    };
}
pub(crate) use provision_cols;

/// A provision from the columns of `provision_cols!()`.
pub(crate) fn provision(row: &SqliteRow) -> Result<Provision> {
    let device: String = col(row, 4)?;
    let state: String = col(row, 9)?;
    Ok(Provision {
        id: ProvisionId::new(col::<String>(row, 0)?),
        provider_id: ProviderId::new(col::<String>(row, 1)?),
        endpoint: col(row, 2)?,
        node_secret: col(row, 3)?,
        device: serde_json::from_str(&device)
            .map_err(|e| corrupt(format!("device diagnostics: {e}")))?,
        location: Location {
            country: col(row, 5)?,
            state: col(row, 6)?,
            city: col(row, 7)?,
        },
        tier: u8::try_from(col::<i64>(row, 8)?).map_err(|e| corrupt(format!("tier: {e}")))?,
        state: state.parse().map_err(corrupt)?,
        last_heartbeat: Timestamp(col(row, 10)?),
        created_at: Timestamp(col(row, 11)?),
    })
}

/// The columns of `pool_entries e` the reader below takes, in its order, for `concat!`.
macro_rules! pool_entry_cols {
    () => {
        concat!(
            "e.provision_id, e.provider_id, e.service, e.model, e.endpoint, e.node_secret, ",
            "e.tier, e.region"
        )
    };
}
pub(crate) use pool_entry_cols;

/// A pool entry from the columns of `pool_entry_cols!()`.
pub(crate) fn pool_entry(row: &SqliteRow) -> Result<PoolEntry> {
    let service: String = col(row, 2)?;
    Ok(PoolEntry {
        provision_id: ProvisionId::new(col::<String>(row, 0)?),
        provider_id: ProviderId::new(col::<String>(row, 1)?),
        service: service.parse().map_err(corrupt)?,
        model: col(row, 3)?,
        endpoint: col(row, 4)?,
        node_secret: col(row, 5)?,
        tier: u8::try_from(col::<i64>(row, 6)?).map_err(|e| corrupt(format!("tier: {e}")))?,
        region: col(row, 7)?,
    })
}

/// The columns of `reservations r` the reader below takes, in its order, for `concat!`.
macro_rules! reservation_cols {
    () => {
        "r.request_id, r.user_id, r.key_id, r.route, r.amount, r.created_at"
    };
}
pub(crate) use reservation_cols;

/// A reservation from the columns of `reservation_cols!()` starting at `at`.
pub(crate) fn reservation(row: &impl StoredRow, at: usize) -> Result<Reservation> {
    let route: String = col(row, at + 3)?;
    Ok(Reservation {
        request_id: RequestId::new(col::<String>(row, at)?),
        user_id: UserId::new(col::<String>(row, at + 1)?),
        key_id: ApiKeyId::new(col::<String>(row, at + 2)?),
        route: route.parse().map_err(corrupt)?,
        amount: Credits(col(row, at + 4)?),
        created_at: Timestamp(col(row, at + 5)?),
    })
}

/// The columns of `usage` the reader below takes, in its order, for
/// `concat!`: unqualified, so also the column list its rows are inserted with.
macro_rules! usage_cols {
    () => {
        concat!(
            "request_id, user_id, key_id, route, model, provision_id, provider_id, ",
            "input_tokens, output_tokens, units, success, latency_ms, app, at, charged, reward, ",
            "requested_model, cache_hit"
        )
    };
}
pub(crate) use usage_cols;

/// A usage record from the columns of `usage_cols!()`.
pub(crate) fn usage(row: &SqliteRow) -> Result<UsageRecord> {
    let route: String = col(row, 3)?;
    Ok(UsageRecord {
        request_id: RequestId::new(col::<String>(row, 0)?),
        user_id: UserId::new(col::<String>(row, 1)?),
        key_id: ApiKeyId::new(col::<String>(row, 2)?),
        route: route.parse().map_err(corrupt)?,
        model: col(row, 4)?,
        provision_id: col::<Option<String>>(row, 5)?.map(ProvisionId::new),
        provider_id: col::<Option<String>>(row, 6)?.map(ProviderId::new),
        input_tokens: to_u64(col(row, 7)?),
        output_tokens: to_u64(col(row, 8)?),
        units: to_u64(col(row, 9)?),
        success: col(row, 10)?,
        latency_ms: to_u64(col(row, 11)?),
        app: col(row, 12)?,
        at: Timestamp(col(row, 13)?),
        charged: Credits(col(row, 14)?),
        reward: Credits(col(row, 15)?),
        requested_model: col(row, 16)?,
        cache_hit: col(row, 17)?,
    })
}

/// The columns of `stats` the reader below takes, in its order, for
/// `concat!`: unqualified, so also the column list its rows are written with.
macro_rules! stats_cols {
    () => {
        concat!(
            "scope, day, requests, failures, input_tokens, output_tokens, units, ",
            "latency_ms_sum, latency_buckets, charged, rewarded"
        )
    };
}
pub(crate) use stats_cols;

/// A stats row's scope, day and counters, from the columns of `stats_cols!()`.
pub(crate) fn stats(row: &SqliteRow) -> Result<(String, Day, StatsCounters)> {
    let buckets: String = col(row, 8)?;
    let day: i64 = col(row, 1)?;
    Ok((
        col(row, 0)?,
        Day(i32::try_from(day).map_err(|e| corrupt(format!("day: {e}")))?),
        StatsCounters {
            requests: to_u64(col(row, 2)?),
            failures: to_u64(col(row, 3)?),
            input_tokens: to_u64(col(row, 4)?),
            output_tokens: to_u64(col(row, 5)?),
            units: to_u64(col(row, 6)?),
            latency_ms_sum: to_u64(col(row, 7)?),
            latency_buckets: serde_json::from_str(&buckets)
                .map_err(|e| corrupt(format!("latency buckets: {e}")))?,
            charged: col(row, 9)?,
            rewarded: col(row, 10)?,
        },
    ))
}

/// Columns, in order: `service, model, per_request, per_million_input_tokens, per_million_output_tokens, per_million_units`.
/// Columns, in order: `service, model, min_tier, target_nodes`.
pub(crate) fn catalogue_model(row: &SqliteRow) -> Result<CatalogueModel> {
    let service: String = col(row, 0)?;
    let min_tier: i64 = col(row, 2)?;
    let target_nodes: i64 = col(row, 3)?;
    Ok(CatalogueModel {
        service: service.parse().map_err(corrupt)?,
        model: col(row, 1)?,
        min_tier: u8::try_from(min_tier).map_err(corrupt)?,
        target_nodes: u32::try_from(target_nodes).map_err(corrupt)?,
    })
}

pub(crate) fn price(row: &SqliteRow) -> Result<PriceEntry> {
    let service: String = col(row, 0)?;
    Ok(PriceEntry {
        service: service.parse().map_err(corrupt)?,
        model: col(row, 1)?,
        per_request: Credits(col(row, 2)?),
        per_million_input_tokens: Credits(col(row, 3)?),
        per_million_output_tokens: Credits(col(row, 4)?),
        per_million_units: Credits(col(row, 5)?),
    })
}

/// Columns, in order: `id, title, banner, popup, starts_at, ends_at, placements`.
pub(crate) fn notification(row: &SqliteRow) -> Result<Notification> {
    let placements: String = col(row, 6)?;
    Ok(Notification {
        id: NotificationId::new(col::<String>(row, 0)?),
        title: col(row, 1)?,
        banner: col(row, 2)?,
        popup: col(row, 3)?,
        starts_at: Timestamp(col(row, 4)?),
        ends_at: Timestamp(col(row, 5)?),
        placements: serde_json::from_str(&placements)
            .map_err(|e| corrupt(format!("placements: {e}")))?,
    })
}
