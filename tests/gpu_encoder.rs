//! The GPU encoder (`device::encoder::GpuBert`) against the CPU reference (`Bert::forward`),
//! and its kernels one by one. Without a GPU every test but the build check skips.
//!
//! Test models are random (`model::synthetic`) with their matrices rescaled from BERT's
//! initialiser (std 0.02) to std 1/√fan_in: every sublayer then contributes O(1) to the residual
//! stream and the attention scores have unit spread, so a wrong kernel anywhere shows up as an
//! O(1) error instead of hiding under a small residual update.
//!
//! Tolerances:
//! * f32 path, max |Δ| ≤ 1e-4 on hidden states of unit spread. Both sides accumulate in f32
//!   and differ only in summation order: a dot product of length k ≤ 1024 of O(1/√k)-scaled
//!   terms has a rounding error of ~√k · 2⁻²⁴ ≈ 2e-6 (rms), LayerNorm passes it on with gain
//!   ~1, and two layers compound it a few times: ~1e-5 at the tail of ~10⁵ elements (an H200
//!   measured 2–3e-6). An indexing or masking bug costs O(1e-1).
//! * bf16 path, relative L2 ≤ 2e-2. bf16 keeps 8 significant bits (relative rounding ≤ 2⁻⁹ ≈
//!   2e-3, ~1e-3 rms); a layer rounds each value ~6 times on its way (GEMM inputs, QKV, P, ctx,
//!   FFN activation), ~3e-3 per layer, ~6e-3 after two (an H200 measured 3.5–3.8e-3). 2e-2
//!   leaves a 3× margin and is still far below what any real bug costs.

mod common;

use cudarc::driver::{LaunchConfig, PushKernelArg};
use rrra::device::encoder::{GpuBert, Precision};
use rrra::device::Gpu;
use rrra::index::synthetic::Rng;
use rrra::model::bert::{Bert, PackedBatch};
use rrra::model::synthetic::{batch_with_lengths, random_bert, small_config};
use rrra::model::{BertConfig, Encoder, EncoderOptions, Pooling};
use rrra::Error;

const F32_MAX_ABS: f32 = 1e-4;
const BF16_REL_L2: f64 = 2e-2;

/// `(hidden, heads)`: head dims 32, 64 and 128 (the tiled attention kernels).
const SHAPES: [(usize, usize); 3] = [(64, 2), (256, 4), (256, 2)];

fn test_model(hidden: usize, heads: usize, seed: u64) -> Bert {
    let cfg = small_config(hidden, heads, 2, 2 * hidden);
    let mut bert = random_bert(cfg, seed);
    let (h, i) = (hidden as f32, (2 * hidden) as f32);
    let rescale = |w: &mut Vec<f32>, fan_in: f32| {
        let s = 1.0 / (0.02 * fan_in.sqrt());
        w.iter_mut().for_each(|x| *x *= s);
    };
    for l in &mut bert.weights.layers {
        rescale(&mut l.qkv_w, h);
        rescale(&mut l.attn_out_w, h);
        rescale(&mut l.inter_w, h);
        rescale(&mut l.out_w, i);
    }
    bert
}

/// Lengths that cross every tile boundary of the attention kernels (32, 64), a single token,
/// an empty sequence, one of max_position_embeddings tokens, and random ones up to 300.
fn test_lengths(cfg: &BertConfig, seed: u64) -> Vec<usize> {
    let mut lens = vec![
        1,
        300,
        63,
        64,
        65,
        0,
        127,
        129,
        2,
        cfg.max_position_embeddings,
    ];
    let mut rng = Rng::new(seed);
    lens.extend((0..10).map(|_| 1 + rng.below(300)));
    lens
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            if x.is_finite() {
                (x - y).abs()
            } else {
                f32::INFINITY
            }
        })
        .fold(0.0, f32::max)
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    let r = (num / den).sqrt();
    if r.is_nan() {
        f64::INFINITY
    } else {
        r
    }
}

