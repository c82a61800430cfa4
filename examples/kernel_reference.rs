//! Writes the CPU reference outputs that tools/kernel-emulator checks the CUDA kernels against
//! (run by tools/emulate-kernels.sh): `kernel_reference OUT_DIR`.
//!
//! * `adapter_D_H_Q_K.bin`: a random adapter, queries, candidates and output gradients, then
//!   `adapter::score` and `adapter::backward` (every f32 in little-endian order, as the harness
//!   reads them);
//! * `dropout.bin`, `dropout_words.bin`: a packed QKV batch, `attention_sequence_train` with
//!   dropout on the probabilities, `dropout_inplace` on a hidden block, and the streams' words.
//! * `train_attention.bin`: packed QKV batches, their dropout streams and
//!   `attention_sequence_train`'s contexts for the tensor-core training attention (see
//!   `train_attention`).
//! * `backward_{layernorm,bias,gelu,l2,attention}.bin`: inputs and `cpu::backward` outputs of
//!   the encoder backward kernels' cases (shapes in each file, see `encoder_backward`).
//! * `inference_{attention,adapter,rows}.bin`: inputs and CPU outputs of the inference kernels'
//!   cases (attention, adapter scoring, embeddings, LayerNorm, GELU, L2, pooling), every array
//!   preceded by its length (see `inference`).
//! * `encoder_step.bin`: random models (and tiny-bert's with its float64 gradients, when
//!   ../shared holds the fixture), packed batches, dropout plans and embedding gradients, then
//!   `TrainableEncoder::forward` and `backward`'s embeddings and parameter gradients, every array
//!   preceded by its length (see `encoder_step`).

use rrra::adapter::{backward, score, AdapterParams};
use rrra::cpu::backward::{attention_sequence_train, dropout_inplace, AttnDropout};
use rrra::index::synthetic::{random_unit_vectors, Rng};
use rrra::train::rng::{Site, Stream};
use std::io::Write;
use std::path::Path;

/// The adapter shapes (d, h, queries, k) the harness runs.
const ADAPTER_SHAPES: [(usize, usize, usize, usize); 4] = [
    (37, 53, 3, 7),
    (16, 2, 40, 2),
    (33, 17, 1, 1),
    (64, 96, 4, 20),
];

fn write_f32(path: &Path, parts: &[&[f32]]) -> std::io::Result<()> {
    let mut bytes = Vec::new();
    for p in parts {
        for x in *p {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
    }
    std::fs::File::create(path)?.write_all(&bytes)
}

fn adapter(dir: &Path, (d, h, nq, k): (usize, usize, usize, usize)) -> rrra::Result<()> {
    let mut p = AdapterParams::init(d, h, 5)?;
    let mut rng = Rng::new(77);
    let s2 = 1.0 / (h as f64).sqrt();
    for (i, t) in p.tensors_mut().into_iter().enumerate() {
        if i > 0 {
            t.iter_mut()
                .for_each(|v| *v = (rng.normal_pair().0 * s2) as f32);
        }
    }
    (p.beta, p.beta0) = (6.0, 0.4);
    let q = random_unit_vectors(nq, d, 1);
    let mut c = random_unit_vectors(nq * k, d, 2);
    if k > 1 {
        c[..d].copy_from_slice(&q[..d]); // q = c: the clamped alpha
    }
    let pairs = nq * k;
    let d_logit: Vec<f32> = (0..pairs).map(|_| rng.normal_pair().0 as f32).collect();
    let d_a: Vec<f32> = (0..pairs * d)
        .map(|_| (rng.normal_pair().0 * 0.05) as f32)
        .collect();
    let out = score(&p, &q, &c, k)?;
    let mut g = p.zeros_like();
    let (mut dq, mut dc) = (vec![0.0f32; nq * d], vec![0.0f32; pairs * d]);
    backward(
        &p,
        &q,
        &c,
        k,
        &out.cache,
        &d_logit,
        Some(&d_a),
        &mut g,
        Some(&mut dq),
        Some(&mut dc),
    )?;
    let path = dir.join(format!("adapter_{d}_{h}_{nq}_{k}.bin"));
    write_f32(
        &path,
        &[
            &p.w1,
            &p.b1,
            &p.w2,
            &p.b2,
            &[p.beta, p.beta0],
            &q,
            &c,
            &d_logit,
            &d_a,
            &out.logit,
            out.cache.a(),
            &out.alpha,
            &g.w1,
            &g.b1,
            &g.w2,
            &g.b2,
            &[g.beta, g.beta0],
            &dq,
            &dc,
        ],
    )
    .map_err(|e| rrra::Error::io(&path, e))
}

fn dropout(dir: &Path) -> rrra::Result<()> {
    // must match tools/kernel-emulator/encoder_train.cpp
    let (h, heads) = (64usize, 4usize);
    let lens = [5usize, 1, 17, 0, 40];
    let (p_att, p_hid, seed, step, layer) = (0.15f32, 0.1f32, 11u64, 3u64, 2u32);
    let t: usize = lens.iter().sum();
    let mut rng = Rng::new(5);
    let qkv: Vec<f32> = (0..t * 3 * h).map(|_| rng.normal_pair().0 as f32).collect();
    let bias: Vec<f32> = (0..3 * h)
        .map(|_| (rng.normal_pair().0 * 0.3) as f32)
        .collect();
    let x: Vec<f32> = (0..t * h).map(|_| rng.normal_pair().0 as f32).collect();
    let (mut ctx, mut xd) = (vec![0.0f32; t * h], x.clone());
    let (mut att_words, mut hid_words) = (Vec::new(), Vec::new());
    let mut start = 0;
    for (s, &len) in lens.iter().enumerate() {
        let example = 1000 + s as u64;
        let att = Stream::new(seed, step, example, layer, Site::AttentionDropout);
        let hid = Stream::new(seed, step, example, layer, Site::FfnOutputDropout);
        att_words.extend(att.words());
        hid_words.extend(hid.words());
        // the CPU keeps the biased projection; the kernel adds the bias itself
        let mut q = qkv[start * 3 * h..(start + len) * 3 * h].to_vec();
        q.iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v += bias[i % (3 * h)]);
        let drop = AttnDropout {
            p: p_att,
            stream: att,
        };
        attention_sequence_train(
            &q,
            len,
            h,
            heads,
            Some(&drop),
            &mut ctx[start * h..(start + len) * h],
        );
        dropout_inplace(&mut xd[start * h..(start + len) * h], p_hid, &hid);
        start += len;
    }
    let path = dir.join("dropout.bin");
    write_f32(&path, &[&qkv, &bias, &x, &ctx, &xd]).map_err(|e| rrra::Error::io(&path, e))?;
    let words: Vec<u8> = att_words
        .iter()
        .chain(&hid_words)
        .flat_map(|w| w.to_le_bytes())
        .collect();
    let path = dir.join("dropout_words.bin");
    std::fs::write(&path, words).map_err(|e| rrra::Error::io(&path, e))
}

