//! The encoder's training forward and backward on the GPU, in f32 or mixed precision: the
//! device twin of [`crate::train::encoder_grad::TrainableEncoder`] (packed variable-length
//! batch, post-LN BERT, pooling and optional L2 normalisation), with the same contract: the
//! forward returns the embeddings the loss sees, the backward *adds* every parameter gradient
//! to a [`BertWeights`] accumulator.
//!
//! Pieces: the GEMMs and the linear layers' input and weight gradients are cuBLAS products
//! (row-major mapping in `super::runtime::gemm_row_major`, weight gradients accumulated with
//! beta = 1); attention (f32) and pooling run the inference kernels; the row-wise forward steps
//! that must keep their inputs are `kernels/encoder_train.cu`; the backward uses
//! [`super::backward::GpuBackward`] (LayerNorm, bias, GELU, pooling, L2 and the atomic-free
//! embedding scatter) and [`super::attention_backward::GpuAttentionBackward`]. The
//! mixed-precision layers are in `mixed`, the device check's rows in `bench`.
//!
//! Kept per layer (the CPU's `ActivationMode::Keep`): the layer input, the QKV projection
//! (without its bias: attention adds it, and its backward takes it), the attention context, the
//! two pre-LayerNorm sums and the pre-GELU activations; the GELU output is recomputed in
//! backward. Dropout is the CPU's, mask for mask: every site draws from the same Philox stream
//! as `train::encoder_grad` (per sequence, keyed by seed, step, example id, layer and site), the
//! hidden-state masks in `kernels/encoder_train.cu` and the attention-probability masks in its
//! training attention kernels and in the attention backward.
//!
//! Precision: f32 activations, weights and gradients by default; the products are full f32
//! (against the CPU only summation orders and erf/exp differ), or round their operands to TF32
//! with [`GemmMath::Tf32`]. [`GemmMath::Bf16`] is mixed precision as bf16 autocast runs it: for
//! head dims 32, 64 and 128 the kept activations are bf16 (the products' inputs and outputs:
//! layer input, QKV, context, attention output, pre-GELU; the sums entering a LayerNorm stay
//! f32, as does the residual stream), the products take bf16 operands (bf16 working copies of
//! the f32 master weights, refreshed when those change) with f32 accumulation, the gradients
//! entering a product are rounded to bf16, the weight and bias gradients accumulate in f32, and
//! attention runs forward and backward on the tensor cores (`rrra_attention_train_mma_bf16_d*`,
//! `rrra_attention_backward_{dq,dkdv}_mma_bf16_d*`, dropout included). Other head dims keep f32
//! activations and round only the products' operands. tests/gpu_encoder_train.rs states the
//! tolerances of each mode.
//!
//! Memory: [`GpuTrainableEncoder::new`] uploads the weights and allocates the gradients and
//! the backward's scratch; the first forward allocates every activation for `max_tokens`
//! tokens in `max_sequences` sequences in the storage of the mode then set (per token and
//! layer 48h bytes with f32 activations, 28h with bf16 ones, h the hidden size), so a mixed-
//! precision encoder never holds the f32 set; [`GpuTrainableEncoder::set_gemm_math`]
//! reallocates them when the storage changes after that. A step then allocates only the
//! embedding gradient's schedule (a few index arrays per batch).

use super::attention_backward::{AttnDropoutPlan, GpuAttentionBackward};
use super::backward::{EmbeddingGradPlan, GpuBackward};
use super::encoder::{check_config, AttentionKernel, Precision};
use super::runtime::{
    alloc, cublas_f32, cuda_err, grid_stride, launch_cfg, poison, ptr, sgemm_row_major, to_i32,
    upload, F32Blas, GemmMath, Gpu,
};
use crate::error::{Error, Result};
use crate::model::bert::{Bert, PackedBatch};
use crate::model::config::BertConfig;
use crate::model::pooling::Pooling;
use crate::model::weights::BertWeights;
use crate::train::encoder_grad::{DropoutPlan, TrainBatch};
use crate::train::parallel::backward_groups;
use crate::train::rng::{Site, Stream};
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, PushKernelArg};
use std::sync::Arc;

mod bench;
mod mixed;
pub use bench::{bench, bench_products};
use mixed::{Bf16Acts, LayerActsBf16, LINEAR_WEIGHTS};

const MODULE: &str = "encoder_train";
const THREADS: u32 = 256;

/// What [`GpuTrainableEncoder::accumulate_backward_with`] calls as each group of gradient
/// tensors is finished: the stream the backward runs on, and the group's buffers.
pub type GroupDone<'a> = dyn FnMut(&Arc<CudaStream>, &mut [CudaSlice<f32>]) -> Result<()> + 'a;

/// Indices of a layer's tensors within its 12 (the order of `BertWeights::tensors`).
mod t {
    pub const QKV_W: usize = 0;
    pub const QKV_B: usize = 1;
    pub const ATTN_OUT_W: usize = 2;
    pub const ATTN_OUT_B: usize = 3;
    pub const ATTN_LN_G: usize = 4;
    pub const ATTN_LN_B: usize = 5;
    pub const INTER_W: usize = 6;
    pub const INTER_B: usize = 7;
    pub const OUT_W: usize = 8;
    pub const OUT_B: usize = 9;
    pub const OUT_LN_G: usize = 10;
    pub const OUT_LN_B: usize = 11;
    pub const PER_LAYER: usize = 12;
    /// word, position, type tables, then the embedding LayerNorm's gamma and beta
    pub const EMBEDDING: usize = 5;
    pub const WORD: usize = 0;
    pub const POS: usize = 1;
    pub const TYPE: usize = 2;
    pub const EMB_LN_G: usize = 3;
    pub const EMB_LN_B: usize = 4;
}

struct Kernels {
    embed_sum: CudaFunction,
    /// `rrra_train_layernorm_f32`, and `_f32_bf16` (with a bf16 copy, the mixed layers').
    layernorm: [CudaFunction; 2],
    bias_residual: CudaFunction,
    bias_dropout_residual: CudaFunction,
    dropout: CudaFunction,
    attention_dropout: CudaFunction,
    /// f32, then bf16 (the mixed layers').
    bias_gelu: [CudaFunction; 2],
    gelu: [CudaFunction; 2],
    add: CudaFunction,
    attention: AttentionKernel,
    /// `rrra_attention_train_mma_d{dh}` (kernels/attention.cu) for head dims 32, 64 and 128:
    /// the tensor-core attention on f32 QKV (tests hold it to the f32 kernels), with or without
    /// dropout; and its bf16 twin `rrra_attention_train_mma_bf16_d{dh}`, the attention of the
    /// mixed-precision mode ([`GemmMath::Bf16`]).
    attention_mma: Option<(CudaFunction, CudaFunction)>,
    pool: [CudaFunction; 3],
    /// The f32 → bf16 cast (the mixed layers').
    to_bf16: CudaFunction,
}

/// What one layer's forward keeps (f32 activations).
struct LayerActs {
    qkv: CudaSlice<f32>,
    ctx: CudaSlice<f32>,
    s1: CudaSlice<f32>,
    x1: CudaSlice<f32>,
    mid_pre: CudaSlice<f32>,
    s2: CudaSlice<f32>,
}

/// The batch of the last forward.
struct Batch {
    tokens: usize,
    sequences: usize,
    offsets: Vec<u32>,
    plan: EmbeddingGradPlan,
    dropout: DropoutPlan,
    example_ids: Vec<u64>,
}

impl Batch {
    /// The longest sequence's length.
    fn max_len(&self) -> usize {
        let lens = self.offsets.windows(2).map(|w| (w[1] - w[0]) as usize);
        lens.max().unwrap_or(0)
    }
}

/// The dropout sites in the stream-word buffer: the embeddings, then per layer (0-based) the
/// attention probabilities, the attention output and the FFN output.
fn site_slot(layer: usize, site: Site) -> usize {
    match site {
        Site::EmbeddingDropout => 0,
        Site::AttentionDropout => 1 + 3 * layer,
        Site::AttentionOutputDropout => 2 + 3 * layer,
        Site::FfnOutputDropout => 3 + 3 * layer,
        // the callers here pass the four sites above, constants all
        other => unreachable!("{other:?} is not a dropout site of the encoder"),
    }
}

