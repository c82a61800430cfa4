//! The minimal GPU runtime on cudarc (driver API, libcuda loaded at run time): probe, one
//! context per device, the embedded kernel modules loaded once, streams, and errors that are
//! values. Nothing here panics when there is no driver or no device: [`Gpu::open`] returns
//! [`Error::CudaUnavailable`] with the reason, and every op stays available on the CPU path.

use super::{cuda_compiled, kernel_module};
use crate::error::{Error, Result};
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    LaunchConfig,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// What the device is, for logs and benchmark tables.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_memory: usize,
    pub multiprocessors: i32,
    pub driver_version: i32,
}

impl std::fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GPU {}: {} (sm_{}{}, {} SMs, {:.1} GiB), driver {}.{}",
            self.ordinal,
            self.name,
            self.compute_capability.0,
            self.compute_capability.1,
            self.multiprocessors,
            self.total_memory as f64 / (1u64 << 30) as f64,
            self.driver_version / 1000,
            self.driver_version % 1000 / 10
        )
    }
}

/// One device: its context, a default stream, and the kernel modules loaded so far. Clones
/// share all three.
#[derive(Clone)]
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Arc<Mutex<HashMap<&'static str, Arc<CudaModule>>>>,
    info: DeviceInfo,
}

/// A driver or library failure, as an error value naming what was being done.
pub(crate) fn cuda_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Cuda(format!("{what}: {e}"))
}

/// Why no GPU can be used, or `None` when one can: the build has kernels, libcuda loads, and
/// the driver reports at least one device. Never panics.
pub fn unavailable_reason() -> Option<String> {
    if !cuda_compiled() {
        return Some("this build has no CUDA kernels (nvcc was not found at build time)".into());
    }
    // SAFETY: only tries to dlopen libcuda; no CUDA call is made.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Some("the CUDA driver library (libcuda) is not installed".into());
    }
    match CudaContext::device_count() {
        Ok(0) => Some("the CUDA driver reports no device".into()),
        Ok(_) => None,
        Err(e) => Some(format!("the CUDA driver failed to initialise: {e}")),
    }
}

impl Gpu {
    /// Opens device `ordinal`, or says why it cannot.
    pub fn open(ordinal: usize) -> Result<Gpu> {
        if let Some(reason) = unavailable_reason() {
            return Err(Error::CudaUnavailable(reason));
        }
        let count = CudaContext::device_count().map_err(cuda_err("counting devices"))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::CudaUnavailable(format!(
                "device {ordinal} asked for, {count} present"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(cuda_err("creating a context"))?;
        // The engine orders its streams itself: every buffer belongs to the stream of the object
        // that owns it, and the one hand-off between streams (the streamed top-k's copy stream)
        // waits on explicit events. cudarc's per-buffer event tracking would add an event record
        // (and, with several streams, waits) to every pointer lookup, and such waits on events
        // recorded outside a capture break CUDA-graph capture. Off before any allocation.
        // SAFETY: see above; nothing has been allocated in this context yet.
        unsafe { ctx.disable_event_tracking() };
        use cudarc::driver::sys::CUdevice_attribute as A;
        let attr = |a| {
            ctx.attribute(a)
                .map_err(cuda_err("reading a device attribute"))
        };
        let mut driver_version = 0i32;
        // SAFETY: a plain out-parameter query of the initialised driver.
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver_version) };
        let info = DeviceInfo {
            ordinal,
            name: ctx.name().map_err(cuda_err("reading the device name"))?,
            compute_capability: (
                attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
                attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
            ),
            total_memory: ctx.total_mem().map_err(cuda_err("reading memory size"))?,
            multiprocessors: attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
            driver_version,
        };
        let stream = ctx.default_stream();
        Ok(Gpu {
            ctx,
            stream,
            modules: Arc::new(Mutex::new(HashMap::new())),
            info,
        })
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    /// The stream ops run on unless given another.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// A new stream (one per worker thread, so workers do not serialise on one queue).
    pub fn new_stream(&self) -> Result<Arc<CudaStream>> {
        self.ctx.new_stream().map_err(cuda_err("creating a stream"))
    }

    /// Kernel `name` of the embedded module `module` (`kernels/<module>.cu`); the module is
    /// loaded on first use and kept.
    pub fn function(&self, module: &'static str, name: &str) -> Result<CudaFunction> {
        let m = {
            let mut loaded = self
                .modules
                .lock()
                .map_err(|_| Error::Cuda("module table poisoned by a panic".into()))?;
            match loaded.get(module) {
                Some(m) => m.clone(),
                None => {
                    let km = kernel_module(module).ok_or_else(|| {
                        Error::Cuda(format!("no embedded kernel module `{module}`"))
                    })?;
                    let ptx = cudarc::nvrtc::Ptx::from_binary(km.fatbin.to_vec());
                    let m = self
                        .ctx
                        .load_module(ptx)
                        .map_err(cuda_err(&format!("loading module {module}")))?;
                    loaded.insert(module, m.clone());
                    m
                }
            }
        };
        m.load_function(name)
            .map_err(|e| Error::Cuda(format!("kernel {name} in module {module}: {e}")))
    }

    /// Waits for everything queued on the default stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(cuda_err("synchronising"))
    }
}

