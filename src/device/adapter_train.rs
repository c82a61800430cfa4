//! Training the RRRA adapter on the GPU (`kernels/adapter_train.cu`): the device twin of
//! [`crate::adapter::score`] (keeping the pre-activations and adapted points) and of
//! [`crate::adapter::backward`], for Q queries × K dense candidates.
//!
//! The serving kernel ([`super::adapter`]) fuses everything per tile of pairs and keeps nothing;
//! training needs the activations and large batches, so here the matrix products are cuBLAS
//! f32 GEMMs over all pairs at once and the kernels do the row-wise steps between them. The
//! algebra is the CPU's (module docs of [`crate::adapter::scoring`]):
//!
//! ```text
//! forward   F = [c ; q ⊙ c]   u = W1sum·q + b1   pre = Wpair·F + u   g = GELU(pre)
//!           a = (W2·g + b2) + c   logit = beta·(cos(q, a) − cos(a, c)) + beta0
//! backward  ∂a = ∂logit·beta·(∂QA/∂a − ∂CA/∂a) (+ ∂a of a loss on a)
//!           ∂pre = (∂a·W2) ⊙ GELU'(pre)   ∂u_q = Σ_k ∂pre
//!           ∂W2 = ∂aᵀ·g   ∂b2 = Σ ∂a   ∂b1 = Σ ∂u
//!           ∂W1 = [UQ − CF_c | CF_qc | UQ + CF_c]  with UQ = ∂uᵀ·Q, CF = ∂preᵀ·F
//!           ∂F = ∂pre·Wpair   ∂c = direct + ∂F_c + q ⊙ ∂F_qc   ∂q = Σ_k (direct + c ⊙ ∂F_qc) + W1sumᵀ·∂u
//! ```
//!
//! Precision: f32 products (cuBLAS in its default math mode: no TF32), the geometry and every
//! reduction over pairs in f64 in a fixed order, so a step replays bit for bit. Against the
//! CPU, which sums the weight gradients in f64, the GEMMs' f32 sums over P pairs differ by
//! ~√P f32 roundings; tests/gpu_adapter_train.rs bounds them.
//!
//! [`GpuAdapterGrad::new`] sizes every buffer for `max_queries` queries and `max_pairs` pairs
//! and fills them with NaN, so a value a kernel failed to write cannot pass for a result;
//! forward and backward after that allocate nothing on the device.

use super::backward::GpuBackward;
use super::runtime::{
    cublas_f32, cuda_err, grid_stride, launch_cfg, poison, sgemm_row_major, to_i32, DevBuf,
    F32Blas, Gpu,
};
use crate::adapter::fit::{AdapterOp, ForwardPass};
use crate::adapter::pairs::QueryPairs;
use crate::adapter::AdapterParams;
use crate::error::{Error, Result};
use cudarc::driver::{CudaFunction, CudaStream, PushKernelArg};
use std::sync::Arc;

const MODULE: &str = "adapter_train";
const THREADS: u32 = 256;
/// f64 slots per pair of the geometry buffer (the kernel's `GEO`).
const GEO: usize = 8;

struct Kernels {
    recut: CudaFunction,
    features: CudaFunction,
    hidden: CudaFunction,
    geometry: CudaFunction,
    pair_grad: CudaFunction,
    group_sums: CudaFunction,
    w1_grad: CudaFunction,
    input_grads: CudaFunction,
}

