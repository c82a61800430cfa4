//! Backward passes of the encoder's row-wise ops on the GPU (`kernels/backward.cu`): the device
//! twins of [`crate::cpu::backward`]'s `layernorm_backward`, `gelu_backward`,
//! `l2_normalize_backward` and `linear_backward`'s bias gradient, and of the pooling and
//! embedding steps of [`crate::train::encoder_grad`] (mean / CLS / max pooling backward over the
//! packed varlen layout, and the word / position / token-type gradients).
//!
//! Gradients and activations are f32; the GELU backward and the bias gradient also take bf16
//! tensors (bits in `u16`), with f32 arithmetic.
//!
//! Every sum over rows is deterministic and atomic-free: fixed partial sums reduced in a fixed
//! order, so repeated runs give the same bits. Against the CPU:
//! * bias gradient, pooling backward: bitwise equal (the CPU's summation order exactly);
//! * embedding gradients: bitwise equal on every table row whose tokens number at most
//!   [`EMBED_CHUNK`] (the CPU's token order); rows with more tokens (the token-type rows, a
//!   frequent word) sum [`EMBED_CHUNK`]-token chunks first: a few f32 roundings apart;
//! * LayerNorm, GELU, L2 backward: a few f32 roundings apart (other summation order, FMA
//!   contraction, erfc/exp versus the CPU's polynomials).
//!
//! The bias gradient is this kernel rather than cuBLASLt's bias-gradient epilogue
//! (`CUBLASLT_EPILOGUE_BGRADB` on the weight-gradient product), as in llm.c: the epilogue
//! overwrites where micro-batches must accumulate, sums in an order of its own (this kernel
//! is the CPU's, bit for bit), and would save one read of the output gradient, a memory-bound
//! pass the device check times (`rrra_bias_backward_{partial,final}_f32`).
//!
//! [`GpuBackward`] holds the kernels and a scratch buffer for partial sums (grown on demand, so
//! launches after the first of a size allocate nothing). Its device methods take device buffers
//! and only queue work on the stream; the `*_host` methods upload, run and download, with the
//! CPU functions' signatures and accumulation rules, and fill every device output with NaN
//! before the kernels run, so an element a kernel failed to write cannot pass for a result.

use super::runtime::{alloc, cuda_err, launch_cfg, poison, ptr, to_i32, upload, Gpu, KernelTiming};
use crate::error::{Error, Result};
use crate::model::pooling::Pooling;
use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg,
};
use std::sync::Arc;

const MODULE: &str = "backward";
/// Threads of every block but the bias partial kernel's: 8 warps.
const THREADS: u32 = 256;
const WARPS: usize = 8;
/// Threads (columns) per block of the bias partial kernel.
const BIAS_THREADS: u32 = 128;
/// Rows per block of the LayerNorm backward kernel (each block writes one partial row of the
/// parameter gradients).
pub const LN_ROWS_PER_BLOCK: usize = 32;
/// Rows per partial sum of a bias gradient: the CPU's chunk (`PART_ROWS` of cpu::backward), so
/// the result is bitwise the CPU's.
pub const BIAS_ROWS_PER_PART: usize = 256;
/// Most tokens one warp of the embedding backward sums serially; a table row with more tokens
/// is summed in chunks of this many, then the chunks in order.
pub const EMBED_CHUNK: usize = 64;
/// Widths of the LayerNorm kernel variants (the row is held in registers).
const LN_WIDTHS: [usize; 5] = [128, 256, 512, 768, 1024];
/// Largest LayerNorm width.
pub const MAX_LN_WIDTH: usize = 1024;

fn download<T: DeviceRepr + Default + Clone>(
    stream: &Arc<CudaStream>,
    src: &CudaSlice<T>,
    dst: &mut [T],
    what: &str,
) -> Result<()> {
    if dst.is_empty() {
        return Ok(());
    }
    stream
        .memcpy_dtoh(&src.slice(..dst.len()), dst)
        .map_err(cuda_err(&format!("downloading {what}")))
}

fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got < want {
        return Err(Error::InvalidArgument(format!(
            "{what}: a buffer of {got} elements where {want} are needed"
        )));
    }
    Ok(())
}

fn grid_of(n: usize, per: usize) -> usize {
    n.div_ceil(per).max(1)
}

/// The packed layout's offsets (`offsets[0] = 0`, non-decreasing, `offsets[S] = tokens`) as
/// u32 for the kernels.
fn offsets_u32(offsets: &[usize], tokens: usize) -> Result<Vec<u32>> {
    let ok = offsets.first() == Some(&0)
        && offsets.last() == Some(&tokens)
        && offsets.windows(2).all(|w| w[0] <= w[1]);
    if !ok {
        return Err(Error::InvalidArgument(format!(
            "sequence offsets must start at 0, not decrease and end at the token count \
             ({tokens}); got {} offsets",
            offsets.len()
        )));
    }
    offsets
        .iter()
        .map(|&o| u32::try_from(o).map_err(|_| Error::InvalidArgument("too many tokens".into())))
        .collect()
}

/// Element types a bias gradient is summed from: f32, or bf16 as its bits.
pub trait BiasInput: DeviceRepr {
    const BF16: bool;
}
impl BiasInput for f32 {
    const BF16: bool = false;
}
impl BiasInput for u16 {
    const BF16: bool = true;
}

/// The host-built schedule of the embedding backward: for each table (word, position, type),
/// the token indices sorted by row key (stably: ties stay in token order, the CPU's order),
/// cut into items of at most [`EMBED_CHUNK`] tokens.
#[derive(Debug, Clone)]
pub struct EmbeddingGradPlan {
    tokens: usize,
    vocab: usize,
    positions: usize,
    type_vocab: usize,
    /// Three sorted permutations of the tokens, one per table, end to end.
    order: Vec<u32>,
    /// `[table, key, first, end]` per item (indices into `order`).
    items: Vec<i32>,
    /// Partial-sum slot per item, or -1 when the item is its key's whole run.
    slots: Vec<i32>,
    /// `[table, key, first slot, slots]` per run split over several items.
    segments: Vec<i32>,
    n_slots: usize,
}

