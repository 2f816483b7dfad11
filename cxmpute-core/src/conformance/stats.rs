//! Conformance cases of [`StatsStore`](crate::store::StatsStore): usage
//! counters.

use std::sync::Arc;

use crate::store::Store;
use crate::types::*;

use super::fixtures::*;

fn counters(requests: u64, charged: i64, buckets: Vec<u64>) -> StatsCounters {
    StatsCounters {
        requests,
        failures: requests / 4,
        input_tokens: requests * 10,
        output_tokens: requests * 20,
        units: requests * 3,
        latency_ms_sum: requests * 100,
        latency_buckets: buckets,
        charged,
        rewarded: charged / 2,
    }
}

/// A batch applied twice adds once; batches with other ids add up.
pub async fn record_stats_is_idempotent_per_batch(store: Arc<dyn Store>) {
    let day = at(0).day();
    let batch = StatsBatch {
        id: "host-a:1".into(),
        deltas: vec![(day, "network".into(), counters(4, 400, vec![1, 3]))],
    };
    store.record_stats(&batch).await.unwrap();
    store.record_stats(&batch).await.unwrap();
    assert_eq!(
        store.stats("network", day, day).await.unwrap(),
        vec![(day, counters(4, 400, vec![1, 3]))]
    );
    let second = StatsBatch {
        id: "host-a:2".into(),
        deltas: vec![(day, "network".into(), counters(8, 800, vec![0, 1, 7]))],
    };
    store.record_stats(&second).await.unwrap();
    assert_eq!(
        store.stats("network", day, day).await.unwrap(),
        vec![(day, counters(12, 1_200, vec![1, 4, 7]))]
    );
}

/// `stats` returns one scope's days within the range, inclusive, by day.
pub async fn stats_over_day_range(store: Arc<dyn Store>) {
    let d0 = Day::from_ymd(2026, 1, 1).unwrap();
    let mut deltas = Vec::new();
    for i in 0..6 {
        deltas.push((
            d0.plus_days(i),
            "endpoint:/v1/chat/completions".to_owned(),
            counters(1 + i as u64, 10, vec![1]),
        ));
        deltas.push((
            d0.plus_days(i),
            "endpoint:/v1/embeddings".to_owned(),
            counters(100, 1, vec![]),
        ));
    }
    // Two deltas for the same day and scope in one batch add up.
    deltas.push((
        d0.plus_days(2),
        "endpoint:/v1/chat/completions".to_owned(),
        counters(4, 5, vec![0, 2]),
    ));
    store
        .record_stats(&StatsBatch {
            id: "b1".into(),
            deltas,
        })
        .await
        .unwrap();

    let got = store
        .stats(
            "endpoint:/v1/chat/completions",
            d0.plus_days(1),
            d0.plus_days(3),
        )
        .await
        .unwrap();
    let mut day2 = counters(3, 10, vec![1]);
    day2.add(&counters(4, 5, vec![0, 2]));
    assert_eq!(
        got,
        vec![
            (d0.plus_days(1), counters(2, 10, vec![1])),
            (d0.plus_days(2), day2),
            (d0.plus_days(3), counters(4, 10, vec![1])),
        ]
    );
    assert!(store
        .stats(
            "endpoint:/v1/chat/completions",
            d0.plus_days(3),
            d0.plus_days(1)
        )
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .stats("endpoint:/v1/chat", d0, d0.plus_days(9))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        store
            .stats(
                "endpoint:/v1/embeddings",
                d0.plus_days(-5),
                d0.plus_days(50)
            )
            .await
            .unwrap()
            .len(),
        6
    );
}

/// `stats_by_prefix` sums each matching scope over the range.
pub async fn stats_by_prefix_sums_scopes(store: Arc<dyn Store>) {
    let d0 = Day::from_ymd(2026, 3, 1).unwrap();
    let deltas = vec![
        (d0, "model:chat:a".to_owned(), counters(1, 10, vec![1, 0])),
        (
            d0.plus_days(1),
            "model:chat:a".to_owned(),
            counters(2, 20, vec![0, 2]),
        ),
        (
            d0.plus_days(5),
            "model:chat:a".to_owned(),
            counters(50, 500, vec![]),
        ),
        (d0, "model:chat:b".to_owned(), counters(3, 30, vec![3])),
        (d0, "model:embeddings:e".to_owned(), counters(7, 70, vec![])),
        (d0, "model:chatx".to_owned(), counters(9, 90, vec![])),
        (d0, "app:model:chat:a".to_owned(), counters(11, 110, vec![])),
    ];
    store
        .record_stats(&StatsBatch {
            id: "b".into(),
            deltas,
        })
        .await
        .unwrap();

    let mut a = counters(1, 10, vec![1, 0]);
    a.add(&counters(2, 20, vec![0, 2]));
    let mut got = store
        .stats_by_prefix("model:chat:", d0, d0.plus_days(1))
        .await
        .unwrap();
    got.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        got,
        vec![
            ("model:chat:a".to_owned(), a),
            ("model:chat:b".to_owned(), counters(3, 30, vec![3])),
        ]
    );
    let mut all = store
        .stats_by_prefix("model:", d0, d0)
        .await
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect::<Vec<_>>();
    all.sort();
    assert_eq!(
        all,
        [
            "model:chat:a",
            "model:chat:b",
            "model:chatx",
            "model:embeddings:e"
        ]
    );
    assert!(store
        .stats_by_prefix("model:chat:", d0.plus_days(2), d0.plus_days(4))
        .await
        .unwrap()
        .is_empty());
}
