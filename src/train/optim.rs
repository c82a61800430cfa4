//! Optimisation: AdamW, the linear warm-up/decay learning-rate schedule and global gradient-norm
//! clipping, each following the PyTorch / transformers definition so a run here and a
//! sentence-transformers run with the same hyper-parameters take the same steps.
//!
//! Every update is elementwise, so splitting the work over threads cannot change a single bit;
//! the only reduction (the gradient norm) uses a fixed partition and a fixed summation order.

use crate::error::{Error, Result};
use crate::model::weights::BertWeights;
use rayon::prelude::*;

/// Elements per parallel work item: large enough to amortise scheduling, small enough that
/// the big embedding matrix spreads over all cores.
const CHUNK: usize = 1 << 14;

/// AdamW hyper-parameters (the learning rate comes per step from the schedule).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    /// torch.optim.AdamW's defaults: betas (0.9, 0.999), eps 1e-8, weight decay 0.01.
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

impl AdamWConfig {
    fn validate(&self) -> Result<()> {
        let beta_ok = |b: f32| (0.0..1.0).contains(&b);
        if !beta_ok(self.beta1) || !beta_ok(self.beta2) {
            return Err(Error::InvalidArgument(format!(
                "AdamW betas must lie in [0, 1), got ({}, {})",
                self.beta1, self.beta2
            )));
        }
        if !(self.eps >= 0.0 && self.eps.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "AdamW eps must be finite and non-negative, got {}",
                self.eps
            )));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "AdamW weight decay must be finite and non-negative, got {}",
                self.weight_decay
            )));
        }
        Ok(())
    }
}

/// AdamW (Loshchilov & Hutter): decoupled weight decay, bias-corrected moments, like
/// torch.optim.AdamW (`amsgrad=False`, `maximize=False`).
#[derive(Debug, Clone)]
pub struct AdamW {
    pub cfg: AdamWConfig,
    /// Updates done so far; the bias corrections of the next update use `step + 1`.
    pub step: u64,
    /// First moments, one vector per parameter tensor.
    pub m: Vec<Vec<f32>>,
    /// Second moments, one vector per parameter tensor.
    pub v: Vec<Vec<f32>>,
}

impl AdamW {
    /// Zeroed moments for parameter tensors of `sizes` elements each.
    pub fn new(cfg: AdamWConfig, sizes: &[usize]) -> Self {
        AdamW {
            cfg,
            step: 0,
            m: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: sizes.iter().map(|&n| vec![0.0; n]).collect(),
        }
    }

    /// One update of every tensor: `params[i] -= lr * (m̂ / (sqrt(v̂) + eps) + wd * param)`, the
    /// decay term only where `decay[i]`. Increments `step` first (torch semantics: the first
    /// update uses t = 1).
    ///
    /// Everything is checked before anything changes, so an error leaves parameters, moments and
    /// step as they were.
    pub fn update(
        &mut self,
        params: &mut [&mut [f32]],
        grads: &[&[f32]],
        decay: &[bool],
        lr: f32,
    ) -> Result<()> {
        let n = self.m.len();
        if params.len() != n || grads.len() != n || decay.len() != n || self.v.len() != n {
            return Err(Error::InvalidArgument(format!(
                "AdamW has state for {n} tensors but got {} parameters, {} gradients, {} decay \
                 flags",
                params.len(),
                grads.len(),
                decay.len()
            )));
        }
        for (i, ((p, g), (m, v))) in params
            .iter()
            .zip(grads)
            .zip(self.m.iter().zip(&self.v))
            .enumerate()
        {
            if p.len() != m.len() || g.len() != m.len() || v.len() != m.len() {
                return Err(Error::InvalidArgument(format!(
                    "AdamW tensor {i}: state has {} elements but parameter has {} and gradient {}",
                    m.len(),
                    p.len(),
                    g.len()
                )));
            }
        }
        if !(lr >= 0.0 && lr.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "learning rate must be finite and non-negative, got {lr}"
            )));
        }
        self.cfg.validate()?;

        self.step += 1;
        let c = &self.cfg;
        // torch computes the scalars in Python floats (f64) and hands them to f32 kernels.
        let t = self.step as f64;
        let bias1 = 1.0 - (c.beta1 as f64).powf(t);
        let bias2 = 1.0 - (c.beta2 as f64).powf(t);
        let step_size = (lr as f64 / bias1) as f32;
        let bias2_sqrt = bias2.sqrt() as f32;
        let decay_factor = (1.0 - lr as f64 * c.weight_decay as f64) as f32;
        let (beta1, beta2, eps) = (c.beta1, c.beta2, c.eps);
        let (one_minus_b1, one_minus_b2) = (1.0 - beta1, 1.0 - beta2);

        // One flat list of work items over all tensors, so tiny tensors (biases, LayerNorms)
        // and the large ones share the thread pool evenly.
        let mut items = Vec::new();
        for (((p, g), (m, v)), &d) in params
            .iter_mut()
            .zip(grads)
            .zip(self.m.iter_mut().zip(self.v.iter_mut()))
            .zip(decay)
        {
            let pieces = p
                .chunks_mut(CHUNK)
                .zip(g.chunks(CHUNK))
                .zip(m.chunks_mut(CHUNK).zip(v.chunks_mut(CHUNK)));
            items.extend(pieces.map(|((p, g), (m, v))| (p, g, m, v, d)));
        }
        items.into_par_iter().for_each(|(p, g, m, v, d)| {
            for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                // torch's single-tensor AdamW, operation by operation (torch writes the first
                // moment as `lerp(m, g, 1 - beta1)`, equal up to rounding; the plain form is the
                // one any other backend can reproduce exactly).
                if d {
                    *p *= decay_factor;
                }
                *m = beta1 * *m + one_minus_b1 * g;
                *v = *v * beta2 + one_minus_b2 * (g * g);
                let denom = v.sqrt() / bias2_sqrt + eps;
                *p += -step_size * (*m / denom);
            }
        });
        Ok(())
    }
}

