//! Stage 3 of RRRA inside the trainer: the adapter that scores the mined pool for the RRRA
//! sampler and keeps training jointly with the encoder.
//!
//! At every mining refresh the adapter scores each query's candidates and positives, the
//! false-negative calibration `s_FN = sigmoid(w_s·s + w_p·logit + w_0)` is refitted on them
//! (labelled positives 1, candidates 0), and every candidate's `s_FN` is kept for the sampler.
//! At every step the adapter's class-weighted BCE on each query's positive and drawn negatives
//! is added to the loss with weight lambda; its gradient reaches both the adapter and, through
//! the embeddings, the encoder.
//!
//! The adapter's forward and backward run on an [`AdapterOp`]: the CPU reference, or the GPU
//! the encoder trains on (`OffloadedEncoder::adapter_op`); the BCE, the calibration and the
//! adapter's AdamW stay here.

use super::data::TrainSet;
use super::mining::MinedPool;
use super::optim::{AdamW, AdamWConfig};
use crate::adapter::calibrate::FnCalibration;
use crate::adapter::file::AdapterFile;
use crate::adapter::fit::{
    bce_weights, calibrate_pairs, score_lists_on, AdapterOp, CpuAdapterOp, Embeddings,
};
use crate::adapter::pairs::{label_pairs, PairClass};
use crate::adapter::{weighted_bce, AdapterParams};
use crate::error::{Error, Result};
use std::path::Path;

/// What a refresh found, logged with the mining statistics.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct FnPoolStats {
    pub calibration: Option<FnCalibration>,
    /// Mean s_FN over every candidate of every pool.
    pub mean_s_fn: f64,
    /// Candidates with s_FN > 0.5, per query on average.
    pub over_half_per_query: f64,
    /// Pairs per class (TP, FN, FP, TN) with the adapter's rank cut-off.
    pub classes: [usize; 4],
}

/// The adapter being trained in stage 3, with its optimizer and the pool's s_FN.
pub struct JointAdapter {
    pub file: AdapterFile,
    pub optim: AdamW,
    pub grads: AdapterParams,
    /// s_FN of each pool candidate, in pool order (empty before the first refresh).
    pub fn_scores: Vec<Vec<f32>>,
    /// Where the forward and backward run (the CPU until [`JointAdapter::set_op`]).
    op: Box<dyn AdapterOp>,
}

/// The adapter's parameters are not decayed (they are few, and the stage-2 fit used none).
const DECAY: [bool; 6] = [false; 6];

impl JointAdapter {
    pub fn load(path: &Path) -> Result<Self> {
        let file = AdapterFile::load(path)?;
        if file.params.positive_aware() {
            return Err(Error::Mismatch {
                path: path.to_path_buf(),
                msg: "a positive-aware adapter cannot guide training (its joint loss would need \
                      the gradient through the positives' mean); train the stage-2 adapter \
                      without --positive-aware"
                    .into(),
            });
        }
        let sizes: Vec<usize> = file.params.tensors().iter().map(|(_, t)| t.len()).collect();
        let optim = AdamW::new(
            AdamWConfig {
                weight_decay: 0.0,
                ..AdamWConfig::default()
            },
            &sizes,
        );
        Ok(JointAdapter {
            grads: file.params.zeros_like(),
            file,
            optim,
            fn_scores: Vec::new(),
            op: Box::new(CpuAdapterOp::default()),
        })
    }

    /// Runs the adapter's forward and backward on `op` from now on (a GPU's).
    pub fn set_op(&mut self, op: Box<dyn AdapterOp>) {
        self.op = op;
    }

    /// What one call of the current op takes (queries, pairs); `None`: no limit.
    pub fn op_capacity(&self) -> Option<(usize, usize)> {
        self.op.capacity()
    }

    pub fn rank_cutoff(&self) -> usize {
        self.file.train_config.rank_cutoff
    }

    /// Rescores the pool: adapter logits for positives and candidates, calibration refit,
    /// s_FN per candidate.
    pub fn refresh(&mut self, set: &TrainSet, pool: &MinedPool) -> Result<FnPoolStats> {
        if self.file.params.d != pool.dim {
            return Err(Error::InvalidArgument(format!(
                "the adapter reads {}-dimensional embeddings but the encoder produces {}",
                self.file.params.d, pool.dim
            )));
        }
        let pairs = label_pairs(set, pool, self.rank_cutoff());
        let emb = Embeddings {
            queries: &pool.query_embeddings,
            docs: &pool.doc_embeddings,
            dim: pool.dim,
        };
        let lists: Vec<(usize, &[u32])> = pairs.iter().map(|p| (p.query, &p.docs[..])).collect();
        let logits = score_lists_on(&self.file.params, emb, &lists, self.op.as_mut())?;
        let cal = calibrate_pairs(&pairs, &logits, self.file.calibration.scorer, self.file.tau)?;
        self.file.calibration = cal;
        let mut stats = FnPoolStats {
            calibration: Some(cal),
            classes: crate::adapter::pairs::class_counts(&pairs),
            ..Default::default()
        };
        let (mut sum, mut n, mut over) = (0.0f64, 0usize, 0usize);
        self.fn_scores = pairs
            .iter()
            .zip(&logits)
            .map(|(p, lg)| {
                // pool order is the pairs' order with the positives taken out
                p.classes
                    .iter()
                    .zip(p.scores.iter().zip(lg))
                    .filter(|(c, _)| c.target() < 0.5)
                    .map(|(_, (&sc, &lo))| {
                        let f = cal.s_fn(sc, lo);
                        sum += f;
                        n += 1;
                        over += (f > 0.5) as usize;
                        f as f32
                    })
                    .collect()
            })
            .collect();
        for (qi, f) in self.fn_scores.iter().enumerate() {
            if f.len() != pool.candidates[qi].len() {
                return Err(Error::InvalidArgument(format!(
                    "adapter refresh: query {} has {} candidates but {} scores",
                    set.queries[qi].id,
                    pool.candidates[qi].len(),
                    f.len()
                )));
            }
        }
        stats.mean_s_fn = sum / n.max(1) as f64;
        stats.over_half_per_query = over as f64 / set.queries.len().max(1) as f64;
        Ok(stats)
    }

