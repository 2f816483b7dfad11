//! [`StatsStore`] for [`SqliteStore`]: usage counters per scope and day
//! (tables `stats` and `stats_batches`).

use std::collections::BTreeMap;

use async_trait::async_trait;
use cxmpute_core::*;

use crate::rows::{self, json, stats_cols, to_i64};
use crate::sql::*;
use crate::SqliteStore;

#[async_trait]
impl StatsStore for SqliteStore {
    async fn record_stats(&self, batch: &StatsBatch) -> Result<()> {
        let batch = batch.clone();
        self.writer
            .write(move |c| Box::pin(async move { record_stats(c, &batch).await }))
            .await
    }

    async fn stats(&self, scope: &str, from: Day, to: Day) -> Result<Vec<(Day, StatsCounters)>> {
        let scope = scope.to_owned();
        self.read(move |c| Box::pin(async move { stats(c, &scope, from, to).await }))
            .await
    }

    async fn stats_by_prefix(
        &self,
        prefix: &str,
        from: Day,
        to: Day,
    ) -> Result<Vec<(String, StatsCounters)>> {
        let prefix = prefix.to_owned();
        self.read(move |c| Box::pin(async move { stats_by_prefix(c, &prefix, from, to).await }))
            .await
    }
}

async fn record_stats(c: &mut Conn, batch: &StatsBatch) -> Result<()> {
    let q = sqlx::query("INSERT OR IGNORE INTO stats_batches (id) VALUES (?1)").bind(&batch.id);
    if execute(c, "recording a stats batch", q).await? == 0 {
        return Ok(()); // applied before
    }
    // Sum the batch first, so each (scope, day) is read and written once.
    let mut sums: BTreeMap<(&str, Day), StatsCounters> = BTreeMap::new();
    for (day, scope, delta) in &batch.deltas {
        sums.entry((scope.as_str(), *day)).or_default().add(delta);
    }
    // Read every row the batch adds to in one statement, and write them
    // back in another.
    let keys: Vec<(&str, i32)> = sums.keys().map(|(scope, day)| (*scope, day.0)).collect();
    let q = sqlx::query(concat!(
        "SELECT ",
        stats_cols!(),
        " FROM stats WHERE (scope, day) IN ",
        "(SELECT value ->> 0, value ->> 1 FROM json_each(?1))"
    ))
    .bind(json(&keys)?);
    let mut stored: BTreeMap<(String, Day), StatsCounters> = BTreeMap::new();
    for row in &fetch_all(c, "reading stats", q).await? {
        let (scope, day, counters) = rows::stats(row)?;
        stored.insert((scope, day), counters);
    }
    let mut totals = Vec::with_capacity(sums.len());
    for ((scope, day), delta) in sums {
        let mut total = stored.remove(&(scope.to_owned(), day)).unwrap_or_default();
        total.add(&delta);
        let buckets = serde_json::to_string(&total.latency_buckets).unwrap_or_else(|_| "[]".into());
        totals.push((
            scope,
            i64::from(day.0),
            to_i64(total.requests),
            to_i64(total.failures),
            to_i64(total.input_tokens),
            to_i64(total.output_tokens),
            to_i64(total.units),
            to_i64(total.latency_ms_sum),
            buckets,
            total.charged,
            total.rewarded,
        ));
    }
    let q = sqlx::query(concat!(
        "INSERT OR REPLACE INTO stats (",
        stats_cols!(),
        ") SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, ",
        "value ->> 5, value ->> 6, value ->> 7, value ->> 8, value ->> 9, value ->> 10 ",
        "FROM json_each(?1)"
    ))
    .bind(json(&totals)?);
    execute(c, "storing stats", q).await.map(drop)
}

async fn stats(c: &mut Conn, scope: &str, from: Day, to: Day) -> Result<Vec<(Day, StatsCounters)>> {
    let sql = concat!(
        "SELECT ",
        stats_cols!(),
        " FROM stats ",
        "WHERE scope = ?1 AND day BETWEEN ?2 AND ?3 ORDER BY day"
    );
    let q = sqlx::query(sql)
        .bind(scope)
        .bind(i64::from(from.0))
        .bind(i64::from(to.0));
    let found = fetch_all(c, "reading stats", q).await?;
    found
        .iter()
        .map(|r| rows::stats(r).map(|(_, d, s)| (d, s)))
        .collect()
}

/// The smallest string greater than every string starting with `prefix`, if
/// any: bounds an index range scan over the prefix.
fn prefix_upper_bound(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let mut next = last as u32 + 1;
        if (0xD800..0xE000).contains(&next) {
            next = 0xE000; // skip the surrogates, which are not chars
        }
        if let Some(ch) = char::from_u32(next) {
            chars.push(ch);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

async fn stats_by_prefix(
    c: &mut Conn,
    prefix: &str,
    from: Day,
    to: Day,
) -> Result<Vec<(String, StatsCounters)>> {
    let sql = concat!(
        "SELECT ",
        stats_cols!(),
        " FROM stats ",
        "WHERE scope >= ?1 AND (?2 IS NULL OR scope < ?2) AND day BETWEEN ?3 AND ?4"
    );
    let q = sqlx::query(sql)
        .bind(prefix)
        .bind(prefix_upper_bound(prefix))
        .bind(i64::from(from.0))
        .bind(i64::from(to.0));
    let found = fetch_all(c, "reading stats", q).await?;
    let mut out: BTreeMap<String, StatsCounters> = BTreeMap::new();
    for row in &found {
        let (scope, _, counters) = rows::stats(row)?;
        if scope.starts_with(prefix) {
            out.entry(scope).or_default().add(&counters);
        }
    }
    Ok(out.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::prefix_upper_bound;

    #[test]
    fn prefix_bounds() {
        assert_eq!(
            prefix_upper_bound("model:chat:").as_deref(),
            Some("model:chat;")
        );
        assert_eq!(prefix_upper_bound(""), None);
        assert_eq!(
            prefix_upper_bound("a\u{D7FF}").as_deref(),
            Some("a\u{E000}")
        );
        assert_eq!(prefix_upper_bound("a\u{10FFFF}").as_deref(), Some("b"));
    }
}
