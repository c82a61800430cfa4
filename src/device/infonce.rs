//! The fused weighted InfoNCE loss (forward and backward) on the GPU: the device twin of
//! [`info_nce`](crate::train::loss::info_nce), same inputs ([`InfoNceInput`]), same outputs
//! (statistics, `dq`, `dd`).
//!
//! Three kernels (`kernels/infonce.cu`): per query, scores on the fly with an online
//! log-sum-exp (only the per-query LSE and statistics are kept, never the `B × D` score matrix);
//! then `dq` per query and `dd` per document, each recomputing its row's or column's
//! probabilities from the saved LSE and summing in index order: deterministic, without atomics,
//! and in the CPU's order. See the kernel file for the arithmetic; gradients agree with the CPU
//! to about one f32 rounding per term.
//!
//! [`GpuInfoNce::run`] is host-to-host (uploads, three launches, downloads) through buffers it
//! keeps between calls; [`InfoNceBuffers`] keeps everything on the device for repeated launches
//! (the benchmark). The device outputs are filled with NaN before every launch, so an element
//! a kernel failed to write cannot pass for a result.

use super::runtime::{alloc, cuda_err, ptr, to_i32, Gpu, KernelTiming};
use crate::error::{Error, Result};
use crate::train::loss::{InfoNceInput, InfoNceStats};
use cudarc::driver::{result as cu, CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};

const MODULE: &str = "infonce";
const THREADS: u32 = 256;
/// Per-query statistics the rows kernel writes: loss, correct, positive score, negative sum and
/// count.
const STATS: usize = 5;