    /// The class of document `doc` for query `q` by its rank among the query's positives and
    /// pool candidates in the mining snapshot (outside the pool: TN, or FN for a positive).
    pub fn class_of(&self, set: &TrainSet, pool: &MinedPool, q: usize, doc: usize) -> PairClass {
        let labelled = set.is_positive(q, doc);
        let s = pool.score(q, doc);
        let in_pool = labelled || pool.candidates[q].iter().any(|&(d, _)| d as usize == doc);
        if !in_pool {
            return PairClass::of(false, usize::MAX, self.rank_cutoff());
        }
        let above_c = pool.candidates[q]
            .iter()
            .filter(|&&(d, sc)| sc > s && d as usize != doc)
            .count();
        let above_p = set.queries[q]
            .positives
            .iter()
            .filter(|&&p| p != doc && pool.score(q, p) > s)
            .count();
        PairClass::of(labelled, above_c + above_p, self.rank_cutoff())
    }

    /// Adds the joint loss of one batch: for query b (row b of `q_emb`), the documents
    /// `lists[b]` (rows of `d_emb`) with their classes. Writes `weight · ∂L/∂embedding` into
    /// `dq` and `dd`, accumulates the adapter's gradient; returns the BCE.
    #[allow(clippy::too_many_arguments)]
    pub fn batch_loss(
        &mut self,
        q_emb: &[f32],
        d_emb: &[f32],
        dim: usize,
        lists: &[(Vec<usize>, Vec<PairClass>)],
        weight: f64,
        dq: &mut [f32],
        dd: &mut [f32],
    ) -> Result<f64> {
        let k = lists.iter().map(|l| l.0.len()).max().unwrap_or(0);
        if k == 0 || weight == 0.0 {
            return Ok(0.0);
        }
        let b_n = lists.len();
        let mut cands = Vec::with_capacity(b_n * k * dim);
        let mut classes = Vec::with_capacity(b_n * k);
        for (docs, cls) in lists {
            for j in 0..k {
                let jj = j.min(docs.len().saturating_sub(1));
                match docs.get(jj) {
                    Some(&r) => cands.extend_from_slice(&d_emb[r * dim..(r + 1) * dim]),
                    None => cands.extend(std::iter::repeat_n(0.0, dim)),
                }
                classes.push(cls.get(j).copied().filter(|_| j < docs.len()));
            }
        }
        let (params, queries) = (&self.file.params, &q_emb[..b_n * dim]);
        let out = self.op.forward(params, queries, &cands, None, k)?;
        let w = bce_weights(&classes, self.file.train_config.class_weights);
        let targets: Vec<f32> = classes
            .iter()
            .map(|c| c.map_or(0.0, PairClass::target))
            .collect();
        let mut d_logit = vec![0.0f32; out.logit.len()];
        let bce = weighted_bce(&out.logit, &targets, &w, &mut d_logit)?;
        d_logit.iter_mut().for_each(|g| *g *= weight as f32);
        let mut g_q = vec![0.0f32; b_n * dim];
        let mut g_c = vec![0.0f32; cands.len()];
        self.op.backward(
            params,
            queries,
            &cands,
            None,
            k,
            &d_logit,
            None,
            &mut self.grads,
            Some(&mut g_q),
            Some(&mut g_c),
        )?;
        for (o, g) in dq.iter_mut().zip(&g_q) {
            *o += g;
        }
        for (b, (docs, _)) in lists.iter().enumerate() {
            for (j, &r) in docs.iter().enumerate() {
                let src = &g_c[(b * k + j) * dim..(b * k + j + 1) * dim];
                for (o, g) in dd[r * dim..(r + 1) * dim].iter_mut().zip(src) {
                    *o += g;
                }
            }
        }
        Ok(bce)
    }

    /// One AdamW update from the accumulated gradient (scaled by `scale`, e.g. 1/micro-batches),
    /// then clears it.
    pub fn update(&mut self, lr: f32, scale: f32) -> Result<()> {
        let mut g = self.grads.clone();
        if scale != 1.0 {
            g.tensors_mut()
                .iter_mut()
                .for_each(|t| t.iter_mut().for_each(|v| *v *= scale));
        }
        let gs = g.tensors();
        let gs: Vec<&[f32]> = gs.iter().map(|(_, t)| *t).collect();
        let mut p = self.file.params.tensors_mut();
        self.optim.update(&mut p, &gs, &DECAY, lr)?;
        self.grads
            .tensors_mut()
            .iter_mut()
            .for_each(|t| t.fill(0.0));
        Ok(())
    }
}
