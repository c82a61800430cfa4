//! The fused AdamW step on the GPU: global gradient-norm clipping and the update of every
//! parameter tensor in three launches, the device twin of
//! [`clip_grad_norm`](crate::train::optim::clip_grad_norm) followed by
//! [`AdamW::update`](crate::train::optim::AdamW::update).
//!
//! [`GpuAdamW`] owns flat device buffers holding all tensors back to back: fp32 master weights,
//! gradients, first and second moments, and optionally a bf16 working copy of the weights
//! (round-to-nearest-even of the master after each step). The norm is a deterministic two-stage
//! reduction (per-chunk f64 partials over the CPU's partition, then one block in a fixed order),
//! and the clip factor stays on the device. Kernels and arithmetic: `kernels/adamw.cu`; the update
//! is the CPU's operation order in IEEE f32, so it matches the CPU to the last bit whenever the
//! clip factor does (it can differ in its last bit through the norm's summation order).
//!
//! Differences from the CPU pair of calls: the gradients on the device are not scaled in place
//! (the update applies the factor), and a non-finite norm skips the step entirely (nothing
//! changes and the step count is not advanced; the norm is returned so the caller can stop, as
//! the trainer does).

use super::runtime::{alloc, cuda_err, ptr, Gpu, KernelTiming};
use crate::error::{Error, Result};
use crate::train::optim::AdamWConfig;
use cudarc::driver::{CudaFunction, CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};

const MODULE: &str = "adamw";
const THREADS: u32 = 256;
/// Elements per chunk: the CPU's `CHUNK`, so the norm's partition is the CPU's.
const CHUNK: usize = 1 << 14;

