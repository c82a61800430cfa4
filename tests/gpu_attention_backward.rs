//! The attention backward kernels (`kernels/attention_backward.cu`) against the CPU reference
//! (`rrra::cpu::backward::attention_sequence_backward`, run per sequence as the trainer does) on
//! fresh random inputs: head dims 32, 64, 128 and two others (the `_any` kernel), odd lengths
//! around the 64-row tiles, an empty sequence, a padding-style varlen batch, and dropout on the
//! probabilities with the trainer's per-sequence Philox streams. The output is
//! filled with NaN before the kernels run, so an element they miss fails the comparison. Without
//! a GPU every test but the build check skips with the reason.
//!
//! Tolerance: both sides compute in f32; they differ in the summation order of every dot product
//! and GEMM (sequential / tiled vs matrixmultiply's), in exp (CUDA's expf vs the CPU's
//! polynomial, both within ~2 ulp), and in how the softmax is normalised (exp(s − LSE) vs
//! exp(s − max) / sum). Each moves a gradient element by a few ulp of the largest terms it sums;
//! on a CPU emulation of the CUDA blocks the largest difference from this CPU reference was 1e-6
//! of the largest |gradient| of its part (dQ, dK or dV), about as far as an f32 port of the CPU
//! maths is from f64. The tests allow 2e-5 of that maximum (20× margin for the GPU's expf, whose
//! error differs from the emulator's host expf, and for longer sums).
//! Dropout masks are exact on both sides (the same Philox words, the same `u < p` test), so they
//! add no tolerance. The tensor-core kernels (bf16 operands, f32 accumulation) are held to 2e-2
//! of the largest gradient, with the reason at `case_with`.

mod common;

use rrra::cpu::backward::{attention_sequence_backward, AttnDropout};
use rrra::device::attention_backward::{
    attention_backward_host, attention_backward_host_bf16, attention_backward_host_on,
    attention_dropout_words, bench, AttnDropoutPlan, GpuAttentionBackward,
};
use rrra::device::{cuda_compiled, kernel_module};
use rrra::index::synthetic::Rng;
use rrra::train::rng::{philox4x32_10, Site, Stream};
use rrra::Error;

/// Uniform values in [-spread, spread).
fn uniform(rng: &mut Rng, n: usize, spread: f32) -> Vec<f32> {
    (0..n)
        .map(|_| ((rng.next_f64() * 2.0 - 1.0) as f32) * spread)
        .collect()
}

fn offsets_of(lens: &[usize]) -> Vec<u32> {
    let mut o = vec![0u32];
    for &l in lens {
        o.push(o.last().unwrap() + l as u32);
    }
    o
}

/// The CPU's stream for sequence `s` under `plan` (as `train::encoder_grad::attn_dropout`).
fn cpu_dropout(plan: &AttnDropoutPlan, s: usize) -> AttnDropout {
    AttnDropout {
        p: plan.p,
        stream: Stream::new(
            plan.seed,
            plan.step,
            plan.example_ids[s],
            plan.layer,
            Site::AttentionDropout,
        ),
    }
}

/// The CPU reference over a packed batch: `qkv` is the biased projection.
fn cpu_backward(
    qkv: &[f32],
    dctx: &[f32],
    offsets: &[u32],
    h: usize,
    heads: usize,
    dropout: Option<&AttnDropoutPlan>,
) -> Vec<f32> {
    let mut out = vec![0.0f32; qkv.len()];
    for (i, w) in offsets.windows(2).enumerate() {
        let (s, e) = (w[0] as usize, w[1] as usize);
        let drop = dropout.map(|d| cpu_dropout(d, i));
        attention_sequence_backward(
            &qkv[s * 3 * h..e * 3 * h],
            e - s,
            h,
            heads,
            drop.as_ref(),
            &dctx[s * h..e * h],
            &mut out[s * 3 * h..e * 3 * h],
        );
    }
    out
}

/// Compares dQ, dK and dV separately, each to 2e-5 of its largest |reference| (module docs).
fn check(what: &str, gpu: &[f32], cpu: &[f32], h: usize) {
    check_within(what, gpu, cpu, h, 2e-5);
}

