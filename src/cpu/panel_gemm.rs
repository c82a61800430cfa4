//! Products against weights packed into column panels: `y = b + x · W` with `W: [inp × cols]`
//! stored as panels of [`PANEL`] columns, each panel `inp × PANEL` contiguous (zero-padded past
//! the last column). This is the layout a GEMM packs its right operand into, produced here once
//! per set of weights ([`pack_panels`]) or formed directly per call (the adapter's per-query
//! matrix), so the kernel never packs.
//!
//! The kernel is the broadcast form of a GEMM micro-kernel: a tile of MR rows × one panel lives
//! in registers (AVX-512: 12 × 32 in 24 accumulators; AVX2: 6 × 16 in 12, the panel in two
//! halves); each step over the shared dimension loads the panel's row once and broadcasts one
//! input value per tile row. No horizontal sums, no packing, one load per two FMAs (AVX-512).
//! The row tile (≤ 12 × inp floats) stays in L1 while the panel streams from L1/L2.
//!
//! Against the unpacked few-row kernel (`gemm::linear` below 256 rows) on an AVX-512 machine:
//! 1.5–2.2× at 16 × 384 × 1536, 16 × 384 × 384 and 100 × 384 × 384 (one thread); with AVX2 only,
//! 1.0–1.1×
//! (docs/PERF.md).
//!
//! Every output element is one fused multiply-add chain over the shared dimension in order,
//! started from zero, with the bias added last. AVX-512, AVX2 and the scalar loop therefore give
//! the same bits, and so does any split of rows or panels between threads.

use rayon::prelude::*;

/// Columns per panel.
pub const PANEL: usize = 32;

/// Floats of `[out × inp]` weights packed by [`pack_panels`].
pub fn packed_len(out: usize, inp: usize) -> usize {
    out.div_ceil(PANEL) * inp * PANEL
}

/// Packs `w: [out × inp]` (the `nn.Linear` layout: a row per output) into column panels of its
/// transpose: panel `p`, element `[l][j]` is `w[p·PANEL + j][l]`, zero past `out`.
pub fn pack_panels(w: &[f32], out: usize, inp: usize) -> Vec<f32> {
    assert_eq!(w.len(), out * inp, "pack_panels: w shape");
    let mut packed = vec![0.0f32; packed_len(out, inp)];
    for (o, row) in w.chunks_exact(inp).enumerate() {
        let panel = &mut packed[o / PANEL * inp * PANEL..];
        for (l, &v) in row.iter().enumerate() {
            panel[l * PANEL + o % PANEL] = v;
        }
    }
    packed
}

/// `y[r][j] = b[j] + Σ_l x[r][l]·w[l][j]` for `r < rows`, `j < cols ≤ PANEL`, with `w` one panel
/// (`inp × PANEL`, row stride PANEL), `x` rows of stride `ldx`, `y` rows of stride `ldy`.
///
/// # Safety
/// `x` covers `rows` rows of `inp` floats at stride `ldx`; `w` covers `inp × PANEL` floats; `b`
/// covers `cols`; `y` covers `rows` rows of `cols` floats at stride `ldy`, and nothing else reads
/// or writes those elements meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn panel_product(
    x: *const f32,
    ldx: usize,
    rows: usize,
    inp: usize,
    w: *const f32,
    cols: usize,
    b: *const f32,
    y: *mut f32,
    ldy: usize,
) {
    debug_assert!(cols <= PANEL);
    let op = Operands {
        x,
        ldx,
        inp,
        w,
        cols,
        b,
        y,
        ldy,
    };
    run(Isa::best(), &op, rows)
}

/// The instruction sets the kernel is written for.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Isa {
    Avx512,
    Avx2,
    Scalar,
}

impl Isa {
    /// The widest one this CPU has (the detection is cached by the standard library).
    fn best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }
}

/// # Safety
/// `isa` is present on this CPU ([`Isa::best`] or narrower); as [`panel_product`].
unsafe fn run(isa: Isa, op: &Operands, rows: usize) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => avx512::rows(op, rows),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2::rows(op, rows),
        _ => scalar_rows(op, 0, rows, 0, op.cols),
    }
}

/// [`panel_product`] over whole matrices: `y[rows × out] = b + x[rows × inp] · wᵀ` for the
/// panels `packed` of an `[out × inp]` weight matrix (from [`pack_panels`]). The panels are
/// split over the threads in contiguous runs (each weight is read by one thread; the rows are
/// few, see `gemm::linear`'s few-row path).
pub fn packed_linear(
    x: &[f32],
    rows: usize,
    inp: usize,
    packed: &[f32],
    b: &[f32],
    out: usize,
    y: &mut [f32],
) {
    assert_eq!(x.len(), rows * inp, "packed_linear: x shape");
    assert_eq!(packed.len(), packed_len(out, inp), "packed_linear: w shape");
    assert_eq!(b.len(), out, "packed_linear: b shape");
    assert_eq!(y.len(), rows * out, "packed_linear: y shape");
    if rows == 0 {
        return;
    }
    let panels = out.div_ceil(PANEL);
    let per_task = panels.div_ceil(rayon::current_num_threads().max(1));
    let y_out = SharedOut(y.as_mut_ptr());
    packed
        .par_chunks(per_task * inp * PANEL)
        .enumerate()
        .for_each(|(task, run)| {
            let y_out = &y_out;
            for (i, panel) in run.chunks_exact(inp * PANEL).enumerate() {
                let j0 = (task * per_task + i) * PANEL;
                // SAFETY: the shapes were asserted above; this task alone writes columns
                // j0..j0+cols of y, which outlives the loop.
                unsafe {
                    panel_product(
                        x.as_ptr(),
                        inp,
                        rows,
                        inp,
                        panel.as_ptr(),
                        (out - j0).min(PANEL),
                        b.as_ptr().add(j0),
                        y_out.0.add(j0),
                        out,
                    )
                }
            }
        });
}

