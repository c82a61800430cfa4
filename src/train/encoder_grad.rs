//! Training forward and backward of the BERT encoder with pooling and L2 normalisation, f32 on
//! the CPU: the oracle for the CUDA training kernels.
//!
//! The forward is the inference forward of `model::bert` (same packed, padding-free layout,
//! same ops) plus dropout, keeping what backward needs. Per layer it keeps the layer input, the
//! fused QKV projection, the attention context, the two pre-LayerNorm sums and the
//! pre-GELU activations; attention probabilities are recomputed in backward (as FlashAttention
//! does) and dropout masks are regenerated from the counter-based RNG, so neither is stored.
//! [`ActivationMode::Recompute`] keeps only each layer's input and reruns the layer's forward
//! just before its backward — bitwise the same values, since every op is deterministic and
//! every dropout mask a pure function of (seed, step, example, layer, site).
//!
//! Determinism: parallel loops only split independent rows or sequences; weight gradients are
//! reduced in a fixed order (see `cpu::backward`), and the word-embedding gradient is scattered
//! token by token in order (no atomics), so gradients are bitwise independent of thread count.

use crate::cpu::backward::{self as bw, AttnDropout};
use crate::cpu::{gemm, math};
use crate::error::{Error, Result};
use crate::model::bert::{Bert, PackedBatch};
use crate::model::weights::{BertWeights, LayerWeights};
use crate::model::Pooling;
use crate::train::collective::Collective;
use crate::train::rng::{Site, Stream};
use rayon::prelude::*;

/// What dropout does in one step (probabilities from config.json; zero disables).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DropoutPlan {
    pub hidden: f32,
    pub attention: f32,
    pub seed: u64,
    pub step: u64,
}

impl DropoutPlan {
    pub fn none() -> Self {
        DropoutPlan {
            hidden: 0.0,
            attention: 0.0,
            seed: 0,
            step: 0,
        }
    }
}

/// Keep every activation backward needs, or only each layer's input (less memory, one more
/// forward per layer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActivationMode {
    #[default]
    Keep,
    Recompute,
}

/// A packed batch with a stable example id per sequence: the id keys its dropout masks, so the
/// same example in the same step always gets the same masks.
pub struct TrainBatch {
    pub packed: PackedBatch,
    pub example_ids: Vec<u64>,
}

struct LayerActs {
    qkv: Vec<f32>,
    ctx: Vec<f32>,
    /// attention output (after dropout) + layer input: the first LayerNorm's input
    s1: Vec<f32>,
    x1: Vec<f32>,
    mid_pre: Vec<f32>,
    /// feed-forward output (after dropout) + x1: the second LayerNorm's input
    s2: Vec<f32>,
}

/// What the forward kept for backward.
pub struct Activations {
    emb_sum: Vec<f32>,
    /// `layer_inputs[l]` enters layer l; the last entry is the encoder output.
    layer_inputs: Vec<Vec<f32>>,
    layers: Vec<Option<LayerActs>>,
    /// Pooled vectors before normalisation `[sequences × h]`.
    pooled: Vec<f32>,
    /// The embeddings the loss sees `[sequences × h]` (normalised when asked).
    pub embeddings: Vec<f32>,
}