/// CPU reference of `GpuBert::embed`: forward, pool, normalise.
fn cpu_embed(bert: &Bert, batch: &PackedBatch, pooling: Pooling, normalize: bool) -> Vec<f32> {
    let h = bert.cfg.hidden_size;
    let hidden = bert.forward(batch).unwrap();
    let mut out = vec![0.0f32; batch.sequences() * h];
    for (s, o) in out.chunks_exact_mut(h).enumerate() {
        let rows = &hidden[batch.offsets[s] * h..batch.offsets[s + 1] * h];
        pooling.pool(rows, batch.len_of(s), h, o);
        if normalize {
            rrra::cpu::math::l2_normalize(o);
        }
    }
    out
}

#[test]
fn f32_forward_matches_the_cpu() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    for (n, &(hidden, heads)) in SHAPES.iter().enumerate() {
        let bert = test_model(hidden, heads, 10 + n as u64);
        let batch = batch_with_lengths(&bert.cfg, &test_lengths(&bert.cfg, n as u64), 5);
        let want = bert.forward(&batch).unwrap();
        let mut g = GpuBert::new(&gpu, &bert, Precision::F32, batch.tokens(), 64).unwrap();
        let got = g.forward(&batch).unwrap();
        let err = max_abs(&got, &want);
        println!(
            "f32  hidden {hidden} heads {heads} (head dim {}): {} tokens, max |Δ| {err:.2e}",
            hidden / heads,
            batch.tokens()
        );
        assert!(
            err <= F32_MAX_ABS,
            "hidden {hidden} heads {heads}: max |Δ| {err}"
        );
        // Same input, same bits: no race, no read of memory nothing wrote.
        assert_eq!(g.forward(&batch).unwrap(), got);
    }
}

#[test]
fn bf16_forward_matches_the_cpu() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    for (n, &(hidden, heads)) in SHAPES.iter().enumerate() {
        let bert = test_model(hidden, heads, 20 + n as u64);
        let batch = batch_with_lengths(&bert.cfg, &test_lengths(&bert.cfg, 7 + n as u64), 6);
        let want = bert.forward(&batch).unwrap();
        let mut g = GpuBert::new(&gpu, &bert, Precision::Bf16, batch.tokens() + 5, 100).unwrap();
        let got = g.forward(&batch).unwrap();
        let err = rel_l2(&got, &want);
        println!(
            "bf16 hidden {hidden} heads {heads} (head dim {}): {} tokens, rel L2 {err:.2e}, max |Δ| {:.2e}",
            hidden / heads,
            batch.tokens(),
            max_abs(&got, &want)
        );
        assert!(
            err <= BF16_REL_L2,
            "hidden {hidden} heads {heads}: rel L2 {err}"
        );
        assert_eq!(g.forward(&batch).unwrap(), got);
    }
}

#[test]
fn small_head_dims_use_the_general_attention_kernel() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    // head dims 8 and 16 (tiny models), and 48: not a tiled variant
    for (n, (hidden, heads)) in [(32usize, 4usize), (64, 4), (96, 2)]
        .into_iter()
        .enumerate()
    {
        let bert = test_model(hidden, heads, 30 + n as u64);
        let batch = batch_with_lengths(&bert.cfg, &[1, 40, 0, 33, 130], 8);
        let want = bert.forward(&batch).unwrap();
        for precision in [Precision::F32, Precision::Bf16] {
            let mut g = GpuBert::new(&gpu, &bert, precision, 256, 8).unwrap();
            let got = g.forward(&batch).unwrap();
            let (abs, rel) = (max_abs(&got, &want), rel_l2(&got, &want));
            println!(
                "{precision} hidden {hidden} heads {heads}: max |Δ| {abs:.2e}, rel L2 {rel:.2e}"
            );
            match precision {
                Precision::F32 => assert!(abs <= F32_MAX_ABS, "{abs}"),
                Precision::Bf16 => assert!(rel <= BF16_REL_L2, "{rel}"),
            }
        }
    }
}

