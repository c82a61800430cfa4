//! Data-parallel training: one global batch split over ranks, each rank encoding only its own
//! shard, with gradients that equal a single-process step on the concatenated batch.
//!
//! # Layout
//!
//! Rank `r` holds `B_r` queries, their `B_r` positives and `N_r` hard negatives, packed in the
//! trainer's order: its queries, then their positives, then each query's negatives, query by
//! query. The global batch is the concatenation of the shards in rank order, and the gathered
//! embeddings are arranged exactly as the single-process trainer arranges that batch:
//!
//! ```text
//! queries: [Q_0 | Q_1 | … ]                       B = Σ B_r rows
//! docs:    [P_0 | P_1 | … | N_0 | N_1 | … ]       D = B + Σ N_r rows
//! ```
//!
//! so query `i` of rank `r` has global index `g = off_r + i` (`off_r = Σ_{r'<r} B_r'`), its
//! positive is document `g` (the InfoNCE target), and its negatives sit after every positive,
//! at `B + noff_r + …`. [`GlobalLayout`] holds these offsets; it is gathered from every rank's
//! counts and keys, so no rank needs to know the others' shards in advance.
//!
//! # Why the gradients match
//!
//! Every rank runs [`info_nce`] on the full gathered matrices: identical inputs, so identical
//! loss and embedding gradients on every rank; and since a sequence's embedding does not
//! depend on what else is in its batch, also those of the single-process run, whose layout
//! this is. The loss is the mean over the *global* `B` queries, so `∂L/∂e` is already
//! normalised once for the whole batch. Each rank keeps the rows of `∂L/∂e` that belong to its
//! own sequences and backpropagates them through its own encoder pass; by the chain rule
//! `∂L/∂θ = Σ_r Σ_{s ∈ shard r} (∂L/∂e_s)(∂e_s/∂θ)`, so the *sum* of the ranks' parameter
//! gradients is the single-process gradient. [`all_reduce_gradients`] therefore sums and does
//! not divide by the world size: that division belongs to the usual convention where each rank
//! averages its own loss over its own queries, and is wrong as soon as the shards are uneven.
//! With gradient accumulation, accumulate the micro-batches locally, all-reduce once, then
//! apply the trainer's `1 / micro-batches` scale as before.
//!
//! Dropout masks are keyed by the global sequence index (`example_base | s`, the trainer's
//! `(micro << 14) | s`), so a sequence gets the same masks whichever rank encodes it.
//!
//! The only difference from the single-process step is the order of f32 sums: the weight
//! gradients of a shard are reduced over its own tokens and then added across ranks, where the
//! single process reduces over all tokens at once. With
//! [`InProcess`](super::collective::InProcess) the cross-rank sum runs in rank order and every
//! rank copies the one result, so all replicas hold bitwise the same gradient and stay in step
//! after the (deterministic) AdamW update.
//!
//! Scope: the encoder and the loss. The trainer adds the RRRA joint adapter's loss the same
//! way as InfoNCE: every rank computes it on the gathered batch.

use super::collective::Collective;
use super::encoder_grad::{ActivationMode, DropoutPlan, TrainBatch, TrainableEncoder};
use super::loss::{info_nce, InfoNceInput, InfoNceStats};
use crate::error::{Error, Result};
use crate::model::bert::PackedBatch;
use crate::model::weights::BertWeights;
use std::ops::Range;

/// The encoder's parameter tensors (indices into `BertWeights::tensors`) in the groups a
/// backward pass finishes them: each layer's twelve from the last layer down, then the five
/// embedding tensors. A trainer that sums a group over the ranks as soon as its backward is
/// done follows this order; so must every rank, and so does the sum after a backward that
/// the rank skipped (a rank with no example), because collectives match by call order.
pub fn backward_groups(layers: usize) -> Vec<Range<usize>> {
    const EMBEDDING: usize = 5;
    const PER_LAYER: usize = 12;
    let layer = |l: usize| EMBEDDING + l * PER_LAYER..EMBEDDING + (l + 1) * PER_LAYER;
    (0..layers)
        .rev()
        .map(layer)
        .chain(std::iter::once(0..EMBEDDING))
        .collect()
}

