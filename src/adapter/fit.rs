//! Stage 2: training the adapter on a frozen encoder, from cached embeddings (no encoder
//! passes), and scoring candidate lists with it.
//!
//! Each step takes a batch of queries with all their pairs ([`super::pairs`]); queries have
//! different numbers of pairs, so a batch is padded to its longest list with weight-0 pairs.
//! Loss `L = BCE_w(logit, y) + mu · L_norm(a)`, class weights the inverse class frequencies
//! within the batch normalised to mean 1 over its real pairs. AdamW with a constant learning
//! rate (weight decay 0 by default: plain Adam, as the calibration prototype used).

use super::calibrate::{FnCalibration, FnScorer};
use super::pairs::{PairClass, QueryPairs};
use super::scoring::{backward_with_context, score_with_context, AdapterCache};
use super::{normalisation_loss, score, weighted_bce, AdapterParams};
use crate::error::{Error, Result};
use crate::index::synthetic::Rng;
use crate::train::optim::{AdamW, AdamWConfig};

/// Stage 2's knobs; every one recorded with the adapter.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdapterTrainConfig {
    /// Hidden width of the MLP; `None` = the embedding dimension.
    pub hidden: Option<usize>,
    /// Retriever cut-off r of the TP/FN/FP/TN classes.
    pub rank_cutoff: usize,
    /// Weight of the linear-normalisation loss.
    pub mu: f64,
    pub lr: f32,
    pub epochs: usize,
    /// Queries per step (all their pairs).
    pub batch_queries: usize,
    pub weight_decay: f32,
    /// How the BCE weighs the classes against their imbalance.
    pub class_weights: ClassWeights,
    /// k-fold cross-fitting of the false-negative scores of training queries (0 = off).
    pub cross_fit_folds: usize,
    /// Positive-aware scoring (method notes 4): the MLP also reads `[c − d̄+ ; c ⊙ d̄+]`. Such
    /// an adapter can only score queries with labelled positives (detection on training
    /// queries), never a test query.
    #[serde(default)]
    pub positive_aware: bool,
    pub seed: u64,
}

impl Default for AdapterTrainConfig {
    fn default() -> Self {
        AdapterTrainConfig {
            hidden: None,
            rank_cutoff: 10,
            mu: 0.1,
            lr: 1e-3,
            epochs: 5,
            batch_queries: 16,
            weight_decay: 0.0,
            class_weights: ClassWeights::Classes,
            cross_fit_folds: 0,
            positive_aware: false,
            seed: 0,
        }
    }
}

impl AdapterTrainConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(format!("adapter training: {m}")));
        if self.rank_cutoff == 0 {
            return bad("the rank cut-off r must be at least 1".into());
        }
        if !(self.mu >= 0.0 && self.mu.is_finite()) {
            return bad(format!("mu must be finite and >= 0, found {}", self.mu));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad(format!("the learning rate must be > 0, found {}", self.lr));
        }
        if self.batch_queries == 0 {
            return bad("the batch must hold at least one query".into());
        }
        if self.hidden == Some(0) {
            return bad("the hidden width must be at least 1".into());
        }
        if self.cross_fit_folds == 1 {
            return bad("cross-fitting needs at least 2 folds (0 turns it off)".into());
        }
        Ok(())
    }
}

/// One epoch's mean losses.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpochRecord {
    pub epoch: usize,
    pub loss: f64,
    pub bce: f64,
    pub norm: f64,
    pub seconds: f64,
}

/// Embeddings the pairs point into: query rows and corpus rows, `dim` floats each.
#[derive(Debug, Clone, Copy)]
pub struct Embeddings<'a> {
    pub queries: &'a [f32],
    pub docs: &'a [f32],
    pub dim: usize,
}

impl Embeddings<'_> {
    fn query(&self, i: usize) -> &[f32] {
        &self.queries[i * self.dim..(i + 1) * self.dim]
    }
    fn doc(&self, i: usize) -> &[f32] {
        &self.docs[i * self.dim..(i + 1) * self.dim]
    }
}

/// Where the adapter's forward and backward run while it trains: the CPU reference
/// ([`CpuAdapterOp`]) or a device (`crate::device::adapter_train::GpuAdapterGrad`). The
/// losses, class weights and optimizer stay with the caller ([`train_adapter_on`] in stage 2,
/// `train::rrra::JointAdapter` in stage 3), the same for both.
pub trait AdapterOp {
    /// The most queries and (query, candidate) pairs one call takes; `None`: no limit.
    fn capacity(&self) -> Option<(usize, usize)> {
        None
    }

