//! Ranking metrics with trec_eval semantics (pytrec_eval is the oracle the tests compare with).
//!
//! Per query, the run's documents are re-sorted by (score descending, doc id descending), which
//! is how trec_eval breaks ties; stored ranks and order are not trusted. A document is relevant
//! when its judgement is ≥ 1 (trec_eval's default relevance level); unjudged and negative
//! judgements are non-relevant and have gain 0.
//!
//! Metrics, for every cutoff k (keys `name@k`):
//! - `ndcg@k`: trec_eval `ndcg_cut`; gain = judged relevance, discount log2(rank + 1); the ideal
//!   ranking uses all positively judged docs of the query, retrieved or not.
//! - `mrr@k`: 1 / rank of the first relevant doc, 0 beyond k; `mrr` (no cutoff) is trec_eval
//!   `recip_rank`.
//! - `recall@k`: relevant docs in the top k / relevant docs judged.
//! - `p@k`: relevant docs in the top k / k (trec_eval `P`, which divides by k even when fewer
//!   docs were retrieved).
//! - `map@k`: trec_eval `map_cut`: sum of the precision at each relevant doc within the top k,
//!   divided by the number of relevant docs judged.
//!
//! Averaging (the `mean` of an [`Evaluation`]): over every query of the qrels, as `trec_eval -c`
//! does ("all queries in the qrels count"). A judged query missing from the run counts 0 for
//! every metric, and so does a judged query without any relevant doc. Run queries that the
//! qrels do not judge are ignored.

use crate::data::{Qrels, Run};
use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;

/// What to compute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalOptions {
    /// Cutoffs for every `@k` metric. Order and repeats do not matter; 0 is ignored.
    pub ks: Vec<usize>,
    /// Drop run entries whose doc id equals the query id before evaluating (BEIR's option for
    /// corpora where queries are also documents, e.g. duplicate-question datasets).
    pub ignore_identical_ids: bool,
}

impl Default for EvalOptions {
    /// BEIR's cutoffs plus 20: `[1, 3, 5, 10, 20, 100, 1000]`.
    fn default() -> Self {
        EvalOptions {
            ks: vec![1, 3, 5, 10, 20, 100, 1000],
            ignore_identical_ids: false,
        }
    }
}

/// The result of [`evaluate`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Evaluation {
    /// Every query that is both judged and in the run (including judged queries without a
    /// relevant doc, which score 0): metric key → value. Queries missing from the run are
    /// absent here, as in trec_eval's per-query output.
    pub per_query: BTreeMap<String, BTreeMap<String, f64>>,
    /// Metric key → mean over the evaluated queries (see the module docs); 0 when there are none.
    pub mean: BTreeMap<String, f64>,
    /// Number of queries averaged over: every query of the qrels.
    pub num_queries: usize,
    /// How many of those are missing from the run (each counted as 0).
    pub missing_queries: usize,
}

/// The five families of cutoff metrics, in display order.
const FAMILIES: [&str; 5] = ["ndcg", "mrr", "recall", "p", "map"];

/// Cutoffs sorted, deduplicated, without 0.
fn normalise_ks(ks: &[usize]) -> Vec<usize> {
    let mut ks: Vec<usize> = ks.iter().copied().filter(|&k| k > 0).collect();
    ks.sort_unstable();
    ks.dedup();
    ks
}

/// Metric keys in the order [`query_metrics`] produces values.
fn metric_keys(ks: &[usize]) -> Vec<String> {
    let mut keys: Vec<String> = ks
        .iter()
        .flat_map(|k| FAMILIES.iter().map(move |f| format!("{f}@{k}")))
        .collect();
    keys.push("mrr".to_owned());
    keys
}

/// trec_eval's ranking: score descending, then doc id descending (byte order, like `strcmp`).
/// Zeros of either sign compare equal, as with C's `<`.
fn trec_order(a: &(&str, f64), b: &(&str, f64)) -> Ordering {
    let key = |s: f64| if s == 0.0 { 0.0 } else { s };
    key(b.1).total_cmp(&key(a.1)).then_with(|| b.0.cmp(a.0))
}

