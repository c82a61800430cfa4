//! The experiment's data: a BEIR folder split into what training may see and what it may not.
//!
//! From the source's training split: a **dev** split of queries (lambda of reranking is chosen
//! there; neither encoder nor adapter trains on it) and, among the remaining **fit** queries,
//! **planted false negatives** (half the positives of queries with two or more, hidden from
//! training). The source's test split is evaluated only. Everything is written as a BEIR
//! folder (`qrels/fit.tsv`, `dev.tsv`, `planted.tsv`, `test.tsv`) so training runs read it like
//! any other data and the split can be inspected.

use crate::data::beir::{self, BeirData, Document, Qrels};
use crate::error::{Error, Result};
use crate::train::data::{read_beir_train, TrainSet};
use crate::train::holdout::{dev_split, plant_false_negatives};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The prepared collection.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The written BEIR folder (training reads split `fit`).
    pub dir: PathBuf,
    pub corpus: Vec<Document>,
    /// Training queries with the planted positives removed.
    pub fit: TrainSet,
    /// Per `fit` query, its planted false negatives (corpus indices).
    pub planted: Vec<Vec<usize>>,
    pub dev: TrainSet,
    pub dev_qrels: Qrels,
    pub test: BeirData,
    pub summary: serde_json::Value,
}

fn write_qrels(path: &Path, rows: &[(String, String)]) -> Result<()> {
    let mut text = String::from("query-id\tcorpus-id\tscore\n");
    for (q, d) in rows {
        text.push_str(&format!("{q}\t{d}\t1\n"));
    }
    crate::util::atomic_write(path, |w| {
        std::io::Write::write_all(w, text.as_bytes()).map_err(|e| Error::io(path, e))
    })
}

fn pairs_of(set: &TrainSet) -> Vec<(String, String)> {
    set.queries
        .iter()
        .flat_map(|q| {
            q.positives
                .iter()
                .map(|&d| (q.id.clone(), set.corpus[d].id.clone()))
        })
        .collect()
}

/// Splits `source` (a BEIR folder with `train_split` and `test_split` qrels) into `out`.
pub fn prepare(
    source: &Path,
    out: &Path,
    train_split: &str,
    test_split: &str,
    dev_fraction: f64,
    plant_fraction: f64,
) -> Result<Prepared> {
    if !(0.0..1.0).contains(&dev_fraction) || !(0.0..1.0).contains(&plant_fraction) {
        return Err(Error::InvalidArgument(format!(
            "dev fraction ({dev_fraction}) and planted fraction ({plant_fraction}) must lie in [0, 1)"
        )));
    }
    let train = read_beir_train(source, train_split)?;
    let test = beir::read_beir_folder(source, test_split)?;
    let (fit_full, dev) = dev_split(&train, dev_fraction);
    let (fit_reduced, planted_full) = plant_false_negatives(&fit_full, plant_fraction);
    let dir = out.to_path_buf();
    std::fs::create_dir_all(dir.join("qrels")).map_err(|e| Error::io(&dir, e))?;
    for f in ["corpus.jsonl", "queries.jsonl"] {
        let (from, to) = (source.join(f), dir.join(f));
        std::fs::copy(&from, &to).map_err(|e| Error::io(&from, e))?;
    }
    let planted_rows: Vec<(String, String)> = fit_full
        .queries
        .iter()
        .zip(&planted_full)
        .flat_map(|(q, h)| {
            h.iter()
                .map(|&d| (q.id.clone(), train.corpus[d].id.clone()))
        })
        .collect();
    write_qrels(&dir.join("qrels/fit.tsv"), &pairs_of(&fit_reduced))?;
    write_qrels(&dir.join("qrels/dev.tsv"), &pairs_of(&dev))?;
    write_qrels(&dir.join("qrels/planted.tsv"), &planted_rows)?;
    let test_src = source.join("qrels").join(format!("{test_split}.tsv"));
    std::fs::copy(&test_src, dir.join("qrels/test.tsv")).map_err(|e| Error::io(&test_src, e))?;

    // Read back what training will read, and align the planted documents with it by id.
    let fit = read_beir_train(&dir, "fit")?;
    // With no dev split, lambda_rr falls back to its default and the dev set stays empty.
    let dev = if dev.queries.is_empty() {
        TrainSet {
            corpus: Vec::new(),
            queries: Vec::new(),
            stats: Default::default(),
        }
    } else {
        read_beir_train(&dir, "dev")?
    };
    let dev_qrels = beir::read_qrels(&dir.join("qrels/dev.tsv"))?;
    let by_id: HashMap<&str, &Vec<usize>> = fit_full
        .queries
        .iter()
        .zip(&planted_full)
        .map(|(q, h)| (q.id.as_str(), h))
        .collect();
    let planted: Vec<Vec<usize>> = fit
        .queries
        .iter()
        .map(|q| {
            by_id
                .get(q.id.as_str())
                .map(|h| (*h).clone())
                .unwrap_or_default()
        })
        .collect();
    let summary = serde_json::json!({
        "source": source, "train_split": train_split, "test_split": test_split,
        "dev_fraction": dev_fraction, "plant_fraction": plant_fraction,
        "documents": fit.corpus.len(),
        "fit_queries": fit.queries.len(), "fit_pairs": fit.num_pairs(),
        "dev_queries": dev.queries.len(),
        "planted": planted.iter().map(Vec::len).sum::<usize>(),
        "queries_with_planted": planted.iter().filter(|h| !h.is_empty()).count(),
        "test_queries": test.qrels.len(),
    });
    Ok(Prepared {
        dir,
        corpus: fit.corpus.clone(),
        fit,
        planted,
        dev,
        dev_qrels,
        test,
        summary,
    })
}