/// [`check`] with a bound of `rel` of each part's largest |reference|.
fn check_within(what: &str, gpu: &[f32], cpu: &[f32], h: usize, rel: f32) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths");
    for (p, part) in ["dQ", "dK", "dV"].iter().enumerate() {
        let cols = p * h..(p + 1) * h;
        let rows = || cpu.chunks_exact(3 * h).zip(gpu.chunks_exact(3 * h));
        let max = rows()
            .flat_map(|(c, _)| c[cols.clone()].iter())
            .fold(0.0f32, |m, v| m.max(v.abs()));
        let tol = rel * max.max(1e-3);
        let mut worst = 0.0f32;
        for (t, (c, g)) in rows().enumerate() {
            for (d, (cv, gv)) in c[cols.clone()].iter().zip(&g[cols.clone()]).enumerate() {
                assert!(
                    gv.is_finite() && (gv - cv).abs() <= tol,
                    "{what} {part} token {t} col {d}: gpu {gv} vs cpu {cv} (tolerance {tol})"
                );
                worst = worst.max((gv - cv).abs());
            }
        }
        eprintln!("{what} {part}: max |ref| {max:.3e}, max |gpu - cpu| {worst:.3e}");
    }
}

/// One batch: random unbiased projection, bias, dO; the GPU run with the bias separate (the GPU
/// forward's layout) and, when `also_prebiased`, with the biased projection and no bias (the
/// CPU's layout); both against the CPU on the biased projection.
fn case(gpu: &rrra::device::Gpu, heads: usize, dh: usize, lens: &[usize], spread: f32, seed: u64) {
    case_with(gpu, heads, dh, lens, spread, seed, 0.0);
}

fn case_with(
    gpu: &rrra::device::Gpu,
    heads: usize,
    dh: usize,
    lens: &[usize],
    spread: f32,
    seed: u64,
    p: f32,
) {
    let h = heads * dh;
    let offsets = offsets_of(lens);
    let tokens = *offsets.last().unwrap() as usize;
    let mut rng = Rng::new(seed);
    let raw = uniform(&mut rng, tokens * 3 * h, spread);
    let bias = uniform(&mut rng, 3 * h, 0.5);
    let dctx = uniform(&mut rng, tokens * h, 1.0);
    let biased: Vec<f32> = raw
        .chunks_exact(3 * h)
        .flat_map(|row| row.iter().zip(&bias).map(|(x, b)| x + b))
        .collect();
    let examples: Vec<u64> = (0..lens.len() as u64)
        .map(|s| 1000 * seed + 37 * s)
        .collect();
    let plan = AttnDropoutPlan {
        p,
        seed: 0xfeed_0000_0000_0000 ^ seed,
        step: 12 + seed,
        layer: seed as u32 % 12,
        example_ids: &examples,
    };
    let drop = (p > 0.0).then_some(&plan);
    let want = cpu_backward(&biased, &dctx, &offsets, h, heads, drop);
    let what = format!("heads {heads} x dh {dh}, lens {lens:?}, dropout {p}");
    let host = |qkv: &[f32], bias: Option<&[f32]>| {
        attention_backward_host(gpu, qkv, bias, &dctx, &offsets, drop, h, heads).unwrap()
    };
    let got = host(&raw, Some(&bias));
    check(&format!("{what}, bias apart"), &got, &want, h);
    let got2 = host(&biased, None);
    check(&format!("{what}, pre-biased"), &got2, &want, h);
    if matches!(dh, 32 | 64 | 128) {
        // The tensor-core pair rounds Q, K, V, dO, the kept probabilities and dS to bf16
        // (2^-9 relative each) and accumulates in f32: on the block emulator its worst was
        // 7.4e-3 of the largest gradient against this CPU reference, on inputs as peaked as
        // spread 3 here (1e-2 allowed there); 2e-2 leaves room for the GPU's exp2 and sums in
        // another order. A wrong fragment or a wrong mask pattern moves gradients by a large
        // share of the largest; single mask bits are checked exactly on the emulator (a probe
        // with Q = K = 0 and one-hot dO, where dV is the mask).
        let mma = attention_backward_host_on(
            gpu,
            true,
            &raw,
            Some(&bias),
            &dctx,
            &offsets,
            drop,
            h,
            heads,
        )
        .unwrap();
        check_within(&format!("{what}, tensor cores"), &mma, &want, h, 2e-2);
        // The bf16 twin (the mixed-precision step's: bf16 QKV in, bf16 dQKV out) computes what
        // the f32 pair computes on the same values: on QKV rounded to bf16 its gradients are
        // the f32 pair's rounded to bf16, bit for bit (as on the emulator); against the CPU on
        // the unrounded QKV the same 2e-2 (emulator: 9.8e-3).
        let rounded: Vec<f32> = raw
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect();
        let twin = |qkv: &[f32]| {
            attention_backward_host_bf16(gpu, qkv, Some(&bias), &dctx, &offsets, drop, h, heads)
                .unwrap()
        };
        let on_rounded = twin(&rounded);
        let f32_pair = attention_backward_host_on(
            gpu,
            true,
            &rounded,
            Some(&bias),
            &dctx,
            &offsets,
            drop,
            h,
            heads,
        )
        .unwrap();
        let differ = on_rounded
            .iter()
            .zip(&f32_pair)
            .filter(|&(&a, &b)| a.to_bits() != half::bf16::from_f32(b).to_f32().to_bits())
            .count();
        assert_eq!(
            differ, 0,
            "{what}: the bf16 twin is not the f32 pair rounded"
        );
        check_within(&format!("{what}, bf16 twin"), &twin(&raw), &want, h, 2e-2);
    }
}