/// All metric values of one query, in [`metric_keys`] order.
fn query_metrics(
    qid: &str,
    docs: &[(String, f64)],
    judged: &HashMap<String, i32>,
    ks: &[usize],
    ignore_identical_ids: bool,
) -> Vec<f64> {
    let mut ranked: Vec<(&str, f64)> = docs
        .iter()
        .filter(|(d, _)| !(ignore_identical_ids && d == qid))
        .map(|(d, s)| (d.as_str(), *s))
        .collect();
    ranked.sort_unstable_by(trec_order);
    // Relevance of each ranked doc; unjudged = 0.
    let rels: Vec<i32> = ranked
        .iter()
        .map(|(d, _)| judged.get(*d).copied().unwrap_or(0))
        .collect();
    let mut ideal: Vec<i32> = judged.values().copied().filter(|&r| r >= 1).collect();
    ideal.sort_unstable_by(|a, b| b.cmp(a));
    let num_rel = ideal.len();
    let first_rel = rels.iter().position(|&r| r >= 1); // 0-based
    let discount = |i: usize| ((i + 2) as f64).log2();
    let gain = |r: i32| if r >= 1 { f64::from(r) } else { 0.0 };

    let mut out = Vec::with_capacity(ks.len() * FAMILIES.len() + 1);
    for &k in ks {
        let top = &rels[..k.min(rels.len())];
        let dcg: f64 = top
            .iter()
            .enumerate()
            .map(|(i, &r)| gain(r) / discount(i))
            .sum();
        let idcg: f64 = ideal
            .iter()
            .take(k)
            .enumerate()
            .map(|(i, &r)| gain(r) / discount(i))
            .sum();
        let mut hits = 0usize;
        let mut ap_sum = 0.0;
        for (i, _) in top.iter().enumerate().filter(|(_, &r)| r >= 1) {
            hits += 1;
            ap_sum += hits as f64 / (i + 1) as f64;
        }
        let ndcg = if idcg > 0.0 { dcg / idcg } else { 0.0 };
        let mrr = match first_rel {
            Some(i) if i < k => 1.0 / (i + 1) as f64,
            _ => 0.0,
        };
        let (recall, map) = if num_rel > 0 {
            (hits as f64 / num_rel as f64, ap_sum / num_rel as f64)
        } else {
            (0.0, 0.0)
        };
        let p = hits as f64 / k as f64;
        out.extend_from_slice(&[ndcg, mrr, recall, p, map]);
    }
    out.push(first_rel.map_or(0.0, |i| 1.0 / (i + 1) as f64));
    out
}

/// Evaluates `run` against `qrels`; see the module docs for the metrics and the averaging rule.
pub fn evaluate(run: &Run, qrels: &Qrels, opts: &EvalOptions) -> Evaluation {
    let ks = normalise_ks(&opts.ks);
    let keys = metric_keys(&ks);
    let mut sums = vec![0.0f64; keys.len()];
    let mut eval = Evaluation::default();
    for (qid, judged) in qrels.iter() {
        let values = run
            .get(qid)
            .map(|docs| query_metrics(qid, docs, judged, &ks, opts.ignore_identical_ids));
        eval.num_queries += 1;
        match &values {
            Some(v) => sums.iter_mut().zip(v).for_each(|(s, x)| *s += x),
            None => eval.missing_queries += 1,
        }
        if let Some(v) = values {
            eval.per_query
                .insert(qid.to_owned(), keys.iter().cloned().zip(v).collect());
        }
    }
    let n = eval.num_queries;
    eval.mean = keys
        .into_iter()
        .zip(sums)
        .map(|(k, s)| (k, if n > 0 { s / n as f64 } else { 0.0 }))
        .collect();
    eval
}

/// Table label suffix for metrics without a cutoff.
const UNCUT: &str = " (no cutoff)";

/// Splits `family@k` into its parts; `None` for uncut keys like `mrr`.
fn split_key(key: &str) -> Option<(&str, usize)> {
    let (f, k) = key.split_once('@')?;
    Some((f, k.parse().ok()?))
}

impl Evaluation {
    /// One JSON object: the mean metrics as top-level keys, plus `num_queries`,
    /// `missing_queries` and `per_query` (query id → metric → value).
    pub fn to_json(&self) -> serde_json::Value {
        let mut obj = serde_json::Map::new();
        for (k, v) in &self.mean {
            obj.insert(k.clone(), serde_json::json!(v));
        }
        obj.insert("num_queries".into(), self.num_queries.into());
        obj.insert("missing_queries".into(), self.missing_queries.into());
        let per_query: serde_json::Map<String, serde_json::Value> = self
            .per_query
            .iter()
            .map(|(q, m)| (q.clone(), serde_json::json!(m)))
            .collect();
        obj.insert("per_query".into(), serde_json::Value::Object(per_query));
        serde_json::Value::Object(obj)
    }