/// The adapter's forward and backward on one GPU, with the weights resident and every buffer
/// sized at construction.
pub struct GpuAdapterGrad {
    stream: Arc<CudaStream>,
    blas: F32Blas,
    k: Kernels,
    /// The GELU gradient (`rrra_gelu_backward_f32`).
    bw: GpuBackward,
    d: usize,
    h: usize,
    max_queries: usize,
    max_pairs: usize,
    beta: f32,
    beta0: f32,
    // parameters, and the first layer re-cut
    w1: DevBuf<f32>,
    b1: DevBuf<f32>,
    w2: DevBuf<f32>,
    b2: DevBuf<f32>,
    w_sum: DevBuf<f32>,
    w_pair: DevBuf<f32>,
    // the last forward's inputs and activations
    queries: DevBuf<f32>,
    cands: DevBuf<f32>,
    feats: DevBuf<f32>,
    u: DevBuf<f32>,
    pre: DevBuf<f32>,
    g: DevBuf<f32>,
    a: DevBuf<f32>,
    logits: DevBuf<f32>,
    alpha: DevBuf<f32>,
    geo: DevBuf<f64>,
    // backward
    d_logit: DevBuf<f32>,
    d_a_extra: DevBuf<f32>,
    da: DevBuf<f32>,
    dpre: DevBuf<f32>,
    dq_direct: DevBuf<f32>,
    dc: DevBuf<f32>,
    dscalar: DevBuf<f32>,
    dscalar_q: DevBuf<f32>,
    du: DevBuf<f32>,
    da_q: DevBuf<f32>,
    uq: DevBuf<f32>,
    cf: DevBuf<f32>,
    df: DevBuf<f32>,
    e: DevBuf<f32>,
    dq: DevBuf<f32>,
    // parameter gradients of the last backward: W1, b1, W2, b2, [beta, beta0]
    gw1: DevBuf<f32>,
    gb1: DevBuf<f32>,
    gw2: DevBuf<f32>,
    gb2: DevBuf<f32>,
    gscalar: DevBuf<f32>,
    /// (queries, candidates per query) of the last forward.
    last: Option<(usize, usize)>,
    allocations: u64,
}

impl GpuAdapterGrad {
    /// Loads the kernels, uploads `params` and sizes the buffers for up to `max_queries`
    /// queries and `max_pairs` (query, candidate) pairs per call. Work goes on `gpu`'s default
    /// stream.
    pub fn new(
        gpu: &Gpu,
        params: &AdapterParams,
        max_queries: usize,
        max_pairs: usize,
    ) -> Result<GpuAdapterGrad> {
        params.check()?;
        if max_queries == 0 || max_pairs == 0 {
            return Err(Error::InvalidArgument(
                "the adapter's training buffers need at least one query and one pair".into(),
            ));
        }
        let (d, h) = (params.d, params.h);
        let widest = max_pairs
            .checked_mul(2 * d.max(h))
            .ok_or_else(|| Error::InvalidArgument("max_pairs is too large".into()))?;
        to_i32(widest, "adapter training buffer")?;
        to_i32(3 * d * h, "adapter size")?;
        let stream = gpu.stream().clone();
        stream
            .context()
            .bind_to_thread()
            .map_err(cuda_err("binding the context"))?;
        let f = |name: &str| gpu.function(MODULE, name);
        let k = Kernels {
            recut: f("rrra_adapter_train_recut")?,
            features: f("rrra_adapter_train_features")?,
            hidden: f("rrra_adapter_train_hidden")?,
            geometry: f("rrra_adapter_train_geometry")?,
            pair_grad: f("rrra_adapter_train_pair_grad")?,
            group_sums: f("rrra_adapter_train_group_sums")?,
            w1_grad: f("rrra_adapter_train_w1_grad")?,
            input_grads: f("rrra_adapter_train_input_grads")?,
        };
        let blas = cublas_f32(&stream)?;
        let mut n = 0u64;
        let (mq, mp) = (max_queries, max_pairs);
        let geo = DevBuf::new(&stream, mp * GEO, "adapter geometry", &mut n)?;
        poison(&stream, &geo.slice)?;
        let mut buf = |len: usize, what: &str| -> Result<DevBuf<f32>> {
            let b = DevBuf::new(&stream, len, what, &mut n)?;
            poison(&stream, &b.slice)?;
            Ok(b)
        };
        let mut grad = GpuAdapterGrad {
            w1: buf(h * 3 * d, "adapter W1")?,
            b1: buf(h, "adapter b1")?,
            w2: buf(d * h, "adapter W2")?,
            b2: buf(d, "adapter b2")?,
            w_sum: buf(h * d, "adapter W1sum")?,
            w_pair: buf(h * 2 * d, "adapter Wpair")?,
            queries: buf(mq * d, "adapter queries")?,
            cands: buf(mp * d, "adapter candidates")?,
            feats: buf(mp * 2 * d, "adapter features")?,
            u: buf(mq * h, "adapter query biases")?,
            pre: buf(mp * h, "adapter pre-activations")?,
            g: buf(mp * h, "adapter activations")?,
            a: buf(mp * d, "adapted points")?,
            logits: buf(mp, "adapter logits")?,
            alpha: buf(mp, "adapter alphas")?,
            geo,
            d_logit: buf(mp, "logit gradients")?,
            d_a_extra: buf(mp * d, "adapted-point gradients")?,
            da: buf(mp * d, "adapted-point gradients")?,
            dpre: buf(mp * h, "pre-activation gradients")?,
            dq_direct: buf(mp * d, "query gradients")?,
            dc: buf(mp * d, "candidate gradients")?,
            dscalar: buf(mp * 2, "beta gradient terms")?,
            dscalar_q: buf(mq * 2, "beta gradient terms")?,
            du: buf(mq * h, "query-bias gradients")?,
            da_q: buf(mq * d, "per-query b2 gradients")?,
            uq: buf(h * d, "W1 gradient term")?,
            cf: buf(h * 2 * d, "W1 gradient term")?,
            df: buf(mp * 2 * d, "feature gradients")?,
            e: buf(mq * d, "query gradient term")?,
            dq: buf(mq * d, "query gradients")?,
            gw1: buf(h * 3 * d, "W1 gradient")?,
            gb1: buf(h, "b1 gradient")?,
            gw2: buf(d * h, "W2 gradient")?,
            gb2: buf(d, "b2 gradient")?,
            gscalar: buf(2, "beta gradients")?,
            stream: stream.clone(),
            blas,
            k,
            bw: GpuBackward::new(gpu)?,
            d,
            h,
            max_queries,
            max_pairs,
            beta: params.beta,
            beta0: params.beta0,
            last: None,
            allocations: 0,
        };
        grad.allocations = n;
        grad.set_params(params)?;
        Ok(grad)
    }

