//! Exact top-k by inner product on the GPU, with the CPU's results and order.
//!
//! * [`GpuCorpus`]: a corpus uploaded once, in its own element type (f32, f16 or bf16).
//! * [`GpuSearcher`]: every device buffer the query path needs, allocated by
//!   [`GpuSearcher::new`] (and, for buffers whose size depends on the vector dimension, by the
//!   first search of that dimension, or ahead of time by [`GpuSearcher::reserve`]). Searches after
//!   that allocate nothing on the device: they upload the queries into the reserved buffers, run
//!   kernels, and copy the results into a reserved host buffer; the returned `Vec<Vec<Hit>>` is
//!   the only allocation. [`GpuSearcher::device_allocations`] counts every allocation the searcher
//!   has made, so a caller (and the tests) can check that.
//! * [`GpuSearcher::search_streamed`]: the same search over a corpus in host memory (e.g. a
//!   memory-mapped [`Store`](crate::index::Store) larger than the GPU), copied in chunks through
//!   two pinned staging buffers and two device buffers on a copy stream, so that the upload of
//!   chunk i+1 overlaps the scoring of chunk i (events order the two streams).
//!
//! The kernels and their design are described in `kernels/topk.cu`. In short: the corpus is
//! scored in chunks that grow geometrically; each score becomes a 64-bit key (score bits, then the
//! inverted row index) whose order is exactly [`hit_order`], and only keys that beat the running
//! k-th best are kept; a per-query radix select then keeps the k best, and a final bitonic sort
//! orders them. So results follow the CPU convention (score descending, NaN last, then index
//! ascending), ties included, and the returned hit count is `min(k, rows)` like
//! [`search_batch`](crate::index::search_batch).
//!
//! Arithmetic: scores are fp32 sums of exact products (f16/bf16 rows are converted exactly; on
//! the tensor-core path each query is split into three 16-bit terms that represent it to 2⁻²⁴),
//! so they differ from the CPU's only by summation order. [`CpuCheck`] turns that into a test
//! tolerance.
//!
//! Limits: k ≤ [`MAX_K`] (10 000) after clamping to the corpus size; fewer than 2³² − 1 rows;
//! f16/bf16 scores on the tensor-core path (more than 8 queries) can be NaN where the CPU has ±inf
//! when a row holds an infinity (the split query has zero terms); finite corpora are unaffected.

use super::runtime::{
    allow_smem, cuda_err, launch_cfg, round_up, to_i32, to_u32, DevBuf, Gpu, KernelTiming,
};
use crate::error::{Error, Result};
use crate::index::synthetic::random_unit_vectors;
use crate::index::{hit_order, Corpus, Dtype, Hit, Vectors};
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{
    result as cu, CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr,
    PinnedHostSlice, PushKernelArg,
};
use rayon::prelude::*;
use std::sync::Arc;

/// The largest k a search accepts (after clamping k to the corpus size).
pub const MAX_K: usize = 10_000;

const MODULE: &str = "topk";
/// Rows of the first chunk of a search (at least; 4k when larger): enough for a k-th best that
/// filters the following chunks well, small enough that keeping all its candidates is cheap.
const FIRST_ROWS: usize = 16_384;
/// Up to this many queries the SIMT streaming kernel scores (in passes of at most 8 queries)...
const SIMT_MAX_QUERIES_F32: usize = 24;
const SIMT_MAX_QUERIES_16BIT: usize = 8;
/// ... beyond, f32 corpora use the FP32 tiled kernel and f16/bf16 corpora the tensor cores.
const SIMT_THREADS: u32 = 256;
/// Shared memory kept free of queries in the SIMT kernels (their static part is ~128 bytes).
const SIMT_STATIC_SMEM: usize = 1024;
const TC_BM: usize = 256;
const TC_BN: usize = 32;
const TC_BK: usize = 32;
const TC_THREADS: u32 = 256;
const TC_SMEM: usize = 84_480;
const G_BM: usize = 128;
const G_BN: usize = 64;
const G_BK: usize = 16;
const G_THREADS: u32 = 256;
const SEL_THREADS: u32 = 1024;
const SEL_SMEM: usize = 12_288 * 8;
/// Bytes per piece when the host copies corpus rows into a pinned staging buffer (in parallel).
const HOST_COPY_PIECE: usize = 4 << 20;

// ---------------------------------------------------------------------------------------------
// Small helpers

fn dtype_index(d: Dtype) -> usize {
    match d {
        Dtype::F32 => 0,
        Dtype::F16 => 1,
        Dtype::Bf16 => 2,
    }
}

/// The rows of `v` as bytes, in place.
fn vector_bytes<'a>(v: &Vectors<'a>) -> &'a [u8] {
    let (ptr, len) = match v {
        Vectors::F32(s) => (s.as_ptr() as *const u8, std::mem::size_of_val(*s)),
        Vectors::F16(s) => (s.as_ptr() as *const u8, std::mem::size_of_val(*s)),
        Vectors::Bf16(s) => (s.as_ptr() as *const u8, std::mem::size_of_val(*s)),
    };
    // SAFETY: f32, f16 and bf16 are plain bit patterns without padding; the bytes are borrowed
    // for as long as the typed slice is.
    unsafe { std::slice::from_raw_parts(ptr, len) }
}

/// Inverse of the kernels' key: score from the high 32 bits (NaN as 0, -0.0 folded into 0.0, as
/// the CPU's packing does), row from the inverted low 32 bits.
fn decode(key: u64) -> Hit {
    let asc = (key >> 32) as u32;
    let score = if asc == 0 {
        f32::NAN
    } else if asc >> 31 == 1 {
        f32::from_bits(asc & 0x7FFF_FFFF)
    } else {
        f32::from_bits(!asc)
    };
    Hit {
        index: (!(key as u32)) as usize,
        score,
    }
}

/// Rows of the next chunk: the first is small (its k-th best becomes the filter), later ones
/// 3× what was seen, so each passes ~3k candidates per query whatever the corpus size.
fn chunk_len(seen: usize, remaining: usize, k: usize, cap: usize) -> usize {
    let want = if seen == 0 {
        (4 * k).max(FIRST_ROWS)
    } else {
        3 * seen
    };
    want.min(cap).min(remaining).max(1)
}

/// Which scoring kernel a batch of `nq` queries against `dtype` rows uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Simt,
    TensorCore,
    Gemm,
}

fn path_for(dtype: Dtype, nq: usize) -> Path {
    match dtype {
        Dtype::F32 if nq <= SIMT_MAX_QUERIES_F32 => Path::Simt,
        Dtype::F32 => Path::Gemm,
        _ if nq <= SIMT_MAX_QUERIES_16BIT => Path::Simt,
        _ => Path::TensorCore,
    }
}

/// Queries per SIMT pass: the kernel variants take 1, 4 or 8.
fn simt_width(remaining: usize) -> usize {
    match remaining {
        1 => 1,
        2..=4 => 4,
        _ => 8,
    }
}