/// Linear warm-up from 0 to `peak` over `warmup` steps, then linear decay to 0 at `total`:
/// transformers' `get_linear_schedule_with_warmup`. `step` counts from 0 and `lr(step)` is the
/// rate of update number `step + 1`.
pub fn linear_warmup_decay(step: u64, total: u64, warmup: u64, peak: f32) -> f32 {
    // Python's arithmetic: floats in f64 and `total - step` may go negative.
    let factor = if step < warmup {
        step as f64 / warmup.max(1) as f64
    } else {
        let left = total as f64 - step as f64;
        let span = (total as f64 - warmup as f64).max(1.0);
        (left / span).max(0.0)
    };
    (peak as f64 * factor) as f32
}

/// Scales `grads` so their global L2 norm is at most `max_norm` (torch's `clip_grad_norm_`:
/// factor `max_norm / (norm + 1e-6)` when below 1) and returns the norm before clipping.
///
/// The norm is accumulated in f64 over a fixed partition in a fixed order, so it does not depend
/// on the number of threads. A non-finite norm is returned with the gradients left untouched
/// (scaling would turn them all into NaN); the caller decides whether to skip the step.
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f32) -> f32 {
    let partial: Vec<f64> = grads
        .iter()
        .flat_map(|g| g.chunks(CHUNK))
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|c| c.iter().map(|&x| x as f64 * x as f64).sum::<f64>())
        .collect();
    let norm = partial.iter().sum::<f64>().sqrt();
    if !norm.is_finite() {
        return norm as f32;
    }
    let scale = max_norm as f64 / (norm + 1e-6);
    if scale < 1.0 && max_norm > 0.0 {
        let s = scale as f32;
        grads
            .iter_mut()
            .flat_map(|g| g.chunks_mut(CHUNK))
            .collect::<Vec<_>>()
            .into_par_iter()
            .for_each(|c| c.iter_mut().for_each(|x| *x *= s));
    }
    norm as f32
}