    pub fn dim(&self) -> usize {
        self.d
    }
    pub fn hidden(&self) -> usize {
        self.h
    }
    /// Device allocations made so far (all by [`GpuAdapterGrad::new`]).
    pub fn device_allocations(&self) -> u64 {
        self.allocations
    }

    /// Replaces the weights (same d and h; the positive-aware block is not supported here).
    pub fn set_params(&mut self, params: &AdapterParams) -> Result<()> {
        params.check()?;
        if (params.d, params.h) != (self.d, self.h) {
            return Err(Error::InvalidArgument(format!(
                "an adapter of d = {}, h = {} given to GPU buffers of d = {}, h = {}",
                params.d, params.h, self.d, self.h
            )));
        }
        if params.positive_aware() {
            return Err(Error::InvalidArgument(
                "the positive-aware adapter is trained on the CPU only".into(),
            ));
        }
        let st = &self.stream;
        for (host, dev, what) in [
            (&params.w1, &mut self.w1, "W1"),
            (&params.b1, &mut self.b1, "b1"),
            (&params.w2, &mut self.w2, "W2"),
            (&params.b2, &mut self.b2, "b2"),
        ] {
            st.memcpy_htod(host.as_slice(), &mut dev.slice.slice_mut(..host.len()))
                .map_err(cuda_err(&format!("uploading adapter {what}")))?;
        }
        self.beta = params.beta;
        self.beta0 = params.beta0;
        self.recut()?;
        // pageable uploads: complete before the caller's vectors may go
        st.synchronize()
            .map_err(cuda_err("uploading the adapter"))?;
        self.last = None;
        Ok(())
    }

    /// Rebuilds W1sum and Wpair from W1 on the device (after an optimizer step on W1).
    pub fn recut(&self) -> Result<()> {
        let (d, h) = (to_i32(self.d, "d")?, to_i32(self.h, "h")?);
        let (w1, ws, wp) = (self.w1.ptr, self.w_sum.ptr, self.w_pair.ptr);
        // SAFETY: W1 holds h × 3d floats, W1sum h × d, Wpair h × 2d; grid-stride over h × d.
        unsafe {
            self.stream
                .launch_builder(&self.k.recut)
                .arg(&w1)
                .arg(&d)
                .arg(&h)
                .arg(&ws)
                .arg(&wp)
                .launch(grid_stride(self.d * self.h, THREADS)?)
        }
        .map_err(cuda_err("launching rrra_adapter_train_recut"))?;
        Ok(())
    }

