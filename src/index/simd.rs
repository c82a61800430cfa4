//! Inner-product micro-kernels: one call scores a tile of `nrows` corpus rows against a *panel*
//! of query lanes.
//!
//! Layout. A panel holds `lanes` queries transposed (k-major): `panel[k * lanes + l]` is
//! component `k` of query `l`. Corpus rows are read as they are stored (row-major, stride `d`).
//! For each `k` the kernel loads the panel's lanes into registers once, broadcasts component `k`
//! of each corpus row, and does one FMA per (row, register): an outer-product GEMM micro-kernel
//! with `nrows × lanes/8` independent accumulators, no packing of the (large, memory-mapped)
//! corpus and no horizontal reductions. With 16 lanes and 6 rows that is 12 accumulators and
//! 2 + 6 loads per 12 FMAs, so the FMA units, not the loads, are the limit (the BLIS 6×16 shape).
//!
//! Arithmetic. Every score is `s = fma(q[k], c[k], s)` for `k = 0, 1, …, d-1` from `s = 0`, one
//! lane per (query, row) pair, whatever the tile shape or lane. The batch path (16 lanes) and
//! the single-query path (8 lanes, the query in lane 0) therefore produce bit-identical scores,
//! and so do all thread counts. The portable kernel (other CPUs) computes `s = s + q[k] * c[k]`
//! (separate multiply and add), also sequential in `k`; it is used for both paths together, so
//! they agree there too.
//!
//! Pre-filter. The kernel also compares the tile against one threshold per lane and reports
//! whether any score could enter a top-k (`!(s < thr)`, true for NaN); the caller inspects the
//! tile only then, which for k ≪ n is almost never.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use std::ops::Range;

/// Whether a score may enter a top-k whose threshold is `thr`: not below it, and always when
/// either is NaN (a NaN threshold means "not full yet"; a NaN score is sorted out later).
#[inline]
#[allow(clippy::neg_cmp_op_on_partial_ord)]
pub(crate) fn may_enter(score: f32, thr: f32) -> bool {
    !(score < thr)
}

/// The instruction set the kernels run with, chosen once per search.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) enum Isa {
    /// x86-64 with AVX2, FMA and F16C (Haswell / Zen and later: every CPU with the first two
    /// has the third).
    Avx2Fma,
    /// Plain Rust; the compiler vectorises the lane loop with whatever the target has.
    Portable,
}

impl Isa {
    /// Runtime detection (std caches the CPUID result, so this is cheap).
    pub(crate) fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                return Isa::Avx2Fma;
            }
        }
        Isa::Portable
    }
}

/// Query lanes of the batch kernel's panel (two 256-bit registers).
pub(crate) const BATCH_LANES: usize = 16;
/// Corpus rows per batch tile (12 accumulators + 2 query registers + 1 broadcast = 15 of 16).
pub(crate) const BATCH_ROWS: usize = 6;
/// Query lanes of the single-query kernel's panel (one register; the query sits in lane 0).
pub(crate) const ONE_LANES: usize = 8;
/// Corpus rows per single-query tile: 8 independent FMA chains cover the FMA latency, and
/// 8 interleaved row streams (with the software prefetch below) keep the memory busy.
pub(crate) const ONE_ROWS: usize = 8;