/// The training attention cases (head dim, heads, dropout p, lengths) of
/// `rrra_attention_train_mma_*` (tools/kernel-emulator/encoder_train.cpp): every head dim of the
/// tensor-core kernels, lengths around the 64- and 32-key tiles, an empty and a one-token
/// sequence, and a high p on short sequences, where one wrong mask bit moves an output by ~p/len.
const TRAIN_ATTENTION_CASES: [(usize, usize, f32, &[usize]); 5] = [
    (64, 2, 0.0, &[65, 0, 1, 130]),
    (64, 2, 0.15, &[65, 0, 1, 130]),
    (32, 3, 0.5, &[5, 17, 33, 1]),
    (128, 1, 0.1, &[31, 0, 97]),
    (32, 1, 0.15, &[64, 64]),
];

/// `train_attention.bin`: per case its shape, lengths, packed QKV (without its bias), bias, the
/// sequences' Philox words (as f32 bit patterns) and `attention_sequence_train`'s context.
fn train_attention(dir: &Path) -> rrra::Result<()> {
    let mut rng = Rng::new(43);
    let mut out = Vec::new();
    for (case, &(dh, heads, p, lens)) in TRAIN_ATTENTION_CASES.iter().enumerate() {
        let h = dh * heads;
        let t: usize = lens.iter().sum();
        let qkv = normals(&mut rng, t * 3 * h, 1.0);
        let bias = normals(&mut rng, 3 * h, 0.3);
        let (mut ctx, mut words) = (vec![0.0f32; t * h], Vec::new());
        let mut start = 0;
        for (s, &len) in lens.iter().enumerate() {
            let stream = Stream::new(9, 2, 500 + s as u64, case as u32, Site::AttentionDropout);
            words.extend(stream.words().map(f32::from_bits));
            let mut x = qkv[start * 3 * h..(start + len) * 3 * h].to_vec();
            x.iter_mut()
                .enumerate()
                .for_each(|(i, v)| *v += bias[i % (3 * h)]);
            let drop = AttnDropout { p, stream };
            let out_rows = &mut ctx[start * h..(start + len) * h];
            attention_sequence_train(&x, len, h, heads, Some(&drop), out_rows);
            start += len;
        }
        push_sized(&mut out, &[dh as f32, heads as f32, p]);
        push_sized(
            &mut out,
            &lens.iter().map(|&l| l as f32).collect::<Vec<_>>(),
        );
        for part in [&qkv, &bias, &words, &ctx] {
            push_sized(&mut out, part);
        }
    }
    let path = dir.join("train_attention.bin");
    write_f32(&path, &[&out]).map_err(|e| rrra::Error::io(&path, e))
}

/// Normal(0, `sd`) values as f32.
fn normals(rng: &mut Rng, n: usize, sd: f64) -> Vec<f32> {
    (0..n).map(|_| (rng.normal_pair().0 * sd) as f32).collect()
}

/// The values rounded to bf16 and widened back (the bf16 kernels' inputs, exactly).
fn bf16_values(x: &[f32]) -> Vec<f32> {
    x.iter()
        .map(|&v| half::bf16::from_f32(v).to_f32())
        .collect()
}