#[test]
fn embeddings_match_the_cpu() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    let bert = test_model(256, 4, 40);
    let lens = [5, 1, 64, 200, 17, 512, 3];
    let batch = batch_with_lengths(&bert.cfg, &lens, 9);
    let h = bert.cfg.hidden_size;
    let mut f32_model = GpuBert::new(&gpu, &bert, Precision::F32, 1024, 16).unwrap();
    let mut bf16_model = GpuBert::new(&gpu, &bert, Precision::Bf16, 1024, 16).unwrap();
    for (pooling, normalize) in [
        (Pooling::Mean, true),
        (Pooling::Cls, true),
        (Pooling::Mean, false),
        (Pooling::Max, true),
    ] {
        let want = cpu_embed(&bert, &batch, pooling, normalize);
        let got = f32_model.embed(&batch, pooling, normalize).unwrap();
        assert_eq!(got.len(), lens.len() * h);
        let err = max_abs(&got, &want);
        assert!(
            err <= F32_MAX_ABS,
            "f32 {pooling} {normalize}: max |Δ| {err}"
        );
        let got = bf16_model.embed(&batch, pooling, normalize).unwrap();
        for s in 0..lens.len() {
            let r = rel_l2(&got[s * h..(s + 1) * h], &want[s * h..(s + 1) * h]);
            assert!(
                r <= BF16_REL_L2,
                "bf16 {pooling} {normalize}, sequence {s}: rel L2 {r}"
            );
        }
        if normalize {
            for v in got.chunks_exact(h) {
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                assert!((norm - 1.0).abs() < 1e-5, "{norm}");
            }
        }
    }
    // An empty sequence pools to zeros; the others are unaffected by it.
    let with_empty = batch_with_lengths(&bert.cfg, &[4, 0, 6], 9);
    let got = f32_model.embed(&with_empty, Pooling::Mean, true).unwrap();
    assert!(got[h..2 * h].iter().all(|&x| x == 0.0));
    let alone = batch_with_lengths(&bert.cfg, &[4], 9);
    let a = f32_model.embed(&alone, Pooling::Mean, true).unwrap();
    assert!(max_abs(&got[..h], &a) <= 1e-6);
}

#[test]
fn tiny_bert_fixture_matches_the_cpu_encoder() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    let dir = common::shared().join("fixtures/tiny-bert");
    if !dir.join("config.json").is_file() {
        eprintln!("skipped: no fixture model at {}", dir.display());
        return;
    }
    let enc = Encoder::load(&dir, &EncoderOptions::default()).unwrap();
    let texts = [
        "a first text",
        "the quick brown fox jumps over the lazy dog",
        "x",
        "dense retrieval with packed variable-length sequences on a GPU, checked against the \
         CPU reference encoder token by token",
    ];
    let tokens = enc.tokenizer().encode_batch(&texts).unwrap();
    let mut batch = PackedBatch::new();
    for t in &tokens {
        batch.push(&t.ids, &t.type_ids);
    }
    let want = enc.embed_batch(&batch).unwrap();
    let want_hidden = enc.bert().forward(&batch).unwrap();
    for precision in [Precision::F32, Precision::Bf16] {
        let mut g = GpuBert::new(&gpu, enc.bert(), precision, 512, 8).unwrap();
        let got = g.embed(&batch, enc.pooling(), enc.normalize()).unwrap();
        let hidden = g.forward(&batch).unwrap();
        let dim = enc.dim();
        for (i, t) in texts.iter().enumerate() {
            let c = common::cosine(&got[i * dim..(i + 1) * dim], &want[i * dim..(i + 1) * dim]);
            let min = if precision == Precision::F32 {
                0.99999
            } else {
                0.999
            };
            assert!(c >= min, "{precision} text {i} ({t:?}): cosine {c}");
        }
        if precision == Precision::F32 {
            let err = max_abs(&hidden, &want_hidden);
            assert!(err <= F32_MAX_ABS, "max |Δ| {err}");
        } else {
            let err = rel_l2(&hidden, &want_hidden);
            assert!(err <= BF16_REL_L2, "rel L2 {err}");
        }
    }
}

