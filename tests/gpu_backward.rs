// The backward kernels of the row-wise encoder ops (`device::backward`, kernels/backward.cu)
// against their CPU references: `cpu::backward::{layernorm_backward, gelu_backward,
// l2_normalize_backward, linear_backward}` (its bias gradient) and the pooling and embedding
// steps of `train::encoder_grad` (ported below, since they are private there). Inputs are fresh
// random values (fixed seeds), odd sizes included; every device output is filled with NaN
// before the kernels run (the host helpers do it), so an element a kernel skipped fails.
// Without a GPU the GPU tests skip (and fail if `RRRA_REQUIRE_GPU` is set); the plan and ptxas
// checks run everywhere.

mod common;

use half::bf16;
use rrra::cpu::backward::{
    gelu_backward, l2_normalize_backward, layernorm_backward, linear_backward,
};
use rrra::device::backward::{EmbeddingGradPlan, GpuBackward, EMBED_CHUNK};
use rrra::device::{cuda_compiled, kernel_module, Gpu};
use rrra::index::synthetic::Rng;
use rrra::model::pooling::Pooling;
use rrra::Error;

fn gpu() -> Option<Gpu> {
    common::gpu_or_skip()
}

fn uniform(rng: &mut Rng, n: usize, lo: f64, hi: f64) -> Vec<f32> {
    (0..n)
        .map(|_| (lo + (hi - lo) * rng.next_f64()) as f32)
        .collect()
}

/// max |got − want| / (1 + max |want|); infinite when a value is NaN or a length differs.
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let scale = 1.0 + want.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
    let mut worst = 0.0f64;
    for (&g, &w) in got.iter().zip(want) {
        if g.is_nan() != w.is_nan() {
            return f64::INFINITY;
        }
        worst = worst.max((g as f64 - w as f64).abs());
    }
    worst / scale
}

fn bitwise(got: &[f32], want: &[f32]) -> usize {
    got.iter()
        .zip(want)
        .filter(|(g, w)| g.to_bits() != w.to_bits())
        .count()
        + got.len().abs_diff(want.len())
}

// ---------------------------------------------------------------------------------------------
// LayerNorm