/// The references of the encoder backward kernels (kernels/backward.cu and
/// kernels/attention_backward.cu), one file per family: a case count, then per case its shape
/// (small integers as f32), inputs and `cpu::backward` outputs. Read by
/// tools/kernel-emulator/encoder_backward.cpp.
fn encoder_backward(dir: &Path) -> rrra::Result<()> {
    use rrra::cpu::backward as bw;
    let mut rng = Rng::new(21);
    let save = |name: &str, v: &[f32]| {
        let path = dir.join(name);
        write_f32(&path, &[v]).map_err(|e| rrra::Error::io(&path, e))
    };

    // LayerNorm (rows, h, eps): every kernel width, h not a multiple of 32, > 8 row blocks
    let ln = [
        (70usize, 37usize, 1e-12f32),
        (33, 128, 1e-5),
        (300, 200, 1e-12),
        (9, 300, 1e-12),
        (45, 700, 1e-5),
        (17, 1000, 1e-12),
        (5, 1, 1e-12),
    ];
    let mut out = vec![ln.len() as f32];
    for (rows, h, eps) in ln {
        let mut s = normals(&mut rng, rows * h, 1.0);
        for (r, row) in s.chunks_mut(h).enumerate() {
            // rows with different offsets and spreads
            let (a, b) = (0.2 + (r % 7) as f32, (r % 5) as f32 - 2.0);
            row.iter_mut().for_each(|v| *v = *v * a + b);
        }
        let gamma: Vec<f32> = normals(&mut rng, h, 0.3).iter().map(|g| 1.0 + g).collect();
        let dy = normals(&mut rng, rows * h, 1.0);
        let (dg0, db0) = (normals(&mut rng, h, 0.5), normals(&mut rng, h, 0.5));
        let mut ds = vec![0.0f32; rows * h];
        let (mut dg, mut db) = (dg0.clone(), db0.clone());
        bw::layernorm_backward(&s, h, &gamma, eps, &dy, &mut ds, &mut dg, &mut db);
        let (mut dgz, mut dbz) = (vec![0.0f32; h], vec![0.0f32; h]);
        let mut scratch = vec![0.0f32; rows * h];
        bw::layernorm_backward(&s, h, &gamma, eps, &dy, &mut scratch, &mut dgz, &mut dbz);
        out.extend([rows as f32, h as f32, eps]);
        for v in [&s, &gamma, &dy, &dg0, &db0, &ds, &dg, &db, &dgz, &dbz] {
            out.extend_from_slice(v);
        }
    }
    save("backward_layernorm.bin", &out)?;

    // bias gradient (rows, cols): f32 and bf16 inputs, onto given values and from zero
    let bias = [
        (600usize, 37usize),
        (256, 130),
        (257, 5),
        (1, 3),
        (513, 129),
    ];
    let mut out = vec![bias.len() as f32];
    for (rows, cols) in bias {
        let dy = normals(&mut rng, rows * cols, 1.0);
        let dyb = bf16_values(&dy);
        let db0 = normals(&mut rng, cols, 1.0);
        // the bias part of linear_backward (one input feature, no dx)
        let sums = |dy: &[f32], init: &[f32]| {
            let (x, w) = (vec![0.0f32; rows], vec![0.0f32; cols]);
            let (mut dw, mut db) = (vec![0.0f32; cols], init.to_vec());
            bw::linear_backward(&x, rows, 1, &w, cols, dy, None, &mut dw, &mut db);
            db
        };
        let zero = vec![0.0f32; cols];
        out.extend([rows as f32, cols as f32]);
        for v in [
            &dy,
            &dyb,
            &db0,
            &sums(&dy, &db0),
            &sums(&dyb, &db0),
            &sums(&dy, &zero),
            &sums(&dyb, &zero),
        ] {
            out.extend_from_slice(v);
        }
    }
    save("backward_bias.bin", &out)?;

    // GELU: n not a multiple of 4, saturated and underflowing tails, signed zeros
    let gelu_n = [1031usize, 5000];
    let mut out = vec![gelu_n.len() as f32];
    for n in gelu_n {
        let mut pre: Vec<f32> = (0..n)
            .map(|_| (rng.next_f64() * 16.0 - 8.0) as f32)
            .collect();
        pre[..8].copy_from_slice(&[0.0, -0.0, 10.0, -10.0, 30.0, -30.0, -5.7, 1e-30]);
        let dy = normals(&mut rng, n, 1.0);
        let mut g = dy.clone();
        bw::gelu_backward(&pre, &mut g);
        let (preb, dyb) = (bf16_values(&pre), bf16_values(&dy));
        let mut gb = dyb.clone();
        bw::gelu_backward(&preb, &mut gb);
        out.push(n as f32);
        for v in [&pre, &dy, &g, &preb, &dyb, &gb] {
            out.extend_from_slice(v);
        }
    }
    save("backward_gelu.bin", &out)?;

    // L2 normalisation (rows, dim); row 1 is zero and row 2 below the 1e-12 clamp
    let l2 = [(9usize, 37usize), (3, 768), (10, 1), (17, 130)];
    let mut out = vec![l2.len() as f32];
    for (rows, dim) in l2 {
        let mut x = normals(&mut rng, rows * dim, 1.0);
        x[dim..2 * dim].fill(0.0);
        x[2 * dim..3 * dim].iter_mut().for_each(|v| *v *= 1e-15);
        let dy = normals(&mut rng, rows * dim, 1.0);
        let mut dx = vec![0.0f32; rows * dim];
        for ((xr, gr), o) in x.chunks(dim).zip(dy.chunks(dim)).zip(dx.chunks_mut(dim)) {
            bw::l2_normalize_backward(xr, gr, o);
        }
        out.extend([rows as f32, dim as f32]);
        for v in [&x, &dy, &dx] {
            out.extend_from_slice(v);
        }
    }
    save("backward_l2.bin", &out)?;

    // attention (h, heads, dropout p, with bias, lengths, input spread): every kernel variant
    // (d32, d64, d128, _any with dh 40 and 8), empty and single-token sequences, tile edges
    // 63 / 64 / 65; peaked softmax rows (spread 3: scores up to ~10); and a mask probe (spread 0):
    // Q = K = 0 and one-hot dO rows, so dV_j = keep_ij / len exactly and one wrong mask bit
    // moves a dV element by the largest value
    type AttentionCase = (usize, usize, f32, bool, &'static [usize], f32);
    let attn: [AttentionCase; 8] = [
        (128, 2, 0.0, false, &[0, 1, 63, 64, 65, 130], 1.0),
        (128, 2, 0.1, true, &[0, 1, 63, 64, 65, 130], 1.0),
        (96, 3, 0.3, true, &[130, 5, 0, 64], 1.0),
        (128, 1, 0.5, false, &[65, 1, 130], 1.0),
        (80, 2, 0.15, true, &[63, 130, 1], 1.0),
        (24, 3, 0.2, false, &[17, 65], 1.0),
        (128, 2, 0.1, true, &[128, 17, 90], 3.0),
        (128, 2, 0.5, false, &[100, 7], 0.0),
    ];
    let (seed, step, layer) = (11u64, 3u64, 2u32);
    let mut out = vec![attn.len() as f32];
    for (h, heads, p, with_bias, lens, spread) in attn {
        let t: usize = lens.iter().sum();
        let probe = spread == 0.0;
        // spread 3: the standard deviation of uniform(±3) inputs (tests/gpu_attention_backward.rs)
        let sd = if spread > 1.0 {
            spread / 3f32.sqrt()
        } else {
            1.0
        };
        let mut qkv = normals(&mut rng, t * 3 * h, sd as f64);
        let bias = if with_bias {
            normals(&mut rng, 3 * h, 0.3)
        } else {
            vec![0.0f32; 3 * h]
        };
        let mut dctx = normals(&mut rng, t * h, 1.0);
        if probe {
            // Q = K = 0 (no bias): uniform probabilities; dO = e_0 of every head on the
            // sequence's row 3, zero elsewhere
            qkv.chunks_mut(3 * h).for_each(|row| row[..2 * h].fill(0.0));
            dctx.fill(0.0);
            let mut start = 0;
            for &len in lens {
                (0..heads).for_each(|hd| dctx[(start + 3) * h + hd * (h / heads)] = 1.0);
                start += len;
            }
        }
        let (mut words, mut dqkv) = (Vec::new(), vec![0.0f32; t * 3 * h]);
        let mut start = 0;
        for (s, &len) in lens.iter().enumerate() {
            let stream = Stream::new(seed, step, 1000 + s as u64, layer, Site::AttentionDropout);
            words.extend(stream.words().map(f32::from_bits));
            // the CPU keeps the biased projection
            let mut q = qkv[start * 3 * h..(start + len) * 3 * h].to_vec();
            q.iter_mut()
                .enumerate()
                .for_each(|(i, v)| *v += bias[i % (3 * h)]);
            let drop = AttnDropout { p, stream };
            bw::attention_sequence_backward(
                &q,
                len,
                h,
                heads,
                (p > 0.0).then_some(&drop),
                &dctx[start * h..(start + len) * h],
                &mut dqkv[start * 3 * h..(start + len) * 3 * h],
            );
            start += len;
        }
        out.extend([
            h as f32,
            heads as f32,
            lens.len() as f32,
            p,
            with_bias as u8 as f32,
        ]);
        out.extend(lens.iter().map(|&l| l as f32));
        for v in [&qkv, &bias, &dctx, &words, &dqkv] {
            out.extend_from_slice(v);
        }
    }
    save("backward_attention.bin", &out)
}

/// `v` with its length first (an f32, exact below 2^24): the inference harness reads records of
/// varying shapes without a table of them.
fn push_sized(out: &mut Vec<f32>, v: &[f32]) {
    out.push(v.len() as f32);
    out.extend_from_slice(v);
}

/// Attention cases (head dim, heads, sequence lengths): every tiled head dim and the fallback's
/// (24), partial key tiles, one-token and empty sequences, and one sequence of 512.
const ATTENTION_CASES: [(usize, usize, &[usize]); 5] = [
    (32, 2, &[1, 17, 64, 65, 130, 0]),
    (64, 2, &[130, 1, 65, 17, 64]),
    (128, 2, &[65, 1, 130, 17]),
    (24, 2, &[17, 1, 33]),
    (64, 1, &[512]),
];

/// Adapter cases (d, h, queries, k, max_pairs, corpus rows): odd sizes, k below one tile,
/// several launches when max_pairs < queries · k, the MiniLM width.
const ADAPTER_SCORE_CASES: [(usize, usize, usize, usize, usize, usize); 4] = [
    (37, 53, 2, 5, 5, 41),
    (64, 300, 2, 9, 18, 100),
    (129, 129, 1, 1, 1, 7),
    (384, 384, 1, 17, 17, 300),
];

/// The references of the inference kernels, read by tools/kernel-emulator/inference.cpp: every
/// array is written with its length first (`push_sized`).
fn inference(dir: &Path) -> rrra::Result<()> {
    use rrra::cpu::attention::attention_sequence;
    use rrra::cpu::math::{add_layernorm, gelu_inplace, l2_normalize};
    use rrra::model::Pooling;
    let save = |name: &str, v: &[f32]| {
        let path = dir.join(name);
        write_f32(&path, &[v]).map_err(|e| rrra::Error::io(&path, e))
    };
    let mut rng = Rng::new(31);

    // attention: the kernels add the bias to the raw projection; the CPU reads it biased. The
    // bf16 reference reads the projection rounded to bf16, as the bf16 kernels do.
    let mut out = Vec::new();
    for (dh, heads, lens) in ATTENTION_CASES {
        let h = dh * heads;
        let t: usize = lens.iter().sum();
        let qkv = normals(&mut rng, t * 3 * h, 1.0);
        let bias = normals(&mut rng, 3 * h, 0.3);
        push_sized(&mut out, &[dh as f32, heads as f32]);
        push_sized(
            &mut out,
            &lens.iter().map(|&l| l as f32).collect::<Vec<_>>(),
        );
        push_sized(&mut out, &qkv);
        push_sized(&mut out, &bias);
        for src in [qkv.clone(), bf16_values(&qkv)] {
            let mut ctx = vec![0.0f32; t * h];
            let mut start = 0;
            for &len in lens {
                let mut x = src[start * 3 * h..(start + len) * 3 * h].to_vec();
                x.iter_mut()
                    .enumerate()
                    .for_each(|(i, v)| *v += bias[i % (3 * h)]);
                attention_sequence(&x, len, h, heads, &mut ctx[start * h..(start + len) * h]);
                start += len;
            }
            push_sized(&mut out, &ctx);
        }
    }
    save("inference_attention.bin", &out)?;

    // adapter scoring: dense candidates (every statistic), then corpus rows gathered by index
    // in f32, f16 and bf16 (the reference reads the rows widened back to f32)
    let mut out = Vec::new();
    for (case, &(d, h, nq, k, max_pairs, rows)) in ADAPTER_SCORE_CASES.iter().enumerate() {
        let seed = 60 + case as u64;
        let mut p = AdapterParams::init(d, h, seed)?;
        let s2 = 1.0 / (h as f64).sqrt();
        for t in p.tensors_mut().into_iter().skip(1) {
            t.iter_mut()
                .for_each(|v| *v = (rng.normal_pair().0 * s2) as f32);
        }
        (p.beta, p.beta0) = (7.5, -0.3);
        let q = random_unit_vectors(nq, d, seed + 1);
        let mut c = random_unit_vectors(nq * k, d, seed + 2);
        if k > 1 {
            c[..d].copy_from_slice(&q[..d]); // q = c: alpha 0
        }
        let dense = score(&p, &q, &c, k)?;
        let corpus = random_unit_vectors(rows, d, seed + 3);
        let picks: Vec<f32> = (0..nq * k).map(|_| rng.below(rows) as f32).collect();
        let shape = [d, h, nq, k, max_pairs, rows].map(|x| x as f32);
        push_sized(&mut out, &shape);
        for v in [&p.w1, &p.b1, &p.w2, &p.b2, &vec![p.beta, p.beta0], &q, &c] {
            push_sized(&mut out, v);
        }
        for v in [&dense.logit, &dense.p, &dense.qa, &dense.ca, &dense.alpha] {
            push_sized(&mut out, v);
        }
        push_sized(&mut out, &corpus);
        push_sized(&mut out, &picks);
        let f16: Vec<f32> = corpus
            .iter()
            .map(|&v| half::f16::from_f32(v).to_f32())
            .collect();
        for table in [corpus.clone(), f16, bf16_values(&corpus)] {
            let gathered: Vec<f32> = picks
                .iter()
                .flat_map(|&r| table[r as usize * d..(r as usize + 1) * d].to_vec())
                .collect();
            push_sized(&mut out, &score(&p, &q, &gathered, k)?.logit);
        }
    }
    save("inference_adapter.bin", &out)?;

    // row kernels: embeddings + LayerNorm, bias + residual + LayerNorm and the poolings per
    // hidden size (h128 with a partial chunk, h512, h1024), then GELU and L2 widths
    let mut out = Vec::new();
    let (eps, lens) = (1e-12f32, [5usize, 1, 17, 0, 9, 130]);
    let t: usize = lens.iter().sum();
    let (vocab, positions, types) = (50usize, 130usize, 2usize);
    for h in [72usize, 384, 1000] {
        let ids: Vec<f32> = (0..t).map(|_| rng.below(vocab) as f32).collect();
        let tys: Vec<f32> = (0..t).map(|_| rng.below(types) as f32).collect();
        let word = normals(&mut rng, vocab * h, 1.0);
        let pos = normals(&mut rng, positions * h, 0.5);
        let ty = normals(&mut rng, types * h, 0.5);
        let gamma: Vec<f32> = normals(&mut rng, h, 0.2).iter().map(|g| 1.0 + g).collect();
        let beta = normals(&mut rng, h, 0.1);
        let mut x = vec![0.0f32; t * h];
        let mut start = 0;
        for &len in &lens {
            for p in 0..len {
                let (tok, w, ty_row) =
                    (start + p, ids[start + p] as usize, tys[start + p] as usize);
                for i in 0..h {
                    x[tok * h + i] = word[w * h + i] + pos[p * h + i] + ty[ty_row * h + i];
                }
            }
            start += len;
        }
        add_layernorm(&mut x, None, h, &gamma, &beta, eps);
        push_sized(&mut out, &[h as f32]);
        push_sized(&mut out, &lens.map(|l| l as f32));
        for v in [&ids, &tys, &word, &pos, &ty, &gamma, &beta, &x] {
            push_sized(&mut out, v);
        }
        // the GEMM output y gets its bias first (as cpu::gemm::linear adds it), then the residual
        let r = 37;
        let (y, b, res) = (
            normals(&mut rng, r * h, 2.0),
            normals(&mut rng, h, 0.5),
            normals(&mut rng, r * h, 1.0),
        );
        let mut z: Vec<f32> = y.iter().enumerate().map(|(i, v)| v + b[i % h]).collect();
        add_layernorm(&mut z, Some(&res), h, &gamma, &beta, eps);
        for v in [&y, &b, &res, &z] {
            push_sized(&mut out, v);
        }
        // pooling of the embeddings' output (empty sequences stay zero rows here)
        for pooling in [Pooling::Mean, Pooling::Cls, Pooling::Max] {
            for normalize in [false, true] {
                let mut pooled = vec![0.0f32; lens.len() * h];
                let mut start = 0;
                for (s, &len) in lens.iter().enumerate() {
                    if len > 0 {
                        let o = &mut pooled[s * h..(s + 1) * h];
                        pooling.pool(&x[start * h..(start + len) * h], len, h, o);
                        if normalize {
                            l2_normalize(o);
                        }
                    }
                    start += len;
                }
                push_sized(&mut out, &pooled);
            }
        }
    }
    // bias + GELU: scalar (37) and vector widths; the bf16 reference reads y rounded to bf16
    for cols in [37usize, 64, 1000] {
        let rows = 5;
        let (y, b) = (
            normals(&mut rng, rows * cols, 2.0),
            normals(&mut rng, cols, 0.5),
        );
        push_sized(&mut out, &[cols as f32]);
        push_sized(&mut out, &y);
        push_sized(&mut out, &b);
        for src in [y.clone(), bf16_values(&y)] {
            let mut g: Vec<f32> = src
                .iter()
                .enumerate()
                .map(|(i, v)| v + b[i % cols])
                .collect();
            gelu_inplace(&mut g);
            push_sized(&mut out, &g);
        }
    }
    // L2 normalisation: float4 and scalar paths, a zero row first
    for (rows, dim) in [(37usize, 384usize), (11, 37)] {
        let mut x = normals(&mut rng, rows * dim, 1.5);
        x[..dim].fill(0.0);
        push_sized(&mut out, &[dim as f32]);
        push_sized(&mut out, &x);
        x.chunks_exact_mut(dim).for_each(l2_normalize);
        push_sized(&mut out, &x);
    }
    save("inference_rows.bin", &out)
}

/// Training-step cases, FFN 4 × hidden: head dim 32 (the tiled attention kernels) with and
/// without dropout, head dim 16 (the `_any` attention backward) with dropout, every pooling,
/// normalisation on and off, a sequence past one 64-token tile, and two micro-batches whose
/// gradients add up on the device; the last case gives the mixed-precision step dropout, two
/// micro-batches and a pooling whose gradient is continuous. The tiny-bert case (head dim 8, no
/// dropout) runs the `_any` forward attention. Sized for the emulator's time (a host thread per
/// CUDA thread).
type StepCase = (
    usize,
    usize,
    usize,
    rrra::model::Pooling,
    bool,
    bool,
    &'static [&'static [usize]],
);
/// (hidden, heads, layers, pooling, normalise, dropout, micro-batches' sequence lengths); three
/// layers in the first case, so that the bf16 mode's two alternating residual buffers are
/// reused.
const STEP_CASES: [StepCase; 4] = {
    use rrra::model::Pooling::{Cls, Max, Mean};
    [
        (64, 2, 3, Cls, false, false, &[&[65, 6, 1, 9]]),
        (64, 2, 2, Max, true, true, &[&[65, 6, 1, 9], &[4, 7]]),
        (48, 3, 2, Mean, false, true, &[&[9, 66, 3]]),
        (64, 2, 2, Mean, false, true, &[&[70, 3, 1], &[5, 9]]),
    ]
};

