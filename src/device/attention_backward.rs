//! The attention backward on the GPU for the training step: the device twin of
//! [`attention_sequence_backward`](crate::cpu::backward::attention_sequence_backward) applied to
//! every sequence of a packed variable-length batch (as `train::encoder_grad` does), with the
//! optional dropout on the probabilities ([`AttnDropoutPlan`]: the CPU's per-sequence Philox
//! streams, recomputed in the kernels, so the masks are the CPU's bit for bit). Kernels and
//! design: `kernels/attention_backward.cu` (FlashAttention-2 scheme in f32 SIMT: probabilities
//! recomputed tile by tile from Q and K, LSE and D = rowsum(dP ⊙ P) from a first online pass,
//! dQ by query-tile blocks and dK / dV by key-tile blocks, so nothing is accumulated with
//! atomics and results are deterministic). For head dims 32, 64 and 128 the same scheme runs on
//! the tensor cores as well (bf16 operands, f32 accumulation): on f32 QKV and dQKV
//! ([`GpuAttentionBackward::use_tensor_cores`]), and on bf16 ones
//! ([`GpuAttentionBackward::backward_bf16`], the mixed-precision step's, whose activations are
//! bf16). The two compute the same: the bf16 one's gradients are the f32 one's rounded to bf16.
//!
//! # Inputs
//! The CPU backward's: the fused projection `qkv` `[tokens × 3h]` (Q | K | V) and `dctx` = dO
//! `[tokens × h]`; no forward output or LSE is needed. `bias` (`[3h]`) is optional: the GPU
//! forward ([`super::encoder`]) keeps the projection *without* its bias and adds it inside
//! attention, so pass its bias; the CPU path keeps the biased projection, so pass `None`. The
//! output `dqkv` `[tokens × 3h]` (dQ | dK | dV) is the gradient with respect to either form and
//! every element of it is overwritten. `offsets` (`sequences + 1` entries, from 0 to `tokens`,
//! non-decreasing) delimit the sequences; the packing is the padding mask.
//!
//! # Precision
//! f32 throughout (expf, logf, fused multiply-adds); against the CPU reference only the
//! summation order and exp differ: run on a CPU emulation of the CUDA blocks, the kernels were
//! within 1e-6 of the largest gradient (per dQ / dK / dV) of the Rust CPU reference, with and
//! without dropout, about as far as an f32 port of the CPU maths is from an f64 evaluation.
//! Dropout masks are identical (same Philox words, same `u < p` test). The tensor-core kernels
//! round Q, K, V, dO, the kept probabilities and dS to bf16: on the emulator within 7.4e-3 of
//! the largest gradient, the same masks; 9.8e-3 for the bf16 twin, whose QKV and gradients are
//! also rounded once each.
//!
//! # Memory
//! [`GpuAttentionBackward`] owns the device copy of the offsets and the LSE / D scratch
//! (`2 · heads · tokens` floats), sized at construction for `max_tokens` and `max_sequences`;
//! a call allocates nothing on the device.

use super::runtime::{
    alloc, allow_smem, cuda_err, launch_cfg, poison, ptr, to_i32, to_u32, upload, Gpu, KernelTiming,
};
use crate::error::{Error, Result};
use crate::train::rng::{Site, Stream};
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use std::sync::Arc;

const MODULE: &str = "attention_backward";
/// Threads per block of both f32 kernels (16 × 16).
const THREADS: u32 = 256;
/// Threads per block of both tensor-core kernels (4 warps of 16 rows).
const MMA_THREADS: u32 = 128;
/// Query / key rows per tile (the kernels' `attb::T`).
const TILE: usize = 64;
/// Largest head dim the kernels take.
pub const MAX_HEAD_DIM: usize = 128;
/// Largest sequence count: sequences are the grid's z axis.
pub const MAX_SEQUENCES: usize = 65_535;