    /// The logits alone (`[B × k]`), for scoring without a backward.
    fn logits(
        &mut self,
        params: &AdapterParams,
        queries: &[f32],
        candidates: &[f32],
        k: usize,
    ) -> Result<Vec<f32>> {
        Ok(self.forward(params, queries, candidates, None, k)?.logit)
    }

    /// Forward over a batch (`queries` `[B × d]`, `candidates` `[B × k × d]`, positive-aware
    /// `contexts` like the candidates) with `params`; keeps what [`AdapterOp::backward`] needs.
    fn forward(
        &mut self,
        params: &AdapterParams,
        queries: &[f32],
        candidates: &[f32],
        contexts: Option<&[f32]>,
        k: usize,
    ) -> Result<ForwardPass>;

    /// Adds the gradients of the last forward's loss to `grads`, from `∂L/∂logit` and
    /// optionally `∂L/∂a`; the batch is the last forward's. With `d_queries` (`[B × d]`) or
    /// `d_candidates` (`[B × k × d]`) given, the inputs' gradients are added to them too
    /// (stage 3, where the embeddings train).
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &mut self,
        params: &AdapterParams,
        queries: &[f32],
        candidates: &[f32],
        contexts: Option<&[f32]>,
        k: usize,
        d_logit: &[f32],
        d_a_extra: Option<&[f32]>,
        grads: &mut AdapterParams,
        d_queries: Option<&mut [f32]>,
        d_candidates: Option<&mut [f32]>,
    ) -> Result<()>;
}

/// What the losses read from a forward pass, each per pair (`a` per pair and coordinate).
#[derive(Debug, Clone)]
pub struct ForwardPass {
    pub logit: Vec<f32>,
    pub a: Vec<f32>,
    pub alpha: Vec<f32>,
}

/// [`AdapterOp`] on the CPU reference ([`score_with_context`], [`backward_with_context`]).
#[derive(Debug, Default)]
pub struct CpuAdapterOp {
    cache: Option<AdapterCache>,
}

impl AdapterOp for CpuAdapterOp {
    fn logits(
        &mut self,
        params: &AdapterParams,
        queries: &[f32],
        candidates: &[f32],
        k: usize,
    ) -> Result<Vec<f32>> {
        Ok(score(params, queries, candidates, k)?.logit)
    }

    fn forward(
        &mut self,
        params: &AdapterParams,
        queries: &[f32],
        candidates: &[f32],
        contexts: Option<&[f32]>,
        k: usize,
    ) -> Result<ForwardPass> {
        let out = score_with_context(params, queries, candidates, contexts, k)?;
        let pass = ForwardPass {
            logit: out.logit,
            a: out.cache.a().to_vec(),
            alpha: out.alpha,
        };
        self.cache = Some(out.cache);
        Ok(pass)
    }

    fn backward(
        &mut self,
        params: &AdapterParams,
        queries: &[f32],
        candidates: &[f32],
        contexts: Option<&[f32]>,
        k: usize,
        d_logit: &[f32],
        d_a_extra: Option<&[f32]>,
        grads: &mut AdapterParams,
        d_queries: Option<&mut [f32]>,
        d_candidates: Option<&mut [f32]>,
    ) -> Result<()> {
        let cache = self.cache.as_ref().ok_or_else(|| {
            Error::InvalidArgument("the adapter's backward needs a forward first".into())
        })?;
        backward_with_context(
            params,
            queries,
            candidates,
            contexts,
            k,
            cache,
            d_logit,
            d_a_extra,
            grads,
            d_queries,
            d_candidates,
        )
    }
}

/// Trains an adapter from scratch on `pairs` (see the module notes) on the CPU. `on_epoch`
/// sees each epoch's losses as it ends.
pub fn train_adapter(
    cfg: &AdapterTrainConfig,
    emb: Embeddings<'_>,
    pairs: &[QueryPairs],
    on_epoch: &mut dyn FnMut(&EpochRecord),
) -> Result<(AdapterParams, Vec<EpochRecord>)> {
    train_adapter_on(cfg, emb, pairs, on_epoch, &mut CpuAdapterOp::default())
}