#[test]
fn bad_input_is_an_error_not_a_crash() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    let bert = test_model(64, 2, 50);
    let cfg = bert.cfg.clone();
    let mut g = GpuBert::new(&gpu, &bert, Precision::Bf16, 100, 4).unwrap();
    let invalid = |r: rrra::Result<Vec<f32>>, what: &str| match r {
        Err(Error::InvalidArgument(msg)) => println!("{what}: {msg}"),
        other => panic!("{what}: expected InvalidArgument, got {other:?}"),
    };

    let mut b = batch_with_lengths(&cfg, &[3, 4], 1);
    b.ids[2] = cfg.vocab_size as u32;
    invalid(g.forward(&b), "token id = vocab size");
    b.ids[2] = u32::MAX;
    invalid(g.embed(&b, Pooling::Mean, true), "token id u32::MAX");
    let mut b = batch_with_lengths(&cfg, &[3], 1);
    b.type_ids[0] = 2;
    invalid(g.forward(&b), "token type 2");
    invalid(
        g.forward(&batch_with_lengths(&cfg, &[60, 41], 1)),
        "101 tokens in a 100-token workspace",
    );
    invalid(
        g.forward(&batch_with_lengths(&cfg, &[1; 5], 1)),
        "5 sequences in a 4-sequence workspace",
    );
    let mut big = GpuBert::new(&gpu, &bert, Precision::F32, 1000, 4).unwrap();
    invalid(
        big.forward(&batch_with_lengths(
            &cfg,
            &[cfg.max_position_embeddings + 1],
            1,
        )),
        "sequence longer than max_position_embeddings",
    );
    let mut b = batch_with_lengths(&cfg, &[3, 4], 1);
    b.offsets[1] = 9;
    invalid(g.forward(&b), "offsets past the end");
    let b = PackedBatch {
        ids: vec![1, 2],
        type_ids: vec![0, 0],
        offsets: vec![],
    };
    invalid(g.forward(&b), "no offsets");
    let mut b = batch_with_lengths(&cfg, &[3], 1);
    b.type_ids.pop();
    invalid(g.forward(&b), "type ids shorter than ids");

    // Construction limits.
    for (t, s) in [(0, 4), (100, 0), (100, 70_000)] {
        assert!(matches!(
            GpuBert::new(&gpu, &bert, Precision::F32, t, s),
            Err(Error::InvalidArgument(_))
        ));
    }
    let mut odd = small_config(60, 2, 1, 64); // hidden not a multiple of 8
    odd.vocab_size = 10;
    assert!(matches!(
        GpuBert::new(&gpu, &random_bert(odd, 1), Precision::F32, 8, 1),
        Err(Error::InvalidArgument(_))
    ));

    // After all that the model still works, and empty batches are fine.
    let ok = batch_with_lengths(&cfg, &[3, 4], 1);
    let want = bert.forward(&ok).unwrap();
    let got = g.forward(&ok).unwrap();
    assert!(rel_l2(&got, &want) <= BF16_REL_L2);
    assert!(g.forward(&PackedBatch::new()).unwrap().is_empty());
    assert!(g
        .embed(&PackedBatch::new(), Pooling::Cls, true)
        .unwrap()
        .is_empty());
}

/// The attention kernels alone on random O(1) Q, K, V (sharper than a model's) against a
/// float64 softmax, through the kernel ABI documented in kernels/attention.cu.
#[test]
fn attention_kernels_match_f64_softmax() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    let lens = [1usize, 64, 65, 0, 200, 31, 512];
    let mut offsets = vec![0u32];
    for l in lens {
        offsets.push(offsets.last().unwrap() + l as u32);
    }
    let t = *offsets.last().unwrap() as usize;
    for (dh, heads) in [(32usize, 3usize), (64, 2), (128, 1), (8, 4)] {
        let h = dh * heads;
        let mut rng = Rng::new(dh as u64);
        let qkv: Vec<f32> = (0..t * 3 * h)
            .map(|_| half::bf16::from_f32(1.5 * rng.normal_pair().0 as f32).to_f32())
            .collect();
        let bias: Vec<f32> = (0..3 * h)
            .map(|_| 0.3 * rng.normal_pair().0 as f32)
            .collect();
        let want = reference_attention(&qkv, &bias, &offsets, h, heads);
        for precision in [Precision::F32, Precision::Bf16] {
            let got = run_attention(&gpu, precision, &qkv, &bias, &offsets, h, heads);
            let (abs, rel) = (max_abs(&got, &want), rel_l2(&got, &want));
            println!("attention {precision} dh {dh}: max |Δ| {abs:.2e}, rel L2 {rel:.2e}");
            match precision {
                Precision::F32 => assert!(abs <= 2e-5, "f32 dh {dh}: {abs}"),
                Precision::Bf16 => assert!(rel <= 1e-2, "bf16 dh {dh}: {rel}"),
            }
        }
    }
}