/// The training forward and backward of an encoder held elsewhere (a GPU:
/// `crate::device::encoder_train::GpuTrainableEncoder`), with [`TrainableEncoder`]'s contract,
/// dropout masks included. The trainer keeps the weights, the loss and the optimizer, and
/// uploads the weights after each optimizer step, unless the encoder is also a
/// [`ResidentOptimizer`].
pub trait OffloadedEncoder {
    /// Replaces the weights (after an optimizer step).
    fn set_weights(&mut self, weights: &BertWeights) -> Result<()>;
    /// The embeddings the loss sees, `[sequences × h]`, with `dropout`'s masks; keeps what
    /// backward needs.
    fn forward(&mut self, batch: &TrainBatch, dropout: &DropoutPlan) -> Result<Vec<f32>>;
    /// Adds the parameter gradients of `Σ d_embeddings ⊙ embeddings` to `grads`.
    fn backward(&mut self, d_embeddings: &[f32], grads: &mut BertWeights) -> Result<()>;
    /// Embeddings of tokenized texts, `[texts × h]` in order, without dropout: the corpus and
    /// query encodings of a mining refresh and of an evaluation.
    fn encode(&mut self, texts: &[crate::model::tokenizer::Tokens]) -> Result<Vec<f32>>;
    /// The exact top-`depth` documents of `docs` (`[documents × dim]`) for each query of
    /// `queries` (`[queries × dim]`), best first, by inner product: a mining refresh's or an
    /// evaluation's search, where the encoder runs (the GPU's top-k). `None` when this encoder
    /// does not search; the trainer then searches on the CPU (`index::topk::search_batch`, the
    /// same contract).
    fn search(
        &mut self,
        docs: &[f32],
        queries: &[f32],
        dim: usize,
        depth: usize,
    ) -> Option<Result<Vec<Vec<crate::index::Hit>>>> {
        let _ = (docs, queries, dim, depth);
        None
    }
    /// The contrastive loss of a batch's embeddings where the encoder runs (the GPU's fused
    /// InfoNCE), with [`info_nce`](super::loss::info_nce)'s contract: statistics returned,
    /// `dq` and `dd` overwritten. `None` when this encoder has no loss of its own; the trainer
    /// then computes it on the CPU.
    fn info_nce(
        &mut self,
        input: &super::loss::InfoNceInput<'_>,
        dq: &mut [f32],
        dd: &mut [f32],
    ) -> Option<Result<super::loss::InfoNceStats>> {
        let _ = (input, dq, dd);
        None
    }
    /// The same encoder holding the gradients and the optimizer too, when it does: then the
    /// trainer never moves weights or gradients in a step (see [`ResidentOptimizer`]).
    fn resident(&mut self) -> Option<&mut dyn ResidentOptimizer> {
        None
    }
    /// Where the RRRA joint adapter (stage 3: dimension `d`, hidden width `h`) should run its
    /// forward and backward beside this encoder, sized for `max_queries` queries and
    /// `max_pairs` pairs per call. `None` when this encoder has no such place; the adapter
    /// then runs on the CPU.
    fn adapter_op(
        &mut self,
        d: usize,
        h: usize,
        max_queries: usize,
        max_pairs: usize,
    ) -> Option<Result<Box<dyn crate::adapter::fit::AdapterOp>>> {
        let _ = (d, h, max_queries, max_pairs);
        None
    }
}

/// An [`OffloadedEncoder`] that also keeps the gradient accumulator, the master weights and
/// the AdamW state, so a step's weights and gradients stay where the encoder runs. The
/// trainer then hands over only the embedding gradients, and copies the weights and moments
/// back when it needs them (evaluation, checkpoints, the end of a run).
///
/// The contract is the trainer's CPU step, [`encoder_step`](super::optim::encoder_step):
/// gradients summed over the micro-batches, scaled by `1 / micro-batches`, clipped, then one
/// AdamW update with the weight-decay flags of `BertWeights::tensors_mut`.
pub trait ResidentOptimizer {
    /// Takes `weights` and `optim`'s state (configuration, step, moments) as its own: at the
    /// start of a run or after a resume.
    fn load(&mut self, weights: &BertWeights, optim: &super::optim::AdamW) -> Result<()>;
    /// Starts a step: the accumulated gradients become zero.
    fn zero_grads(&mut self) -> Result<()>;
    /// Adds the parameter gradients of `Σ d_embeddings ⊙ embeddings` over the last forward's
    /// batch to the accumulator.
    fn accumulate(&mut self, d_embeddings: &[f32]) -> Result<()>;
    /// Data parallel: sums the accumulated gradients over the ranks of `comm`, in place, once
    /// per step after the last micro-batch, before `update`. Every rank calls it at the same
    /// point of the step (collectives match by call order).
    fn all_reduce_grads(&mut self, comm: &dyn Collective) -> Result<()>;
    /// The step's last micro-batch of a data-parallel run: [`ResidentOptimizer::accumulate`]
    /// followed by [`ResidentOptimizer::all_reduce_grads`]. An implementation may start each
    /// layer's sum as soon as the backward has finished that layer's gradients, overlapping
    /// the communication with the rest of the backward, as long as the sums it issues are
    /// those of `all_reduce_grads` in the same order.
    fn accumulate_and_reduce(&mut self, d_embeddings: &[f32], comm: &dyn Collective) -> Result<()> {
        self.accumulate(d_embeddings)?;
        self.all_reduce_grads(comm)
    }
    /// Scales the accumulated gradients by `scale`, clips them to `max_norm` (infinite: no
    /// clipping) and updates the weights with learning rate `lr`. Returns the norm before
    /// clipping; when it is not finite nothing changed.
    fn update(&mut self, scale: f32, max_norm: f32, lr: f32) -> Result<f32>;
    /// Copies the current weights into `into` and the optimizer's step and moments into
    /// `optim`.
    fn store(&mut self, into: &mut BertWeights, optim: &mut super::optim::AdamW) -> Result<()>;
}

