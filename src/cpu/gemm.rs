//! GEMM entry points. Many rows (a batch of texts): `matrixmultiply` (measured the fastest f32
//! GEMM on the target 2-core AVX2 machines), split over rows with rayon. Few rows (one query of
//! ~16 tokens): an unpacked dot-product kernel split over output columns, twice as fast there
//! (see `linear_split_out`). Either way every output element is one reduction in a fixed order,
//! so results are bitwise independent of the number of threads.

use rayon::prelude::*;

/// `y[rows × out] = x[rows × inp] · wᵀ + b`, with `w` stored `[out × inp]` as in PyTorch's
/// `nn.Linear` (so no transposed copy of the weights is ever made).
pub fn linear(x: &[f32], rows: usize, inp: usize, w: &[f32], b: &[f32], out: usize, y: &mut [f32]) {
    if !shapes_ok(x, rows, inp, w, b, out, y) {
        return;
    }
    if rows < SMALL_ROWS {
        return linear_split_out(x, rows, inp, w, b, out, y);
    }
    let chunk_rows = row_chunk(rows);
    y.par_chunks_mut(chunk_rows * out)
        .zip(x.par_chunks(chunk_rows * inp))
        .for_each(|(yc, xc)| {
            let m = xc.len() / inp;
            for row in yc.chunks_exact_mut(out) {
                row.copy_from_slice(b);
            }
            // SAFETY: the pointers cover m×inp, out×inp (read as its transpose through the
            // strides) and m×out elements, all in bounds as asserted above.
            unsafe { sgemm_rows(m, inp, out, xc.as_ptr(), w.as_ptr(), yc.as_mut_ptr(), out) };
        });
}

/// Checks the operands' lengths (a mismatch is a caller bug: panics); false when there is
/// nothing to compute.
fn shapes_ok(
    x: &[f32],
    rows: usize,
    inp: usize,
    w: &[f32],
    b: &[f32],
    out: usize,
    y: &[f32],
) -> bool {
    assert_eq!(x.len(), rows * inp, "linear: x shape");
    assert_eq!(w.len(), out * inp, "linear: w shape");
    assert_eq!(b.len(), out, "linear: b shape");
    assert_eq!(y.len(), rows * out, "linear: y shape");
    rows > 0
}

/// Below this many rows (a query of ~16 tokens, an adapter's 100–200 candidates) the product is
/// a stream over the weights: each weight is used by only `rows` multiply-adds, and packing the
/// weights into GEMM panels (as `sgemm` does) costs as much as using them. Measured on the
/// 2-core AVX2 machine (`linear`, 2 threads): at 16–200 rows the unpacked kernel ran at
/// 1.0–2.0× `sgemm`'s speed (typically 1.3×), above that `sgemm` wins as packing amortises.
pub(crate) const SMALL_ROWS: usize = 256;
/// Fewest output columns per task when a few-row product is split over threads.
const COL_CHUNK_MIN: usize = 64;

/// [`linear`] for few rows: the outputs are split into column blocks, one per thread, and each
/// block is computed by [`skinny`] straight from the row-major weights (or, without AVX2, by
/// `sgemm` on the block). Each output element is one dot product in a fixed order, so the
/// result does not depend on the number of threads; it differs from the many-row path in the
/// last bits only (another summation order).
fn linear_split_out(
    x: &[f32],
    rows: usize,
    inp: usize,
    w: &[f32],
    b: &[f32],
    out: usize,
    y: &mut [f32],
) {
    let threads = rayon::current_num_threads();
    let cols = out.div_ceil(threads).div_ceil(16).max(COL_CHUNK_MIN / 16) * 16;
    let y_ptr = SendPtr(y.as_mut_ptr());
    (0..out.div_ceil(cols)).into_par_iter().for_each(|blk| {
        let o0 = blk * cols;
        let y_ptr = &y_ptr;
        // SAFETY: block `blk` writes columns o0..o0+n of every row of y: disjoint between
        // blocks, and y outlives the parallel loop; the shapes were asserted by the caller.
        unsafe { columns(x, rows, inp, w, b, o0, cols.min(out - o0), y_ptr.0, out) };
    });
}

/// [`linear`] on the calling thread only, for callers that already split their work over
/// threads (e.g. the adapter's candidates). The same values as [`linear`], bit for bit.
pub fn linear_serial(
    x: &[f32],
    rows: usize,
    inp: usize,
    w: &[f32],
    b: &[f32],
    out: usize,
    y: &mut [f32],
) {
    if !shapes_ok(x, rows, inp, w, b, out, y) {
        return;
    }
    if rows < SMALL_ROWS {
        // SAFETY: all columns of y, whose shape was asserted above.
        return unsafe { columns(x, rows, inp, w, b, 0, out, y.as_mut_ptr(), out) };
    }
    // The many-row path computes each row chunk independently: one chunk of all rows gives
    // the same values.
    for row in y.chunks_exact_mut(out) {
        row.copy_from_slice(b);
    }
    // SAFETY: as in `linear`.
    unsafe { sgemm_rows(rows, inp, out, x.as_ptr(), w.as_ptr(), y.as_mut_ptr(), out) };
}