    /// The mean metrics as an aligned text table: one row per metric family, one column per
    /// cutoff, then any uncut metric and the query counts.
    pub fn table(&self) -> String {
        let mut ks: Vec<usize> = self
            .mean
            .keys()
            .filter_map(|k| split_key(k).map(|(_, k)| k))
            .collect();
        ks.sort_unstable();
        ks.dedup();
        let mut families: Vec<&str> = FAMILIES.to_vec();
        for key in self.mean.keys() {
            if let Some((f, _)) = split_key(key) {
                if !families.contains(&f) {
                    families.push(f);
                }
            }
        }
        families.retain(|f| {
            self.mean
                .keys()
                .any(|k| split_key(k).is_some_and(|(g, _)| g == *f))
        });
        let headers: Vec<String> = ks.iter().map(|k| format!("@{k}")).collect();
        let width = headers.iter().map(String::len).max().unwrap_or(0).max(6);
        let label = families
            .iter()
            .map(|f| f.len())
            .chain(
                self.mean
                    .keys()
                    .filter(|k| split_key(k).is_none())
                    .map(|k| k.len() + UNCUT.len()),
            )
            .max()
            .unwrap_or(0)
            .max("metric".len());
        let mut out = String::new();
        if !ks.is_empty() {
            let _ = write!(out, "{:<label$}", "metric");
            for h in &headers {
                let _ = write!(out, "  {h:>width$}");
            }
            out.push('\n');
            for f in &families {
                let _ = write!(out, "{f:<label$}");
                for k in &ks {
                    match self.mean.get(&format!("{f}@{k}")) {
                        Some(v) => {
                            let _ = write!(out, "  {v:>width$.4}");
                        }
                        None => {
                            let _ = write!(out, "  {:>width$}", "-");
                        }
                    }
                }
                out.push('\n');
            }
        }
        for (k, v) in self.mean.iter().filter(|(k, _)| split_key(k).is_none()) {
            let name = format!("{k}{UNCUT}");
            let _ = writeln!(out, "{name:<label$}  {v:>width$.4}");
        }
        let _ = writeln!(
            out,
            "queries: {} ({} missing from the run, counted as 0)",
            self.num_queries, self.missing_queries
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::read_qrels;

    const EPS: f64 = 1e-12;

    fn run_of(queries: &[(&str, &[(&str, f64)])]) -> Run {
        let mut run = Run::new();
        for (q, docs) in queries {
            run.add_query(*q, docs.iter().map(|(d, s)| (d.to_string(), *s)).collect())
                .unwrap();
        }
        run
    }

    fn qrels_of(lines: &str) -> Qrels {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("q.tsv");
        std::fs::write(&p, format!("query-id\tcorpus-id\tscore\n{lines}")).unwrap();
        read_qrels(&p).unwrap()
    }

    fn opts(ks: &[usize]) -> EvalOptions {
        EvalOptions {
            ks: ks.to_vec(),
            ignore_identical_ids: false,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < EPS
    }

    #[test]
    fn ties_are_broken_by_doc_id_descending() {
        // All scores tie: trec_eval ranks b, then a2, then a10 (byte order, descending).
        let run = run_of(&[("q", &[("a10", 1.0), ("a2", 1.0), ("b", 1.0)])]);
        let qrels = qrels_of("q\ta10\t1\n");
        let e = evaluate(&run, &qrels, &opts(&[1, 3]));
        let m = &e.per_query["q"];
        assert!(close(m["mrr"], 1.0 / 3.0));
        assert!(close(m["recall@1"], 0.0));
        assert!(close(m["recall@3"], 1.0));
        // Stored order is not trusted either: a higher score wins regardless of position.
        let run = run_of(&[("q", &[("x", 0.1), ("a10", 0.2)])]);
        assert!(close(evaluate(&run, &qrels, &opts(&[1])).mean["mrr"], 1.0));
    }

    #[test]
    fn graded_ndcg_map_and_precision_by_hand() {
        // Ranking: d1 (rel 2), d2 (unjudged), d3 (rel 1), d4 (rel -1); d5 (rel 3) not retrieved.
        let run = run_of(&[("q", &[("d1", 4.0), ("d2", 3.0), ("d3", 2.0), ("d4", 1.0)])]);
        let qrels = qrels_of("q\td1\t2\nq\td3\t1\nq\td4\t-1\nq\td5\t3\n");
        let e = evaluate(&run, &qrels, &opts(&[2, 4, 10]));
        let m = &e.per_query["q"];
        let l = |r: f64| (r + 1.0).log2();
        let dcg4 = 2.0 / l(1.0) + 1.0 / l(3.0);
        let idcg4 = 3.0 / l(1.0) + 2.0 / l(2.0) + 1.0 / l(3.0);
        assert!(close(m["ndcg@4"], dcg4 / idcg4));
        assert!(close(m["ndcg@10"], dcg4 / idcg4));
        assert!(close(m["ndcg@2"], 2.0 / (3.0 + 2.0 / l(2.0))));
        assert!(close(m["map@4"], (1.0 + 2.0 / 3.0) / 3.0));
        assert!(close(m["map@2"], 1.0 / 3.0));
        assert!(close(m["p@2"], 0.5));
        // k beyond the list: P still divides by k, recall stays at what was retrieved.
        assert!(close(m["p@10"], 0.2));
        assert!(close(m["recall@10"], 2.0 / 3.0));
        assert!(close(m["mrr@2"], 1.0));
    }

    #[test]
    fn mrr_cut_and_uncut() {
        let run = run_of(&[("q", &[("a", 3.0), ("b", 2.0), ("c", 1.0)])]);
        let qrels = qrels_of("q\tc\t1\n");
        let m = &evaluate(&run, &qrels, &opts(&[1, 2, 3])).per_query["q"];
        assert!(close(m["mrr@2"], 0.0));
        assert!(close(m["mrr@3"], 1.0 / 3.0));
        assert!(close(m["mrr"], 1.0 / 3.0));
    }

    #[test]
    fn no_relevant_and_missing_queries_in_the_mean() {
        // q1: perfect; q2: judged but nothing relevant (averaged as 0);
        // q3: relevant docs but absent from the run (averaged as 0); q9: unjudged (ignored).
        let run = run_of(&[
            ("q1", &[("a", 1.0)]),
            ("q2", &[("a", 1.0)]),
            ("q9", &[("a", 1.0)]),
        ]);
        let qrels = qrels_of("q1\ta\t1\nq2\ta\t0\nq2\tb\t-2\nq3\ta\t1\n");
        let e = evaluate(&run, &qrels, &opts(&[1]));
        assert_eq!(e.num_queries, 3);
        assert_eq!(e.missing_queries, 1);
        assert_eq!(e.per_query.keys().collect::<Vec<_>>(), vec!["q1", "q2"]);
        assert!(e.per_query["q2"].values().all(|&v| v == 0.0));
        for key in ["ndcg@1", "mrr@1", "recall@1", "p@1", "map@1", "mrr"] {
            assert!(close(e.mean[key], 1.0 / 3.0), "{key}");
        }
    }

    #[test]
    fn ignore_identical_ids_drops_self_matches() {
        let run = run_of(&[("q", &[("q", 9.0), ("d", 1.0)])]);
        let qrels = qrels_of("q\td\t1\n");
        let mut o = opts(&[1]);
        assert!(close(evaluate(&run, &qrels, &o).mean["mrr"], 0.5));
        o.ignore_identical_ids = true;
        assert!(close(evaluate(&run, &qrels, &o).mean["mrr"], 1.0));
        assert!(close(evaluate(&run, &qrels, &o).mean["p@1"], 1.0));
    }

    #[test]
    fn empty_inputs_and_odd_cutoffs_do_not_panic() {
        let e = evaluate(&Run::new(), &Qrels::default(), &opts(&[0, 5, 5, 1]));
        assert_eq!(e.num_queries, 0);
        let want: std::collections::BTreeSet<String> = metric_keys(&[1, 5]).into_iter().collect();
        assert_eq!(
            e.mean
                .keys()
                .cloned()
                .collect::<std::collections::BTreeSet<_>>(),
            want
        );
        assert!(e.mean.values().all(|&v| v == 0.0));
        let run = run_of(&[("q", &[])]);
        let qrels = qrels_of("q\td\t1\n");
        let e = evaluate(&run, &qrels, &EvalOptions::default());
        assert!(e.mean.values().all(|&v| v == 0.0));
        assert!(!e.table().is_empty());
    }

    #[test]
    fn default_keys_json_and_table() {
        let run = run_of(&[("q", &[("d", 1.0)])]);
        let qrels = qrels_of("q\td\t1\n");
        let e = evaluate(&run, &qrels, &EvalOptions::default());
        for key in [
            "ndcg@10",
            "mrr@10",
            "mrr",
            "recall@1",
            "recall@10",
            "recall@100",
            "map@100",
            "p@10",
        ] {
            assert!(e.mean.contains_key(key), "{key}");
        }
        let j = e.to_json();
        assert_eq!(j["ndcg@10"], 1.0);
        assert_eq!(j["num_queries"], 1);
        assert_eq!(j["per_query"]["q"]["recall@1"], 1.0);
        let t = e.table();
        assert!(t.contains("ndcg"), "{t}");
        assert!(t.contains("@1000"), "{t}");
        assert!(t.lines().all(|l| !l.is_empty()));
    }
}