/// The references of the encoder's training step, read by tools/kernel-emulator/encoder_step.cpp:
/// per case its shape and dropout plan, the weights, per micro-batch its batch, embedding
/// gradient and the CPU's embeddings, then the parameter gradients summed over the micro-batches
/// onto 0.5 (`TrainableEncoder`, as tests/gpu_encoder_train.rs runs it), every array with its
/// length first (`push_sized`). The tiny-bert case follows when the fixture is present.
/// The header of one `encoder_step.bin` case, in the order tools/kernel-emulator/encoder_step.cpp
/// reads it: model shape, pooling, dropout plan, micro-batches, the gradients' starting value and
/// whether tiny-bert's float64 reference follows.
fn step_header(
    cfg: &rrra::model::BertConfig,
    pooling: rrra::model::Pooling,
    normalize: bool,
    plan: &rrra::train::encoder_grad::DropoutPlan,
    micro_batches: usize,
    grad_start: f32,
    float64_follows: bool,
) -> [f32; 17] {
    use rrra::model::Pooling;
    let pooling_code = match pooling {
        Pooling::Mean => 0.0,
        Pooling::Cls => 1.0,
        Pooling::Max => 2.0,
    };
    [
        cfg.hidden_size as f32,
        cfg.num_attention_heads as f32,
        cfg.num_hidden_layers as f32,
        cfg.intermediate_size as f32,
        cfg.vocab_size as f32,
        cfg.max_position_embeddings as f32,
        cfg.type_vocab_size as f32,
        cfg.layer_norm_eps as f32,
        pooling_code,
        f32::from(u8::from(normalize)),
        plan.hidden,
        plan.attention,
        plan.seed as f32,
        plan.step as f32,
        micro_batches as f32,
        grad_start,
        f32::from(u8::from(float64_follows)),
    ]
}

