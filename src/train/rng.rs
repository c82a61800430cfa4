//! Counter-based random numbers (Philox4x32-10, Salmon et al. 2011 — the generator of cuRAND and
//! PyTorch's CUDA dropout). A random value is a pure function of a key and a counter, so any draw
//! of any step can be recomputed without replaying the ones before it: dropout masks are
//! rebuilt in backward instead of stored, a resumed run continues bit for bit, and a CUDA kernel
//! can produce the same numbers from the same (key, counter).
//!
//! Streams are keyed by `(seed, step, example, layer, site)`: see [`Stream`].

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = a as u64 * b as u64;
    ((p >> 32) as u32, p as u32)
}

/// Philox4x32 with 10 rounds: four 32-bit words from a 128-bit counter and a 64-bit key.
#[inline]
pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = ctr;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(W0);
            k[1] = k[1].wrapping_add(W1);
        }
        let (hi0, lo0) = mulhilo(M0, c[0]);
        let (hi1, lo1) = mulhilo(M1, c[2]);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// What a stream of random numbers is for; part of the counter so two uses never share numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Site {
    /// Dropout after the embedding LayerNorm.
    EmbeddingDropout = 1,
    /// Dropout on attention probabilities.
    AttentionDropout = 2,
    /// Dropout on the attention output projection (before the residual).
    AttentionOutputDropout = 3,
    /// Dropout on the feed-forward output (before the residual).
    FfnOutputDropout = 4,
    /// Gumbel noise of the negative samplers.
    Sampler = 5,
    /// Shuffling of the training examples.
    Shuffle = 6,
    /// Random (corpus-wide) negatives.
    RandomNegative = 7,
}

/// One independent stream: the numbers of `(seed, step, example, layer, site)`.
/// `example` is the sequence (or query) index within the step; `layer` the encoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stream {
    key: [u32; 2],
    ctr_hi: [u32; 2],
}

impl Stream {
    pub fn new(seed: u64, step: u64, example: u64, layer: u32, site: Site) -> Self {
        // Key: the seed. Counter words 2..3: (step, example, layer, site) folded so that every
        // field keeps its full range that matters here: step < 2^32, example < 2^20, layer < 2^8.
        let tag = ((example as u32) << 12) ^ ((layer & 0xff) << 4) ^ (site as u32);
        Stream {
            key: [seed as u32, (seed >> 32) as u32],
            ctr_hi: [
                step as u32 ^ ((step >> 32) as u32).rotate_left(16),
                tag ^ ((example >> 20) as u32),
            ],
        }
    }

    /// The key and the counter's upper words, `[key0, key1, ctr2, ctr3]`: what a CUDA kernel
    /// needs to compute the same numbers (`kernels/philox.cuh`).
    pub fn words(&self) -> [u32; 4] {
        [self.key[0], self.key[1], self.ctr_hi[0], self.ctr_hi[1]]
    }

    /// Four raw 32-bit words for block `i` (numbers `4i .. 4i+3` of the stream).
    #[inline]
    pub fn block(&self, i: u64) -> [u32; 4] {
        philox4x32_10(
            [i as u32, (i >> 32) as u32, self.ctr_hi[0], self.ctr_hi[1]],
            self.key,
        )
    }

    /// The `i`-th 32-bit word of the stream.
    #[inline]
    pub fn u32_at(&self, i: u64) -> u32 {
        self.block(i / 4)[(i % 4) as usize]
    }

    /// The `i`-th number as a uniform f32 in [0, 1) (24 random bits, as cuRAND does).
    #[inline]
    pub fn uniform_at(&self, i: u64) -> f32 {
        (self.u32_at(i) >> 8) as f32 * (1.0 / 16_777_216.0)
    }

    /// The `i`-th number as a uniform f64 in the open interval (0, 1) (53 random bits from two
    /// words; never 0, so `-ln(-ln u)` is always finite).
    #[inline]
    pub fn open_uniform_f64_at(&self, i: u64) -> f64 {
        let b = self.block(i / 2);
        let (a, c) = if i.is_multiple_of(2) {
            (b[0], b[1])
        } else {
            (b[2], b[3])
        };
        let bits = ((a as u64) << 21) ^ (c as u64 >> 11); // 53 bits
        (bits as f64 + 0.5) * (1.0 / 9_007_199_254_740_992.0)
    }

    /// Standard Gumbel noise `-ln(-ln u)` for number `i`.
    #[inline]
    pub fn gumbel_at(&self, i: u64) -> f64 {
        -(-self.open_uniform_f64_at(i).ln()).ln()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn philox_known_answers() {
        // Known-answer vectors of the Random123 distribution (kat_vectors, philox4x32 10 rounds).
        assert_eq!(
            philox4x32_10([0; 4], [0; 2]),
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                [0xa409_3822, 0x299f_31d0]
            ),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }

    #[test]
    fn words_reproduce_the_stream() {
        let s = Stream::new(
            0x1234_5678_9abc,
            1 << 33 | 7,
            3 << 20 | 5,
            4,
            Site::FfnOutputDropout,
        );
        let [k0, k1, c2, c3] = s.words();
        for i in [0u64, 1, 5, 1 << 32 | 9] {
            assert_eq!(
                philox4x32_10([i as u32, (i >> 32) as u32, c2, c3], [k0, k1]),
                s.block(i)
            );
        }
    }

    #[test]
    fn streams_differ_and_uniforms_are_uniform() {
        let a = Stream::new(7, 3, 0, 1, Site::AttentionDropout);
        let b = Stream::new(7, 3, 1, 1, Site::AttentionDropout);
        let c = Stream::new(7, 4, 0, 1, Site::AttentionDropout);
        let d = Stream::new(7, 3, 0, 1, Site::FfnOutputDropout);
        let first = |s: &Stream| (0..8).map(|i| s.u32_at(i)).collect::<Vec<_>>();
        assert_ne!(first(&a), first(&b));
        assert_ne!(first(&a), first(&c));
        assert_ne!(first(&a), first(&d));
        assert_eq!(
            first(&a),
            first(&Stream::new(7, 3, 0, 1, Site::AttentionDropout))
        );
        // mean and variance of 100 000 uniforms: 1/2 and 1/12 within 5 standard errors
        let n = 100_000;
        let xs: Vec<f64> = (0..n).map(|i| a.uniform_at(i) as f64).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(
            (mean - 0.5).abs() < 5.0 * (1.0f64 / 12.0 / n as f64).sqrt(),
            "{mean}"
        );
        assert!((var - 1.0 / 12.0).abs() < 2e-3, "{var}");
        assert!((0..n).all(|i| {
            let u = a.open_uniform_f64_at(i);
            u > 0.0 && u < 1.0 && a.gumbel_at(i).is_finite()
        }));
    }
}