fn cfg(blocks: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (to_i32(blocks.max(1), "grid size")? as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// The CPU's checks ([`InfoNceInput::check`]), and sizes the kernels can index; returns (B, D).
fn validate(inp: &InfoNceInput<'_>) -> Result<(usize, usize)> {
    let (b_n, d_n) = inp.check()?;
    let dim = inp.dim;
    to_i32(b_n, "query count")?;
    to_i32(d_n, "document count")?;
    to_i32(dim, "dimension")?;
    Ok((b_n, d_n))
}

/// The three kernels, loaded once, and the buffers of the largest problem seen so far.
pub struct GpuInfoNce {
    rows: CudaFunction,
    dq: CudaFunction,
    dd: CudaFunction,
    /// Reused by [`GpuInfoNce::run`]: a training step of a fixed shape allocates nothing after
    /// its first call.
    bufs: Option<InfoNceBuffers>,
}

/// Every device buffer of one problem, inputs uploaded. Buffers may be larger than the problem
/// they hold (after [`InfoNceBuffers::refill`] with a smaller one).
pub struct InfoNceBuffers {
    b_n: usize,
    d_n: usize,
    dim: usize,
    inv_tau: f64,
    weighted: bool,
    queries: CudaSlice<f32>,
    docs: CudaSlice<f32>,
    targets: CudaSlice<i32>,
    log_weights: Option<CudaSlice<f32>>,
    lse: CudaSlice<f64>,
    stats: CudaSlice<f64>,
    dq: CudaSlice<f32>,
    dd: CudaSlice<f32>,
    allocations: u64,
}

/// `slot` if it holds at least `n` elements, else a new buffer of `n` (counted in `allocations`).
fn room<T: cudarc::driver::DeviceRepr>(
    gpu: &Gpu,
    slot: Option<CudaSlice<T>>,
    n: usize,
    what: &str,
    allocations: &mut u64,
) -> Result<CudaSlice<T>> {
    match slot {
        Some(s) if s.len() >= n => Ok(s),
        _ => {
            *allocations += 1;
            alloc(gpu.stream(), n, what)
        }
    }
}

impl InfoNceBuffers {
    /// Validates `inp` (like the CPU) and uploads it into new buffers of its size.
    pub fn upload(gpu: &Gpu, inp: &InfoNceInput<'_>) -> Result<InfoNceBuffers> {
        Self::fill(gpu, None, inp)
    }

    /// Validates `inp` and uploads it, reusing this problem's buffers where they are large
    /// enough. On an invalid input the buffers are dropped, never half-filled.
    pub fn refill(self, gpu: &Gpu, inp: &InfoNceInput<'_>) -> Result<InfoNceBuffers> {
        Self::fill(gpu, Some(self), inp)
    }

    /// Device allocations these buffers have taken since the first upload.
    pub fn device_allocations(&self) -> u64 {
        self.allocations
    }

    fn fill(gpu: &Gpu, old: Option<InfoNceBuffers>, inp: &InfoNceInput<'_>) -> Result<Self> {
        let (b_n, d_n) = validate(inp)?;
        let dim = inp.dim;
        let mut n = old.as_ref().map_or(0, |o| o.allocations);
        let (queries, docs, targets, mut log_weights, lse, stats, dq, dd) = match old {
            Some(o) => (
                Some(o.queries),
                Some(o.docs),
                Some(o.targets),
                o.log_weights,
                Some(o.lse),
                Some(o.stats),
                Some(o.dq),
                Some(o.dd),
            ),
            None => (None, None, None, None, None, None, None, None),
        };
        let targets_i32: Vec<i32> = inp.targets.iter().map(|&t| t as i32).collect();
        let mut q = room(gpu, queries, b_n * dim, "queries", &mut n)?;
        up(gpu, inp.queries, &mut q, "queries")?;
        let mut d = room(gpu, docs, d_n * dim, "documents", &mut n)?;
        up(gpu, inp.docs, &mut d, "documents")?;
        let mut t = room(gpu, targets, b_n, "targets", &mut n)?;
        up(gpu, &targets_i32, &mut t, "targets")?;
        if let Some(w) = inp.log_weights {
            let mut dst = room(gpu, log_weights.take(), b_n * d_n, "log weights", &mut n)?;
            up(gpu, w, &mut dst, "log weights")?;
            log_weights = Some(dst);
        }
        Ok(InfoNceBuffers {
            b_n,
            d_n,
            dim,
            inv_tau: 1.0 / inp.tau as f64,
            weighted: inp.log_weights.is_some(),
            queries: q,
            docs: d,
            targets: t,
            log_weights,
            lse: room(gpu, lse, b_n, "per-query LSE", &mut n)?,
            stats: room(gpu, stats, b_n * STATS, "per-query statistics", &mut n)?,
            dq: room(gpu, dq, b_n * dim, "dq", &mut n)?,
            dd: room(gpu, dd, d_n * dim, "dd", &mut n)?,
            allocations: n,
        })
    }
}

/// Copies `host` into the front of `dst` (at least as long).
fn up<T: cudarc::driver::DeviceRepr>(
    gpu: &Gpu,
    host: &[T],
    dst: &mut CudaSlice<T>,
    what: &str,
) -> Result<()> {
    gpu.stream()
        .memcpy_htod(host, &mut dst.slice_mut(..host.len()))
        .map_err(cuda_err(&format!("uploading {what}")))
}

impl GpuInfoNce {
    pub fn new(gpu: &Gpu) -> Result<GpuInfoNce> {
        Ok(GpuInfoNce {
            rows: gpu.function(MODULE, "rrra_infonce_rows")?,
            dq: gpu.function(MODULE, "rrra_infonce_dq")?,
            dd: gpu.function(MODULE, "rrra_infonce_dd")?,
            bufs: None,
        })
    }

    /// Device allocations [`GpuInfoNce::run`] has made so far (none once its buffers fit).
    pub fn device_allocations(&self) -> u64 {
        self.bufs.as_ref().map_or(0, |b| b.allocations)
    }

    /// Loss and gradients of `inp`, like the CPU's `info_nce`: `dq` (`[B × dim]`) and `dd`
    /// (`[D × dim]`) are overwritten. The device buffers are kept for the next call and grow
    /// only for a larger problem. Errors: the CPU's `InvalidArgument`s (and sizes beyond 32-bit
    /// indices), `Cuda` on a device failure.
    pub fn run(
        &mut self,
        gpu: &Gpu,
        inp: &InfoNceInput<'_>,
        dq: &mut [f32],
        dd: &mut [f32],
    ) -> Result<InfoNceStats> {
        let (b_n, d_n) = validate(inp)?;
        if dq.len() != b_n * inp.dim || dd.len() != d_n * inp.dim {
            return Err(Error::InvalidArgument(format!(
                "InfoNCE gradient buffers: dq has {} floats (want {}), dd {} (want {})",
                dq.len(),
                b_n * inp.dim,
                dd.len(),
                d_n * inp.dim
            )));
        }
        let bufs = match self.bufs.take() {
            Some(old) => old.refill(gpu, inp)?,
            None => InfoNceBuffers::upload(gpu, inp)?,
        };
        let out = self.launch(gpu, &bufs).and_then(|()| {
            let stream = gpu.stream();
            stream
                .memcpy_dtoh(&bufs.dq.slice(..dq.len()), dq)
                .map_err(cuda_err("downloading dq"))?;
            stream
                .memcpy_dtoh(&bufs.dd.slice(..dd.len()), dd)
                .map_err(cuda_err("downloading dd"))?;
            let stats = stream
                .clone_dtoh(&bufs.stats.slice(..b_n * STATS))
                .map_err(cuda_err("downloading loss statistics"))?;
            gpu.synchronize()?;
            Ok(fold_stats(&stats, b_n))
        });
        self.bufs = Some(bufs);
        out
    }

    /// Poisons the outputs with NaN, then runs the three kernels on `bufs` (queued on the
    /// default stream; nothing is synchronised).
    pub fn launch(&self, gpu: &Gpu, bufs: &InfoNceBuffers) -> Result<()> {
        let stream = gpu.stream();
        let (b_i, d_i, dim_i) = (
            to_i32(bufs.b_n, "query count")?,
            to_i32(bufs.d_n, "document count")?,
            to_i32(bufs.dim, "dimension")?,
        );
        let inv_tau = bufs.inv_tau;
        let inv_b = 1.0 / bufs.b_n as f64;
        let q = ptr(&bufs.queries, stream);
        let dc = ptr(&bufs.docs, stream);
        let t = ptr(&bufs.targets, stream);
        let lw = match (&bufs.log_weights, bufs.weighted) {
            (Some(w), true) => ptr(w, stream),
            _ => 0u64,
        };
        let lse = ptr(&bufs.lse, stream);
        let st = ptr(&bufs.stats, stream);
        let dq = ptr(&bufs.dq, stream);
        let dd = ptr(&bufs.dd, stream);
        // SAFETY: raw byte fills of whole buffers, of exactly these sizes (0xFF bytes are f32
        // and f64 NaN).
        unsafe {
            let s = stream.cu_stream();
            cu::memset_d8_async(dq, 0xFF, bufs.dq.len() * 4, s)
                .and_then(|_| cu::memset_d8_async(dd, 0xFF, bufs.dd.len() * 4, s))
                .and_then(|_| cu::memset_d8_async(lse, 0xFF, bufs.lse.len() * 8, s))
                .and_then(|_| cu::memset_d8_async(st, 0xFF, bufs.stats.len() * 8, s))
        }
        .map_err(cuda_err("poisoning the InfoNCE outputs"))?;
        // SAFETY (all three launches): the arguments match the kernels' signatures in
        // kernels/infonce.cu, in order and type (pointers as u64, int as i32, double as f64);
        // the buffers hold at least the B × dim, D × dim, B, B × D, B, B × 5 elements the kernels
        // index; `lw` is null when there are no log weights, which the kernels check.
        unsafe {
            stream
                .launch_builder(&self.rows)
                .arg(&q)
                .arg(&dc)
                .arg(&t)
                .arg(&lw)
                .arg(&d_i)
                .arg(&dim_i)
                .arg(&inv_tau)
                .arg(&lse)
                .arg(&st)
                .launch(cfg(bufs.b_n)?)
        }
        .map_err(cuda_err("launching rrra_infonce_rows"))?;
        unsafe {
            stream
                .launch_builder(&self.dq)
                .arg(&q)
                .arg(&dc)
                .arg(&t)
                .arg(&lw)
                .arg(&d_i)
                .arg(&dim_i)
                .arg(&inv_tau)
                .arg(&inv_b)
                .arg(&lse)
                .arg(&dq)
                .launch(cfg(bufs.b_n)?)
        }
        .map_err(cuda_err("launching rrra_infonce_dq"))?;
        unsafe {
            stream
                .launch_builder(&self.dd)
                .arg(&q)
                .arg(&dc)
                .arg(&t)
                .arg(&lw)
                .arg(&b_i)
                .arg(&d_i)
                .arg(&dim_i)
                .arg(&inv_tau)
                .arg(&inv_b)
                .arg(&lse)
                .arg(&dd)
                .launch(cfg(bufs.d_n)?)
        }
        .map_err(cuda_err("launching rrra_infonce_dd"))?;
        Ok(())
    }
}

/// The CPU's statistics from the per-query rows (summed in query order, like the CPU).
fn fold_stats(stats: &[f64], b_n: usize) -> InfoNceStats {
    let inv_b = 1.0 / b_n as f64;
    let (mut loss, mut correct, mut pos, mut neg, mut count) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for r in stats.chunks_exact(STATS).take(b_n) {
        loss += r[0];
        correct += r[1];
        pos += r[2];
        neg += r[3];
        count += r[4];
    }
    InfoNceStats {
        loss: loss * inv_b,
        accuracy: correct * inv_b,
        mean_positive: pos * inv_b,
        mean_negative: if count > 0.0 { neg / count } else { 0.0 },
    }
}

/// Times the fused op (three kernels, device-resident) at a training step's size: 64 queries,
/// 512 documents (positive + 7 negatives each), dim 768, with log weights.
pub fn bench(gpu: &Gpu) -> Result<Vec<KernelTiming>> {
    let op = GpuInfoNce::new(gpu)?;
    let mut rows = Vec::new();
    for (b_n, d_n, dim) in [(64usize, 512usize, 768usize), (256, 2048, 768)] {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 * 0.2 - 0.1
        };
        let queries: Vec<f32> = (0..b_n * dim).map(|_| rnd()).collect();
        let docs: Vec<f32> = (0..d_n * dim).map(|_| rnd()).collect();
        let lw: Vec<f32> = (0..b_n * d_n).map(|_| rnd()).collect();
        let targets: Vec<usize> = (0..b_n).map(|b| b * (d_n / b_n)).collect();
        let inp = InfoNceInput {
            queries: &queries,
            docs: &docs,
            dim,
            targets: &targets,
            log_weights: Some(&lw),
            tau: 0.05,
        };
        let bufs = InfoNceBuffers::upload(gpu, &inp)?;
        let ms = gpu.time_ms(20, || op.launch(gpu, &bufs))?;
        let (b, d, k) = (b_n as f64, d_n as f64, dim as f64);
        rows.push(KernelTiming {
            name: "rrra_infonce_{rows,dq,dd}".into(),
            shape: format!("B {b_n} x D {d_n}, d {dim}, f32"),
            ms,
            // inputs once, log weights once, gradients written once (the minimum traffic)
            bytes: 4.0 * (b + d) * k * 2.0 + 4.0 * b * d,
            // three score passes (2 flops per product) and two gradient sums
            flops: 6.0 * b * d * k + 4.0 * b * d * k,
        });
    }
    Ok(rows)
}