fn reference_attention(
    qkv: &[f32],
    bias: &[f32],
    offsets: &[u32],
    h: usize,
    heads: usize,
) -> Vec<f32> {
    let dh = h / heads;
    let t = *offsets.last().unwrap() as usize;
    let mut out = vec![0.0f32; t * h];
    let at = |row: usize, col: usize| qkv[row * 3 * h + col] as f64 + bias[col] as f64;
    for w in offsets.windows(2) {
        let (start, end) = (w[0] as usize, w[1] as usize);
        for hd in 0..heads {
            for i in start..end {
                let s: Vec<f64> = (start..end)
                    .map(|j| {
                        (0..dh)
                            .map(|d| at(i, hd * dh + d) * at(j, h + hd * dh + d))
                            .sum::<f64>()
                            / (dh as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..dh {
                    let v: f64 = (start..end)
                        .zip(&e)
                        .map(|(j, p)| p / z * at(j, 2 * h + hd * dh + d))
                        .sum();
                    out[i * h + hd * dh + d] = v as f32;
                }
            }
        }
    }
    out
}

fn run_attention(
    gpu: &Gpu,
    precision: Precision,
    qkv: &[f32],
    bias: &[f32],
    offsets: &[u32],
    h: usize,
    heads: usize,
) -> Vec<f32> {
    let dh = h / heads;
    let t = *offsets.last().unwrap() as usize;
    let max_len = offsets.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    let tiled = matches!(dh, 32 | 64 | 128);
    let name = format!(
        "rrra_attention_varlen_{precision}_{}",
        if tiled {
            format!("d{dh}")
        } else {
            "any".into()
        }
    );
    let f = gpu.function("attention", &name).unwrap();
    // Dynamic shared memory of the f32 tiled kernel (SimtTile in kernels/attention.cu).
    let smem = if tiled && precision == Precision::F32 {
        let bk = if dh == 128 { 32 } else { 64 };
        4 * (64 * (dh + 4) + bk * (dh + 4) + bk * dh + 4 * bk * 20)
    } else {
        0
    };
    if smem > 0 {
        use cudarc::driver::sys::CUfunction_attribute_enum as A;
        f.set_attribute(
            A::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .unwrap();
    }
    let rows = if tiled { 64 } else { 4 };
    let cfg = LaunchConfig {
        grid_dim: (
            max_len.div_ceil(rows).max(1),
            heads as u32,
            (offsets.len() - 1) as u32,
        ),
        block_dim: (128, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let stream = gpu.stream();
    let dev_bias = stream.clone_htod(bias).unwrap();
    let dev_offsets = stream.clone_htod(offsets).unwrap();
    let (hi, dhi) = (h as i32, dh as i32);
    let scale = std::f32::consts::LOG2_E / (dh as f32).sqrt();
    match precision {
        Precision::F32 => {
            let dev_qkv = stream.clone_htod(qkv).unwrap();
            // NaN-filled output: every element must be written.
            let mut ctx = stream.clone_htod(&vec![f32::NAN; t * h]).unwrap();
            let mut l = stream.launch_builder(&f);
            l.arg(&dev_qkv)
                .arg(&dev_bias)
                .arg(&dev_offsets)
                .arg(&hi)
                .arg(&dhi)
                .arg(&scale);
            l.arg(&mut ctx);
            // SAFETY: buffers sized as the kernel ABI requires: qkv t × 3h, bias 3h, ctx t × h.
            unsafe { l.launch(cfg) }.unwrap();
            stream.clone_dtoh(&ctx).unwrap()
        }
        Precision::Bf16 => {
            let bits: Vec<u16> = qkv
                .iter()
                .map(|&x| half::bf16::from_f32(x).to_bits())
                .collect();
            let dev_qkv = stream.clone_htod(&bits).unwrap();
            let mut ctx = stream.clone_htod(&vec![0x7fc0u16; t * h]).unwrap(); // bf16 NaN
            let mut l = stream.launch_builder(&f);
            l.arg(&dev_qkv)
                .arg(&dev_bias)
                .arg(&dev_offsets)
                .arg(&hi)
                .arg(&dhi)
                .arg(&scale);
            l.arg(&mut ctx);
            // SAFETY: as above, with 2-byte elements.
            unsafe { l.launch(cfg) }.unwrap();
            stream
                .clone_dtoh(&ctx)
                .unwrap()
                .into_iter()
                .map(|b| half::bf16::from_bits(b).to_f32())
                .collect()
        }
    }
}

/// The encoder's kernels compile for sm_90 without register spills (no GPU needed).
#[test]
fn encoder_kernels_compile_without_spills() {
    if !rrra::device::cuda_compiled() {
        eprintln!("skipped: built without nvcc");
        return;
    }
    for module in ["embeddings", "layernorm", "gelu", "attention", "pooling"] {
        let m = rrra::device::kernel_module(module).expect("embedded module");
        let report = m.ptxas_report;
        assert!(report.contains("for 'sm_90'"), "{module}: {report}");
        for line in report.lines().filter(|l| l.contains("spill stores")) {
            assert!(
                line.contains(" 0 bytes spill stores, 0 bytes spill loads"),
                "{module}: {line}"
            );
        }
    }
}

/// The benchmark table (`cargo test --release --test gpu_encoder -- --ignored --nocapture`).
#[test]
#[ignore = "benchmark: run on a GPU with --ignored"]
fn bench_table() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    println!("{}", gpu.info());
    let rows = rrra::device::encoder::bench(&gpu).unwrap();
    println!(
        "{:<58} {:<34} {:>9} {:>9} {:>9}",
        "kernel", "shape", "ms", "GB/s", "TFLOP/s"
    );
    for r in &rows {
        println!(
            "{:<58} {:<34} {:>9.3} {:>9.1} {:>9.1}",
            r.name,
            r.shape,
            r.ms,
            r.bytes / r.ms / 1e6,
            r.flops / r.ms / 1e9
        );
    }
    if let Some(path) = std::env::var_os("RRRA_BENCH_JSON") {
        std::fs::write(path, serde_json::to_string_pretty(&rows).unwrap()).unwrap();
    }
}

/// CUDA graphs need a stream of the encoder's own: on the legacy default stream (`GpuBert::new`)
/// `embed` refuses them with a clear error and stays usable; on a stream from `Gpu::new_stream`
/// the first batch of a shape is captured and later ones replayed, bitwise the eager result.
#[test]
fn graphs_need_a_stream_of_their_own() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    let bert = test_model(64, 2, 41);
    let batch = batch_with_lengths(&bert.cfg, &[16], 3);
    let mut legacy = GpuBert::new(&gpu, &bert, Precision::Bf16, 64, 1).unwrap();
    let eager = legacy.embed(&batch, Pooling::Mean, true).unwrap();
    legacy.use_graphs(true);
    match legacy.embed(&batch, Pooling::Mean, true) {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("legacy default stream"), "{m}"),
        other => panic!("graphs on the legacy stream: {other:?}"),
    }
    legacy.use_graphs(false);
    assert_eq!(legacy.embed(&batch, Pooling::Mean, true).unwrap(), eager);
    let stream = gpu.new_stream().unwrap();
    let mut own = GpuBert::on_stream(&gpu, stream, &bert, Precision::Bf16, 64, 1).unwrap();
    own.use_graphs(true);
    for _ in 0..3 {
        assert_eq!(own.embed(&batch, Pooling::Mean, true).unwrap(), eager);
    }
}
