//! Hard-negative mining from our own index: encode the corpus and the training queries with the
//! current encoder, take each query's exact top-K, and drop what must never be a negative —
//! the query's labelled positives, and a document whose id equals the query id (collections
//! where queries are themselves corpus documents).
//!
//! The pool keeps the embeddings it was mined with: samplers that look at geometry (TriSampler)
//! and the positive's score (SimANS) use the same snapshot as the ranking, and a resumed run
//! restores the snapshot instead of re-mining with a different model.

use super::data::TrainSet;
use crate::error::Result;
use crate::index::topk;
use crate::index::Corpus;

/// One query's candidates, best first: corpus index and raw similarity (before 1/tau).
pub type Candidates = Vec<(u32, f32)>;

/// What mining produced.
#[derive(Debug, Clone, PartialEq)]
pub struct MinedPool {
    pub dim: usize,
    /// `[queries × dim]`, in `TrainSet::queries` order.
    pub query_embeddings: Vec<f32>,
    /// `[corpus × dim]`.
    pub doc_embeddings: Vec<f32>,
    pub candidates: Vec<Candidates>,
}

impl MinedPool {
    /// Raw similarity of query `q` and document `d` in the mining snapshot.
    pub fn score(&self, q: usize, d: usize) -> f32 {
        let dim = self.dim;
        let a = &self.query_embeddings[q * dim..(q + 1) * dim];
        let b = &self.doc_embeddings[d * dim..(d + 1) * dim];
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }
}

/// Mining statistics, printed and logged at every refresh.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct MiningStats {
    pub queries: usize,
    pub top_k: usize,
    /// Candidates removed because they are labelled positives of the query.
    pub removed_positive: usize,
    /// Candidates removed because their id equals the query id.
    pub removed_same_id: usize,
    /// Queries left with fewer than K candidates (a small corpus).
    pub short_pools: usize,
    /// Distribution of labelled-positive scores (mean, 10/50/90th percentiles).
    pub positive: Summary,
    /// Scores of the best remaining candidate of each query.
    pub negative_rank1: Summary,
    /// Scores of every remaining candidate.
    pub negative_all: Summary,
    /// Share of labelled positives that ranked inside the top-K.
    pub positive_recall_at_k: f64,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Summary {
    pub mean: f64,
    pub p10: f64,
    pub p50: f64,
    pub p90: f64,
}

impl Summary {
    fn of(mut v: Vec<f32>) -> Summary {
        if v.is_empty() {
            return Summary::default();
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize] as f64;
        Summary {
            mean: v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64,
            p10: at(0.1),
            p50: at(0.5),
            p90: at(0.9),
        }
    }
}

impl std::fmt::Display for MiningStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = |x: &Summary| {
            format!(
                "mean {:.3} (p10 {:.3}, p50 {:.3}, p90 {:.3})",
                x.mean, x.p10, x.p50, x.p90
            )
        };
        writeln!(f, "mined top-{} for {} queries", self.top_k, self.queries)?;
        writeln!(
            f,
            "  removed: {} labelled positives, {} same-id documents; {} queries with a short pool",
            self.removed_positive, self.removed_same_id, self.short_pools
        )?;
        writeln!(f, "  positives       {}", s(&self.positive))?;
        writeln!(f, "  best negative   {}", s(&self.negative_rank1))?;
        writeln!(f, "  all candidates  {}", s(&self.negative_all))?;
        write!(
            f,
            "  positives inside the top-K: {:.1}%",
            100.0 * self.positive_recall_at_k
        )
    }
}

/// Ranks the corpus for every training query and filters the candidates, from embeddings of
/// the corpus and the queries made with the current encoder (the trainer encodes them).
pub fn mine_from_embeddings(
    set: &TrainSet,
    dim: usize,
    query_embeddings: Vec<f32>,
    doc_embeddings: Vec<f32>,
    top_k: usize,
    exclude_same_id: bool,
) -> Result<(MinedPool, MiningStats)> {
    let corpus = Corpus::from_f32(&doc_embeddings, dim)?;
    let hits = topk::search_batch(&corpus, &query_embeddings, search_depth(set, top_k))?;
    mine_from_hits(
        set,
        dim,
        query_embeddings,
        doc_embeddings,
        &hits,
        top_k,
        exclude_same_id,
    )
}

/// How many hits per query mining asks the index for: enough that removing the labelled
/// positives and a same-id document still leaves `top_k`.
pub fn search_depth(set: &TrainSet, top_k: usize) -> usize {
    let max_pos = set
        .queries
        .iter()
        .map(|q| q.positives.len())
        .max()
        .unwrap_or(0);
    (top_k + max_pos + 1).min(set.corpus.len())
}