/// Scores `nrows` rows (`rows[r * d ..][.. d]`) against a panel of `lanes` queries:
/// `out[r * lanes + l] = Σ_k panel[k * lanes + l] * rows[r * d + k]` (sequential in `k`).
/// Returns whether any `out` value `s` has `!(s < thr[l])`.
///
/// The kernel also prefetches `ahead` (a hint only; may be empty), one cache line every other
/// step of `k`, which spreads those loads evenly over the tile's compute. The single-query scan
/// passes the rows two tiles ahead: the hardware prefetcher does not follow eight interleaved
/// 4-byte row streams well, and this took one core from 7 to 10.7 GB/s here. The batch scan
/// passes the next query panel during the last two tiles of each panel pass.
///
/// # Panics
/// If `lanes` is not 8 or 16, `nrows` is 0 or above the kernel's row count, or a slice is too
/// short (internal invariants of the search loops, never file data).
#[inline]
#[allow(clippy::too_many_arguments)]
pub(crate) fn tile(
    isa: Isa,
    panel: &[f32],
    lanes: usize,
    rows: &[f32],
    nrows: usize,
    d: usize,
    thr: &[f32],
    out: &mut [f32],
    ahead: &[f32],
) -> bool {
    let max_rows = match lanes {
        BATCH_LANES => BATCH_ROWS,
        ONE_LANES => ONE_ROWS,
        _ => panic!("unsupported lane count {lanes}"),
    };
    assert!(
        nrows >= 1 && nrows <= max_rows,
        "bad tile row count {nrows}"
    );
    assert!(panel.len() >= d * lanes, "panel too short");
    assert!(rows.len() >= nrows * d, "rows too short");
    assert!(thr.len() >= lanes, "thresholds too short");
    assert!(out.len() >= nrows * lanes, "output too short");
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => {
            // SAFETY: `Isa::Avx2Fma` is only produced by `Isa::detect` after checking AVX2 and
            // FMA at runtime; the asserts above cover every pointer range the kernel touches.
            unsafe {
                avx2::dispatch(
                    panel.as_ptr(),
                    lanes,
                    rows.as_ptr(),
                    nrows,
                    d,
                    thr.as_ptr(),
                    out.as_mut_ptr(),
                    ahead.as_ptr(),
                    ahead.len(),
                )
            }
        }
        _ => {
            let _ = ahead; // a hint the portable kernel has no use for
            portable(panel, lanes, rows, nrows, d, thr, out)
        }
    }
}

/// A stored element type the rows-as-lanes kernel reads: f32, or f16 / bf16 widened to f32
/// in registers as they are loaded.
pub(crate) trait Element: Copy + Send + Sync {
    fn widen(self) -> f32;
    /// Eight consecutive values as f32.
    ///
    /// # Safety
    /// `p` has 8 readable values; the CPU has AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Element for f32 {
    fn widen(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl Element for f16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }
}

impl Element for bf16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const bf16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // A bf16 is the top half of an f32.
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
            _mm_loadu_si128(p.cast()),
        )))
    }
}

/// The single-query kernel, rows as lanes: scores rows `row..row + 8` of `rows` (each `d`
/// long) against `query` into `out[r]`, and returns whether any `!(out[r] < thr)`.
///
/// Lane `r` computes `s = fma(q[k], c_r[k], s)` for `k = 0, 1, …, d-1` from `s = 0`, exactly as
/// [`tile`] does, so the scores are bit-identical to the batch path's. It loads eight values of
/// each of the eight rows, transposes the 8 × 8 block in registers and does eight FMAs with
/// `q[k]` broadcast: one useful lane per FMA in [`tile`]'s 8-lane shape becomes eight, which
/// moves the scan from FMA-bound to memory-bound. f16 and bf16 rows are widened in registers
/// as they are loaded (no scratch copy), so a half-precision store is read at half the bytes.
///
/// `ahead` (a row range, may be empty) is prefetched, spread over the tile's steps.
///
/// Returns `None` where there is no such kernel (not x86-64 with AVX2/FMA/F16C): the caller
/// uses [`tile`].
///
/// # Panics
/// If `row + 8` or `ahead` runs past `rows` or `query` is shorter than `d` (internal
/// invariants of the search loop).
#[allow(clippy::too_many_arguments)]
pub(crate) fn rows8<T: Element>(
    isa: Isa,
    query: &[f32],
    rows: &[T],
    row: usize,
    d: usize,
    ahead: Range<usize>,
    thr: f32,
    out: &mut [f32; ONE_ROWS],
) -> Option<bool> {
    assert!(query.len() >= d, "query too short");
    assert!(ahead.start <= ahead.end, "bad prefetch range");
    assert!((row + ONE_ROWS) * d <= rows.len(), "tile past the rows");
    assert!(ahead.end * d <= rows.len(), "prefetch past the rows");
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => {
            // SAFETY: `Isa::Avx2Fma` is only produced by `Isa::detect` after checking AVX2, FMA
            // and F16C; the asserts cover the 8 rows read and the prefetch range, `query` has
            // `d` values and `out` has 8.
            Some(unsafe {
                avx2::rows8(
                    query.as_ptr(),
                    rows.as_ptr().add(row * d),
                    d,
                    rows.as_ptr().add(ahead.start * d),
                    ahead.len() * d,
                    thr,
                    out.as_mut_ptr(),
                )
            })
        }
        _ => {
            let _ = (thr, out);
            None
        }
    }
}