impl Gpu {
    /// Median milliseconds of `reps` runs of `f` on the default stream, timed with CUDA events
    /// after one untimed warm-up run.
    pub fn time_ms(&self, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        use cudarc::driver::sys::CUevent_flags;
        f()?;
        let mut ms = Vec::with_capacity(reps.max(1));
        for _ in 0..reps.max(1) {
            let start = self
                .ctx
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(cuda_err("creating an event"))?;
            let end = self
                .ctx
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(cuda_err("creating an event"))?;
            start
                .record(&self.stream)
                .map_err(cuda_err("recording an event"))?;
            f()?;
            end.record(&self.stream)
                .map_err(cuda_err("recording an event"))?;
            ms.push(start.elapsed_ms(&end).map_err(cuda_err("timing"))? as f64);
        }
        ms.sort_by(|a, b| a.total_cmp(b));
        Ok(ms[ms.len() / 2])
    }
}

/// One measured kernel (or kernel sequence) for the device check's table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelTiming {
    /// The kernel's name as a profiler shows it (or the op's, for a sequence).
    pub name: String,
    /// The problem, e.g. "1M x 384 bf16, 32 queries, k 100".
    pub shape: String,
    pub ms: f64,
    /// Bytes the op must move at least (for GB/s), and FLOPs it performs (for TFLOP/s).
    pub bytes: f64,
    pub flops: f64,
}

// ---------------------------------------------------------------------------------------------
// Helpers shared by the op modules

/// A device buffer and its address (kernels take raw addresses, so launches record no events).
pub(crate) struct DevBuf<T> {
    pub(crate) slice: CudaSlice<T>,
    pub(crate) ptr: u64,
}

impl<T: DeviceRepr> DevBuf<T> {
    pub(crate) fn new(
        stream: &Arc<CudaStream>,
        len: usize,
        what: &str,
        count: &mut u64,
    ) -> Result<Self> {
        let slice = alloc(stream, len, what)?;
        *count += 1;
        let ptr = ptr(&slice, stream);
        Ok(DevBuf { slice, ptr })
    }

    pub(crate) fn len(&self) -> usize {
        self.slice.len()
    }
}

/// An uninitialised device buffer of `len` elements (at least one: a zero-length allocation is
/// not a valid device pointer). Callers write every element before they read it.
pub(crate) fn alloc<T: DeviceRepr>(
    stream: &Arc<CudaStream>,
    len: usize,
    what: &str,
) -> Result<CudaSlice<T>> {
    // SAFETY: uninitialised memory is only a hazard if read; see the contract above.
    unsafe { stream.alloc::<T>(len.max(1)) }.map_err(cuda_err(&format!("allocating {what}")))
}

/// The raw device address of a slice, for kernel arguments. Event tracking is off
/// ([`Gpu::open`]), so this records nothing: stream order is the buffers' synchronisation.
pub(crate) fn ptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    let (p, _record) = s.device_ptr(stream);
    p
}

/// A device copy of `host` (one element when empty: a zero-length allocation is not a valid
/// device pointer).
pub(crate) fn upload<T: DeviceRepr>(
    stream: &Arc<CudaStream>,
    host: &[T],
    what: &str,
) -> Result<CudaSlice<T>> {
    if host.is_empty() {
        return alloc(stream, 1, what);
    }
    stream
        .clone_htod(host)
        .map_err(cuda_err(&format!("uploading {what}")))
}