/// Dynamic shared memory of the (dq, dkdv) kernels for tiles `dmax` columns wide; mirrors
/// `attb::Layout` in the kernel file (the kernels trap when given less).
fn smem_bytes(dmax: usize) -> (usize, usize) {
    let ld = dmax + 1;
    let pld = TILE + 1;
    let dq = 4 * TILE * ld + TILE * pld;
    let dkdv = 4 * TILE * ld + 2 * TILE * pld + 2 * TILE;
    (dq * 4, dkdv * 4)
}

/// Dropout on the attention probabilities of a batch, as the trainer draws it: sequence `s` uses
/// the stream `Stream::new(seed, step, example_ids[s], layer, Site::AttentionDropout)`
/// (`train::encoder_grad`), probability (head, i, j) is dropped when its uniform is below `p`,
/// kept ones are scaled by 1/(1 − p).
#[derive(Debug, Clone, Copy)]
pub struct AttnDropoutPlan<'a> {
    pub p: f32,
    pub seed: u64,
    pub step: u64,
    pub layer: u32,
    /// One per sequence of the batch.
    pub example_ids: &'a [u64],
}

/// The Philox key and upper counter words `[key0, key1, ctr2, ctr3]` of
/// `Stream::new(seed, step, example, layer, Site::AttentionDropout)`.
pub fn attention_dropout_words(seed: u64, step: u64, example: u64, layer: u32) -> [u32; 4] {
    Stream::new(seed, step, example, layer, Site::AttentionDropout).words()
}

/// Floats of LSE / D scratch for `heads` heads over `tokens` tokens.
pub fn stats_len(heads: usize, tokens: usize) -> usize {
    2 * heads * tokens
}

/// Checks `offsets` (0, non-decreasing, ending at `tokens`) and returns the longest sequence.
fn check_offsets(offsets: &[u32], tokens: usize) -> Result<usize> {
    if offsets.is_empty() {
        return Err(Error::InvalidArgument(
            "attention backward: offsets must have sequences + 1 entries (at least 1)".into(),
        ));
    }
    if offsets[0] != 0 || *offsets.last().unwrap_or(&0) as usize != tokens {
        return Err(Error::InvalidArgument(format!(
            "attention backward: offsets must run from 0 to the token count {tokens}, got {} .. {}",
            offsets[0],
            offsets.last().unwrap_or(&0)
        )));
    }
    let mut max_len = 0usize;
    for w in offsets.windows(2) {
        if w[1] < w[0] {
            return Err(Error::InvalidArgument(format!(
                "attention backward: offsets decrease ({} then {})",
                w[0], w[1]
            )));
        }
        max_len = max_len.max((w[1] - w[0]) as usize);
    }
    Ok(max_len)
}

/// The attention backward for one head layout (`h`, `heads`) and batch capacity.
pub struct GpuAttentionBackward {
    dq: CudaFunction,
    dkdv: CudaFunction,
    smem: (usize, usize),
    /// The tensor-core pairs for head dims 32, 64 and 128, and whether the backward runs them.
    mma: Option<MmaKernels>,
    tensor_cores: bool,
    stream: Arc<CudaStream>,
    h: usize,
    heads: usize,
    dh: usize,
    max_tokens: usize,
    max_sequences: usize,
    offsets: CudaSlice<u32>,
    stats: CudaSlice<f32>,
    /// 4 Philox words per sequence when dropout is on.
    drop_ctr: CudaSlice<u32>,
}

/// The tensor-core kernels of one head dim: `rrra_attention_backward_{dq,dkdv}_mma_d{dh}` (f32
/// QKV and dQKV) and their `_mma_bf16_` twins (bf16 QKV and dQKV, the bf16-activation step's).
struct MmaKernels {
    f32: (CudaFunction, CudaFunction),
    bf16: (CudaFunction, CudaFunction),
}

/// The dkdv kernel of a (dq, dkdv) pair when `dkdv`, else the dq one.
fn pick(pair: &(CudaFunction, CudaFunction), dkdv: bool) -> &CudaFunction {
    if dkdv {
        &pair.1
    } else {
        &pair.0
    }
}

/// The element type of QKV and dQKV in a launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stored {
    F32,
    Bf16,
}

/// One validated batch: the launch geometry.
struct Batch {
    tokens: usize,
    sequences: usize,
    max_len: usize,
    /// Dropout probability and keep-scale (0 and 1: none).
    drop: (f32, f32),
}

