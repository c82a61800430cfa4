//! The BERT encoder forward pass on the GPU: the same function as [`Bert::forward`] (post-LN,
//! exact erf GELU, packed variable-length sequences), with the dense layers in cuBLAS and the
//! rest in the kernels of `kernels/{embeddings,attention,layernorm,gelu,pooling}.cu`.
//!
//! # Precision
//! * [`Precision::F32`]: f32 weights and activations, SGEMM in cuBLAS's default math mode (no
//!   TF32), f32 kernels. Differs from the CPU only by summation order: max |Δ| ~3e-6 on the
//!   O(1) hidden states that LayerNorm produces (tests allow 1e-4).
//! * [`Precision::Bf16`]: bf16 copies of the four GEMM weights per layer, bf16 GEMM inputs with
//!   f32 accumulation (`cublasGemmEx`, `CUBLAS_COMPUTE_32F`), tensor-core attention on bf16
//!   Q/K/V. Embeddings, biases and LayerNorm parameters stay f32, every kernel computes in f32,
//!   and the residual stream (LayerNorm outputs, GEMM outputs that feed a LayerNorm) stays f32;
//!   only GEMM inputs and the QKV / FFN activations are rounded to bf16 (8 significant bits,
//!   relative rounding error ≤ 2⁻⁹). Relative L2 error against the CPU ~4e-3 after two
//!   layers (tests allow 2e-2).
//!
//! # cuBLAS mapping
//! `y = x · Wᵀ` with everything row-major: x `[t × in]`, W `[out × in]` (torch `nn.Linear`),
//! y `[t × out]`. cuBLAS is column-major, and a row-major `[r × c]` matrix *is* the column-major
//! `[c × r]` matrix (its transpose) with leading dimension c. So row-major y is column-major
//! `yᵀ [out × t]`, and `yᵀ = W · xᵀ`, where column-major `xᵀ [in × t]` (ld in) is x's memory as
//! is and `W` is the transpose of W's memory read as column-major `[in × out]` (ld in):
//! `gemm(transa = T, transb = N, m = out, n = t, k = in, A = W, lda = in, B = x, ldb = in,
//! C = y, ldc = out)`. No weight is ever transposed or copied. Biases are not part of the GEMM:
//! attention adds Q's bias as it loads Q, V's to its output (softmax rows sum to 1) and K's as
//! it loads K on the f32 path (the bf16 kernel drops it: it shifts a whole score row, which
//! softmax cancels exactly); the FFN input bias is added in `rrra_bias_gelu` and the two output
//! biases in `rrra_add_layernorm` (cuBLASLt's fused GELU epilogue is the tanh approximation,
//! not BERT's GELU).
//!
//! # Memory
//! [`GpuBert::new`] uploads the weights once and allocates a workspace for `max_tokens` tokens
//! and `max_sequences` sequences, including cuBLAS's workspace (set with
//! `cublasSetWorkspace`). A forward pass allocates nothing on the device: it copies the token
//! ids and offsets into that workspace, queues the kernels and GEMMs on one stream, and copies
//! the result back. A batch larger than the workspace is an [`Error::InvalidArgument`].
//!
//! # Performance (H200, random BERT-base)
//! bf16: 6.9 ms for 128 × 128 tokens, 8.2 ms for 32 × 512 (~400 TFLOP/s counted as dense
//! GEMM + attention FLOPs); its GEMMs run at 580–670 TFLOP/s and take ~60% of the time,
//! attention 106 / 161 TFLOP/s, LayerNorm and GELU at 2.6–3.3 TB/s. f32: 61 / 68 ms, SGEMM-bound
//! at ~49 TFLOP/s. One 16-token query through an all-MiniLM-L6-v2-shaped model, upload to
//! download: 0.39 ms (bf16), 0.46 ms (f32), bound by the latency of its ~50 launches.

use super::runtime::{cuda_err, ptr, Gpu, KernelTiming};
use crate::error::{Error, Result};
use crate::model::bert::{Bert, PackedBatch};
use crate::model::config::BertConfig;
use crate::model::pooling::Pooling;
use crate::model::synthetic::{
    batch_with_lengths, bert_base_config, gemm_parameters, minilm_l6_config, random_bert,
};
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};
use std::sync::Arc;

/// The arithmetic of the dense layers (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    Bf16,
}

impl Precision {
    fn tag(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
    /// Bytes of one element of a GEMM operand.
    fn elem_bytes(self) -> usize {
        match self {
            Precision::F32 => 4,
            Precision::Bf16 => 2,
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.tag())
    }
}

/// Largest sequence count a batch may have: attention's grid puts sequences on the z axis.
pub const MAX_SEQUENCES: usize = 65_535;
/// cuBLAS's workspace: what NVIDIA recommends for Hopper GEMMs.
const CUBLAS_WORKSPACE_BYTES: usize = 32 << 20;
/// Threads of the embedding and LayerNorm kernels' blocks: 8 warps, one row each.
const ROW_KERNEL_THREADS: u32 = 256;
/// Largest hidden size the warp-per-row LayerNorm kernels hold in registers.
const MAX_HIDDEN: usize = 1024;
/// Largest head dim of the attention kernels.
const MAX_HEAD_DIM: usize = 128;

/// A device matrix whose element type is the precision's (bf16 stored as its bits).
enum DMat {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
}

impl DMat {
    fn zeros(stream: &Arc<CudaStream>, precision: Precision, n: usize) -> Result<DMat> {
        Ok(match precision {
            Precision::F32 => DMat::F32(alloc(stream, n)?),
            Precision::Bf16 => DMat::Bf16(alloc(stream, n)?),
        })
    }
    fn upload(stream: &Arc<CudaStream>, precision: Precision, host: &[f32]) -> Result<DMat> {
        let what = "uploading a weight matrix";
        Ok(match precision {
            Precision::F32 => DMat::F32(stream.clone_htod(host).map_err(cuda_err(what))?),
            Precision::Bf16 => {
                let bits: Vec<u16> = host
                    .iter()
                    .map(|&x| half::bf16::from_f32(x).to_bits())
                    .collect();
                DMat::Bf16(stream.clone_htod(&bits).map_err(cuda_err(what))?)
            }
        })
    }
    fn ptr(&self, stream: &CudaStream) -> u64 {
        match self {
            DMat::F32(s) => ptr(s, stream),
            DMat::Bf16(s) => ptr(s, stream),
        }
    }
}

fn alloc<T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    n: usize,
) -> Result<CudaSlice<T>> {
    // A zero-length allocation is not a valid device pointer; keep every buffer non-empty.
    stream
        .alloc_zeros::<T>(n.max(1))
        .map_err(cuda_err("allocating device memory"))
}