#[test]
fn matches_the_cpu_for_each_head_dim() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    // lengths around the 64-row tiles (1, 63, 64, 65, 129, 130), an empty sequence, short ones
    case(&gpu, 2, 64, &[1, 63, 64, 65, 130], 1.0, 1);
    case(&gpu, 3, 32, &[7, 100, 0, 33], 1.5, 2);
    case(&gpu, 1, 128, &[129, 5], 0.7, 3);
    // the general kernel: a tiny model's dh 16 and an odd width
    case(&gpu, 2, 16, &[33, 70], 2.0, 4);
    case(&gpu, 2, 40, &[9, 64, 77], 1.0, 5);
}

#[test]
fn matches_the_cpu_on_a_padded_varlen_batch() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    // a BERT-base layer on a bucket padded to 128 and packed: the packing is the padding mask.
    // Spread 3 makes the softmax rows peaked (scores of O(10)), the hard case for exp(s − LSE).
    case(&gpu, 12, 64, &[128, 17, 90, 3, 128, 64, 1], 3.0, 6);
}

#[test]
fn matches_the_cpu_with_attention_dropout() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    // the trainer's masks, rebuilt in the kernels: every head dim kind and tile edge
    case_with(&gpu, 2, 64, &[1, 63, 64, 65, 130], 1.0, 11, 0.1);
    case_with(&gpu, 3, 32, &[7, 100, 0, 33], 1.5, 12, 0.3);
    case_with(&gpu, 1, 128, &[129, 5], 0.7, 13, 0.5);
    case_with(&gpu, 2, 40, &[9, 64, 77], 1.0, 14, 0.2);
}

