//! The adapter's training pairs and their classes (method notes 4.1).
//!
//! For each training query the candidates are its labelled positives together with the
//! retriever's mined top-K, ranked together by the retriever's score. The retriever "predicts
//! relevant" the candidates within the first `r` places; with the gold label that gives four
//! classes: TP (labelled, predicted), FN (labelled, ranked below r), FP (unlabelled but
//! predicted: where false negatives hide) and TN. The adapter's target is the gold label.

use crate::train::data::TrainSet;
use crate::train::mining::MinedPool;

/// The retriever's outcome for one (query, candidate) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum PairClass {
    TruePositive,
    FalseNegative,
    FalsePositive,
    TrueNegative,
}

impl PairClass {
    pub const ALL: [PairClass; 4] = [
        PairClass::TruePositive,
        PairClass::FalseNegative,
        PairClass::FalsePositive,
        PairClass::TrueNegative,
    ];

    /// From the gold label and the retriever's rank (0-based) against the cut-off `r`.
    pub fn of(labelled: bool, rank: usize, r: usize) -> Self {
        match (labelled, rank < r) {
            (true, true) => PairClass::TruePositive,
            (true, false) => PairClass::FalseNegative,
            (false, true) => PairClass::FalsePositive,
            (false, false) => PairClass::TrueNegative,
        }
    }

    /// The adapter's target: 1 for labelled positives (TP, FN), 0 otherwise.
    pub fn target(self) -> f32 {
        match self {
            PairClass::TruePositive | PairClass::FalseNegative => 1.0,
            _ => 0.0,
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn short_name(self) -> &'static str {
        ["TP", "FN", "FP", "TN"][self.index()]
    }
}

/// One query's pairs, in the retriever's rank order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueryPairs {
    /// Row of the query in the embedding matrix the pairs were built from.
    pub query: usize,
    /// Corpus indices.
    pub docs: Vec<u32>,
    /// Raw similarities (before 1/tau).
    pub scores: Vec<f32>,
    pub classes: Vec<PairClass>,
}

impl QueryPairs {
    pub fn len(&self) -> usize {
        self.docs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }
}

/// Pairs of every query of `set` from a pool mined for it (the pool's candidates exclude the
/// labelled positives; they are merged back here with their scores in the same snapshot).
/// Ties in score keep the positive first (the retriever cannot tell them apart, and the
/// labelled document is the conservative choice), then lower corpus index.
pub fn label_pairs(set: &TrainSet, pool: &MinedPool, r: usize) -> Vec<QueryPairs> {
    set.queries
        .iter()
        .enumerate()
        .map(|(qi, q)| {
            let mut all: Vec<(u32, f32, bool)> = q
                .positives
                .iter()
                .map(|&d| (d as u32, pool.score(qi, d), true))
                .chain(pool.candidates[qi].iter().map(|&(d, s)| (d, s, false)))
                .collect();
            all.sort_by(|a, b| b.1.total_cmp(&a.1).then(b.2.cmp(&a.2)).then(a.0.cmp(&b.0)));
            QueryPairs {
                query: qi,
                docs: all.iter().map(|x| x.0).collect(),
                scores: all.iter().map(|x| x.1).collect(),
                classes: all
                    .iter()
                    .enumerate()
                    .map(|(rank, x)| PairClass::of(x.2, rank, r))
                    .collect(),
            }
        })
        .collect()
}

/// Counts per class over all pairs, in [`PairClass::ALL`] order.
pub fn class_counts(pairs: &[QueryPairs]) -> [usize; 4] {
    let mut n = [0usize; 4];
    for p in pairs {
        for c in &p.classes {
            n[c.index()] += 1;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::beir::Document;
    use crate::train::data::TrainQuery;

    #[test]
    fn classes_follow_rank_and_label() {
        // one query, 6 docs on a line: scores 0.9, 0.8, ... by corpus index
        let dim = 1;
        let doc_embeddings: Vec<f32> = vec![0.9, 0.8, 0.7, 0.6, 0.5, 0.4];
        let set = TrainSet {
            corpus: (0..6)
                .map(|i| Document {
                    id: format!("d{i}"),
                    text: String::new(),
                })
                .collect(),
            queries: vec![TrainQuery {
                id: "q".into(),
                text: String::new(),
                positives: vec![1, 4],
                given_negatives: Vec::new(),
            }],
            stats: Default::default(),
        };
        let pool = MinedPool {
            dim,
            query_embeddings: vec![1.0],
            doc_embeddings,
            candidates: vec![vec![(0, 0.9), (2, 0.7), (3, 0.6), (5, 0.4)]],
        };
        let p = &label_pairs(&set, &pool, 2)[0];
        assert_eq!(p.docs, vec![0, 1, 2, 3, 4, 5]);
        use PairClass::*;
        assert_eq!(
            p.classes,
            vec![
                FalsePositive,
                TruePositive,
                TrueNegative,
                TrueNegative,
                FalseNegative,
                TrueNegative
            ]
        );
        assert_eq!(class_counts(std::slice::from_ref(p)), [1, 1, 1, 3]);
        assert_eq!(TruePositive.target(), 1.0);
        assert_eq!(FalsePositive.target(), 0.0);
    }
}
