//! The mixed-precision half of [`super::GpuTrainableEncoder`] ([`GemmMath::Bf16`] with a head
//! dim of 32, 64 or 128): the activations it keeps in bf16, the bf16 working weights, and its
//! layers' forward and backward. The f32 layers, the embeddings, pooling and the loss are the
//! parent module's, shared by both storages.
//!
//! [`GemmMath::Bf16`]: super::GemmMath::Bf16

use super::{
    layernorm_backward, site_slot, t, AttnDropoutPlan, Batch, GpuTrainableEncoder, SliceId, THREADS,
};
use crate::device::runtime::{cuda_err, gemm_row_major, grid_stride, ptr, Operands};
use crate::error::{Error, Result};
use crate::train::rng::Site;
use cudarc::driver::{CudaSlice, PushKernelArg};

/// What one layer's forward keeps with bf16 activations ([`GemmMath::Bf16`], head dims 32, 64,
/// 128): every product's input and output in bf16 (bits in `u16`), as bf16 autocast keeps
/// them, the sums entering a LayerNorm in f32 (the LayerNorm backward recomputes its statistics
/// from them).
pub(super) struct LayerActsBf16 {
    /// the layer input (the f32 residual stream's bf16 copy)
    pub(super) x: CudaSlice<u16>,
    pub(super) qkv: CudaSlice<u16>,
    pub(super) ctx: CudaSlice<u16>,
    pub(super) s1: CudaSlice<f32>,
    pub(super) x1: CudaSlice<u16>,
    pub(super) mid_pre: CudaSlice<u16>,
    pub(super) s2: CudaSlice<f32>,
}

/// The bf16-activation mode's buffers, in place of the f32 mode's per-layer activations.
pub(super) struct Bf16Acts {
    pub(super) layers: Vec<LayerActsBf16>,
    /// Each layer's four weight matrices (QKV, attention output, FFN in, FFN out) rounded to
    /// bf16 from the f32 masters: the products' working weights.
    pub(super) weights: Vec<[CudaSlice<u16>; 4]>,
    /// Whether `weights` match the f32 masters (cleared whenever those may change).
    pub(super) weights_current: bool,
    /// The attention block's output x1 in f32: the FFN block's residual (its bf16 copy is kept).
    pub(super) x1: CudaSlice<f32>,
    /// The FFN activation GELU(pre) of the layer at hand (recomputed in backward).
    pub(super) mid: CudaSlice<u16>,
    /// A product's output gradient in bf16 (`[tokens × 3h]`: also the attention backward's
    /// dQKV).
    pub(super) dy: CudaSlice<u16>,
    /// The FFN activation's gradient.
    pub(super) dmid: CudaSlice<u16>,
}

/// The four weight matrices of a layer, in the order of [`Bf16Acts::weights`].
pub(super) const LINEAR_WEIGHTS: [usize; 4] = [t::QKV_W, t::ATTN_OUT_W, t::INTER_W, t::OUT_W];

impl GpuTrainableEncoder {
    /// Every layer's forward with bf16 activations: the working weights refreshed when stale,
    /// the embedding output's bf16 copy, then layer by layer (the f32 residual stream
    /// alternating between two `inputs` buffers, the output in the third).
    pub(super) fn forward_layers_bf16(&self, b: &Batch, m: &mut Bf16Acts) -> Result<()> {
        let st = &self.stream;
        if !m.weights_current {
            for (l, wl) in m.weights.iter().enumerate() {
                for (&i, wb) in LINEAR_WEIGHTS.iter().zip(wl) {
                    let w = self.layer_w(l, i);
                    self.to_bf16(ptr(w, st), w.len(), ptr(wb, st))?;
                }
            }
            m.weights_current = true;
        }
        let h = self.cfg.hidden_size;
        let x0 = ptr(&self.inputs[0], st);
        self.to_bf16(x0, b.tokens * h, ptr(&m.layers[0].x, st))?;
        (0..self.cfg.num_hidden_layers).try_for_each(|l| self.forward_layer_bf16(l, b, m))
    }