/// Output columns `o0..o0 + n` of the few-row product, for every row, written into `y` (row
/// stride `out`).
///
/// # Safety
/// `x` holds rows×inp floats, `w` out×inp, `b` out, `y` rows×out; `o0 + n ≤ out`; no other
/// thread writes these columns meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn columns(
    x: &[f32],
    rows: usize,
    inp: usize,
    w: &[f32],
    b: &[f32],
    o0: usize,
    n: usize,
    y: *mut f32,
    out: usize,
) {
    let (wb, yb) = (w.as_ptr().add(o0 * inp), y.add(o0));
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        return skinny::block(x.as_ptr(), rows, inp, wb, b.as_ptr().add(o0), n, yb, out);
    }
    for r in 0..rows {
        std::ptr::copy_nonoverlapping(b.as_ptr().add(o0), yb.add(r * out), n);
    }
    sgemm_rows(rows, inp, n, x.as_ptr(), wb, yb, out)
}

/// The few-row kernel: tiles of 4 input rows × 3 weight rows, 12 eight-lane accumulators over
/// the shared dimension (with the 3 weight vectors and 1 input vector: the 16 AVX registers,
/// no spills), so each loaded weight vector feeds 4 FMAs and each input vector 3.
/// The 3 weight rows (≤ 3·inp floats) stay in L1 while all input rows pass over them; the
/// weights stream from memory once per call.
#[cfg(target_arch = "x86_64")]
mod skinny {
    use std::arch::x86_64::*;

    /// `y[r][o] = b[o] + x[r]·w[o]` for rows `0..m` and outputs `0..n` (`y` row stride `ldy`).
    ///
    /// # Safety
    /// AVX2 and FMA present; `x` holds m×k floats, `w` n×k, `b` n, `y` m rows of stride ldy ≥ n.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn block(
        x: *const f32,
        m: usize,
        k: usize,
        w: *const f32,
        b: *const f32,
        n: usize,
        y: *mut f32,
        ldy: usize,
    ) {
        let t = Tile { x, k, w, b, y, ldy };
        let mut o = 0;
        while o < n {
            let no = if n - o >= 3 { 3 } else { 1 };
            let mut r = 0;
            while r < m {
                let nr = (m - r).min(4);
                match (nr, no) {
                    (4, 3) => t.run::<4, 3>(r, o),
                    (3, 3) => t.run::<3, 3>(r, o),
                    (2, 3) => t.run::<2, 3>(r, o),
                    (1, 3) => t.run::<1, 3>(r, o),
                    (4, _) => t.run::<4, 1>(r, o),
                    (3, _) => t.run::<3, 1>(r, o),
                    (2, _) => t.run::<2, 1>(r, o),
                    _ => t.run::<1, 1>(r, o),
                }
                r += nr;
            }
            o += no;
        }
    }

    struct Tile {
        x: *const f32,
        k: usize,
        w: *const f32,
        b: *const f32,
        y: *mut f32,
        ldy: usize,
    }

    impl Tile {
        /// Rows r..r+R against outputs o..o+O.
        #[inline(always)]
        unsafe fn run<const R: usize, const O: usize>(&self, r: usize, o: usize) {
            let k = self.k;
            let k8 = k / 8 * 8;
            let mut acc = [[_mm256_setzero_ps(); O]; R];
            let mut kk = 0;
            while kk < k8 {
                let mut wv = [_mm256_setzero_ps(); O];
                for (j, v) in wv.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(self.w.add((o + j) * k + kk));
                }
                for (i, acc_i) in acc.iter_mut().enumerate() {
                    let xv = _mm256_loadu_ps(self.x.add((r + i) * k + kk));
                    for (a, v) in acc_i.iter_mut().zip(&wv) {
                        *a = _mm256_fmadd_ps(xv, *v, *a);
                    }
                }
                kk += 8;
            }
            for (i, acc_i) in acc.iter().enumerate() {
                for (j, a) in acc_i.iter().enumerate() {
                    let mut s = hsum(*a);
                    for t in k8..k {
                        s += *self.x.add((r + i) * k + t) * *self.w.add((o + j) * k + t);
                    }
                    *self.y.add((r + i) * self.ldy + o + j) = *self.b.add(o + j) + s;
                }
            }
        }
    }

    /// The 8 lanes summed in a fixed order.
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }
}

