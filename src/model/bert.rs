//! The BERT encoder forward pass on the CPU (post-LayerNorm, exact erf GELU, bidirectional
//! attention), f32 throughout: the reference every GPU kernel is checked against.
//!
//! Sequences are *packed* end to end with no padding: `offsets[s]..offsets[s + 1]` are the token
//! rows of sequence `s`. This is the attention mask in its cheapest exact form (FlashAttention's
//! "varlen" layout): the dense layers never compute padding rows, and attention only ever sees
//! its own sequence's keys, which is what an additive -inf mask over padding gives after softmax.

use super::config::BertConfig;
use super::weights::BertWeights;
use crate::cpu::{attention, gemm, math, panel_gemm};
use crate::error::{Error, Result};
use rayon::prelude::*;

/// Token sequences packed back to back (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct PackedBatch {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    /// `offsets.len() == sequences + 1`, `offsets[0] == 0`, non-decreasing.
    pub offsets: Vec<usize>,
}

impl PackedBatch {
    pub fn new() -> Self {
        PackedBatch {
            offsets: vec![0],
            ..Default::default()
        }
    }
    /// Empties the batch, keeping its memory.
    pub fn clear(&mut self) {
        self.ids.clear();
        self.type_ids.clear();
        self.offsets.clear();
        self.offsets.push(0);
    }
    pub fn push(&mut self, ids: &[u32], type_ids: &[u32]) {
        self.ids.extend_from_slice(ids);
        self.type_ids.extend_from_slice(type_ids);
        self.offsets.push(self.ids.len());
    }
    pub fn sequences(&self) -> usize {
        self.offsets.len() - 1
    }
    pub fn tokens(&self) -> usize {
        self.ids.len()
    }
    pub fn len_of(&self, s: usize) -> usize {
        self.offsets[s + 1] - self.offsets[s]
    }
}

/// Reusable activations of [`Bert::forward_into`].
#[derive(Debug, Default)]
pub struct Workspace {
    x: Vec<f32>,
    qkv: Vec<f32>,
    ctx: Vec<f32>,
    x1: Vec<f32>,
    mid: Vec<f32>,
}

pub struct Bert {
    pub cfg: BertConfig,
    pub weights: BertWeights,
}

/// The layers' four weight matrices packed into column panels ([`panel_gemm`]) for forwards of
/// few tokens (one query), where the panel kernel beats the unpacked one (up to 2× with
/// AVX-512). A second copy of the layer weights: the caller builds it once, and must rebuild it
/// when the weights change.
pub struct PackedLayers {
    /// `(hidden, intermediate)` sizes they were packed for.
    sizes: (usize, usize),
    layers: Vec<[Vec<f32>; 4]>,
}

impl PackedLayers {
    pub fn of(bert: &Bert) -> PackedLayers {
        let (h, inter) = (bert.cfg.hidden_size, bert.cfg.intermediate_size);
        let pack = panel_gemm::pack_panels;
        PackedLayers {
            sizes: (h, inter),
            layers: bert
                .weights
                .layers
                .iter()
                .map(|lw| {
                    [
                        pack(&lw.qkv_w, 3 * h, h),
                        pack(&lw.attn_out_w, h, h),
                        pack(&lw.inter_w, inter, h),
                        pack(&lw.out_w, h, inter),
                    ]
                })
                .collect(),
        }
    }
}

impl Bert {
    /// Last hidden states `[tokens × hidden]` for a packed batch.
    pub fn forward(&self, batch: &PackedBatch) -> Result<Vec<f32>> {
        let mut ws = Workspace::default();
        self.forward_into(batch, &mut ws)?;
        Ok(std::mem::take(&mut ws.x))
    }