impl EmbeddingGradPlan {
    /// The plan of a packed batch (`ids`, `type_ids` per token, `offsets` as in
    /// [`crate::model::bert::PackedBatch`]) for tables of `vocab`, `positions` and `type_vocab`
    /// rows. Every id and position is checked against its table.
    pub fn new(
        ids: &[u32],
        type_ids: &[u32],
        offsets: &[usize],
        vocab: usize,
        positions: usize,
        type_vocab: usize,
    ) -> Result<EmbeddingGradPlan> {
        let t_n = ids.len();
        if type_ids.len() != t_n {
            return Err(Error::InvalidArgument(format!(
                "{t_n} token ids but {} type ids",
                type_ids.len()
            )));
        }
        let offs = offsets_u32(offsets, t_n)?;
        to_i32(3 * t_n, "token count")?;
        let mut pos = vec![0u32; t_n];
        for w in offs.windows(2) {
            for (p, t) in (w[0]..w[1]).enumerate() {
                pos[t as usize] = p as u32;
            }
        }
        let tables: [(&[u32], usize, &str); 3] = [
            (ids, vocab, "token id"),
            (&pos, positions, "position"),
            (type_ids, type_vocab, "token type id"),
        ];
        let mut plan = EmbeddingGradPlan {
            tokens: t_n,
            vocab,
            positions,
            type_vocab,
            order: Vec::with_capacity(3 * t_n),
            items: Vec::new(),
            slots: Vec::new(),
            segments: Vec::new(),
            n_slots: 0,
        };
        for (table, (keys, rows, what)) in tables.iter().enumerate() {
            if let Some(&k) = keys.iter().find(|&&k| k as usize >= *rows) {
                return Err(Error::InvalidArgument(format!(
                    "{what} {k} is outside its embedding table ({rows} rows)"
                )));
            }
            to_i32(*rows, "embedding table rows")?;
            let mut idx: Vec<u32> = (0..t_n as u32).collect();
            idx.sort_by_key(|&t| keys[t as usize]); // stable: ties in token order
            let base = plan.order.len();
            let mut a = 0;
            while a < t_n {
                let key = keys[idx[a] as usize];
                let mut b = a + 1;
                while b < t_n && keys[idx[b] as usize] == key {
                    b += 1;
                }
                let (tb, k) = (table as i32, key as i32);
                if b - a <= EMBED_CHUNK {
                    plan.items
                        .extend([tb, k, (base + a) as i32, (base + b) as i32]);
                    plan.slots.push(-1);
                } else {
                    let first = plan.n_slots;
                    for c in (a..b).step_by(EMBED_CHUNK) {
                        let e = (c + EMBED_CHUNK).min(b);
                        plan.items
                            .extend([tb, k, (base + c) as i32, (base + e) as i32]);
                        plan.slots.push(plan.n_slots as i32);
                        plan.n_slots += 1;
                    }
                    plan.segments
                        .extend([tb, k, first as i32, (plan.n_slots - first) as i32]);
                }
                a = b;
            }
            plan.order.extend_from_slice(&idx);
        }
        Ok(plan)
    }

    pub fn tokens(&self) -> usize {
        self.tokens
    }
    /// Work items (one warp each) and runs split over several of them.
    pub fn items(&self) -> usize {
        self.slots.len()
    }
    pub fn split_runs(&self) -> usize {
        self.segments.len() / 4
    }

    /// The plan on the device, for [`GpuBackward::embedding`].
    pub fn upload(&self, gpu: &Gpu) -> Result<DeviceEmbeddingPlan> {
        self.upload_on(gpu.stream())
    }

    pub(crate) fn upload_on(&self, s: &Arc<CudaStream>) -> Result<DeviceEmbeddingPlan> {
        Ok(DeviceEmbeddingPlan {
            tokens: self.tokens,
            vocab: self.vocab,
            positions: self.positions,
            type_vocab: self.type_vocab,
            n_items: self.slots.len(),
            n_segments: self.segments.len() / 4,
            n_slots: self.n_slots,
            order: upload(s, &self.order, "the embedding plan")?,
            items: upload(s, &self.items, "the embedding plan")?,
            slots: upload(s, &self.slots, "the embedding plan")?,
            segments: upload(s, &self.segments, "the embedding plan")?,
        })
    }
}

/// An [`EmbeddingGradPlan`] resident on the device.
pub struct DeviceEmbeddingPlan {
    tokens: usize,
    vocab: usize,
    positions: usize,
    type_vocab: usize,
    n_items: usize,
    n_segments: usize,
    n_slots: usize,
    order: CudaSlice<u32>,
    items: CudaSlice<i32>,
    slots: CudaSlice<i32>,
    segments: CudaSlice<i32>,
}

/// The backward kernels, loaded once, and a scratch buffer for partial sums.
pub struct GpuBackward {
    stream: Arc<CudaStream>,
    layernorm: [CudaFunction; 5],
    bias_partial: CudaFunction,
    bias_partial_bf16: CudaFunction,
    bias_final: CudaFunction,
    gelu_f32: CudaFunction,
    gelu_bf16: CudaFunction,
    pool_mean: CudaFunction,
    pool_cls: CudaFunction,
    pool_max: CudaFunction,
    l2: CudaFunction,
    embed_items: CudaFunction,
    embed_final: CudaFunction,
    scratch: Option<CudaSlice<f32>>,
}