    /// Forward over `queries` (`[Q × d]`) and `k` candidates per query (`candidates`:
    /// `[Q × k × d]`, candidate j of query i at `(i*k + j)*d`): the logits `[Q × k]`, with the
    /// activations kept on the device for [`GpuAdapterGrad::backward`].
    pub fn forward(&mut self, queries: &[f32], candidates: &[f32], k: usize) -> Result<Vec<f32>> {
        let d = self.d;
        let nq = queries.len() / d; // d > 0: the parameters were checked
        if k == 0 || nq == 0 || queries.len() != nq * d || candidates.len() != nq * k * d {
            return Err(Error::InvalidArgument(format!(
                "adapter inputs disagree: d = {d}, k = {k}, {} query floats, {} candidate floats",
                queries.len(),
                candidates.len()
            )));
        }
        let pairs = nq * k;
        if nq > self.max_queries || pairs > self.max_pairs {
            return Err(Error::InvalidArgument(format!(
                "{nq} queries × {k} candidates exceed the buffers ({} queries, {} pairs)",
                self.max_queries, self.max_pairs
            )));
        }
        self.last = None;
        let st = self.stream.clone();
        st.memcpy_htod(queries, &mut self.queries.slice.slice_mut(..queries.len()))
            .map_err(cuda_err("uploading queries"))?;
        st.memcpy_htod(
            candidates,
            &mut self.cands.slice.slice_mut(..candidates.len()),
        )
        .map_err(cuda_err("uploading candidates"))?;
        self.queue_forward(nq, k)?;
        let mut out = vec![0.0f32; pairs];
        st.memcpy_dtoh(&self.logits.slice.slice(..pairs), &mut out)
            .map_err(cuda_err("downloading logits"))?;
        self.last = Some((nq, k));
        Ok(out)
    }

    /// The forward's kernels and products on the uploaded inputs (queued, not waited for).
    fn queue_forward(&self, nq: usize, k: usize) -> Result<()> {
        let (d, pairs, st) = (self.d, nq * k, &self.stream);
        let (h, ki, pl) = (self.h, to_i32(k, "k")?, pairs as i64);
        let (di, hi) = (to_i32(d, "d")?, to_i32(h, "h")?);
        let (qp, cp, fp) = (self.queries.ptr, self.cands.ptr, self.feats.ptr);
        // SAFETY (every launch below): the buffers hold at least the sizes checked above
        // (queries Q·d, candidates and a P·d, features P·2d, pre and g P·h, u Q·h, geometry
        // P·8 doubles); the arguments follow the kernels' signatures in order and type.
        unsafe {
            st.launch_builder(&self.k.features)
                .arg(&qp)
                .arg(&cp)
                .arg(&ki)
                .arg(&pl)
                .arg(&di)
                .arg(&fp)
                .launch(grid_stride(pairs * d, THREADS)?)
        }
        .map_err(cuda_err("launching rrra_adapter_train_features"))?;
        // u = Q·W1sumᵀ, pre = F·Wpairᵀ (biases added by the hidden kernel)
        self.gemm(false, true, nq, h, d, qp, self.w_sum.ptr, self.u.ptr)?;
        self.gemm(
            false,
            true,
            pairs,
            h,
            2 * d,
            fp,
            self.w_pair.ptr,
            self.pre.ptr,
        )?;
        let (pre, u, b1, g) = (self.pre.ptr, self.u.ptr, self.b1.ptr, self.g.ptr);
        unsafe {
            st.launch_builder(&self.k.hidden)
                .arg(&pre)
                .arg(&u)
                .arg(&b1)
                .arg(&ki)
                .arg(&pl)
                .arg(&hi)
                .arg(&g)
                .launch(grid_stride(pairs * h, THREADS)?)
        }
        .map_err(cuda_err("launching rrra_adapter_train_hidden"))?;
        self.gemm(false, true, pairs, d, h, g, self.w2.ptr, self.a.ptr)?;
        let (a, b2, lg, geo) = (self.a.ptr, self.b2.ptr, self.logits.ptr, self.geo.ptr);
        let al = self.alpha.ptr;
        let (beta, beta0) = (self.beta, self.beta0);
        unsafe {
            st.launch_builder(&self.k.geometry)
                .arg(&qp)
                .arg(&cp)
                .arg(&a)
                .arg(&b2)
                .arg(&ki)
                .arg(&pl)
                .arg(&di)
                .arg(&beta)
                .arg(&beta0)
                .arg(&lg)
                .arg(&al)
                .arg(&geo)
                .launch(warp_per_row(pairs)?)
        }
        .map_err(cuda_err("launching rrra_adapter_train_geometry"))?;
        Ok(())
    }

