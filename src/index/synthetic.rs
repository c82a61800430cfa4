//! Deterministic synthetic embeddings for tests and benchmarks.
//!
//! Random unit vectors are the hardest case for exact search (no structure to exploit) and the
//! standard faiss benchmark workload. Each row draws from its own generator seeded by
//! `(seed, row)`, so the output does not depend on the thread count and rows are generated in
//! parallel.

use rayon::prelude::*;

/// SplitMix64: tiny, fast, statistically fine for test data (not cryptographic).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in `0..n` (`n > 0`; tiny modulo bias is irrelevant for test data).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// Two independent standard normal values (Box–Muller).
    pub fn normal_pair(&mut self) -> (f64, f64) {
        let u1 = 1.0 - self.next_f64(); // (0, 1]: ln is finite
        let u2 = self.next_f64();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f64::consts::TAU * u2;
        (r * t.cos(), r * t.sin())
    }
}

/// `n` vectors of dimension `dim`, row-major: standard normal entries, each row scaled to unit
/// L2 norm (computed in f64). Identical output for identical arguments on every machine.
pub fn random_unit_vectors(n: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut out = vec![0f32; n * dim];
    if dim == 0 {
        return out;
    }
    out.par_chunks_mut(dim).enumerate().for_each(|(row, v)| {
        let mut rng = Rng::new(seed ^ (row as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
        rng.next_u64();
        let mut tmp = vec![0f64; dim];
        let mut j = 0;
        while j < dim {
            let (a, b) = rng.normal_pair();
            tmp[j] = a;
            if j + 1 < dim {
                tmp[j + 1] = b;
            }
            j += 2;
        }
        let norm = tmp.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm > 0.0 {
            for (o, x) in v.iter_mut().zip(&tmp) {
                *o = (x / norm) as f32;
            }
        } else {
            v[0] = 1.0;
        }
    });
    out
}
