//! Weighted negative sampling without replacement on the GPU: the draws of
//! [`sample_without_replacement`](crate::train::sampler::sample_without_replacement) for a batch
//! of queries at once, from the same counter-based Philox streams, so a query's negatives are
//! the same whichever side draws them.
//!
//! * [`DeviceStream`]: the four 32-bit words that identify a [`Stream`](crate::train::rng::Stream)
//!   (its key and the high counter words), computed exactly as `Stream::new` does; the kernel
//!   regenerates the Gumbel noise from them.
//! * [`GpuSampler::sample`]: `[Q × P]` f64 log weights and one stream per query in, the draws
//!   out (`min(n, eligible)` distinct pool indices per query, in draw order).
//! * [`GpuSampler::simans_log_weights`]: the SimANS / TriSampler Gaussian log weight on the device
//!   (`-a (s - s+ - b)^2`, the CPU's operation order), and [`GpuSampler::rrra_log_weights`], the
//!   RRRA weight of `rrra_log_weights`. Uniform rank ranges and TriSampler regions are masks (a
//!   `-inf` per excluded candidate) that the host writes at negligible cost; they have no kernel.
//!
//! The kernels and their exactness argument are in `kernels/sampler.cu`: the only floating-point
//! difference from the CPU is CUDA's double `ln` (≤ 1 ulp), which can reorder two keys only when
//! they agree to ~1e-16.

use super::runtime::{alloc, cuda_err, ptr, to_i32, Gpu, KernelTiming};
use crate::error::{Error, Result};
use crate::train::rng::{philox4x32_10, Site};
use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};

const MODULE: &str = "sampler";
const THREADS: u32 = 256;

/// The identity of one Philox stream: what the kernel needs to regenerate `gumbel_at(i)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceStream {
    /// Philox key (the seed's low and high words).
    pub key: [u32; 2],
    /// Counter words 2 and 3 (step, and example/layer/site folded).
    pub ctr_hi: [u32; 2],
}

impl DeviceStream {
    /// The words of `Stream::new(seed, step, example, layer, site)` (same folding, bit for bit).
    pub fn new(seed: u64, step: u64, example: u64, layer: u32, site: Site) -> Self {
        let tag = ((example as u32) << 12) ^ ((layer & 0xff) << 4) ^ (site as u32);
        DeviceStream {
            key: [seed as u32, (seed >> 32) as u32],
            ctr_hi: [
                step as u32 ^ ((step >> 32) as u32).rotate_left(16),
                tag ^ ((example >> 20) as u32),
            ],
        }
    }

    /// Four raw words for block `i`: equal to `Stream::block(i)` of the same stream (the tests
    /// check it).
    pub fn block(&self, i: u64) -> [u32; 4] {
        philox4x32_10(
            [i as u32, (i >> 32) as u32, self.ctr_hi[0], self.ctr_hi[1]],
            self.key,
        )
    }

    fn words(&self) -> [u32; 4] {
        [self.key[0], self.key[1], self.ctr_hi[0], self.ctr_hi[1]]
    }
}

/// The draws of one batch: `picks[q]` are query q's pool indices in draw order, `keys[q]` their
/// Gumbel keys (`log_w + G`, descending).
#[derive(Debug, Clone, PartialEq)]
pub struct Draws {
    pub picks: Vec<Vec<usize>>,
    pub keys: Vec<Vec<f64>>,
}

/// The sampler kernels, loaded once.
pub struct GpuSampler {
    top_n: CudaFunction,
    simans: CudaFunction,
    rrra: CudaFunction,
}