    /// The adapted points `a` of the last forward, `[Q × k × d]`.
    pub fn adapted(&self) -> Result<Vec<f32>> {
        let (nq, k) = self.last.ok_or_else(no_forward)?;
        self.download(&self.a, nq * k * self.d, "adapted points")
    }

    /// The positions alpha of `a` on the segment c → q of the last forward, `[Q × k]`.
    pub fn alphas(&self) -> Result<Vec<f32>> {
        let (nq, k) = self.last.ok_or_else(no_forward)?;
        self.download(&self.alpha, nq * k, "alphas")
    }

    fn download(&self, buf: &DevBuf<f32>, n: usize, what: &str) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; n];
        self.stream
            .memcpy_dtoh(&buf.slice.slice(..n), &mut out)
            .map_err(cuda_err(&format!("downloading {what}")))?;
        Ok(out)
    }

    /// Backward of the last [`GpuAdapterGrad::forward`], with [`crate::adapter::backward`]'s
    /// contract: from `d_logit` (`[Q × k]`) and optionally `d_a_extra` (`[Q × k × d]`), the
    /// parameter gradients are **added** to `grads`, and the input gradients to `d_queries`
    /// (`[Q × d]`) and `d_candidates` (`[Q × k × d]`) when given.
    pub fn backward(
        &mut self,
        d_logit: &[f32],
        d_a_extra: Option<&[f32]>,
        grads: &mut AdapterParams,
        d_queries: Option<&mut [f32]>,
        d_candidates: Option<&mut [f32]>,
    ) -> Result<()> {
        let (nq, k) = self.last.ok_or_else(no_forward)?;
        let (d, h, pairs) = (self.d, self.h, nq * k);
        grads.check()?;
        let ok = d_logit.len() == pairs
            && d_a_extra.is_none_or(|e| e.len() == pairs * d)
            && (grads.d, grads.h) == (d, h)
            && grads.w1_pos.is_empty()
            && d_queries.as_ref().is_none_or(|g| g.len() == nq * d)
            && d_candidates.as_ref().is_none_or(|g| g.len() == pairs * d);
        if !ok {
            return Err(Error::InvalidArgument(format!(
                "adapter backward shapes disagree with the forward ({nq} queries × {k} \
                 candidates, d = {d}, h = {h}): {} d_logit",
                d_logit.len()
            )));
        }
        let want_inputs = d_queries.is_some() || d_candidates.is_some();
        let st = self.stream.clone();
        st.memcpy_htod(d_logit, &mut self.d_logit.slice.slice_mut(..pairs))
            .map_err(cuda_err("uploading logit gradients"))?;
        let extra = match d_a_extra {
            Some(e) => {
                st.memcpy_htod(e, &mut self.d_a_extra.slice.slice_mut(..e.len()))
                    .map_err(cuda_err("uploading adapted-point gradients"))?;
                self.d_a_extra.ptr
            }
            None => 0,
        };
        self.queue_backward(nq, k, extra, want_inputs)?;
        self.add_gradients(grads, d_queries, d_candidates)
    }

    /// The backward's kernels and products (queued, not waited for): parameter gradients into
    /// the `g*` buffers, and with `want_inputs` the input gradients into `dq` and `dc`. `extra`
    /// is the address of ∂L/∂a from a loss on a, or 0.
    fn queue_backward(&mut self, nq: usize, k: usize, extra: u64, want_inputs: bool) -> Result<()> {
        let (d, h, pairs, st) = (self.d, self.h, nq * k, &self.stream);
        let (ki, pl, di) = (to_i32(k, "k")?, pairs as i64, to_i32(d, "d")?);
        let (qp, cp, ap, geo) = (self.queries.ptr, self.cands.ptr, self.a.ptr, self.geo.ptr);
        let (dl, da, ds) = (self.d_logit.ptr, self.da.ptr, self.dscalar.ptr);
        let (dqd, dc) = if want_inputs {
            (self.dq_direct.ptr, self.dc.ptr)
        } else {
            (0u64, 0u64)
        };
        let beta = self.beta;
        // SAFETY: as in `forward`; the optional pointers are null or P·d floats.
        unsafe {
            st.launch_builder(&self.k.pair_grad)
                .arg(&qp)
                .arg(&cp)
                .arg(&ap)
                .arg(&geo)
                .arg(&dl)
                .arg(&extra)
                .arg(&ki)
                .arg(&pl)
                .arg(&di)
                .arg(&beta)
                .arg(&da)
                .arg(&dqd)
                .arg(&dc)
                .arg(&ds)
                .launch(warp_per_row(pairs)?)
        }
        .map_err(cuda_err("launching rrra_adapter_train_pair_grad"))?;
        // ∂pre = (∂a·W2) ⊙ GELU'(pre)
        let dpre = self.dpre.ptr;
        self.gemm(false, false, pairs, h, d, da, self.w2.ptr, dpre)?;
        self.bw
            .gelu(&self.pre.slice, &mut self.dpre.slice, pairs * h)?;
        // per-query sums, then the parameter gradients
        self.group_sums(dpre, nq, k, h, self.du.ptr)?;
        self.group_sums(self.du.ptr, 1, nq, h, self.gb1.ptr)?;
        self.group_sums(da, nq, k, d, self.da_q.ptr)?;
        self.group_sums(self.da_q.ptr, 1, nq, d, self.gb2.ptr)?;
        self.group_sums(ds, nq, k, 2, self.dscalar_q.ptr)?;
        self.group_sums(self.dscalar_q.ptr, 1, nq, 2, self.gscalar.ptr)?;
        self.gemm(true, false, d, h, pairs, da, self.g.ptr, self.gw2.ptr)?;
        self.gemm(
            true,
            false,
            h,
            2 * d,
            pairs,
            dpre,
            self.feats.ptr,
            self.cf.ptr,
        )?;
        self.gemm(true, false, h, d, nq, self.du.ptr, qp, self.uq.ptr)?;
        let (uq, cf, gw1, hi) = (self.uq.ptr, self.cf.ptr, self.gw1.ptr, to_i32(h, "h")?);
        unsafe {
            st.launch_builder(&self.k.w1_grad)
                .arg(&uq)
                .arg(&cf)
                .arg(&di)
                .arg(&hi)
                .arg(&gw1)
                .launch(grid_stride(d * h, THREADS)?)
        }
        .map_err(cuda_err("launching rrra_adapter_train_w1_grad"))?;
        if want_inputs {
            let (df, e, dq) = (self.df.ptr, self.e.ptr, self.dq.ptr);
            self.gemm(false, false, pairs, 2 * d, h, dpre, self.w_pair.ptr, df)?;
            self.gemm(false, false, nq, d, h, self.du.ptr, self.w_sum.ptr, e)?;
            let nqi = to_i32(nq, "queries")?;
            unsafe {
                st.launch_builder(&self.k.input_grads)
                    .arg(&qp)
                    .arg(&cp)
                    .arg(&df)
                    .arg(&dqd)
                    .arg(&e)
                    .arg(&nqi)
                    .arg(&ki)
                    .arg(&di)
                    .arg(&dc)
                    .arg(&dq)
                    .launch(launch_cfg((nq * d).div_ceil(THREADS as usize), THREADS, 0)?)
            }
            .map_err(cuda_err("launching rrra_adapter_train_input_grads"))?;
        }
        Ok(())
    }

    /// Downloads the last backward's gradients and adds them to the caller's, as the CPU's
    /// backward accumulates.
    fn add_gradients(
        &self,
        grads: &mut AdapterParams,
        d_queries: Option<&mut [f32]>,
        d_candidates: Option<&mut [f32]>,
    ) -> Result<()> {
        let st = &self.stream;
        let mut host = Vec::new();
        let mut add = |dev: &DevBuf<f32>, to: &mut [f32], what: &str| -> Result<()> {
            host.resize(to.len(), 0.0);
            st.memcpy_dtoh(&dev.slice.slice(..to.len()), &mut host[..])
                .map_err(cuda_err(&format!("downloading {what}")))?;
            for (t, v) in to.iter_mut().zip(&host) {
                *t += v;
            }
            Ok(())
        };
        add(&self.gw1, &mut grads.w1, "the W1 gradient")?;
        add(&self.gb1, &mut grads.b1, "the b1 gradient")?;
        add(&self.gw2, &mut grads.w2, "the W2 gradient")?;
        add(&self.gb2, &mut grads.b2, "the b2 gradient")?;
        let mut scalars = [grads.beta, grads.beta0];
        add(&self.gscalar, &mut scalars, "the beta gradients")?;
        [grads.beta, grads.beta0] = scalars;
        if let Some(dq) = d_queries {
            add(&self.dq, dq, "query gradients")?;
        }
        if let Some(dc) = d_candidates {
            add(&self.dc, dc, "candidate gradients")?;
        }
        Ok(())
    }

    /// Row-major `C[m × n] = op(A)·op(B)` (f32, overwriting C) on the stream.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        trans_a: bool,
        trans_b: bool,
        m: usize,
        n: usize,
        k: usize,
        a: u64,
        b: u64,
        c: u64,
    ) -> Result<()> {
        // SAFETY: the callers pass buffers of at least the product's sizes (see `forward` and
        // `backward`).
        unsafe { sgemm_row_major(&self.blas, trans_a, trans_b, m, n, k, a, b, 0.0, c) }
    }

    /// `out[g] = Σ` of `per` consecutive rows of `x` (`cols` wide) for `groups` groups.
    fn group_sums(&self, x: u64, groups: usize, per: usize, cols: usize, out: u64) -> Result<()> {
        let (gi, pi, ci) = (
            to_i32(groups, "groups")?,
            to_i32(per, "group size")?,
            to_i32(cols, "columns")?,
        );
        // SAFETY: x holds groups·per·cols floats, out groups·cols (callers' buffers).
        unsafe {
            self.stream
                .launch_builder(&self.k.group_sums)
                .arg(&x)
                .arg(&gi)
                .arg(&pi)
                .arg(&ci)
                .arg(&out)
                .launch(launch_cfg(
                    (groups * cols).div_ceil(THREADS as usize),
                    THREADS,
                    0,
                )?)
        }
        .map_err(cuda_err("launching rrra_adapter_train_group_sums"))?;
        Ok(())
    }
}