/// f16 → f32 (exact). With F16C, 8 values per instruction straight from memory: the f16 scan
/// converts each chunk before scoring it, and this keeps the conversion far below the memory
/// time (half's generic slice converter goes through a call per 8 values).
pub(crate) fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "conversion lengths differ");
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx") && is_x86_feature_detected!("f16c") {
            // SAFETY: AVX and F16C checked at runtime; the slices have equal lengths.
            unsafe { convert::f16_to_f32(src, dst) };
            return;
        }
    }
    src.convert_to_f32_slice(dst);
}

/// bf16 → f32 (exact: a bf16 is the top half of an f32). AVX2 widens 8 values at a time.
pub(crate) fn bf16_to_f32(src: &[bf16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "conversion lengths differ");
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 checked at runtime; the slices have equal lengths.
            unsafe { convert::bf16_to_f32(src, dst) };
            return;
        }
    }
    src.convert_to_f32_slice(dst);
}

#[cfg(target_arch = "x86_64")]
mod convert {
    use half::{bf16, f16};
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX and F16C available; `src.len() == dst.len()`.
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
        let n = src.len();
        let s = src.as_ptr() as *const __m128i;
        let d = dst.as_mut_ptr();
        let mut i = 0;
        while i + 8 <= n {
            let h = _mm_loadu_si128(s.cast::<u8>().add(2 * i).cast());
            _mm256_storeu_ps(d.add(i), _mm256_cvtph_ps(h));
            i += 8;
        }
        for j in i..n {
            dst[j] = src[j].to_f32();
        }
    }

    /// # Safety
    /// AVX2 available; `src.len() == dst.len()`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn bf16_to_f32(src: &[bf16], dst: &mut [f32]) {
        let n = src.len();
        let s = src.as_ptr() as *const u8;
        let d = dst.as_mut_ptr();
        let mut i = 0;
        while i + 8 <= n {
            let h = _mm_loadu_si128(s.add(2 * i).cast());
            let w = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h));
            _mm256_storeu_ps(d.add(i), _mm256_castsi256_ps(w));
            i += 8;
        }
        for j in i..n {
            dst[j] = src[j].to_f32();
        }
    }
}

