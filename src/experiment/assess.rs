//! What one encoder is worth, the RRRA way: its test retrieval, a stage-2 adapter trained on
//! its frozen embeddings, the adapter's false-negative detection on the planted positives, the
//! reranking exponent chosen on the dev split, and the reranked test retrieval.

use super::prepare::Prepared;
use crate::adapter::calibrate::{FnCalibration, FnScorer};
use crate::adapter::file::AdapterFile;
use crate::adapter::fit::{
    calibrate_pairs, cross_fit_logits, score_pairs, train_adapter, train_adapter_on,
    AdapterTrainConfig, Embeddings, EpochRecord,
};
use crate::adapter::log_sigmoid;
use crate::adapter::pairs::{class_counts, label_pairs, QueryPairs};
use crate::adapter::rerank::{choose_lambda, ScoredLists, LAMBDA_GRID};
use crate::data::beir::Qrels;
use crate::data::trec::Run;
use crate::device::adapter_train::GpuAdapterGrad;
use crate::device::encoder::Precision;
use crate::error::Result;
use crate::eval::fn_detection::{detection, Detection, QueryScores};
use crate::eval::metrics::{evaluate, EvalOptions};
use crate::index::{topk, Corpus};
use crate::model::{Encoder, EncoderOptions};
use crate::pipeline::{GpuOptions, GpuTextEncoder};
use crate::train::mining::{mine_from_embeddings, MinedPool};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

/// Knobs of the assessment (recorded in the experiment's output).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AssessConfig {
    pub adapter: AdapterTrainConfig,
    /// K of the mined pool the adapter trains on and detection is measured in.
    pub mine_top_k: usize,
    /// Depth of the reranked list.
    pub rerank_k: usize,
    pub lambda_grid: Vec<f64>,
    pub fn_scorer: FnScorer,
    /// Max tokens when encoding for evaluation (queries and documents).
    pub max_length: usize,
    pub encode_batch_size: usize,
    /// SimANS's `a`, for SimANS's implicit false-negative score in the detection table.
    pub simans_a: f64,
    /// Also train a positive-aware adapter (method notes 4) and report its detection as
    /// `s_fn_positive_aware` and `adapter_p_positive_aware`. The rerank always uses the plain
    /// adapter: test queries have no labelled positives.
    #[serde(default)]
    pub positive_aware: bool,
    /// Run the stage-2 adapter's forward and backward on this GPU (the losses and the
    /// optimizer stay on the CPU); `None`: all on the CPU.
    #[serde(default)]
    pub adapter_gpu: Option<usize>,
    /// Encode the corpus and the queries on this GPU (f32, the CPU's embeddings up to
    /// summation order); `None`: on the CPU.
    #[serde(default)]
    pub encode_gpu: Option<usize>,
}

impl Default for AssessConfig {
    fn default() -> Self {
        AssessConfig {
            adapter: AdapterTrainConfig::default(),
            mine_top_k: 200,
            rerank_k: 100,
            lambda_grid: LAMBDA_GRID.to_vec(),
            fn_scorer: FnScorer::Combined,
            max_length: 256,
            encode_batch_size: 32,
            simans_a: 0.5,
            positive_aware: false,
            adapter_gpu: None,
            encode_gpu: None,
        }
    }
}

/// The assessment of one encoder.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Assessment {
    pub test: BTreeMap<String, f64>,
    pub test_reranked: BTreeMap<String, f64>,
    pub lambda_rr: f64,
    /// (lambda, dev nDCG@10).
    pub lambda_table: Vec<(f64, f64)>,
    /// Detection of planted false negatives by scorer: `s_fn`, `adapter_p`, `retriever`,
    /// `simans` (and the cross-fitted variants when on).
    pub detection: BTreeMap<String, Detection>,
    /// Pairs per class TP, FN, FP, TN.
    pub classes: [usize; 4],
    pub calibration: FnCalibration,
    pub adapter_epochs: Vec<EpochRecord>,
    pub seconds: BTreeMap<String, f64>,
    /// s_FN of planted false negatives and of the other candidates (for the histogram).
    #[serde(skip)]
    pub s_fn_planted: Vec<f64>,
    #[serde(skip)]
    pub s_fn_others: Vec<f64>,
}