/// Stages 2 and 3 on the GPU: the forward and backward of the steps of
/// [`crate::adapter::fit::train_adapter_on`] and of the joint adapter
/// (`train::rrra::JointAdapter`) run here, the losses and the optimizer on the host. The
/// weights the optimizer moved are uploaded at each forward (1.8 MB for the MiniLM adapter);
/// the adapted points and alphas come back for the normalisation loss, which reads them with
/// the queries and candidates.
impl AdapterOp for GpuAdapterGrad {
    fn capacity(&self) -> Option<(usize, usize)> {
        Some((self.max_queries, self.max_pairs))
    }

    fn logits(
        &mut self,
        params: &AdapterParams,
        queries: &[f32],
        candidates: &[f32],
        k: usize,
    ) -> Result<Vec<f32>> {
        self.set_params(params)?;
        GpuAdapterGrad::forward(self, queries, candidates, k)
    }

    fn forward(
        &mut self,
        params: &AdapterParams,
        queries: &[f32],
        candidates: &[f32],
        contexts: Option<&[f32]>,
        k: usize,
    ) -> Result<ForwardPass> {
        if contexts.is_some() {
            return Err(Error::InvalidArgument(
                "the positive-aware adapter is trained on the CPU only".into(),
            ));
        }
        self.set_params(params)?;
        let logit = GpuAdapterGrad::forward(self, queries, candidates, k)?;
        Ok(ForwardPass {
            logit,
            a: self.adapted()?,
            alpha: self.alphas()?,
        })
    }