/// Reference semantics of [`tile`] without intrinsics. `acc + q * c` (never `mul_add`: Rust does
/// not contract it, so the result is the same on every target).
fn portable(
    panel: &[f32],
    lanes: usize,
    rows: &[f32],
    nrows: usize,
    d: usize,
    thr: &[f32],
    out: &mut [f32],
) -> bool {
    let mut any = false;
    for r in 0..nrows {
        let row = &rows[r * d..(r + 1) * d];
        let acc = &mut out[r * lanes..(r + 1) * lanes];
        acc.fill(0.0);
        for (&c, p) in row.iter().zip(panel.chunks_exact(lanes)) {
            for (a, &q) in acc.iter_mut().zip(p) {
                *a += q * c;
            }
        }
        for (&s, &t) in acc.iter().zip(thr) {
            any |= may_enter(s, t);
        }
    }
    any
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// The micro-kernel for `R` rows and `W` registers (8 lanes each) of queries; with `PF` it
    /// also prefetches `ahead[..ahead_len]`, one line every other `k`.
    ///
    /// # Safety
    /// The CPU supports AVX2 and FMA; `panel` has `d * 8 * W` readable floats, `rows` has
    /// `(R - 1) * d + d` readable floats, `thr` has `8 * W`, `out` has `R * 8 * W` writable;
    /// `ahead` has `ahead_len` floats (prefetching never faults, but the pointer arithmetic must
    /// stay in bounds).
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel<const R: usize, const W: usize, const PF: bool>(
        panel: *const f32,
        rows: *const f32,
        d: usize,
        thr: *const f32,
        out: *mut f32,
        ahead: *const f32,
        ahead_len: usize,
    ) -> bool {
        let mut acc = [[_mm256_setzero_ps(); W]; R];
        let mut p = panel;
        let mut c = rows;
        let mut pf = 0usize;
        for k in 0..d {
            if PF && k % 2 == 0 && pf < ahead_len {
                _mm_prefetch::<_MM_HINT_T0>(ahead.add(pf) as *const i8);
                pf += 16;
            }
            let mut q = [_mm256_setzero_ps(); W];
            for (w, qw) in q.iter_mut().enumerate() {
                *qw = _mm256_loadu_ps(p.add(8 * w));
            }
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let b = _mm256_broadcast_ss(&*c.add(r * d));
                for w in 0..W {
                    acc_r[w] = _mm256_fmadd_ps(q[w], b, acc_r[w]);
                }
            }
            p = p.add(8 * W);
            c = c.add(1);
        }
        let mut any = _mm256_setzero_ps();
        for w in 0..W {
            let t = _mm256_loadu_ps(thr.add(8 * w));
            for (r, acc_r) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.add(r * 8 * W + 8 * w), acc_r[w]);
                // !(s < t), true for NaN: the same test as the scalar code.
                any = _mm256_or_ps(any, _mm256_cmp_ps::<_CMP_NLT_UQ>(acc_r[w], t));
            }
        }
        _mm256_movemask_ps(any) != 0
    }

    /// Transposes an 8 × 8 block: afterwards `v[j]` lane `r` is what `v[r]` lane `j` was.
    #[inline(always)]
    unsafe fn transpose8(v: &mut [__m256; 8]) {
        let t0 = _mm256_unpacklo_ps(v[0], v[1]);
        let t1 = _mm256_unpackhi_ps(v[0], v[1]);
        let t2 = _mm256_unpacklo_ps(v[2], v[3]);
        let t3 = _mm256_unpackhi_ps(v[2], v[3]);
        let t4 = _mm256_unpacklo_ps(v[4], v[5]);
        let t5 = _mm256_unpackhi_ps(v[4], v[5]);
        let t6 = _mm256_unpacklo_ps(v[6], v[7]);
        let t7 = _mm256_unpackhi_ps(v[6], v[7]);
        let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        v[0] = _mm256_permute2f128_ps::<0x20>(s0, s4);
        v[1] = _mm256_permute2f128_ps::<0x20>(s1, s5);
        v[2] = _mm256_permute2f128_ps::<0x20>(s2, s6);
        v[3] = _mm256_permute2f128_ps::<0x20>(s3, s7);
        v[4] = _mm256_permute2f128_ps::<0x31>(s0, s4);
        v[5] = _mm256_permute2f128_ps::<0x31>(s1, s5);
        v[6] = _mm256_permute2f128_ps::<0x31>(s2, s6);
        v[7] = _mm256_permute2f128_ps::<0x31>(s3, s7);
    }

    /// The rows-as-lanes kernel (see [`super::rows8`]).
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `q` has `d` readable floats, `c` has `8 * d` readable
    /// values (8 rows of stride `d`), `pf` has `pf_len`, `out` has 8 writable floats.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn rows8<T: super::Element>(
        q: *const f32,
        c: *const T,
        d: usize,
        pf: *const T,
        pf_len: usize,
        thr: f32,
        out: *mut f32,
    ) -> bool {
        let line = 64 / std::mem::size_of::<T>();
        // Each step of 8 consumes 64 values, i.e. size_of::<T>() cache lines: prefetch as many.
        let lines_per_step = std::mem::size_of::<T>();
        let mut pfo = 0usize;
        let mut acc = _mm256_setzero_ps();
        let d8 = d - d % 8;
        let mut k = 0;
        while k < d8 {
            for _ in 0..lines_per_step {
                if pfo < pf_len {
                    _mm_prefetch::<_MM_HINT_T0>(pf.add(pfo).cast());
                    pfo += line;
                }
            }
            let mut v = [_mm256_setzero_ps(); 8];
            for (r, vr) in v.iter_mut().enumerate() {
                *vr = T::load8(c.add(r * d + k));
            }
            transpose8(&mut v);
            for (j, vj) in v.iter().enumerate() {
                acc = _mm256_fmadd_ps(_mm256_broadcast_ss(&*q.add(k + j)), *vj, acc);
            }
            k += 8;
        }
        for k in d8..d {
            let at = |r: usize| (*c.add(r * d + k)).widen();
            let v = _mm256_setr_ps(at(0), at(1), at(2), at(3), at(4), at(5), at(6), at(7));
            acc = _mm256_fmadd_ps(_mm256_broadcast_ss(&*q.add(k)), v, acc);
        }
        _mm256_storeu_ps(out, acc);
        // !(s < t), true for NaN: the same test as the scalar code.
        let any = _mm256_cmp_ps::<_CMP_NLT_UQ>(acc, _mm256_set1_ps(thr));
        _mm256_movemask_ps(any) != 0
    }

    /// Picks the monomorphised kernel for (lanes, nrows).
    ///
    /// # Safety
    /// As for [`kernel`], with `lanes = 8 * W` and `nrows = R`; `(lanes, nrows)` must be one of
    /// the listed shapes (checked by the caller).
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn dispatch(
        panel: *const f32,
        lanes: usize,
        rows: *const f32,
        nrows: usize,
        d: usize,
        thr: *const f32,
        out: *mut f32,
        ahead: *const f32,
        ahead_len: usize,
    ) -> bool {
        macro_rules! go {
            ($r:literal, 2) => {
                kernel::<$r, 2, true>(panel, rows, d, thr, out, ahead, ahead_len)
            };
            ($r:literal, 1) => {
                kernel::<$r, 1, true>(panel, rows, d, thr, out, ahead, ahead_len)
            };
        }
        match (lanes, nrows) {
            (16, 6) => go!(6, 2),
            (16, 5) => go!(5, 2),
            (16, 4) => go!(4, 2),
            (16, 3) => go!(3, 2),
            (16, 2) => go!(2, 2),
            (16, 1) => go!(1, 2),
            (8, 8) => go!(8, 1),
            (8, 7) => go!(7, 1),
            (8, 6) => go!(6, 1),
            (8, 5) => go!(5, 1),
            (8, 4) => go!(4, 1),
            (8, 3) => go!(3, 1),
            (8, 2) => go!(2, 1),
            (8, 1) => go!(1, 1),
            _ => unreachable!("tile shape checked by the caller"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2_654_435_761).max(1);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// Every shape of both kernels against an f64 dot product; the AVX2 kernel's lane 0 of the
    /// 8-lane panel must equal the matching lane of the 16-lane panel bit for bit.
    #[test]
    fn kernels_match_reference_and_each_other() {
        // Miri interprets every instruction: the long rows add time, not cases.
        let dims: &[usize] = if cfg!(miri) {
            &[1, 7, 33]
        } else {
            &[1, 7, 8, 33, 384]
        };
        for &d in dims {
            let queries = data(16 * d, d as u32);
            let rows = data(8 * d, 7 + d as u32);
            let mut panel16 = vec![0f32; d * 16];
            for l in 0..16 {
                for k in 0..d {
                    panel16[k * 16 + l] = queries[l * d + k];
                }
            }
            for isa in [Isa::detect(), Isa::Portable] {
                for l0 in [0usize, 5, 15] {
                    let mut panel8 = vec![0f32; d * 8];
                    for k in 0..d {
                        panel8[k * 8] = queries[l0 * d + k];
                    }
                    for nrows in 1..=8 {
                        let mut out8 = vec![0f32; nrows * 8];
                        let thr8 = [f32::INFINITY; 8];
                        tile(isa, &panel8, 8, &rows, nrows, d, &thr8, &mut out8, &rows);
                        if nrows <= 6 {
                            let mut out16 = vec![0f32; nrows * 16];
                            let thr16 = [f32::INFINITY; 16];
                            let any =
                                tile(isa, &panel16, 16, &rows, nrows, d, &thr16, &mut out16, &[]);
                            assert!(!any);
                            for r in 0..nrows {
                                assert_eq!(out16[r * 16 + l0].to_bits(), out8[r * 8].to_bits());
                            }
                        }
                        for r in 0..nrows {
                            let exact: f64 = (0..d)
                                .map(|k| queries[l0 * d + k] as f64 * rows[r * d + k] as f64)
                                .sum();
                            let bound: f64 = (0..d)
                                .map(|k| {
                                    (queries[l0 * d + k] as f64 * rows[r * d + k] as f64).abs()
                                })
                                .sum::<f64>()
                                * d as f64
                                * f32::EPSILON as f64;
                            let got = out8[r * 8] as f64;
                            assert!((got - exact).abs() <= bound, "{isa:?} d={d} r={r}");
                        }
                    }
                }
            }
        }
    }

    /// The rows-as-lanes kernel gives, for every stored type, the tile kernel's scores bit for
    /// bit (on the rows widened to f32), and the same threshold answer.
    #[test]
    fn rows_as_lanes_match_the_tile_kernel() {
        let isa = Isa::detect();
        let dims: &[usize] = if cfg!(miri) {
            &[1, 9]
        } else {
            &[1, 7, 8, 13, 384]
        };
        for &d in dims {
            let q = data(d, 3 + d as u32);
            let mut panel8 = vec![0f32; d * 8];
            for k in 0..d {
                panel8[k * 8] = q[k];
            }
            let raw: Vec<f32> = data(11 * d, 5 + d as u32);
            let h: Vec<f16> = raw.iter().map(|&x| f16::from_f32(x)).collect();
            let b: Vec<bf16> = raw.iter().map(|&x| bf16::from_f32(x)).collect();
            check_rows8(isa, "f32", &q, &panel8, &raw, d);
            check_rows8(isa, "f16", &q, &panel8, &h, d);
            check_rows8(isa, "bf16", &q, &panel8, &b, d);
        }
    }

    fn check_rows8<T: Element>(
        isa: Isa,
        name: &str,
        q: &[f32],
        panel8: &[f32],
        rows: &[T],
        d: usize,
    ) {
        let wide: Vec<f32> = rows.iter().map(|&v| v.widen()).collect();
        for row in [0usize, 3] {
            let mut want = vec![0f32; 64];
            tile(
                isa,
                panel8,
                8,
                &wide[row * d..],
                8,
                d,
                &[f32::INFINITY; 8],
                &mut want,
                &[],
            );
            let mut got = [0f32; 8];
            let Some(any) = rows8(isa, q, rows, row, d, 0..11, f32::INFINITY, &mut got) else {
                assert_eq!(isa, Isa::Portable, "no rows-as-lanes kernel on {isa:?}");
                return;
            };
            assert!(!any);
            for r in 0..8 {
                assert_eq!(
                    got[r].to_bits(),
                    want[r * 8].to_bits(),
                    "{name} d={d} row {r}"
                );
            }
            let max = got.iter().cloned().fold(f32::MIN, f32::max);
            let mut pass = |t: f32| rows8(isa, q, rows, row, d, 3..3, t, &mut got);
            assert_eq!(pass(max), Some(true), "ties pass");
            assert_eq!(pass(f32::NAN), Some(true), "a NaN threshold passes all");
            assert_eq!(pass(max + 1.0), Some(false));
        }
    }

    #[test]
    fn conversions_are_exact() {
        let vals: Vec<f32> = data(1003, 9).iter().map(|x| x * 300.0).collect();
        let h: Vec<f16> = vals.iter().map(|&x| f16::from_f32(x)).collect();
        let b: Vec<bf16> = vals.iter().map(|&x| bf16::from_f32(x)).collect();
        let mut out = vec![0f32; vals.len()];
        f16_to_f32(&h, &mut out);
        assert!(h
            .iter()
            .zip(&out)
            .all(|(h, o)| h.to_f32().to_bits() == o.to_bits()));
        bf16_to_f32(&b, &mut out);
        assert!(b
            .iter()
            .zip(&out)
            .all(|(b, o)| b.to_f32().to_bits() == o.to_bits()));
    }

    #[test]
    fn prefilter_reports_candidates() {
        let d = 8;
        let panel = vec![1f32; d * 16];
        let rows = vec![1f32; d];
        let mut out = vec![0f32; 16];
        for isa in [Isa::detect(), Isa::Portable] {
            let mut thr = [9f32; 16];
            assert!(!tile(isa, &panel, 16, &rows, 1, d, &thr, &mut out, &[]));
            thr[3] = 8.0; // ties pass
            assert!(tile(isa, &panel, 16, &rows, 1, d, &thr, &mut out, &[]));
            thr[3] = f32::NAN; // NaN threshold: everything passes
            assert!(tile(isa, &panel, 16, &rows, 1, d, &thr, &mut out, &[]));
        }
    }
}