/// The encoder as training sees it: weights plus the pooling head.
pub struct TrainableEncoder<'a> {
    pub bert: &'a Bert,
    pub pooling: Pooling,
    pub normalize: bool,
}

impl TrainableEncoder<'_> {
    /// Forward with dropout, keeping what [`TrainableEncoder::backward`] needs.
    pub fn forward(
        &self,
        batch: &TrainBatch,
        dropout: &DropoutPlan,
        mode: ActivationMode,
    ) -> Result<Activations> {
        let cfg = &self.bert.cfg;
        let w = &self.bert.weights;
        let h = cfg.hidden_size;
        let pb = &batch.packed;
        if batch.example_ids.len() != pb.sequences() {
            return Err(Error::InvalidArgument(
                "one example id per sequence is required".into(),
            ));
        }
        self.bert.check(pb)?;
        let eps = cfg.layer_norm_eps as f32;
        let emb_sum = self.bert.embed(pb);
        let mut x = emb_sum.clone();
        math::add_layernorm(&mut x, None, h, &w.emb_ln_g, &w.emb_ln_b, eps);
        apply_dropout(
            &mut x,
            h,
            batch,
            dropout,
            dropout.hidden,
            0,
            Site::EmbeddingDropout,
        );

        let mut layer_inputs = Vec::with_capacity(cfg.num_hidden_layers + 1);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for (l, lw) in w.layers.iter().enumerate() {
            let (acts, out) = self.layer_forward(l, lw, &x, batch, dropout);
            layers.push((mode == ActivationMode::Keep).then_some(acts));
            layer_inputs.push(std::mem::replace(&mut x, out));
        }
        layer_inputs.push(x);
        let hidden = layer_inputs.last().map(Vec::as_slice).unwrap_or(&[]);
        let mut pooled = vec![0.0f32; pb.sequences() * h];
        for (s, out) in pooled.chunks_exact_mut(h).enumerate() {
            let rows = &hidden[pb.offsets[s] * h..pb.offsets[s + 1] * h];
            self.pooling.pool(rows, pb.len_of(s), h, out);
        }
        let mut embeddings = pooled.clone();
        if self.normalize {
            embeddings.chunks_exact_mut(h).for_each(math::l2_normalize);
        }
        Ok(Activations {
            emb_sum,
            layer_inputs,
            layers,
            pooled,
            embeddings,
        })
    }

    /// Adds the parameter gradients of `Σ d_embeddings ⊙ embeddings` to `grads`.
    pub fn backward(
        &self,
        batch: &TrainBatch,
        dropout: &DropoutPlan,
        acts: Activations,
        d_embeddings: &[f32],
        grads: &mut BertWeights,
    ) -> Result<()> {
        let cfg = &self.bert.cfg;
        let w = &self.bert.weights;
        let h = cfg.hidden_size;
        let pb = &batch.packed;
        if d_embeddings.len() != acts.embeddings.len() {
            return Err(Error::InvalidArgument(
                "embedding gradient shape differs from the forward's embeddings".into(),
            ));
        }
        // normalisation and pooling backward → gradient of the encoder output
        let mut d_pooled = d_embeddings.to_vec();
        if self.normalize {
            for (s, dp) in d_pooled.chunks_exact_mut(h).enumerate() {
                let dy = dp.to_vec();
                bw::l2_normalize_backward(&acts.pooled[s * h..(s + 1) * h], &dy, dp);
            }
        }
        let hidden = &acts.layer_inputs[cfg.num_hidden_layers];
        let mut dx = vec![0.0f32; pb.tokens() * h];
        for s in 0..pb.sequences() {
            let (start, len) = (pb.offsets[s], pb.len_of(s));
            pool_backward(
                self.pooling,
                &hidden[start * h..(start + len) * h],
                &d_pooled[s * h..(s + 1) * h],
                &mut dx[start * h..(start + len) * h],
            );
        }

        let eps = cfg.layer_norm_eps as f32;
        let Activations {
            emb_sum,
            layer_inputs,
            mut layers,
            ..
        } = acts;
        for l in (0..cfg.num_hidden_layers).rev() {
            let lw = &w.layers[l];
            let x_in = &layer_inputs[l];
            let la = match layers[l].take() {
                Some(a) => a,
                None => self.layer_forward(l, lw, x_in, batch, dropout).0,
            };
            dx = self.layer_backward(l, lw, x_in, &la, batch, dropout, &dx, &mut grads.layers[l]);
        }

        // embeddings: dropout, LayerNorm, then the scatter into the three tables
        apply_dropout(
            &mut dx,
            h,
            batch,
            dropout,
            dropout.hidden,
            0,
            Site::EmbeddingDropout,
        );
        let mut ds0 = vec![0.0f32; dx.len()];
        bw::layernorm_backward(
            &emb_sum,
            h,
            &w.emb_ln_g,
            eps,
            &dx,
            &mut ds0,
            &mut grads.emb_ln_g,
            &mut grads.emb_ln_b,
        );
        for s in 0..pb.sequences() {
            for (pos, tok) in (pb.offsets[s]..pb.offsets[s + 1]).enumerate() {
                let g = &ds0[tok * h..(tok + 1) * h];
                let wid = pb.ids[tok] as usize;
                let tid = pb.type_ids[tok] as usize;
                add_into(&mut grads.word_emb[wid * h..(wid + 1) * h], g);
                add_into(&mut grads.pos_emb[pos * h..(pos + 1) * h], g);
                add_into(&mut grads.type_emb[tid * h..(tid + 1) * h], g);
            }
        }
        Ok(())
    }

    fn layer_forward(
        &self,
        l: usize,
        lw: &LayerWeights,
        x: &[f32],
        batch: &TrainBatch,
        dropout: &DropoutPlan,
    ) -> (LayerActs, Vec<f32>) {
        let cfg = &self.bert.cfg;
        let (h, inter, heads) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_attention_heads,
        );
        let t = batch.packed.tokens();
        let eps = cfg.layer_norm_eps as f32;
        let layer = l as u32 + 1; // 0 is the embeddings

        let mut qkv = vec![0.0f32; t * 3 * h];
        gemm::linear(x, t, h, &lw.qkv_w, &lw.qkv_b, 3 * h, &mut qkv);
        let mut ctx = vec![0.0f32; t * h];
        for_each_sequence(batch, h, &mut ctx, |s, start, out| {
            let len = out.len() / h;
            let drop = attn_dropout(batch, dropout, s, layer);
            bw::attention_sequence_train(
                &qkv[start * 3 * h..(start + len) * 3 * h],
                len,
                h,
                heads,
                drop.as_ref(),
                out,
            );
        });
        let mut s1 = vec![0.0f32; t * h];
        gemm::linear(&ctx, t, h, &lw.attn_out_w, &lw.attn_out_b, h, &mut s1);
        apply_dropout(
            &mut s1,
            h,
            batch,
            dropout,
            dropout.hidden,
            layer,
            Site::AttentionOutputDropout,
        );
        add_into(&mut s1, x);
        let mut x1 = s1.clone();
        math::add_layernorm(&mut x1, None, h, &lw.attn_ln_g, &lw.attn_ln_b, eps);
        let mut mid_pre = vec![0.0f32; t * inter];
        gemm::linear(&x1, t, h, &lw.inter_w, &lw.inter_b, inter, &mut mid_pre);
        let mut mid = mid_pre.clone();
        math::gelu_inplace(&mut mid);
        let mut s2 = vec![0.0f32; t * h];
        gemm::linear(&mid, t, inter, &lw.out_w, &lw.out_b, h, &mut s2);
        apply_dropout(
            &mut s2,
            h,
            batch,
            dropout,
            dropout.hidden,
            layer,
            Site::FfnOutputDropout,
        );
        add_into(&mut s2, &x1);
        let mut out = s2.clone();
        math::add_layernorm(&mut out, None, h, &lw.out_ln_g, &lw.out_ln_b, eps);
        (
            LayerActs {
                qkv,
                ctx,
                s1,
                x1,
                mid_pre,
                s2,
            },
            out,
        )
    }

    /// Gradient of the layer input from the gradient of its output; parameter gradients added.
    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &self,
        l: usize,
        lw: &LayerWeights,
        x: &[f32],
        a: &LayerActs,
        batch: &TrainBatch,
        dropout: &DropoutPlan,
        d_out: &[f32],
        g: &mut LayerWeights,
    ) -> Vec<f32> {
        let cfg = &self.bert.cfg;
        let (h, inter, heads) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_attention_heads,
        );
        let t = batch.packed.tokens();
        let eps = cfg.layer_norm_eps as f32;
        let layer = l as u32 + 1;

        // out = LN2(s2), s2 = dropout(mid·W2ᵀ + b2) + x1
        let mut ds2 = vec![0.0f32; t * h];
        bw::layernorm_backward(
            &a.s2,
            h,
            &lw.out_ln_g,
            eps,
            d_out,
            &mut ds2,
            &mut g.out_ln_g,
            &mut g.out_ln_b,
        );
        let mut d_ffn = ds2.clone();
        apply_dropout(
            &mut d_ffn,
            h,
            batch,
            dropout,
            dropout.hidden,
            layer,
            Site::FfnOutputDropout,
        );
        let mut mid = a.mid_pre.clone();
        math::gelu_inplace(&mut mid);
        let mut dmid = vec![0.0f32; t * inter];
        bw::linear_backward(
            &mid,
            t,
            inter,
            &lw.out_w,
            h,
            &d_ffn,
            Some(&mut dmid),
            &mut g.out_w,
            &mut g.out_b,
        );
        drop(mid);
        bw::gelu_backward(&a.mid_pre, &mut dmid);
        let mut dx1 = vec![0.0f32; t * h];
        bw::linear_backward(
            &a.x1,
            t,
            h,
            &lw.inter_w,
            inter,
            &dmid,
            Some(&mut dx1),
            &mut g.inter_w,
            &mut g.inter_b,
        );
        drop(dmid);
        add_into(&mut dx1, &ds2);

        // x1 = LN1(s1), s1 = dropout(ctx·Woᵀ + bo) + x
        let mut ds1 = ds2; // reuse the allocation
        bw::layernorm_backward(
            &a.s1,
            h,
            &lw.attn_ln_g,
            eps,
            &dx1,
            &mut ds1,
            &mut g.attn_ln_g,
            &mut g.attn_ln_b,
        );
        let mut d_attn = ds1.clone();
        apply_dropout(
            &mut d_attn,
            h,
            batch,
            dropout,
            dropout.hidden,
            layer,
            Site::AttentionOutputDropout,
        );
        let mut dctx = dx1; // reuse
        bw::linear_backward(
            &a.ctx,
            t,
            h,
            &lw.attn_out_w,
            h,
            &d_attn,
            Some(&mut dctx),
            &mut g.attn_out_w,
            &mut g.attn_out_b,
        );
        let mut dqkv = vec![0.0f32; t * 3 * h];
        for_each_sequence(batch, 3 * h, &mut dqkv, |s, start, out| {
            let len = out.len() / (3 * h);
            let drop = attn_dropout(batch, dropout, s, layer);
            bw::attention_sequence_backward(
                &a.qkv[start * 3 * h..(start + len) * 3 * h],
                len,
                h,
                heads,
                drop.as_ref(),
                &dctx[start * h..(start + len) * h],
                out,
            );
        });
        let mut dx = d_attn; // reuse
        bw::linear_backward(
            x,
            t,
            h,
            &lw.qkv_w,
            3 * h,
            &dqkv,
            Some(&mut dx),
            &mut g.qkv_w,
            &mut g.qkv_b,
        );
        add_into(&mut dx, &ds1);
        dx
    }
}