/// A raw output pointer shared by tasks that write disjoint elements.
struct SendPtr(*mut f32);
// SAFETY: only used to write disjoint column blocks from different tasks (see above).
unsafe impl Sync for SendPtr {}

/// `y[m × n] (row stride ldy) += x[m × k] · wᵀ` for `w` stored `[n × k]`.
///
/// # Safety
/// `x` must hold m×k floats, `w` n×k, and `y` rows `0..m` of stride `ldy ≥ n`.
unsafe fn sgemm_rows(
    m: usize,
    k: usize,
    n: usize,
    x: *const f32,
    w: *const f32,
    y: *mut f32,
    ldy: usize,
) {
    matrixmultiply::sgemm(
        m,
        k,
        n,
        1.0,
        x,
        k as isize,
        1,
        w,
        1,
        k as isize,
        1.0,
        y,
        ldy as isize,
        1,
    );
}

/// Rows per parallel task: one task per thread for large inputs, never fewer than 16 rows,
/// so small (query-sized) inputs run on one thread without task overhead.
fn row_chunk(rows: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    rows.div_ceil(threads).max(16)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn linear_matches_naive_f64() {
        let (rows, inp, out) = (37, 19, 23);
        let x: Vec<f32> = (0..rows * inp)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0)
            .collect();
        let w: Vec<f32> = (0..out * inp)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) / 7.0)
            .collect();
        let b: Vec<f32> = (0..out).map(|i| i as f32 / 10.0).collect();
        let mut y = vec![0.0; rows * out];
        linear(&x, rows, inp, &w, &b, out, &mut y);
        for r in 0..rows {
            for o in 0..out {
                let mut s = b[o] as f64;
                for i in 0..inp {
                    s += x[r * inp + i] as f64 * w[o * inp + i] as f64;
                }
                // fp32 accumulation of 19 terms of magnitude ≤ 1.5: a few ulps of the sum.
                assert!((y[r * out + o] as f64 - s).abs() < 1e-5 * (1.0 + s.abs()));
            }
        }
    }

    fn naive(x: &[f32], rows: usize, inp: usize, w: &[f32], b: &[f32], out: usize) -> Vec<f64> {
        let mut y = vec![0.0f64; rows * out];
        for r in 0..rows {
            for o in 0..out {
                let mut s = b[o] as f64;
                for i in 0..inp {
                    s += x[r * inp + i] as f64 * w[o * inp + i] as f64;
                }
                y[r * out + o] = s;
            }
        }
        y
    }

    pub(crate) fn pseudo(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The few-row kernel against f64 on shapes that exercise every tile and tail (rows not a
    /// multiple of 4, outputs not a multiple of 3, depths not a multiple of 8), and its result
    /// independent of the thread count. Tolerance: fp32 accumulation of up to 389 products of
    /// magnitude ≤ 1 in another order than f64's: 1e-5 of the sum of magnitudes.
    #[test]
    fn few_rows_match_f64_and_any_thread_count() {
        for &(rows, inp, out) in &[(1, 8, 3), (5, 389, 131), (16, 384, 1152), (31, 97, 70)] {
            let x = pseudo(rows * inp, 1);
            let w = pseudo(out * inp, 2);
            let b = pseudo(out, 3);
            let want = naive(&x, rows, inp, &w, &b, out);
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut y = vec![0.0f32; rows * out];
                pool.install(|| linear(&x, rows, inp, &w, &b, out, &mut y));
                y
            };
            let y1 = run(1);
            for (g, wv) in y1.iter().zip(&want) {
                assert!(
                    (*g as f64 - wv).abs() < 1e-5 * (1.0 + inp as f64),
                    "{rows}×{inp}×{out}"
                );
            }
            for threads in [2, 3, 8] {
                let y = run(threads);
                assert!(
                    y.iter().zip(&y1).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{rows}×{inp}×{out}: {threads} threads differ from 1"
                );
            }
            let mut y = vec![0.0f32; rows * out];
            linear_serial(&x, rows, inp, &w, &b, out, &mut y);
            assert!(
                y.iter().zip(&y1).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{rows}×{inp}×{out}: linear_serial differs"
            );
        }
        // and on the many-row path
        let (rows, inp, out) = (300, 40, 24);
        let (x, w, b) = (pseudo(rows * inp, 4), pseudo(out * inp, 5), pseudo(out, 6));
        let (mut y, mut ys) = (vec![0.0f32; rows * out], vec![0.0f32; rows * out]);
        linear(&x, rows, inp, &w, &b, out, &mut y);
        linear_serial(&x, rows, inp, &w, &b, out, &mut ys);
        assert!(y.iter().zip(&ys).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}