    /// Layer `l`'s forward with bf16 activations: its input as the f32 residual stream and
    /// its bf16 copy (written by the previous layer's last LayerNorm), products on bf16
    /// operands (bf16 out where a product's output is only read as a product's or attention's
    /// input, f32 out where it enters a residual sum), the next layer's input written in f32
    /// and bf16.
    fn forward_layer_bf16(&self, l: usize, b: &Batch, m: &Bf16Acts) -> Result<()> {
        let cfg = &self.cfg;
        let (h, inter, tok) = (cfg.hidden_size, cfg.intermediate_size, b.tokens);
        let eps = cfg.layer_norm_eps as f32;
        let st = &self.stream;
        let (p, p16) = (
            |s: &CudaSlice<f32>| ptr(s, st),
            |s: &CudaSlice<u16>| ptr(s, st),
        );
        let wp = |i: usize| p(self.layer_w(l, i));
        let a = &m.layers[l];
        let wb = |i: usize| p16(&m.weights[l][i]);
        let x = p(&self.inputs[self.input_slot(l)]);
        let (x16, qkv, ctx, x1_16) = (p16(&a.x), p16(&a.qkv), p16(&a.ctx), p16(&a.x1));
        let (s1, s2, x1, mid_pre, mid) =
            (p(&a.s1), p(&a.s2), p(&m.x1), p16(&a.mid_pre), p16(&m.mid));
        self.linear_bf16(x16, tok, h, wb(0), 3 * h, qkv, Operands::Bf16Out)?;
        self.attention_bf16(l, qkv, b, ctx)?;
        self.linear_bf16(ctx, tok, h, wb(1), h, s1, Operands::Bf16)?;
        let slot = site_slot(l, Site::AttentionOutputDropout);
        self.bias_residual(s1, wp(t::ATTN_OUT_B), x, b, h, slot)?;
        let (g1, b1) = (wp(t::ATTN_LN_G), wp(t::ATTN_LN_B));
        self.layernorm(s1, g1, b1, eps, tok, x1, Some(x1_16))?;
        self.linear_bf16(x1_16, tok, h, wb(2), inter, mid_pre, Operands::Bf16Out)?;
        self.bias_gelu(true, mid_pre, wp(t::INTER_B), tok, inter, mid)?;
        self.linear_bf16(mid, tok, inter, wb(3), h, s2, Operands::Bf16)?;
        let slot = site_slot(l, Site::FfnOutputDropout);
        self.bias_residual(s2, wp(t::OUT_B), x1, b, h, slot)?;
        let out = p(&self.inputs[self.input_slot(l + 1)]);
        let out16 = m.layers.get(l + 1).map(|next| p16(&next.x));
        let (g2, b2) = (wp(t::OUT_LN_G), wp(t::OUT_LN_B));
        self.layernorm(s2, g2, b2, eps, tok, out, out16)
    }