/// Longest sequence the training attention kernel with dropout takes (`ATT_MAX_LEN`).
const DROPOUT_ATTENTION_MAX_LEN: usize = 512;
/// CUDA's largest grid z dimension.
const MAX_GRID_Z: usize = 65_535;

/// A BERT encoder resident on one GPU for training, with its gradients and activations.
pub struct GpuTrainableEncoder {
    cfg: BertConfig,
    pooling: Pooling,
    normalize: bool,
    gpu: Gpu,
    stream: Arc<CudaStream>,
    blas: F32Blas,
    k: Kernels,
    bw: GpuBackward,
    attn_bw: GpuAttentionBackward,
    /// The fused InfoNCE (`OffloadedEncoder::info_nce`), its kernels loaded once.
    loss: super::infonce::GpuInfoNce,
    max_tokens: usize,
    max_sequences: usize,
    /// Weights and gradients, each tensor in the order of `BertWeights::tensors`.
    w: Vec<CudaSlice<f32>>,
    g: Vec<CudaSlice<f32>>,
    ids: CudaSlice<u32>,
    type_ids: CudaSlice<u32>,
    offsets: CudaSlice<u32>,
    /// Philox words `[key0, key1, ctr2, ctr3]` per (dropout site, sequence): see `site_slot`.
    drop_words: CudaSlice<u32>,
    emb_sum: CudaSlice<f32>,
    /// The f32 residual stream: the layer inputs and the encoder output, one buffer per layer
    /// boundary with f32 activations; with bf16 ones only three (see `input_slot`), as the
    /// backward reads their bf16 copies.
    inputs: Vec<CudaSlice<f32>>,
    /// The f32 mode's activations (empty in the bf16 mode).
    layers: Vec<LayerActs>,
    /// The bf16 mode's activations and working weights (`None` in the f32 mode).
    mixed: Option<Box<Bf16Acts>>,
    pooled: CudaSlice<f32>,
    embeddings: CudaSlice<f32>,
    /// The f32 mode's FFN activation GELU(pre) of the layer at hand (recomputed in backward;
    /// one element in the bf16 mode).
    mid: CudaSlice<f32>,
    // backward scratch
    d_emb: CudaSlice<f32>,
    d_pooled: CudaSlice<f32>,
    dx: CudaSlice<f32>,
    ds_a: CudaSlice<f32>,
    ds_b: CudaSlice<f32>,
    dctx: CudaSlice<f32>,
    /// The f32 mode's QKV gradient (one element in the bf16 mode, whose dQKV is bf16).
    dqkv: CudaSlice<f32>,
    /// The f32 mode's FFN gradient (one element in the bf16 mode).
    dmid: CudaSlice<f32>,
    last: Option<Batch>,
}