fn encoder_step(dir: &Path) -> rrra::Result<()> {
    use rrra::model::synthetic::{batch_with_lengths, random_bert, small_config};
    use rrra::model::weights::BertWeights;
    use rrra::train::encoder_grad::{ActivationMode, DropoutPlan, TrainBatch, TrainableEncoder};
    let mut out = Vec::new();
    for (case, &(h, heads, layers, pooling, normalize, dropout, micro)) in
        STEP_CASES.iter().enumerate()
    {
        let cfg = rrra::model::BertConfig {
            vocab_size: 50,
            max_position_embeddings: 96,
            ..small_config(h, heads, layers, 4 * h)
        };
        let mut bert = random_bert(cfg.clone(), 40 + case as u64);
        // std 0.1 instead of 0.02: attention far from uniform, so a key or mask mix-up shows
        for l in &mut bert.weights.layers {
            for w in [
                &mut l.qkv_w,
                &mut l.attn_out_w,
                &mut l.inter_w,
                &mut l.out_w,
            ] {
                w.iter_mut().for_each(|v| *v *= 5.0);
            }
        }
        let plan = if dropout {
            DropoutPlan {
                hidden: 0.1,
                attention: 0.15,
                seed: 11,
                step: 3,
            }
        } else {
            DropoutPlan::none()
        };
        let te = TrainableEncoder {
            bert: &bert,
            pooling,
            normalize,
        };
        // gradients start at 0.5; no float64 reference follows
        let header = step_header(&cfg, pooling, normalize, &plan, micro.len(), 0.5, false);
        push_sized(&mut out, &header);
        for t in bert.weights.tensors() {
            push_sized(&mut out, t);
        }
        let mut grads = BertWeights::zeros(&cfg);
        for (t, _) in grads.tensors_mut() {
            t.fill(0.5);
        }
        let mut rng = Rng::new(60 + case as u64);
        for (m, lens) in micro.iter().enumerate() {
            let seed = 50 + 10 * case as u64 + m as u64;
            let mut packed = batch_with_lengths(&cfg, lens, seed);
            // both token types, and a type run past one 64-token chunk of the scatter
            for (t, ty) in packed.type_ids.iter_mut().enumerate() {
                *ty = u32::from(t % 5 == 0);
            }
            let first = 1000 * case as u64 + 100 * m as u64;
            let batch = TrainBatch {
                example_ids: (first..first + lens.len() as u64).collect(),
                packed,
            };
            let d_emb = normals(&mut rng, lens.len() * h, 1.0);
            let acts = te.forward(&batch, &plan, ActivationMode::Keep)?;
            let emb = acts.embeddings.clone();
            te.backward(&batch, &plan, acts, &d_emb, &mut grads)?;
            let pb = &batch.packed;
            let as_f32 = |v: &[u32]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
            push_sized(
                &mut out,
                &lens.iter().map(|&l| l as f32).collect::<Vec<_>>(),
            );
            push_sized(&mut out, &as_f32(&pb.ids));
            push_sized(&mut out, &as_f32(&pb.type_ids));
            let ids: Vec<f32> = batch.example_ids.iter().map(|&e| e as f32).collect();
            push_sized(&mut out, &ids);
            push_sized(&mut out, &d_emb);
            push_sized(&mut out, &emb);
        }
        for t in grads.tensors() {
            push_sized(&mut out, t);
        }
    }
    tiny_bert_step(&mut out)?;
    let path = dir.join("encoder_step.bin");
    write_f32(&path, &[&out]).map_err(|e| rrra::Error::io(&path, e))
}

