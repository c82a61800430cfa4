//! Held-out parts of a training set, chosen by hashing ids so that every method, seed and
//! run of an experiment holds out the same queries and the same positives:
//! - a **dev split** of queries, on which reranking's lambda is chosen;
//! - **planted false negatives**: a share of the labelled positives of queries with two or more
//!   positives, hidden from training so that they sit unlabelled among the mined candidates,
//!   where a false-negative detector should find them.

use super::data::TrainSet;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Salts, so the two selections are independent of each other.
const DEV_SALT: u64 = 0x5d3e_1a2b;
const PLANT_SALT: u64 = 0x91f0_77c4;

/// A uniform number in [0, 1) from a string.
fn unit(text: &str, salt: u64) -> f64 {
    (xxh3_64_with_seed(text.as_bytes(), salt) >> 11) as f64 / (1u64 << 53) as f64
}

/// Splits the queries into (train, dev): a query is in dev when the hash of its id falls below
/// `fraction`. The corpus is shared.
pub fn dev_split(set: &TrainSet, fraction: f64) -> (TrainSet, TrainSet) {
    let (dev, train): (Vec<_>, Vec<_>) = set
        .queries
        .iter()
        .cloned()
        .partition(|q| unit(&q.id, DEV_SALT) < fraction);
    let with = |queries| TrainSet {
        corpus: set.corpus.clone(),
        queries,
        stats: set.stats,
    };
    (with(train), with(dev))
}

/// Hides `round(fraction · n)` of the n labelled positives of every query with n ≥ 2 (at least
/// one, never all): the positives with the lowest hash of (query id, document id). Returns the
/// reduced set and, per query (same order), the hidden positives' corpus indices, sorted.
pub fn plant_false_negatives(set: &TrainSet, fraction: f64) -> (TrainSet, Vec<Vec<usize>>) {
    let mut reduced = set.clone();
    let mut planted = Vec::with_capacity(set.queries.len());
    for q in reduced.queries.iter_mut() {
        let n = q.positives.len();
        if n < 2 || fraction <= 0.0 {
            planted.push(Vec::new());
            continue;
        }
        let hide = ((fraction * n as f64).round() as usize).clamp(1, n - 1);
        let mut by_hash: Vec<usize> = q.positives.clone();
        by_hash.sort_by(|&a, &b| {
            let key = |d: usize| unit(&format!("{}\u{1f}{}", q.id, set.corpus[d].id), PLANT_SALT);
            key(a).total_cmp(&key(b)).then(a.cmp(&b))
        });
        let mut hidden: Vec<usize> = by_hash[..hide].to_vec();
        hidden.sort_unstable();
        q.positives.retain(|d| hidden.binary_search(d).is_err());
        planted.push(hidden);
    }
    (reduced, planted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::beir::Document;
    use crate::train::data::TrainQuery;

    fn set(positives: &[usize]) -> TrainSet {
        let corpus = (0..20)
            .map(|i| Document {
                id: format!("d{i}"),
                text: format!("doc {i}"),
            })
            .collect();
        let queries = (0..200)
            .map(|i| TrainQuery {
                id: format!("q{i}"),
                text: format!("query {i}"),
                positives: (0..positives[i % positives.len()]).collect(),
                given_negatives: Vec::new(),
            })
            .collect();
        TrainSet {
            corpus,
            queries,
            stats: Default::default(),
        }
    }

    #[test]
    fn dev_split_is_a_partition_by_id() {
        let s = set(&[1, 2]);
        let (train, dev) = dev_split(&s, 0.2);
        assert_eq!(train.queries.len() + dev.queries.len(), 200);
        assert!(
            (20..=60).contains(&dev.queries.len()),
            "{}",
            dev.queries.len()
        );
        let again = dev_split(&s, 0.2).1;
        assert_eq!(dev.queries, again.queries);
        assert!(dev
            .queries
            .iter()
            .all(|q| !train.queries.iter().any(|t| t.id == q.id)));
        assert_eq!(dev_split(&s, 0.0).1.queries.len(), 0);
    }

    #[test]
    fn planting_hides_half_never_all_and_only_multi_positive_queries() {
        let s = set(&[1, 2, 3, 6]);
        let (reduced, planted) = plant_false_negatives(&s, 0.5);
        for ((orig, red), hid) in s.queries.iter().zip(&reduced.queries).zip(&planted) {
            let n = orig.positives.len();
            let expect = if n < 2 {
                0
            } else {
                ((n as f64 * 0.5).round() as usize).clamp(1, n - 1)
            };
            assert_eq!(hid.len(), expect, "query {}", orig.id);
            assert_eq!(red.positives.len() + hid.len(), n);
            assert!(hid
                .iter()
                .all(|d| orig.positives.contains(d) && !red.positives.contains(d)));
        }
        // which positives are hidden differs between queries (hash of both ids)
        let sixes: Vec<&Vec<usize>> = planted.iter().filter(|h| h.len() == 3).collect();
        assert!(sixes.windows(2).any(|w| w[0] != w[1]));
        assert_eq!(plant_false_negatives(&s, 0.5).1, planted);
        assert!(plant_false_negatives(&s, 0.0).1.iter().all(Vec::is_empty));
    }
}