/// [`train_adapter`] with the forward and backward run by `op`.
pub fn train_adapter_on(
    cfg: &AdapterTrainConfig,
    emb: Embeddings<'_>,
    pairs: &[QueryPairs],
    on_epoch: &mut dyn FnMut(&EpochRecord),
    op: &mut dyn AdapterOp,
) -> Result<(AdapterParams, Vec<EpochRecord>)> {
    cfg.validate()?;
    let d = emb.dim;
    let mut params =
        AdapterParams::init_with(d, cfg.hidden.unwrap_or(d), cfg.positive_aware, cfg.seed)?;
    let mut grads = params.zeros_like();
    let sizes: Vec<usize> = params.tensors().iter().map(|(_, t)| t.len()).collect();
    let mut optim = AdamW::new(
        AdamWConfig {
            weight_decay: cfg.weight_decay,
            ..AdamWConfig::default()
        },
        &sizes,
    );
    // beta and beta0 are scales, not weights: never decayed; neither are the biases.
    let decay: Vec<bool> = params
        .tensors()
        .iter()
        .map(|(name, _)| matches!(*name, "w1" | "w2" | "w1_pos"))
        .collect();
    let usable: Vec<usize> = (0..pairs.len()).filter(|&i| !pairs[i].is_empty()).collect();
    if usable.is_empty() {
        return Err(Error::InvalidArgument(
            "adapter training: no query has any candidate pair".into(),
        ));
    }
    let mut history = Vec::with_capacity(cfg.epochs);
    for epoch in 0..cfg.epochs {
        let started = std::time::Instant::now();
        let mut order = usable.clone();
        let mut rng =
            Rng::new(cfg.seed ^ (0x9e37_79b9_7f4a_7c15u64.wrapping_mul(epoch as u64 + 1)));
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let (mut sum, mut sum_bce, mut sum_norm, mut steps) = (0.0, 0.0, 0.0, 0usize);
        for batch in order.chunks(cfg.batch_queries) {
            grads.tensors_mut().iter_mut().for_each(|t| t.fill(0.0));
            let (bce, norm) = batch_gradients(cfg, &params, emb, pairs, batch, op, &mut grads)?;
            let loss = bce + cfg.mu * norm;
            if !loss.is_finite() {
                return Err(Error::InvalidArgument(format!(
                    "adapter training diverged (loss {loss}) in epoch {epoch}: lower the learning rate"
                )));
            }
            let g = grads.tensors();
            let g: Vec<&[f32]> = g.iter().map(|(_, t)| *t).collect();
            let mut p = params.tensors_mut();
            optim.update(&mut p, &g, &decay, cfg.lr)?;
            sum += loss;
            sum_bce += bce;
            sum_norm += norm;
            steps += 1;
        }
        let n = steps.max(1) as f64;
        let rec = EpochRecord {
            epoch: epoch + 1,
            loss: sum / n,
            bce: sum_bce / n,
            norm: sum_norm / n,
            seconds: started.elapsed().as_secs_f64(),
        };
        on_epoch(&rec);
        history.push(rec);
    }
    Ok((params, history))
}

/// Query rows and candidate lists gathered and padded to the longest list: queries
/// `[B × d]`, candidates `[B × K × d]`. Padding repeats the list's last candidate (any finite
/// input would do: its outputs are dropped or weighted 0).
fn gather_lists(emb: Embeddings<'_>, lists: &[(usize, &[u32])]) -> (usize, Vec<f32>, Vec<f32>) {
    let d = emb.dim;
    let k = lists.iter().map(|l| l.1.len()).max().unwrap_or(0).max(1);
    let mut queries = Vec::with_capacity(lists.len() * d);
    let mut candidates = Vec::with_capacity(lists.len() * k * d);
    for &(q, docs) in lists {
        queries.extend_from_slice(emb.query(q));
        for j in 0..k {
            match docs.get(j.min(docs.len().saturating_sub(1))) {
                Some(&doc) => candidates.extend_from_slice(emb.doc(doc as usize)),
                None => candidates.extend(std::iter::repeat_n(0.0, d)),
            }
        }
    }
    (k, queries, candidates)
}

/// A training batch: padded embeddings plus targets and classes (`None` = padding, or a
/// positive without a positive-aware context), `[B × K]`; the positive-aware contexts when
/// asked for.
struct Padded {
    k: usize,
    queries: Vec<f32>,
    candidates: Vec<f32>,
    contexts: Option<Vec<f32>>,
    targets: Vec<f32>,
    classes: Vec<Option<PairClass>>,
}

/// The positive-aware context d̄+ of each pair of one query, `[len × d]`, and whether it
/// exists: candidates get the mean of the query's labelled positives; a labelled positive gets
/// the mean of the *other* positives (leave one out: with itself in the mean, `c − d̄+` would
/// give its label away), and has none when it is the query's only positive.
fn positive_contexts(emb: Embeddings<'_>, qp: &QueryPairs) -> (Vec<f32>, Vec<bool>) {
    let d = emb.dim;
    let positives: Vec<usize> = (0..qp.len())
        .filter(|&j| qp.classes[j].target() > 0.5)
        .collect();
    let mut sum = vec![0.0f64; d];
    for &j in &positives {
        for (s, &v) in sum.iter_mut().zip(emb.doc(qp.docs[j] as usize)) {
            *s += v as f64;
        }
    }
    let n = positives.len();
    let mut ctx = vec![0.0f32; qp.len() * d];
    let mut has = vec![false; qp.len()];
    for j in 0..qp.len() {
        let is_pos = qp.classes[j].target() > 0.5;
        let others = if is_pos { n - 1 } else { n };
        if others == 0 {
            continue;
        }
        let own = emb.doc(qp.docs[j] as usize);
        for l in 0..d {
            let s = if is_pos {
                sum[l] - own[l] as f64
            } else {
                sum[l]
            };
            ctx[j * d + l] = (s / others as f64) as f32;
        }
        has[j] = true;
    }
    (ctx, has)
}