/// Floats of shared memory one SIMT query needs: the dimension padded to the kernel's step.
fn simt_dpad(dim: usize, dtype: Dtype) -> usize {
    let es = dtype.size();
    let step = if (dim * es).is_multiple_of(16) {
        32 * (16 / es)
    } else {
        32
    };
    round_up(dim, step)
}

/// The name of the kernel that scores `nq` queries against `dtype` rows (for benchmark tables).
pub fn scoring_kernel(dtype: Dtype, nq: usize) -> String {
    match path_for(dtype, nq) {
        Path::Simt => format!(
            "rrra_topk_score_{}_q{}",
            dtype.name(),
            simt_width(nq.clamp(1, 8))
        ),
        Path::TensorCore => format!("rrra_topk_score_tc_{}", dtype.name()),
        Path::Gemm => "rrra_topk_score_f32_gemm".to_string(),
    }
}

/// Every kernel of the module, loaded once.
struct Kernels {
    simt: Vec<[CudaFunction; 3]>, // [dtype][1, 4, 8 queries]
    tc: [CudaFunction; 2],        // f16, bf16
    split: [CudaFunction; 2],
    gemm: CudaFunction,
    transpose: CudaFunction,
    select: CudaFunction,
    sort: CudaFunction,
}

impl Kernels {
    fn load(gpu: &Gpu) -> Result<Kernels> {
        let f = |name: &str| gpu.function(MODULE, name);
        let mut simt = Vec::new();
        for d in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
            let n = d.name();
            simt.push([
                f(&format!("rrra_topk_score_{n}_q1"))?,
                f(&format!("rrra_topk_score_{n}_q4"))?,
                f(&format!("rrra_topk_score_{n}_q8"))?,
            ]);
        }
        Ok(Kernels {
            simt,
            tc: [f("rrra_topk_score_tc_f16")?, f("rrra_topk_score_tc_bf16")?],
            split: [
                f("rrra_topk_split_queries_f16")?,
                f("rrra_topk_split_queries_bf16")?,
            ],
            gemm: f("rrra_topk_score_f32_gemm")?,
            transpose: f("rrra_topk_transpose_queries")?,
            select: f("rrra_topk_select")?,
            sort: f("rrra_topk_sort")?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Corpus on the device

/// A corpus in device memory, in its stored element type (row-major `rows × dim`).
pub struct GpuCorpus {
    data: CudaSlice<u8>,
    ptr: u64,
    dtype: Dtype,
    dim: usize,
    rows: usize,
}

impl GpuCorpus {
    /// Copies `corpus` to the device. Errors: an empty or malformed corpus, or one of 2³² − 1
    /// rows or more (`InvalidArgument`); a failed allocation or copy (`Cuda`).
    pub fn upload(gpu: &Gpu, corpus: &Corpus) -> Result<GpuCorpus> {
        corpus.validate()?;
        let rows = corpus.len();
        check_rows(rows)?;
        let bytes = vector_bytes(&corpus.vectors);
        let stream = gpu.stream();
        // SAFETY: fully written by the copy below before any use.
        let mut data = unsafe { stream.alloc::<u8>(bytes.len()) }
            .map_err(cuda_err("allocating the corpus"))?;
        stream
            .memcpy_htod(bytes, &mut data)
            .map_err(cuda_err("uploading the corpus"))?;
        let ptr = {
            let (p, _record) = data.device_ptr(stream);
            p
        };
        // Done before returning: other streams (one per worker) read the corpus.
        stream
            .synchronize()
            .map_err(cuda_err("uploading the corpus"))?;
        Ok(GpuCorpus {
            data,
            ptr,
            dtype: corpus.vectors.dtype(),
            dim: corpus.dim,
            rows,
        })
    }

    /// `rows` random unit vectors generated on the device (a hash per element: deterministic for
    /// a seed, but not the values of [`random_unit_vectors`]); for benchmarks of corpora too large
    /// to generate on the host.
    pub fn synthetic(
        gpu: &Gpu,
        rows: usize,
        dim: usize,
        dtype: Dtype,
        seed: u64,
    ) -> Result<GpuCorpus> {
        if dim == 0 {
            return Err(Error::InvalidArgument(
                "corpus dimension must be positive".into(),
            ));
        }
        check_rows(rows)?;
        let len = rows
            .checked_mul(dim)
            .and_then(|n| n.checked_mul(dtype.size()))
            .ok_or_else(|| Error::InvalidArgument("corpus size overflows".into()))?;
        let stream = gpu.stream();
        // SAFETY: every element is written by the generator kernel.
        let data = unsafe { stream.alloc::<u8>(len) }.map_err(cuda_err("allocating the corpus"))?;
        let ptr = {
            let (p, _record) = data.device_ptr(stream);
            p
        };
        let f = gpu.function(MODULE, &format!("rrra_topk_synth_{}", dtype.name()))?;
        let (rows_i, dim_i) = (rows as i64, to_i32(dim, "dimension")?);
        let blocks = rows
            .div_ceil(8)
            .min(gpu.info().multiprocessors.max(1) as usize * 16);
        // SAFETY: arguments match the kernel's (void*, long long, int, unsigned long long).
        unsafe {
            stream
                .launch_builder(&f)
                .arg(&ptr)
                .arg(&rows_i)
                .arg(&dim_i)
                .arg(&seed)
                .launch(launch_cfg(blocks, 256, 0)?)
        }
        .map_err(cuda_err("launching rrra_topk_synth"))?;
        stream
            .synchronize()
            .map_err(cuda_err("generating the corpus"))?;
        Ok(GpuCorpus {
            data,
            ptr,
            dtype,
            dim,
            rows,
        })
    }

    pub fn len(&self) -> usize {
        self.rows
    }
    /// Always false: an empty corpus cannot be uploaded.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }
    pub fn dim(&self) -> usize {
        self.dim
    }
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }
    /// Bytes of device memory the rows take.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }
    /// The device address of row 0 (rows are `dim` elements of `dtype`, back to back).
    pub(crate) fn device_ptr(&self) -> u64 {
        self.ptr
    }

    /// The raw element bits back on the host (16-bit types only; for benchmarks).
    fn download_u16(&self, gpu: &Gpu) -> Result<Vec<u16>> {
        let mut v = vec![0u16; self.data.len() / 2];
        gpu.context()
            .bind_to_thread()
            .map_err(cuda_err("binding the context"))?;
        // SAFETY: `v` holds exactly the buffer's bytes and lives until the stream is synchronised.
        unsafe { cu::memcpy_dtoh_async(&mut v[..], self.ptr, gpu.stream().cu_stream()) }
            .map_err(cuda_err("downloading the corpus"))?;
        gpu.synchronize()?;
        Ok(v)
    }
}

fn check_rows(rows: usize) -> Result<()> {
    if rows == 0 {
        return Err(Error::InvalidArgument(
            "the corpus is empty: there is nothing to search".into(),
        ));
    }
    // Row indices are stored inverted in 32 bits; u32::MAX is reserved for padding.
    if rows >= u32::MAX as usize {
        return Err(Error::InvalidArgument(format!(
            "a corpus of {rows} rows is beyond the 2^32 - 1 rows GPU search supports"
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Searcher

/// Host and device staging for streamed search.
struct Staging {
    copy: Arc<CudaStream>,
    host: [PinnedHostSlice<u8>; 2],
    dev: [DevBuf<u8>; 2],
    /// Recorded on the copy stream after each upload from `host[b]` into `dev[b]`.
    copied: [CudaEvent; 2],
    /// Recorded on the compute stream after the last kernel that reads `dev[b]`.
    consumed: [CudaEvent; 2],
    bytes: usize,
    turn: usize,
}

/// The reusable state of GPU top-k search: kernels, candidate lists, query buffers.
///
/// Per query the searcher keeps two candidate lists of `max_k + chunk_rows` keys (8 bytes each):
/// device memory is about `16 · max_queries · (max_k + chunk_rows)` bytes plus the queries.
/// A corpus is scored `chunk_rows` rows at a time at most; more queries than `max_queries` are
/// searched in consecutive batches.
pub struct GpuSearcher {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: Kernels,
    sms: usize,
    smem_optin: usize,
    max_queries: usize,
    max_k: usize,
    chunk_rows: usize,
    stride: usize,
    lists: [DevBuf<u64>; 2],
    counts: [DevBuf<u32>; 2],
    min_key: DevBuf<u32>,
    sorted: DevBuf<u64>,
    qexp: DevBuf<i32>,
    host_sorted: Vec<u64>,
    /// Sized for one dimension at a time: `max_queries × dim` floats, and the prepared queries.
    queries: Option<DevBuf<f32>>,
    prepared: Option<DevBuf<u8>>,
    reserved_dim: usize,
    staging: Option<Staging>,
    cur: usize,
    allocations: u64,
}

impl GpuSearcher {
    /// A searcher for batches of up to `max_queries` queries, `k ≤ max_k ≤ MAX_K`, scoring at
    /// most `chunk_rows` rows at a time (also the streamed path's transfer size).
    pub fn new(
        gpu: &Gpu,
        max_queries: usize,
        max_k: usize,
        chunk_rows: usize,
    ) -> Result<GpuSearcher> {
        Self::on_stream(gpu, gpu.stream().clone(), max_queries, max_k, chunk_rows)
    }

    /// [`GpuSearcher::new`] with its work queued on `stream` (one per worker thread).
    pub fn on_stream(
        gpu: &Gpu,
        stream: Arc<CudaStream>,
        max_queries: usize,
        max_k: usize,
        chunk_rows: usize,
    ) -> Result<GpuSearcher> {
        if max_queries == 0 || chunk_rows == 0 {
            return Err(Error::InvalidArgument(
                "max_queries and chunk_rows must be at least 1".into(),
            ));
        }
        if max_k == 0 || max_k > MAX_K {
            return Err(Error::InvalidArgument(format!(
                "max_k must be between 1 and {MAX_K}, not {max_k}"
            )));
        }
        let stride = max_k + chunk_rows;
        // A list's length is a 32-bit counter, and grids are linearised over 32 bits.
        if stride >= u32::MAX as usize || chunk_rows > 1 << 28 || max_queries > 1 << 20 {
            return Err(Error::InvalidArgument(format!(
                "chunk_rows {chunk_rows} or max_queries {max_queries} is too large"
            )));
        }
        let list_len = max_queries
            .checked_mul(stride)
            .ok_or_else(|| Error::InvalidArgument("candidate lists overflow".into()))?;
        let ctx = gpu.context().clone();
        let smem_optin = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(cuda_err("reading the shared memory size"))?
            .max(0) as usize;
        let sort_smem = max_k.next_power_of_two() * 8;
        let need = sort_smem.max(SEL_SMEM + 2048).max(TC_SMEM);
        if need > smem_optin {
            return Err(Error::Cuda(format!(
                "top-k needs {need} bytes of shared memory per block for k = {max_k}; \
                 this device allows {smem_optin}"
            )));
        }
        let kernels = Kernels::load(gpu)?;
        allow_smem(&kernels.select, SEL_SMEM)?;
        allow_smem(&kernels.sort, sort_smem)?;
        for f in &kernels.tc {
            allow_smem(f, TC_SMEM)?;
        }
        // The SIMT kernels hold 1-8 queries of any dimension: allow all the device has.
        for f in kernels.simt.iter().flatten() {
            let fixed = f
                .shared_size_bytes()
                .map_err(cuda_err("reading a kernel's shared memory size"))?
                .max(0) as usize;
            allow_smem(f, smem_optin.saturating_sub(fixed.max(SIMT_STATIC_SMEM)))?;
        }
        let mut n = 0u64;
        let lists = [
            DevBuf::new(&stream, list_len, "candidate lists", &mut n)?,
            DevBuf::new(&stream, list_len, "candidate lists", &mut n)?,
        ];
        let counts = [
            DevBuf::new(&stream, max_queries, "list lengths", &mut n)?,
            DevBuf::new(&stream, max_queries, "list lengths", &mut n)?,
        ];
        let min_key = DevBuf::new(&stream, max_queries, "thresholds", &mut n)?;
        let sorted = DevBuf::new(&stream, max_queries * max_k, "results", &mut n)?;
        let qexp = DevBuf::new(
            &stream,
            round_up(max_queries, TC_BN),
            "query scales",
            &mut n,
        )?;
        Ok(GpuSearcher {
            ctx,
            stream,
            kernels,
            sms: gpu.info().multiprocessors.max(1) as usize,
            smem_optin,
            max_queries,
            max_k,
            chunk_rows,
            stride,
            lists,
            counts,
            min_key,
            sorted,
            qexp,
            host_sorted: vec![0u64; max_queries * max_k],
            queries: None,
            prepared: None,
            reserved_dim: 0,
            staging: None,
            cur: 0,
            allocations: n,
        })
    }

    pub fn max_queries(&self) -> usize {
        self.max_queries
    }
    pub fn max_k(&self) -> usize {
        self.max_k
    }
    pub fn chunk_rows(&self) -> usize {
        self.chunk_rows
    }

    /// Device (and pinned host) allocations this searcher has made since it was created. A
    /// search of a dimension already reserved does not change it.
    pub fn device_allocations(&self) -> u64 {
        self.allocations
    }

    /// Allocates the buffers that depend on the vector dimension (done by the first search of a
    /// dimension; call it ahead of time to keep the first search allocation-free too). Buffers
    /// only grow: a smaller dimension afterwards reuses them.
    pub fn reserve(&mut self, dim: usize) -> Result<()> {
        if dim == 0 {
            return Err(Error::InvalidArgument(
                "corpus dimension must be positive".into(),
            ));
        }
        to_i32(dim.saturating_mul(4), "dimension")?;
        // The SIMT kernel keeps up to 8 queries in shared memory: at least one must fit.
        let dpad = [Dtype::F32, Dtype::F16, Dtype::Bf16]
            .map(|d| simt_dpad(dim, d))
            .into_iter()
            .max()
            .unwrap_or(dim);
        if dpad * 4 + SIMT_STATIC_SMEM > self.smem_optin {
            return Err(Error::InvalidArgument(format!(
                "dimension {dim} is too large for GPU search on this device"
            )));
        }
        if dim > self.reserved_dim {
            let q_len = self.max_queries * dim;
            let tc = 3 * round_up(self.max_queries, TC_BN) * round_up(dim, TC_BK) * 2;
            let gemm = round_up(dim, G_BK) * round_up(self.max_queries, G_BN) * 4;
            self.queries = None;
            self.prepared = None;
            let mut n = 0;
            self.queries = Some(DevBuf::new(&self.stream, q_len, "queries", &mut n)?);
            self.prepared = Some(DevBuf::new(
                &self.stream,
                tc.max(gemm),
                "prepared queries",
                &mut n,
            )?);
            self.allocations += n;
            self.reserved_dim = dim;
        }
        Ok(())
    }

    /// Allocates the streaming buffers for rows of `row_bytes` bytes (once; they only grow).
    fn reserve_staging(&mut self, row_bytes: usize) -> Result<()> {
        let bytes = self
            .chunk_rows
            .checked_mul(row_bytes)
            .ok_or_else(|| Error::InvalidArgument("staging buffers overflow".into()))?;
        if self.staging.as_ref().is_some_and(|s| s.bytes >= bytes) {
            return Ok(());
        }
        if let Some(old) = self.staging.take() {
            old.copy
                .synchronize()
                .map_err(cuda_err("draining the copy stream"))?;
        }
        let copy = self
            .ctx
            .new_stream()
            .map_err(cuda_err("creating the copy stream"))?;
        let pinned = || {
            // SAFETY: the host buffer is written before it is read.
            unsafe { self.ctx.alloc_pinned::<u8>(bytes) }
                .map_err(cuda_err("allocating pinned staging memory"))
        };
        let host = [pinned()?, pinned()?];
        let mut n = 2;
        let dev = [
            DevBuf::new(&self.stream, bytes, "device staging", &mut n)?,
            DevBuf::new(&self.stream, bytes, "device staging", &mut n)?,
        ];
        let event = || {
            self.ctx
                .new_event(None)
                .map_err(cuda_err("creating an event"))
        };
        let copied = [event()?, event()?];
        let consumed = [event()?, event()?];
        // The copy stream writes the device buffers: their (stream-ordered) allocation must be done.
        self.stream
            .synchronize()
            .map_err(cuda_err("synchronising"))?;
        self.allocations += n;
        self.staging = Some(Staging {
            copy,
            host,
            dev,
            copied,
            consumed,
            bytes,
            turn: 0,
        });
        Ok(())
    }

    /// Exact top-k of each query (`queries` is `nq × corpus.dim()`, row-major) among the rows of
    /// `corpus`: `min(k, rows)` hits per query in [`hit_order`], like `search_batch`.
    ///
    /// Errors (`InvalidArgument`): k = 0, a query length that is not a multiple of the dimension,
    /// a non-finite query value, `min(k, rows) > max_k`; `Cuda` for a device failure.
    pub fn search(
        &mut self,
        corpus: &GpuCorpus,
        queries: &[f32],
        k: usize,
    ) -> Result<Vec<Vec<Hit>>> {
        let Some(nq) = self.check(corpus.dim, corpus.rows, queries, k)? else {
            return Ok(Vec::new());
        };
        let _range = super::nvtx::range(c"rrra top-k");
        let (dim, rows, dtype) = (corpus.dim, corpus.rows, corpus.dtype);
        let k = k.min(rows);
        self.reserve(dim)?;
        self.bind()?;
        let row_bytes = (dim * dtype.size()) as u64;
        let mut out = Vec::with_capacity(nq);
        for batch in queries.chunks(self.max_queries * dim) {
            let nb = batch.len() / dim;
            let path = self.begin(batch, dim, dtype)?;
            let mut seen = 0;
            while seen < rows {
                let len = self.next_len(seen, rows - seen, k);
                let ptr = corpus.ptr + seen as u64 * row_bytes;
                self.score(path, ptr, len, dim, dtype, seen, nb)?;
                self.select(nb, k)?;
                seen += len;
            }
            self.finish(nb, k, rows, &mut out)?;
        }
        Ok(out)
    }

    /// The same search over a corpus in host memory (a memory-mapped store, say), uploaded in
    /// chunks of `chunk_rows` rows through pinned staging buffers while earlier chunks are scored.
    /// Same results, order and errors as [`GpuSearcher::search`]; an empty corpus is an error.
    pub fn search_streamed(
        &mut self,
        corpus: &Corpus,
        queries: &[f32],
        k: usize,
    ) -> Result<Vec<Vec<Hit>>> {
        if k == 0 {
            return Err(Error::InvalidArgument("k must be at least 1".into()));
        }
        corpus.validate()?;
        let (dim, rows, dtype) = (corpus.dim, corpus.len(), corpus.vectors.dtype());
        let Some(nq) = self.check(dim, rows, queries, k)? else {
            return Ok(Vec::new());
        };
        let k = k.min(rows);
        self.reserve(dim)?;
        self.reserve_staging(dim * dtype.size())?;
        self.bind()?;
        let bytes = vector_bytes(&corpus.vectors);
        let mut st = self.staging.take().ok_or_else(|| {
            Error::Cuda("internal: streaming buffers missing after reservation".into())
        })?;
        let mut out = Vec::with_capacity(nq);
        let result = (|| -> Result<()> {
            for batch in queries.chunks(self.max_queries * dim) {
                self.streamed_batch(&mut st, bytes, batch, dim, rows, dtype, k, &mut out)?;
            }
            Ok(())
        })();
        // Whatever happened, no copy may still read the pinned buffers once we return.
        let drained = st
            .copy
            .synchronize()
            .map_err(cuda_err("draining the copy stream"));
        self.staging = Some(st);
        result?;
        drained?;
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn streamed_batch(
        &mut self,
        st: &mut Staging,
        bytes: &[u8],
        batch: &[f32],
        dim: usize,
        rows: usize,
        dtype: Dtype,
        k: usize,
        out: &mut Vec<Vec<Hit>>,
    ) -> Result<()> {
        let nb = batch.len() / dim;
        let row_bytes = dim * dtype.size();
        let path = self.begin(batch, dim, dtype)?;
        let mut seen = 0;
        while seen < rows {
            let len = self.chunk_rows.min(rows - seen);
            let b = st.turn % 2;
            st.turn += 1;
            // The upload that last read host[b] (two chunks ago) must be over before refilling it.
            st.copied[b]
                .synchronize()
                .map_err(cuda_err("waiting for an upload"))?;
            let host = st.host[b]
                .as_mut_slice()
                .map_err(cuda_err("mapping pinned memory"))?;
            let (dst, src) = (
                &mut host[..len * row_bytes],
                &bytes[seen * row_bytes..(seen + len) * row_bytes],
            );
            dst.par_chunks_mut(HOST_COPY_PIECE)
                .zip(src.par_chunks(HOST_COPY_PIECE))
                .for_each(|(d, s)| d.copy_from_slice(s));
            // dev[b] may only be overwritten once the kernels of two chunks ago are done with it.
            st.copy
                .wait(&st.consumed[b])
                .map_err(cuda_err("ordering the copy stream"))?;
            // SAFETY: host[b] stays allocated and untouched until `copied[b]` has fired (checked
            // above before the next refill, and by draining the copy stream before returning).
            unsafe { cu::memcpy_htod_async(st.dev[b].ptr, &dst[..], st.copy.cu_stream()) }
                .map_err(cuda_err("uploading a corpus chunk"))?;
            st.copied[b]
                .record(&st.copy)
                .map_err(cuda_err("recording an event"))?;
            self.stream
                .wait(&st.copied[b])
                .map_err(cuda_err("ordering the compute stream"))?;
            let mut pos = 0;
            while pos < len {
                let sub = self.next_len(seen + pos, len - pos, k);
                let ptr = st.dev[b].ptr + (pos * row_bytes) as u64;
                self.score(path, ptr, sub, dim, dtype, seen + pos, nb)?;
                self.select(nb, k)?;
                pos += sub;
            }
            st.consumed[b]
                .record(&self.stream)
                .map_err(cuda_err("recording an event"))?;
            seen += len;
        }
        self.finish(nb, k, rows, out)
    }

    /// Argument checks in the CPU's order; `None` when there are no queries.
    fn check(&self, dim: usize, rows: usize, queries: &[f32], k: usize) -> Result<Option<usize>> {
        if k == 0 {
            return Err(Error::InvalidArgument("k must be at least 1".into()));
        }
        if dim == 0 {
            return Err(Error::InvalidArgument(
                "corpus dimension must be positive".into(),
            ));
        }
        if let Some(i) = queries.iter().position(|x| !x.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "query {} has a non-finite value ({}) at position {}",
                i / dim,
                queries[i],
                i % dim
            )));
        }
        if !queries.len().is_multiple_of(dim) {
            return Err(Error::InvalidArgument(format!(
                "queries have {} values, not a multiple of the corpus dimension {dim}",
                queries.len()
            )));
        }
        let nq = queries.len() / dim;
        if nq == 0 {
            return Ok(None);
        }
        check_rows(rows)?;
        if k.min(rows) > self.max_k {
            return Err(Error::InvalidArgument(format!(
                "k = {} is more than this searcher's max_k = {}",
                k.min(rows),
                self.max_k
            )));
        }
        Ok(Some(nq))
    }

    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(cuda_err("binding the context"))
    }

    fn next_len(&self, seen: usize, remaining: usize, k: usize) -> usize {
        chunk_len(seen, remaining, k, self.chunk_rows)
    }

    /// Uploads a batch of queries, prepares them for its scoring path, empties the lists.
    fn begin(&mut self, batch: &[f32], dim: usize, dtype: Dtype) -> Result<Path> {
        let nb = batch.len() / dim;
        let path = path_for(dtype, nb);
        let (qptr, pptr) = match (&self.queries, &self.prepared) {
            (Some(q), Some(p)) if q.len() >= batch.len() => (q.ptr, p.ptr),
            _ => return Err(Error::Cuda("internal: query buffers not reserved".into())),
        };
        let s = self.stream.cu_stream();
        // SAFETY: the destinations hold at least these many bytes (checked above and at
        // construction); a copy from pageable memory has read `batch` when it returns.
        unsafe {
            cu::memcpy_htod_async(qptr, batch, s).map_err(cuda_err("uploading queries"))?;
            cu::memset_d8_async(self.counts[0].ptr, 0, nb * 4, s)
                .map_err(cuda_err("clearing list lengths"))?;
            cu::memset_d8_async(self.min_key.ptr, 0, nb * 4, s)
                .map_err(cuda_err("clearing thresholds"))?;
        }
        self.cur = 0;
        let (nq_i, dim_i) = (to_i32(nb, "queries")?, to_i32(dim, "dimension")?);
        match path {
            Path::Simt => {}
            Path::TensorCore => {
                let (q_pad, d_pad) = (round_up(nb, TC_BN), round_up(dim, TC_BK));
                let (qp, dp) = (q_pad as i32, d_pad as i32);
                let f = &self.kernels.split[dtype_index(dtype) - 1];
                // SAFETY: arguments match rrra_topk_split_queries_*; `prepared` holds
                // 3 × q_pad × d_pad 16-bit terms and `qexp` q_pad exponents (see `reserve`).
                unsafe {
                    self.stream
                        .launch_builder(f)
                        .arg(&qptr)
                        .arg(&nq_i)
                        .arg(&dim_i)
                        .arg(&qp)
                        .arg(&dp)
                        .arg(&pptr)
                        .arg(&self.qexp.ptr)
                        .launch(launch_cfg(q_pad, 256, 0)?)
                }
                .map_err(cuda_err("launching rrra_topk_split_queries"))?;
            }
            Path::Gemm => {
                let (q_pad, d_pad) = (round_up(nb, G_BN), round_up(dim, G_BK));
                let (qp, dp) = (q_pad as i32, d_pad as i32);
                let blocks = (q_pad * d_pad).div_ceil(256).min(self.sms * 8);
                // SAFETY: arguments match rrra_topk_transpose_queries; `prepared` holds
                // d_pad × q_pad floats (see `reserve`).
                unsafe {
                    self.stream
                        .launch_builder(&self.kernels.transpose)
                        .arg(&qptr)
                        .arg(&nq_i)
                        .arg(&dim_i)
                        .arg(&qp)
                        .arg(&dp)
                        .arg(&pptr)
                        .launch(launch_cfg(blocks, 256, 0)?)
                }
                .map_err(cuda_err("launching rrra_topk_transpose_queries"))?;
            }
        }
        Ok(path)
    }

    /// Scores rows `row0 .. row0 + len` (at device address `ptr`) against the batch and appends
    /// the candidates that pass each query's threshold to the current lists.
    #[allow(clippy::too_many_arguments)]
    fn score(
        &mut self,
        path: Path,
        ptr: u64,
        len: usize,
        dim: usize,
        dtype: Dtype,
        row0: usize,
        nb: usize,
    ) -> Result<()> {
        let (qptr, pptr) = match (&self.queries, &self.prepared) {
            (Some(q), Some(p)) => (q.ptr, p.ptr),
            _ => return Err(Error::Cuda("internal: query buffers not reserved".into())),
        };
        let n_rows = len as i64;
        let dim_i = to_i32(dim, "dimension")?;
        let row0_u = to_u32(row0, "row index")?;
        let nq_i = to_i32(nb, "queries")?;
        let stride = self.stride as i64;
        let (mk, cand, cnt) = (
            self.min_key.ptr,
            self.lists[self.cur].ptr,
            self.counts[self.cur].ptr,
        );
        match path {
            Path::Simt => {
                let dpad = simt_dpad(dim, dtype);
                let mut q0 = 0;
                while q0 < nb {
                    let mut width = simt_width(nb - q0);
                    while width > 1 && width * dpad * 4 + SIMT_STATIC_SMEM > self.smem_optin {
                        width = if width == 8 { 4 } else { 1 };
                    }
                    let variant = match width {
                        1 => 0,
                        4 => 1,
                        _ => 2,
                    };
                    let rows_per_warp = if width == 8 { 4 } else { 8 };
                    let warps = len.div_ceil(rows_per_warp);
                    let blocks = warps.div_ceil(8).min(self.sms * 8);
                    let f = &self.kernels.simt[dtype_index(dtype)][variant];
                    let q0_i = q0 as i32;
                    // SAFETY: arguments match rrra_topk_score_*_q*; the lists hold `stride` keys
                    // per query, enough for k + this chunk's rows.
                    unsafe {
                        self.stream
                            .launch_builder(f)
                            .arg(&ptr)
                            .arg(&n_rows)
                            .arg(&dim_i)
                            .arg(&row0_u)
                            .arg(&qptr)
                            .arg(&q0_i)
                            .arg(&nq_i)
                            .arg(&mk)
                            .arg(&cand)
                            .arg(&cnt)
                            .arg(&stride)
                            .launch(launch_cfg(blocks, SIMT_THREADS, width * dpad * 4)?)
                    }
                    .map_err(cuda_err("launching rrra_topk_score (SIMT)"))?;
                    q0 += width;
                }
            }
            Path::TensorCore => {
                let (q_pad, d_pad) = (round_up(nb, TC_BN), round_up(dim, TC_BK));
                let q_tiles = q_pad / TC_BN;
                let grid = len.div_ceil(TC_BM) * q_tiles;
                let (qp, dp, qt) = (q_pad as i32, d_pad as i32, q_tiles as i32);
                let f = &self.kernels.tc[dtype_index(dtype) - 1];
                // SAFETY: arguments match rrra_topk_score_tc_*; see `begin` for the query layout.
                unsafe {
                    self.stream
                        .launch_builder(f)
                        .arg(&ptr)
                        .arg(&n_rows)
                        .arg(&dim_i)
                        .arg(&row0_u)
                        .arg(&pptr)
                        .arg(&self.qexp.ptr)
                        .arg(&nq_i)
                        .arg(&qp)
                        .arg(&dp)
                        .arg(&mk)
                        .arg(&cand)
                        .arg(&cnt)
                        .arg(&stride)
                        .arg(&qt)
                        .launch(launch_cfg(grid, TC_THREADS, TC_SMEM)?)
                }
                .map_err(cuda_err("launching rrra_topk_score_tc"))?;
            }
            Path::Gemm => {
                let (q_pad, d_pad) = (round_up(nb, G_BN), round_up(dim, G_BK));
                let q_tiles = q_pad / G_BN;
                let grid = len.div_ceil(G_BM) * q_tiles;
                let (qp, dp, qt) = (q_pad as i32, d_pad as i32, q_tiles as i32);
                // SAFETY: arguments match rrra_topk_score_f32_gemm; see `begin`.
                unsafe {
                    self.stream
                        .launch_builder(&self.kernels.gemm)
                        .arg(&ptr)
                        .arg(&n_rows)
                        .arg(&dim_i)
                        .arg(&row0_u)
                        .arg(&pptr)
                        .arg(&nq_i)
                        .arg(&qp)
                        .arg(&dp)
                        .arg(&mk)
                        .arg(&cand)
                        .arg(&cnt)
                        .arg(&stride)
                        .arg(&qt)
                        .launch(launch_cfg(grid, G_THREADS, 0)?)
                }
                .map_err(cuda_err("launching rrra_topk_score_f32_gemm"))?;
            }
        }
        Ok(())
    }

    /// Keeps the k best of each current list in the other list, and updates the thresholds.
    fn select(&mut self, nb: usize, k: usize) -> Result<()> {
        let (cur, next) = (self.cur, 1 - self.cur);
        let (stride, k_i) = (self.stride as i64, to_i32(k, "k")?);
        // SAFETY: arguments match rrra_topk_select; both lists hold `stride` keys per query.
        unsafe {
            self.stream
                .launch_builder(&self.kernels.select)
                .arg(&self.lists[cur].ptr)
                .arg(&self.counts[cur].ptr)
                .arg(&self.lists[next].ptr)
                .arg(&self.counts[next].ptr)
                .arg(&self.min_key.ptr)
                .arg(&stride)
                .arg(&k_i)
                .launch(launch_cfg(nb, SEL_THREADS, SEL_SMEM)?)
        }
        .map_err(cuda_err("launching rrra_topk_select"))?;
        self.cur = next;
        Ok(())
    }

    /// Sorts the final lists, copies them back and decodes them into `out`.
    fn finish(&mut self, nb: usize, k: usize, rows: usize, out: &mut Vec<Vec<Hit>>) -> Result<()> {
        let p = k.next_power_of_two();
        let threads = (p / 2).clamp(32, 1024) as u32;
        let (stride, k_i) = (self.stride as i64, to_i32(k, "k")?);
        // SAFETY: arguments match rrra_topk_sort; `sorted` holds max_queries × max_k keys.
        unsafe {
            self.stream
                .launch_builder(&self.kernels.sort)
                .arg(&self.lists[self.cur].ptr)
                .arg(&self.counts[self.cur].ptr)
                .arg(&stride)
                .arg(&k_i)
                .arg(&self.sorted.ptr)
                .launch(launch_cfg(nb, threads, p * 8)?)
        }
        .map_err(cuda_err("launching rrra_topk_sort"))?;
        let host = &mut self.host_sorted[..nb * k];
        // SAFETY: `host` lives in `self` and the stream is synchronised before it is read.
        unsafe { cu::memcpy_dtoh_async(host, self.sorted.ptr, self.stream.cu_stream()) }
            .map_err(cuda_err("downloading results"))?;
        self.stream
            .synchronize()
            .map_err(cuda_err("waiting for the search"))?;
        for keys in self.host_sorted[..nb * k].chunks_exact(k) {
            let hits: Vec<Hit> = keys.iter().map(|&key| decode(key)).collect();
            if let Some(bad) = hits.iter().find(|h| h.index >= rows) {
                return Err(Error::Cuda(format!(
                    "internal: the GPU returned row {} of a {rows}-row corpus",
                    bad.index
                )));
            }
            out.push(hits);
        }
        Ok(())
    }
}

impl Drop for GpuSearcher {
    fn drop(&mut self) {
        // Nothing may still read the pinned buffers or the lists when they are freed.
        if let Some(st) = &self.staging {
            let _ = st.copy.synchronize();
        }
        let _ = self.stream.synchronize();
    }
}

// ---------------------------------------------------------------------------------------------
// Checking GPU results against the CPU

/// Compares GPU hits with CPU hits ([`search_batch`](crate::index::search_batch)) for the same
/// corpus and queries, within the error both may make.
///
/// Tolerance: each side computes `q · c` in f32 with its own summation order (the CPU a GEMM
/// micro-kernel, the GPU per-lane sums and a shuffle tree, a register-tiled FMA chain, or tensor
/// cores summing exact products of the 3-term split query, which itself is within 2⁻²⁴ of q).
/// Any order of d terms is within γ_d·Σ|q_j c_j| of the exact value (γ_d = d·u/(1 − d·u),
/// u = 2⁻²⁴; Higham, Accuracy and Stability, §4.2); tensor cores may truncate instead of round,
/// which at most doubles u. So |gpu − cpu| ≤ (3γ_d + 4u)·Σ|q_j c_j| ≤ (3γ_d + 4u)·‖q‖·max‖c‖,
/// the per-query tolerance `tol`. Checks: same count; GPU order strictly [`hit_order`]; ranks agree
/// within `tol` (order statistics move by at most the largest per-row error); a row in both lists
/// has scores within `tol`; a row in only one list scores within `2·tol` of the other list's last
/// (a near-tie at the cut may swap).
pub struct CpuCheck {
    dim: usize,
    rows: usize,
    max_row_norm: f64,
}

impl CpuCheck {
    pub fn new(corpus: &Corpus) -> CpuCheck {
        let (dim, rows) = (corpus.dim.max(1), corpus.len());
        let mut row = vec![0f32; dim];
        let mut max_row_norm = 0f64;
        for r in 0..rows {
            corpus.vectors.to_f32(r * dim, &mut row);
            let n = row.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
            max_row_norm = max_row_norm.max(n);
        }
        CpuCheck {
            dim,
            rows,
            max_row_norm,
        }
    }

    /// The largest difference allowed between a GPU and a CPU score for `query`.
    pub fn tolerance(&self, query: &[f32]) -> f64 {
        let u = f64::from(f32::EPSILON) / 2.0;
        let du = self.dim as f64 * u;
        let gamma = du / (1.0 - du);
        let qn = query
            .iter()
            .map(|&x| x as f64 * x as f64)
            .sum::<f64>()
            .sqrt();
        (3.0 * gamma + 4.0 * u) * qn * self.max_row_norm + f64::from(f32::MIN_POSITIVE)
    }

    /// `Ok` when `gpu` matches `cpu` for every query, else what differs first.
    pub fn compare(
        &self,
        queries: &[f32],
        gpu: &[Vec<Hit>],
        cpu: &[Vec<Hit>],
    ) -> std::result::Result<(), String> {
        if gpu.len() != cpu.len() || queries.len() != gpu.len() * self.dim {
            return Err(format!(
                "{} GPU lists, {} CPU lists, {} queries",
                gpu.len(),
                cpu.len(),
                queries.len() / self.dim
            ));
        }
        for (qi, ((g, c), q)) in gpu
            .iter()
            .zip(cpu)
            .zip(queries.chunks(self.dim))
            .enumerate()
        {
            self.compare_one(q, g, c)
                .map_err(|e| format!("query {qi}: {e}"))?;
        }
        Ok(())
    }

    fn compare_one(&self, q: &[f32], g: &[Hit], c: &[Hit]) -> std::result::Result<(), String> {
        let tol = self.tolerance(q);
        let close = |a: f32, b: f32, t: f64| {
            (a.is_nan() && b.is_nan()) || (f64::from(a) - f64::from(b)).abs() <= t
        };
        if g.len() != c.len() {
            return Err(format!("{} GPU hits, {} CPU hits", g.len(), c.len()));
        }
        if let Some(h) = g.iter().find(|h| h.index >= self.rows) {
            return Err(format!("row {} is out of range", h.index));
        }
        if let Some(i) = (1..g.len()).find(|&i| !hit_order(&g[i - 1], &g[i]).is_lt()) {
            return Err(format!("GPU hits {} and {i} are out of order", i - 1));
        }
        for (rank, (a, b)) in g.iter().zip(c).enumerate() {
            if !close(a.score, b.score, tol) {
                return Err(format!(
                    "rank {rank}: GPU score {} vs CPU {} (tolerance {tol:e})",
                    a.score, b.score
                ));
            }
        }
        let (Some(g_last), Some(c_last)) = (g.last(), c.last()) else {
            return Ok(());
        };
        let cpu_scores: std::collections::HashMap<usize, f32> =
            c.iter().map(|h| (h.index, h.score)).collect();
        let gpu_rows: std::collections::HashSet<usize> = g.iter().map(|h| h.index).collect();
        for h in g {
            match cpu_scores.get(&h.index) {
                Some(&s) if !close(h.score, s, tol) => {
                    return Err(format!(
                        "row {}: GPU score {} vs CPU {s} (tolerance {tol:e})",
                        h.index, h.score
                    ))
                }
                None if !close(h.score, c_last.score, 2.0 * tol) => {
                    return Err(format!(
                        "row {} (score {}) is not in the CPU list, whose last score is {}",
                        h.index, h.score, c_last.score
                    ))
                }
                _ => {}
            }
        }
        if let Some(h) = c
            .iter()
            .find(|h| !gpu_rows.contains(&h.index) && !close(h.score, g_last.score, 2.0 * tol))
        {
            return Err(format!(
                "row {} (CPU score {}) is missing from the GPU list, whose last score is {}",
                h.index, h.score, g_last.score
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Benchmark

fn timing(
    dtype: Dtype,
    nq: usize,
    k: usize,
    rows: usize,
    dim: usize,
    label: &str,
    ms: f64,
) -> KernelTiming {
    let plural = if nq == 1 { "query" } else { "queries" };
    KernelTiming {
        name: format!("topk_search[{}]", scoring_kernel(dtype, nq)),
        shape: format!("{label} {}, {nq} {plural}, k {k}", dtype.name()),
        ms,
        bytes: (rows * dim * dtype.size()) as f64,
        flops: 2.0 * rows as f64 * dim as f64 * nq as f64,
    }
}

/// Times the whole query path (upload of the queries, scoring, selection, sort, download) on
/// synthetic unit vectors generated on the device. `bytes` is the corpus size (what the search
/// must read at least; over PCIe for the streamed case), `flops` the useful 2·n·d·Q. Needs about
/// 18 GiB of device memory and well under a minute on an H200.
pub fn bench(gpu: &Gpu) -> Result<Vec<KernelTiming>> {
    let mut out = Vec::new();
    {
        // (a) 10M x 768 bf16: the bandwidth-bound serving case, 1 and 32 queries.
        let (rows, dim) = (10_000_000, 768);
        let corpus = GpuCorpus::synthetic(gpu, rows, dim, Dtype::Bf16, 1)?;
        let mut s = GpuSearcher::new(gpu, 32, 100, 4 << 20)?;
        for nq in [1, 32] {
            let q = random_unit_vectors(nq, dim, 10 + nq as u64);
            let ms = gpu.time_ms(10, || s.search(&corpus, &q, 100).map(drop))?;
            out.push(timing(Dtype::Bf16, nq, 100, rows, dim, "10M x 768", ms));
        }
    }
    {
        // (b) 1M x 384 f32, one query: the batch-1 serving path.
        let (rows, dim) = (1_000_000, 384);
        let corpus = GpuCorpus::synthetic(gpu, rows, dim, Dtype::F32, 2)?;
        let mut s = GpuSearcher::new(gpu, 1, 100, 1 << 20)?;
        let q = random_unit_vectors(1, dim, 20);
        let ms = gpu.time_ms(20, || s.search(&corpus, &q, 100).map(drop))?;
        out.push(timing(Dtype::F32, 1, 100, rows, dim, "1M x 384", ms));
    }
    {
        // (c) 1M x 384 bf16, 32 queries, k = 10 000: selection-heavy.
        let (rows, dim) = (1_000_000, 384);
        let corpus = GpuCorpus::synthetic(gpu, rows, dim, Dtype::Bf16, 3)?;
        let mut s = GpuSearcher::new(gpu, 32, MAX_K, 1 << 20)?;
        let q = random_unit_vectors(32, dim, 30);
        let ms = gpu.time_ms(10, || s.search(&corpus, &q, MAX_K).map(drop))?;
        out.push(timing(Dtype::Bf16, 32, MAX_K, rows, dim, "1M x 384", ms));
    }
    {
        // (d) 200 000 x 384 f32, 1 000 queries, k = 10: the CPU benchmark workload.
        let (rows, dim) = (200_000, 384);
        let corpus = GpuCorpus::synthetic(gpu, rows, dim, Dtype::F32, 4)?;
        let mut s = GpuSearcher::new(gpu, 1000, 10, rows)?;
        let q = random_unit_vectors(1000, dim, 40);
        let ms = gpu.time_ms(5, || s.search(&corpus, &q, 10).map(drop))?;
        out.push(timing(Dtype::F32, 1000, 10, rows, dim, "200K x 384", ms));
    }
    {
        // (e) 2M x 768 bf16 streamed from host memory, 32 queries: bound by PCIe.
        let (rows, dim) = (2_000_000, 768);
        let bits = GpuCorpus::synthetic(gpu, rows, dim, Dtype::Bf16, 5)?.download_u16(gpu)?;
        use half::slice::HalfBitsSliceExt;
        let host = Corpus::new(Vectors::Bf16(bits.reinterpret_cast()), dim)?;
        let mut s = GpuSearcher::new(gpu, 32, 100, 1 << 18)?;
        let q = random_unit_vectors(32, dim, 50);
        let ms = gpu.time_ms(3, || s.search_streamed(&host, &q, 100).map(drop))?;
        let mut t = timing(Dtype::Bf16, 32, 100, rows, dim, "2M x 768 streamed", ms);
        t.name = format!("topk_search_streamed[{}]", scoring_kernel(Dtype::Bf16, 32));
        out.push(t);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_inverts_the_kernel_key() {
        // The kernel's score_key, written out for a few scores.
        let key = |s: f32, row: u32| -> u64 {
            let asc = if s.is_nan() {
                0
            } else if s == 0.0 {
                0x8000_0000
            } else if s.to_bits() >> 31 == 1 {
                !s.to_bits()
            } else {
                s.to_bits() | 0x8000_0000
            };
            (u64::from(asc) << 32) | u64::from(!row)
        };
        let scores = [
            f32::NEG_INFINITY,
            -2.5,
            -0.0,
            0.0,
            1e-40,
            0.75,
            f32::INFINITY,
        ];
        let mut keys: Vec<u64> = Vec::new();
        for (i, &s) in scores.iter().enumerate() {
            for row in [7u32, 3] {
                let k = key(s, row + i as u32 * 10);
                let h = decode(k);
                assert_eq!(h.index, (row + i as u32 * 10) as usize);
                assert!(h.score == s || (s == 0.0 && h.score == 0.0));
                keys.push(k);
            }
        }
        let nan = decode(key(f32::NAN, 1));
        assert!(nan.score.is_nan() && nan.index == 1);
        // Descending keys are the CPU order.
        keys.sort_unstable_by(|a, b| b.cmp(a));
        let hits: Vec<Hit> = keys.into_iter().map(decode).collect();
        assert!(hits.windows(2).all(|w| hit_order(&w[0], &w[1]).is_lt()));
    }

    #[test]
    fn chunks_grow_and_respect_the_cap() {
        let next = chunk_len;
        assert_eq!(next(0, 1_000_000, 100, 1 << 20), FIRST_ROWS);
        assert_eq!(next(0, 1_000_000, 10_000, 1 << 20), 40_000);
        assert_eq!(next(FIRST_ROWS, 1_000_000, 100, 1 << 20), 3 * FIRST_ROWS);
        assert_eq!(next(500_000, 1_000_000, 100, 300_000), 300_000);
        assert_eq!(next(999_990, 10, 100, 1 << 20), 10);
    }

    #[test]
    fn paths_and_kernel_names() {
        assert_eq!(scoring_kernel(Dtype::Bf16, 1), "rrra_topk_score_bf16_q1");
        assert_eq!(scoring_kernel(Dtype::F16, 7), "rrra_topk_score_f16_q8");
        assert_eq!(scoring_kernel(Dtype::Bf16, 32), "rrra_topk_score_tc_bf16");
        assert_eq!(scoring_kernel(Dtype::F32, 20), "rrra_topk_score_f32_q8");
        assert_eq!(scoring_kernel(Dtype::F32, 1000), "rrra_topk_score_f32_gemm");
        assert_eq!(simt_dpad(384, Dtype::F32), 384);
        assert_eq!(simt_dpad(384, Dtype::Bf16), 512);
        assert_eq!(simt_dpad(100, Dtype::Bf16), 128);
        assert_eq!(simt_dpad(99, Dtype::F32), 128);
    }
}