    fn backward(
        &mut self,
        _params: &AdapterParams,
        _queries: &[f32],
        _candidates: &[f32],
        _contexts: Option<&[f32]>,
        _k: usize,
        d_logit: &[f32],
        d_a_extra: Option<&[f32]>,
        grads: &mut AdapterParams,
        d_queries: Option<&mut [f32]>,
        d_candidates: Option<&mut [f32]>,
    ) -> Result<()> {
        // the batch is the one the forward uploaded
        GpuAdapterGrad::backward(self, d_logit, d_a_extra, grads, d_queries, d_candidates)
    }
}

impl GpuAdapterGrad {
    /// Buffers for stage 2 over `pairs`: batches of `batch_queries` queries, each padded to
    /// the longest list, with an adapter of dimension `d` and hidden width `h`.
    pub fn for_training(
        gpu: &Gpu,
        d: usize,
        h: usize,
        batch_queries: usize,
        pairs: &[QueryPairs],
    ) -> Result<GpuAdapterGrad> {
        let longest = pairs.iter().map(QueryPairs::len).max().unwrap_or(0).max(1);
        let max_pairs = batch_queries
            .checked_mul(longest)
            .ok_or_else(|| Error::InvalidArgument("adapter batch too large".into()))?;
        // placeholder weights of the right shapes: every forward uploads the current ones
        GpuAdapterGrad::new(
            gpu,
            &AdapterParams::init(d, h, 0)?,
            batch_queries,
            max_pairs,
        )
    }
}