/// Fills `s` with 0xFF bytes (an f32, f64 or bf16 NaN), so an element no kernel writes cannot
/// pass for a result.
pub(crate) fn poison<T>(stream: &Arc<CudaStream>, s: &CudaSlice<T>) -> Result<()> {
    let bytes = s.len() * std::mem::size_of::<T>();
    // SAFETY: a byte fill of exactly the buffer's bytes, queued on the stream that owns it.
    unsafe {
        cudarc::driver::result::memset_d8_async(ptr(s, stream), 0xFF, bytes, stream.cu_stream())
    }
    .map_err(cuda_err("poisoning a buffer"))
}

/// Most blocks of a grid-stride launch: enough to fill any current GPU many times over.
const GRID_STRIDE_BLOCKS: usize = 1 << 16;

/// A grid-stride launch over `n` elements, `threads` per block.
pub(crate) fn grid_stride(n: usize, threads: u32) -> Result<LaunchConfig> {
    launch_cfg(
        n.div_ceil(threads as usize).min(GRID_STRIDE_BLOCKS),
        threads,
        0,
    )
}

pub(crate) fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m) * m
}

pub(crate) fn to_i32(x: usize, what: &str) -> Result<i32> {
    i32::try_from(x).map_err(|_| Error::InvalidArgument(format!("{what} ({x}) is too large")))
}

pub(crate) fn to_u32(x: usize, what: &str) -> Result<u32> {
    u32::try_from(x).map_err(|_| Error::InvalidArgument(format!("{what} ({x}) is too large")))
}

pub(crate) fn launch_cfg(grid: usize, block: u32, smem: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (to_u32(grid.max(1), "grid size")?, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: to_u32(smem, "shared memory")?,
    })
}

pub(crate) fn allow_smem(f: &CudaFunction, bytes: usize) -> Result<()> {
    // A kernel is shared by every op object built on one `Gpu`, so the limit only ever grows:
    // an op sized for less must not take room from one sized for more.
    let attribute = CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
    let want = to_i32(bytes, "shared memory")?;
    let now = f
        .get_attribute(attribute)
        .map_err(cuda_err("reading a kernel's shared memory size"))?;
    if want <= now {
        return Ok(());
    }
    f.set_attribute(attribute, want)
        .map_err(cuda_err("setting a kernel's shared memory size"))
}

/// cuBLAS (column-major) arguments of the row-major product `C[m × n] = op(A)·op(B)`, with
/// `op(A)` `[m × k]` and `op(B)` `[k × n]`, every matrix densely stored row by row.
///
/// A row-major `[r × c]` matrix is the column-major `[c × r]` one (its transpose) with leading
/// dimension c, so the product is computed as `Cᵀ = op(B)ᵀ·op(A)ᵀ`: cuBLAS's first operand is
/// B's memory and its second A's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ColMajorGemm {
    /// Transpose flags of cuBLAS's first (B's memory) and second (A's memory) operands.
    trans_first: bool,
    trans_second: bool,
    m: usize,
    n: usize,
    k: usize,
    ld_first: usize,
    ld_second: usize,
    ldc: usize,
}

pub(crate) fn col_major(
    trans_a: bool,
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
) -> ColMajorGemm {
    ColMajorGemm {
        // B stored [k × n] (or [n × k] when transposed): column-major, that is op(B)ᵀ already
        // (or its transpose).
        trans_first: trans_b,
        trans_second: trans_a,
        m: n,
        n: m,
        k,
        ld_first: if trans_b { k } else { n },
        ld_second: if trans_a { m } else { k },
        ldc: n,
    }
}

/// The arithmetic of the f32 products (f32 operands and results in every case; the
/// accumulation is f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GemmMath {
    /// Full f32 products: the CPU's arithmetic up to summation order.
    #[default]
    F32,
    /// Operands rounded to TF32 (10-bit mantissa) for the tensor cores.
    Tf32,
    /// Operands rounded to bf16 (8-bit mantissa) for the tensor cores: mixed-precision
    /// products, the arithmetic of bf16 autocast.
    Bf16,
}