    /// Layer `l`'s backward with bf16 activations, as [`Self::backward_layer_f32`]: the
    /// gradients entering a product are rounded to bf16 (the f32 ones from LayerNorm and
    /// dropout by a cast, dmid and dQKV written in bf16 by their producers), the products take
    /// bf16 operands with f32 accumulation, the weight gradients accumulate in f32. A bias
    /// gradient is summed from the f32 gradient where there is one, from the bf16 one
    /// otherwise (the FFN input's and QKV's).
    pub(super) fn backward_layer_bf16(
        &mut self,
        l: usize,
        b: &Batch,
        m: &mut Bf16Acts,
    ) -> Result<()> {
        let (h, inter, tok) = (self.cfg.hidden_size, self.cfg.intermediate_size, b.tokens);
        let eps = self.cfg.layer_norm_eps as f32;
        let hidden_p = b.dropout.hidden;
        let st = self.stream.clone();
        let (p, p16) = (
            |s: &CudaSlice<f32>| ptr(s, &st),
            |s: &CudaSlice<u16>| ptr(s, &st),
        );
        let gi = |i: usize| t::EMBEDDING + l * t::PER_LAYER + i;
        let gp = |g: &[CudaSlice<f32>], i: usize| p(&g[gi(i)]);
        let a = &m.layers[l];
        let wb: [u64; 4] = std::array::from_fn(|i| p16(&m.weights[l][i]));
        let (dy, dmid, mid) = (p16(&m.dy), p16(&m.dmid), p16(&m.mid));
        // out = LN2(s2): ds2 in ds_a
        layernorm_backward(
            (&mut self.bw, &self.w, &mut self.g),
            gi(t::OUT_LN_G),
            &a.s2,
            &self.dx,
            &mut self.ds_a,
            (tok, h, eps),
        )?;
        // s2 = dropout(mid·Wo2ᵀ + bo2) + x1: the masked ds2 (in dctx, free until the
        // attention block), its bf16 copy, then dmid (bf16), ∂Wo2, ∂bo2
        let d_ffn = if hidden_p > 0.0 {
            let slot = site_slot(l, Site::FfnOutputDropout);
            self.dropout(p(&self.dctx), p(&self.ds_a), b, h, hidden_p, slot)?;
            SliceId::Dctx
        } else {
            SliceId::DsA
        };
        self.to_bf16(p(self.scratch(d_ffn)), tok * h, dy)?;
        self.gelu(true, p16(&a.mid_pre), tok * inter, mid)?;
        let gw = gp(&self.g, t::OUT_W);
        self.linear_backward_bf16(
            mid,
            tok,
            inter,
            (wb[3], gw),
            h,
            dy,
            (dmid, Operands::Bf16Out),
        )?;
        self.bias_backward(d_ffn, tok, h, gi(t::OUT_B))?;
        self.bw.gelu_bf16(&a.mid_pre, &mut m.dmid, tok * inter)?;
        // mid_pre = x1·Wiᵀ + bi: dx1 in ds_b, then + ds2 (the residual)
        let (gw, dx1) = (gp(&self.g, t::INTER_W), p(&self.ds_b));
        let x1 = p16(&a.x1);
        self.linear_backward_bf16(x1, tok, h, (wb[2], gw), inter, dmid, (dx1, Operands::Bf16))?;
        self.bw
            .bias_bf16(&m.dmid, tok, inter, &mut self.g[gi(t::INTER_B)], true)?;
        self.add(p(&self.ds_b), p(&self.ds_a), tok * h)?;
        // x1 = LN1(s1): ds1 in ds_a
        layernorm_backward(
            (&mut self.bw, &self.w, &mut self.g),
            gi(t::ATTN_LN_G),
            &a.s1,
            &self.ds_b,
            &mut self.ds_a,
            (tok, h, eps),
        )?;
        // s1 = dropout(ctx·Woᵀ + bo) + x: the masked ds1 (in ds_b, free now), its bf16 copy,
        // then dctx (f32, attention's dO), ∂Wo, ∂bo
        let d_attn = if hidden_p > 0.0 {
            let slot = site_slot(l, Site::AttentionOutputDropout);
            self.dropout(p(&self.ds_b), p(&self.ds_a), b, h, hidden_p, slot)?;
            SliceId::DsB
        } else {
            SliceId::DsA
        };
        self.to_bf16(p(self.scratch(d_attn)), tok * h, dy)?;
        let (gw, dctx, ctx) = (gp(&self.g, t::ATTN_OUT_W), p(&self.dctx), p16(&a.ctx));
        self.linear_backward_bf16(ctx, tok, h, (wb[1], gw), h, dy, (dctx, Operands::Bf16))?;
        self.bias_backward(d_attn, tok, h, gi(t::ATTN_OUT_B))?;
        let attn_drop = (b.dropout.attention > 0.0).then(|| AttnDropoutPlan {
            p: b.dropout.attention,
            seed: b.dropout.seed,
            step: b.dropout.step,
            layer: l as u32 + 1,
            example_ids: &b.example_ids,
        });
        // dQKV in bf16, into dy (the attention output's bf16 gradient is spent)
        self.attn_bw.backward_bf16(
            &b.offsets,
            &a.qkv,
            Some(&self.w[gi(t::QKV_B)]),
            &self.dctx,
            attn_drop.as_ref(),
            &mut m.dy,
        )?;
        // qkv = x·Wqkvᵀ (+ bias, inside attention): dx, then + ds1 (the residual)
        let (gw, dx, x) = (gp(&self.g, t::QKV_W), p(&self.dx), p16(&a.x));
        self.linear_backward_bf16(x, tok, h, (wb[0], gw), 3 * h, dy, (dx, Operands::Bf16))?;
        self.bw
            .bias_bf16(&m.dy, tok, 3 * h, &mut self.g[gi(t::QKV_B)], true)?;
        self.add(p(&self.dx), p(&self.ds_a), tok * h)
    }