/// The device check's row: one forward + backward (parameter gradients only) at the stage-2
/// shape of the MiniLM adapter, 64 queries × 200 mined candidates, on uploaded inputs.
pub fn bench(gpu: &Gpu) -> Result<Vec<super::KernelTiming>> {
    let (d, h, nq, k) = (384usize, 384usize, 64usize, 200usize);
    let pairs = nq * k;
    let params = AdapterParams::init(d, h, 1)?;
    let mut dev = GpuAdapterGrad::new(gpu, &params, nq, pairs)?;
    let queries = crate::index::synthetic::random_unit_vectors(nq, d, 2);
    let cands = crate::index::synthetic::random_unit_vectors(pairs, d, 3);
    dev.forward(&queries, &cands, k)?;
    let d_logit = vec![0.01f32; pairs];
    let mut grads = params.zeros_like();
    dev.backward(&d_logit, None, &mut grads, None, None)?;
    let ms = gpu.time_ms(10, || {
        dev.queue_forward(nq, k)?;
        dev.queue_backward(nq, k, 0, false)
    })?;
    let (p, dh, qdh) = (pairs as f64, (d * h) as f64, (nq * d * h) as f64);
    // forward: u, pre (2d inputs), a; backward: ∂g, ∂W2, CF (2d), UQ
    let flops = 2.0 * (qdh + 2.0 * p * dh + p * dh) + 2.0 * (p * dh + p * dh + 2.0 * p * dh + qdh);
    // what the kernels between the products stream (h = d): features 3, hidden 3, geometry 3,
    // pair gradient 3, GELU gradient 3, group sums 2 passes over P·d floats
    let bytes = 17.0 * p * d as f64 * 4.0;
    Ok(vec![super::KernelTiming {
        name: "rrra_adapter_train_* + cuBLAS sgemm".into(),
        shape: format!("adapter step d {d}, h {h}, {nq} queries x {k} candidates, fp32"),
        ms,
        bytes,
        flops,
    }])
}

fn no_forward() -> Error {
    Error::InvalidArgument("the adapter's backward needs a forward first".into())
}

/// One warp per row.
fn warp_per_row(rows: usize) -> Result<cudarc::driver::LaunchConfig> {
    launch_cfg((rows * 32).div_ceil(THREADS as usize), THREADS, 0)
}