    /// [`Bert::forward`] in reused activation buffers: allocates only while they grow. The
    /// result is a view of the workspace.
    pub fn forward_into<'w>(
        &self,
        batch: &PackedBatch,
        ws: &'w mut Workspace,
    ) -> Result<&'w [f32]> {
        self.forward_with(batch, ws, None)
    }

    /// [`Bert::forward_into`], with the dense layers on `packed` (built from these weights by
    /// [`PackedLayers::of`]) when given; the values then differ in the last bits (another
    /// summation order).
    pub fn forward_with<'w>(
        &self,
        batch: &PackedBatch,
        ws: &'w mut Workspace,
        packed: Option<&PackedLayers>,
    ) -> Result<&'w [f32]> {
        let cfg = &self.cfg;
        let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let t = batch.tokens();
        self.check(batch)?;
        if packed
            .is_some_and(|p| p.layers.len() != self.weights.layers.len() || p.sizes != (h, inter))
        {
            return Err(Error::InvalidArgument(
                "packed weights of another model".into(),
            ));
        }
        let eps = cfg.layer_norm_eps as f32;
        let Workspace {
            x,
            qkv,
            ctx,
            x1,
            mid,
        } = ws;
        // Every buffer is overwritten whole before it is read.
        for (buf, len) in [
            (&mut *x, t * h),
            (&mut *qkv, t * 3 * h),
            (&mut *ctx, t * h),
            (&mut *x1, t * h),
            (&mut *mid, t * inter),
        ] {
            buf.resize(len, 0.0);
        }
        self.embed_into(batch, x);
        math::add_layernorm(
            x,
            None,
            h,
            &self.weights.emb_ln_g,
            &self.weights.emb_ln_b,
            eps,
        );
        for (l, lw) in self.weights.layers.iter().enumerate() {
            let packed = packed.map(|p| &p.layers[l]);
            // `y = x·wᵀ + b` through layer l's weight matrix `m` (0..4, as in PackedLayers)
            let linear =
                |m: usize, x: &[f32], inp, w: &[f32], b: &[f32], out, y: &mut [f32]| match packed {
                    Some(p) => panel_gemm::packed_linear(x, t, inp, &p[m], b, out, y),
                    None => gemm::linear(x, t, inp, w, b, out, y),
                };
            linear(0, x, h, &lw.qkv_w, &lw.qkv_b, 3 * h, qkv);
            self.attention(batch, qkv, ctx);
            linear(1, ctx, h, &lw.attn_out_w, &lw.attn_out_b, h, x1);
            math::add_layernorm(x1, Some(x), h, &lw.attn_ln_g, &lw.attn_ln_b, eps);
            linear(2, x1, h, &lw.inter_w, &lw.inter_b, inter, mid);
            math::gelu_inplace(mid);
            linear(3, mid, inter, &lw.out_w, &lw.out_b, h, x);
            math::add_layernorm(x, Some(x1), h, &lw.out_ln_g, &lw.out_ln_b, eps);
        }
        Ok(&ws.x)
    }

    pub(crate) fn check(&self, batch: &PackedBatch) -> Result<()> {
        let cfg = &self.cfg;
        if batch.offsets.first() != Some(&0) || batch.offsets.last() != Some(&batch.ids.len()) {
            return Err(Error::InvalidArgument(
                "packed batch offsets are inconsistent".into(),
            ));
        }
        if batch.type_ids.len() != batch.ids.len() {
            return Err(Error::InvalidArgument(
                "type ids and token ids differ in length".into(),
            ));
        }
        for s in 0..batch.sequences() {
            let len = batch.len_of(s);
            if len > cfg.max_position_embeddings {
                return Err(Error::InvalidArgument(format!(
                    "sequence of {len} tokens exceeds max_position_embeddings {}",
                    cfg.max_position_embeddings
                )));
            }
        }
        if let Some(&id) = batch.ids.iter().find(|&&id| id as usize >= cfg.vocab_size) {
            return Err(Error::InvalidArgument(format!(
                "token id {id} is outside the vocabulary ({} entries)",
                cfg.vocab_size
            )));
        }
        if let Some(&ty) = batch
            .type_ids
            .iter()
            .find(|&&ty| ty as usize >= cfg.type_vocab_size)
        {
            return Err(Error::InvalidArgument(format!(
                "token type {ty} is outside type_vocab_size"
            )));
        }
        Ok(())
    }

    /// word + position + token-type embeddings (before the embedding LayerNorm).
    pub(crate) fn embed(&self, batch: &PackedBatch) -> Vec<f32> {
        let mut x = vec![0.0f32; batch.tokens() * self.cfg.hidden_size];
        self.embed_into(batch, &mut x);
        x
    }

    /// [`Bert::embed`] into `x` (`[tokens × hidden]`, every value overwritten).
    fn embed_into(&self, batch: &PackedBatch, x: &mut [f32]) {
        let h = self.cfg.hidden_size;
        let w = &self.weights;
        for s in 0..batch.sequences() {
            let (start, end) = (batch.offsets[s], batch.offsets[s + 1]);
            for (pos, tok) in (start..end).enumerate() {
                let row = &mut x[tok * h..(tok + 1) * h];
                let wid = batch.ids[tok] as usize;
                let tid = batch.type_ids[tok] as usize;
                let (we, pe, te) = (
                    &w.word_emb[wid * h..(wid + 1) * h],
                    &w.pos_emb[pos * h..(pos + 1) * h],
                    &w.type_emb[tid * h..(tid + 1) * h],
                );
                for i in 0..h {
                    row[i] = we[i] + pe[i] + te[i];
                }
            }
        }
    }

    /// Attention of every sequence (in parallel) from the fused `[tokens × 3h]` projection.
    fn attention(&self, batch: &PackedBatch, qkv: &[f32], ctx: &mut [f32]) {
        let h = self.cfg.hidden_size;
        let heads = self.cfg.num_attention_heads;
        if batch.sequences() == 1 {
            // One sequence (a query): no task list, no trip through the thread pool.
            attention::attention_sequence(qkv, batch.tokens(), h, heads, ctx);
            return;
        }

        // Split ctx into one disjoint slice per sequence so sequences run in parallel.
        let mut per_seq: Vec<(usize, &mut [f32])> = Vec::with_capacity(batch.sequences());
        let mut rest = ctx;
        for s in 0..batch.sequences() {
            let (a, b) = rest.split_at_mut(batch.len_of(s) * h);
            per_seq.push((batch.offsets[s], a));
            rest = b;
        }
        per_seq.into_par_iter().for_each(|(start, out)| {
            let len = out.len() / h;
            attention::attention_sequence(
                &qkv[start * 3 * h..(start + len) * 3 * h],
                len,
                h,
                heads,
                out,
            );
        });
    }
}