fn upload_f32(stream: &Arc<CudaStream>, host: &[f32]) -> Result<CudaSlice<f32>> {
    stream
        .clone_htod(host)
        .map_err(cuda_err("uploading a weight vector"))
}

/// The raw device address of a slice, for kernel arguments and cuBLAS. Everything runs on one
/// stream, so stream order is the only synchronisation the buffers need.
struct DeviceLayer {
    qkv_w: DMat,
    qkv_b: CudaSlice<f32>,
    attn_out_w: DMat,
    attn_out_b: CudaSlice<f32>,
    attn_ln_g: CudaSlice<f32>,
    attn_ln_b: CudaSlice<f32>,
    inter_w: DMat,
    inter_b: CudaSlice<f32>,
    out_w: DMat,
    out_b: CudaSlice<f32>,
    out_ln_g: CudaSlice<f32>,
    out_ln_b: CudaSlice<f32>,
}

struct DeviceWeights {
    word_emb: CudaSlice<f32>,
    pos_emb: CudaSlice<f32>,
    type_emb: CudaSlice<f32>,
    emb_ln_g: CudaSlice<f32>,
    emb_ln_b: CudaSlice<f32>,
    layers: Vec<DeviceLayer>,
}

/// Activations of one batch, sized for `max_tokens` / `max_sequences`.
struct Workspace {
    ids: CudaSlice<u32>,
    type_ids: CudaSlice<u32>,
    offsets: CudaSlice<u32>,
    /// The residual stream, f32 in both precisions: layer input / FFN output, and the attention
    /// block's output.
    x: CudaSlice<f32>,
    x1: CudaSlice<f32>,
    /// bf16 copies of `x` and `x1` (the GEMM inputs) on the bf16 path.
    x_bf: Option<CudaSlice<u16>>,
    x1_bf: Option<CudaSlice<u16>>,
    /// `[t × 3h]` fused projection, `[t × h]` attention context, `[t × inter]` FFN activation.
    qkv: DMat,
    ctx: DMat,
    mid: DMat,
    pooled: CudaSlice<f32>,
    _cublas: CudaSlice<u8>,
}

struct Kernels {
    embed: (CudaFunction, String),
    add_ln: (CudaFunction, String),
    gelu: (CudaFunction, String),
    attention: AttentionKernel,
    pool_mean: CudaFunction,
    pool_cls: CudaFunction,
    pool_max: CudaFunction,
}

/// The attention forward kernel for a model's head dim and a precision (`kernels/attention.cu`),
/// with its launch shape: the inference forward's and the f32 training forward's.
pub(crate) struct AttentionKernel {
    f: CudaFunction,
    pub(crate) name: String,
    /// Queries per block, and the dynamic shared memory.
    rows: u32,
    smem: u32,
}

impl AttentionKernel {
    pub(crate) fn load(gpu: &Gpu, cfg: &BertConfig, precision: Precision) -> Result<Self> {
        let p = precision.tag();
        let dh = cfg.head_dim();
        let tiled = matches!(dh, 32 | 64 | 128);
        let name = if tiled {
            format!("rrra_attention_varlen_{p}_d{dh}")
        } else {
            format!("rrra_attention_varlen_{p}_any")
        };
        let f = gpu.function("attention", &name)?;
        let smem = if tiled && precision == Precision::F32 {
            let bytes = simt_attention_smem_bytes(dh);
            use cudarc::driver::sys::CUfunction_attribute_enum as A;
            f.set_attribute(
                A::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
            .map_err(cuda_err("raising attention's shared-memory limit"))?;
            bytes as u32
        } else {
            0
        };
        Ok(AttentionKernel {
            f,
            name,
            rows: if tiled { 64 } else { 4 },
            smem,
        })
    }

    /// Queues `ctx [tokens × h] = attention(qkv + bias)` over the packed sequences delimited by
    /// the device `offsets` (`qkv` `[tokens × 3h]` without its bias, which the kernel adds).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch(
        &self,
        stream: &CudaStream,
        cfg: &BertConfig,
        qkv: u64,
        bias: u64,
        offsets: u64,
        sequences: usize,
        max_len: usize,
        ctx: u64,
    ) -> Result<()> {
        let (h, dh) = (cfg.hidden_size as i32, cfg.head_dim() as i32);
        let scale_log2e = std::f32::consts::LOG2_E / (cfg.head_dim() as f32).sqrt();
        let mut l = stream.launch_builder(&self.f);
        l.arg(&qkv)
            .arg(&bias)
            .arg(&offsets)
            .arg(&h)
            .arg(&dh)
            .arg(&scale_log2e)
            .arg(&ctx);
        let launch = LaunchConfig {
            grid_dim: (
                (max_len as u32).div_ceil(self.rows).max(1),
                cfg.num_attention_heads as u32,
                sequences as u32,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: self.smem,
        };
        // SAFETY: blocks read the QKV rows of their own sequence (the callers validated and
        // uploaded the offsets) and write its ctx rows; the shared-memory size matches the
        // kernel's layout.
        unsafe { l.launch(launch) }.map_err(cuda_err("launching rrra_attention_varlen"))?;
        Ok(())
    }
}

/// Dynamic shared memory of `rrra_attention_varlen_f32_d{dh}` (mirrors `SimtTile` in
/// kernels/attention.cu: Q, K, V tiles and the per-warp Pᵀ tiles; the kernel traps on less).
fn simt_attention_smem_bytes(dh: usize) -> usize {
    let (bq, bk, warps, ps) = (64, if dh == 128 { 32 } else { 64 }, 4, 20);
    let qs = dh + 4;
    4 * (bq * qs + bk * qs + bk * dh + warps * bk * ps)
}

impl Kernels {
    fn load(gpu: &Gpu, cfg: &BertConfig, precision: Precision) -> Result<Kernels> {
        let p = precision.tag();
        let h = cfg.hidden_size;
        let hs = [128, 256, 512, 768, 1024]
            .into_iter()
            .find(|&m| h <= m)
            .unwrap_or(MAX_HIDDEN);
        let f = |module: &'static str, name: String| -> Result<(CudaFunction, String)> {
            Ok((gpu.function(module, &name)?, name))
        };
        Ok(Kernels {
            embed: f("embeddings", format!("rrra_embed_layernorm_{p}_h{hs}"))?,
            add_ln: f("layernorm", format!("rrra_add_layernorm_{p}_h{hs}"))?,
            gelu: f("gelu", format!("rrra_bias_gelu_{p}"))?,
            attention: AttentionKernel::load(gpu, cfg, precision)?,
            pool_mean: gpu.function("pooling", "rrra_pool_mean_f32")?,
            pool_cls: gpu.function("pooling", "rrra_pool_cls_f32")?,
            pool_max: gpu.function("pooling", "rrra_pool_max_f32")?,
        })
    }
}