/// One rank's part of the global batch.
pub struct Shard<'a> {
    /// The shard's sequences in the trainer's order: its `B_r` queries, then their positives
    /// in the same order, then each query's negatives, query by query.
    pub packed: &'a PackedBatch,
    /// The caller's key of each query (the training-set query index), `[B_r]`.
    pub query_keys: &'a [u32],
    /// The key of each document as packed (corpus index): positives, then negatives.
    pub doc_keys: &'a [u32],
    /// Negatives of each query, `[B_r]`.
    pub negatives: &'a [usize],
    /// InfoNCE log-weight of each negative (soft RRRA; 0 is weight 1); `None`: all 0.
    pub negative_log_weights: Option<&'a [f32]>,
}

/// Counts and keys are sent as f32; integers up to 2^24 are exact.
const F32_EXACT: usize = 1 << 24;

impl Shard<'_> {
    fn check(&self, encoder: &TrainableEncoder<'_>) -> Result<()> {
        let b = self.query_keys.len();
        let n: usize = self.negatives.iter().sum();
        if self.negatives.len() != b
            || self.doc_keys.len() != b + n
            || self.packed.sequences() != 2 * b + n
            || self.negative_log_weights.is_some_and(|w| w.len() != n)
        {
            return Err(Error::InvalidArgument(format!(
                "shard of {b} queries and {n} negatives: {} negative counts, {} document keys, \
                 {} sequences (expected {}), {:?} negative weights",
                self.negatives.len(),
                self.doc_keys.len(),
                self.packed.sequences(),
                2 * b + n,
                self.negative_log_weights.map(<[f32]>::len)
            )));
        }
        if b + n >= F32_EXACT {
            return Err(Error::InvalidArgument(format!(
                "shard of {} sequences is too large to describe exactly",
                2 * b + n
            )));
        }
        if let Some(w) = self.negative_log_weights {
            if w.iter().any(|v| v.is_nan() || *v == f32::INFINITY) {
                return Err(Error::InvalidArgument(
                    "negative log-weights must be finite or -inf".into(),
                ));
            }
        }
        encoder.bert.check(self.packed)
    }
}

/// Where every rank's queries and documents sit in the gathered batch (see the module docs).
/// The same on every rank.
#[derive(Debug, Clone, PartialEq)]
pub struct GlobalLayout {
    /// `B_r` of each rank.
    rank_queries: Vec<usize>,
    /// `N_r` of each rank.
    rank_negatives: Vec<usize>,
    /// Negatives of each global query.
    query_negatives: Vec<usize>,
    /// Query keys in global query order.
    pub query_keys: Vec<u32>,
    /// Document keys in global document order (all positives, then all negatives).
    pub doc_keys: Vec<u32>,
    /// Log-weights of the negatives in global negative order.
    pub negative_log_weights: Vec<f32>,
}