/// An output buffer shared by tasks that write disjoint columns of it.
pub(crate) struct SharedOut(pub(crate) *mut f32);
// SAFETY: only used to write disjoint columns from different tasks (see the users).
unsafe impl Sync for SharedOut {}

/// The arguments of one panel product.
#[derive(Clone, Copy)]
struct Operands {
    x: *const f32,
    ldx: usize,
    inp: usize,
    w: *const f32,
    cols: usize,
    b: *const f32,
    y: *mut f32,
    ldy: usize,
}

/// Rows `r0..r1` × columns `j0..j1` of the product, one element at a time (fallback and tails).
///
/// # Safety
/// As [`panel_product`].
unsafe fn scalar_rows(op: &Operands, r0: usize, r1: usize, j0: usize, j1: usize) {
    for r in r0..r1 {
        let xr = op.x.add(r * op.ldx);
        for j in j0..j1 {
            let mut s = 0.0f32;
            for l in 0..op.inp {
                s = (*xr.add(l)).mul_add(*op.w.add(l * PANEL + j), s);
            }
            *op.y.add(r * op.ldy + j) = *op.b.add(j) + s;
        }
    }
}

/// Dispatches `rows` rows in tiles of at most `$mr` to `$tile::<R>` (R a constant).
macro_rules! row_tiles {
    ($op:expr, $rows:expr, $mr:expr, $tile:ident, $($n:literal)*) => {{
        let mut r = 0;
        while r < $rows {
            let nr = ($rows - r).min($mr);
            match nr {
                $($n => $tile::<$n>($op, r),)*
                _ => unreachable!(),
            }
            r += nr;
        }
    }};
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Operands, PANEL};
    use std::arch::x86_64::*;

    /// Rows per tile: 12 × 2 accumulators + 2 panel vectors + 1 broadcast of 32 registers.
    const MR: usize = 12;

    /// # Safety
    /// AVX-512F present; as [`super::panel_product`].
    #[target_feature(enable = "avx512f")]
    pub unsafe fn rows(op: &Operands, rows: usize) {
        row_tiles!(op, rows, MR, tile, 1 2 3 4 5 6 7 8 9 10 11 12)
    }

    /// Rows r..r+R against the whole panel; lanes past `cols` are computed on the zero padding
    /// and not stored.
    #[inline(always)]
    unsafe fn tile<const R: usize>(op: &Operands, r: usize) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let x = op.x.add(r * op.ldx);
        for l in 0..op.inp {
            let w0 = _mm512_loadu_ps(op.w.add(l * PANEL));
            let w1 = _mm512_loadu_ps(op.w.add(l * PANEL + 16));
            for (i, acc_i) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*x.add(i * op.ldx + l));
                acc_i[0] = _mm512_fmadd_ps(xv, w0, acc_i[0]);
                acc_i[1] = _mm512_fmadd_ps(xv, w1, acc_i[1]);
            }
        }
        let masks = [lanes(op.cols), lanes(op.cols.saturating_sub(16))];
        for (half, &m) in masks.iter().enumerate() {
            let b = _mm512_maskz_loadu_ps(m, op.b.wrapping_add(16 * half));
            for (i, acc_i) in acc.iter().enumerate() {
                let y = op.y.wrapping_add((r + i) * op.ldy + 16 * half);
                _mm512_mask_storeu_ps(y, m, _mm512_add_ps(b, acc_i[half]));
            }
        }
    }

    /// The mask of the first `n.min(16)` lanes.
    #[inline(always)]
    fn lanes(n: usize) -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            (1u16 << n) - 1
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{scalar_rows, Operands, PANEL};
    use std::arch::x86_64::*;

    /// Rows per tile: 6 × 2 accumulators + 2 panel vectors + 1 broadcast of 16 registers.
    const MR: usize = 6;

    /// # Safety
    /// AVX2 and FMA present; as [`super::panel_product`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn rows(op: &Operands, rows: usize) {
        // full 16-column halves in registers, a partial one element by element
        let full = op.cols / 16;
        for half in 0..full {
            let half_op = Operands {
                w: op.w.add(16 * half),
                b: op.b.add(16 * half),
                y: op.y.add(16 * half),
                ..*op
            };
            row_tiles!(&half_op, rows, MR, tile, 1 2 3 4 5 6)
        }
        scalar_rows(op, 0, rows, 16 * full, op.cols);
    }

    /// Rows r..r+R against 16 columns of the panel.
    #[inline(always)]
    unsafe fn tile<const R: usize>(op: &Operands, r: usize) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let x = op.x.add(r * op.ldx);
        for l in 0..op.inp {
            let w0 = _mm256_loadu_ps(op.w.add(l * PANEL));
            let w1 = _mm256_loadu_ps(op.w.add(l * PANEL + 8));
            for (i, acc_i) in acc.iter_mut().enumerate() {
                let xv = _mm256_set1_ps(*x.add(i * op.ldx + l));
                acc_i[0] = _mm256_fmadd_ps(xv, w0, acc_i[0]);
                acc_i[1] = _mm256_fmadd_ps(xv, w1, acc_i[1]);
            }
        }
        let b = [_mm256_loadu_ps(op.b), _mm256_loadu_ps(op.b.add(8))];
        for (i, acc_i) in acc.iter().enumerate() {
            let y = op.y.add((r + i) * op.ldy);
            _mm256_storeu_ps(y, _mm256_add_ps(b[0], acc_i[0]));
            _mm256_storeu_ps(y.add(8), _mm256_add_ps(b[1], acc_i[1]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gemm::tests::pseudo;

    /// The definition, element by element: the same FMA chain as every kernel.
    fn chain(x: &[f32], rows: usize, inp: usize, w: &[f32], b: &[f32], out: usize) -> Vec<f32> {
        let mut y = vec![0.0f32; rows * out];
        for r in 0..rows {
            for o in 0..out {
                let mut s = 0.0f32;
                for l in 0..inp {
                    s = x[r * inp + l].mul_add(w[o * inp + l], s);
                }
                y[r * out + o] = b[o] + s;
            }
        }
        y
    }

    /// Every vector path gives the definition's bits (one FMA chain per element in order) on
    /// shapes with tails in rows (not a multiple of 12 or 6), columns (not a multiple of 32 or
    /// 16, and narrower than one panel) and the shared dimension; and it is within fp32
    /// rounding of an f64 product (1e-5 relative to the magnitude of the terms).
    #[test]
    fn packed_products_are_the_fma_chain_bit_for_bit() {
        // Miri interprets every instruction: the small shapes still cover every tail
        let shapes: &[(usize, usize, usize)] = if cfg!(miri) {
            &[(1, 1, 1), (13, 5, 45)]
        } else {
            &[
                (1, 1, 1),
                (5, 7, 3),
                (13, 19, 45),
                (50, 384, 384),
                (100, 33, 70),
            ]
        };
        for &(rows, inp, out) in shapes {
            let x = pseudo(rows * inp, 1 + rows as u64);
            let w = pseudo(out * inp, 2 + out as u64);
            let b = pseudo(out, 3);
            let mut y = vec![f32::NAN; rows * out];
            packed_linear(&x, rows, inp, &pack_panels(&w, out, inp), &b, out, &mut y);
            let want = chain(&x, rows, inp, &w, &b, out);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&y), bits(&want), "{rows} × {inp} × {out}");
            for r in 0..rows {
                for o in 0..out {
                    let (mut s, mut mag) = (b[o] as f64, b[o].abs() as f64);
                    for l in 0..inp {
                        let t = x[r * inp + l] as f64 * w[o * inp + l] as f64;
                        s += t;
                        mag += t.abs();
                    }
                    assert!((y[r * out + o] as f64 - s).abs() <= 1e-5 * mag.max(1e-30));
                }
            }
        }
    }

    /// Each instruction set this CPU has, the scalar fallback included, gives the same bits
    /// (so machines with and without AVX-512 or AVX2 agree).
    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        let (rows, inp, out) = if cfg!(miri) {
            (13, 3, 40)
        } else {
            (29, 41, 70)
        };
        let x = pseudo(rows * inp, 7);
        let w = pseudo(out * inp, 8);
        let b = pseudo(out, 9);
        let packed = pack_panels(&w, out, inp);
        let isas = match Isa::best() {
            Isa::Avx512 => vec![Isa::Avx512, Isa::Avx2, Isa::Scalar],
            Isa::Avx2 => vec![Isa::Avx2, Isa::Scalar],
            Isa::Scalar => vec![Isa::Scalar],
        };
        let want = chain(&x, rows, inp, &w, &b, out);
        for isa in isas {
            let mut y = vec![f32::NAN; rows * out];
            for p in 0..out.div_ceil(PANEL) {
                let j0 = p * PANEL;
                let op = Operands {
                    x: x.as_ptr(),
                    ldx: inp,
                    inp,
                    w: packed[p * inp * PANEL..].as_ptr(),
                    cols: (out - j0).min(PANEL),
                    b: b[j0..].as_ptr(),
                    y: y[j0..].as_mut_ptr(),
                    ldy: out,
                };
                // SAFETY: the operands cover the shapes above; `isa` is present.
                unsafe { run(isa, &op, rows) };
            }
            assert_eq!(y, want, "{isa:?}");
        }
    }
}
