//! Usage counters per scope and day, kept twice (by scope for range reads,
//! by day for prefix reads) and added to in batches, each chunk of a batch
//! applied exactly once.

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use aws_sdk_dynamodb::types::AttributeValue;
use cxmpute_core::{Day, Result, StatsBatch, StatsCounters, StatsStore};

use crate::db::{DynamoStore, Fail, Query, Tx};
use crate::item::{n, s, Ex, Item, ItemBuilder, Rd, PK, SK};
use crate::schema;

/// Deltas per stats transaction: each takes two counter updates, plus one
/// marker and at most one day-registry put per delta, within the cap of 100.
const STATS_CHUNK: usize = 30;

fn decode_counters(it: &Item) -> Result<StatsCounters> {
    let r = Rd::new(it, "stats");
    let mut buckets = Vec::new();
    while let Some(b) = r.opt_num::<u64>(&format!("b{}", buckets.len()))? {
        buckets.push(b);
    }
    Ok(StatsCounters {
        requests: r.num_or_zero("requests")?,
        failures: r.num_or_zero("failures")?,
        input_tokens: r.num_or_zero("input_tokens")?,
        output_tokens: r.num_or_zero("output_tokens")?,
        units: r.num_or_zero("units")?,
        latency_ms_sum: r.num_or_zero("latency_ms_sum")?,
        latency_buckets: buckets,
        charged: r.num_or_zero("charged")?,
        rewarded: r.num_or_zero("rewarded")?,
    })
}

/// `ADD` every counter (zeros too: a histogram bucket that was added to must
/// exist, so the histogram keeps its length) and name the scope and day.
fn counters_update(ex: &mut Ex, c: &StatsCounters, scope: &str, day: Day) -> String {
    let mut adds = Vec::new();
    let mut add = |ex: &mut Ex, name: &str, v: AttributeValue| {
        adds.push(format!("{} {}", ex.n(name), ex.v(v)));
    };
    add(ex, "requests", n(c.requests));
    add(ex, "failures", n(c.failures));
    add(ex, "input_tokens", n(c.input_tokens));
    add(ex, "output_tokens", n(c.output_tokens));
    add(ex, "units", n(c.units));
    add(ex, "latency_ms_sum", n(c.latency_ms_sum));
    add(ex, "charged", n(c.charged));
    add(ex, "rewarded", n(c.rewarded));
    for (i, b) in c.latency_buckets.iter().enumerate() {
        add(ex, &format!("b{i}"), n(b));
    }
    format!(
        "ADD {} SET {} = {}, {} = {}",
        adds.join(", "),
        ex.n("scope"),
        ex.v(s(scope)),
        ex.n("day"),
        ex.v(n(day.0))
    )
}

fn between(pk: String, lo: String, hi: String) -> Query {
    let mut ex = Ex::new();
    let key_cond = format!(
        "{} = {} AND {} BETWEEN {} AND {}",
        ex.n(PK),
        ex.v(s(pk)),
        ex.n(SK),
        ex.v(s(lo)),
        ex.v(s(hi))
    );
    Query {
        key_cond,
        ex,
        forward: true,
        ..Query::default()
    }
}

#[async_trait]
impl StatsStore for DynamoStore {
    async fn record_stats(&self, batch: &StatsBatch) -> Result<()> {
        let what = "recording stats";
        // One update per item per transaction: merge repeated (day, scope) first.
        // The merge is ordered, so a retried batch splits into the same chunks.
        let mut merged: BTreeMap<(Day, String), StatsCounters> = BTreeMap::new();
        for (day, scope, c) in &batch.deltas {
            merged.entry((*day, scope.clone())).or_default().add(c);
        }
        let merged: Vec<_> = merged.into_iter().collect();
        let chunks: Vec<&[((Day, String), StatsCounters)]> = if merged.is_empty() {
            vec![&[]]
        } else {
            merged.chunks(STATS_CHUNK).collect()
        };
        for (i, chunk) in chunks.into_iter().enumerate() {
            let mut tx = Tx::new(self);
            // The chunk's marker: a chunk applied before (a retried batch) is skipped.
            let mut ex = Ex::new();
            let cond = ex.absent();
            tx.put(
                ItemBuilder::at(schema::stats_batch(&batch.id, i)).build(),
                Some(cond),
                ex,
            )?;
            let mut days = BTreeSet::new();
            for ((day, scope), c) in chunk {
                for key in [
                    schema::stats(scope, *day),
                    schema::stats_by_day(*day, scope),
                ] {
                    let mut ex = Ex::new();
                    let upd = counters_update(&mut ex, c, scope, *day);
                    tx.update(key, upd, None, ex)?;
                }
                days.insert(*day);
            }
            for day in days {
                let item = ItemBuilder::at(schema::stats_day(day))
                    .n("day", day.0)
                    .build();
                tx.put(item, None, Ex::new())?;
            }
            match self.transact(what, tx).await {
                Ok(()) | Err(Fail::Condition(_)) => {}
                Err(f) => return Err(f.into_error(what)),
            }
        }
        Ok(())
    }

    async fn stats(&self, scope: &str, from: Day, to: Day) -> Result<Vec<(Day, StatsCounters)>> {
        if from > to {
            return Ok(Vec::new());
        }
        let q = between(
            schema::stats_pk(scope),
            schema::day_sk(from),
            schema::day_sk(to),
        );
        self.query("reading stats", q)
            .await?
            .iter()
            .map(|it| Ok((Day(Rd::new(it, "stats").num("day")?), decode_counters(it)?)))
            .collect()
    }

    async fn stats_by_prefix(
        &self,
        prefix: &str,
        from: Day,
        to: Day,
    ) -> Result<Vec<(String, StatsCounters)>> {
        let what = "reading stats by prefix";
        if from > to {
            return Ok(Vec::new());
        }
        // Only days that have stats are visited, however wide the range.
        let days = self
            .query(
                what,
                between(
                    schema::STATS_DAYS_PK.to_owned(),
                    schema::day_sk(from),
                    schema::day_sk(to),
                ),
            )
            .await?;
        let mut out: BTreeMap<String, StatsCounters> = BTreeMap::new();
        for d in &days {
            let day = Day(Rd::new(d, "stats day").num("day")?);
            let q = Query::prefix(schema::stats_day_pk(day), format!("SCOPE#{prefix}"));
            for it in self.query(what, q).await? {
                let scope = Rd::new(&it, "stats").s("scope")?;
                out.entry(scope).or_default().add(&decode_counters(&it)?);
            }
        }
        Ok(out.into_iter().collect())
    }
}