fn run_of(
    ids: &[&str],
    hits: &[Vec<(u32, f64)>],
    corpus: &[crate::data::beir::Document],
) -> Result<Run> {
    let mut run = Run::new();
    for (q, h) in ids.iter().zip(hits) {
        run.add_query(
            q.to_string(),
            h.iter()
                .map(|&(d, s)| (corpus[d as usize].id.clone(), s))
                .collect(),
        )?;
    }
    Ok(run)
}

fn metrics(run: &Run, qrels: &Qrels) -> BTreeMap<String, f64> {
    evaluate(run, qrels, &EvalOptions::default()).mean
}

/// One encoder's embeddings of everything the assessment reads.
#[derive(Debug, Clone)]
pub struct EncodedSets {
    pub dim: usize,
    /// The retriever's temperature: 0.05 for a normalising encoder, else 1.
    pub tau: f32,
    pub docs: Vec<f32>,
    pub fit: Vec<f32>,
    pub dev: Vec<f32>,
    pub test: Vec<f32>,
    /// Wall seconds the encoding took.
    pub seconds: f64,
}

/// Encodes the corpus and the fit, dev and test queries with the encoder in `model`, on the
/// CPU or on `cfg.encode_gpu`.
pub fn encode_sets(
    model: &Path,
    data: &Prepared,
    cfg: &AssessConfig,
    say: &mut dyn FnMut(String),
) -> Result<EncodedSets> {
    let clock = Instant::now();
    let encoder = Encoder::load(
        model,
        &EncoderOptions {
            max_length: Some(cfg.max_length),
            ..Default::default()
        },
    )?;
    let dim = encoder.dim();
    let batch = cfg.encode_batch_size;
    let mut on_gpu = match cfg.encode_gpu {
        Some(ordinal) => {
            let opts = GpuOptions {
                ordinal,
                precision: Precision::F32,
                batch_size: batch,
            };
            Some(GpuTextEncoder::new(&encoder, &opts)?)
        }
        None => None,
    };
    let mut embed = |texts: &[&str]| -> Result<Vec<f32>> {
        match on_gpu.as_mut() {
            Some(gpu) => gpu.encode(texts),
            None => encoder.encode(texts, batch),
        }
    };
    let docs: Vec<&str> = data.corpus.iter().map(|d| d.text.as_str()).collect();
    let doc_emb = embed(&docs)?;
    let fit_q: Vec<&str> = data.fit.queries.iter().map(|q| q.text.as_str()).collect();
    let dev_q: Vec<&str> = data.dev.queries.iter().map(|q| q.text.as_str()).collect();
    let test_queries: Vec<&crate::data::beir::Query> = data.test.judged_queries().collect();
    let test_q: Vec<&str> = test_queries.iter().map(|q| q.text.as_str()).collect();
    let fit_emb = embed(&fit_q)?;
    let dev_emb = embed(&dev_q)?;
    let test_emb = embed(&test_q)?;
    say(format!(
        "encoded {} documents and {} queries",
        docs.len(),
        fit_q.len() + dev_q.len() + test_q.len()
    ));
    Ok(EncodedSets {
        dim,
        tau: if encoder.normalize() { 0.05 } else { 1.0 },
        docs: doc_emb,
        fit: fit_emb,
        dev: dev_emb,
        test: test_emb,
        seconds: clock.elapsed().as_secs_f64(),
    })
}