impl GemmMath {
    fn compute_type(self) -> cudarc::cublas::sys::cublasComputeType_t {
        use cudarc::cublas::sys::cublasComputeType_t as C;
        match self {
            GemmMath::F32 => C::CUBLAS_COMPUTE_32F,
            GemmMath::Tf32 => C::CUBLAS_COMPUTE_32F_FAST_TF32,
            GemmMath::Bf16 => C::CUBLAS_COMPUTE_32F_FAST_16BF,
        }
    }
}

impl std::str::FromStr for GemmMath {
    type Err = Error;
    fn from_str(s: &str) -> Result<GemmMath> {
        match s {
            "f32" => Ok(GemmMath::F32),
            "tf32" => Ok(GemmMath::Tf32),
            "bf16" => Ok(GemmMath::Bf16),
            _ => Err(Error::InvalidArgument(format!(
                "unknown GEMM math `{s}`: expected f32, tf32 or bf16"
            ))),
        }
    }
}

impl std::fmt::Display for GemmMath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GemmMath::F32 => "f32",
            GemmMath::Tf32 => "tf32",
            GemmMath::Bf16 => "bf16",
        })
    }
}

/// A cuBLAS handle for products of f32 matrices, with the arithmetic they use.
pub(crate) struct F32Blas {
    blas: cudarc::cublas::CudaBlas,
    pub(crate) math: GemmMath,
}

/// A cuBLAS handle on `stream` for f32 products in full f32 (the default math mode: no TF32;
/// [`F32Blas::math`] can change that), or a typed error when libcublas is missing (cudarc
/// would panic on first use).
pub(crate) fn cublas_f32(stream: &Arc<CudaStream>) -> Result<F32Blas> {
    use cudarc::cublas::sys as blas_sys;
    // SAFETY: only tries to dlopen libcublas.
    if !unsafe { blas_sys::is_culib_present() } {
        return Err(Error::CudaUnavailable(
            "the cuBLAS library (libcublas) is not installed".into(),
        ));
    }
    let blas = cudarc::cublas::CudaBlas::new(stream.clone())
        .map_err(|e| Error::Cuda(format!("creating a cuBLAS handle: {e}")))?;
    // SAFETY: a live handle.
    unsafe {
        blas_sys::cublasSetMathMode(*blas.handle(), blas_sys::cublasMath_t::CUBLAS_DEFAULT_MATH)
            .result()
            .map_err(|e| Error::Cuda(format!("setting the cuBLAS math mode: {e}")))?;
    }
    Ok(F32Blas {
        blas,
        math: GemmMath::F32,
    })
}

/// Row-major `C[m × n] = op(A)·op(B) + beta·C` with f32 matrices on `blas`'s stream, in
/// `blas.math`; A, B and C the device addresses of dense row-major matrices (see
/// [`col_major`]).
///
/// # Safety
/// The addresses hold at least `op(A)`'s m·k, `op(B)`'s k·n and C's m·n floats, on the
/// handle's stream (or ordered before it).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm_row_major(
    blas: &F32Blas,
    trans_a: bool,
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
    a: u64,
    b: u64,
    beta: f32,
    c: u64,
) -> Result<()> {
    let shape = (trans_a, trans_b, m, n, k);
    gemm_row_major(blas, shape, Operands::F32, a, b, beta, c)
}

/// The element types of a product's matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Operands {
    /// A, B and C f32, in the handle's [`GemmMath`].
    F32,
    /// A and B bf16, C f32, f32 accumulation (`CUBLAS_COMPUTE_32F`): a weight gradient of
    /// bf16 activations, accumulated in f32.
    Bf16,
    /// A, B and C bf16, f32 accumulation: an activation (or its gradient) from bf16 operands.
    Bf16Out,
}