#[test]
fn layernorm_backward_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut bw = GpuBackward::new(&gpu).unwrap();
    let mut rng = Rng::new(11);
    // odd widths, every kernel variant, row counts across the CPU's 256-row chunks and the
    // kernel's 32-row blocks
    for (case, &(rows, h)) in [
        (1usize, 1usize),
        (7, 37),
        (300, 128),
        (33, 130),
        (257, 768),
        (64, 511),
        (9, 1000),
        (5, 1024),
    ]
    .iter()
    .enumerate()
    {
        // A one-wide row has no variance: ds is 0 up to 1/sqrt(eps) times one rounding of
        // dy·gamma, which nvcc's FMA contraction makes differ from the CPU's; eps 1e-12 would
        // blow that 1e-9 up to 1e-3, so that row takes 1e-5.
        let eps = if case % 2 == 0 && h > 1 { 1e-12 } else { 1e-5 };
        let s = uniform(&mut rng, rows * h, -2.0, 3.0);
        let dy = uniform(&mut rng, rows * h, -1.0, 1.0);
        let gamma = uniform(&mut rng, h, 0.5, 1.5);
        let dg0 = uniform(&mut rng, h, -1.0, 1.0);
        let db0 = uniform(&mut rng, h, -1.0, 1.0);
        let (mut ds_c, mut dg_c, mut db_c) = (vec![0.0f32; rows * h], dg0.clone(), db0.clone());
        layernorm_backward(&s, h, &gamma, eps, &dy, &mut ds_c, &mut dg_c, &mut db_c);
        let (mut ds, mut dg, mut db) = (vec![f32::NAN; rows * h], dg0.clone(), db0.clone());
        bw.layernorm_backward_host(&s, h, &gamma, eps, &dy, &mut ds, &mut dg, &mut db)
            .unwrap();
        // Same formula, other summation order (warp trees vs the CPU's 8 lanes; block partials
        // vs 256-row chunks) and FMA contraction: a few f32 roundings of O(1) terms, ~1e-7
        // relative to the largest value (the emulator measured <= 3e-7); 2e-5 leaves margin
        // while any indexing or formula slip is O(1).
        let (e1, e2, e3) = (
            rel_err(&ds, &ds_c),
            rel_err(&dg, &dg_c),
            rel_err(&db, &db_c),
        );
        assert!(
            e1 < 2e-5 && e2 < 2e-5 && e3 < 2e-5,
            "rows {rows} h {h}: ds {e1:e}, dgamma {e2:e}, dbeta {e3:e}"
        );
        // deterministic: a second run gives the same bits
        let (mut ds2, mut dg2, mut db2) = (vec![f32::NAN; rows * h], dg0, db0);
        bw.layernorm_backward_host(&s, h, &gamma, eps, &dy, &mut ds2, &mut dg2, &mut db2)
            .unwrap();
        assert_eq!(
            bitwise(&ds2, &ds) + bitwise(&dg2, &dg) + bitwise(&db2, &db),
            0
        );
    }
    // widths beyond the register-resident row, ragged shapes
    let (mut dg, mut db) = (vec![0.0f32; 1025], vec![0.0f32; 1025]);
    let x = vec![0.5f32; 2 * 1025];
    let mut ds = x.clone();
    let g = vec![1.0f32; 1025];
    assert!(matches!(
        bw.layernorm_backward_host(&x, 1025, &g, 1e-5, &x, &mut ds, &mut dg, &mut db),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        bw.layernorm_backward_host(
            &x[..7],
            4,
            &g[..4],
            1e-5,
            &x[..7],
            &mut ds[..7],
            &mut dg[..4],
            &mut db[..4]
        ),
        Err(Error::InvalidArgument(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// GELU and bias

#[test]
fn gelu_backward_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let bw = GpuBackward::new(&gpu).unwrap();
    let mut rng = Rng::new(12);
    for n in [1usize, 5, 4099, 3 * 16384 + 3] {
        let mut pre = uniform(&mut rng, n, -6.0, 6.0);
        if n > 3 {
            pre[0] = 0.0;
            pre[1] = -12.0;
            pre[2] = 12.0;
        }
        let dy = uniform(&mut rng, n, -1.0, 1.0);
        let mut want = dy.clone();
        gelu_backward(&pre, &mut want);
        let mut got = dy.clone();
        bw.gelu_backward_host(&pre, &mut got).unwrap();
        // gelu' ∈ [-0.17, 1.13]: the CPU's erf is within 5e-7 of exact (its own test), CUDA's
        // erfcf within 4 ulp and expf 2 ulp, so |Δ gelu'| < 1e-6 and |Δ| ≤ 2e-6 |dy| with
        // margin (the emulator, with the host's erfcf/expf, measured 3e-7 |dy|); a wrong
        // formula is off by >= 1e-3.
        for i in 0..n {
            assert!(
                (got[i] - want[i]).abs() <= 2e-6 * dy[i].abs() + 1e-30,
                "n {n}, element {i}: pre {} dy {}: {} vs {}",
                pre[i],
                dy[i],
                got[i],
                want[i]
            );
        }
        // misaligned views take the scalar path
        if n > 8 {
            let mut got1 = dy[1..].to_vec();
            bw.gelu_backward_host(&pre[1..], &mut got1).unwrap();
            let mut want1 = dy[1..].to_vec();
            gelu_backward(&pre[1..], &mut want1);
            assert!(rel_err(&got1, &want1) < 4e-6);
        }
    }
    assert!(matches!(
        bw.gelu_backward_host(&[1.0, 2.0], &mut [1.0]),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn gelu_backward_bf16_is_one_rounding_of_the_exact_derivative() {
    let Some(gpu) = gpu() else { return };
    let bw = GpuBackward::new(&gpu).unwrap();
    let mut rng = Rng::new(13);
    let n = 10_003;
    let pre: Vec<u16> = uniform(&mut rng, n, -6.0, 6.0)
        .iter()
        .map(|&v| bf16::from_f32(v).to_bits())
        .collect();
    let dy0: Vec<u16> = uniform(&mut rng, n, -1.0, 1.0)
        .iter()
        .map(|&v| bf16::from_f32(v).to_bits())
        .collect();
    let mut dy = dy0.clone();
    bw.gelu_backward_bf16_host(&pre, &mut dy).unwrap();
    for i in 0..n {
        let x = bf16::from_bits(pre[i]).to_f32() as f64;
        let g = bf16::from_bits(dy0[i]).to_f32() as f64;
        let phi = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
        let cdf = 0.5 * libm::erfc(-x / std::f64::consts::SQRT_2);
        let want = g * (cdf + x * phi);
        let got = bf16::from_bits(dy[i]).to_f32() as f64;
        // one bf16 rounding (2⁻⁹ relative) of an f32 result a few ulp from exact (cancellation
        // between Φ and x·φ for x ≈ -5 amplifies those ulps a few times): 2⁻⁸ relative
        assert!(
            (got - want).abs() <= want.abs() / 256.0,
            "element {i}: x {x} dy {g}: {got} vs {want}"
        );
    }
}

#[test]
fn bias_gradient_is_bitwise_the_cpus() {
    let Some(gpu) = gpu() else { return };
    let mut bw = GpuBackward::new(&gpu).unwrap();
    let mut rng = Rng::new(14);
    for (rows, cols) in [
        (1usize, 1usize),
        (255, 3),
        (256, 768),
        (257, 130),
        (1000, 7),
        (3000, 3072),
    ] {
        let dy = uniform(&mut rng, rows * cols, -1.0, 1.0);
        let db0 = uniform(&mut rng, cols, -1.0, 1.0);
        // the bias part of linear_backward (x = 0 with one input feature: dw stays 0)
        let (x, w) = (vec![0.0f32; rows], vec![0.0f32; cols]);
        let (mut dw, mut want) = (vec![0.0f32; cols], db0.clone());
        linear_backward(&x, rows, 1, &w, cols, &dy, None, &mut dw, &mut want);
        let mut got = db0.clone();
        bw.bias_backward_host(&dy, &mut got).unwrap();
        // the kernels add in the CPU's order (256-row chunks in row order, then the chunks in
        // order onto db), with plain f32 adds: every bit agrees
        assert_eq!(bitwise(&got, &want), 0, "rows {rows} cols {cols}");
        // from bf16: the CPU's sums of the (exactly) widened values, bitwise too
        let dy_b: Vec<u16> = dy.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
        let dy_w: Vec<f32> = dy_b.iter().map(|&b| bf16::from_bits(b).to_f32()).collect();
        let mut want_b = db0.clone();
        linear_backward(&x, rows, 1, &w, cols, &dy_w, None, &mut dw, &mut want_b);
        let mut got_b = db0.clone();
        bw.bias_backward_bf16_host(&dy_b, &mut got_b).unwrap();
        assert_eq!(bitwise(&got_b, &want_b), 0, "bf16, rows {rows} cols {cols}");
    }
    assert!(matches!(
        bw.bias_backward_host(&[1.0; 7], &mut [0.0; 2]),
        Err(Error::InvalidArgument(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// Pooling and L2

/// train::encoder_grad's pool_backward over a packed batch, onto zeros.
fn cpu_pool_backward(
    pooling: Pooling,
    hidden: &[f32],
    offsets: &[usize],
    d_pooled: &[f32],
    h: usize,
) -> Vec<f32> {
    let mut dx = vec![0.0f32; offsets[offsets.len() - 1] * h];
    for s in 0..offsets.len() - 1 {
        let (start, len) = (offsets[s], offsets[s + 1] - offsets[s]);
        let rows = &hidden[start * h..(start + len) * h];
        let dy = &d_pooled[s * h..(s + 1) * h];
        let dx = &mut dx[start * h..(start + len) * h];
        match pooling {
            Pooling::Cls => {
                if len > 0 {
                    for (o, g) in dx[..h].iter_mut().zip(dy) {
                        *o += g;
                    }
                }
            }
            Pooling::Mean => {
                let inv = 1.0 / len.max(1) as f32;
                for row in dx.chunks_exact_mut(h) {
                    for (o, &g) in row.iter_mut().zip(dy) {
                        *o += g * inv;
                    }
                }
            }
            Pooling::Max => {
                for c in 0..h {
                    if len == 0 {
                        continue;
                    }
                    let mut best = 0;
                    for r in 1..len {
                        if rows[r * h + c] > rows[best * h + c] {
                            best = r;
                        }
                    }
                    dx[best * h + c] += dy[c];
                }
            }
        }
    }
    dx
}

#[test]
fn pooling_backward_is_bitwise_the_cpus() {
    let Some(gpu) = gpu() else { return };
    let bw = GpuBackward::new(&gpu).unwrap();
    let mut rng = Rng::new(15);
    for (offsets, h) in [
        (vec![0usize, 1], 5usize),
        (vec![0, 3, 3, 10, 11, 40], 37),
        (vec![0, 128, 200, 200, 457], 768),
    ] {
        let t = offsets[offsets.len() - 1];
        let sequences = offsets.len() - 1;
        let mut hidden = uniform(&mut rng, t * h, -1.0, 1.0);
        for v in hidden.iter_mut().step_by(7) {
            *v = 0.5; // ties: the first row holding the maximum takes the gradient
        }
        let d_pooled = uniform(&mut rng, sequences * h, -1.0, 1.0);
        for pooling in [Pooling::Mean, Pooling::Cls, Pooling::Max] {
            let want = cpu_pool_backward(pooling, &hidden, &offsets, &d_pooled, h);
            let mut got = vec![f32::NAN; t * h];
            bw.pool_backward_host(pooling, &hidden, &offsets, &d_pooled, h, &mut got)
                .unwrap();
            // the same products (g · 1/len, computed the same way) or copies: exact (== also
            // equates the CPU's 0 + (-0) = +0 with a -0)
            let bad = got.iter().zip(&want).filter(|(g, w)| g != w).count();
            assert_eq!(bad, 0, "{pooling:?}, offsets {offsets:?}, h {h}");
        }
    }
    let mut dx = vec![0.0f32; 10];
    for bad_offsets in [vec![1usize, 2], vec![0, 3, 2], vec![0, 3]] {
        assert!(matches!(
            bw.pool_backward_host(Pooling::Mean, &[], &bad_offsets, &[0.0; 5], 5, &mut dx),
            Err(Error::InvalidArgument(_))
        ));
    }
}

#[test]
fn l2_normalize_backward_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let bw = GpuBackward::new(&gpu).unwrap();
    let mut rng = Rng::new(16);
    for (rows, dim) in [(1usize, 1usize), (3, 7), (128, 768), (17, 33)] {
        let mut x = uniform(&mut rng, rows * dim, -1.0, 1.0);
        if rows > 1 {
            x[dim..2 * dim].fill(0.0); // below the 1e-12 clamp: dx = dy / 1e-12
        }
        let dy = uniform(&mut rng, rows * dim, -1.0, 1.0);
        let mut got = vec![f32::NAN; rows * dim];
        bw.l2_normalize_backward_host(&x, &dy, dim, &mut got)
            .unwrap();
        for r in 0..rows {
            let row = r * dim..(r + 1) * dim;
            let mut want = vec![0.0f32; dim];
            l2_normalize_backward(&x[row.clone()], &dy[row.clone()], &mut want);
            // norm and y·dy summed in another order (warp tree vs sequential) with FMAs: ~√dim
            // roundings relative to the row's largest gradient (the emulator: <= 8e-7 at dim
            // 768); 1e-5 keeps margin, a formula or indexing slip is O(1)
            let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
            let worst = got[row]
                .iter()
                .zip(&want)
                .fold(0.0f64, |m, (g, w)| m.max((g - w).abs() as f64));
            assert!(
                worst <= 1e-5 * scale,
                "rows {rows} dim {dim} row {r}: {worst:e} vs {scale:e}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Embeddings

/// train::encoder_grad's scatter: token by token, in order, into the three tables.
#[allow(clippy::too_many_arguments)]
fn cpu_embedding_backward(
    ids: &[u32],
    type_ids: &[u32],
    offsets: &[usize],
    g: &[f32],
    h: usize,
    word: &mut [f32],
    pos: &mut [f32],
    types: &mut [f32],
) {
    let add = |dst: &mut [f32], src: &[f32]| dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
    for s in 0..offsets.len() - 1 {
        for (p, tok) in (offsets[s]..offsets[s + 1]).enumerate() {
            let gr = &g[tok * h..(tok + 1) * h];
            let (w, t) = (ids[tok] as usize, type_ids[tok] as usize);
            add(&mut word[w * h..(w + 1) * h], gr);
            add(&mut pos[p * h..(p + 1) * h], gr);
            add(&mut types[t * h..(t + 1) * h], gr);
        }
    }
}

#[test]
fn embedding_backward_matches_cpu_and_is_bitwise_on_short_runs() {
    let Some(gpu) = gpu() else { return };
    let mut bw = GpuBackward::new(&gpu).unwrap();
    let mut rng = Rng::new(17);
    // (offsets, h, vocab, type vocab, share of tokens with id 3: runs longer than a chunk)
    for (offsets, h, vocab, tv, repeat) in [
        (vec![0usize, 1], 3usize, 5usize, 1usize, 0.0f64),
        (vec![0, 5, 5, 17, 50], 37, 11, 2, 0.3),
        (vec![0, 100, 170, 300], 300, 40, 2, 0.5),
        (vec![0, 128, 256, 384, 512, 640], 768, 1000, 2, 0.2),
    ] {
        let t = offsets[offsets.len() - 1];
        let positions = offsets.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0) + 3;
        let ids: Vec<u32> = (0..t)
            .map(|_| {
                if rng.next_f64() < repeat {
                    3
                } else {
                    rng.below(vocab) as u32
                }
            })
            .collect();
        let type_ids: Vec<u32> = (0..t).map(|_| rng.below(tv) as u32).collect();
        let g = uniform(&mut rng, t * h, -1.0, 1.0);
        let w0 = uniform(&mut rng, vocab * h, -1.0, 1.0);
        let p0 = uniform(&mut rng, positions * h, -1.0, 1.0);
        let t0 = uniform(&mut rng, tv * h, -1.0, 1.0);
        let (mut w_c, mut p_c, mut t_c) = (w0.clone(), p0.clone(), t0.clone());
        cpu_embedding_backward(
            &ids, &type_ids, &offsets, &g, h, &mut w_c, &mut p_c, &mut t_c,
        );
        let (mut w, mut p, mut ty) = (w0.clone(), p0.clone(), t0.clone());
        bw.embedding_backward_host(&ids, &type_ids, &offsets, &g, h, &mut w, &mut p, &mut ty)
            .unwrap();
        // tokens per row of each table
        let mut count = [
            vec![0usize; vocab],
            vec![0usize; positions],
            vec![0usize; tv],
        ];
        for s in 0..offsets.len() - 1 {
            for (q, tok) in (offsets[s]..offsets[s + 1]).enumerate() {
                count[0][ids[tok] as usize] += 1;
                count[1][q] += 1;
                count[2][type_ids[tok] as usize] += 1;
            }
        }
        for (k, (got, want)) in [(&w, &w_c), (&p, &p_c), (&ty, &t_c)].iter().enumerate() {
            for (r, &n) in count[k].iter().enumerate() {
                let row = r * h..(r + 1) * h;
                if n <= EMBED_CHUNK {
                    // the CPU's additions in the CPU's order: every bit agrees
                    assert_eq!(
                        bitwise(&got[row.clone()], &want[row]),
                        0,
                        "table {k} row {r} ({n} tokens), T {t} h {h}"
                    );
                } else {
                    // chunk sums first, then the chunks: both sides make n roundings of partial
                    // sums bounded by 1 + n (|table| ≤ 1, |g| ≤ 1), each ≤ 2⁻²⁴ of it, so
                    // |Δ| ≤ 2·n·(n + 1)·2⁻²⁴ < 1.2e-7·n·(n + 1); a lost or doubled token is O(1)
                    let tol = 1.2e-7 * (n * (n + 1)) as f64;
                    let e = got[row.clone()]
                        .iter()
                        .zip(&want[row])
                        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs() as f64));
                    assert!(e <= tol, "table {k} row {r} ({n} tokens): {e:e}");
                }
            }
        }
        // deterministic: the same bits again
        let (mut w2, mut p2, mut t2) = (w0, p0, t0);
        bw.embedding_backward_host(&ids, &type_ids, &offsets, &g, h, &mut w2, &mut p2, &mut t2)
            .unwrap();
        assert_eq!(bitwise(&w2, &w) + bitwise(&p2, &p) + bitwise(&t2, &ty), 0);
    }
}

#[test]
fn embedding_plan_orders_tokens_and_checks_ids() {
    // host only: runs without a GPU
    let offsets = [0usize, 3, 3, 200];
    let ids: Vec<u32> = (0..200u32)
        .map(|t| if t % 3 == 0 { 7 } else { t % 11 })
        .collect();
    let types: Vec<u32> = (0..200u32).map(|t| t % 2).collect();
    let plan = EmbeddingGradPlan::new(&ids, &types, &offsets, 11, 197, 2).unwrap();
    assert_eq!(plan.tokens(), 200);
    // 11 word ids (id 7 has 67 + its own share: split), 197 positions, 2 types of 100 (split)
    assert!(plan.split_runs() >= 3, "{} split runs", plan.split_runs());
    assert!(plan.items() >= 11 + 197 + 2);
    // out-of-range ids, positions and types, ragged inputs, bad offsets
    let bad = |r: rrra::Result<EmbeddingGradPlan>| matches!(r, Err(Error::InvalidArgument(_)));
    assert!(bad(EmbeddingGradPlan::new(
        &ids, &types, &offsets, 10, 197, 2
    )));
    assert!(bad(EmbeddingGradPlan::new(
        &ids, &types, &offsets, 11, 196, 2
    )));
    assert!(bad(EmbeddingGradPlan::new(
        &ids, &types, &offsets, 11, 197, 1
    )));
    assert!(bad(EmbeddingGradPlan::new(
        &ids,
        &types[1..],
        &offsets,
        11,
        197,
        2
    )));
    assert!(bad(EmbeddingGradPlan::new(
        &ids,
        &types,
        &[0, 5, 3, 200],
        11,
        197,
        2
    )));
    assert!(bad(EmbeddingGradPlan::new(
        &ids,
        &types,
        &[0, 199],
        11,
        199,
        2
    )));
    // an empty batch is a valid, empty plan
    let empty = EmbeddingGradPlan::new(&[], &[], &[0], 11, 1, 1).unwrap();
    assert_eq!(empty.items(), 0);
}

// ---------------------------------------------------------------------------------------------
// Build

#[test]
fn backward_kernels_compile_without_spills() {
    if !cuda_compiled() {
        eprintln!("skipped: built without nvcc");
        return;
    }
    let m = kernel_module("backward").expect("the backward module is embedded");
    assert!(!m.fatbin.is_empty());
    let mut names: Vec<String> = [128, 256, 512, 768, 1024]
        .iter()
        .map(|h| format!("rrra_layernorm_backward_f32_h{h}"))
        .collect();
    for n in [
        "rrra_bias_backward_partial_f32",
        "rrra_bias_backward_partial_bf16",
        "rrra_bias_backward_final_f32",
        "rrra_gelu_backward_f32",
        "rrra_gelu_backward_bf16",
        "rrra_pool_mean_backward_f32",
        "rrra_pool_cls_backward_f32",
        "rrra_pool_max_backward_f32",
        "rrra_l2_normalize_backward_f32",
        "rrra_embedding_backward_items_f32",
        "rrra_embedding_backward_final_f32",
    ] {
        names.push(n.into());
    }
    for name in &names {
        assert!(
            m.ptxas_report.contains(name.as_str()),
            "{name} missing from the report"
        );
    }
    let spill_lines: Vec<&str> = m
        .ptxas_report
        .lines()
        .filter(|l| l.contains("spill"))
        .collect();
    assert!(spill_lines.len() >= names.len());
    for line in spill_lines {
        assert!(
            line.contains(" 0 bytes spill stores, 0 bytes spill loads"),
            "register spills: {line}"
        );
    }
}