impl GlobalLayout {
    /// Gathers every rank's counts and keys. Shard errors are reported on every rank (the
    /// faulty rank's with the details), so no rank is left waiting.
    pub fn gather(
        comm: &dyn Collective,
        shard: &Shard<'_>,
        encoder: &TrainableEncoder<'_>,
    ) -> Result<GlobalLayout> {
        let world = comm.world();
        let local = shard.check(encoder);
        let b = shard.query_keys.len();
        let n: usize = shard.negatives.iter().sum();
        let head = match local {
            Ok(()) => [1.0, b as f32, n as f32],
            Err(_) => [0.0; 3],
        };
        let mut heads = vec![0.0f32; 3 * world];
        comm.all_gather(&head, &vec![3; world], &mut heads)?;
        local?;
        let bad: Vec<usize> = (0..world).filter(|&r| heads[3 * r] != 1.0).collect();
        if !bad.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "the shards of ranks {bad:?} are invalid"
            )));
        }
        let rank_queries: Vec<usize> = (0..world).map(|r| heads[3 * r + 1] as usize).collect();
        let rank_negatives: Vec<usize> = (0..world).map(|r| heads[3 * r + 2] as usize).collect();
        if rank_queries.iter().sum::<usize>() == 0 {
            return Err(Error::InvalidArgument(
                "the global batch has no query".into(),
            ));
        }
        // Per rank: negative counts [B_r], query keys [2 B_r], document keys [2 (B_r + N_r)],
        // negative log-weights [N_r].
        let meta_len = |b: usize, n: usize| 5 * b + 3 * n;
        let mut meta = Vec::with_capacity(meta_len(b, n));
        meta.extend(shard.negatives.iter().map(|&c| c as f32));
        meta.extend(shard.query_keys.iter().flat_map(|&k| encode_key(k)));
        meta.extend(shard.doc_keys.iter().flat_map(|&k| encode_key(k)));
        match shard.negative_log_weights {
            Some(w) => meta.extend_from_slice(w),
            None => meta.resize(meta.len() + n, 0.0),
        }
        let counts: Vec<usize> = (0..world)
            .map(|r| meta_len(rank_queries[r], rank_negatives[r]))
            .collect();
        let mut all = vec![0.0f32; counts.iter().sum()];
        comm.all_gather(&meta, &counts, &mut all)?;

        let mut layout = GlobalLayout {
            rank_queries,
            rank_negatives,
            query_negatives: Vec::new(),
            query_keys: Vec::new(),
            doc_keys: Vec::new(),
            negative_log_weights: Vec::new(),
        };
        let mut negative_keys = Vec::new();
        let mut at = 0;
        for r in 0..world {
            let (b, n) = (layout.rank_queries[r], layout.rank_negatives[r]);
            let m = &all[at..at + counts[r]];
            at += counts[r];
            let (neg, rest) = m.split_at(b);
            let (qk, rest) = rest.split_at(2 * b);
            let (dk, lw) = rest.split_at(2 * (b + n));
            layout
                .query_negatives
                .extend(neg.iter().map(|&c| c as usize));
            layout.query_keys.extend(qk.chunks_exact(2).map(decode_key));
            let dk: Vec<u32> = dk.chunks_exact(2).map(decode_key).collect();
            layout.doc_keys.extend_from_slice(&dk[..b]);
            negative_keys.extend_from_slice(&dk[b..]);
            layout.negative_log_weights.extend_from_slice(lw);
        }
        layout.doc_keys.extend(negative_keys);
        Ok(layout)
    }

    pub fn world(&self) -> usize {
        self.rank_queries.len()
    }
    /// Queries of the global batch, `B`.
    pub fn batch(&self) -> usize {
        self.query_keys.len()
    }
    /// Documents of the global batch, `D = B + Σ N_r`.
    pub fn docs(&self) -> usize {
        self.doc_keys.len()
    }
    /// Global indices of rank `r`'s queries; the same indices are its positives' columns.
    pub fn queries_of(&self, r: usize) -> Range<usize> {
        let off: usize = self.rank_queries[..r].iter().sum();
        off..off + self.rank_queries[r]
    }
    /// Document columns of rank `r`'s negatives.
    pub fn negatives_of(&self, r: usize) -> Range<usize> {
        let off = self.batch() + self.rank_negatives[..r].iter().sum::<usize>();
        off..off + self.rank_negatives[r]
    }
    /// Document columns of global query `g`'s own negatives.
    pub fn own_negatives(&self, g: usize) -> Range<usize> {
        let off = self.batch() + self.query_negatives[..g].iter().sum::<usize>();
        off..off + self.query_negatives[g]
    }
    /// InfoNCE targets: query `g`'s positive is document `g`.
    pub fn targets(&self) -> Vec<usize> {
        (0..self.batch()).collect()
    }
    /// The index the single-process trainer gives sequence `s` of rank `r`'s packed shard:
    /// queries `0..B`, then documents `B + column`.
    pub fn global_sequence(&self, r: usize, s: usize) -> usize {
        let (b, q) = (self.rank_queries[r], self.queries_of(r));
        if s < b {
            q.start + s
        } else if s < 2 * b {
            self.batch() + q.start + (s - b)
        } else {
            self.batch() + self.negatives_of(r).start + (s - 2 * b)
        }
    }

    /// The `[B × D]` InfoNCE log-weights, as the trainer builds them: another positive of the
    /// same query is never its negative (`-inf`), and own negatives carry their soft weight.
    pub fn log_weights(&self, is_positive: &dyn Fn(u32, u32) -> bool) -> Vec<f32> {
        let (b_n, d_n) = (self.batch(), self.docs());
        let mut log_w = vec![0.0f32; b_n * d_n];
        for (b, &q) in self.query_keys.iter().enumerate() {
            let row = &mut log_w[b * d_n..(b + 1) * d_n];
            for (j, &d) in self.doc_keys.iter().enumerate() {
                if j != b && is_positive(q, d) {
                    row[j] = f32::NEG_INFINITY;
                }
            }
            for j in self.own_negatives(b) {
                if row[j] != f32::NEG_INFINITY {
                    row[j] = self.negative_log_weights[j - b_n];
                }
            }
        }
        log_w
    }

    /// Floats rank `r` contributes to the embedding gather.
    fn rank_rows(&self, r: usize) -> usize {
        2 * self.rank_queries[r] + self.rank_negatives[r]
    }
}