/// The encoder's optimizer step as the trainer takes it: the gradients summed over the
/// micro-batches scaled by `scale` (`1 / micro-batches`), clipped to `max_norm` by
/// [`clip_grad_norm`], then [`AdamW::update`] of `weights` with their weight-decay flags.
/// Returns the norm before clipping; when it is not finite nothing changed. This is the
/// contract a device that keeps the optimizer (`encoder_grad::ResidentOptimizer`) meets.
pub fn encoder_step(
    optim: &mut AdamW,
    weights: &mut BertWeights,
    grads: &mut BertWeights,
    scale: f32,
    max_norm: f32,
    lr: f32,
) -> Result<f32> {
    let mut grads: Vec<&mut [f32]> = grads
        .tensors_mut()
        .into_iter()
        .map(|(t, _)| t.as_mut_slice())
        .collect();
    if scale != 1.0 {
        for g in grads.iter_mut() {
            g.iter_mut().for_each(|v| *v *= scale);
        }
    }
    let norm = clip_grad_norm(&mut grads, max_norm);
    if !norm.is_finite() {
        return Ok(norm);
    }
    let grads: Vec<&[f32]> = grads.iter().map(|g| &**g).collect();
    let mut params = weights.tensors_mut();
    let decay: Vec<bool> = params.iter().map(|(_, d)| *d).collect();
    let mut params: Vec<&mut [f32]> = params.iter_mut().map(|(t, _)| t.as_mut_slice()).collect();
    optim.update(&mut params, &grads, &decay, lr)?;
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook AdamW in f64, written independently of the code under test.
    fn reference(
        p0: &[f64],
        grads: &[Vec<f64>],
        lrs: &[f64],
        c: AdamWConfig,
        decay: bool,
    ) -> Vec<f64> {
        let (b1, b2, eps) = (c.beta1 as f64, c.beta2 as f64, c.eps as f64);
        let wd = if decay { c.weight_decay as f64 } else { 0.0 };
        let mut p = p0.to_vec();
        let mut m = vec![0.0; p.len()];
        let mut v = vec![0.0; p.len()];
        for (t, (g, &lr)) in grads.iter().zip(lrs).enumerate() {
            let t = (t + 1) as i32;
            for i in 0..p.len() {
                p[i] -= lr * wd * p[i];
                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                let mh = m[i] / (1.0 - b1.powi(t));
                let vh = v[i] / (1.0 - b2.powi(t));
                p[i] -= lr * mh / (vh.sqrt() + eps);
            }
        }
        p
    }

    fn run(p0: &[f32], grads: &[Vec<f32>], lrs: &[f32], c: AdamWConfig, decay: bool) -> Vec<f32> {
        let mut opt = AdamW::new(c, &[p0.len()]);
        let mut p = p0.to_vec();
        for (g, &lr) in grads.iter().zip(lrs) {
            opt.update(&mut [&mut p], &[g], &[decay], lr).unwrap();
        }
        assert_eq!(opt.step, grads.len() as u64);
        p
    }

    fn to64(x: &[f32]) -> Vec<f64> {
        x.iter().map(|&v| v as f64).collect()
    }

    #[test]
    fn three_steps_match_f64_reference() {
        let c = AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let p0 = [0.5f32, -1.25, 2.0, 0.0, 3.5, -0.75];
        let grads = vec![
            vec![0.1f32, -0.2, 0.3, 1e-3, -2.0, 0.05],
            vec![-0.3f32, 0.1, 0.25, -1e-3, -1.5, 0.0],
            vec![0.2f32, 0.4, -0.1, 2e-3, 0.5, -0.05],
        ];
        let lrs = [1e-2f32, 2e-2, 5e-3];
        for decay in [true, false] {
            let got = run(&p0, &grads, &lrs, c, decay);
            let g64: Vec<_> = grads.iter().map(|g| to64(g)).collect();
            let want = reference(&to64(&p0), &g64, &to64(&lrs), c, decay);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (*g as f64 - w).abs() <= 1e-6 * (1.0 + w.abs()),
                    "decay={decay} element {i}: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn decay_flag_switches_weight_decay_only() {
        let c = AdamWConfig {
            weight_decay: 0.5,
            ..Default::default()
        };
        // Zero gradient: moments stay 0, so any motion is weight decay alone.
        let p0 = vec![1.0f32, -2.0, 4.0];
        let zero = vec![vec![0.0f32; 3]];
        let kept = run(&p0, &zero, &[0.1], c, false);
        assert_eq!(kept, p0);
        let decayed = run(&p0, &zero, &[0.1], c, true);
        for (d, p) in decayed.iter().zip(&p0) {
            assert!((d - p * (1.0 - 0.1 * 0.5)).abs() < 1e-6, "{d} vs {p}");
        }
        // Two tensors in one call: decay applies to the flagged one only.
        let mut opt = AdamW::new(c, &[3, 3]);
        let (mut a, mut b) = (p0.clone(), p0.clone());
        let g = [0.0f32; 3];
        opt.update(&mut [&mut a, &mut b], &[&g, &g], &[true, false], 0.1)
            .unwrap();
        assert_eq!(a, decayed);
        assert_eq!(b, p0);
    }

    #[test]
    fn first_step_moves_by_lr_times_sign() {
        let c = AdamWConfig {
            weight_decay: 0.0,
            ..Default::default()
        };
        let lr = 1e-3f32;
        let p0 = vec![0.3f32, -0.7, 1.1, 5.0];
        let g = vec![vec![2.5f32, -1e-2, 3e-4, -40.0]];
        let p = run(&p0, &g, &[lr], c, true);
        for ((p, p0), g) in p.iter().zip(&p0).zip(&g[0]) {
            let moved = p0 - p;
            assert!(
                (moved - lr * g.signum()).abs() < 1e-3 * lr,
                "moved {moved} for gradient {g}"
            );
        }
    }

    #[test]
    fn mismatches_are_errors_and_change_nothing() {
        let mut opt = AdamW::new(AdamWConfig::default(), &[2, 3]);
        let mut a = vec![1.0f32; 2];
        let mut b = vec![1.0f32; 3];
        let ga = [1.0f32; 2];
        let gb = [1.0f32; 3];
        let short = [1.0f32; 2];
        assert!(matches!(
            opt.update(&mut [&mut a], &[&ga], &[true], 0.1),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            opt.update(&mut [&mut a, &mut b], &[&ga, &short], &[true, true], 0.1),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            opt.update(&mut [&mut a, &mut b], &[&ga, &gb], &[true], 0.1),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            opt.update(&mut [&mut a, &mut b], &[&ga, &gb], &[true, true], f32::NAN),
            Err(Error::InvalidArgument(_))
        ));
        assert_eq!(opt.step, 0);
        assert!(a.iter().chain(&b).all(|&x| x == 1.0));
        assert!(opt.m.iter().chain(&opt.v).flatten().all(|&x| x == 0.0));
    }

    #[test]
    fn parallel_update_equals_serial_on_large_tensor() {
        // Several chunks: the result must not depend on how they are split across threads.
        let n = 3 * CHUNK + 17;
        let p0: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) * 0.01).collect();
        let g: Vec<f32> = (0..n).map(|i| ((i % 31) as f32 - 15.0) * 0.003).collect();
        let c = AdamWConfig::default();
        let par = run(&p0, &[g.clone(), g.clone()], &[1e-3, 1e-3], c, true);
        let single = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(|| run(&p0, &[g.clone(), g.clone()], &[1e-3, 1e-3], c, true));
        assert!(par
            .iter()
            .zip(&single)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn schedule_values() {
        let (total, warmup, peak) = (100u64, 10u64, 2e-5f32);
        assert_eq!(linear_warmup_decay(0, total, warmup, peak), 0.0);
        assert!((linear_warmup_decay(5, total, warmup, peak) - peak * 0.5).abs() < 1e-12);
        assert_eq!(linear_warmup_decay(warmup, total, warmup, peak), peak);
        // Middle of the decay: (100 - 55) / 90 = 0.5.
        assert!((linear_warmup_decay(55, total, warmup, peak) - peak * 0.5).abs() < 1e-12);
        assert!((linear_warmup_decay(99, total, warmup, peak) - peak / 90.0).abs() < 1e-12);
        assert_eq!(linear_warmup_decay(total, total, warmup, peak), 0.0);
        assert_eq!(linear_warmup_decay(total + 7, total, warmup, peak), 0.0);
        // No warm-up: the peak at step 0, then straight decay.
        assert_eq!(linear_warmup_decay(0, total, 0, peak), peak);
        assert!((linear_warmup_decay(50, total, 0, peak) - peak * 0.5).abs() < 1e-12);
        // Warm-up longer than training never divides by zero or goes negative.
        let lr = linear_warmup_decay(5, 4, 10, peak);
        assert!((lr - peak * 0.5).abs() < 1e-12);
        assert_eq!(linear_warmup_decay(12, 4, 10, peak), 0.0);
    }

    #[test]
    fn clip_scales_to_max_norm() {
        let mut a = vec![3.0f32, 0.0];
        let mut b = vec![0.0f32, 4.0, 0.0];
        let norm = clip_grad_norm(&mut [&mut a, &mut b], 1.0);
        assert!((norm - 5.0).abs() < 1e-6);
        let after = (a.iter().chain(&b).map(|&x| (x as f64).powi(2)).sum::<f64>()).sqrt();
        assert!((after - 1.0).abs() < 1e-5, "clipped norm {after}");
        // Direction is kept.
        assert!((a[0] / b[1] - 0.75).abs() < 1e-6);
    }

    #[test]
    fn clip_is_noop_under_max_norm() {
        let mut a = vec![0.3f32, -0.4];
        let before = a.clone();
        let norm = clip_grad_norm(&mut [&mut a], 1.0);
        assert!((norm - 0.5).abs() < 1e-6);
        assert_eq!(a, before);
        // A non-finite norm is reported and leaves the gradients alone.
        let mut bad = vec![f32::INFINITY, 1.0];
        assert!(!clip_grad_norm(&mut [&mut bad], 1.0).is_finite());
        assert_eq!(bad[1], 1.0);
    }

    #[test]
    fn clip_norm_does_not_depend_on_threads() {
        let n = 5 * CHUNK + 3;
        let g: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
            .collect();
        let norm_par = clip_grad_norm(&mut [&mut g.clone()], f32::INFINITY);
        let norm_one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(|| clip_grad_norm(&mut [&mut g.clone()], f32::INFINITY));
        assert_eq!(norm_par.to_bits(), norm_one.to_bits());
        let direct = g.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
        assert!((norm_par as f64 - direct).abs() < 1e-4 * direct);
    }
}