/// What a validated batch looks like.
#[derive(Debug, Clone, Copy)]
struct Shape {
    tokens: usize,
    sequences: usize,
    max_len: usize,
    /// Σ len², for attention's FLOP count.
    sum_len_sq: f64,
}

/// A BERT model resident on one GPU (see the module docs).
pub struct GpuBert {
    cfg: BertConfig,
    precision: Precision,
    max_tokens: usize,
    max_sequences: usize,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    k: Kernels,
    w: DeviceWeights,
    ws: Workspace,
    host_offsets: Vec<u32>,
    /// Captured `embed` launches per batch shape, when graphs are on ([`GpuBert::use_graphs`]).
    graphs: Option<std::collections::HashMap<GraphKey, Graph>>,
}

/// What fixes every launch of an `embed` call: the batch's shape and the pooling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct GraphKey {
    tokens: usize,
    sequences: usize,
    max_len: usize,
    pooling: Pooling,
    normalize: bool,
}

/// Shapes whose graphs are kept; calls of further shapes launch eagerly.
const MAX_GRAPHS: usize = 64;

/// A captured and instantiated CUDA graph.
struct Graph(cudarc::driver::CudaGraph);
// SAFETY: a graph is only used through `&mut GpuBert` (never from two threads at once), which
// is all CUDA asks of graph objects; it holds no thread-local state.
unsafe impl Send for Graph {}

impl GpuBert {
    /// Uploads `bert`'s weights (bf16 copies of the GEMM weights for [`Precision::Bf16`]) and
    /// allocates the workspace for batches of up to `max_tokens` tokens in up to
    /// `max_sequences` sequences.
    pub fn new(
        gpu: &Gpu,
        bert: &Bert,
        precision: Precision,
        max_tokens: usize,
        max_sequences: usize,
    ) -> Result<GpuBert> {
        Self::on_stream(
            gpu,
            gpu.stream().clone(),
            bert,
            precision,
            max_tokens,
            max_sequences,
        )
    }