fn cfg(blocks: usize, threads: u32) -> Result<LaunchConfig> {
    let g = i32::try_from(blocks.max(1))
        .map_err(|_| Error::InvalidArgument(format!("{blocks} blocks is too many")))?;
    Ok(LaunchConfig {
        grid_dim: (g as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// The checks of `AdamWConfig::validate` (private there).
fn validate_cfg(c: &AdamWConfig) -> Result<()> {
    let beta_ok = |b: f32| (0.0..1.0).contains(&b);
    if !beta_ok(c.beta1) || !beta_ok(c.beta2) {
        return Err(Error::InvalidArgument(format!(
            "AdamW betas must lie in [0, 1), got ({}, {})",
            c.beta1, c.beta2
        )));
    }
    if !(c.eps >= 0.0 && c.eps.is_finite()) {
        return Err(Error::InvalidArgument(format!(
            "AdamW eps must be finite and non-negative, got {}",
            c.eps
        )));
    }
    if !(c.weight_decay >= 0.0 && c.weight_decay.is_finite()) {
        return Err(Error::InvalidArgument(format!(
            "AdamW weight decay must be finite and non-negative, got {}",
            c.weight_decay
        )));
    }
    Ok(())
}

/// The flat buffers the host can replace.
#[derive(Clone, Copy)]
enum Buffer {
    Params,
    FirstMoments,
    SecondMoments,
}

/// AdamW state on the device for a fixed list of tensors.
pub struct GpuAdamW {
    pub cfg: AdamWConfig,
    /// Updates done so far (the next uses `step + 1`, like the CPU).
    pub step: u64,
    sizes: Vec<usize>,
    total: usize,
    n_chunks: usize,
    chunks: CudaSlice<u64>,
    params: CudaSlice<f32>,
    grads: CudaSlice<f32>,
    m: CudaSlice<f32>,
    v: CudaSlice<f32>,
    bf16: Option<CudaSlice<u16>>,
    partial: CudaSlice<f64>,
    norm: CudaSlice<f64>,
    control: CudaSlice<f32>,
    k_partial: CudaFunction,
    k_final: CudaFunction,
    k_update: CudaFunction,
}

impl GpuAdamW {
    /// Uploads `params` (the master weights, one slice per tensor), zeroes the moments (like
    /// `AdamW::new`) and, when `bf16_copy`, keeps a bf16 working copy (written by each step).
    /// `decay[i]`: whether tensor i gets weight decay.
    pub fn new(
        gpu: &Gpu,
        cfg: AdamWConfig,
        params: &[&[f32]],
        decay: &[bool],
        bf16_copy: bool,
    ) -> Result<GpuAdamW> {
        validate_cfg(&cfg)?;
        if params.len() != decay.len() {
            return Err(Error::InvalidArgument(format!(
                "AdamW: {} parameter tensors but {} decay flags",
                params.len(),
                decay.len()
            )));
        }
        let sizes: Vec<usize> = params.iter().map(|p| p.len()).collect();
        let total: usize = sizes.iter().sum();
        let mut table = Vec::new();
        let mut start = 0usize;
        for (&n, &d) in sizes.iter().zip(decay) {
            let mut off = 0;
            while off < n {
                let len = CHUNK.min(n - off);
                table.push((start + off) as u64);
                table.push(len as u64 | (u64::from(d) << 32));
                off += len;
            }
            start += n;
        }
        let n_chunks = table.len() / 2;
        if n_chunks > i32::MAX as usize {
            return Err(Error::InvalidArgument("AdamW: too many parameters".into()));
        }
        let stream = gpu.stream();
        let flat: Vec<f32> = params.iter().flat_map(|p| p.iter().copied()).collect();
        let up = |x: &[f32], what: &str| {
            stream
                .clone_htod(x)
                .map_err(cuda_err(&format!("uploading {what}")))
        };
        let zeros = |what: &str| {
            stream
                .alloc_zeros::<f32>(total.max(1))
                .map_err(cuda_err(&format!("allocating {what}")))
        };
        Ok(GpuAdamW {
            cfg,
            step: 0,
            total,
            n_chunks,
            chunks: if table.is_empty() {
                alloc(stream, 2, "the chunk table")?
            } else {
                stream
                    .clone_htod(&table)
                    .map_err(cuda_err("uploading the chunk table"))?
            },
            params: if total > 0 {
                up(&flat, "parameters")?
            } else {
                zeros("parameters")?
            },
            grads: zeros("gradients")?,
            m: zeros("first moments")?,
            v: zeros("second moments")?,
            bf16: if bf16_copy {
                Some(
                    stream
                        .alloc_zeros::<u16>(total.max(1))
                        .map_err(cuda_err("allocating the bf16 copy"))?,
                )
            } else {
                None
            },
            partial: alloc(stream, n_chunks, "norm partials")?,
            norm: alloc(stream, 1, "the gradient norm")?,
            control: alloc(stream, 2, "the clip factor")?,
            sizes,
            k_partial: gpu.function(MODULE, "rrra_adamw_norm_partial")?,
            k_final: gpu.function(MODULE, "rrra_adamw_norm_final")?,
            k_update: gpu.function(MODULE, "rrra_adamw_update")?,
        })
    }

    /// Elements of each tensor.
    pub fn sizes(&self) -> &[usize] {
        &self.sizes
    }

    /// Copies this step's gradients (one slice per tensor, the sizes given to `new`) to the
    /// device.
    pub fn upload_grads(&mut self, gpu: &Gpu, grads: &[&[f32]]) -> Result<()> {
        if grads.len() != self.sizes.len()
            || grads.iter().zip(&self.sizes).any(|(g, &n)| g.len() != n)
        {
            return Err(Error::InvalidArgument(format!(
                "AdamW: gradients for {} tensors of sizes {:?}, expected sizes {:?}",
                grads.len(),
                grads.iter().map(|g| g.len()).collect::<Vec<_>>(),
                self.sizes
            )));
        }
        if self.total == 0 {
            return Ok(());
        }
        let flat: Vec<f32> = grads.iter().flat_map(|g| g.iter().copied()).collect();
        gpu.stream()
            .memcpy_htod(&flat, &mut self.grads)
            .map_err(cuda_err("uploading gradients"))
    }

    /// Checks that `tensors` are one device buffer per tensor of the sizes given to `new`.
    fn check_tensors(&self, tensors: &[CudaSlice<f32>], what: &str) -> Result<()> {
        if tensors.len() != self.sizes.len()
            || tensors.iter().zip(&self.sizes).any(|(t, &n)| t.len() != n)
        {
            return Err(Error::InvalidArgument(format!(
                "AdamW: {what} for {} tensors of sizes {:?}, expected sizes {:?}",
                tensors.len(),
                tensors.iter().map(|t| t.len()).collect::<Vec<_>>(),
                self.sizes
            )));
        }
        Ok(())
    }

    /// Takes this step's gradients from device buffers (one per tensor): device-to-device
    /// copies into the flat buffer, queued on the stream.
    pub fn load_grads(&mut self, gpu: &Gpu, tensors: &[CudaSlice<f32>]) -> Result<()> {
        self.check_tensors(tensors, "gradients")?;
        let mut start = 0;
        for (t, &n) in tensors.iter().zip(&self.sizes) {
            if n > 0 {
                gpu.stream()
                    .memcpy_dtod(t, &mut self.grads.slice_mut(start..start + n))
                    .map_err(cuda_err("copying gradients"))?;
            }
            start += n;
        }
        Ok(())
    }

    /// Copies the master weights into device buffers (one per tensor), queued on the stream.
    pub fn store_params(&self, gpu: &Gpu, tensors: &mut [CudaSlice<f32>]) -> Result<()> {
        self.check_tensors(tensors, "weights")?;
        let mut start = 0;
        for (t, &n) in tensors.iter_mut().zip(&self.sizes) {
            if n > 0 {
                gpu.stream()
                    .memcpy_dtod(&self.params.slice(start..start + n), t)
                    .map_err(cuda_err("copying weights"))?;
            }
            start += n;
        }
        Ok(())
    }

    /// Replaces the master weights (one slice per tensor, the sizes given to `new`).
    pub fn set_params(&mut self, gpu: &Gpu, params: &[&[f32]]) -> Result<()> {
        self.upload_flat(gpu, params, Buffer::Params)
    }

    /// Replaces the moments and the step count (resuming a run).
    pub fn set_moments(&mut self, gpu: &Gpu, m: &[&[f32]], v: &[&[f32]], step: u64) -> Result<()> {
        self.upload_flat(gpu, m, Buffer::FirstMoments)?;
        self.upload_flat(gpu, v, Buffer::SecondMoments)?;
        self.step = step;
        Ok(())
    }

    fn upload_flat(&mut self, gpu: &Gpu, x: &[&[f32]], which: Buffer) -> Result<()> {
        let what = match which {
            Buffer::Params => "weights",
            Buffer::FirstMoments => "first moments",
            Buffer::SecondMoments => "second moments",
        };
        if x.len() != self.sizes.len() || x.iter().zip(&self.sizes).any(|(t, &n)| t.len() != n) {
            return Err(Error::InvalidArgument(format!(
                "AdamW: {what} of sizes {:?}, expected {:?}",
                x.iter().map(|t| t.len()).collect::<Vec<_>>(),
                self.sizes
            )));
        }
        if self.total == 0 {
            return Ok(());
        }
        let buf = match which {
            Buffer::Params => &mut self.params,
            Buffer::FirstMoments => &mut self.m,
            Buffer::SecondMoments => &mut self.v,
        };
        let flat: Vec<f32> = x.iter().flat_map(|t| t.iter().copied()).collect();
        gpu.stream()
            .memcpy_htod(&flat, buf)
            .map_err(cuda_err(&format!("uploading {what}")))?;
        gpu.synchronize()
    }

    /// One step with the uploaded gradients: the norm (returned, as f32 like the CPU's
    /// `clip_grad_norm`), clipping to `max_norm` (`f32::INFINITY` or a non-positive value: no
    /// clipping, as on the CPU), then the update with learning rate `lr`. A non-finite norm
    /// leaves everything unchanged, including `step`.
    pub fn step(&mut self, gpu: &Gpu, lr: f32, max_norm: f32) -> Result<f32> {
        self.step_scaled(gpu, 1.0, lr, max_norm)
    }

    /// [`GpuAdamW::step`] on the gradients multiplied by `grad_scale` first (in f32, like the
    /// trainer's in-place `1 / micro-batches` scaling); the stored gradients stay as they are.
    pub fn step_scaled(
        &mut self,
        gpu: &Gpu,
        grad_scale: f32,
        lr: f32,
        max_norm: f32,
    ) -> Result<f32> {
        if !(grad_scale.is_finite() && grad_scale > 0.0) {
            return Err(Error::InvalidArgument(format!(
                "gradient scale must be finite and positive, got {grad_scale}"
            )));
        }
        if !(lr >= 0.0 && lr.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "learning rate must be finite and non-negative, got {lr}"
            )));
        }
        if max_norm.is_nan() {
            return Err(Error::InvalidArgument("max_norm is NaN".into()));
        }
        validate_cfg(&self.cfg)?;
        if self.total == 0 {
            self.step += 1;
            return Ok(0.0);
        }
        self.launch(gpu, self.step + 1, grad_scale, lr, max_norm)?;
        let norm = gpu
            .stream()
            .clone_dtoh(&self.norm)
            .map_err(cuda_err("downloading the gradient norm"))?[0];
        gpu.synchronize()?;
        // the kernel skips exactly when the norm is not finite in f32, as the CPU decides
        let norm = norm as f32;
        if norm.is_finite() {
            self.step += 1;
        }
        Ok(norm)
    }

    /// Queues the three kernels for update number `t` (nothing synchronised).
    fn launch(&self, gpu: &Gpu, t: u64, grad_scale: f32, lr: f32, max_norm: f32) -> Result<()> {
        if self.total == 0 {
            return Ok(());
        }
        let stream = gpu.stream();
        let c = &self.cfg;
        // The CPU's scalars, computed the same way.
        let tf = t as f64;
        let bias1 = 1.0 - (c.beta1 as f64).powf(tf);
        let bias2 = 1.0 - (c.beta2 as f64).powf(tf);
        let step_size = (lr as f64 / bias1) as f32;
        let bias2_sqrt = bias2.sqrt() as f32;
        let decay_factor = (1.0 - lr as f64 * c.weight_decay as f64) as f32;
        let (beta1, beta2, eps) = (c.beta1, c.beta2, c.eps);
        let (one_minus_b1, one_minus_b2) = (1.0 - beta1, 1.0 - beta2);

        let chunks = ptr(&self.chunks, stream);
        let grads = ptr(&self.grads, stream);
        let partial = ptr(&self.partial, stream);
        let norm = ptr(&self.norm, stream);
        let control = ptr(&self.control, stream);
        let params = ptr(&self.params, stream);
        let m = ptr(&self.m, stream);
        let v = ptr(&self.v, stream);
        let bf16 = self.bf16.as_ref().map_or(0u64, |b| ptr(b, stream));
        let n_chunks = self.n_chunks as i32;
        // SAFETY (three launches): arguments match kernels/adamw.cu's signatures in order and
        // type; the chunk table covers exactly the `total` elements of every flat buffer, the
        // partials hold one f64 per chunk, norm one f64, control two f32; bf16 is null or holds
        // `total` elements.
        unsafe {
            stream
                .launch_builder(&self.k_partial)
                .arg(&grads)
                .arg(&chunks)
                .arg(&grad_scale)
                .arg(&partial)
                .launch(cfg(self.n_chunks, THREADS)?)
        }
        .map_err(cuda_err("launching rrra_adamw_norm_partial"))?;
        unsafe {
            stream
                .launch_builder(&self.k_final)
                .arg(&partial)
                .arg(&n_chunks)
                .arg(&max_norm)
                .arg(&norm)
                .arg(&control)
                .launch(cfg(1, 1024)?)
        }
        .map_err(cuda_err("launching rrra_adamw_norm_final"))?;
        unsafe {
            stream
                .launch_builder(&self.k_update)
                .arg(&params)
                .arg(&grads)
                .arg(&m)
                .arg(&v)
                .arg(&bf16)
                .arg(&chunks)
                .arg(&control)
                .arg(&grad_scale)
                .arg(&decay_factor)
                .arg(&beta1)
                .arg(&beta2)
                .arg(&one_minus_b1)
                .arg(&one_minus_b2)
                .arg(&bias2_sqrt)
                .arg(&eps)
                .arg(&step_size)
                .launch(cfg(self.n_chunks, THREADS)?)
        }
        .map_err(cuda_err("launching rrra_adamw_update"))?;
        Ok(())
    }

    fn split<T: Clone>(&self, flat: &[T]) -> Vec<Vec<T>> {
        let mut out = Vec::with_capacity(self.sizes.len());
        let mut start = 0;
        for &n in &self.sizes {
            out.push(flat[start..start + n].to_vec());
            start += n;
        }
        out
    }

    fn download<T: DeviceRepr + Clone>(
        &self,
        gpu: &Gpu,
        buf: &CudaSlice<T>,
    ) -> Result<Vec<Vec<T>>> {
        let flat = gpu
            .stream()
            .clone_dtoh(buf)
            .map_err(cuda_err("downloading optimizer state"))?;
        gpu.synchronize()?;
        Ok(self.split(&flat[..self.total.min(flat.len())]))
    }

    /// The master weights, one vector per tensor.
    pub fn params(&self, gpu: &Gpu) -> Result<Vec<Vec<f32>>> {
        self.download(gpu, &self.params)
    }
    /// The first moments, one vector per tensor.
    pub fn first_moments(&self, gpu: &Gpu) -> Result<Vec<Vec<f32>>> {
        self.download(gpu, &self.m)
    }
    /// The second moments, one vector per tensor.
    pub fn second_moments(&self, gpu: &Gpu) -> Result<Vec<Vec<f32>>> {
        self.download(gpu, &self.v)
    }
    /// The bf16 working copy as raw bits, one vector per tensor (`None` without one).
    pub fn bf16_copy(&self, gpu: &Gpu) -> Result<Option<Vec<Vec<u16>>>> {
        match &self.bf16 {
            Some(b) => Ok(Some(self.download(gpu, b)?)),
            None => Ok(None),
        }
    }
}

/// Times one step at BERT-base size (110M parameters in one tensor per 7M block, with the bf16
/// copy), clipping active. Device memory: ~2 GB.
pub fn bench(gpu: &Gpu) -> Result<Vec<KernelTiming>> {
    let total = 110_000_000usize;
    let pieces = 16;
    let per = total / pieces;
    let host: Vec<f32> = (0..per)
        .map(|i| ((i % 1000) as f32 - 500.0) * 1e-4)
        .collect();
    let params: Vec<&[f32]> = (0..pieces).map(|_| &host[..]).collect();
    let decay: Vec<bool> = (0..pieces).map(|i| i % 2 == 0).collect();
    let mut opt = GpuAdamW::new(gpu, AdamWConfig::default(), &params, &decay, true)?;
    opt.upload_grads(gpu, &params)?;
    let n = (per * pieces) as f64;
    let ms = gpu.time_ms(10, || opt.launch(gpu, 1, 1.0, 1e-4, 1.0))?;
    Ok(vec![KernelTiming {
        name: "rrra_adamw_{norm_partial,norm_final,update}".into(),
        shape: format!("{:.0}M fp32 params + bf16 copy, clip 1.0", n / 1e6),
        ms,
        // g read twice; p, m, v read and written; bf16 written
        bytes: n * (4.0 * 2.0 + 12.0 + 12.0 + 2.0),
        flops: n * 17.0,
    }])
}