fn gather(
    emb: Embeddings<'_>,
    pairs: &[QueryPairs],
    batch: &[usize],
    positive_aware: bool,
) -> Padded {
    let lists: Vec<(usize, &[u32])> = batch
        .iter()
        .map(|&i| (pairs[i].query, &pairs[i].docs[..]))
        .collect();
    let (k, queries, candidates) = gather_lists(emb, &lists);
    let d = emb.dim;
    let mut classes = Vec::with_capacity(batch.len() * k);
    let mut contexts = positive_aware.then(|| Vec::with_capacity(batch.len() * k * d));
    for &i in batch {
        let qp = &pairs[i];
        match contexts.as_mut() {
            Some(all) => {
                let (ctx, has) = positive_contexts(emb, qp);
                all.extend_from_slice(&ctx);
                all.resize(all.len() + (k - qp.len()) * d, 0.0);
                classes.extend((0..k).map(|j| qp.classes.get(j).copied().filter(|_| has[j])));
            }
            None => classes.extend((0..k).map(|j| qp.classes.get(j).copied())),
        }
    }
    Padded {
        k,
        queries,
        candidates,
        contexts,
        targets: classes
            .iter()
            .map(|c| c.map_or(0.0, PairClass::target))
            .collect(),
        classes,
    }
}

/// The class-imbalance weighting of the adapter's BCE (method notes 4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClassWeights {
    /// Every pair weighs 1.
    None,
    /// Inverse frequency of the target: positives (TP, FN) and negatives (FP, TN) carry equal
    /// total weight.
    Target,
    /// Inverse frequency of each of the four classes TP, FN, FP, TN (each carries an equal
    /// share). This weighs the few unlabelled candidates ranked above r (FP, where false
    /// negatives hide) as much as all the lower-ranked ones together.
    Classes,
}

impl std::str::FromStr for ClassWeights {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(ClassWeights::None),
            "target" => Ok(ClassWeights::Target),
            "classes" => Ok(ClassWeights::Classes),
            _ => Err(Error::InvalidArgument(format!(
                "unknown class weighting `{s}` (valid: none, target, classes)"
            ))),
        }
    }
}

/// Per-pair BCE weights: inverse frequency of the group a pair belongs to (its class, its
/// target, or one group for all), normalised to mean 1 over the real pairs, 0 for padding.
pub(crate) fn class_weights(classes: &[Option<PairClass>], by: ClassWeights) -> Vec<f32> {
    let group = |c: PairClass| match by {
        ClassWeights::None => 0,
        ClassWeights::Target => (c.target() > 0.5) as usize,
        ClassWeights::Classes => c.index(),
    };
    let mut count = [0usize; 4];
    for &c in classes.iter().flatten() {
        count[group(c)] += 1;
    }
    let real: usize = count.iter().sum();
    let present = count.iter().filter(|&&n| n > 0).count().max(1);
    classes
        .iter()
        .map(|c| match c {
            None => 0.0,
            // each present group carries an equal share of the total weight `real`
            Some(c) => (real as f64 / (present * count[group(*c)]) as f64) as f32,
        })
        .collect()
}

/// Per-pair weights for [`weighted_bce`], which averages over every entry of a padded batch:
/// [`class_weights`] rescaled so the real pairs still average 1.
pub(crate) fn bce_weights(classes: &[Option<PairClass>], by: ClassWeights) -> Vec<f32> {
    let mut w = class_weights(classes, by);
    let real = classes.iter().flatten().count().max(1);
    let scale = w.len() as f32 / real as f32;
    w.iter_mut().for_each(|v| *v *= scale);
    w
}

/// The false-negative calibration fitted on pairs and their adapter logits (labelled
/// positives 1, candidates 0).
pub fn calibrate_pairs(
    pairs: &[QueryPairs],
    logits: &[Vec<f32>],
    scorer: FnScorer,
    tau: f32,
) -> Result<FnCalibration> {
    let (mut s, mut l, mut y) = (Vec::new(), Vec::new(), Vec::new());
    for (p, lg) in pairs.iter().zip(logits) {
        for ((&sc, &lv), c) in p.scores.iter().zip(lg).zip(&p.classes) {
            if lv.is_nan() {
                continue; // a positive-aware logit without a context
            }
            s.push(sc);
            l.push(lv);
            y.push(c.target() > 0.5);
        }
    }
    FnCalibration::fit(&s, &l, &y, scorer, tau)
}