impl GpuAttentionBackward {
    /// Loads the kernels for head dim `h / heads` (d32, d64, d128, or the general `_any` for any
    /// other dim ≤ 128) and allocates the offsets and scratch buffers for batches of at most
    /// `max_tokens` tokens in `max_sequences` sequences, on the GPU's default stream.
    pub fn new(
        gpu: &Gpu,
        h: usize,
        heads: usize,
        max_tokens: usize,
        max_sequences: usize,
    ) -> Result<Self> {
        if heads == 0 || h == 0 || !h.is_multiple_of(heads) {
            return Err(Error::InvalidArgument(format!(
                "attention backward: hidden size {h} is not a positive multiple of {heads} heads"
            )));
        }
        let dh = h / heads;
        if dh > MAX_HEAD_DIM {
            return Err(Error::InvalidArgument(format!(
                "attention backward: head dim {dh} exceeds {MAX_HEAD_DIM}"
            )));
        }
        if heads > 65_535 {
            return Err(Error::InvalidArgument(format!(
                "attention backward: {heads} heads exceed the grid's 65535"
            )));
        }
        if max_sequences > MAX_SEQUENCES {
            return Err(Error::InvalidArgument(format!(
                "attention backward: {max_sequences} sequences exceed {MAX_SEQUENCES}"
            )));
        }
        // every index the kernels form in int must fit: tokens · 3h and heads · tokens · 2
        to_i32(
            max_tokens.saturating_mul(3 * h),
            "attention backward tokens × 3h",
        )?;
        let (suffix, dmax) = match dh {
            32 | 64 | 128 => (format!("f32_d{dh}"), dh),
            _ => ("f32_any".to_string(), MAX_HEAD_DIM),
        };
        let dq = gpu.function(MODULE, &format!("rrra_attention_backward_dq_{suffix}"))?;
        let dkdv = gpu.function(MODULE, &format!("rrra_attention_backward_dkdv_{suffix}"))?;
        let smem = smem_bytes(dmax);
        allow_smem(&dq, smem.0)?;
        allow_smem(&dkdv, smem.1)?;
        let pair = |infix: &str| -> Result<(CudaFunction, CudaFunction)> {
            let f = |k: &str| gpu.function(MODULE, &format!("rrra_attention_backward_{k}{infix}"));
            Ok((f("dq")?, f("dkdv")?))
        };
        let mma = match dh {
            32 | 64 | 128 => Some(MmaKernels {
                f32: pair(&format!("_mma_d{dh}"))?,
                bf16: pair(&format!("_mma_bf16_d{dh}"))?,
            }),
            _ => None,
        };
        let stream = gpu.stream().clone();
        let offsets = alloc(&stream, max_sequences + 1, "attention backward offsets")?;
        let stats = alloc(
            &stream,
            stats_len(heads, max_tokens),
            "attention backward scratch",
        )?;
        let drop_ctr = alloc(
            &stream,
            4 * max_sequences,
            "attention backward dropout streams",
        )?;
        Ok(GpuAttentionBackward {
            dq,
            dkdv,
            smem,
            mma,
            tensor_cores: false,
            stream,
            h,
            heads,
            dh,
            max_tokens,
            max_sequences,
            offsets,
            stats,
            drop_ctr,
        })
    }

    pub fn head_dim(&self) -> usize {
        self.dh
    }

    /// Runs the tensor-core kernels (bf16 operands, f32 accumulation: the mixed-precision
    /// step's) when `on` and the head dim has them (32, 64, 128), else the f32 ones.
    pub fn use_tensor_cores(&mut self, on: bool) {
        self.tensor_cores = on && self.mma.is_some();
    }

    /// Whether [`GpuAttentionBackward::backward`] runs the tensor-core kernels.
    pub fn tensor_cores(&self) -> bool {
        self.tensor_cores
    }