/// Assesses the encoder in `model` (embeddings `enc`) on `data`; the adapter is saved to
/// `adapter_out`.
pub fn assess(
    enc: &EncodedSets,
    model: &Path,
    data: &Prepared,
    cfg: &AssessConfig,
    seed: u64,
    adapter_out: &Path,
    say: &mut dyn FnMut(String),
) -> Result<Assessment> {
    let mut seconds = BTreeMap::new();
    seconds.insert("encode".into(), enc.seconds);
    let (dim, tau) = (enc.dim, enc.tau);
    let (doc_emb, fit_emb, dev_emb, test_emb) = (&enc.docs, &enc.fit, &enc.dev, &enc.test);
    let test_queries: Vec<&crate::data::beir::Query> = data.test.judged_queries().collect();

    // Retrieval without the adapter.
    let corpus = Corpus::from_f32(doc_emb, dim)?;
    let k = cfg.rerank_k.min(data.corpus.len());
    let top = |emb: &[f32]| -> Result<Vec<Vec<(u32, f32)>>> {
        Ok(topk::search_batch(&corpus, emb, k)?
            .into_iter()
            .map(|h| h.into_iter().map(|x| (x.index as u32, x.score)).collect())
            .collect())
    };
    let test_hits = top(test_emb)?;
    let test_ids: Vec<&str> = test_queries.iter().map(|q| q.id.as_str()).collect();
    let as_f64 = |h: &[Vec<(u32, f32)>]| -> Vec<Vec<(u32, f64)>> {
        h.iter()
            .map(|l| l.iter().map(|&(d, s)| (d, s as f64)).collect())
            .collect()
    };
    let test = metrics(
        &run_of(&test_ids, &as_f64(&test_hits), &data.corpus)?,
        &data.test.qrels,
    );

    // Stage 2: mine, label, train, calibrate.
    let clock = Instant::now();
    let (pool, _) = mine_from_embeddings(
        &data.fit,
        dim,
        fit_emb.clone(),
        doc_emb.clone(),
        cfg.mine_top_k,
        true,
    )?;
    let pairs = label_pairs(&data.fit, &pool, cfg.adapter.rank_cutoff);
    let emb = Embeddings {
        queries: fit_emb,
        docs: doc_emb,
        dim,
    };
    let mut acfg = cfg.adapter.clone();
    acfg.seed = seed;
    let mut report = |e: &crate::adapter::fit::EpochRecord| {
        say(format!(
            "adapter epoch {}: loss {:.4} (bce {:.4}, norm {:.4}) in {:.1}s",
            e.epoch, e.loss, e.bce, e.norm, e.seconds
        ))
    };
    let (params, epochs) = match cfg.adapter_gpu {
        None => train_adapter(&acfg, emb, &pairs, &mut report)?,
        Some(ordinal) => {
            let gpu = crate::device::Gpu::open(ordinal)?;
            let h = acfg.hidden.unwrap_or(dim);
            let mut op = GpuAdapterGrad::for_training(&gpu, dim, h, acfg.batch_queries, &pairs)?;
            train_adapter_on(&acfg, emb, &pairs, &mut report, &mut op)?
        }
    };
    let logits = score_pairs(&params, emb, &pairs)?;
    let calibration = calibrate_pairs(&pairs, &logits, cfg.fn_scorer, tau)?;
    seconds.insert("adapter".into(), clock.elapsed().as_secs_f64());

    // Detection of the planted false negatives among the mined candidates.
    let mut det = BTreeMap::new();
    let scorers = detection_scores(
        data,
        &pool,
        &pairs,
        &logits,
        &calibration,
        tau,
        cfg.simans_a,
    );
    for (name, qs) in &scorers {
        det.insert(name.clone(), detection(qs));
    }
    if acfg.cross_fit_folds >= 2 {
        let cf = cross_fit_logits(&acfg, emb, &pairs)?;
        let cal = calibrate_pairs(&pairs, &cf, cfg.fn_scorer, tau)?;
        for (name, qs) in detection_scores(data, &pool, &pairs, &cf, &cal, tau, cfg.simans_a) {
            if name == "s_fn" || name == "adapter_p" {
                det.insert(format!("{name}_cross_fit"), detection(&qs));
            }
        }
    }
    if cfg.positive_aware {
        let mut pcfg = acfg.clone();
        pcfg.positive_aware = true;
        let (pparams, _) = train_adapter(&pcfg, emb, &pairs, &mut |e| {
            say(format!(
                "positive-aware adapter epoch {}: loss {:.4}",
                e.epoch, e.loss
            ))
        })?;
        let pl = score_pairs(&pparams, emb, &pairs)?;
        let cal = calibrate_pairs(&pairs, &pl, cfg.fn_scorer, tau)?;
        for (name, qs) in detection_scores(data, &pool, &pairs, &pl, &cal, tau, cfg.simans_a) {
            if name == "s_fn" || name == "adapter_p" {
                det.insert(format!("{name}_positive_aware"), detection(&qs));
            }
        }
    }
    let (mut s_fn_planted, mut s_fn_others) = (Vec::new(), Vec::new());
    if let Some((_, qs)) = scorers.iter().find(|(n, _)| n == "s_fn") {
        for q in qs {
            for (&s, &p) in q.scores.iter().zip(&q.planted) {
                let v = crate::adapter::sigmoid(s);
                if p {
                    s_fn_planted.push(v)
                } else {
                    s_fn_others.push(v)
                }
            }
        }
    }

    // Reranking: lambda on dev, then test.
    let clock = Instant::now();
    let dev_lists = ScoredLists::score(
        &params,
        Embeddings {
            queries: dev_emb,
            docs: doc_emb,
            dim,
        },
        top(dev_emb)?,
    )?;
    let dev_ids: Vec<&str> = data.dev.queries.iter().map(|q| q.id.as_str()).collect();
    let (lambda_rr, lambda_table) = if dev_ids.is_empty() {
        (1.0, Vec::new())
    } else {
        choose_lambda(&cfg.lambda_grid, |l| {
            let run = run_of(&dev_ids, &dev_lists.rerank(tau, l), &data.corpus)?;
            Ok(metrics(&run, &data.dev_qrels)
                .get("ndcg@10")
                .copied()
                .unwrap_or(0.0))
        })?
    };
    let test_lists = ScoredLists::score(
        &params,
        Embeddings {
            queries: test_emb,
            docs: doc_emb,
            dim,
        },
        test_hits,
    )?;
    let test_reranked = metrics(
        &run_of(&test_ids, &test_lists.rerank(tau, lambda_rr), &data.corpus)?,
        &data.test.qrels,
    );
    seconds.insert("rerank".into(), clock.elapsed().as_secs_f64());

    let classes = class_counts(&pairs);
    AdapterFile {
        params,
        calibration,
        lambda_rr,
        tau,
        train_config: acfg,
        info: serde_json::json!({
            "stage": "frozen-encoder", "encoder": model, "classes": classes,
            "lambda_table": lambda_table, "data": data.summary,
        }),
    }
    .save(adapter_out)?;
    Ok(Assessment {
        test,
        test_reranked,
        lambda_rr,
        lambda_table,
        detection: det,
        classes,
        calibration,
        adapter_epochs: epochs,
        seconds,
        s_fn_planted,
        s_fn_others,
    })
}