/// Adds one batch's gradients to `grads`; returns (BCE, L_norm) averaged over real pairs.
fn batch_gradients(
    cfg: &AdapterTrainConfig,
    params: &AdapterParams,
    emb: Embeddings<'_>,
    pairs: &[QueryPairs],
    batch: &[usize],
    op: &mut dyn AdapterOp,
    grads: &mut AdapterParams,
) -> Result<(f64, f64)> {
    let b = gather(emb, pairs, batch, params.positive_aware());
    let ctx = b.contexts.as_deref();
    let out = op.forward(params, &b.queries, &b.candidates, ctx, b.k)?;
    let weight = bce_weights(&b.classes, cfg.class_weights);
    let mut d_logit = vec![0.0f32; out.logit.len()];
    let bce = weighted_bce(&out.logit, &b.targets, &weight, &mut d_logit)?;
    let mut d_a = vec![0.0f32; b.candidates.len()];
    let norm = if cfg.mu > 0.0 {
        let valid: Vec<f32> = b.classes.iter().map(|c| c.is_some() as u8 as f32).collect();
        let norm = normalisation_loss(
            &b.queries,
            &b.candidates,
            b.k,
            &out.a,
            &out.alpha,
            Some(&valid),
            &mut d_a,
            None,
            None,
        )?;
        d_a.iter_mut().for_each(|g| *g *= cfg.mu as f32);
        norm
    } else {
        0.0
    };
    let extra = (cfg.mu > 0.0).then_some(&d_a[..]);
    op.backward(
        params,
        &b.queries,
        &b.candidates,
        ctx,
        b.k,
        &d_logit,
        extra,
        grads,
        None,
        None,
    )?;
    Ok((bce, norm))
}

/// The adapter's logits for every pair of every list (forward only), batched by queries.
/// A positive-aware adapter reads each pair's context; a labelled positive without one (its
/// query's only positive) gets a NaN logit, which calibration skips.
pub fn score_pairs(
    params: &AdapterParams,
    emb: Embeddings<'_>,
    pairs: &[QueryPairs],
) -> Result<Vec<Vec<f32>>> {
    if !params.positive_aware() {
        let lists: Vec<(usize, &[u32])> = pairs.iter().map(|p| (p.query, &p.docs[..])).collect();
        return score_lists(params, emb, &lists);
    }
    check_dim(params, emb)?;
    let mut logits = Vec::with_capacity(pairs.len());
    for qp in pairs {
        if qp.is_empty() {
            logits.push(Vec::new());
            continue;
        }
        let (ctx, has) = positive_contexts(emb, qp);
        let (k, queries, candidates) = gather_lists(emb, &[(qp.query, &qp.docs[..])]);
        let out = score_with_context(params, &queries, &candidates, Some(&ctx), k)?;
        logits.push(
            out.logit
                .iter()
                .zip(&has)
                .map(|(&l, &h)| if h { l } else { f32::NAN })
                .collect(),
        );
    }
    Ok(logits)
}

fn check_dim(params: &AdapterParams, emb: Embeddings<'_>) -> Result<()> {
    if params.d != emb.dim {
        return Err(Error::InvalidArgument(format!(
            "the adapter was trained for {}-dimensional embeddings, these have {}",
            params.d, emb.dim
        )));
    }
    Ok(())
}

/// The adapter's logits for candidate lists `(query row, corpus rows)`, in list order; empty
/// lists give empty results. Lists are scored 32 at a time, padded to the longest.
pub fn score_lists(
    params: &AdapterParams,
    emb: Embeddings<'_>,
    lists: &[(usize, &[u32])],
) -> Result<Vec<Vec<f32>>> {
    score_lists_on(params, emb, lists, &mut CpuAdapterOp::default())
}