/// The step of tests/gpu_encoder_train.rs's float64 case, appended to `out` in `encoder_step`'s
/// format when ../shared/fixtures/tiny-bert (or `$RRRA_SHARED`'s) is there: the fixture's batch
/// (3 queries, 6 documents), no dropout, d_embeddings from its InfoNCE; gradients from zero, then
/// the float64 PyTorch embeddings and gradients (as f32, laid out as `BertWeights::tensors`).
fn tiny_bert_step(out: &mut Vec<f32>) -> rrra::Result<()> {
    use rrra::model::bert::PackedBatch;
    use rrra::model::weights::BertWeights;
    use rrra::model::{Encoder, EncoderOptions};
    use rrra::train::encoder_grad::{ActivationMode, DropoutPlan, TrainBatch, TrainableEncoder};
    use rrra::train::loss::{info_nce, InfoNceInput};
    use safetensors::{Dtype, SafeTensors};
    use std::collections::HashMap;
    let shared = std::env::var_os("RRRA_SHARED")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    let dir = shared.join("fixtures/tiny-bert");
    let state = dir.join("debug_state.safetensors");
    if !state.exists() {
        return Ok(());
    }
    let bad = |e: safetensors::SafeTensorError| rrra::Error::InvalidArgument(format!("{e}"));
    let bytes = std::fs::read(&state).map_err(|e| rrra::Error::io(&state, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(bad)?;
    let mut f: HashMap<String, (Vec<usize>, Vec<f64>)> = HashMap::new();
    for (name, t) in st.tensors() {
        let v: Vec<f64> = match t.dtype() {
            Dtype::F64 => t
                .data()
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect(),
            Dtype::I64 => t
                .data()
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")) as f64)
                .collect(),
            _ => continue,
        };
        f.insert(name, (t.shape().to_vec(), v));
    }
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(bad)?;
    let tau: f32 = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("tau"))
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| rrra::Error::InvalidArgument("the fixture has no tau".into()))?;
    let enc = Encoder::load(&dir, &EncoderOptions::default())?;
    let (cfg, h) = (enc.config().clone(), enc.dim());
    // tests/common's push_rows: the tokens the attention mask keeps, type 0
    let mut packed = PackedBatch::new();
    for (ids, mask) in [
        ("query_input_ids", "query_attention_mask"),
        ("doc_input_ids", "doc_attention_mask"),
    ] {
        let ((shape, ids), (_, mask)) = (&f[ids], &f[mask]);
        for r in 0..shape[0] {
            let row: Vec<u32> = (0..shape[1])
                .filter(|&c| mask[r * shape[1] + c] != 0.0)
                .map(|c| ids[r * shape[1] + c] as u32)
                .collect();
            packed.push(&row, &vec![0; row.len()]);
        }
    }
    let lens: Vec<f32> = packed
        .offsets
        .windows(2)
        .map(|w| (w[1] - w[0]) as f32)
        .collect();
    let batch = TrainBatch {
        example_ids: (0..lens.len() as u64).collect(),
        packed,
    };
    let te = TrainableEncoder {
        bert: enc.bert(),
        pooling: enc.pooling(),
        normalize: enc.normalize(),
    };
    let none = DropoutPlan::none();
    let acts = te.forward(&batch, &none, ActivationMode::Keep)?;
    let emb = acts.embeddings.clone();
    // InfoNCE over 3 queries and 6 documents, query i's positive document i
    let (q, d) = emb.split_at(3 * h);
    let mut d_emb = vec![0.0f32; emb.len()];
    let (dq, dd) = d_emb.split_at_mut(3 * h);
    let input = InfoNceInput {
        queries: q,
        docs: d,
        dim: h,
        targets: &[0, 1, 2],
        log_weights: None,
        tau,
    };
    info_nce(&input, dq, dd)?;
    let mut grads = BertWeights::zeros(&cfg);
    te.backward(&batch, &none, acts, &d_emb, &mut grads)?;
    // the float64 gradients, each named tensor placed where `named` finds it in the fused ones
    let mut want = BertWeights::zeros(&cfg);
    let places: Vec<(String, usize, usize)> = {
        let tensors = want.tensors();
        want.named(&cfg)
            .iter()
            .map(|n| {
                let at = n.data.as_ptr() as usize;
                let (i, t) = tensors
                    .iter()
                    .enumerate()
                    .find(|(_, t)| {
                        (t.as_ptr() as usize..t.as_ptr() as usize + 4 * t.len()).contains(&at)
                    })
                    .expect("a named view lies in a tensor");
                (n.name.clone(), i, (at - t.as_ptr() as usize) / 4)
            })
            .collect()
    };
    {
        let mut tensors = want.tensors_mut();
        for (name, i, offset) in &places {
            let (_, g) = &f[&format!("grad.{name}")];
            for (o, v) in tensors[*i].0[*offset..*offset + g.len()].iter_mut().zip(g) {
                *o = *v as f32;
            }
        }
    }
    // one micro-batch, gradients from zero, the float64 reference follows
    let header = step_header(
        &cfg,
        enc.pooling(),
        enc.normalize(),
        &DropoutPlan::none(),
        1,
        0.0,
        true,
    );
    push_sized(out, &header);
    for t in enc.bert().weights.tensors() {
        push_sized(out, t);
    }
    let pb = &batch.packed;
    push_sized(out, &lens);
    push_sized(out, &pb.ids.iter().map(|&x| x as f32).collect::<Vec<_>>());
    push_sized(
        out,
        &pb.type_ids.iter().map(|&x| x as f32).collect::<Vec<_>>(),
    );
    push_sized(
        out,
        &batch
            .example_ids
            .iter()
            .map(|&e| e as f32)
            .collect::<Vec<_>>(),
    );
    push_sized(out, &d_emb);
    push_sized(out, &emb);
    for t in grads.tensors() {
        push_sized(out, t);
    }
    let f64_emb: Vec<f32> = ["query_embeddings", "doc_embeddings"]
        .iter()
        .flat_map(|k| f[*k].1.iter().map(|&v| v as f32))
        .collect();
    push_sized(out, &f64_emb);
    for t in want.tensors() {
        push_sized(out, t);
    }
    Ok(())
}

fn main() -> rrra::Result<()> {
    let dir = std::env::args_os()
        .nth(1)
        .ok_or_else(|| rrra::Error::InvalidArgument("usage: kernel_reference OUT_DIR".into()))?;
    let dir = Path::new(&dir);
    std::fs::create_dir_all(dir).map_err(|e| rrra::Error::io(dir, e))?;
    for shape in ADAPTER_SHAPES {
        adapter(dir, shape)?;
    }
    encoder_backward(dir)?;
    inference(dir)?;
    encoder_step(dir)?;
    train_attention(dir)?;
    dropout(dir)
}
