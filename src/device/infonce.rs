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
//! [`GpuInfoNce::run`] is host-to-host (uploads, three launches, downloads); [`InfoNceBuffers`]
//! keeps everything on the device for repeated launches (the benchmark). The device outputs are
//! filled with NaN before every launch, so an element a kernel failed to write cannot pass for a
//! result.

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

/// The three kernels, loaded once.
pub struct GpuInfoNce {
    rows: CudaFunction,
    dq: CudaFunction,
    dd: CudaFunction,
}

/// Every device buffer of one problem size, inputs uploaded.
pub struct InfoNceBuffers {
    b_n: usize,
    d_n: usize,
    dim: usize,
    inv_tau: f64,
    queries: CudaSlice<f32>,
    docs: CudaSlice<f32>,
    targets: CudaSlice<i32>,
    log_weights: Option<CudaSlice<f32>>,
    lse: CudaSlice<f64>,
    stats: CudaSlice<f64>,
    dq: CudaSlice<f32>,
    dd: CudaSlice<f32>,
}

impl InfoNceBuffers {
    /// Validates `inp` (like the CPU) and uploads it.
    pub fn upload(gpu: &Gpu, inp: &InfoNceInput<'_>) -> Result<InfoNceBuffers> {
        let (b_n, d_n) = validate(inp)?;
        let dim = inp.dim;
        let stream = gpu.stream();
        let up = |x: &[f32], what: &str| {
            stream
                .clone_htod(x)
                .map_err(cuda_err(&format!("uploading {what}")))
        };
        let targets: Vec<i32> = inp.targets.iter().map(|&t| t as i32).collect();
        Ok(InfoNceBuffers {
            b_n,
            d_n,
            dim,
            inv_tau: 1.0 / inp.tau as f64,
            queries: up(inp.queries, "queries")?,
            docs: up(inp.docs, "documents")?,
            targets: stream
                .clone_htod(&targets)
                .map_err(cuda_err("uploading targets"))?,
            log_weights: match inp.log_weights {
                Some(w) => Some(up(w, "log weights")?),
                None => None,
            },
            lse: alloc(stream, b_n, "per-query LSE")?,
            stats: alloc(stream, b_n * STATS, "per-query statistics")?,
            dq: alloc(stream, b_n * dim, "dq")?,
            dd: alloc(stream, d_n * dim, "dd")?,
        })
    }
}

impl GpuInfoNce {
    pub fn new(gpu: &Gpu) -> Result<GpuInfoNce> {
        Ok(GpuInfoNce {
            rows: gpu.function(MODULE, "rrra_infonce_rows")?,
            dq: gpu.function(MODULE, "rrra_infonce_dq")?,
            dd: gpu.function(MODULE, "rrra_infonce_dd")?,
        })
    }

    /// Loss and gradients of `inp`, like the CPU's `info_nce`: `dq` (`[B × dim]`) and `dd`
    /// (`[D × dim]`) are overwritten. Errors: the CPU's `InvalidArgument`s (and sizes beyond
    /// 32-bit indices), `Cuda` on a device failure.
    pub fn run(
        &self,
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
        let bufs = InfoNceBuffers::upload(gpu, inp)?;
        self.launch(gpu, &bufs)?;
        let stream = gpu.stream();
        stream
            .memcpy_dtoh(&bufs.dq, dq)
            .map_err(cuda_err("downloading dq"))?;
        stream
            .memcpy_dtoh(&bufs.dd, dd)
            .map_err(cuda_err("downloading dd"))?;
        let stats = stream
            .clone_dtoh(&bufs.stats)
            .map_err(cuda_err("downloading loss statistics"))?;
        gpu.synchronize()?;
        Ok(fold_stats(&stats, b_n))
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
        let lw = bufs.log_weights.as_ref().map_or(0u64, |w| ptr(w, stream));
        let lse = ptr(&bufs.lse, stream);
        let st = ptr(&bufs.stats, stream);
        let dq = ptr(&bufs.dq, stream);
        let dd = ptr(&bufs.dd, stream);
        // SAFETY: raw byte fills of buffers of exactly these sizes (0xFF bytes are f32/f64 NaN).
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
        // the buffers hold the B × dim, D × dim, B, B × D, B, B × 5 elements the kernels index;
        // `lw` is null when there are no log weights, which the kernels check.
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