    /// Layer `l`'s attention over batch `b` with bf16 `qkv` (without its bias) and `out`, on the
    /// tensor cores, with the batch's attention dropout: the bf16-activation mode's.
    pub(super) fn attention_bf16(&self, l: usize, qkv: u64, b: &Batch, out: u64) -> Result<()> {
        let Some((_, f)) = &self.k.attention_mma else {
            return Err(Error::InvalidArgument(format!(
                "no tensor-core attention for head dim {}",
                self.cfg.head_dim()
            )));
        };
        let bias = ptr(self.layer_w(l, t::QKV_B), &self.stream);
        let (slot, p) = (site_slot(l, Site::AttentionDropout), b.dropout.attention);
        self.attention_mma(f, qkv, bias, b, p, b.max_len(), slot, out)
    }

    /// `y[rows × out] = x[rows × inp] · Wᵀ` with bf16 x and W, f32 accumulation: y bf16
    /// ([`Operands::Bf16Out`]) or f32 ([`Operands::Bf16`]).
    #[allow(clippy::too_many_arguments)]
    fn linear_bf16(
        &self,
        x: u64,
        rows: usize,
        inp: usize,
        w: u64,
        out: usize,
        y: u64,
        y_type: Operands,
    ) -> Result<()> {
        // SAFETY: x, W and y are buffers of at least rows·inp, out·inp and rows·out elements of
        // the operands' types.
        unsafe {
            gemm_row_major(
                &self.blas,
                (false, true, rows, out, inp),
                y_type,
                x,
                w,
                0.0,
                y,
            )
        }
    }

    /// Backward products of `y = x·Wᵀ` with bf16 x, W and dy: `dx = dy·W` (`dx.1` says its
    /// type, as in [`Self::linear_bf16`]), `∂W += dyᵀ·x` in f32 (`w` = (W, ∂W)).
    #[allow(clippy::too_many_arguments)]
    fn linear_backward_bf16(
        &self,
        x: u64,
        rows: usize,
        inp: usize,
        (w, gw): (u64, u64),
        out: usize,
        dy: u64,
        (dx, dx_type): (u64, Operands),
    ) -> Result<()> {
        // SAFETY: dy is rows·out bf16, W out·inp bf16 and ∂W out·inp f32, x rows·inp bf16 and
        // dx rows·inp elements of its type.
        unsafe {
            gemm_row_major(
                &self.blas,
                (false, false, rows, inp, out),
                dx_type,
                dy,
                w,
                0.0,
                dx,
            )?;
            let shape = (true, false, out, inp, rows);
            gemm_row_major(&self.blas, shape, Operands::Bf16, dy, x, 1.0, gw)
        }
    }

    /// `dst[..n] = bf16(src[..n])`.
    fn to_bf16(&self, src: u64, n: usize, dst: u64) -> Result<()> {
        let nl = n as i64;
        // SAFETY: src holds n floats and dst n bf16; grid-stride.
        unsafe {
            self.stream
                .launch_builder(&self.k.to_bf16)
                .arg(&src)
                .arg(&nl)
                .arg(&dst)
                .launch(grid_stride(n.max(1), THREADS)?)
        }
        .map_err(cuda_err("launching rrra_train_to_bf16"))?;
        Ok(())
    }
}