    /// Validates a batch against the buffers and the capacity and uploads its offsets.
    /// `lens` are the element counts of (qkv, bias, dctx, dqkv), bias 0 when absent.
    fn prepare(
        &mut self,
        offsets: &[u32],
        (qkv, bias, dctx, dqkv): (usize, Option<usize>, usize, usize),
        dropout: Option<&AttnDropoutPlan>,
    ) -> Result<Batch> {
        let sequences = offsets.len().saturating_sub(1);
        let tokens = offsets.last().copied().unwrap_or(0) as usize;
        let max_len = check_offsets(offsets, tokens)?;
        if tokens > self.max_tokens || sequences > self.max_sequences {
            return Err(Error::InvalidArgument(format!(
                "attention backward: batch of {tokens} tokens in {sequences} sequences exceeds \
                 the capacity ({} tokens, {} sequences)",
                self.max_tokens, self.max_sequences
            )));
        }
        let h = self.h;
        let need = |what: &str, have: usize, want: usize| {
            if have < want {
                Err(Error::InvalidArgument(format!(
                    "attention backward: {what} holds {have} elements, needs {want}"
                )))
            } else {
                Ok(())
            }
        };
        need("qkv", qkv, tokens * 3 * h)?;
        need("dctx", dctx, tokens * h)?;
        need("dqkv", dqkv, tokens * 3 * h)?;
        if let Some(b) = bias {
            need("bias", b, 3 * h)?;
        }
        let mut drop = (0.0f32, 1.0f32);
        if let Some(d) = dropout {
            if !(0.0..1.0).contains(&d.p) {
                return Err(Error::InvalidArgument(format!(
                    "attention backward: dropout probability {} outside [0, 1)",
                    d.p
                )));
            }
            if d.example_ids.len() != sequences {
                return Err(Error::InvalidArgument(format!(
                    "attention backward: {} dropout example ids for {sequences} sequences",
                    d.example_ids.len()
                )));
            }
            if d.p > 0.0 && tokens > 0 {
                let words: Vec<u32> = d
                    .example_ids
                    .iter()
                    .flat_map(|&e| attention_dropout_words(d.seed, d.step, e, d.layer))
                    .collect();
                self.stream
                    .memcpy_htod(&words, &mut self.drop_ctr.slice_mut(..words.len()))
                    .map_err(cuda_err("uploading attention dropout streams"))?;
                // the CPU's keep-scale expression (cpu::backward::keep_scales)
                drop = (d.p, 1.0 / (1.0 - d.p));
            }
        }
        if tokens > 0 {
            self.stream
                .memcpy_htod(offsets, &mut self.offsets.slice_mut(..offsets.len()))
                .map_err(cuda_err("uploading attention backward offsets"))?;
        }
        Ok(Batch {
            tokens,
            sequences,
            max_len,
            drop,
        })
    }

    fn cfg(&self, b: &Batch, threads: u32, smem: usize) -> Result<LaunchConfig> {
        let mut c = launch_cfg(b.max_len.div_ceil(TILE), threads, smem)?;
        c.grid_dim.1 = to_u32(self.heads, "heads")?;
        c.grid_dim.2 = to_u32(b.sequences, "sequences")?;
        Ok(c)
    }