    /// [`GpuBert::new`] with its work queued on `stream` (one per worker thread).
    pub fn on_stream(
        gpu: &Gpu,
        stream: Arc<CudaStream>,
        bert: &Bert,
        precision: Precision,
        max_tokens: usize,
        max_sequences: usize,
    ) -> Result<GpuBert> {
        let cfg = bert.cfg.clone();
        check_config(&cfg)?;
        if max_tokens == 0 || max_tokens > i32::MAX as usize {
            return Err(Error::InvalidArgument(format!(
                "max_tokens must be in 1..={}, got {max_tokens}",
                i32::MAX
            )));
        }
        if max_sequences == 0 || max_sequences > MAX_SEQUENCES {
            return Err(Error::InvalidArgument(format!(
                "max_sequences must be in 1..={MAX_SEQUENCES}, got {max_sequences}"
            )));
        }
        // SAFETY: only tries to dlopen libcublas; cudarc would panic on first use without it.
        if !unsafe { blas_sys::is_culib_present() } {
            return Err(Error::CudaUnavailable(
                "the cuBLAS library (libcublas) is not installed".into(),
            ));
        }
        stream
            .context()
            .bind_to_thread()
            .map_err(cuda_err("binding the context"))?;
        let k = Kernels::load(gpu, &cfg, precision)?;
        let w = upload_weights(&stream, bert, precision)?;
        let ws = allocate_workspace(&stream, &cfg, precision, max_tokens, max_sequences)?;
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| Error::Cuda(format!("creating a cuBLAS handle: {e}")))?;
        // SAFETY: the handle is live; the workspace buffer outlives it (both are fields of the
        // returned value, and `blas` is declared, hence dropped, before `ws`).
        unsafe {
            let (p, _sync) = ws._cublas.device_ptr(&stream);
            blas_sys::cublasSetWorkspace_v2(
                *blas.handle(),
                p as *mut std::ffi::c_void,
                CUBLAS_WORKSPACE_BYTES,
            )
            .result()
            .map_err(|e| Error::Cuda(format!("setting the cuBLAS workspace: {e}")))?;
            // Explicitly the default: f32 GEMMs in full f32 (no TF32), bf16 on tensor cores.
            blas_sys::cublasSetMathMode(
                *blas.handle(),
                blas_sys::cublasMath_t::CUBLAS_DEFAULT_MATH,
            )
            .result()
            .map_err(|e| Error::Cuda(format!("setting the cuBLAS math mode: {e}")))?;
        }
        Ok(GpuBert {
            cfg,
            precision,
            max_tokens,
            max_sequences,
            stream,
            blas,
            k,
            w,
            ws,
            host_offsets: Vec::with_capacity(max_sequences + 1),
            graphs: None,
        })
    }

    /// With `on`, [`GpuBert::embed`] captures its ~50 launches (kernels and cuBLAS GEMMs) into a
    /// CUDA graph the first time it sees a batch shape (token count, sequence count, longest
    /// sequence, pooling) and replays the graph for later batches of that shape: one launch
    /// instead of fifty, the fixed-shape query path's main cost. Token ids and offsets are
    /// still copied into the workspace before each replay; results are bitwise those of the
    /// eager launches. Up to 64 shapes are kept; others run eagerly. CUDA cannot capture the
    /// legacy default stream that [`GpuBert::new`] uses: graphs need an encoder built with
    /// [`GpuBert::on_stream`] on a stream of its own ([`Gpu::new_stream`]), and `embed` refuses
    /// them otherwise.
    pub fn use_graphs(&mut self, on: bool) {
        self.graphs = on.then(Default::default);
    }

    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }
    pub fn precision(&self) -> Precision {
        self.precision
    }
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }
    pub fn max_sequences(&self) -> usize {
        self.max_sequences
    }

    /// Last hidden states `[tokens × hidden]`, f32, as [`Bert::forward`] returns them.
    pub fn forward(&mut self, batch: &PackedBatch) -> Result<Vec<f32>> {
        let shape = self.prepare(batch)?;
        let n = shape.tokens * self.cfg.hidden_size;
        let mut out = vec![0.0f32; n];
        if n > 0 {
            self.encode(&shape)?;
            self.download(&self.ws.x, &mut out)?;
        }
        Ok(out)
    }

    /// Pooled sentence embeddings `[sequences × hidden]`, L2-normalised when `normalize`, as
    /// `model::Encoder::embed_batch` computes them. An empty sequence pools to zeros.
    pub fn embed(
        &mut self,
        batch: &PackedBatch,
        pooling: Pooling,
        normalize: bool,
    ) -> Result<Vec<f32>> {
        let shape = self.prepare(batch)?;
        let mut out = vec![0.0f32; shape.sequences * self.cfg.hidden_size];
        if shape.sequences == 0 {
            return Ok(out);
        }
        let _range = super::nvtx::range(c"rrra encode");
        let key = GraphKey {
            tokens: shape.tokens,
            sequences: shape.sequences,
            max_len: shape.max_len,
            pooling,
            normalize,
        };
        let graphed = match &self.graphs {
            Some(g) if g.contains_key(&key) => true,
            Some(g) if g.len() < MAX_GRAPHS => {
                let graph = self.capture(&shape, pooling, normalize)?;
                self.graphs
                    .get_or_insert_with(Default::default)
                    .insert(key, graph);
                true
            }
            _ => false,
        };
        if graphed {
            let g = self
                .graphs
                .as_ref()
                .and_then(|g| g.get(&key))
                .ok_or_else(|| Error::Cuda("internal: a captured graph went missing".into()))?;
            g.0.launch()
                .map_err(cuda_err("launching the encoder's graph"))?;
        } else {
            self.launch_embed_pool(&shape, pooling, normalize)?;
        }
        self.download(&self.ws.pooled, &mut out)?;
        Ok(out)
    }

    /// Embeds tokenized texts in batches of up to `batch_size` sequences, longest first (as the
    /// CPU's `Encoder::encode_tokens` does), each batch within the workspace; rows in input
    /// order. An empty text embeds to zeros.
    pub fn encode_tokens(
        &mut self,
        tokens: &[crate::model::tokenizer::Tokens],
        batch_size: usize,
        pooling: Pooling,
        normalize: bool,
    ) -> Result<Vec<f32>> {
        let dim = self.cfg.hidden_size;
        let mut out = vec![0.0f32; tokens.len() * dim];
        let mut order: Vec<usize> = (0..tokens.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(tokens[i].ids.len()));
        let mut at = 0;
        while at < order.len() {
            let mut batch = PackedBatch::new();
            let start = at;
            while at < order.len()
                && at - start < batch_size.clamp(1, self.max_sequences)
                && (at == start || batch.ids.len() + tokens[order[at]].ids.len() <= self.max_tokens)
            {
                let t = &tokens[order[at]];
                batch.push(&t.ids, &t.type_ids);
                at += 1;
            }
            let pooled = self.embed(&batch, pooling, normalize)?;
            for (j, &i) in order[start..at].iter().enumerate() {
                out[i * dim..(i + 1) * dim].copy_from_slice(&pooled[j * dim..(j + 1) * dim]);
            }
        }
        Ok(out)
    }

    /// The encoder and the pooling, launched one by one.
    fn launch_embed_pool(&self, shape: &Shape, pooling: Pooling, normalize: bool) -> Result<()> {
        if shape.tokens > 0 {
            self.encode(shape)?;
        }
        self.launch_pool(shape, pooling, normalize)
    }

    /// Records [`GpuBert::launch_embed_pool`] into a graph (nothing runs while capturing).
    fn capture(&self, shape: &Shape, pooling: Pooling, normalize: bool) -> Result<Graph> {
        use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
        if self.stream.cu_stream().is_null() {
            return Err(Error::InvalidArgument(
                "CUDA graphs cannot be captured on the legacy default stream: build the encoder \
                 with GpuBert::on_stream on a stream of its own"
                    .into(),
            ));
        }
        // Thread-local mode: other threads' CUDA calls do not disturb (or fail) this capture.
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(cuda_err("starting a graph capture"))?;
        let launched = self.launch_embed_pool(shape, pooling, normalize);
        // The capture must end whatever happened, or the stream stays unusable.
        let graph = self
            .stream
            .end_capture(CUgraphInstantiate_flags(0))
            .map_err(cuda_err("capturing the encoder's graph"));
        launched?;
        graph?
            .map(Graph)
            .ok_or_else(|| Error::Cuda("the encoder's graph capture recorded nothing".into()))
    }

    /// Validates the batch against the model and the workspace, and uploads ids and offsets.
    fn prepare(&mut self, batch: &PackedBatch) -> Result<Shape> {
        let shape = self.validate(batch)?;
        self.stream
            .context()
            .bind_to_thread()
            .map_err(cuda_err("binding the context"))?;
        if shape.sequences == 0 {
            return Ok(shape);
        }
        self.host_offsets.clear();
        self.host_offsets
            .extend(batch.offsets.iter().map(|&o| o as u32));
        let what = "copying the batch to the device";
        let n = self.host_offsets.len();
        self.stream
            .memcpy_htod(&self.host_offsets, &mut self.ws.offsets.slice_mut(..n))
            .map_err(cuda_err(what))?;
        let t = shape.tokens;
        if t > 0 {
            self.stream
                .memcpy_htod(&batch.ids, &mut self.ws.ids.slice_mut(..t))
                .map_err(cuda_err(what))?;
            self.stream
                .memcpy_htod(&batch.type_ids, &mut self.ws.type_ids.slice_mut(..t))
                .map_err(cuda_err(what))?;
        }
        Ok(shape)
    }

    fn validate(&self, batch: &PackedBatch) -> Result<Shape> {
        let cfg = &self.cfg;
        let bad = |msg: String| Err(Error::InvalidArgument(msg));
        let t = batch.ids.len();
        if batch.offsets.first() != Some(&0)
            || batch.offsets.last() != Some(&t)
            || batch.offsets.windows(2).any(|w| w[0] > w[1])
        {
            return bad("packed batch offsets are inconsistent".into());
        }
        if batch.type_ids.len() != t {
            return bad("type ids and token ids differ in length".into());
        }
        let sequences = batch.offsets.len() - 1;
        if t > self.max_tokens {
            return bad(format!(
                "batch of {t} tokens exceeds the GPU workspace ({} tokens); split it or build \
                 GpuBert with a larger max_tokens",
                self.max_tokens
            ));
        }
        if sequences > self.max_sequences {
            return bad(format!(
                "batch of {sequences} sequences exceeds the GPU workspace ({} sequences)",
                self.max_sequences
            ));
        }
        let (mut max_len, mut sum_len_sq) = (0usize, 0f64);
        for w in batch.offsets.windows(2) {
            let len = w[1] - w[0];
            if len > cfg.max_position_embeddings {
                return bad(format!(
                    "sequence of {len} tokens exceeds max_position_embeddings {}",
                    cfg.max_position_embeddings
                ));
            }
            max_len = max_len.max(len);
            sum_len_sq += (len * len) as f64;
        }
        if let Some(&id) = batch.ids.iter().find(|&&id| id as usize >= cfg.vocab_size) {
            return bad(format!(
                "token id {id} is outside the vocabulary ({} entries)",
                cfg.vocab_size
            ));
        }
        if let Some(&ty) = batch
            .type_ids
            .iter()
            .find(|&&ty| ty as usize >= cfg.type_vocab_size)
        {
            return bad(format!(
                "token type {ty} is outside type_vocab_size {}",
                cfg.type_vocab_size
            ));
        }
        Ok(Shape {
            tokens: t,
            sequences,
            max_len,
            sum_len_sq,
        })
    }

    fn download(&self, src: &CudaSlice<f32>, dst: &mut [f32]) -> Result<()> {
        self.stream
            .memcpy_dtoh(&src.slice(..dst.len()), dst)
            .map_err(cuda_err("copying the result to the host"))?;
        // Surfaces any fault of the queued kernels as an error of this call.
        self.stream
            .synchronize()
            .map_err(cuda_err("running the encoder"))
    }

    /// The whole encoder on the uploaded batch (`tokens > 0`); the last hidden states end in
    /// `ws.x`.
    fn encode(&self, s: &Shape) -> Result<()> {
        self.launch_embed(s)?;
        for l in 0..self.w.layers.len() {
            self.layer(l, s)?;
        }
        Ok(())
    }

    fn layer(&self, l: usize, s: &Shape) -> Result<()> {
        let (h, inter, t) = (self.cfg.hidden_size, self.cfg.intermediate_size, s.tokens);
        let lw = &self.w.layers[l];
        let st = &*self.stream;
        let ws = &self.ws;
        let x_in = self.gemm_input(&ws.x, &ws.x_bf);
        let x1_in = self.gemm_input(&ws.x1, &ws.x1_bf);
        // attention block: x1 = LN(ctx · Woᵀ + bo + x)
        self.gemm(Gemm::Qkv, x_in, &lw.qkv_w, ws.qkv.ptr(st), t, h, 3 * h)?;
        self.launch_attention(l, s)?;
        self.gemm(
            Gemm::AttnOut,
            ws.ctx.ptr(st),
            &lw.attn_out_w,
            ptr(&ws.x1, st),
            t,
            h,
            h,
        )?;
        self.launch_add_ln(
            &ws.x1,
            &lw.attn_out_b,
            &ws.x,
            (&lw.attn_ln_g, &lw.attn_ln_b),
            &ws.x1_bf,
            t,
        )?;
        // FFN block: x = LN(GELU(x1 · Wiᵀ + bi) · Wo2ᵀ + bo2 + x1)
        self.gemm(Gemm::Inter, x1_in, &lw.inter_w, ws.mid.ptr(st), t, h, inter)?;
        self.launch_gelu(l, t)?;
        self.gemm(
            Gemm::Out,
            ws.mid.ptr(st),
            &lw.out_w,
            ptr(&ws.x, st),
            t,
            inter,
            h,
        )?;
        self.launch_add_ln(
            &ws.x,
            &lw.out_b,
            &ws.x1,
            (&lw.out_ln_g, &lw.out_ln_b),
            &ws.x_bf,
            t,
        )
    }

    /// The GEMM operand of an f32 activation: itself, or its bf16 copy on the bf16 path.
    fn gemm_input(&self, f: &CudaSlice<f32>, bf: &Option<CudaSlice<u16>>) -> u64 {
        match bf {
            Some(b) => ptr(b, &self.stream),
            None => ptr(f, &self.stream),
        }
    }

    /// `y[rows × out] = x[rows × inp] · Wᵀ` (row-major, W `[out × inp]`; see the module docs
    /// for the column-major mapping). On the bf16 path x and W are bf16 and y is bf16 for the
    /// QKV and FFN-input GEMMs (read by attention / GELU), f32 for the two GEMMs whose output
    /// feeds a LayerNorm.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        which: Gemm,
        x: u64,
        w: &DMat,
        y: u64,
        rows: usize,
        inp: usize,
        out: usize,
    ) -> Result<()> {
        use blas_sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        let (m, n, k) = (out as i32, rows as i32, inp as i32);
        let (alpha, beta) = (1.0f32, 0.0f32);
        let handle = *self.blas.handle();
        let wp = w.ptr(&self.stream);
        // SAFETY: the pointers address live workspace / weight buffers of at least rows × inp,
        // out × inp and rows × out elements of the types given (sizes fixed at construction,
        // rows ≤ max_tokens checked by validate).
        let r = unsafe {
            match self.precision {
                Precision::F32 => blas::sgemm(
                    handle,
                    CUBLAS_OP_T,
                    CUBLAS_OP_N,
                    m,
                    n,
                    k,
                    &alpha,
                    wp as *const f32,
                    k,
                    x as *const f32,
                    k,
                    &beta,
                    y as *mut f32,
                    m,
                ),
                Precision::Bf16 => {
                    use blas_sys::cudaDataType_t::{CUDA_R_16BF, CUDA_R_32F};
                    let y_type = match which {
                        Gemm::Qkv | Gemm::Inter => CUDA_R_16BF,
                        Gemm::AttnOut | Gemm::Out => CUDA_R_32F,
                    };
                    blas::gemm_ex(
                        handle,
                        CUBLAS_OP_T,
                        CUBLAS_OP_N,
                        m,
                        n,
                        k,
                        (&alpha) as *const f32 as *const _,
                        wp as *const _,
                        CUDA_R_16BF,
                        k,
                        x as *const _,
                        CUDA_R_16BF,
                        k,
                        (&beta) as *const f32 as *const _,
                        y as *mut _,
                        y_type,
                        m,
                        blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    )
                }
            }
        };
        r.map_err(|e| Error::Cuda(format!("cuBLAS GEMM ({}): {e}", which.name())))
    }

    fn launch_embed(&self, s: &Shape) -> Result<()> {
        let st = &*self.stream;
        let (ws, w) = (&self.ws, &self.w);
        let (ids, types, offs) = (
            ptr(&ws.ids, st),
            ptr(&ws.type_ids, st),
            ptr(&ws.offsets, st),
        );
        let (seqs, toks, h) = (
            s.sequences as i32,
            s.tokens as i32,
            self.cfg.hidden_size as i32,
        );
        let (we, pe, te) = (
            ptr(&w.word_emb, st),
            ptr(&w.pos_emb, st),
            ptr(&w.type_emb, st),
        );
        let (g, b) = (ptr(&w.emb_ln_g, st), ptr(&w.emb_ln_b, st));
        let eps = self.cfg.layer_norm_eps as f32;
        let out = ptr(&ws.x, st);
        let out_bf = ws.x_bf.as_ref().map_or(0, |b| ptr(b, st));
        let mut l = st.launch_builder(&self.k.embed.0);
        l.arg(&ids).arg(&types).arg(&offs).arg(&seqs).arg(&toks);
        l.arg(&we)
            .arg(&pe)
            .arg(&te)
            .arg(&g)
            .arg(&b)
            .arg(&eps)
            .arg(&h);
        l.arg(&out).arg(&out_bf);
        let rows_per_block = ROW_KERNEL_THREADS / 32;
        // SAFETY: the kernel reads `tokens` ids / type ids (validated against the tables),
        // `sequences + 1` offsets and table rows, and writes `tokens × h` outputs, all inside
        // the workspace.
        unsafe { l.launch(grid1(s.tokens as u32, rows_per_block, ROW_KERNEL_THREADS)) }
            .map_err(cuda_err("launching rrra_embed_layernorm"))?;
        Ok(())
    }

    fn launch_attention(&self, layer: usize, s: &Shape) -> Result<()> {
        let st = &*self.stream;
        self.k.attention.launch(
            st,
            &self.cfg,
            self.ws.qkv.ptr(st),
            ptr(&self.w.layers[layer].qkv_b, st),
            ptr(&self.ws.offsets, st),
            s.sequences,
            s.max_len,
            self.ws.ctx.ptr(st),
        )
    }

    fn launch_add_ln(
        &self,
        x: &CudaSlice<f32>,
        bias: &CudaSlice<f32>,
        residual: &CudaSlice<f32>,
        (gamma, beta): (&CudaSlice<f32>, &CudaSlice<f32>),
        out_bf: &Option<CudaSlice<u16>>,
        rows: usize,
    ) -> Result<()> {
        let st = &*self.stream;
        let (xp, bp, rp) = (ptr(x, st), ptr(bias, st), ptr(residual, st));
        let (gp, betap) = (ptr(gamma, st), ptr(beta, st));
        let obf = out_bf.as_ref().map_or(0, |b| ptr(b, st));
        let eps = self.cfg.layer_norm_eps as f32;
        let (r, h) = (rows as i32, self.cfg.hidden_size as i32);
        let mut l = st.launch_builder(&self.k.add_ln.0);
        l.arg(&xp).arg(&bp).arg(&rp).arg(&gp).arg(&betap).arg(&eps);
        l.arg(&r).arg(&h).arg(&obf);
        let rows_per_block = ROW_KERNEL_THREADS / 32;
        // SAFETY: reads and writes `rows × h` elements of workspace buffers sized for max_tokens.
        unsafe { l.launch(grid1(rows as u32, rows_per_block, ROW_KERNEL_THREADS)) }
            .map_err(cuda_err("launching rrra_add_layernorm"))?;
        Ok(())
    }

    fn launch_gelu(&self, layer: usize, rows: usize) -> Result<()> {
        let st = &*self.stream;
        let y = self.ws.mid.ptr(st);
        let b = ptr(&self.w.layers[layer].inter_b, st);
        let cols = self.cfg.intermediate_size;
        let (r, c) = (rows as i32, cols as i32);
        let threads = (cols.div_ceil(4).div_ceil(32) * 32).clamp(32, 256) as u32;
        let mut l = st.launch_builder(&self.k.gelu.0);
        l.arg(&y).arg(&b).arg(&r).arg(&c);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: one block per row of the `rows × cols` FFN activation in the workspace.
        unsafe { l.launch(cfg) }.map_err(cuda_err("launching rrra_bias_gelu"))?;
        Ok(())
    }

    fn launch_pool(&self, s: &Shape, pooling: Pooling, normalize: bool) -> Result<()> {
        let st = &*self.stream;
        let f = match pooling {
            Pooling::Mean => &self.k.pool_mean,
            Pooling::Cls => &self.k.pool_cls,
            Pooling::Max => &self.k.pool_max,
        };
        let (hidden, offs, out) = (
            ptr(&self.ws.x, st),
            ptr(&self.ws.offsets, st),
            ptr(&self.ws.pooled, st),
        );
        let (seqs, h, norm) = (
            s.sequences as i32,
            self.cfg.hidden_size as i32,
            normalize as i32,
        );
        let mut l = st.launch_builder(f);
        l.arg(&hidden)
            .arg(&offs)
            .arg(&seqs)
            .arg(&h)
            .arg(&norm)
            .arg(&out);
        let cfg = LaunchConfig {
            grid_dim: (s.sequences as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: one block per sequence; reads its rows of the hidden states, writes its pooled
        // row; sequences ≤ max_sequences.
        unsafe { l.launch(cfg) }.map_err(cuda_err("launching rrra_pool"))?;
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum Gemm {
    Qkv,
    AttnOut,
    Inter,
    Out,
}

impl Gemm {
    fn name(self) -> &'static str {
        match self {
            Gemm::Qkv => "QKV projection",
            Gemm::AttnOut => "attention output",
            Gemm::Inter => "FFN input",
            Gemm::Out => "FFN output",
        }
    }
}

/// `items` rows, `per_block` of them per block of `threads` threads.
fn grid1(items: u32, per_block: u32, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (items.div_ceil(per_block).max(1), 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// What the kernels support: hidden ≤ 1024 and a multiple of 8 (vector accesses), head dim ≤ 128.
pub(crate) fn check_config(cfg: &BertConfig) -> Result<()> {
    let (h, heads) = (cfg.hidden_size, cfg.num_attention_heads);
    if h == 0 || heads == 0 || h % heads != 0 {
        return Err(Error::InvalidArgument(format!(
            "hidden_size {h} is not a positive multiple of num_attention_heads {heads}"
        )));
    }
    if h > MAX_HIDDEN || h % 8 != 0 {
        return Err(Error::InvalidArgument(format!(
            "the GPU encoder needs hidden_size <= {MAX_HIDDEN} and a multiple of 8, got {h}"
        )));
    }
    if cfg.head_dim() > MAX_HEAD_DIM {
        return Err(Error::InvalidArgument(format!(
            "the GPU encoder needs a head dim <= {MAX_HEAD_DIM}, got {}",
            cfg.head_dim()
        )));
    }
    if cfg.intermediate_size == 0 || cfg.max_position_embeddings == 0 || cfg.vocab_size == 0 {
        return Err(Error::InvalidArgument(
            "intermediate_size, max_position_embeddings and vocab_size must be positive".into(),
        ));
    }
    Ok(())
}

fn upload_weights(
    stream: &Arc<CudaStream>,
    bert: &Bert,
    precision: Precision,
) -> Result<DeviceWeights> {
    let w = &bert.weights;
    let (h, i) = (bert.cfg.hidden_size, bert.cfg.intermediate_size);
    let shapes_ok = w.word_emb.len() == bert.cfg.vocab_size * h
        && w.pos_emb.len() == bert.cfg.max_position_embeddings * h
        && w.type_emb.len() == bert.cfg.type_vocab_size * h
        && w.emb_ln_g.len() == h
        && w.emb_ln_b.len() == h
        && w.layers.len() == bert.cfg.num_hidden_layers
        && w.layers.iter().all(|l| {
            l.qkv_w.len() == 3 * h * h
                && l.qkv_b.len() == 3 * h
                && l.attn_out_w.len() == h * h
                && [
                    &l.attn_out_b,
                    &l.attn_ln_g,
                    &l.attn_ln_b,
                    &l.out_b,
                    &l.out_ln_g,
                ]
                .iter()
                .all(|v| v.len() == h)
                && l.out_ln_b.len() == h
                && l.inter_w.len() == i * h
                && l.inter_b.len() == i
                && l.out_w.len() == h * i
        });
    if !shapes_ok {
        return Err(Error::InvalidArgument(
            "the model's weights do not match its configuration".into(),
        ));
    }
    let m = |x: &[f32]| DMat::upload(stream, precision, x);
    let v = |x: &[f32]| upload_f32(stream, x);
    let layers = w
        .layers
        .iter()
        .map(|l| {
            Ok(DeviceLayer {
                qkv_w: m(&l.qkv_w)?,
                qkv_b: v(&l.qkv_b)?,
                attn_out_w: m(&l.attn_out_w)?,
                attn_out_b: v(&l.attn_out_b)?,
                attn_ln_g: v(&l.attn_ln_g)?,
                attn_ln_b: v(&l.attn_ln_b)?,
                inter_w: m(&l.inter_w)?,
                inter_b: v(&l.inter_b)?,
                out_w: m(&l.out_w)?,
                out_b: v(&l.out_b)?,
                out_ln_g: v(&l.out_ln_g)?,
                out_ln_b: v(&l.out_ln_b)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(DeviceWeights {
        word_emb: v(&w.word_emb)?,
        pos_emb: v(&w.pos_emb)?,
        type_emb: v(&w.type_emb)?,
        emb_ln_g: v(&w.emb_ln_g)?,
        emb_ln_b: v(&w.emb_ln_b)?,
        layers,
    })
}

fn allocate_workspace(
    stream: &Arc<CudaStream>,
    cfg: &BertConfig,
    precision: Precision,
    max_tokens: usize,
    max_sequences: usize,
) -> Result<Workspace> {
    let (t, h, i) = (max_tokens, cfg.hidden_size, cfg.intermediate_size);
    let bf = |n: usize| -> Result<Option<CudaSlice<u16>>> {
        match precision {
            Precision::F32 => Ok(None),
            Precision::Bf16 => Ok(Some(alloc(stream, n)?)),
        }
    };
    Ok(Workspace {
        ids: alloc(stream, t)?,
        type_ids: alloc(stream, t)?,
        offsets: alloc(stream, max_sequences + 1)?,
        x: alloc(stream, t * h)?,
        x1: alloc(stream, t * h)?,
        x_bf: bf(t * h)?,
        x1_bf: bf(t * h)?,
        qkv: DMat::zeros(stream, precision, t * 3 * h)?,
        ctx: DMat::zeros(stream, precision, t * h)?,
        mid: DMat::zeros(stream, precision, t * i)?,
        pooled: alloc(stream, max_sequences * h)?,
        _cublas: alloc(stream, CUBLAS_WORKSPACE_BYTES)?,
    })
}

// ---------------------------------------------------------------------------------------------
// Benchmark
// ---------------------------------------------------------------------------------------------

/// Times the encoder on an H200-sized workload: a random BERT-base (12 × 768, FFN 3072) on
/// 128 sequences × 128 tokens and 32 × 512, bf16 and f32 — the whole forward pass (FLOPs =
/// 2 · tokens · GEMM weights + attention's 4 · Σ len² · h per layer) and each kernel family on
/// those shapes (bytes = what it must move) — and the batch-1 latency of encoding one 16-token
/// query with an all-MiniLM-L6-v2-shaped model (upload, forward, mean pool, L2, download).
pub fn bench(gpu: &Gpu) -> Result<Vec<KernelTiming>> {
    let mut out = Vec::new();
    let base = random_bert(bert_base_config(), 42);
    for (seqs, len) in [(128usize, 128usize), (32, 512)] {
        let batch = batch_with_lengths(&base.cfg, &vec![len; seqs], 7);
        for precision in [Precision::Bf16, Precision::F32] {
            let mut m = GpuBert::new(gpu, &base, precision, seqs * len, seqs)?;
            m.bench_shape(gpu, &batch, &format!("BERT-base {seqs} x {len}"), &mut out)?;
        }
    }
    let mini = random_bert(minilm_l6_config(), 43);
    let query = batch_with_lengths(&mini.cfg, &[16], 9);
    for precision in [Precision::Bf16, Precision::F32] {
        let mut m = GpuBert::new(gpu, &mini, precision, 512, 64)?;
        let ms = gpu.time_ms(50, || m.embed(&query, Pooling::Mean, true).map(|_| ()))?;
        let shape = m.validate(&query)?;
        out.push(KernelTiming {
            name: "query encode (upload, 6 layers, mean pool, L2, download)".into(),
            shape: format!("MiniLM-L6 1 x 16 tokens, {precision}"),
            ms,
            bytes: (gemm_parameters(&mini.cfg) * precision.elem_bytes()) as f64,
            flops: m.forward_flops(&shape),
        });
    }
    Ok(out)
}

impl GpuBert {
    fn forward_flops(&self, s: &Shape) -> f64 {
        let attn = 4.0 * s.sum_len_sq * self.cfg.hidden_size as f64;
        2.0 * s.tokens as f64 * gemm_parameters(&self.cfg) as f64
            + attn * self.cfg.num_hidden_layers as f64
    }

    fn bench_shape(
        &mut self,
        gpu: &Gpu,
        batch: &PackedBatch,
        what: &str,
        out: &mut Vec<KernelTiming>,
    ) -> Result<()> {
        let p = self.precision;
        let shape = self.prepare(batch)?;
        let (t, h, i) = (
            shape.tokens as f64,
            self.cfg.hidden_size as f64,
            self.cfg.intermediate_size as f64,
        );
        let sz = p.elem_bytes() as f64;
        let label = format!("{what}, {p}");
        let mut push = |name: &str, ms: f64, bytes: f64, flops: f64| {
            out.push(KernelTiming {
                name: name.into(),
                shape: label.clone(),
                ms,
                bytes,
                flops,
            })
        };
        let reps = if p == Precision::F32 { 5 } else { 10 };
        let ms = gpu.time_ms(reps, || self.encode(&shape))?;
        push(
            "encoder forward (embeddings + all layers)",
            ms,
            (gemm_parameters(&self.cfg) * p.elem_bytes()) as f64,
            self.forward_flops(&shape),
        );

        // Kernel families, each on layer 0's weights and the activations the forward left.
        let reps = 20;
        let bf_copy = if p == Precision::Bf16 { 2.0 } else { 0.0 };
        let ms = gpu.time_ms(reps, || self.launch_embed(&shape))?;
        push(&self.k.embed.1.clone(), ms, t * h * (8.0 + bf_copy), 0.0);

        let st = self.stream.clone();
        let ws = &self.ws;
        let lw = &self.w.layers[0];
        let x_in = self.gemm_input(&ws.x, &ws.x_bf);
        let x1_in = self.gemm_input(&ws.x1, &ws.x1_bf);
        let gemm_name = match p {
            Precision::F32 => "cublasSgemm",
            Precision::Bf16 => "cublasGemmEx bf16 (f32 acc.)",
        };
        let gemms = [
            (Gemm::Qkv, x_in, &lw.qkv_w, ws.qkv.ptr(&st), h, 3.0 * h),
            (
                Gemm::AttnOut,
                ws.ctx.ptr(&st),
                &lw.attn_out_w,
                ptr(&ws.x1, &st),
                h,
                h,
            ),
            (Gemm::Inter, x1_in, &lw.inter_w, ws.mid.ptr(&st), h, i),
            (Gemm::Out, ws.mid.ptr(&st), &lw.out_w, ptr(&ws.x, &st), i, h),
        ];
        for (which, x, w, y, inp, outd) in gemms {
            let ms = gpu.time_ms(reps, || {
                self.gemm(which, x, w, y, shape.tokens, inp as usize, outd as usize)
            })?;
            push(
                &format!("{gemm_name} {} {inp}->{outd}", which.name()),
                ms,
                (t * inp + inp * outd + t * outd) * sz,
                2.0 * t * inp * outd,
            );
        }

        let ms = gpu.time_ms(reps, || self.launch_attention(0, &shape))?;
        push(
            &self.k.attention.name.clone(),
            ms,
            t * 4.0 * h * sz,
            4.0 * shape.sum_len_sq * h,
        );
        let ms = gpu.time_ms(reps, || {
            self.launch_add_ln(
                &ws.x1,
                &lw.attn_out_b,
                &ws.x,
                (&lw.attn_ln_g, &lw.attn_ln_b),
                &ws.x1_bf,
                shape.tokens,
            )
        })?;
        push(&self.k.add_ln.1.clone(), ms, t * h * (12.0 + bf_copy), 0.0);
        let ms = gpu.time_ms(reps, || self.launch_gelu(0, shape.tokens))?;
        push(&self.k.gelu.1.clone(), ms, t * i * 2.0 * sz, 0.0);
        let ms = gpu.time_ms(reps, || self.launch_pool(&shape, Pooling::Mean, true))?;
        push(
            "rrra_pool_mean_f32 (+ L2)",
            ms,
            (t + shape.sequences as f64) * h * 4.0,
            0.0,
        );
        gpu.synchronize()
    }
}