/// A u32 key as two 16-bit halves: exact in f32, whatever the transport does with floats.
fn encode_key(k: u32) -> [f32; 2] {
    [(k >> 16) as f32, (k & 0xFFFF) as f32]
}

fn decode_key(v: &[f32]) -> u32 {
    ((v[0] as u32) << 16) | v[1] as u32
}

/// Every rank's `local`, of any length, concatenated in rank order (lengths below 2^24).
pub fn gather_all(comm: &dyn Collective, local: &[f32]) -> Result<Vec<f32>> {
    let world = comm.world();
    if local.len() >= F32_EXACT {
        return Err(Error::InvalidArgument(format!(
            "{} values are too many to gather",
            local.len()
        )));
    }
    let mut lens = vec![0.0f32; world];
    comm.all_gather(&[local.len() as f32], &vec![1; world], &mut lens)?;
    let counts: Vec<usize> = lens.iter().map(|&l| l as usize).collect();
    let mut out = vec![0.0f32; counts.iter().sum()];
    comm.all_gather(local, &counts, &mut out)?;
    Ok(out)
}

/// Every rank's embeddings (`local`: `[sequences × h]` in shard order) gathered into the
/// global layout: queries `[B × h]` and documents `[D × h]`.
pub fn gather_embeddings(
    comm: &dyn Collective,
    layout: &GlobalLayout,
    local: &[f32],
    h: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let world = layout.world();
    let counts: Vec<usize> = (0..world).map(|r| layout.rank_rows(r) * h).collect();
    let mut all = vec![0.0f32; counts.iter().sum()];
    comm.all_gather(local, &counts, &mut all)?;
    let mut queries = vec![0.0f32; layout.batch() * h];
    let mut docs = vec![0.0f32; layout.docs() * h];
    let mut at = 0;
    for r in 0..world {
        let (q, neg) = (layout.queries_of(r), layout.negatives_of(r));
        let rows = &all[at..at + counts[r]];
        at += counts[r];
        let (rq, rest) = rows.split_at(q.len() * h);
        let (rp, rn) = rest.split_at(q.len() * h);
        queries[q.start * h..q.end * h].copy_from_slice(rq);
        docs[q.start * h..q.end * h].copy_from_slice(rp);
        docs[neg.start * h..neg.end * h].copy_from_slice(rn);
    }
    Ok((queries, docs))
}

/// Rank `r`'s rows of the global embedding gradients, in its shard order.
pub fn local_rows(layout: &GlobalLayout, r: usize, dq: &[f32], dd: &[f32], h: usize) -> Vec<f32> {
    let (q, neg) = (layout.queries_of(r), layout.negatives_of(r));
    let mut out = Vec::with_capacity(layout.rank_rows(r) * h);
    out.extend_from_slice(&dq[q.start * h..q.end * h]);
    out.extend_from_slice(&dd[q.start * h..q.end * h]);
    out.extend_from_slice(&dd[neg.start * h..neg.end * h]);
    out
}