#[test]
fn tensor_core_backward_keeps_the_cpus_masks_bit_for_bit() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    // A mask probe: Q = K = 0 makes every probability 1 / len, and dO = e_0 of each head on a
    // sequence's row 3, so dV of key j in that column is keep(3, j) / len exactly (up to bf16
    // rounding, 2^-9) and zero elsewhere. One wrong mask bit moves it by (1 / (1 - p)) / len,
    // which the bound of a tenth of that cannot hide.
    let (heads, dh, p) = (2usize, 64usize, 0.5f32);
    let h = heads * dh;
    let lens = [100usize, 7];
    let offsets = offsets_of(&lens);
    let tokens = *offsets.last().unwrap() as usize;
    let mut rng = Rng::new(21);
    let mut qkv = uniform(&mut rng, tokens * 3 * h, 1.0);
    qkv.chunks_exact_mut(3 * h)
        .for_each(|row| row[..2 * h].fill(0.0));
    let mut dctx = vec![0.0f32; tokens * h];
    for w in offsets.windows(2) {
        (0..heads).for_each(|hd| dctx[(w[0] as usize + 3) * h + hd * dh] = 1.0);
    }
    let examples = [7u64, 8];
    let plan = AttnDropoutPlan {
        p,
        seed: 99,
        step: 4,
        layer: 1,
        example_ids: &examples,
    };
    let want = cpu_backward(&qkv, &dctx, &offsets, h, heads, Some(&plan));
    let got = attention_backward_host_on(
        &gpu,
        true,
        &qkv,
        None,
        &dctx,
        &offsets,
        Some(&plan),
        h,
        heads,
    )
    .unwrap();
    for (s, w) in offsets.windows(2).enumerate() {
        let bound = 0.1 / (1.0 - p) / lens[s] as f32;
        for t in w[0] as usize..w[1] as usize {
            for c in 2 * h..3 * h {
                let (g, c_) = (got[t * 3 * h + c], want[t * 3 * h + c]);
                assert!(
                    (g - c_).abs() <= bound,
                    "sequence {s}, token {t}, dV column {}: {g} vs {c_}",
                    c - 2 * h
                );
            }
        }
    }
}

#[test]
fn dropout_words_are_the_trainers_streams() {
    // no GPU needed: the words the kernels get reproduce Stream's numbers exactly
    for (seed, step, example, layer) in [
        (0u64, 0u64, 0u64, 0u32),
        (0x0123_4567_89ab_cdef, 1 << 33 | 5, 3, 11),
        (42, 7, (1 << 20) + 9, 300),
        (u64::MAX, u64::MAX, u64::MAX, u32::MAX),
    ] {
        let w = attention_dropout_words(seed, step, example, layer);
        let s = Stream::new(seed, step, example, layer, Site::AttentionDropout);
        for i in [0u64, 1, 2, 1000, 1 << 32, u64::MAX / 4] {
            assert_eq!(
                philox4x32_10([i as u32, (i >> 32) as u32, w[2], w[3]], [w[0], w[1]]),
                s.block(i),
                "seed {seed} step {step} example {example} layer {layer} block {i}"
            );
        }
    }
}

#[test]
fn results_are_deterministic() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    // no atomics: two runs give the same bits
    let (heads, dh, lens) = (4usize, 64usize, [200usize, 31, 128]);
    let h = heads * dh;
    let offsets = offsets_of(&lens);
    let tokens = *offsets.last().unwrap() as usize;
    let mut rng = Rng::new(7);
    let qkv = uniform(&mut rng, tokens * 3 * h, 1.0);
    let dctx = uniform(&mut rng, tokens * h, 1.0);
    let a = attention_backward_host(&gpu, &qkv, None, &dctx, &offsets, None, h, heads).unwrap();
    let b = attention_backward_host(&gpu, &qkv, None, &dctx, &offsets, None, h, heads).unwrap();
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
}