impl GpuTrainableEncoder {
    /// Uploads `bert`'s weights to `gpu` and sizes everything for batches of at most
    /// `max_tokens` tokens in `max_sequences` sequences. Work goes on the default stream.
    pub fn new(
        gpu: &Gpu,
        bert: &Bert,
        pooling: Pooling,
        normalize: bool,
        max_tokens: usize,
        max_sequences: usize,
    ) -> Result<GpuTrainableEncoder> {
        let cfg = bert.cfg.clone();
        check_config(&cfg)?;
        if max_tokens == 0 || max_sequences == 0 {
            return Err(Error::InvalidArgument(
                "training buffers need at least one token and one sequence".into(),
            ));
        }
        if cfg.num_hidden_layers == 0 {
            return Err(Error::InvalidArgument(
                "the training encoder needs at least one layer".into(),
            ));
        }
        if max_sequences > MAX_GRID_Z {
            // the attention kernels take one grid z index per sequence
            return Err(Error::InvalidArgument(format!(
                "at most {MAX_GRID_Z} sequences per training batch, asked for {max_sequences}"
            )));
        }
        let (h, inter, layers) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_hidden_layers,
        );
        to_i32(
            max_tokens.saturating_mul(inter.max(3 * h)),
            "tokens × width",
        )?;
        let stream = gpu.stream().clone();
        stream
            .context()
            .bind_to_thread()
            .map_err(cuda_err("binding the context"))?;
        let f = |name: &str| gpu.function(MODULE, name);
        let k = Kernels {
            embed_sum: f("rrra_train_embed_sum_f32")?,
            layernorm: [
                f("rrra_train_layernorm_f32")?,
                f("rrra_train_layernorm_f32_bf16")?,
            ],
            bias_residual: f("rrra_train_bias_residual_f32")?,
            bias_dropout_residual: f("rrra_train_bias_dropout_residual_f32")?,
            dropout: f("rrra_train_dropout_f32")?,
            attention_dropout: f("rrra_train_attention_dropout_f32")?,
            bias_gelu: [
                f("rrra_train_bias_gelu_f32")?,
                f("rrra_train_bias_gelu_bf16")?,
            ],
            gelu: [f("rrra_train_gelu_f32")?, f("rrra_train_gelu_bf16")?],
            add: f("rrra_train_add_f32")?,
            attention: AttentionKernel::load(gpu, &cfg, Precision::F32)?,
            attention_mma: match cfg.head_dim() {
                dh @ (32 | 64 | 128) => {
                    let mma = |infix: &str| {
                        gpu.function("attention", &format!("rrra_attention_train_mma{infix}{dh}"))
                    };
                    Some((mma("_d")?, mma("_bf16_d")?))
                }
                _ => None,
            },
            pool: [
                gpu.function("pooling", "rrra_pool_mean_f32")?,
                gpu.function("pooling", "rrra_pool_cls_f32")?,
                gpu.function("pooling", "rrra_pool_max_f32")?,
            ],
            to_bf16: f("rrra_train_to_bf16")?,
        };
        let bw = GpuBackward::new(gpu)?;
        let attn_bw =
            GpuAttentionBackward::new(gpu, h, cfg.num_attention_heads, max_tokens, max_sequences)?;
        let blas = cublas_f32(&stream)?;
        let host = bert.weights.tensors();
        let mut w = Vec::with_capacity(host.len());
        let mut g = Vec::with_capacity(host.len());
        for t in &host {
            w.push(upload(&stream, t, "encoder weights")?);
            g.push(alloc(&stream, t.len(), "encoder gradients")?);
        }
        let (mt, ms) = (max_tokens, max_sequences);
        let buf = |n: usize, what: &str| alloc::<f32>(&stream, n, what);
        let enc = GpuTrainableEncoder {
            gpu: gpu.clone(),
            ids: alloc(&stream, mt, "token ids")?,
            type_ids: alloc(&stream, mt, "token type ids")?,
            offsets: alloc(&stream, ms + 1, "sequence offsets")?,
            drop_words: alloc(&stream, (1 + 3 * layers) * ms * 4, "dropout streams")?,
            emb_sum: buf(mt * h, "embedding sums")?,
            pooled: buf(ms * h, "pooled vectors")?,
            embeddings: buf(ms * h, "embeddings")?,
            mid: buf(1, "FFN activations")?,
            d_emb: buf(ms * h, "embedding gradients")?,
            d_pooled: buf(ms * h, "pooled gradients")?,
            dx: buf(mt * h, "hidden gradients")?,
            ds_a: buf(mt * h, "hidden gradients")?,
            ds_b: buf(mt * h, "hidden gradients")?,
            dctx: buf(mt * h, "context gradients")?,
            dqkv: buf(1, "QKV gradients")?,
            dmid: buf(1, "FFN gradients")?,
            inputs: Vec::new(),
            layers: Vec::new(),
            mixed: None,
            w,
            g,
            cfg,
            pooling,
            normalize,
            stream,
            blas,
            k,
            bw,
            attn_bw,
            loss: super::infonce::GpuInfoNce::new(gpu)?,
            max_tokens,
            max_sequences,
            last: None,
        };
        enc.stream
            .synchronize()
            .map_err(cuda_err("uploading the encoder"))?;
        Ok(enc)
    }

    /// (Re)allocates the activations for f32 storage, or bf16 storage when `bf16`; the old ones
    /// are freed first, and the last forward is forgotten. On an error no activations are left
    /// (`inputs` empty): the next forward tries again.
    fn allocate_activations(&mut self, bf16: bool) -> Result<()> {
        self.last = None;
        self.inputs.clear();
        self.layers.clear();
        self.mixed = None;
        let (inputs, layers, mixed) = self.new_activations(bf16)?;
        (self.layers, self.mixed) = (layers, mixed);
        self.inputs = inputs; // last: non-empty only when everything is in place
        Ok(())
    }

    /// The buffers of [`GpuTrainableEncoder::allocate_activations`]: `inputs`, `layers` and
    /// `mixed` (`mid`, `dmid` and `dqkv`, f32 storage's, are set here).
    #[allow(clippy::type_complexity)]
    fn new_activations(
        &mut self,
        bf16: bool,
    ) -> Result<(Vec<CudaSlice<f32>>, Vec<LayerActs>, Option<Box<Bf16Acts>>)> {
        let (h, inter, layers) = (
            self.cfg.hidden_size,
            self.cfg.intermediate_size,
            self.cfg.num_hidden_layers,
        );
        let (st, mt) = (&self.stream, self.max_tokens);
        let buf = |n: usize, what: &str| alloc::<f32>(st, n, what);
        let half = |n: usize, what: &str| alloc::<u16>(st, n, what);
        let ffn = if bf16 { 1 } else { mt * inter };
        self.mid = buf(ffn, "FFN activations")?;
        self.dmid = buf(ffn, "FFN gradients")?;
        self.dqkv = buf(if bf16 { 1 } else { mt * 3 * h }, "QKV gradients")?;
        let mut inputs = Vec::new();
        for _ in 0..if bf16 { 3 } else { layers + 1 } {
            inputs.push(buf(mt * h, "layer inputs")?);
        }
        if !bf16 {
            let mut f32_layers = Vec::with_capacity(layers);
            for _ in 0..layers {
                f32_layers.push(LayerActs {
                    qkv: buf(mt * 3 * h, "QKV projections")?,
                    ctx: buf(mt * h, "attention contexts")?,
                    s1: buf(mt * h, "attention sums")?,
                    x1: buf(mt * h, "attention outputs")?,
                    mid_pre: buf(mt * inter, "FFN pre-activations")?,
                    s2: buf(mt * h, "FFN sums")?,
                });
            }
            return Ok((inputs, f32_layers, None));
        }
        let mut acts = Vec::with_capacity(layers);
        let mut weights = Vec::with_capacity(layers);
        for l in 0..layers {
            acts.push(LayerActsBf16 {
                x: half(mt * h, "bf16 layer inputs")?,
                qkv: half(mt * 3 * h, "bf16 QKV projections")?,
                ctx: half(mt * h, "bf16 attention contexts")?,
                s1: buf(mt * h, "attention sums")?,
                x1: half(mt * h, "bf16 attention outputs")?,
                mid_pre: half(mt * inter, "bf16 FFN pre-activations")?,
                s2: buf(mt * h, "FFN sums")?,
            });
            let w = |i: usize| half(self.layer_w(l, i).len(), "bf16 working weights");
            weights.push([
                w(LINEAR_WEIGHTS[0])?,
                w(LINEAR_WEIGHTS[1])?,
                w(LINEAR_WEIGHTS[2])?,
                w(LINEAR_WEIGHTS[3])?,
            ]);
        }
        let mixed = Bf16Acts {
            layers: acts,
            weights,
            weights_current: false,
            x1: buf(mt * h, "attention outputs")?,
            mid: half(mt * inter, "bf16 FFN activations")?,
            dy: half(mt * 3 * h, "bf16 output gradients")?,
            dmid: half(mt * inter, "bf16 FFN gradients")?,
        };
        Ok((inputs, Vec::new(), Some(Box::new(mixed))))
    }

    /// Which `inputs` buffer holds the residual stream entering layer `l` (`l` = the layer
    /// count: the encoder output). With bf16 activations two buffers alternate between the
    /// layers (the backward reads the bf16 copies) and a third holds the output.
    fn input_slot(&self, l: usize) -> usize {
        let layers = self.cfg.num_hidden_layers;
        match self.inputs.len() {
            n if n == layers + 1 => l,
            _ if l == layers => 2,
            _ => l % 2,
        }
    }

    /// Whether the activations are stored in bf16 (the mixed-precision mode).
    pub fn bf16_activations(&self) -> bool {
        self.mixed.is_some()
    }

    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    /// Sets the arithmetic of every product (forward and backward): f32 by default;
    /// [`GemmMath::Bf16`] is the mixed-precision mode: for head dims 32, 64 and 128 the
    /// activations are stored in bf16, the products take bf16 operands (bf16 working copies of
    /// the f32 weights) with f32 accumulation, and attention, forward and backward, runs on the
    /// tensor cores; for other head dims only the products round their f32 operands to bf16.
    /// The activations are allocated by the first forward, in the storage of the mode then
    /// set; changing between bf16 and f32 storage after that reallocates them (the last
    /// forward is then spent).
    pub fn set_gemm_math(&mut self, math: GemmMath) -> Result<()> {
        self.blas.math = math;
        if !self.inputs.is_empty() && self.wants_bf16() != self.bf16_activations() {
            self.allocate_activations(self.wants_bf16())?;
        }
        Ok(())
    }

    /// Whether the mode set stores the activations in bf16.
    fn wants_bf16(&self) -> bool {
        self.blas.math == GemmMath::Bf16 && self.k.attention_mma.is_some()
    }

    pub fn gemm_math(&self) -> GemmMath {
        self.blas.math
    }

    /// Replaces the weights (same configuration), e.g. after a host optimizer step.
    pub fn set_weights(&mut self, weights: &BertWeights) -> Result<()> {
        let host = weights.tensors();
        if host.len() != self.w.len() || host.iter().zip(&self.w).any(|(h, d)| h.len() != d.len()) {
            return Err(Error::InvalidArgument(
                "weights of another shape than the encoder on the GPU".into(),
            ));
        }
        // stale from the first copy on, even if a later one fails
        self.weights_changed();
        self.last = None;
        for (h, d) in host.iter().zip(self.w.iter_mut()) {
            self.stream
                .memcpy_htod(*h, d)
                .map_err(cuda_err("uploading encoder weights"))?;
        }
        self.stream
            .synchronize()
            .map_err(cuda_err("uploading encoder weights"))?;
        Ok(())
    }

    fn layer_w(&self, l: usize, i: usize) -> &CudaSlice<f32> {
        &self.w[t::EMBEDDING + l * t::PER_LAYER + i]
    }

    /// Forward over `batch` without dropout; returns the embeddings the loss sees,
    /// `[sequences × h]`, and keeps the activations for [`GpuTrainableEncoder::backward`].
    pub fn forward(&mut self, batch: &PackedBatch) -> Result<Vec<f32>> {
        let ids: Vec<u64> = (0..batch.sequences() as u64).collect();
        self.forward_batch(batch, &ids, &DropoutPlan::none())
    }

    /// [`GpuTrainableEncoder::forward`] with `dropout`, each sequence's masks keyed by its
    /// example id (`TrainableEncoder::forward`'s contract).
    pub fn forward_train(&mut self, batch: &TrainBatch, dropout: &DropoutPlan) -> Result<Vec<f32>> {
        self.forward_batch(&batch.packed, &batch.example_ids, dropout)
    }

    fn forward_batch(
        &mut self,
        batch: &PackedBatch,
        example_ids: &[u64],
        dropout: &DropoutPlan,
    ) -> Result<Vec<f32>> {
        self.last = None;
        if self.inputs.is_empty() {
            self.allocate_activations(self.wants_bf16())?;
        }
        let b = self.upload_batch(batch, example_ids, dropout)?;
        let cfg = self.cfg.clone();
        let (h, tok) = (cfg.hidden_size, b.tokens);
        let st = self.stream.clone();
        let eps = cfg.layer_norm_eps as f32;
        let p = |s: &CudaSlice<f32>| ptr(s, &st);
        let (ids, tys, offs) = (
            ptr(&self.ids, &st),
            ptr(&self.type_ids, &st),
            ptr(&self.offsets, &st),
        );
        let (we, pe, te) = (p(&self.w[t::WORD]), p(&self.w[t::POS]), p(&self.w[t::TYPE]));
        let (hi, es) = (to_i32(h, "hidden size")?, p(&self.emb_sum));
        // SAFETY (every launch in this function): the buffers were sized at construction for
        // max_tokens / max_sequences, which `upload_batch` checked; ids and positions were
        // checked against their tables; the arguments follow the kernels' signatures.
        unsafe {
            st.launch_builder(&self.k.embed_sum)
                .arg(&ids)
                .arg(&tys)
                .arg(&offs)
                .arg(&we)
                .arg(&pe)
                .arg(&te)
                .arg(&hi)
                .arg(&es)
                .launch(launch_cfg(b.sequences, THREADS, 0)?)
        }
        .map_err(cuda_err("launching rrra_train_embed_sum_f32"))?;
        let (g0, b0) = (p(&self.w[t::EMB_LN_G]), p(&self.w[t::EMB_LN_B]));
        let x0 = p(&self.inputs[0]);
        self.layernorm(es, g0, b0, eps, tok, x0, None)?;
        let hidden_p = b.dropout.hidden;
        if hidden_p > 0.0 {
            self.dropout(
                x0,
                x0,
                &b,
                h,
                hidden_p,
                site_slot(0, Site::EmbeddingDropout),
            )?;
        }
        // the bf16 mode's buffers are taken out while its layers run, and always put back
        let mut mixed = self.mixed.take();
        let layers = match mixed.as_deref_mut() {
            Some(m) => self.forward_layers_bf16(&b, m),
            None => (0..cfg.num_hidden_layers).try_for_each(|l| self.forward_layer_f32(l, &b)),
        };
        self.mixed = mixed;
        layers?;
        let hidden = p(&self.inputs[self.input_slot(cfg.num_hidden_layers)]);
        self.pool(hidden, b.sequences, false, p(&self.pooled))?;
        self.pool(hidden, b.sequences, self.normalize, p(&self.embeddings))?;
        let mut out = vec![0.0f32; b.sequences * h];
        st.memcpy_dtoh(&self.embeddings.slice(..out.len()), &mut out)
            .map_err(cuda_err("downloading embeddings"))?;
        self.last = Some(b);
        Ok(out)
    }

    /// Layer `l`'s forward with f32 activations: `inputs[l]` in, `inputs[l + 1]` out.
    fn forward_layer_f32(&self, l: usize, b: &Batch) -> Result<()> {
        let cfg = &self.cfg;
        let (h, inter, tok) = (cfg.hidden_size, cfg.intermediate_size, b.tokens);
        let eps = cfg.layer_norm_eps as f32;
        let st = &self.stream;
        let p = |s: &CudaSlice<f32>| ptr(s, st);
        let x = p(&self.inputs[l]);
        let a = &self.layers[l];
        let (qkv, ctx, s1, x1) = (p(&a.qkv), p(&a.ctx), p(&a.s1), p(&a.x1));
        let (mid_pre, s2, mid) = (p(&a.mid_pre), p(&a.s2), p(&self.mid));
        let wp = |i: usize| p(self.layer_w(l, i));
        self.linear(x, tok, h, wp(t::QKV_W), 3 * h, qkv)?;
        // f32 activations never take the tensor-core attention: GemmMath::Bf16 with a head
        // dim that has it stores them in bf16
        self.attention(l, qkv, b, false, ctx)?;
        self.linear(ctx, tok, h, wp(t::ATTN_OUT_W), h, s1)?;
        let slot = site_slot(l, Site::AttentionOutputDropout);
        self.bias_residual(s1, wp(t::ATTN_OUT_B), x, b, h, slot)?;
        self.layernorm(s1, wp(t::ATTN_LN_G), wp(t::ATTN_LN_B), eps, tok, x1, None)?;
        self.linear(x1, tok, h, wp(t::INTER_W), inter, mid_pre)?;
        self.bias_gelu(false, mid_pre, wp(t::INTER_B), tok, inter, mid)?;
        self.linear(mid, tok, inter, wp(t::OUT_W), h, s2)?;
        let slot = site_slot(l, Site::FfnOutputDropout);
        self.bias_residual(s2, wp(t::OUT_B), x1, b, h, slot)?;
        let out = p(&self.inputs[l + 1]);
        self.layernorm(s2, wp(t::OUT_LN_G), wp(t::OUT_LN_B), eps, tok, out, None)
    }

    /// Adds the parameter gradients of `Σ d_embeddings ⊙ embeddings` (over the last forward's
    /// batch) to `grads`.
    pub fn backward(&mut self, d_embeddings: &[f32], grads: &mut BertWeights) -> Result<()> {
        self.check_host(grads)?;
        self.zero_grads()?;
        self.backward_on_device(d_embeddings, &mut |_, _| Ok(()))?;
        self.add_grads_to(grads)
    }

    fn check_host(&self, grads: &BertWeights) -> Result<()> {
        let host = grads.tensors();
        if host.len() != self.g.len() || host.iter().zip(&self.g).any(|(a, d)| a.len() != d.len()) {
            return Err(Error::InvalidArgument(
                "gradient accumulator of another shape than the encoder".into(),
            ));
        }
        Ok(())
    }

    /// Adds the gradients kept on the device to `grads` (the host's accumulator).
    pub fn add_grads_to(&self, grads: &mut BertWeights) -> Result<()> {
        self.check_host(grads)?;
        let mut tmp = Vec::new();
        for ((acc, _), dev) in grads.tensors_mut().into_iter().zip(&self.g) {
            tmp.resize(acc.len(), 0.0f32);
            self.stream
                .memcpy_dtoh(dev, &mut tmp[..])
                .map_err(cuda_err("downloading encoder gradients"))?;
            for (a, v) in acc.iter_mut().zip(&tmp) {
                *a += v;
            }
        }
        Ok(())
    }

    /// Sets the gradients kept on the device to zero (queued on the stream).
    pub fn zero_grads(&mut self) -> Result<()> {
        for g in self.g.iter_mut() {
            self.stream
                .memset_zeros(g)
                .map_err(cuda_err("zeroing encoder gradients"))?;
        }
        Ok(())
    }

    /// Adds the parameter gradients of `Σ d_embeddings ⊙ embeddings` (over the last forward's
    /// batch) to the gradients kept on the device: the micro-batches of a step accumulate
    /// there, after [`GpuTrainableEncoder::zero_grads`].
    pub fn accumulate_backward(&mut self, d_embeddings: &[f32]) -> Result<()> {
        self.backward_on_device(d_embeddings, &mut |_, _| Ok(()))
    }

    /// [`GpuTrainableEncoder::accumulate_backward`], calling `group_done` each time the
    /// backward has queued the last kernel that writes a group of gradient tensors, with the
    /// stream it queued them on and the group's buffers: the groups of
    /// `train::parallel::backward_groups`, in that order (each layer from the last down, then
    /// the embeddings). What `group_done` queues elsewhere overlaps the rest of the backward.
    pub fn accumulate_backward_with(
        &mut self,
        d_embeddings: &[f32],
        group_done: &mut GroupDone<'_>,
    ) -> Result<()> {
        self.backward_on_device(d_embeddings, group_done)
    }

    /// The stream the encoder's work is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The gradients kept on the device, to be changed in place (summed over ranks).
    pub fn device_grads_mut(&mut self) -> &mut [CudaSlice<f32>] {
        &mut self.g
    }

    /// The gradients kept on the device, one buffer per tensor in the order of
    /// `BertWeights::tensors`.
    pub fn device_grads(&self) -> &[CudaSlice<f32>] {
        &self.g
    }

    /// The weights on the device, one buffer per tensor in the order of `BertWeights::tensors`,
    /// for an optimizer that updates them in place. The last forward's activations no longer
    /// match them, so a backward needs a new forward.
    pub fn device_weights_mut(&mut self) -> &mut [CudaSlice<f32>] {
        self.last = None;
        self.weights_changed();
        &mut self.w
    }

    /// Marks the bf16 working weights stale: the next forward rounds them again.
    fn weights_changed(&mut self) {
        if let Some(m) = self.mixed.as_deref_mut() {
            m.weights_current = false;
        }
    }

    /// The backward with the gradients added to those on the device.
    fn backward_on_device(
        &mut self,
        d_embeddings: &[f32],
        group_done: &mut GroupDone<'_>,
    ) -> Result<()> {
        // after a backward the activations are spent, as on the CPU: a second backward
        // would add the same gradients again (and one that failed half-way added some)
        let b = self.last.take().ok_or_else(|| {
            Error::InvalidArgument("the encoder's backward needs a forward first".into())
        })?;
        let h = self.cfg.hidden_size;
        if d_embeddings.len() != b.sequences * h {
            let why = format!(
                "embedding gradient of {} values for {} sequences × {h}",
                d_embeddings.len(),
                b.sequences
            );
            self.last = Some(b); // refused before any work: the call may be retried
            return Err(Error::InvalidArgument(why));
        }
        self.backward_batch(&b, d_embeddings, group_done)
    }

    fn backward_batch(
        &mut self,
        b: &Batch,
        d_embeddings: &[f32],
        group_done: &mut GroupDone<'_>,
    ) -> Result<()> {
        let cfg = self.cfg.clone();
        let groups = backward_groups(cfg.num_hidden_layers);
        let (h, tok, seqs) = (cfg.hidden_size, b.tokens, b.sequences);
        let eps = cfg.layer_norm_eps as f32;
        let hidden_p = b.dropout.hidden;
        let st = self.stream.clone();
        st.memcpy_htod(
            d_embeddings,
            &mut self.d_emb.slice_mut(..d_embeddings.len()),
        )
        .map_err(cuda_err("uploading embedding gradients"))?;
        // normalisation and pooling backward → gradient of the encoder output, in dx
        if self.normalize {
            self.bw
                .l2_normalize(&self.pooled, Some(&self.d_emb), seqs, h, &mut self.d_pooled)?;
        } else {
            st.memcpy_dtod(
                &self.d_emb.slice(..seqs * h),
                &mut self.d_pooled.slice_mut(..seqs * h),
            )
            .map_err(cuda_err("copying embedding gradients"))?;
        }
        let hidden = &self.inputs[self.input_slot(cfg.num_hidden_layers)];
        self.bw.pool(
            self.pooling,
            &self.d_pooled,
            Some(hidden),
            &self.offsets,
            seqs,
            tok,
            h,
            &mut self.dx,
        )?;
        // the bf16 mode's buffers are taken out while its layers run, and always put back
        let mut mixed = self.mixed.take();
        let layers = self.backward_layers(b, mixed.as_deref_mut(), &groups, group_done);
        self.mixed = mixed;
        layers?;
        let p = |s: &CudaSlice<f32>| ptr(s, &st);
        // embeddings: dropout, LayerNorm backward into ds_a, then the scatter into the tables
        if hidden_p > 0.0 {
            let dx = p(&self.dx);
            self.dropout(dx, dx, b, h, hidden_p, site_slot(0, Site::EmbeddingDropout))?;
        }
        layernorm_backward(
            (&mut self.bw, &self.w, &mut self.g),
            t::EMB_LN_G,
            &self.emb_sum,
            &self.dx,
            &mut self.ds_a,
            (tok, h, eps),
        )?;
        let plan = b.plan.upload_on(&st)?;
        {
            let (word, rest) = self.g.split_at_mut(t::POS);
            let (pos, rest) = rest.split_at_mut(1);
            self.bw.embedding(
                &plan,
                &self.ds_a,
                h,
                &mut word[0],
                &mut pos[0],
                &mut rest[0],
            )?;
        }
        let embedding = groups[cfg.num_hidden_layers].clone();
        group_done(&st, &mut self.g[embedding])
    }

    /// The layers' backward, last to first, `group_done` called as each layer's gradients are
    /// final; `mixed` holds the bf16 mode's buffers, `None` with f32 activations.
    fn backward_layers(
        &mut self,
        b: &Batch,
        mut mixed: Option<&mut Bf16Acts>,
        groups: &[std::ops::Range<usize>],
        group_done: &mut GroupDone<'_>,
    ) -> Result<()> {
        let layers = self.cfg.num_hidden_layers;
        for l in (0..layers).rev() {
            match mixed.as_deref_mut() {
                Some(m) => self.backward_layer_bf16(l, b, m)?,
                None => self.backward_layer_f32(l, b)?,
            }
            // layer l's gradients are final for this backward
            let group = groups[layers - 1 - l].clone();
            debug_assert_eq!(group.start, t::EMBEDDING + l * t::PER_LAYER);
            group_done(&self.stream, &mut self.g[group])?;
        }
        Ok(())
    }

    /// Layer `l`'s backward with f32 activations: the gradient of its output in `dx`, that of
    /// its input left there; its parameter gradients added to `g`.
    fn backward_layer_f32(&mut self, l: usize, b: &Batch) -> Result<()> {
        let (h, inter, tok) = (self.cfg.hidden_size, self.cfg.intermediate_size, b.tokens);
        let eps = self.cfg.layer_norm_eps as f32;
        let hidden_p = b.dropout.hidden;
        let st = self.stream.clone();
        let p = |s: &CudaSlice<f32>| ptr(s, &st);
        let base = t::EMBEDDING + l * t::PER_LAYER;
        let gi = |i: usize| base + i;
        // out = LN2(s2): ds2 in ds_a
        layernorm_backward(
            (&mut self.bw, &self.w, &mut self.g),
            gi(t::OUT_LN_G),
            &self.layers[l].s2,
            &self.dx,
            &mut self.ds_a,
            (tok, h, eps),
        )?;
        // s2 = dropout(mid·Wo2ᵀ + bo2) + x1: dmid, ∂Wo2, ∂bo2 from the masked ds2 (in dctx,
        // free until the attention block)
        let d_ffn = if hidden_p > 0.0 {
            let slot = site_slot(l, Site::FfnOutputDropout);
            self.dropout(p(&self.dctx), p(&self.ds_a), b, h, hidden_p, slot)?;
            SliceId::Dctx
        } else {
            SliceId::DsA
        };
        self.gelu(false, p(&self.layers[l].mid_pre), tok * inter, p(&self.mid))?;
        self.linear_backward(
            p(&self.mid),
            tok,
            inter,
            gi(t::OUT_W),
            gi(t::OUT_B),
            h,
            d_ffn,
            Some(p(&self.dmid)),
        )?;
        self.bw
            .gelu(&self.layers[l].mid_pre, &mut self.dmid, tok * inter)?;
        // mid_pre = x1·Wiᵀ + bi: dx1 in ds_b, then + ds2 (the residual)
        self.linear_backward(
            p(&self.layers[l].x1),
            tok,
            h,
            gi(t::INTER_W),
            gi(t::INTER_B),
            inter,
            SliceId::Dmid,
            Some(p(&self.ds_b)),
        )?;
        self.add(p(&self.ds_b), p(&self.ds_a), tok * h)?;
        // x1 = LN1(s1): ds1 in ds_a
        layernorm_backward(
            (&mut self.bw, &self.w, &mut self.g),
            gi(t::ATTN_LN_G),
            &self.layers[l].s1,
            &self.ds_b,
            &mut self.ds_a,
            (tok, h, eps),
        )?;
        // s1 = dropout(ctx·Woᵀ + bo) + x: dctx from the masked ds1 (in ds_b, free now)
        let d_attn = if hidden_p > 0.0 {
            let slot = site_slot(l, Site::AttentionOutputDropout);
            self.dropout(p(&self.ds_b), p(&self.ds_a), b, h, hidden_p, slot)?;
            SliceId::DsB
        } else {
            SliceId::DsA
        };
        self.linear_backward(
            p(&self.layers[l].ctx),
            tok,
            h,
            gi(t::ATTN_OUT_W),
            gi(t::ATTN_OUT_B),
            h,
            d_attn,
            Some(p(&self.dctx)),
        )?;
        let attn_drop = (b.dropout.attention > 0.0).then(|| AttnDropoutPlan {
            p: b.dropout.attention,
            seed: b.dropout.seed,
            step: b.dropout.step,
            layer: l as u32 + 1,
            example_ids: &b.example_ids,
        });
        self.attn_bw.backward(
            &b.offsets,
            &self.layers[l].qkv,
            Some(&self.w[gi(t::QKV_B)]),
            &self.dctx,
            attn_drop.as_ref(),
            &mut self.dqkv,
        )?;
        // qkv = x·Wqkvᵀ (+ bias, inside attention): dx, then + ds1 (the residual)
        self.linear_backward(
            p(&self.inputs[l]),
            tok,
            h,
            gi(t::QKV_W),
            gi(t::QKV_B),
            3 * h,
            SliceId::Dqkv,
            Some(p(&self.dx)),
        )?;
        self.add(p(&self.dx), p(&self.ds_a), tok * h)?;
        Ok(())
    }

    /// Embeddings of tokenized texts, `[texts × h]` in order: forwards over as many texts at a
    /// time as the buffers take. It overwrites the activations, so a backward needs a new
    /// forward after it.
    pub fn encode(&mut self, texts: &[crate::model::tokenizer::Tokens]) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(texts.len() * self.cfg.hidden_size);
        let mut batch = PackedBatch::new();
        for (i, t) in texts.iter().enumerate() {
            if t.ids.len() > self.max_tokens {
                return Err(Error::InvalidArgument(format!(
                    "text {i} has {} tokens; the buffers take {}",
                    t.ids.len(),
                    self.max_tokens
                )));
            }
            if batch.sequences() == self.max_sequences
                || batch.tokens() + t.ids.len() > self.max_tokens
            {
                out.extend(self.forward(&batch)?);
                batch.clear();
            }
            batch.push(&t.ids, &t.type_ids);
        }
        if batch.sequences() > 0 {
            out.extend(self.forward(&batch)?);
        }
        self.last = None;
        Ok(out)
    }

    /// Checks `batch` against the model and the buffers and uploads its ids and offsets.
    fn upload_batch(
        &mut self,
        batch: &PackedBatch,
        example_ids: &[u64],
        dropout: &DropoutPlan,
    ) -> Result<Batch> {
        let (tokens, sequences) = (batch.tokens(), batch.sequences());
        if example_ids.len() != sequences {
            return Err(Error::InvalidArgument(
                "one example id per sequence is required".into(),
            ));
        }
        for (what, p) in [("hidden", dropout.hidden), ("attention", dropout.attention)] {
            if !(0.0..1.0).contains(&p) {
                return Err(Error::InvalidArgument(format!(
                    "{what} dropout probability {p} outside [0, 1)"
                )));
            }
        }
        let longest = batch
            .offsets
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or(0);
        if dropout.attention > 0.0 && longest > DROPOUT_ATTENTION_MAX_LEN {
            return Err(Error::InvalidArgument(format!(
                "attention dropout on the GPU takes sequences of at most \
                 {DROPOUT_ATTENTION_MAX_LEN} tokens; this batch has one of {longest}"
            )));
        }
        if tokens > self.max_tokens || sequences > self.max_sequences || sequences == 0 {
            return Err(Error::InvalidArgument(format!(
                "a batch of {tokens} tokens in {sequences} sequences for buffers of {} tokens \
                 in {} sequences (at least one sequence)",
                self.max_tokens, self.max_sequences
            )));
        }
        // ids, type ids and positions are checked against their tables here
        let plan = EmbeddingGradPlan::new(
            &batch.ids,
            &batch.type_ids,
            &batch.offsets,
            self.cfg.vocab_size,
            self.cfg.max_position_embeddings,
            self.cfg.type_vocab_size,
        )?;
        let offsets: Vec<u32> = batch.offsets.iter().map(|&o| o as u32).collect();
        let st = &self.stream;
        if tokens > 0 {
            st.memcpy_htod(&batch.ids, &mut self.ids.slice_mut(..tokens))
                .map_err(cuda_err("uploading token ids"))?;
            st.memcpy_htod(&batch.type_ids, &mut self.type_ids.slice_mut(..tokens))
                .map_err(cuda_err("uploading token type ids"))?;
        }
        st.memcpy_htod(&offsets, &mut self.offsets.slice_mut(..offsets.len()))
            .map_err(cuda_err("uploading offsets"))?;
        if dropout.hidden > 0.0 || dropout.attention > 0.0 {
            // every site's stream words, slot by slot (see `site_slot`)
            let layers = self.cfg.num_hidden_layers;
            let mut words = Vec::with_capacity((1 + 3 * layers) * sequences * 4);
            let mut push = |layer: u32, site: Site| {
                for &e in example_ids {
                    let stream = Stream::new(dropout.seed, dropout.step, e, layer, site);
                    words.extend_from_slice(&stream.words());
                }
            };
            push(0, Site::EmbeddingDropout);
            for l in 0..layers as u32 {
                push(l + 1, Site::AttentionDropout);
                push(l + 1, Site::AttentionOutputDropout);
                push(l + 1, Site::FfnOutputDropout);
            }
            st.memcpy_htod(&words, &mut self.drop_words.slice_mut(..words.len()))
                .map_err(cuda_err("uploading dropout streams"))?;
        }
        Ok(Batch {
            tokens,
            sequences,
            offsets,
            plan,
            dropout: *dropout,
            example_ids: example_ids.to_vec(),
        })
    }

    /// The device address of a dropout site's stream words (`sequences × 4`).
    fn words_at(&self, b: &Batch, slot: usize) -> u64 {
        ptr(&self.drop_words, &self.stream) + (slot * b.sequences * 4 * 4) as u64
    }

    /// `dst = dropout(src)` per sequence over `[tokens × width]` (in place when equal).
    fn dropout(
        &self,
        dst: u64,
        src: u64,
        b: &Batch,
        width: usize,
        p: f32,
        slot: usize,
    ) -> Result<()> {
        let (offs, words) = (ptr(&self.offsets, &self.stream), self.words_at(b, slot));
        let (w, scale) = (to_i32(width, "width")?, 1.0f32 / (1.0 - p));
        // SAFETY: one block per sequence over its rows of `[tokens × width]` buffers; the words
        // of this slot were uploaded for every sequence.
        unsafe {
            self.stream
                .launch_builder(&self.k.dropout)
                .arg(&dst)
                .arg(&src)
                .arg(&offs)
                .arg(&words)
                .arg(&w)
                .arg(&p)
                .arg(&scale)
                .launch(launch_cfg(b.sequences, THREADS, 0)?)
        }
        .map_err(cuda_err("launching rrra_train_dropout_f32"))?;
        Ok(())
    }

    /// Attention with dropout on the probabilities (the training kernel).
    fn attention_dropout(
        &self,
        qkv: u64,
        bias: u64,
        b: &Batch,
        max_len: usize,
        slot: usize,
        ctx: u64,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let (offs, words) = (ptr(&self.offsets, &self.stream), self.words_at(b, slot));
        let (h, dh) = (
            to_i32(cfg.hidden_size, "hidden size")?,
            to_i32(cfg.head_dim(), "head dim")?,
        );
        let scale = 1.0f32 / (cfg.head_dim() as f32).sqrt();
        let p = b.dropout.attention;
        let keep_scale = 1.0f32 / (1.0 - p);
        let launch = cudarc::driver::LaunchConfig {
            grid_dim: (
                max_len.div_ceil(8).max(1) as u32,
                cfg.num_attention_heads as u32,
                b.sequences as u32,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: each warp reads its sequence's QKV rows and writes one ctx row; sequences are
        // at most 512 tokens (checked in `upload_batch`), the head dim at most 128
        // (`check_config`).
        unsafe {
            self.stream
                .launch_builder(&self.k.attention_dropout)
                .arg(&qkv)
                .arg(&bias)
                .arg(&offs)
                .arg(&words)
                .arg(&h)
                .arg(&dh)
                .arg(&scale)
                .arg(&p)
                .arg(&keep_scale)
                .arg(&ctx)
                .launch(launch)
        }
        .map_err(cuda_err("launching rrra_train_attention_dropout_f32"))?;
        Ok(())
    }

    /// Layer `layer`'s forward attention over the last forward's batch, with its attention
    /// dropout, run again by the f32 kernels (`mma` false) or the tensor-core one (`mma` true)
    /// into backward scratch: the two side by side for tests/gpu_encoder_train.rs. With bf16
    /// activations the tensor-core kernel is the bf16 one on the kept bf16 QKV, and the f32
    /// kernels read that QKV widened to f32 (the same values), its output is widened here.
    /// Needs a forward not yet spent by a backward, and a head dim of 32, 64 or 128 for `mma`.
    #[doc(hidden)]
    pub fn rerun_attention(&mut self, layer: usize, mma: bool) -> Result<Vec<f32>> {
        let b = self.last.take().ok_or_else(|| {
            Error::InvalidArgument("rerun_attention needs a forward not yet spent".into())
        })?;
        // poisoned first, so a kernel that writes nothing cannot pass for the other's output
        if let Err(e) = poison(&self.stream, &self.dctx) {
            self.last = Some(b);
            return Err(e);
        }
        let mut mixed = self.mixed.take();
        let out = self.rerun_attention_on(layer, mma, &b, mixed.as_deref_mut());
        (self.last, self.mixed) = (Some(b), mixed);
        out
    }

    /// [`Self::rerun_attention`] with the bf16 mode's buffers out (`mixed`).
    fn rerun_attention_on(
        &mut self,
        layer: usize,
        mma: bool,
        b: &Batch,
        mixed: Option<&mut Bf16Acts>,
    ) -> Result<Vec<f32>> {
        let (st, h) = (self.stream.clone(), self.cfg.hidden_size);
        let layers = self.cfg.num_hidden_layers;
        if layer >= layers {
            return Err(Error::InvalidArgument(format!("no layer {layer}")));
        }
        let widen = |bits: &[u16]| -> Vec<f32> {
            bits.iter()
                .map(|&v| half::bf16::from_bits(v).to_f32())
                .collect()
        };
        let download16 = |s: &CudaSlice<u16>, n: usize| -> Result<Vec<u16>> {
            let mut v = vec![0u16; n];
            st.memcpy_dtoh(&s.slice(..n), &mut v)
                .map_err(cuda_err("downloading bf16 activations"))?;
            Ok(v)
        };
        // the QKV the kernel reads, and the widened copy it lives in (alive to the end)
        let (qkv, _widened) = match mixed {
            None => (ptr(&self.layers[layer].qkv, &st), None),
            Some(m) if mma => {
                poison(&st, &m.dy)?;
                let (qkv, out) = (ptr(&m.layers[layer].qkv, &st), ptr(&m.dy, &st));
                self.attention_bf16(layer, qkv, b, out)?;
                return Ok(widen(&download16(&m.dy, b.tokens * h)?));
            }
            Some(m) => {
                let wide = widen(&download16(&m.layers[layer].qkv, b.tokens * 3 * h)?);
                let copy = upload(&st, &wide, "the widened QKV")?;
                (ptr(&copy, &st), Some(copy))
            }
        };
        self.attention(layer, qkv, b, mma, ptr(&self.dctx, &st))?;
        let mut ctx = vec![0.0f32; b.tokens * h];
        st.memcpy_dtoh(&self.dctx.slice(..ctx.len()), &mut ctx)
            .map_err(cuda_err("downloading the attention context"))?;
        Ok(ctx)
    }

    /// Layer `l`'s attention over batch `b`, `qkv` (without its bias) in, `out` written: on the
    /// tensor cores when `tensor_cores` (with the batch's attention dropout), else the f32
    /// kernel with dropout when the batch has it, or the tiled one without.
    fn attention(&self, l: usize, qkv: u64, b: &Batch, tensor_cores: bool, out: u64) -> Result<()> {
        let st = &self.stream;
        let bias = ptr(self.layer_w(l, t::QKV_B), st);
        let (slot, max_len) = (site_slot(l, Site::AttentionDropout), b.max_len());
        let p = b.dropout.attention;
        match (&self.k.attention_mma, tensor_cores) {
            (Some((f, _)), true) => self.attention_mma(f, qkv, bias, b, p, max_len, slot, out),
            (None, true) => Err(Error::InvalidArgument(format!(
                "no tensor-core attention for head dim {}",
                self.cfg.head_dim()
            ))),
            _ if p > 0.0 => self.attention_dropout(qkv, bias, b, max_len, slot, out),
            _ => {
                let offs = ptr(&self.offsets, st);
                let cfg = &self.cfg;
                let k = &self.k.attention;
                k.launch(st, cfg, qkv, bias, offs, b.sequences, max_len, out)
            }
        }
    }

    /// `ctx = attention(qkv + bias)` on the tensor cores (`f`: the f32 kernel or its bf16
    /// twin, `qkv` and `ctx` of its type), with dropout `p` on the
    /// probabilities (none when 0; the batch's streams at `slot` otherwise): the
    /// mixed-precision mode's attention.
    #[allow(clippy::too_many_arguments)]
    fn attention_mma(
        &self,
        f: &CudaFunction,
        qkv: u64,
        bias: u64,
        b: &Batch,
        p: f32,
        max_len: usize,
        slot: usize,
        ctx: u64,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let (offs, words) = (ptr(&self.offsets, &self.stream), self.words_at(b, slot));
        let h = to_i32(cfg.hidden_size, "hidden size")?;
        let scale_log2e = std::f32::consts::LOG2_E / (cfg.head_dim() as f32).sqrt();
        let keep_scale = if p > 0.0 { 1.0f32 / (1.0 - p) } else { 1.0 };
        let launch = cudarc::driver::LaunchConfig {
            grid_dim: (
                max_len.div_ceil(64).max(1) as u32,
                cfg.num_attention_heads as u32,
                b.sequences as u32,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: blocks read the QKV rows of their own sequence and write its ctx rows (the
        // offsets were checked in `upload_batch`); `words` holds 4 words per sequence and site;
        // the head dim is the kernel's (loaded for it in `new`).
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(&qkv)
                .arg(&bias)
                .arg(&offs)
                .arg(&words)
                .arg(&h)
                .arg(&scale_log2e)
                .arg(&p)
                .arg(&keep_scale)
                .arg(&ctx)
                .launch(launch)
        }
        .map_err(cuda_err("launching rrra_attention_train_mma"))?;
        Ok(())
    }

    /// `y[rows × out] = x[rows × inp] · Wᵀ` (no bias).
    fn linear(&self, x: u64, rows: usize, inp: usize, w: u64, out: usize, y: u64) -> Result<()> {
        // SAFETY: x, W and y are buffers of at least rows·inp, out·inp and rows·out floats.
        unsafe { sgemm_row_major(&self.blas, false, true, rows, out, inp, x, w, 0.0, y) }
    }

    /// Backward of `y = x·Wᵀ + b` for `dy` (one of the scratch gradients): `dx = dy·W` when
    /// asked, `∂W += dyᵀ·x`, `∂b += Σ dy`.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &mut self,
        x: u64,
        rows: usize,
        inp: usize,
        w_index: usize,
        b_index: usize,
        out: usize,
        dy: SliceId,
        dx: Option<u64>,
    ) -> Result<()> {
        let st = self.stream.clone();
        let dy_ptr = ptr(self.scratch(dy), &st);
        let (w, gw) = (ptr(&self.w[w_index], &st), ptr(&self.g[w_index], &st));
        // SAFETY: dy is rows·out floats, W and ∂W out·inp, x and dx rows·inp.
        unsafe {
            if let Some(dx) = dx {
                sgemm_row_major(&self.blas, false, false, rows, inp, out, dy_ptr, w, 0.0, dx)?;
            }
            sgemm_row_major(&self.blas, true, false, out, inp, rows, dy_ptr, x, 1.0, gw)?;
        }
        self.bias_backward(dy, rows, out, b_index)
    }

    /// A backward scratch buffer by name.
    fn scratch(&self, id: SliceId) -> &CudaSlice<f32> {
        match id {
            SliceId::DsA => &self.ds_a,
            SliceId::DsB => &self.ds_b,
            SliceId::Dctx => &self.dctx,
            SliceId::Dmid => &self.dmid,
            SliceId::Dqkv => &self.dqkv,
        }
    }

    /// `∂b += Σ dy` over `rows` rows of `cols` columns of a scratch gradient, into tensor
    /// `b_index`.
    fn bias_backward(
        &mut self,
        dy: SliceId,
        rows: usize,
        cols: usize,
        b_index: usize,
    ) -> Result<()> {
        // `scratch`'s match, on the fields: `self.g` is borrowed mutably beside it
        let dy = match dy {
            SliceId::DsA => &self.ds_a,
            SliceId::DsB => &self.ds_b,
            SliceId::Dctx => &self.dctx,
            SliceId::Dmid => &self.dmid,
            SliceId::Dqkv => &self.dqkv,
        };
        self.bw.bias(dy, rows, cols, &mut self.g[b_index], true)
    }

    /// `y = LN(s)` over `rows` rows, and its bf16 copy into `y16` when given.
    #[allow(clippy::too_many_arguments)]
    fn layernorm(
        &self,
        s: u64,
        g: u64,
        b: u64,
        eps: f32,
        rows: usize,
        y: u64,
        y16: Option<u64>,
    ) -> Result<()> {
        let (r, h) = (
            to_i32(rows, "rows")?,
            to_i32(self.cfg.hidden_size, "hidden size")?,
        );
        let cfg = launch_cfg((rows * 32).div_ceil(THREADS as usize), THREADS, 0)?;
        let mut l = self
            .stream
            .launch_builder(&self.k.layernorm[y16.is_some() as usize]);
        l.arg(&s).arg(&g).arg(&b).arg(&eps).arg(&r).arg(&h).arg(&y);
        if let Some(y16) = &y16 {
            l.arg(y16);
        }
        // SAFETY: s and y hold rows × h floats, y16 (when given) rows × h bf16, gamma and beta
        // h; one warp per row; the bf16 copy's kernel is the one launched when y16 is given.
        unsafe { l.launch(cfg) }.map_err(cuda_err("launching rrra_train_layernorm"))?;
        Ok(())
    }

    /// `y = dropout(y + bias) + r` (the hidden dropout of site `slot` when on).
    fn bias_residual(
        &self,
        y: u64,
        bias: u64,
        r: u64,
        batch: &Batch,
        cols: usize,
        slot: usize,
    ) -> Result<()> {
        let (b, rows) = (bias, batch.tokens);
        let p = batch.dropout.hidden;
        if p > 0.0 {
            let (offs, words) = (ptr(&self.offsets, &self.stream), self.words_at(batch, slot));
            let (w, scale) = (to_i32(cols, "columns")?, 1.0f32 / (1.0 - p));
            // SAFETY: one block per sequence over its rows of the `[tokens × cols]` buffers.
            unsafe {
                self.stream
                    .launch_builder(&self.k.bias_dropout_residual)
                    .arg(&y)
                    .arg(&b)
                    .arg(&r)
                    .arg(&offs)
                    .arg(&words)
                    .arg(&w)
                    .arg(&p)
                    .arg(&scale)
                    .launch(launch_cfg(batch.sequences, THREADS, 0)?)
            }
            .map_err(cuda_err("launching rrra_train_bias_dropout_residual_f32"))?;
            return Ok(());
        }
        let (rl, c) = (rows as i64, to_i32(cols, "columns")?);
        // SAFETY: y and r hold rows × cols floats, b cols; grid-stride.
        unsafe {
            self.stream
                .launch_builder(&self.k.bias_residual)
                .arg(&y)
                .arg(&b)
                .arg(&r)
                .arg(&rl)
                .arg(&c)
                .launch(grid_stride(rows * cols, THREADS)?)
        }
        .map_err(cuda_err("launching rrra_train_bias_residual_f32"))?;
        Ok(())
    }

    /// `pre = pre + b` in place, `out = GELU(pre)`, over `[rows × cols]` of f32, or of bf16
    /// when `bf16` (each store rounded once).
    fn bias_gelu(
        &self,
        bf16: bool,
        pre: u64,
        b: u64,
        rows: usize,
        cols: usize,
        out: u64,
    ) -> Result<()> {
        let (rl, c) = (rows as i64, to_i32(cols, "columns")?);
        // SAFETY: pre and out hold rows × cols elements of the kernel's type, b cols floats;
        // grid-stride.
        unsafe {
            self.stream
                .launch_builder(&self.k.bias_gelu[bf16 as usize])
                .arg(&pre)
                .arg(&b)
                .arg(&rl)
                .arg(&c)
                .arg(&out)
                .launch(grid_stride(rows * cols, THREADS)?)
        }
        .map_err(cuda_err("launching rrra_train_bias_gelu"))?;
        Ok(())
    }

    /// `out = GELU(pre)` over n f32, or bf16 when `bf16`.
    fn gelu(&self, bf16: bool, pre: u64, n: usize, out: u64) -> Result<()> {
        let nl = n as i64;
        // SAFETY: pre and out hold n elements of the kernel's type; grid-stride.
        unsafe {
            self.stream
                .launch_builder(&self.k.gelu[bf16 as usize])
                .arg(&pre)
                .arg(&nl)
                .arg(&out)
                .launch(grid_stride(n, THREADS)?)
        }
        .map_err(cuda_err("launching rrra_train_gelu"))?;
        Ok(())
    }

    fn add(&self, dst: u64, src: u64, n: usize) -> Result<()> {
        let nl = n as i64;
        // SAFETY: dst and src hold n floats; grid-stride.
        unsafe {
            self.stream
                .launch_builder(&self.k.add)
                .arg(&dst)
                .arg(&src)
                .arg(&nl)
                .launch(grid_stride(n, THREADS)?)
        }
        .map_err(cuda_err("launching rrra_train_add_f32"))?;
        Ok(())
    }

    fn pool(&self, hidden: u64, sequences: usize, normalize: bool, out: u64) -> Result<()> {
        let f = match self.pooling {
            Pooling::Mean => &self.k.pool[0],
            Pooling::Cls => &self.k.pool[1],
            Pooling::Max => &self.k.pool[2],
        };
        let offs = ptr(&self.offsets, &self.stream);
        let (s, h, norm) = (
            to_i32(sequences, "sequences")?,
            to_i32(self.cfg.hidden_size, "hidden size")?,
            normalize as i32,
        );
        // SAFETY: one block per sequence, reading its rows of the hidden states and writing its
        // pooled row; sequences ≤ max_sequences.
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(&hidden)
                .arg(&offs)
                .arg(&s)
                .arg(&h)
                .arg(&norm)
                .arg(&out)
                .launch(launch_cfg(sequences, 256, 0)?)
        }
        .map_err(cuda_err("launching rrra_pool"))?;
        Ok(())
    }
}

/// The trainer's hook (`Trainer::offload_encoder`): the step's forward, loss and backward, and
/// the encodes and searches of mining and evaluation, here.
impl crate::train::encoder_grad::OffloadedEncoder for GpuTrainableEncoder {
    fn set_weights(&mut self, weights: &BertWeights) -> Result<()> {
        GpuTrainableEncoder::set_weights(self, weights)
    }
    fn forward(&mut self, batch: &TrainBatch, dropout: &DropoutPlan) -> Result<Vec<f32>> {
        GpuTrainableEncoder::forward_train(self, batch, dropout)
    }
    fn backward(&mut self, d_embeddings: &[f32], grads: &mut BertWeights) -> Result<()> {
        GpuTrainableEncoder::backward(self, d_embeddings, grads)
    }
    fn encode(&mut self, texts: &[crate::model::tokenizer::Tokens]) -> Result<Vec<f32>> {
        GpuTrainableEncoder::encode(self, texts)
    }
    fn search(
        &mut self,
        docs: &[f32],
        queries: &[f32],
        dim: usize,
        depth: usize,
    ) -> Option<Result<Vec<Vec<crate::index::Hit>>>> {
        Some(super::mining::search(&self.gpu, docs, queries, dim, depth))
    }
    fn info_nce(
        &mut self,
        input: &crate::train::loss::InfoNceInput<'_>,
        dq: &mut [f32],
        dd: &mut [f32],
    ) -> Option<Result<crate::train::loss::InfoNceStats>> {
        Some(self.loss.run(&self.gpu, input, dq, dd))
    }
}

/// Which backward scratch buffer holds a linear layer's output gradient.
#[derive(Debug, Clone, Copy)]
enum SliceId {
    DsA,
    DsB,
    Dctx,
    Dmid,
    Dqkv,
}

/// LayerNorm backward of one site: `ds` from `dy` and the pre-norm input `s`; the gradients of
/// gamma (tensor `gamma`) and beta (the next tensor) accumulated into `g`.
fn layernorm_backward(
    (bw, w, g): (&mut GpuBackward, &[CudaSlice<f32>], &mut [CudaSlice<f32>]),
    gamma: usize,
    s: &CudaSlice<f32>,
    dy: &CudaSlice<f32>,
    ds: &mut CudaSlice<f32>,
    (rows, h, eps): (usize, usize, f32),
) -> Result<()> {
    let (before, after) = g.split_at_mut(gamma + 1);
    let (dgamma, dbeta) = (&mut before[gamma], &mut after[0]);
    bw.layernorm(s, &w[gamma], dy, rows, h, eps, ds, dgamma, dbeta, true)
}

/// Model FLOPs of a training forward and backward over `tokens` tokens in sequences of
/// `seq_len`: GEMMs 2·t·(4h² + 2hi) per layer forward and twice that backward; attention
/// 4·t·seq_len·h forward and ~2.5× that backward (the recomputed scores, dQ, dK, dV).
pub fn training_step_flops(cfg: &BertConfig, tokens: usize, seq_len: usize) -> f64 {
    let (t, h, i, l, n) = (
        tokens as f64,
        cfg.hidden_size as f64,
        cfg.intermediate_size as f64,
        cfg.num_hidden_layers as f64,
        seq_len as f64,
    );
    l * (3.0 * 2.0 * t * (4.0 * h * h + 2.0 * h * i) + 3.5 * 4.0 * t * n * h)
}