/// Knobs of one data-parallel micro-batch.
#[derive(Debug, Clone, Copy)]
pub struct StepOptions {
    pub tau: f32,
    pub dropout: DropoutPlan,
    pub activations: ActivationMode,
    /// Dropout key of global sequence `s` is `example_base | s` (the trainer's `micro << 14`).
    pub example_base: u64,
}

/// What a data-parallel micro-batch computed (the same on every rank).
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// The loss over the whole global batch.
    pub stats: InfoNceStats,
    pub layout: GlobalLayout,
}

/// Forward of this rank's shard, InfoNCE over the gathered global batch, and backward of this
/// rank's share: adds this rank's part of `∂L/∂θ` to `grads`. Every rank of `comm` must call it
/// for the same micro-batch; then [`all_reduce_gradients`] (once per optimizer step) makes
/// `grads` the full gradient. `is_positive(query key, doc key)` masks false negatives.
///
/// Shard errors are reported on every rank. The encoder forward is checked up front, so it
/// should not fail later; if it did, the other ranks would wait in the embedding gather until
/// the transport reports the failure ([`InProcess`](super::collective::InProcess): that rank's
/// handle dropped, or the timeout).
pub fn shard_gradients(
    comm: &dyn Collective,
    encoder: &TrainableEncoder<'_>,
    shard: &Shard<'_>,
    opts: &StepOptions,
    is_positive: &dyn Fn(u32, u32) -> bool,
    grads: &mut BertWeights,
) -> Result<StepOutput> {
    let layout = GlobalLayout::gather(comm, shard, encoder)?;
    let (rank, h) = (comm.rank(), encoder.bert.cfg.hidden_size);
    let seqs = shard.packed.sequences();
    let batch = TrainBatch {
        packed: shard.packed.clone(),
        example_ids: (0..seqs)
            .map(|s| opts.example_base | layout.global_sequence(rank, s) as u64)
            .collect(),
    };
    // A rank may hold no query at an uneven epoch end: it only takes part in the collectives.
    let acts = match seqs {
        0 => None,
        _ => Some(encoder.forward(&batch, &opts.dropout, opts.activations)?),
    };
    let local = acts.as_ref().map_or(&[][..], |a| a.embeddings.as_slice());
    let (queries, docs) = gather_embeddings(comm, &layout, local, h)?;
    let log_w = layout.log_weights(is_positive);
    let targets = layout.targets();
    let mut dq = vec![0.0f32; queries.len()];
    let mut dd = vec![0.0f32; docs.len()];
    // Every rank computes the whole (cheap) loss: identical inputs give identical gradients,
    // and no reduction of the document gradients is needed.
    let stats = info_nce(
        &InfoNceInput {
            queries: &queries,
            docs: &docs,
            dim: h,
            targets: &targets,
            log_weights: Some(&log_w),
            tau: opts.tau,
        },
        &mut dq,
        &mut dd,
    )?;
    if !stats.loss.is_finite() {
        return Err(Error::InvalidArgument(format!(
            "the loss became {}: lower the learning rate",
            stats.loss
        )));
    }
    if let Some(acts) = acts {
        let d_emb = local_rows(&layout, rank, &dq, &dd, h);
        encoder.backward(&batch, &opts.dropout, acts, &d_emb, grads)?;
    }
    Ok(StepOutput { stats, layout })
}

/// Sums every parameter gradient over the ranks (see the module docs for why it is a sum and
/// not a mean). Call once per optimizer step, after the local accumulation.
pub fn all_reduce_gradients(comm: &dyn Collective, grads: &mut BertWeights) -> Result<()> {
    for (t, _) in grads.tensors_mut() {
        comm.all_reduce_sum(t)?;
    }
    Ok(())
}