#[test]
fn bad_arguments_are_errors() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    let bad = |r: rrra::Result<Vec<f32>>| matches!(r, Err(Error::InvalidArgument(_)));
    let (h, heads) = (128usize, 2usize);
    let qkv = vec![0.5f32; 10 * 3 * h];
    let dctx = vec![0.5f32; 10 * h];
    let run = |offs: &[u32], qkv: &[f32], dctx: &[f32], h: usize, heads: usize| {
        attention_backward_host(&gpu, qkv, None, dctx, offs, None, h, heads)
    };
    assert!(bad(run(&[0, 4, 10], &qkv, &dctx, h, 3))); // h not a multiple of heads
    assert!(bad(run(&[0, 4, 10], &qkv, &dctx, h, 0)));
    assert!(run(&[0, 4, 10], &qkv, &dctx, h, 1).is_ok()); // dh 128 is fine, 256 is not
    assert!(bad(run(
        &[0, 4, 10],
        &vec![0.0; 10 * 3 * 256],
        &vec![0.0; 10 * 256],
        256,
        1
    )));
    assert!(bad(run(&[1, 4, 10], &qkv, &dctx, h, heads))); // not starting at 0
    assert!(bad(run(&[0, 6, 4, 10], &qkv, &dctx, h, heads))); // decreasing
    assert!(bad(run(&[0, 4, 9], &qkv, &dctx, h, heads))); // tokens != rows of qkv
    assert!(bad(run(&[], &qkv, &dctx, h, heads)));
    assert!(bad(run(&[0, 4, 10], &qkv[1..], &dctx, h, heads)));
    assert!(bad(attention_backward_host(
        &gpu,
        &qkv,
        Some(&[0.0; 5]),
        &dctx,
        &[0, 10],
        None,
        h,
        heads
    )));
    // dropout: p outside [0, 1), or not one example id per sequence
    for (p, ids) in [(1.0f32, &[1u64, 2][..]), (-0.1, &[1, 2]), (0.1, &[1])] {
        let plan = AttnDropoutPlan {
            p,
            seed: 1,
            step: 2,
            layer: 3,
            example_ids: ids,
        };
        let r =
            attention_backward_host(&gpu, &qkv, None, &dctx, &[0, 4, 10], Some(&plan), h, heads);
        assert!(bad(r), "p {p}, {} ids", ids.len());
    }

    // the device entry point: over capacity and short buffers are errors, then it still works
    let mut op = GpuAttentionBackward::new(&gpu, h, heads, 10, 2).unwrap();
    let st = gpu.stream();
    let qkv_d = st.clone_htod(&qkv).unwrap();
    let dctx_d = st.clone_htod(&dctx).unwrap();
    let mut out = st.clone_htod(&vec![f32::NAN; qkv.len()]).unwrap();
    let over = op.backward(&[0, 2, 4, 10], &qkv_d, None, &dctx_d, None, &mut out);
    assert!(
        matches!(over, Err(Error::InvalidArgument(_))),
        "3 sequences"
    );
    let short = st.clone_htod(&dctx[..5 * h]).unwrap();
    let r = op.backward(&[0, 4, 10], &qkv_d, None, &short, None, &mut out);
    assert!(matches!(r, Err(Error::InvalidArgument(_))), "short dctx");
    op.backward(&[0, 4, 10], &qkv_d, None, &dctx_d, None, &mut out)
        .unwrap();
    let host = st.clone_dtoh(&out).unwrap();
    assert!(host.iter().all(|v| v.is_finite()));
    // an empty batch is a no-op
    op.backward(&[0], &qkv_d, None, &dctx_d, None, &mut out)
        .unwrap();
}

#[test]
fn bench_runs_at_the_bert_base_shape() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    let t = bench(&gpu).unwrap();
    assert_eq!(t.len(), 7);
    for k in &t {
        eprintln!(
            "{} [{}]: {:.3} ms, {:.1} TFLOP/s",
            k.name,
            k.shape,
            k.ms,
            k.flops / k.ms / 1e9
        );
        assert!(k.ms.is_finite() && k.ms > 0.0);
    }
}

#[test]
fn attention_backward_kernels_compile_without_spills() {
    if !cuda_compiled() {
        eprintln!("skipped: built without nvcc");
        return;
    }
    let m = kernel_module("attention_backward").expect("the attention_backward module is embedded");
    assert!(!m.fatbin.is_empty());
    for kind in [
        "f32_d32", "f32_d64", "f32_d128", "f32_any", "mma_d32", "mma_d64", "mma_d128",
    ] {
        for pass in ["dq", "dkdv"] {
            let name = format!("rrra_attention_backward_{pass}_{kind}");
            assert!(
                m.ptxas_report.contains(&name),
                "{name} missing from the report"
            );
        }
    }
    let spills: Vec<&str> = m
        .ptxas_report
        .lines()
        .filter(|l| l.contains("spill"))
        .collect();
    assert!(spills.len() >= 14, "a spill line per kernel and target");
    for line in spills {
        assert!(
            line.contains(" 0 bytes spill stores, 0 bytes spill loads"),
            "register spills: {line}"
        );
    }
}