    /// Queues one of the two kernels (`dkdv` false: the dq kernel, which writes the scratch).
    /// `stored` Bf16 needs the tensor-core kernels (checked by the callers).
    fn launch_one(
        &self,
        dkdv: bool,
        stored: Stored,
        b: &Batch,
        ptrs: (u64, u64, u64, u64),
        what: &str,
    ) -> Result<()> {
        let st = &self.stream;
        let (qkv, bias, dctx, dqkv) = ptrs;
        let (offs, stats) = (ptr(&self.offsets, st), ptr(&self.stats, st));
        let (drop_p, drop_scale) = b.drop;
        let drop_ctr = if drop_p > 0.0 {
            ptr(&self.drop_ctr, st)
        } else {
            0
        };
        let tokens = to_i32(b.tokens, "tokens")?;
        let h = to_i32(self.h, "hidden size")?;
        let dh = to_i32(self.dh, "head dim")?;
        let scale = 1.0f32 / (self.dh as f32).sqrt();
        let (f, threads, smem) = match (&self.mma, self.tensor_cores, stored) {
            (Some(m), _, Stored::Bf16) => (pick(&m.bf16, dkdv), MMA_THREADS, 0),
            (Some(m), true, Stored::F32) => (pick(&m.f32, dkdv), MMA_THREADS, 0),
            (None, _, Stored::Bf16) => {
                return Err(Error::InvalidArgument(format!(
                    "attention backward: no tensor-core kernels for head dim {}",
                    self.dh
                )))
            }
            (_, _, Stored::F32) if dkdv => (&self.dkdv, THREADS, self.smem.1),
            (_, _, Stored::F32) => (&self.dq, THREADS, self.smem.0),
        };
        let cfg = self.cfg(b, threads, smem)?;
        let mut l = st.launch_builder(f);
        l.arg(&qkv)
            .arg(&bias)
            .arg(&dctx)
            .arg(&offs)
            .arg(&tokens)
            .arg(&h)
            .arg(&dh)
            .arg(&scale)
            .arg(&drop_p)
            .arg(&drop_scale)
            .arg(&drop_ctr)
            .arg(&stats)
            .arg(&dqkv);
        // SAFETY: the buffers were checked to hold tokens × 3h (qkv, dqkv), tokens × h (dctx),
        // 3h (bias) and 2 · heads · tokens (stats) floats, the dropout words (read only when
        // drop_p > 0) 4 per sequence, and the offsets uploaded on this stream were validated
        // to run from 0 to tokens; blocks read and write only their sequence's rows; the
        // shared-memory size is the f32 kernels' layout (the tensor-core ones use static
        // shared memory only), and the block size the kernel's.
        unsafe { l.launch(cfg) }.map_err(cuda_err(what))?;
        Ok(())
    }

    /// Queues the backward of a batch on the GPU's default stream (no synchronisation):
    /// `dqkv` `[tokens × 3h]` is overwritten with (dQ | dK | dV) for `qkv` `[tokens × 3h]`
    /// (plus `bias` `[3h]` when given) and `dctx` `[tokens × h]`, sequences delimited by the host
    /// `offsets` (`sequences + 1` entries, 0 to tokens), with the forward's attention dropout
    /// when given. Errors on bad shapes, a bad dropout plan or a batch over the capacity;
    /// nothing is launched then.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &mut self,
        offsets: &[u32],
        qkv: &CudaSlice<f32>,
        bias: Option<&CudaSlice<f32>>,
        dctx: &CudaSlice<f32>,
        dropout: Option<&AttnDropoutPlan>,
        dqkv: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let lens = (qkv.len(), bias.map(|b| b.len()), dctx.len(), dqkv.len());
        let b = self.prepare(offsets, lens, dropout)?;
        let st = &self.stream;
        let ptrs = (
            ptr(qkv, st),
            bias.map_or(0, |x| ptr(x, st)),
            ptr(dctx, st),
            ptr(dqkv, st),
        );
        self.launch_pair(Stored::F32, &b, ptrs)
    }

    /// [`GpuAttentionBackward::backward`] for QKV stored in bf16 (bits in `u16`), writing dQKV
    /// in bf16: the tensor-core pair's bf16 twin, whatever
    /// [`GpuAttentionBackward::use_tensor_cores`] says (an error for head dims without it).
    /// `bias` and `dctx` stay f32.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_bf16(
        &mut self,
        offsets: &[u32],
        qkv: &CudaSlice<u16>,
        bias: Option<&CudaSlice<f32>>,
        dctx: &CudaSlice<f32>,
        dropout: Option<&AttnDropoutPlan>,
        dqkv: &mut CudaSlice<u16>,
    ) -> Result<()> {
        if self.mma.is_none() {
            return Err(Error::InvalidArgument(format!(
                "attention backward: no tensor-core kernels for head dim {}",
                self.dh
            )));
        }
        let lens = (qkv.len(), bias.map(|b| b.len()), dctx.len(), dqkv.len());
        let b = self.prepare(offsets, lens, dropout)?;
        let st = &self.stream;
        let ptrs = (
            ptr(qkv, st),
            bias.map_or(0, |x| ptr(x, st)),
            ptr(dctx, st),
            ptr(dqkv, st),
        );
        self.launch_pair(Stored::Bf16, &b, ptrs)
    }

    /// Queues the dq kernel, then the dkdv kernel (which reads the dq kernel's LSE and D).
    fn launch_pair(&self, stored: Stored, b: &Batch, ptrs: (u64, u64, u64, u64)) -> Result<()> {
        if b.tokens == 0 {
            return Ok(());
        }
        self.launch_one(
            false,
            stored,
            b,
            ptrs,
            "launching rrra_attention_backward_dq",
        )?;
        self.launch_one(
            true,
            stored,
            b,
            ptrs,
            "launching rrra_attention_backward_dkdv",
        )
    }
}