impl GpuBackward {
    /// Loads the kernels; work goes on `gpu`'s default stream.
    pub fn new(gpu: &Gpu) -> Result<GpuBackward> {
        let f = |name: &str| gpu.function(MODULE, name);
        let ln = |h: usize| f(&format!("rrra_layernorm_backward_f32_h{h}"));
        Ok(GpuBackward {
            stream: gpu.stream().clone(),
            layernorm: [ln(128)?, ln(256)?, ln(512)?, ln(768)?, ln(1024)?],
            bias_partial: f("rrra_bias_backward_partial_f32")?,
            bias_partial_bf16: f("rrra_bias_backward_partial_bf16")?,
            bias_final: f("rrra_bias_backward_final_f32")?,
            gelu_f32: f("rrra_gelu_backward_f32")?,
            gelu_bf16: f("rrra_gelu_backward_bf16")?,
            pool_mean: f("rrra_pool_mean_backward_f32")?,
            pool_cls: f("rrra_pool_cls_backward_f32")?,
            pool_max: f("rrra_pool_max_backward_f32")?,
            l2: f("rrra_l2_normalize_backward_f32")?,
            embed_items: f("rrra_embedding_backward_items_f32")?,
            embed_final: f("rrra_embedding_backward_final_f32")?,
            scratch: None,
        })
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The scratch buffer's address, grown to at least `len` floats (NaN-filled when `fill`).
    fn scratch(&mut self, len: usize, fill: bool) -> Result<u64> {
        if self.scratch.as_ref().is_none_or(|s| s.len() < len) {
            self.scratch = Some(alloc(&self.stream, len, "backward scratch")?);
        }
        let s = self.scratch.as_ref().expect("allocated above");
        if fill {
            poison(&self.stream, s)?;
        }
        Ok(ptr(s, &self.stream))
    }

    fn launch_final(
        &self,
        partials: u64,
        parts: usize,
        cols: usize,
        groups: i32,
        accumulate: bool,
        out: u64,
    ) -> Result<()> {
        let (parts_i, cols_i, acc) = (
            to_i32(parts, "partial count")?,
            to_i32(cols, "columns")?,
            accumulate as i32,
        );
        // SAFETY: partials holds parts × cols floats, out cols floats (checked by the callers);
        // the arguments match the kernel's signature in order and type.
        unsafe {
            self.stream
                .launch_builder(&self.bias_final)
                .arg(&partials)
                .arg(&parts_i)
                .arg(&cols_i)
                .arg(&groups)
                .arg(&acc)
                .arg(&out)
                .launch(launch_cfg(grid_of(cols, 32), THREADS, 0)?)
        }
        .map_err(cuda_err("launching rrra_bias_backward_final_f32"))?;
        Ok(())
    }

    /// LayerNorm backward over `rows` rows of width `h` (≤ [`MAX_LN_WIDTH`]), as
    /// `cpu::backward::layernorm_backward`: `ds` overwritten; `dgamma`, `dbeta` `[h]` added to
    /// when `accumulate`, else overwritten. Queued on the stream.
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm(
        &mut self,
        s: &CudaSlice<f32>,
        gamma: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        rows: usize,
        h: usize,
        eps: f32,
        ds: &mut CudaSlice<f32>,
        dgamma: &mut CudaSlice<f32>,
        dbeta: &mut CudaSlice<f32>,
        accumulate: bool,
    ) -> Result<()> {
        self.layernorm_impl(
            s, gamma, dy, rows, h, eps, ds, dgamma, dbeta, accumulate, false,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn layernorm_impl(
        &mut self,
        s: &CudaSlice<f32>,
        gamma: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        rows: usize,
        h: usize,
        eps: f32,
        ds: &mut CudaSlice<f32>,
        dgamma: &mut CudaSlice<f32>,
        dbeta: &mut CudaSlice<f32>,
        accumulate: bool,
        fill_scratch: bool,
    ) -> Result<()> {
        let variant = LN_WIDTHS.iter().position(|&w| h <= w);
        let Some(variant) = variant.filter(|_| h > 0) else {
            return Err(Error::InvalidArgument(format!(
                "LayerNorm backward takes widths 1..={MAX_LN_WIDTH}, got {h}"
            )));
        };
        if !(eps.is_finite() && eps >= 0.0) {
            return Err(Error::InvalidArgument(format!("LayerNorm eps {eps}")));
        }
        let n = rows
            .checked_mul(h)
            .ok_or_else(|| Error::InvalidArgument("LayerNorm backward: too many rows".into()))?;
        check_len("LayerNorm input", s.len(), n)?;
        check_len("LayerNorm output gradient", dy.len(), n)?;
        check_len("LayerNorm input gradient", ds.len(), n)?;
        check_len("gamma", gamma.len(), h)?;
        check_len("dgamma", dgamma.len(), h)?;
        check_len("dbeta", dbeta.len(), h)?;
        if rows == 0 {
            if !accumulate {
                self.stream
                    .memset_zeros(dgamma)
                    .and_then(|_| self.stream.memset_zeros(dbeta))
                    .map_err(cuda_err("zeroing LayerNorm parameter gradients"))?;
            }
            return Ok(());
        }
        let blocks = rows.div_ceil(LN_ROWS_PER_BLOCK);
        let part = self.scratch(2 * blocks * h, fill_scratch)?;
        let part_b = part + (blocks * h * 4) as u64;
        let st = &self.stream;
        let (rows_i, h_i, rpb) = (
            to_i32(rows, "rows")?,
            to_i32(h, "width")?,
            LN_ROWS_PER_BLOCK as i32,
        );
        let (sp, gp, dyp, dsp) = (ptr(s, st), ptr(gamma, st), ptr(dy, st), ptr(ds, st));
        // SAFETY: s, dy, ds hold rows × h floats, gamma h, the scratch 2 × blocks × h (checked
        // above); one 256-thread block per 32 rows, as the kernel expects.
        unsafe {
            st.launch_builder(&self.layernorm[variant])
                .arg(&sp)
                .arg(&gp)
                .arg(&dyp)
                .arg(&eps)
                .arg(&rows_i)
                .arg(&h_i)
                .arg(&rpb)
                .arg(&dsp)
                .arg(&part)
                .arg(&part_b)
                .launch(launch_cfg(blocks, THREADS, 0)?)
        }
        .map_err(cuda_err("launching rrra_layernorm_backward_f32"))?;
        let groups = WARPS.min(blocks) as i32;
        self.launch_final(part, blocks, h, groups, accumulate, ptr(dgamma, st))?;
        self.launch_final(part_b, blocks, h, groups, accumulate, ptr(dbeta, st))
    }

    /// `db [cols]` (+)= the column sums of `dy [rows × cols]`, in the CPU's order (bitwise).
    pub fn bias(
        &mut self,
        dy: &CudaSlice<f32>,
        rows: usize,
        cols: usize,
        db: &mut CudaSlice<f32>,
        accumulate: bool,
    ) -> Result<()> {
        self.bias_impl(dy, rows, cols, db, accumulate, false)
    }

    /// [`GpuBackward::bias`] of a bf16 gradient (bits in `u16`): each element widened exactly,
    /// the sums in f32, so the result is the CPU's on the widened values, bitwise.
    pub fn bias_bf16(
        &mut self,
        dy: &CudaSlice<u16>,
        rows: usize,
        cols: usize,
        db: &mut CudaSlice<f32>,
        accumulate: bool,
    ) -> Result<()> {
        self.bias_impl(dy, rows, cols, db, accumulate, false)
    }

    fn bias_impl<T: BiasInput>(
        &mut self,
        dy: &CudaSlice<T>,
        rows: usize,
        cols: usize,
        db: &mut CudaSlice<f32>,
        accumulate: bool,
        fill_scratch: bool,
    ) -> Result<()> {
        let n = rows
            .checked_mul(cols)
            .ok_or_else(|| Error::InvalidArgument("bias gradient: too many rows".into()))?;
        check_len("bias gradient input", dy.len(), n)?;
        check_len("bias gradient", db.len(), cols)?;
        if cols == 0 {
            return Ok(());
        }
        if rows == 0 {
            if !accumulate {
                self.stream
                    .memset_zeros(db)
                    .map_err(cuda_err("zeroing a bias gradient"))?;
            }
            return Ok(());
        }
        let parts = rows.div_ceil(BIAS_ROWS_PER_PART);
        if parts > 65_535 {
            return Err(Error::InvalidArgument(format!(
                "bias gradient over {rows} rows: at most {} rows",
                65_535 * BIAS_ROWS_PER_PART
            )));
        }
        let part = self.scratch(parts * cols, fill_scratch)?;
        let st = &self.stream;
        let (rows_i, cols_i, rpp) = (
            to_i32(rows, "rows")?,
            to_i32(cols, "columns")?,
            BIAS_ROWS_PER_PART as i32,
        );
        let dyp = ptr(dy, st);
        let cfg = LaunchConfig {
            grid_dim: (grid_of(cols, BIAS_THREADS as usize) as u32, parts as u32, 1),
            block_dim: (BIAS_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (f, name) = if T::BF16 {
            (&self.bias_partial_bf16, "rrra_bias_backward_partial_bf16")
        } else {
            (&self.bias_partial, "rrra_bias_backward_partial_f32")
        };
        // SAFETY: dy holds rows × cols elements of the kernel's type, the scratch parts × cols
        // floats; grid (column tiles, parts) as the kernel indexes it.
        unsafe {
            st.launch_builder(f)
                .arg(&dyp)
                .arg(&rows_i)
                .arg(&cols_i)
                .arg(&rpp)
                .arg(&part)
                .launch(cfg)
        }
        .map_err(cuda_err(&format!("launching {name}")))?;
        // one group: the partials in order, onto db (the CPU's order)
        self.launch_final(part, parts, cols, 1, accumulate, ptr(db, st))
    }

    /// `dy ← dy ⊙ gelu'(pre)` over the first `n` elements (exact erf GELU), f32.
    pub fn gelu(&self, pre: &CudaSlice<f32>, dy: &mut CudaSlice<f32>, n: usize) -> Result<()> {
        check_len("GELU input", pre.len(), n)?;
        check_len("GELU gradient", dy.len(), n)?;
        self.launch_gelu(
            &self.gelu_f32,
            ptr(pre, &self.stream),
            ptr(dy, &self.stream),
            n,
        )
    }

    /// [`GpuBackward::gelu`] on bf16 tensors (bits in `u16`), f32 math, one rounding.
    pub fn gelu_bf16(&self, pre: &CudaSlice<u16>, dy: &mut CudaSlice<u16>, n: usize) -> Result<()> {
        check_len("GELU input", pre.len(), n)?;
        check_len("GELU gradient", dy.len(), n)?;
        self.launch_gelu(
            &self.gelu_bf16,
            ptr(pre, &self.stream),
            ptr(dy, &self.stream),
            n,
        )
    }

    fn launch_gelu(&self, f: &CudaFunction, pre: u64, dy: u64, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let n_i = i64::try_from(n).map_err(|_| Error::InvalidArgument("GELU size".into()))?;
        let blocks = grid_of(n, 4 * THREADS as usize).min(8192);
        // SAFETY: pre and dy hold n elements of the kernel's type; grid-stride loop over n.
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(&pre)
                .arg(&dy)
                .arg(&n_i)
                .launch(launch_cfg(blocks, THREADS, 0)?)
        }
        .map_err(cuda_err("launching rrra_gelu_backward"))?;
        Ok(())
    }

    /// Pooling backward over the packed layout: `dx [tokens × h]` overwritten from
    /// `d_pooled [sequences × h]` (`offsets`: sequences + 1 values, from 0 to tokens). Max
    /// pooling reads `hidden [tokens × h]` (the pooled states) to find each column's maximum.
    /// The device offsets are trusted (they are not read back): build them with the checks of
    /// [`GpuBackward::pool_backward_host`] (start at 0, never decrease, end at `tokens`).
    #[allow(clippy::too_many_arguments)]
    pub fn pool(
        &self,
        pooling: Pooling,
        d_pooled: &CudaSlice<f32>,
        hidden: Option<&CudaSlice<f32>>,
        offsets: &CudaSlice<u32>,
        sequences: usize,
        tokens: usize,
        h: usize,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        check_len("pooled gradient", d_pooled.len(), sequences * h)?;
        check_len("offsets", offsets.len(), sequences + 1)?;
        check_len("token gradient", dx.len(), tokens * h)?;
        let st = &self.stream;
        let (f, name) = match pooling {
            Pooling::Mean => (&self.pool_mean, "rrra_pool_mean_backward_f32"),
            Pooling::Cls => (&self.pool_cls, "rrra_pool_cls_backward_f32"),
            Pooling::Max => (&self.pool_max, "rrra_pool_max_backward_f32"),
        };
        let hid = match (pooling, hidden) {
            (Pooling::Max, Some(hs)) => {
                check_len("hidden states", hs.len(), tokens * h)?;
                ptr(hs, st)
            }
            (Pooling::Max, None) => {
                return Err(Error::InvalidArgument(
                    "max pooling backward needs the hidden states".into(),
                ))
            }
            _ => 0u64,
        };
        if sequences == 0 || h == 0 {
            return Ok(());
        }
        let (s_i, h_i) = (to_i32(sequences, "sequences")?, to_i32(h, "width")?);
        let (dp, op, dxp) = (ptr(d_pooled, st), ptr(offsets, st), ptr(dx, st));
        // SAFETY: one block per sequence; the offsets (validated by the caller's upload, see
        // pool_backward_host) address rows inside dx and hidden ([tokens × h]).
        unsafe {
            st.launch_builder(f)
                .arg(&dp)
                .arg(&hid)
                .arg(&op)
                .arg(&s_i)
                .arg(&h_i)
                .arg(&dxp)
                .launch(launch_cfg(sequences, THREADS, 0)?)
        }
        .map_err(cuda_err(&format!("launching {name}")))?;
        Ok(())
    }

    /// L2-normalisation backward of `rows` rows of width `dim`: `dx` overwritten from the
    /// pre-normalisation rows `x` and the gradient `dy` (in place when `dy` is `None`: `dx`
    /// holds dy on entry).
    pub fn l2_normalize(
        &self,
        x: &CudaSlice<f32>,
        dy: Option<&CudaSlice<f32>>,
        rows: usize,
        dim: usize,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let n = rows * dim;
        check_len("L2 input", x.len(), n)?;
        check_len("L2 input gradient", dx.len(), n)?;
        if let Some(d) = dy {
            check_len("L2 output gradient", d.len(), n)?;
        }
        if n == 0 {
            return Ok(());
        }
        let st = &self.stream;
        let (xp, dxp) = (ptr(x, st), ptr(dx, st));
        let dyp = dy.map_or(dxp, |d| ptr(d, st));
        let (r_i, d_i) = (to_i32(rows, "rows")?, to_i32(dim, "dimension")?);
        // SAFETY: x, dy, dx hold rows × dim floats; dx may alias dy (the kernel allows it).
        unsafe {
            st.launch_builder(&self.l2)
                .arg(&xp)
                .arg(&dyp)
                .arg(&r_i)
                .arg(&d_i)
                .arg(&dxp)
                .launch(launch_cfg(grid_of(rows, WARPS), THREADS, 0)?)
        }
        .map_err(cuda_err("launching rrra_l2_normalize_backward_f32"))?;
        Ok(())
    }

    /// Adds the embedding gradients of `grad [tokens × h]` (the gradient of the embedding sum,
    /// before its LayerNorm) into the word, position and type tables (`[rows × h]` each).
    #[allow(clippy::too_many_arguments)]
    pub fn embedding(
        &mut self,
        plan: &DeviceEmbeddingPlan,
        grad: &CudaSlice<f32>,
        h: usize,
        word: &mut CudaSlice<f32>,
        pos: &mut CudaSlice<f32>,
        types: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.embedding_impl(plan, grad, h, word, pos, types, false)
    }

    #[allow(clippy::too_many_arguments)]
    fn embedding_impl(
        &mut self,
        plan: &DeviceEmbeddingPlan,
        grad: &CudaSlice<f32>,
        h: usize,
        word: &mut CudaSlice<f32>,
        pos: &mut CudaSlice<f32>,
        types: &mut CudaSlice<f32>,
        fill_scratch: bool,
    ) -> Result<()> {
        check_len("embedding gradient", grad.len(), plan.tokens * h)?;
        check_len("word embedding gradient", word.len(), plan.vocab * h)?;
        check_len("position embedding gradient", pos.len(), plan.positions * h)?;
        check_len(
            "token type embedding gradient",
            types.len(),
            plan.type_vocab * h,
        )?;
        if plan.n_items == 0 || h == 0 {
            return Ok(());
        }
        let part = self.scratch(plan.n_slots * h, fill_scratch)?;
        let st = &self.stream;
        let (gp, op, ip, sp, segp) = (
            ptr(grad, st),
            ptr(&plan.order, st),
            ptr(&plan.items, st),
            ptr(&plan.slots, st),
            ptr(&plan.segments, st),
        );
        let (wp, pp, tp) = (ptr(word, st), ptr(pos, st), ptr(types, st));
        let (ni, ns, h_i) = (
            to_i32(plan.n_items, "items")?,
            to_i32(plan.n_segments, "runs")?,
            to_i32(h, "width")?,
        );
        // SAFETY: the plan's items index `order` (3 × tokens) and name rows inside the tables
        // (checked when the plan was built; table sizes checked above); slots < n_slots, the
        // scratch holds n_slots × h floats. No two items write the same row or slot.
        unsafe {
            st.launch_builder(&self.embed_items)
                .arg(&gp)
                .arg(&op)
                .arg(&ip)
                .arg(&sp)
                .arg(&ni)
                .arg(&h_i)
                .arg(&wp)
                .arg(&pp)
                .arg(&tp)
                .arg(&part)
                .launch(launch_cfg(grid_of(plan.n_items, WARPS), THREADS, 0)?)
        }
        .map_err(cuda_err("launching rrra_embedding_backward_items_f32"))?;
        if plan.n_segments > 0 {
            // SAFETY: each run's slots were written by the launch above (same stream).
            unsafe {
                st.launch_builder(&self.embed_final)
                    .arg(&segp)
                    .arg(&ns)
                    .arg(&h_i)
                    .arg(&part)
                    .arg(&wp)
                    .arg(&pp)
                    .arg(&tp)
                    .launch(launch_cfg(grid_of(plan.n_segments, WARPS), THREADS, 0)?)
            }
            .map_err(cuda_err("launching rrra_embedding_backward_final_f32"))?;
        }
        Ok(())
    }

    fn sync(&self, what: &str) -> Result<()> {
        self.stream.synchronize().map_err(cuda_err(what))
    }

    // -----------------------------------------------------------------------------------------
    // Host in, host out (tests, small problems): the CPU functions' signatures.

    /// `cpu::backward::layernorm_backward` on the device: `ds` overwritten, `dgamma` and
    /// `dbeta` accumulated (+=).
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_backward_host(
        &mut self,
        s: &[f32],
        n: usize,
        gamma: &[f32],
        eps: f32,
        dy: &[f32],
        ds: &mut [f32],
        dgamma: &mut [f32],
        dbeta: &mut [f32],
    ) -> Result<()> {
        if n == 0 || !s.len().is_multiple_of(n) {
            return Err(Error::InvalidArgument(format!(
                "LayerNorm backward: {} values are not rows of width {n}",
                s.len()
            )));
        }
        let rows = s.len() / n;
        let shapes = gamma.len() == n
            && dy.len() == s.len()
            && ds.len() == s.len()
            && dgamma.len() == n
            && dbeta.len() == n;
        if !shapes {
            return Err(Error::InvalidArgument(
                "LayerNorm backward: shapes disagree".into(),
            ));
        }
        let st = self.stream.clone();
        let s_d = upload(&st, s, "LayerNorm input")?;
        let g_d = upload(&st, gamma, "gamma")?;
        let dy_d = upload(&st, dy, "LayerNorm gradient")?;
        let mut ds_d = alloc(&st, ds.len(), "LayerNorm input gradient")?;
        poison(&st, &ds_d)?;
        let mut dg_d = upload(&st, dgamma, "dgamma")?;
        let mut db_d = upload(&st, dbeta, "dbeta")?;
        self.layernorm_impl(
            &s_d, &g_d, &dy_d, rows, n, eps, &mut ds_d, &mut dg_d, &mut db_d, true, true,
        )?;
        download(&st, &ds_d, ds, "ds")?;
        download(&st, &dg_d, dgamma, "dgamma")?;
        download(&st, &db_d, dbeta, "dbeta")?;
        self.sync("running the LayerNorm backward")
    }

    /// `cpu::backward::gelu_backward` on the device: `dy ← dy ⊙ gelu'(pre)`.
    pub fn gelu_backward_host(&self, pre: &[f32], dy: &mut [f32]) -> Result<()> {
        self.gelu_host(pre, dy, Self::gelu)
    }

    /// The bf16 GELU backward (bf16 bits in `u16`): `dy ← bf16(dy ⊙ gelu'(pre))`.
    pub fn gelu_backward_bf16_host(&self, pre: &[u16], dy: &mut [u16]) -> Result<()> {
        self.gelu_host(pre, dy, Self::gelu_bf16)
    }

    /// The host round trip of either GELU backward: upload, `launch`, download.
    fn gelu_host<T: DeviceRepr + Default + Clone>(
        &self,
        pre: &[T],
        dy: &mut [T],
        launch: fn(&Self, &CudaSlice<T>, &mut CudaSlice<T>, usize) -> Result<()>,
    ) -> Result<()> {
        if pre.len() != dy.len() {
            return Err(Error::InvalidArgument(
                "GELU backward: shapes differ".into(),
            ));
        }
        let st = &self.stream;
        let p_d = upload(st, pre, "GELU input")?;
        let mut g_d = upload(st, dy, "GELU gradient")?;
        launch(self, &p_d, &mut g_d, dy.len())?;
        download(st, &g_d, dy, "the GELU gradient")?;
        self.sync("running the GELU backward")
    }

    /// `db` += column sums of `dy` (`[rows × cols]`, cols = `db.len()`): the bias part of
    /// `cpu::backward::linear_backward`, bitwise.
    pub fn bias_backward_host(&mut self, dy: &[f32], db: &mut [f32]) -> Result<()> {
        self.bias_host(dy, db)
    }

    /// [`GpuBackward::bias_backward_host`] from a bf16 gradient (bits in `u16`).
    pub fn bias_backward_bf16_host(&mut self, dy: &[u16], db: &mut [f32]) -> Result<()> {
        self.bias_host(dy, db)
    }

    fn bias_host<T: BiasInput>(&mut self, dy: &[T], db: &mut [f32]) -> Result<()> {
        let cols = db.len();
        if cols == 0 || !dy.len().is_multiple_of(cols) {
            return Err(Error::InvalidArgument(format!(
                "bias gradient: {} values are not rows of width {cols}",
                dy.len()
            )));
        }
        let st = self.stream.clone();
        let dy_d = upload(&st, dy, "bias gradient input")?;
        let mut db_d = upload(&st, db, "bias gradient")?;
        self.bias_impl(&dy_d, dy.len() / cols, cols, &mut db_d, true, true)?;
        download(&st, &db_d, db, "the bias gradient")?;
        self.sync("running the bias gradient")
    }

    /// `cpu::backward::l2_normalize_backward` over rows of width `dim`: `dx` overwritten.
    pub fn l2_normalize_backward_host(
        &self,
        x: &[f32],
        dy: &[f32],
        dim: usize,
        dx: &mut [f32],
    ) -> Result<()> {
        if dim == 0 || !x.len().is_multiple_of(dim) || dy.len() != x.len() || dx.len() != x.len() {
            return Err(Error::InvalidArgument(
                "L2 backward: shapes disagree".into(),
            ));
        }
        let st = &self.stream;
        let x_d = upload(st, x, "L2 input")?;
        let dy_d = upload(st, dy, "L2 gradient")?;
        let mut dx_d = alloc(st, dx.len(), "L2 input gradient")?;
        poison(st, &dx_d)?;
        self.l2_normalize(&x_d, Some(&dy_d), x.len() / dim, dim, &mut dx_d)?;
        download(st, &dx_d, dx, "the L2 gradient")?;
        self.sync("running the L2 backward")
    }

    /// Pooling backward of a packed batch (`offsets` as in
    /// [`crate::model::bert::PackedBatch`]): `dx [tokens × h]` overwritten from
    /// `d_pooled [sequences × h]`; `hidden [tokens × h]` is read by max pooling only.
    pub fn pool_backward_host(
        &self,
        pooling: Pooling,
        hidden: &[f32],
        offsets: &[usize],
        d_pooled: &[f32],
        h: usize,
        dx: &mut [f32],
    ) -> Result<()> {
        let sequences = offsets.len().saturating_sub(1);
        let tokens = offsets.last().copied().unwrap_or(0);
        let offs = offsets_u32(offsets, tokens)?;
        if h == 0
            || d_pooled.len() != sequences * h
            || dx.len() != tokens * h
            || (pooling == Pooling::Max && hidden.len() != tokens * h)
        {
            return Err(Error::InvalidArgument(
                "pooling backward: shapes disagree".into(),
            ));
        }
        let st = &self.stream;
        let dp_d = upload(st, d_pooled, "pooled gradient")?;
        let off_d = upload(st, &offs, "sequence offsets")?;
        let hid_d = match pooling {
            Pooling::Max => Some(upload(st, hidden, "hidden states")?),
            _ => None,
        };
        let mut dx_d = alloc(st, dx.len(), "token gradient")?;
        poison(st, &dx_d)?;
        self.pool(
            pooling,
            &dp_d,
            hid_d.as_ref(),
            &off_d,
            sequences,
            tokens,
            h,
            &mut dx_d,
        )?;
        download(st, &dx_d, dx, "the token gradient")?;
        self.sync("running the pooling backward")
    }

    /// The embedding scatter of `train::encoder_grad` on the device: for each token of the
    /// packed batch, its row of `grad [tokens × h]` added to `word[ids[t]]`, `pos[p(t)]` and
    /// `types[type_ids[t]]` (tables `[rows × h]`, accumulated).
    #[allow(clippy::too_many_arguments)]
    pub fn embedding_backward_host(
        &mut self,
        ids: &[u32],
        type_ids: &[u32],
        offsets: &[usize],
        grad: &[f32],
        h: usize,
        word: &mut [f32],
        pos: &mut [f32],
        types: &mut [f32],
    ) -> Result<()> {
        let whole = |t: &[f32]| h > 0 && t.len().is_multiple_of(h);
        if !(whole(word) && whole(pos) && whole(types)) || grad.len() != ids.len() * h {
            return Err(Error::InvalidArgument(
                "embedding backward: shapes disagree".into(),
            ));
        }
        let plan = EmbeddingGradPlan::new(
            ids,
            type_ids,
            offsets,
            word.len() / h,
            pos.len() / h,
            types.len() / h,
        )?;
        let gpu_plan = plan.upload_on(&self.stream)?;
        let st = self.stream.clone();
        let g_d = upload(&st, grad, "embedding gradient")?;
        let mut w_d = upload(&st, word, "word embedding gradient")?;
        let mut p_d = upload(&st, pos, "position embedding gradient")?;
        let mut t_d = upload(&st, types, "type embedding gradient")?;
        self.embedding_impl(&gpu_plan, &g_d, h, &mut w_d, &mut p_d, &mut t_d, true)?;
        download(&st, &w_d, word, "the word embedding gradient")?;
        download(&st, &p_d, pos, "the position embedding gradient")?;
        download(&st, &t_d, types, "the type embedding gradient")?;
        self.sync("running the embedding backward")
    }
}

/// The backward kernels at BERT-base sizes (128 sequences × 128 tokens, hidden 768, FFN 3072),
/// device-resident, for the device check's table.
pub fn bench(gpu: &Gpu) -> Result<Vec<KernelTiming>> {
    const SEQ: usize = 128;
    const LEN: usize = 128;
    const H: usize = 768;
    const INTER: usize = 3072;
    const VOCAB: usize = 30_522;
    let t = SEQ * LEN;
    let (tf, hf, inf) = (t as f64, H as f64, INTER as f64);
    let mut bw = GpuBackward::new(gpu)?;
    let st = gpu.stream().clone();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = |n: usize, lo: f32, hi: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                lo + (hi - lo) * ((x >> 40) as f32 / (1u64 << 24) as f32)
            })
            .collect()
    };
    let s = upload(&st, &rnd(t * H, -2.0, 2.0), "bench input")?;
    let dy = upload(&st, &rnd(t * H, -1.0, 1.0), "bench gradient")?;
    let gamma = upload(&st, &rnd(H, 0.5, 1.5), "bench gamma")?;
    let mut ds = alloc::<f32>(&st, t * H, "bench output")?;
    let mut dg = alloc::<f32>(&st, H, "bench dgamma")?;
    let mut db = alloc::<f32>(&st, H, "bench dbeta")?;
    let mut rows = Vec::new();
    let mut push = |name: &str, shape: String, ms: f64, bytes: f64, flops: f64| {
        rows.push(KernelTiming {
            name: name.into(),
            shape,
            ms,
            bytes,
            flops,
        })
    };
    let reps = 20;

    let ms = gpu.time_ms(reps, || {
        bw.layernorm(
            &s, &gamma, &dy, t, H, 1e-12, &mut ds, &mut dg, &mut db, false,
        )
    })?;
    push(
        "rrra_layernorm_backward_f32_h768 + 2 x rrra_bias_backward_final_f32",
        format!("{t} x {H} f32"),
        ms,
        tf * hf * 12.0,
        tf * hf * 12.0,
    );

    let ms = gpu.time_ms(reps, || bw.bias(&dy, t, H, &mut db, false))?;
    push(
        "rrra_bias_backward_{partial,final}_f32",
        format!("{t} x {H} f32"),
        ms,
        tf * hf * 4.0,
        tf * hf,
    );

    let pre = upload(&st, &rnd(t * INTER, -4.0, 4.0), "bench FFN activation")?;
    let mut dmid = upload(&st, &rnd(t * INTER, -1.0, 1.0), "bench FFN gradient")?;
    let mut db_i = alloc::<f32>(&st, INTER, "bench FFN bias gradient")?;
    let ms = gpu.time_ms(reps, || bw.bias(&dmid, t, INTER, &mut db_i, false))?;
    push(
        "rrra_bias_backward_{partial,final}_f32",
        format!("{t} x {INTER} f32"),
        ms,
        tf * inf * 4.0,
        tf * inf,
    );
    // the gradient is rescaled on every repetition: GELU' ∈ [-0.17, 1.13], the values stay finite
    // over the few repetitions timed
    let ms = gpu.time_ms(reps, || bw.gelu(&pre, &mut dmid, t * INTER))?;
    push(
        "rrra_gelu_backward_f32",
        format!("{t} x {INTER} f32"),
        ms,
        tf * inf * 12.0,
        tf * inf * 30.0,
    );
    drop((pre, dmid));
    let bits = |v: Vec<f32>| -> Vec<u16> {
        v.into_iter()
            .map(|f| half::bf16::from_f32(f).to_bits())
            .collect()
    };
    let pre_b = upload(
        &st,
        &bits(rnd(t * INTER, -4.0, 4.0)),
        "bench bf16 activation",
    )?;
    let mut dmid_b = upload(&st, &bits(rnd(t * INTER, -1.0, 1.0)), "bench bf16 gradient")?;
    let ms = gpu.time_ms(reps, || bw.gelu_bf16(&pre_b, &mut dmid_b, t * INTER))?;
    push(
        "rrra_gelu_backward_bf16",
        format!("{t} x {INTER} bf16"),
        ms,
        tf * inf * 6.0,
        tf * inf * 30.0,
    );
    let ms = gpu.time_ms(reps, || bw.bias_bf16(&dmid_b, t, INTER, &mut db_i, false))?;
    push(
        "rrra_bias_backward_partial_bf16 + rrra_bias_backward_final_f32",
        format!("{t} x {INTER} bf16"),
        ms,
        tf * inf * 2.0,
        tf * inf,
    );
    drop((pre_b, dmid_b));

    let offsets: Vec<usize> = (0..=SEQ).map(|i| i * LEN).collect();
    let offs = upload(&st, &offsets_u32(&offsets, t)?, "bench offsets")?;
    let d_pooled = upload(&st, &rnd(SEQ * H, -1.0, 1.0), "bench pooled gradient")?;
    let ms = gpu.time_ms(reps, || {
        bw.pool(Pooling::Mean, &d_pooled, None, &offs, SEQ, t, H, &mut ds)
    })?;
    push(
        "rrra_pool_mean_backward_f32",
        format!("{SEQ} x {LEN} tokens, h {H}"),
        ms,
        tf * hf * 4.0,
        tf * hf,
    );
    let pooled = upload(&st, &rnd(SEQ * H, -1.0, 1.0), "bench pooled")?;
    let mut d_in = alloc::<f32>(&st, SEQ * H, "bench L2 gradient")?;
    let ms = gpu.time_ms(reps, || {
        bw.l2_normalize(&pooled, Some(&d_pooled), SEQ, H, &mut d_in)
    })?;
    push(
        "rrra_l2_normalize_backward_f32",
        format!("{SEQ} x {H}"),
        ms,
        SEQ as f64 * hf * 12.0,
        SEQ as f64 * hf * 6.0,
    );

    // token ids: Zipf-like (a few very frequent ids, as in text), [CLS] first in each sequence
    let mut ids = vec![0u32; t];
    let mut y = 12345u64;
    for (i, id) in ids.iter_mut().enumerate() {
        y = y
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let u = ((y >> 11) as f64 / (1u64 << 53) as f64).max(1e-9);
        *id = if i % LEN == 0 {
            101
        } else {
            ((VOCAB as f64).powf(u) as usize).min(VOCAB - 1) as u32
        };
    }
    let types = vec![0u32; t];
    let plan = EmbeddingGradPlan::new(&ids, &types, &offsets, VOCAB, 512, 2)?;
    let dplan = plan.upload(gpu)?;
    let mut word = alloc::<f32>(&st, VOCAB * H, "bench word gradient")?;
    let mut posg = alloc::<f32>(&st, 512 * H, "bench position gradient")?;
    let mut typg = alloc::<f32>(&st, 2 * H, "bench type gradient")?;
    st.memset_zeros(&mut word)
        .and_then(|_| st.memset_zeros(&mut posg))
        .and_then(|_| st.memset_zeros(&mut typg))
        .map_err(cuda_err("zeroing bench tables"))?;
    let ms = gpu.time_ms(reps, || {
        bw.embedding(&dplan, &dy, H, &mut word, &mut posg, &mut typg)
    })?;
    push(
        "rrra_embedding_backward_{items,final}_f32",
        format!(
            "{t} tokens, h {H}, vocab {VOCAB} ({} items, {} split runs)",
            plan.items(),
            plan.split_runs()
        ),
        ms,
        // each token row read once per table, each touched table row read and written
        tf * hf * 12.0,
        tf * hf * 3.0,
    );
    Ok(rows)
}