/// Backward of [`Pooling::pool`] for one sequence: `rows` `[len × h]`, `dy` `[h]`, `dx` += .
fn pool_backward(pooling: Pooling, rows: &[f32], dy: &[f32], dx: &mut [f32]) {
    let h = dy.len();
    let len = rows.len() / h.max(1);
    if len == 0 {
        return; // an empty sequence pools to a constant (zero)
    }
    match pooling {
        Pooling::Cls => add_into(&mut dx[..h], dy),
        Pooling::Mean => {
            let inv = 1.0 / len.max(1) as f32;
            for row in dx.chunks_exact_mut(h) {
                for (o, &g) in row.iter_mut().zip(dy) {
                    *o += g * inv;
                }
            }
        }
        Pooling::Max => {
            // the gradient goes to the first row holding each column's maximum
            for c in 0..h {
                let mut best = 0;
                for r in 1..len {
                    if rows[r * h + c] > rows[best * h + c] {
                        best = r;
                    }
                }
                dx[best * h + c] += dy[c];
            }
        }
    }
}

fn add_into(dst: &mut [f32], src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

/// Runs `f(sequence, first_token, rows_of_out)` for every sequence in parallel, `out` being a
/// `[tokens × width]` matrix split into each sequence's disjoint rows.
fn for_each_sequence<F>(batch: &TrainBatch, width: usize, out: &mut [f32], f: F)
where
    F: Fn(usize, usize, &mut [f32]) + Sync,
{
    let pb = &batch.packed;
    let mut parts: Vec<(usize, usize, &mut [f32])> = Vec::with_capacity(pb.sequences());
    let mut rest = out;
    for s in 0..pb.sequences() {
        let (a, b) = rest.split_at_mut(pb.len_of(s) * width);
        parts.push((s, pb.offsets[s], a));
        rest = b;
    }
    parts
        .into_par_iter()
        .for_each(|(s, start, rows)| f(s, start, rows));
}

fn attn_dropout(batch: &TrainBatch, d: &DropoutPlan, s: usize, layer: u32) -> Option<AttnDropout> {
    (d.attention > 0.0).then(|| AttnDropout {
        p: d.attention,
        stream: Stream::new(
            d.seed,
            d.step,
            batch.example_ids[s],
            layer,
            Site::AttentionDropout,
        ),
    })
}

/// Dropout of a `[tokens × width]` activation, each sequence with its own stream.
fn apply_dropout(
    x: &mut [f32],
    width: usize,
    batch: &TrainBatch,
    d: &DropoutPlan,
    p: f32,
    layer: u32,
    site: Site,
) {
    if p <= 0.0 {
        return;
    }
    for_each_sequence(batch, width, x, |s, _, rows| {
        let stream = Stream::new(d.seed, d.step, batch.example_ids[s], layer, site);
        bw::dropout_inplace(rows, p, &stream);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synthetic::{batch_with_lengths, random_bert, small_config};

    /// An empty sequence in a batch pools to zero and takes no part in the gradients: the batch
    /// without it gives bitwise the same embeddings and parameter gradients, in every pooling.
    #[test]
    fn an_empty_sequence_changes_nothing() {
        let bert = random_bert(small_config(32, 4, 2, 64), 3);
        let full = batch_with_lengths(&bert.cfg, &[5, 0, 7], 9);
        let mut without = PackedBatch::new();
        for s in [0, 2] {
            let r = full.offsets[s]..full.offsets[s + 1];
            without.push(&full.ids[r.clone()], &full.type_ids[r]);
        }
        let h = bert.cfg.hidden_size;
        let run = |packed: &PackedBatch, pooling: Pooling, d_emb: &[f32]| {
            let n = packed.sequences() as u64;
            let batch = TrainBatch {
                packed: packed.clone(),
                example_ids: (0..n).collect(),
            };
            let te = TrainableEncoder {
                bert: &bert,
                pooling,
                normalize: true,
            };
            let none = DropoutPlan::none();
            let acts = te.forward(&batch, &none, ActivationMode::Keep).unwrap();
            let emb = acts.embeddings.clone();
            let mut grads = BertWeights::zeros(&bert.cfg);
            te.backward(&batch, &none, acts, d_emb, &mut grads).unwrap();
            let bits: Vec<u32> = grads
                .tensors()
                .iter()
                .flat_map(|t| t.iter())
                .map(|v| v.to_bits())
                .collect();
            (emb, bits)
        };
        let d: Vec<f32> = (0..3 * h).map(|i| ((i % 7) as f32 - 3.0) * 0.1).collect();
        let d_without: Vec<f32> = d[..h].iter().chain(&d[2 * h..]).copied().collect();
        for pooling in [Pooling::Mean, Pooling::Cls, Pooling::Max] {
            let (e_full, g_full) = run(&full, pooling, &d);
            let (e_without, g_without) = run(&without, pooling, &d_without);
            assert!(
                e_full[h..2 * h].iter().all(|&v| v == 0.0),
                "{pooling}: pools to zero"
            );
            assert_eq!(&e_full[..h], &e_without[..h], "{pooling}");
            assert_eq!(&e_full[2 * h..], &e_without[h..], "{pooling}");
            assert!(
                g_full == g_without,
                "{pooling}: gradients with and without it"
            );
        }
    }
}
