//! GEMM entry points on top of `matrixmultiply` (measured the fastest f32 GEMM on the target
//! 2-core AVX2 machines), split over rows with rayon. Splitting M keeps every output element's
//! reduction inside one call, so results are bitwise independent of the number of threads.

use rayon::prelude::*;

/// `y[rows × out] = x[rows × inp] · wᵀ + b`, with `w` stored `[out × inp]` as in PyTorch's
/// `nn.Linear` (so no transposed copy of the weights is ever made).
pub fn linear(x: &[f32], rows: usize, inp: usize, w: &[f32], b: &[f32], out: usize, y: &mut [f32]) {
    assert_eq!(x.len(), rows * inp, "linear: x shape");
    assert_eq!(w.len(), out * inp, "linear: w shape");
    assert_eq!(b.len(), out, "linear: b shape");
    assert_eq!(y.len(), rows * out, "linear: y shape");
    if rows == 0 {
        return;
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
            unsafe {
                matrixmultiply::sgemm(
                    m,
                    inp,
                    out,
                    1.0,
                    xc.as_ptr(),
                    inp as isize,
                    1,
                    w.as_ptr(),
                    1,
                    inp as isize,
                    1.0,
                    yc.as_mut_ptr(),
                    out as isize,
                    1,
                );
            }
        });
}

/// Rows per parallel task: one task per thread for large inputs, never fewer than 16 rows,
/// so small (query-sized) inputs run on one thread without task overhead.
fn row_chunk(rows: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    rows.div_ceil(threads).max(16)
}

#[cfg(test)]
mod tests {
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
}