/// Host in, host out (for tests): uploads the inputs, runs [`GpuAttentionBackward::backward`]
/// on a `dqkv` buffer filled with NaN first (so an element no kernel writes shows up), and
/// returns dqkv `[tokens × 3h]`. Same argument conventions as the device entry point.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_host(
    gpu: &Gpu,
    qkv: &[f32],
    bias: Option<&[f32]>,
    dctx: &[f32],
    offsets: &[u32],
    dropout: Option<&AttnDropoutPlan>,
    h: usize,
    heads: usize,
) -> Result<Vec<f32>> {
    attention_backward_host_on(gpu, false, qkv, bias, dctx, offsets, dropout, h, heads)
}

/// [`attention_backward_host`] with the tensor-core kernels when `tensor_cores` (an error for
/// head dims without them).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_host_on(
    gpu: &Gpu,
    tensor_cores: bool,
    qkv: &[f32],
    bias: Option<&[f32]>,
    dctx: &[f32],
    offsets: &[u32],
    dropout: Option<&AttnDropoutPlan>,
    h: usize,
    heads: usize,
) -> Result<Vec<f32>> {
    let inputs = (qkv, bias, dctx, offsets, dropout);
    host_run(gpu, tensor_cores, Stored::F32, inputs, h, heads)
}

/// [`attention_backward_host`] through [`GpuAttentionBackward::backward_bf16`] (the tensor-core
/// pair's bf16 twin): `qkv` rounded to bf16 on the way in, the bf16 dqkv widened on the way out.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_host_bf16(
    gpu: &Gpu,
    qkv: &[f32],
    bias: Option<&[f32]>,
    dctx: &[f32],
    offsets: &[u32],
    dropout: Option<&AttnDropoutPlan>,
    h: usize,
    heads: usize,
) -> Result<Vec<f32>> {
    let inputs = (qkv, bias, dctx, offsets, dropout);
    host_run(gpu, true, Stored::Bf16, inputs, h, heads)
}