/// [`score_lists`] on `op`: lists go in order, as many per call as `op`'s capacity takes
/// (at most 32 without a limit), each call padded to its longest list. A pair's logit does
/// not depend on the others of its call, so the grouping changes no result.
pub fn score_lists_on(
    params: &AdapterParams,
    emb: Embeddings<'_>,
    lists: &[(usize, &[u32])],
    op: &mut dyn AdapterOp,
) -> Result<Vec<Vec<f32>>> {
    check_dim(params, emb)?;
    let (max_queries, max_pairs) = op.capacity().unwrap_or((32, usize::MAX));
    let mut logits: Vec<Vec<f32>> = lists
        .iter()
        .map(|l| Vec::with_capacity(l.1.len()))
        .collect();
    let idx: Vec<usize> = (0..lists.len())
        .filter(|&i| !lists[i].1.is_empty())
        .collect();
    let mut start = 0;
    while start < idx.len() {
        // the longest run of lists from `start` that fits one call
        let (mut end, mut longest) = (start, 0usize);
        while end < idx.len() {
            let wide = longest.max(lists[idx[end]].1.len());
            let n = end - start + 1;
            if n > max_queries || n.saturating_mul(wide) > max_pairs {
                break;
            }
            (end, longest) = (end + 1, wide);
        }
        if end == start {
            return Err(Error::InvalidArgument(format!(
                "a list of {} candidates exceeds the adapter's {max_pairs} pairs per call",
                lists[idx[start]].1.len()
            )));
        }
        let batch = &idx[start..end];
        let sel: Vec<(usize, &[u32])> = batch.iter().map(|&i| lists[i]).collect();
        let (k, queries, candidates) = gather_lists(emb, &sel);
        let out = op.logits(params, &queries, &candidates, k)?;
        for (bi, &i) in batch.iter().enumerate() {
            logits[i].extend_from_slice(&out[bi * k..bi * k + lists[i].1.len()]);
        }
        start = end;
    }
    Ok(logits)
}