/// Per scorer, per fit query, the scores of its mined candidates (positives excluded) and
/// whether each is planted. Scores are monotone in each scorer's estimate (log-odds of s_FN,
/// the adapter logit, the raw similarity, SimANS's log weight with the best visible positive,
/// and the prototype's fixed combination `s/tau + log p` whatever the configured scorer).
#[allow(clippy::needless_range_loop)] // j indexes the pool's parallel arrays and the logits
fn detection_scores(
    data: &Prepared,
    pool: &MinedPool,
    pairs: &[QueryPairs],
    logits: &[Vec<f32>],
    cal: &FnCalibration,
    tau: f32,
    simans_a: f64,
) -> Vec<(String, Vec<QueryScores>)> {
    let names = [
        "s_fn",
        "adapter_p",
        "retriever",
        "simans",
        "score_plus_log_p",
    ];
    let mut out: Vec<(String, Vec<QueryScores>)> =
        names.iter().map(|n| (n.to_string(), Vec::new())).collect();
    for (qi, (p, lg)) in pairs.iter().zip(logits).enumerate() {
        let hidden = &data.planted[qi];
        if hidden.is_empty() {
            continue;
        }
        let best_pos = data.fit.queries[qi]
            .positives
            .iter()
            .map(|&d| pool.score(qi, d))
            .fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut qs: Vec<QueryScores> = vec![QueryScores::default(); names.len()];
        for j in 0..p.len() {
            if p.classes[j].target() > 0.5 {
                continue; // a visible positive is not a candidate
            }
            let (s, l) = (p.scores[j], lg[j]);
            let planted = hidden.binary_search(&(p.docs[j] as usize)).is_ok();
            let vals = [
                cal.log_odds(s, l),
                l as f64,
                s as f64,
                -simans_a * (s as f64 - best_pos).powi(2),
                s as f64 / tau as f64 + log_sigmoid(l as f64),
            ];
            for (q, v) in qs.iter_mut().zip(vals) {
                q.scores.push(v);
                q.planted.push(planted);
            }
        }
        for (o, q) in out.iter_mut().zip(qs) {
            o.1.push(q);
        }
    }
    out
}