/// The host-in, host-out runs: checks, uploads (QKV as `stored`), one backward on a dqkv buffer
/// filled with NaN, the download.
#[allow(clippy::type_complexity)]
fn host_run(
    gpu: &Gpu,
    tensor_cores: bool,
    stored: Stored,
    (qkv, bias, dctx, offsets, dropout): (
        &[f32],
        Option<&[f32]>,
        &[f32],
        &[u32],
        Option<&AttnDropoutPlan>,
    ),
    h: usize,
    heads: usize,
) -> Result<Vec<f32>> {
    let tokens = offsets.last().copied().unwrap_or(0) as usize;
    check_offsets(offsets, tokens)?;
    if qkv.len() != tokens * 3 * h || dctx.len() != tokens * h {
        return Err(Error::InvalidArgument(format!(
            "attention backward: qkv ({}) and dctx ({}) must hold tokens × 3h and tokens × h \
             floats (tokens {tokens}, h {h})",
            qkv.len(),
            dctx.len()
        )));
    }
    if bias.is_some_and(|b| b.len() != 3 * h) {
        return Err(Error::InvalidArgument(format!(
            "attention backward: bias must hold 3h = {} floats",
            3 * h
        )));
    }
    let sequences = offsets.len().saturating_sub(1);
    let mut op = GpuAttentionBackward::new(gpu, h, heads, tokens, sequences)?;
    op.use_tensor_cores(tensor_cores);
    if op.tensor_cores() != tensor_cores {
        return Err(Error::InvalidArgument(format!(
            "attention backward: no tensor-core kernels for head dim {}",
            h / heads
        )));
    }
    let st = gpu.stream();
    let dctx_d = upload(st, dctx, "dctx")?;
    let bias_d = bias.map(|b| upload(st, b, "bias")).transpose()?;
    if stored == Stored::Bf16 {
        let bits: Vec<u16> = qkv
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_bits())
            .collect();
        let qkv16 = upload(st, &bits, "qkv")?;
        let mut dqkv16 = alloc::<u16>(st, qkv.len().max(1), "dqkv")?;
        poison(st, &dqkv16)?;
        let b = bias_d.as_ref();
        op.backward_bf16(offsets, &qkv16, b, &dctx_d, dropout, &mut dqkv16)?;
        let out = st
            .clone_dtoh(&dqkv16)
            .map_err(cuda_err("downloading dqkv"))?;
        let wide = out.iter().take(qkv.len());
        return Ok(wide.map(|&v| half::bf16::from_bits(v).to_f32()).collect());
    }
    let qkv_d = upload(st, qkv, "qkv")?;
    let mut dqkv_d = alloc::<f32>(st, qkv.len().max(1), "dqkv")?;
    poison(st, &dqkv_d)?;
    op.backward(
        offsets,
        &qkv_d,
        bias_d.as_ref(),
        &dctx_d,
        dropout,
        &mut dqkv_d,
    )?;
    let mut out = st
        .clone_dtoh(&dqkv_d)
        .map_err(cuda_err("downloading dqkv"))?;
    out.truncate(qkv.len());
    Ok(out)
}