/// [`sgemm_row_major`] for A and B of either element type; `shape` is
/// `(trans_a, trans_b, m, n, k)`.
///
/// # Safety
/// As [`sgemm_row_major`], each matrix holding elements of `operands`' types.
pub(crate) unsafe fn gemm_row_major(
    blas: &F32Blas,
    (trans_a, trans_b, m, n, k): (bool, bool, usize, usize, usize),
    operands: Operands,
    a: u64,
    b: u64,
    beta: f32,
    c: u64,
) -> Result<()> {
    use cudarc::cublas::sys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
    use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
    use cudarc::cublas::sys::cudaDataType::{CUDA_R_16BF, CUDA_R_32F};
    let (ab_type, c_type, compute, what) = match operands {
        Operands::F32 => (
            CUDA_R_32F,
            CUDA_R_32F,
            blas.math.compute_type(),
            blas.math.to_string(),
        ),
        Operands::Bf16 => (CUDA_R_16BF, CUDA_R_32F, CUBLAS_COMPUTE_32F, "bf16".into()),
        Operands::Bf16Out => (CUDA_R_16BF, CUDA_R_16BF, CUBLAS_COMPUTE_32F, "bf16".into()),
    };
    let g = col_major(trans_a, trans_b, m, n, k);
    let op = |t: bool| if t { CUBLAS_OP_T } else { CUBLAS_OP_N };
    let alpha = 1.0f32;
    cudarc::cublas::result::gemm_ex(
        *blas.blas.handle(),
        op(g.trans_first),
        op(g.trans_second),
        to_i32(g.m, "GEMM size")?,
        to_i32(g.n, "GEMM size")?,
        to_i32(g.k, "GEMM size")?,
        &alpha as *const f32 as *const std::ffi::c_void,
        b as *const std::ffi::c_void,
        ab_type,
        to_i32(g.ld_first, "GEMM stride")?,
        a as *const std::ffi::c_void,
        ab_type,
        to_i32(g.ld_second, "GEMM stride")?,
        &beta as *const f32 as *const std::ffi::c_void,
        c as *mut std::ffi::c_void,
        c_type,
        to_i32(g.ldc, "GEMM stride")?,
        compute,
        cudarc::cublas::sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
    )
    .map_err(|e| Error::Cuda(format!("cuBLAS {what} GEMM {m} × {n} × {k}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_math_names_round_trip() {
        for m in [GemmMath::F32, GemmMath::Tf32, GemmMath::Bf16] {
            assert_eq!(m.to_string().parse::<GemmMath>().unwrap(), m);
        }
        assert_eq!(GemmMath::default(), GemmMath::F32);
        assert!("fp16".parse::<GemmMath>().is_err());
    }

    /// BLAS sgemm semantics on column-major storage: C = op(A)·op(B), C `[m × n]`.
    #[allow(clippy::too_many_arguments)]
    fn sgemm_col_major(
        ta: bool,
        tb: bool,
        m: usize,
        n: usize,
        k: usize,
        a: &[f64],
        lda: usize,
        b: &[f64],
        ldb: usize,
        c: &mut [f64],
        ldc: usize,
    ) {
        for j in 0..n {
            for i in 0..m {
                let mut s = 0.0;
                for l in 0..k {
                    let av = if ta { a[l + i * lda] } else { a[i + l * lda] };
                    let bv = if tb { b[j + l * ldb] } else { b[l + j * ldb] };
                    s += av * bv;
                }
                c[i + j * ldc] = s;
            }
        }
    }

    #[test]
    fn row_major_products_map_onto_column_major_blas() {
        let (m, n, k) = (5usize, 3usize, 7usize);
        let val = |i: usize, salt: usize| ((i * 37 + salt * 11) % 17) as f64 - 8.0;
        for ta in [false, true] {
            for tb in [false, true] {
                // A stored [m × k] (or [k × m] when transposed), B [k × n] (or [n × k]).
                let a: Vec<f64> = (0..m * k).map(|i| val(i, 1)).collect();
                let b: Vec<f64> = (0..k * n).map(|i| val(i, 2)).collect();
                let at = |i: usize, l: usize| if ta { a[l * m + i] } else { a[i * k + l] };
                let bt = |l: usize, j: usize| if tb { b[j * k + l] } else { b[l * n + j] };
                let mut want = vec![0.0; m * n];
                for i in 0..m {
                    for j in 0..n {
                        want[i * n + j] = (0..k).map(|l| at(i, l) * bt(l, j)).sum();
                    }
                }
                let g = col_major(ta, tb, m, n, k);
                let mut got = vec![f64::NAN; m * n];
                sgemm_col_major(
                    g.trans_first,
                    g.trans_second,
                    g.m,
                    g.n,
                    g.k,
                    &b,
                    g.ld_first,
                    &a,
                    g.ld_second,
                    &mut got,
                    g.ldc,
                );
                assert_eq!(got, want, "trans_a {ta}, trans_b {tb}");
            }
        }
    }
}