/// [`mine_from_embeddings`] from hits already ranked (by any index, e.g. the GPU's): each query's
/// `search_depth` best documents, best first.
pub fn mine_from_hits(
    set: &TrainSet,
    dim: usize,
    query_embeddings: Vec<f32>,
    doc_embeddings: Vec<f32>,
    hits: &[Vec<topk::Hit>],
    top_k: usize,
    exclude_same_id: bool,
) -> Result<(MinedPool, MiningStats)> {
    if hits.len() != set.queries.len() {
        return Err(crate::error::Error::InvalidArgument(format!(
            "{} hit lists for {} training queries",
            hits.len(),
            set.queries.len()
        )));
    }
    let mut stats = MiningStats {
        queries: set.queries.len(),
        top_k,
        ..Default::default()
    };
    let (mut pos_scores, mut rank1, mut all) = (Vec::new(), Vec::new(), Vec::new());
    let (mut pos_total, mut pos_inside) = (0usize, 0usize);
    let mut candidates = Vec::with_capacity(set.queries.len());
    for (qi, (q, hits)) in set.queries.iter().zip(hits).enumerate() {
        let mut kept: Candidates = Vec::with_capacity(top_k);
        for (rank, hit) in hits.iter().enumerate() {
            if hit.index >= set.corpus.len() {
                return Err(crate::error::Error::InvalidArgument(format!(
                    "a hit of query {qi} names document {} of a corpus of {}",
                    hit.index,
                    set.corpus.len()
                )));
            }
            if set.is_positive(qi, hit.index) {
                stats.removed_positive += 1;
                if rank < top_k {
                    pos_inside += 1;
                }
            } else if exclude_same_id && set.corpus[hit.index].id == q.id {
                stats.removed_same_id += 1;
            } else if kept.len() < top_k {
                kept.push((hit.index as u32, hit.score));
            }
        }
        pos_total += q.positives.len();
        if kept.len() < top_k {
            stats.short_pools += 1;
        }
        if let Some(&(_, s)) = kept.first() {
            rank1.push(s);
        }
        all.extend(kept.iter().map(|&(_, s)| s));
        let qv = &query_embeddings[qi * dim..(qi + 1) * dim];
        for &p in &q.positives {
            let dv = &doc_embeddings[p * dim..(p + 1) * dim];
            pos_scores.push(qv.iter().zip(dv).map(|(a, b)| a * b).sum());
        }
        candidates.push(kept);
    }
    stats.positive = Summary::of(pos_scores);
    stats.negative_rank1 = Summary::of(rank1);
    stats.negative_all = Summary::of(all);
    stats.positive_recall_at_k = pos_inside as f64 / pos_total.max(1) as f64;
    Ok((
        MinedPool {
            dim,
            query_embeddings,
            doc_embeddings,
            candidates,
        },
        stats,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::beir::Document;
    use crate::train::data::{DataStats, TrainQuery};

    /// Four 2-d documents on a quarter circle; one query near document "q1".
    fn toy() -> (TrainSet, Vec<f32>, Vec<f32>) {
        let doc = |id: &str| Document {
            id: id.into(),
            text: String::new(),
        };
        let set = TrainSet {
            corpus: vec![doc("a"), doc("q1"), doc("b"), doc("c")],
            queries: vec![TrainQuery {
                id: "q1".into(),
                text: String::new(),
                positives: vec![2],
                given_negatives: vec![],
            }],
            stats: DataStats::default(),
        };
        let angle = |t: f32| [t.cos(), t.sin()];
        let docs: Vec<f32> = [0.0f32, 0.1, 0.2, 1.2]
            .iter()
            .flat_map(|&t| angle(t))
            .collect();
        (set, angle(0.12).to_vec(), docs)
    }

    #[test]
    fn positives_and_the_query_itself_are_removed_and_counted() {
        let (set, q, docs) = toy();
        let (pool, stats) =
            mine_from_embeddings(&set, 2, q.clone(), docs.clone(), 2, true).unwrap();
        // ranking by angle distance to 0.12: q1 (0.1), b (0.2, positive), a (0.0), c (1.2)
        let ids: Vec<u32> = pool.candidates[0].iter().map(|c| c.0).collect();
        assert_eq!(ids, [0, 3]);
        assert_eq!((stats.removed_positive, stats.removed_same_id), (1, 1));
        assert_eq!(stats.short_pools, 0);
        assert!((stats.positive_recall_at_k - 1.0).abs() < 1e-12);
        assert!((pool.score(0, 2) - (0.08f32).cos()).abs() < 1e-6);
        // scores are descending and equal the snapshot's dot products
        for &(d, s) in &pool.candidates[0] {
            assert!((pool.score(0, d as usize) - s).abs() < 1e-6);
        }
        // keeping same-id documents puts q1 back at rank 1
        let (pool, stats) = mine_from_embeddings(&set, 2, q, docs, 2, false).unwrap();
        assert_eq!(pool.candidates[0][0].0, 1);
        assert_eq!(stats.removed_same_id, 0);
    }

    #[test]
    fn hits_naming_no_document_are_refused() {
        let (set, q, docs) = toy();
        let bad = vec![vec![topk::Hit {
            index: 4,
            score: 1.0,
        }]];
        let err = mine_from_hits(&set, 2, q, docs, &bad, 2, true).unwrap_err();
        assert!(
            err.to_string().contains("document 4 of a corpus of 4"),
            "{err}"
        );
    }

    #[test]
    fn a_small_corpus_gives_short_pools() {
        let (set, q, docs) = toy();
        let (pool, stats) = mine_from_embeddings(&set, 2, q, docs, 10, true).unwrap();
        assert_eq!(pool.candidates[0].len(), 2);
        assert_eq!(stats.short_pools, 1);
    }
}