/// BERT-base shape, 128 sequences × 128 tokens, 12 heads × 64: the pair with attention dropout
/// 0.1 (Philox recomputed per score), then without: the two kernels and the pair; then the
/// tensor-core kernels, alone and as a pair with dropout.
/// FLOPs are counted as run (nine len² × dh GEMMs per head, see the kernel header).
pub fn bench(gpu: &Gpu) -> Result<Vec<KernelTiming>> {
    let (seqs, len, heads, dh) = (128usize, 128usize, 12usize, 64usize);
    let h = heads * dh;
    let tokens = seqs * len;
    let offsets: Vec<u32> = (0..=seqs).map(|s| (s * len) as u32).collect();
    // deterministic, varied inputs (no RNG dependency)
    let wave = |n: usize, k: usize| -> Vec<f32> {
        (0..n)
            .map(|i| ((i * k + 7) % 1999) as f32 / 1999.0 - 0.5)
            .collect()
    };
    let st = gpu.stream();
    let qkv = st
        .clone_htod(&wave(tokens * 3 * h, 31))
        .map_err(cuda_err("uploading qkv"))?;
    let dctx = st
        .clone_htod(&wave(tokens * h, 17))
        .map_err(cuda_err("uploading dctx"))?;
    let bias = st
        .clone_htod(&wave(3 * h, 5))
        .map_err(cuda_err("uploading bias"))?;
    let mut dqkv = alloc::<f32>(st, tokens * 3 * h, "dqkv")?;
    let mut op = GpuAttentionBackward::new(gpu, h, heads, tokens, seqs)?;
    let lens = (qkv.len(), Some(bias.len()), dctx.len(), dqkv.len());
    let b = op.prepare(&offsets, lens, None)?;
    let ptrs = (
        ptr(&qkv, st),
        ptr(&bias, st),
        ptr(&dctx, st),
        ptr(&dqkv, st),
    );
    let n = (seqs * len * len) as f64 * h as f64; // Σ len² · h
    let shape = format!("{seqs} x {len} tokens, {heads} heads x {dh}, f32");
    let io_bytes = (tokens * (3 * h + h) * 4) as f64;
    let ms_dq = gpu.time_ms(10, || op.launch_one(false, Stored::F32, &b, ptrs, "dq"))?;
    let ms_dkdv = gpu.time_ms(10, || op.launch_one(true, Stored::F32, &b, ptrs, "dkdv"))?;
    let ms_all = gpu.time_ms(10, || {
        op.backward(&offsets, &qkv, Some(&bias), &dctx, None, &mut dqkv)
    })?;
    let examples: Vec<u64> = (0..seqs as u64).collect();
    let plan = AttnDropoutPlan {
        p: 0.1,
        seed: 42,
        step: 1,
        layer: 0,
        example_ids: &examples,
    };
    let ms_drop = gpu.time_ms(10, || {
        op.backward(&offsets, &qkv, Some(&bias), &dctx, Some(&plan), &mut dqkv)
    })?;
    // the tensor-core pair as the bf16-activation step runs it: bf16 QKV in, bf16 dQKV out
    let to_bf16 = |x: &[f32]| -> Vec<u16> {
        x.iter()
            .map(|&v| half::bf16::from_f32(v).to_bits())
            .collect()
    };
    let qkv16 = st
        .clone_htod(&to_bf16(&wave(tokens * 3 * h, 31)))
        .map_err(cuda_err("uploading qkv"))?;
    let mut dqkv16 = alloc::<u16>(st, tokens * 3 * h, "dqkv")?;
    let ptrs16 = (ptr(&qkv16, st), ptrs.1, ptrs.2, ptr(&dqkv16, st));
    let mma_dq = gpu.time_ms(10, || {
        op.launch_one(false, Stored::Bf16, &b, ptrs16, "dq mma")
    })?;
    let mma_dkdv = gpu.time_ms(10, || {
        op.launch_one(true, Stored::Bf16, &b, ptrs16, "dkdv mma")
    })?;
    let mma_drop = gpu.time_ms(10, || {
        op.backward_bf16(
            &offsets,
            &qkv16,
            Some(&bias),
            &dctx,
            Some(&plan),
            &mut dqkv16,
        )
    })?;
    let mma_shape = format!("{seqs} x {len} tokens, {heads} heads x {dh}, bf16 QKV and dQKV");
    let pair_bytes = (tokens * (3 * h * 2 + h * 4 + 3 * h * 2)) as f64;
    let mma_rows = [
        ("rrra_attention_backward_dq_mma_bf16_d64", mma_dq, 5.0),
        ("rrra_attention_backward_dkdv_mma_bf16_d64", mma_dkdv, 4.0),
        (
            "rrra_attention_backward_{dq,dkdv}_mma_bf16_d64 + dropout 0.1",
            mma_drop,
            9.0,
        ),
    ]
    .map(|(name, ms, products)| KernelTiming {
        name: name.into(),
        shape: mma_shape.clone(),
        ms,
        bytes: pair_bytes,
        flops: 2.0 * n * products,
    });
    Ok(vec![
        KernelTiming {
            name: "rrra_attention_backward_{dq,dkdv}_f32_d64 + dropout 0.1".into(),
            shape: shape.clone(),
            ms: ms_drop,
            bytes: (tokens * (3 * h + h + 3 * h) * 4) as f64,
            flops: 2.0 * n * 9.0,
        },
        KernelTiming {
            name: "rrra_attention_backward_dq_f32_d64".into(),
            shape: shape.clone(),
            ms: ms_dq,
            // reads Q, K, V, dO; writes dQ and LSE / D
            bytes: io_bytes + (tokens * h * 4) as f64,
            flops: 2.0 * n * 5.0,
        },
        KernelTiming {
            name: "rrra_attention_backward_dkdv_f32_d64".into(),
            shape: shape.clone(),
            ms: ms_dkdv,
            bytes: io_bytes + (tokens * 2 * h * 4) as f64,
            flops: 2.0 * n * 4.0,
        },
        KernelTiming {
            name: "rrra_attention_backward_{dq,dkdv}_f32_d64".into(),
            shape,
            ms: ms_all,
            // qkv and dO read, dqkv written, at least
            bytes: pair_bytes,
            flops: 2.0 * n * 9.0,
        },
    ]
    .into_iter()
    .chain(mma_rows)
    .collect())
}