fn grid(blocks: usize) -> Result<LaunchConfig> {
    let g = u32::try_from(blocks.max(1))
        .ok()
        .filter(|&g| g <= i32::MAX as u32)
        .ok_or_else(|| Error::InvalidArgument(format!("{blocks} blocks is too many")))?;
    Ok(LaunchConfig {
        grid_dim: (g, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

impl GpuSampler {
    pub fn new(gpu: &Gpu) -> Result<GpuSampler> {
        Ok(GpuSampler {
            top_n: gpu.function(MODULE, "rrra_sampler_gumbel_top_n")?,
            simans: gpu.function(MODULE, "rrra_sampler_simans_log_weights")?,
            rrra: gpu.function(MODULE, "rrra_sampler_rrra_log_weights")?,
        })
    }

    /// Draws `n` negatives without replacement for each of the `streams.len()` queries from
    /// `log_w` (`[Q × pool]`, row-major): the draws of `sample_without_replacement(row, n,
    /// stream)` per row. Errors: shapes that disagree or exceed the kernel's 32-bit indices
    /// (`InvalidArgument`), a device failure (`Cuda`).
    pub fn sample(
        &self,
        gpu: &Gpu,
        log_w: &[f64],
        pool: usize,
        n: usize,
        streams: &[DeviceStream],
    ) -> Result<Vec<Vec<usize>>> {
        Ok(self.sample_with_keys(gpu, log_w, pool, n, streams)?.picks)
    }

    /// [`sample`](Self::sample), also returning the keys of the drawn candidates.
    pub fn sample_with_keys(
        &self,
        gpu: &Gpu,
        log_w: &[f64],
        pool: usize,
        n: usize,
        streams: &[DeviceStream],
    ) -> Result<Draws> {
        let q_n = streams.len();
        if log_w.len() != q_n.saturating_mul(pool) || (q_n > 0 && pool == 0 && !log_w.is_empty()) {
            return Err(Error::InvalidArgument(format!(
                "sampler: {} log weights for {q_n} queries with pools of {pool}",
                log_w.len()
            )));
        }
        let n = n.min(pool);
        if q_n == 0 || n == 0 {
            return Ok(Draws {
                picks: vec![Vec::new(); q_n],
                keys: vec![Vec::new(); q_n],
            });
        }
        to_i32(pool, "pool size")?;
        to_i32(q_n, "query count")?;
        q_n.checked_mul(n)
            .filter(|&x| x <= i32::MAX as usize)
            .ok_or_else(|| Error::InvalidArgument("sampler: Q × n is too large".into()))?;
        let stream = gpu.stream();
        let words: Vec<u32> = streams.iter().flat_map(|s| s.words()).collect();
        let d_lw = stream
            .clone_htod(log_w)
            .map_err(cuda_err("uploading log weights"))?;
        let d_streams = stream
            .clone_htod(&words)
            .map_err(cuda_err("uploading stream keys"))?;
        let d_keys = alloc::<f64>(stream, q_n * pool, "sampler keys")?;
        let d_out = alloc::<i32>(stream, q_n * n, "sampler output")?;
        let d_counts = alloc::<i32>(stream, q_n, "sampler counts")?;
        let d_out_keys = alloc::<f64>(stream, q_n * n, "sampler output keys")?;
        self.launch_top_n(
            gpu,
            ptr(&d_lw, stream),
            ptr(&d_streams, stream),
            q_n,
            pool,
            n,
            ptr(&d_keys, stream),
            ptr(&d_out, stream),
            ptr(&d_counts, stream),
            ptr(&d_out_keys, stream),
        )?;
        let out = stream
            .clone_dtoh(&d_out)
            .map_err(cuda_err("downloading draws"))?;
        let counts = stream
            .clone_dtoh(&d_counts)
            .map_err(cuda_err("downloading draw counts"))?;
        let keys = stream
            .clone_dtoh(&d_out_keys)
            .map_err(cuda_err("downloading draw keys"))?;
        gpu.synchronize()?;
        let mut picks = Vec::with_capacity(q_n);
        let mut kv = Vec::with_capacity(q_n);
        for q in 0..q_n {
            let c = counts[q];
            if c < 0 || c as usize > n {
                return Err(Error::Cuda(format!(
                    "sampler kernel returned a count of {c} for query {q} (n = {n})"
                )));
            }
            let row = &out[q * n..q * n + c as usize];
            if let Some(bad) = row.iter().find(|&&i| i < 0 || i as usize >= pool) {
                return Err(Error::Cuda(format!(
                    "sampler kernel returned index {bad} for query {q} (pool {pool})"
                )));
            }
            picks.push(row.iter().map(|&i| i as usize).collect());
            kv.push(keys[q * n..q * n + c as usize].to_vec());
        }
        Ok(Draws { picks, keys: kv })
    }

    #[allow(clippy::too_many_arguments)]
    fn launch_top_n(
        &self,
        gpu: &Gpu,
        log_w: u64,
        streams: u64,
        q_n: usize,
        pool: usize,
        n: usize,
        keys: u64,
        out: u64,
        counts: u64,
        out_keys: u64,
    ) -> Result<()> {
        let (p_i, n_i) = (to_i32(pool, "pool size")?, to_i32(n, "n")?);
        // SAFETY: argument types match the kernel's (const double*, const u32*, int, int,
        // double*, int*, int*, double*); every buffer holds the [Q × P] / [Q × n] / [Q] elements
        // the kernel indexes, as allocated by the callers.
        unsafe {
            gpu.stream()
                .launch_builder(&self.top_n)
                .arg(&log_w)
                .arg(&streams)
                .arg(&p_i)
                .arg(&n_i)
                .arg(&keys)
                .arg(&out)
                .arg(&counts)
                .arg(&out_keys)
                .launch(grid(q_n)?)
        }
        .map_err(cuda_err("launching rrra_sampler_gumbel_top_n"))?;
        Ok(())
    }

    /// SimANS log weights `-a (s - s+ - b)^2` (f64, the CPU's `log_weights` for
    /// `SamplerKind::SimAns { a, b }`; TriSampler's un-restricted weight is `a = 0.25, b = 0`) of
    /// `scores` (`[Q × pool]` raw similarities) against one positive score per query. Checks
    /// like the CPU: finite scores and positives, `a` positive and finite, `b` finite.
    pub fn simans_log_weights(
        &self,
        gpu: &Gpu,
        scores: &[f32],
        pos: &[f32],
        a: f64,
        b: f64,
    ) -> Result<Vec<f64>> {
        let q_n = pos.len();
        if q_n == 0 || !scores.len().is_multiple_of(q_n) {
            return Err(Error::InvalidArgument(format!(
                "simans log weights: {} scores for {q_n} positives",
                scores.len()
            )));
        }
        let pool = scores.len() / q_n;
        if !(a > 0.0 && a.is_finite() && b.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "simans needs a > 0 finite and b finite, got a = {a}, b = {b}"
            )));
        }
        if scores.iter().chain(pos).any(|s| !s.is_finite()) {
            return Err(Error::InvalidArgument(
                "simans log weights: a score is not finite".into(),
            ));
        }
        if pool == 0 {
            return Ok(Vec::new());
        }
        let p_i = to_i32(pool, "pool size")?;
        let q_ll =
            i64::try_from(q_n).map_err(|_| Error::InvalidArgument("too many queries".into()))?;
        let stream = gpu.stream();
        let d_s = stream
            .clone_htod(scores)
            .map_err(cuda_err("uploading scores"))?;
        let d_p = stream
            .clone_htod(pos)
            .map_err(cuda_err("uploading positive scores"))?;
        let d_lw = alloc::<f64>(stream, scores.len(), "log weights")?;
        let (ps, pp, pl) = (ptr(&d_s, stream), ptr(&d_p, stream), ptr(&d_lw, stream));
        let blocks = scores.len().div_ceil(THREADS as usize).min(65_536);
        // SAFETY: (const float*, const float*, long long, int, double, double, double*); the
        // buffers hold Q × P, Q and Q × P elements.
        unsafe {
            stream
                .launch_builder(&self.simans)
                .arg(&ps)
                .arg(&pp)
                .arg(&q_ll)
                .arg(&p_i)
                .arg(&a)
                .arg(&b)
                .arg(&pl)
                .launch(grid(blocks)?)
        }
        .map_err(cuda_err("launching rrra_sampler_simans_log_weights"))?;
        let out = stream
            .clone_dtoh(&d_lw)
            .map_err(cuda_err("downloading log weights"))?;
        gpu.synchronize()?;
        Ok(out)
    }
}

impl GpuSampler {
    /// The RRRA log weights of `rrra_log_weights(scores, s_fn, tau, gamma, t_h)` for each of the
    /// `scores.len() / pool` query rows (`[Q × pool]`, raw similarities, and the adapter's
    /// false-negative scores in [0, 1]): `(s - max s) / (tau t_h) + gamma ln(1 - s_FN)` in f64.
    /// Checks like the CPU (equal lengths, finite scores, `s_FN` in [0, 1]).
    #[allow(clippy::too_many_arguments)]
    pub fn rrra_log_weights(
        &self,
        gpu: &Gpu,
        scores: &[f32],
        s_fn: &[f32],
        pool: usize,
        tau: f32,
        gamma: f64,
        t_h: f64,
    ) -> Result<Vec<f64>> {
        if scores.len() != s_fn.len() || pool == 0 || !scores.len().is_multiple_of(pool) {
            return Err(Error::InvalidArgument(format!(
                "sampler rrra: {} scores, {} false-negative scores, pools of {pool}",
                scores.len(),
                s_fn.len()
            )));
        }
        if let Some(i) =
            (0..scores.len()).find(|&i| !scores[i].is_finite() || !(0.0..=1.0).contains(&s_fn[i]))
        {
            return Err(Error::InvalidArgument(format!(
                "sampler rrra: candidate {i} has score {} and false-negative score {}",
                scores[i], s_fn[i]
            )));
        }
        let q_n = scores.len() / pool;
        if q_n == 0 {
            return Ok(Vec::new());
        }
        let p_i = to_i32(pool, "pool size")?;
        let scale = 1.0 / (tau as f64 * t_h);
        let stream = gpu.stream();
        let d_s = stream
            .clone_htod(scores)
            .map_err(cuda_err("uploading scores"))?;
        let d_f = stream
            .clone_htod(s_fn)
            .map_err(cuda_err("uploading false-negative scores"))?;
        let d_lw = alloc::<f64>(stream, scores.len(), "log weights")?;
        let (ps, pf, pl) = (ptr(&d_s, stream), ptr(&d_f, stream), ptr(&d_lw, stream));
        // SAFETY: (const float*, const float*, int, double, double, double*); the buffers hold
        // Q × P elements and the grid has one block per query row.
        unsafe {
            stream
                .launch_builder(&self.rrra)
                .arg(&ps)
                .arg(&pf)
                .arg(&p_i)
                .arg(&scale)
                .arg(&gamma)
                .arg(&pl)
                .launch(grid(q_n)?)
        }
        .map_err(cuda_err("launching rrra_sampler_rrra_log_weights"))?;
        let out = stream
            .clone_dtoh(&d_lw)
            .map_err(cuda_err("downloading log weights"))?;
        gpu.synchronize()?;
        Ok(out)
    }
}

/// Times the sampler at a training step's size (64 queries × pool 200, n 7) and a large one
/// (1024 queries × pool 1000, n 32), device-resident inputs (no copies timed).
pub fn bench(gpu: &Gpu) -> Result<Vec<KernelTiming>> {
    let s = GpuSampler::new(gpu)?;
    let stream = gpu.stream();
    let mut rows = Vec::new();
    for (q_n, pool, n) in [(64usize, 200usize, 7usize), (1024, 1000, 32)] {
        let log_w: Vec<f64> = (0..q_n * pool)
            .map(|i| -((i % pool) as f64) * 0.01)
            .collect();
        let words: Vec<u32> = (0..q_n)
            .flat_map(|q| DeviceStream::new(1, 0, q as u64, 0, Site::Sampler).words())
            .collect();
        let d_lw = stream
            .clone_htod(&log_w)
            .map_err(cuda_err("uploading log weights"))?;
        let d_st = stream
            .clone_htod(&words)
            .map_err(cuda_err("uploading stream keys"))?;
        let d_keys = alloc::<f64>(stream, q_n * pool, "keys")?;
        let d_out = alloc::<i32>(stream, q_n * n, "out")?;
        let d_counts = alloc::<i32>(stream, q_n, "counts")?;
        let p = |x: &CudaSlice<f64>| ptr(x, stream);
        let (lw, st, ks) = (p(&d_lw), ptr(&d_st, stream), p(&d_keys));
        let (o, c) = (ptr(&d_out, stream), ptr(&d_counts, stream));
        let ms = gpu.time_ms(20, || {
            s.launch_top_n(gpu, lw, st, q_n, pool, n, ks, o, c, 0)
        })?;
        let cands = (q_n * pool) as f64;
        rows.push(KernelTiming {
            name: "rrra_sampler_gumbel_top_n".into(),
            shape: format!("{q_n} queries x pool {pool}, n {n}"),
            ms,
            // log weights read, keys written and read back once per tile pass
            bytes: cands * 8.0 * 3.0 + (q_n * 16 + q_n * n * 4) as f64,
            // ~60 integer ops of Philox + 2 logs per candidate, P comparisons per candidate
            flops: cands * (100.0 + pool as f64),
        });
    }
    Ok(rows)
}
