//! Writes the CPU reference outputs that tools/kernel-emulator checks the CUDA kernels against
//! (run by tools/emulate-kernels.sh): `kernel_reference OUT_DIR`.
//!
//! * `adapter_D_H_Q_K.bin`: a random adapter, queries, candidates and output gradients, then
//!   `adapter::score` and `adapter::backward` (every f32 in little-endian order, as the harness
//!   reads them);
//! * `dropout.bin`, `dropout_words.bin`: a packed QKV batch, `attention_sequence_train` with
//!   dropout on the probabilities, `dropout_inplace` on a hidden block, and the streams' words.

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

fn main() -> rrra::Result<()> {
    let dir = std::env::args_os()
        .nth(1)
        .ok_or_else(|| rrra::Error::InvalidArgument("usage: kernel_reference OUT_DIR".into()))?;
    let dir = Path::new(&dir);
    std::fs::create_dir_all(dir).map_err(|e| rrra::Error::io(dir, e))?;
    for shape in ADAPTER_SHAPES {
        adapter(dir, shape)?;
    }
    dropout(dir)
}