/// k-fold cross-fitted logits: queries are assigned to folds round-robin in a seeded order,
/// and each fold is scored by an adapter trained on the others.
pub fn cross_fit_logits(
    cfg: &AdapterTrainConfig,
    emb: Embeddings<'_>,
    pairs: &[QueryPairs],
) -> Result<Vec<Vec<f32>>> {
    let k = cfg.cross_fit_folds;
    if k < 2 {
        return Err(Error::InvalidArgument(format!(
            "cross-fitting needs at least 2 folds, got {k}"
        )));
    }
    let mut order: Vec<usize> = (0..pairs.len()).collect();
    let mut rng = Rng::new(cfg.seed ^ 0xc0ff_ee00);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let mut fold_of = vec![0usize; pairs.len()];
    for (pos, &i) in order.iter().enumerate() {
        fold_of[i] = pos % k;
    }
    let mut logits: Vec<Vec<f32>> = vec![Vec::new(); pairs.len()];
    for fold in 0..k {
        let train: Vec<QueryPairs> = (0..pairs.len())
            .filter(|&i| fold_of[i] != fold)
            .map(|i| pairs[i].clone())
            .collect();
        let held: Vec<usize> = (0..pairs.len()).filter(|&i| fold_of[i] == fold).collect();
        let (params, _) = train_adapter(cfg, emb, &train, &mut |_| {})?;
        let held_pairs: Vec<QueryPairs> = held.iter().map(|&i| pairs[i].clone()).collect();
        for (i, l) in held
            .into_iter()
            .zip(score_pairs(&params, emb, &held_pairs)?)
        {
            logits[i] = l;
        }
    }
    Ok(logits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::synthetic::random_unit_vectors;

    /// Queries and documents where each query's labelled positives are near it and so are a
    /// few unlabelled "false negatives"; the rest are random.
    fn toy(nq: usize, dim: usize) -> (Vec<f32>, Vec<f32>, Vec<QueryPairs>) {
        let q = random_unit_vectors(nq, dim, 1);
        let noise = random_unit_vectors(nq * 30, dim, 2);
        let mut docs = Vec::new();
        let mut pairs = Vec::new();
        for i in 0..nq {
            let mut p = QueryPairs {
                query: i,
                ..Default::default()
            };
            for j in 0..30 {
                let near = j < 4; // 0..2 labelled, 2..4 near but unlabelled
                let mix = if near { 0.8 } else { 0.1 };
                let n = &noise[(i * 30 + j) * dim..(i * 30 + j + 1) * dim];
                let v: Vec<f32> = (0..dim)
                    .map(|l| mix * q[i * dim + l] + (1.0 - mix) * n[l])
                    .collect();
                let s: f32 = v
                    .iter()
                    .zip(&q[i * dim..(i + 1) * dim])
                    .map(|(a, b)| a * b)
                    .sum();
                p.docs.push((docs.len() / dim) as u32);
                p.scores.push(s);
                p.classes.push(PairClass::of(j < 2, j, 3));
                docs.extend(v);
            }
            pairs.push(p);
        }
        (q, docs, pairs)
    }

    /// The CPU op behind a capacity (as a GPU's buffers), counting its calls.
    struct Sized {
        cpu: CpuAdapterOp,
        capacity: (usize, usize),
        calls: usize,
    }

    impl AdapterOp for Sized {
        fn capacity(&self) -> Option<(usize, usize)> {
            Some(self.capacity)
        }
        fn forward(
            &mut self,
            params: &AdapterParams,
            queries: &[f32],
            candidates: &[f32],
            contexts: Option<&[f32]>,
            k: usize,
        ) -> Result<ForwardPass> {
            let nq = queries.len() / params.d;
            assert!(
                nq <= self.capacity.0 && nq * k <= self.capacity.1,
                "{nq} × {k}"
            );
            self.calls += 1;
            self.cpu.forward(params, queries, candidates, contexts, k)
        }
        fn backward(
            &mut self,
            _: &AdapterParams,
            _: &[f32],
            _: &[f32],
            _: Option<&[f32]>,
            _: usize,
            _: &[f32],
            _: Option<&[f32]>,
            _: &mut AdapterParams,
            _: Option<&mut [f32]>,
            _: Option<&mut [f32]>,
        ) -> Result<()> {
            unreachable!("scoring only")
        }
    }

    /// Scoring through an op of small capacity groups the lists differently (here by the
    /// forward of the trait's default `logits`) and gives bitwise the same logits; a list
    /// longer than a call takes is refused.
    #[test]
    fn scoring_on_an_op_of_any_capacity_gives_the_same_logits() {
        let (d, nq) = (16, 7);
        let (q, docs, mut pairs) = toy(nq, d);
        pairs[3].docs.truncate(5); // lists of unequal lengths, one empty
        pairs[5].docs.clear();
        let params = AdapterParams::init(d, 8, 4).unwrap();
        let emb = Embeddings {
            queries: &q,
            docs: &docs,
            dim: d,
        };
        let lists: Vec<(usize, &[u32])> = pairs.iter().map(|p| (p.query, &p.docs[..])).collect();
        let reference = score_lists(&params, emb, &lists).unwrap();
        assert_eq!(reference[5].len(), 0);
        assert_eq!(reference[3].len(), 5);
        let mut op = Sized {
            cpu: CpuAdapterOp::default(),
            capacity: (4, 65),
            calls: 0,
        };
        let sized = score_lists_on(&params, emb, &lists, &mut op).unwrap();
        let bits = |v: &[Vec<f32>]| -> Vec<Vec<u32>> {
            v.iter()
                .map(|l| l.iter().map(|x| x.to_bits()).collect())
                .collect()
        };
        assert_eq!(bits(&sized), bits(&reference));
        // 30-long lists, two per call under 65 pairs, the short one joins one: 6 lists → 3 calls
        assert_eq!(op.calls, 3);
        op.capacity = (4, 29);
        let e = score_lists_on(&params, emb, &lists, &mut op).unwrap_err();
        assert!(e.to_string().contains("30 candidates"), "{e}");
    }

    #[test]
    fn class_weights_balance_classes() {
        use PairClass::*;
        let c = [
            Some(TruePositive),
            Some(TrueNegative),
            Some(TrueNegative),
            Some(TrueNegative),
            None,
        ];
        let w = class_weights(&c, ClassWeights::Classes);
        assert_eq!(w[4], 0.0);
        assert!((w[0] - 2.0).abs() < 1e-6 && (w[1] - 2.0 / 3.0).abs() < 1e-6);
        let mean: f32 = w[..4].iter().sum::<f32>() / 4.0;
        assert!((mean - 1.0).abs() < 1e-6);
        assert_eq!(
            class_weights(&c, ClassWeights::None),
            vec![1.0, 1.0, 1.0, 1.0, 0.0]
        );
        // by target: FN and FP join their targets' groups
        let c = [
            Some(TruePositive),
            Some(FalseNegative),
            Some(FalsePositive),
            Some(TrueNegative),
            Some(TrueNegative),
            Some(TrueNegative),
        ];
        let w = class_weights(&c, ClassWeights::Target);
        assert!(
            (w[0] - 1.5).abs() < 1e-6 && (w[1] - 1.5).abs() < 1e-6,
            "{w:?}"
        );
        assert!(w[2..].iter().all(|&v| (v - 0.75).abs() < 1e-6), "{w:?}");
        let w = class_weights(&c, ClassWeights::Classes);
        assert!(
            (w[2] - 1.5).abs() < 1e-6 && (w[3] - 0.5).abs() < 1e-6,
            "{w:?}"
        );
    }

    #[test]
    fn training_lowers_the_loss_and_separates_positives() {
        let dim = 16;
        let (q, docs, pairs) = toy(40, dim);
        let emb = Embeddings {
            queries: &q,
            docs: &docs,
            dim,
        };
        let cfg = AdapterTrainConfig {
            epochs: 8,
            batch_queries: 8,
            lr: 3e-3,
            ..Default::default()
        };
        let (params, hist) = train_adapter(&cfg, emb, &pairs, &mut |_| {}).unwrap();
        assert!(hist.last().unwrap().loss < hist[0].loss, "{hist:?}");
        // labelled positives score above the random candidates on average
        let logits = score_pairs(&params, emb, &pairs).unwrap();
        let (mut pos, mut neg) = (0.0, 0.0);
        for l in &logits {
            pos += (l[0] + l[1]) as f64 / 2.0;
            neg += l[4..].iter().map(|&x| x as f64).sum::<f64>() / 26.0;
        }
        assert!(pos > neg + 1.0, "positives {pos} vs negatives {neg}");
        // deterministic
        let again = train_adapter(&cfg, emb, &pairs, &mut |_| {}).unwrap().0;
        assert_eq!(params, again);
    }

    #[test]
    fn positive_aware_contexts_leave_one_out_and_training_works() {
        let dim = 16;
        let (q, docs, mut pairs) = toy(40, dim);
        let emb = Embeddings {
            queries: &q,
            docs: &docs,
            dim,
        };
        let doc = |i: u32| &docs[i as usize * dim..(i as usize + 1) * dim];
        let (ctx, has) = positive_contexts(emb, &pairs[0]);
        assert!(has.iter().all(|&h| h));
        let (d0, d1) = (doc(pairs[0].docs[0]), doc(pairs[0].docs[1]));
        for l in 0..dim {
            assert_eq!(ctx[l], d1[l]); // positive 0 sees only positive 1
            assert_eq!(ctx[dim + l], d0[l]);
            assert!((ctx[5 * dim + l] - (d0[l] + d1[l]) / 2.0).abs() < 1e-6);
        }
        let cfg = AdapterTrainConfig {
            epochs: 8,
            batch_queries: 8,
            lr: 3e-3,
            positive_aware: true,
            ..Default::default()
        };
        let (params, hist) = train_adapter(&cfg, emb, &pairs, &mut |_| {}).unwrap();
        assert!(params.positive_aware());
        assert!(hist.last().unwrap().loss < hist[0].loss, "{hist:?}");
        // the unlabelled near candidates (2, 3) score above the far ones
        let logits = score_pairs(&params, emb, &pairs).unwrap();
        let (mut near, mut far) = (0.0, 0.0);
        for l in &logits {
            near += (l[2] + l[3]) as f64 / 2.0;
            far += l[4..].iter().map(|&x| x as f64).sum::<f64>() / 26.0;
        }
        assert!(near > far + 1.0, "near {near} vs far {far}");
        // a query's only positive has no leave-one-out context: NaN, and calibration skips it
        pairs[0].classes[1] = PairClass::of(false, 1, 3);
        let logits = score_pairs(&params, emb, &pairs).unwrap();
        assert!(logits[0][0].is_nan() && logits[0][1].is_finite());
        let cal = calibrate_pairs(&pairs, &logits, FnScorer::Combined, 0.05).unwrap();
        assert!(cal.w_logit.is_finite());
        // the plain scoring path refuses a positive-aware adapter (test queries have no context)
        assert!(score_lists(&params, emb, &[(0, &pairs[0].docs[..])]).is_err());
    }

    #[test]
    fn padded_batches_equal_unpadded_scores() {
        let dim = 8;
        let (q, docs, mut pairs) = toy(3, dim);
        // different list lengths force padding
        pairs[1].docs.truncate(10);
        pairs[1].scores.truncate(10);
        pairs[1].classes.truncate(10);
        let emb = Embeddings {
            queries: &q,
            docs: &docs,
            dim,
        };
        let params = AdapterParams::init(dim, 5, 3).unwrap();
        let all = score_pairs(&params, emb, &pairs).unwrap();
        let alone = score_pairs(&params, emb, &pairs[1..2]).unwrap();
        assert_eq!(all[1], alone[0]);
        assert_eq!(all[1].len(), 10);
    }

    #[test]
    fn cross_fitting_scores_every_query() {
        let dim = 8;
        let (q, docs, pairs) = toy(10, dim);
        let emb = Embeddings {
            queries: &q,
            docs: &docs,
            dim,
        };
        let cfg = AdapterTrainConfig {
            epochs: 1,
            cross_fit_folds: 3,
            ..Default::default()
        };
        let l = cross_fit_logits(&cfg, emb, &pairs).unwrap();
        assert!(l.iter().zip(&pairs).all(|(l, p)| l.len() == p.len()));
        assert!(AdapterTrainConfig {
            cross_fit_folds: 1,
            ..Default::default()
        }
        .validate()
        .is_err());
    }
}
