//! How well a score finds false negatives: planted false negatives (labelled positives hidden
//! from training) are the positive class, the other mined candidates of the same query the
//! negative class. Reported per query (mean over queries that have both classes in their pool)
//! and pooled over all queries, as ROC-AUC (Mann–Whitney, ties counted half) and precision at
//! n = the number of planted false negatives (R-precision).

/// One query's candidates: a score per candidate and whether it is a planted false negative.
#[derive(Debug, Clone, Default)]
pub struct QueryScores {
    pub scores: Vec<f64>,
    pub planted: Vec<bool>,
}

/// Detection quality of one scorer.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Detection {
    /// Mean over queries of the per-query ROC-AUC.
    pub auc_per_query: f64,
    /// ROC-AUC over all candidates of all queries together.
    pub auc_pooled: f64,
    /// Mean over queries of precision at n = that query's planted count.
    pub precision_at_n: f64,
    /// Queries with at least one planted false negative and one other candidate.
    pub queries: usize,
    /// Planted false negatives found in the pools.
    pub planted: usize,
    pub candidates: usize,
}

/// ROC-AUC of `scores` for `positive`, ties counted half; `None` without both classes.
pub fn roc_auc(scores: &[f64], positive: &[bool]) -> Option<f64> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let (mut rank_sum, mut i) = (0.0f64, 0);
    let n_pos = positive.iter().filter(|&&p| p).count();
    let n_neg = scores.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let mid_rank = (i + j) as f64 / 2.0 + 1.0; // average 1-based rank of the tie group
        for &k in &idx[i..=j] {
            if positive[k] {
                rank_sum += mid_rank;
            }
        }
        i = j + 1;
    }
    let np = n_pos as f64;
    Some((rank_sum - np * (np + 1.0) / 2.0) / (np * n_neg as f64))
}

/// Precision of the top n (n = number of positives); a tie group straddling the cut counts
/// by its share of positives.
fn precision_at_n(scores: &[f64], positive: &[bool]) -> Option<f64> {
    let n = positive.iter().filter(|&&p| p).count();
    if n == 0 {
        return None;
    }
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let (mut hit, mut taken, mut i) = (0.0f64, 0usize, 0);
    while taken < n && i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let group = j - i + 1;
        let pos = idx[i..=j].iter().filter(|&&k| positive[k]).count() as f64;
        let take = group.min(n - taken);
        hit += pos * take as f64 / group as f64;
        taken += take;
        i = j + 1;
    }
    Some(hit / n as f64)
}

/// Detection quality over queries (queries without a planted candidate are skipped).
pub fn detection(queries: &[QueryScores]) -> Detection {
    let (mut auc_sum, mut prec_sum, mut nq) = (0.0, 0.0, 0usize);
    let (mut all_s, mut all_p) = (Vec::new(), Vec::new());
    for q in queries {
        if let (Some(a), Some(p)) = (
            roc_auc(&q.scores, &q.planted),
            precision_at_n(&q.scores, &q.planted),
        ) {
            auc_sum += a;
            prec_sum += p;
            nq += 1;
            all_s.extend_from_slice(&q.scores);
            all_p.extend_from_slice(&q.planted);
        }
    }
    let n = nq.max(1) as f64;
    Detection {
        auc_per_query: auc_sum / n,
        auc_pooled: roc_auc(&all_s, &all_p).unwrap_or(0.0),
        precision_at_n: prec_sum / n,
        queries: nq,
        planted: all_p.iter().filter(|&&p| p).count(),
        candidates: all_s.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_matches_pair_counting() {
        let s = [0.9, 0.8, 0.8, 0.3, 0.1, 0.5];
        let p = [true, false, true, false, false, true];
        // pairs (pos, neg): count pos > neg, ties half
        let mut wins = 0.0;
        let mut pairs = 0.0;
        for i in 0..6 {
            for j in 0..6 {
                if p[i] && !p[j] {
                    pairs += 1.0;
                    wins += if s[i] > s[j] {
                        1.0
                    } else if s[i] == s[j] {
                        0.5
                    } else {
                        0.0
                    };
                }
            }
        }
        assert!((roc_auc(&s, &p).unwrap() - wins / pairs).abs() < 1e-12);
        assert_eq!(roc_auc(&s, &[false; 6]), None);
        assert_eq!(roc_auc(&[1.0, 2.0], &[false, true]), Some(1.0));
    }

    #[test]
    fn precision_and_pooling() {
        let q1 = QueryScores {
            scores: vec![3.0, 2.0, 1.0, 0.0],
            planted: vec![true, false, true, false],
        };
        let q2 = QueryScores {
            scores: vec![1.0, 1.0],
            planted: vec![true, false],
        };
        let none = QueryScores {
            scores: vec![1.0],
            planted: vec![false],
        };
        let d = detection(&[q1, q2, none]);
        assert_eq!(d.queries, 2);
        assert_eq!(d.planted, 2 + 1);
        // q1: top 2 = {3.0 planted, 2.0 not} → 0.5; q2: tie group of 2, 1 taken, half planted → 0.5
        assert!((d.precision_at_n - 0.5).abs() < 1e-12);
        assert!((d.auc_per_query - (0.75 + 0.5) / 2.0).abs() < 1e-12);
    }
}
