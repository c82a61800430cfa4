//! Exact top-k by inner product on the CPU.
//!
//! Two entry points share one selection and one arithmetic (see the private `simd` module):
//!
//! * [`search_batch`]: many queries. Queries are packed into 16-lane panels; the corpus is split
//!   into one contiguous shard per rayon thread and each shard is walked in 192 KiB blocks
//!   copied (f32) or converted (f16/bf16) into an f32 scratch that stays in L2 (the sequential
//!   copy streams at full bandwidth; scoring straight from the corpus measured ~1.5× slower).
//!   For every block, every panel runs the 6×16 GEMM micro-kernel over the block's rows, so
//!   each corpus byte comes from memory once and the work is FMA-bound (the kernel alone runs
//!   at ~95% of the FMA peak here; the whole search at ~75% on two threads).
//! * [`search_one`]: one query. Rows are split across threads and streamed once through the
//!   8-lane kernel (8 rows, 8 independent accumulators, software prefetch two tiles ahead);
//!   the cost is the memory bandwidth.
//!
//! Selection keeps, per query and shard, a buffer of candidates that reached a running threshold
//! (the k-th best score seen so far); when it holds `k + max(k, 64)` it is cut back to k with
//! `select_nth_unstable_by`, which raises the threshold. The kernel tests whole tiles against
//! the thresholds in SIMD, so for k ≪ n almost no score is looked at individually.
//!
//! Order: score descending (NaN last), then corpus position ascending ([`hit_order`]). That is
//! a total order, and a score does not depend on how the work was split, so the results are
//! identical for every thread count and for both entry points.

use super::simd::{self, may_enter, Isa, BATCH_LANES, BATCH_ROWS, ONE_LANES, ONE_ROWS};
use super::vectors::{Corpus, Vectors};
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::cmp::Ordering;
use std::ops::Range;

/// One search result: position of the document in the corpus and its inner product with the
/// query (the cosine similarity when both are unit vectors).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub index: usize,
    pub score: f32,
}

/// The result order: score descending with NaN last, then index ascending.
pub fn hit_order(a: &Hit, b: &Hit) -> Ordering {
    let by_score = match (a.score.is_nan(), b.score.is_nan()) {
        (false, false) => b.score.partial_cmp(&a.score).unwrap_or(Ordering::Equal),
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (true, true) => Ordering::Equal,
    };
    by_score.then(a.index.cmp(&b.index))
}

/// A candidate packed into one integer whose ascending order is [`hit_order`]: the high 32 bits
/// hold the score mapped to an order-reversing integer (NaN last, -0.0 equal to 0.0), the low
/// 32 bits the corpus position. Selection and sorting then compare plain `u64`s, which is
/// several times faster than a float comparator and halves the candidate memory; it limits a
/// corpus to 2³² rows (checked by the searches).
#[inline]
fn pack(score: f32, index: u32) -> u64 {
    let s = score + 0.0; // turns -0.0 into +0.0, so the two zeros tie as in `hit_order`
    let bits = s.to_bits();
    let ascending = if s.is_nan() {
        0
    } else if bits >> 31 == 1 {
        !bits
    } else {
        bits | 0x8000_0000
    };
    (u64::from(!ascending) << 32) | u64::from(index)
}

/// Inverse of [`pack`] (a -0.0 score comes back as 0.0, a NaN as the canonical NaN).
#[inline]
fn unpack(key: u64) -> Hit {
    let ascending = !((key >> 32) as u32);
    let score = if ascending == 0 {
        f32::NAN
    } else if ascending >> 31 == 1 {
        f32::from_bits(ascending & 0x7FFF_FFFF)
    } else {
        f32::from_bits(!ascending)
    };
    Hit {
        index: (key & 0xFFFF_FFFF) as usize,
        score,
    }
}

/// Streaming exact top-k selector for one query and one shard: candidates below the threshold
/// are rejected with one comparison, the rest are buffered as packed keys and the buffer is cut
/// back to k with `select_nth_unstable` when it holds `k + max(k, 64)`. Amortised O(1) per
/// candidate, in any arrival order.
#[derive(Debug, Clone)]
struct TopK {
    k: usize,
    cap: usize,
    buf: Vec<u64>,
    thr: f32,
}

impl TopK {
    fn new(k: usize) -> Self {
        TopK {
            k: k.max(1),
            cap: Self::capacity_for(k),
            buf: Vec::new(),
            thr: f32::NAN,
        }
    }

    /// Most candidates held at once for a given k.
    fn capacity_for(k: usize) -> usize {
        k.max(1) + k.max(64)
    }

    /// A score strictly below this can no longer enter the top k. NaN while fewer than k
    /// candidates have been kept (every comparison with NaN lets the candidate in).
    #[inline]
    fn threshold(&self) -> f32 {
        self.thr
    }

    /// Offers row `index` (< 2³²) with `score`. Ties with the threshold are kept: they may win
    /// on index.
    #[inline]
    fn push(&mut self, index: usize, score: f32) {
        if may_enter(score, self.thr) {
            self.buf.push(pack(score, index as u32));
            if self.buf.len() >= self.cap {
                self.buf.select_nth_unstable(self.k - 1);
                self.buf.truncate(self.k);
                self.thr = unpack(self.buf[self.k - 1]).score;
            }
        }
    }

    /// Empties the selector for a new search with `k`, keeping its memory.
    fn reset(&mut self, k: usize) {
        self.k = k.max(1);
        self.cap = Self::capacity_for(k);
        self.buf.clear();
        self.thr = f32::NAN;
    }

    /// The k best keys, best first, in place.
    fn finish(&mut self) -> &[u64] {
        self.buf.sort_unstable();
        self.buf.truncate(self.k);
        &self.buf
    }

    /// The k best keys, best first.
    fn into_sorted(mut self) -> Vec<u64> {
        self.finish();
        self.buf
    }
}

/// Merges per-shard sorted keys into the final k hits.
fn merge(parts: &[&[u64]], k: usize) -> Vec<Hit> {
    let (mut all, mut out) = (Vec::new(), Vec::new());
    merge_into(parts.iter().copied(), k, &mut all, &mut out);
    out
}

/// [`merge`] into `out` (cleared first), with `all` as working memory.
fn merge_into<'p>(
    parts: impl Iterator<Item = &'p [u64]>,
    k: usize,
    all: &mut Vec<u64>,
    out: &mut Vec<Hit>,
) {
    all.clear();
    for p in parts {
        all.extend_from_slice(p);
    }
    if all.len() > k {
        all.select_nth_unstable(k - 1);
        all.truncate(k);
    }
    all.sort_unstable();
    out.clear();
    out.extend(all.iter().map(|&key| unpack(key)));
}

/// Candidate memory allowed per batch of queries; more queries than fit are run in sequence.
const CANDIDATE_BUDGET: usize = 256 << 20;
/// Bytes of corpus rows per block in the batch path: stays in L2 while every panel passes over.
const BLOCK_BYTES: usize = 192 << 10;
/// Fewer rows than this per thread are not worth a separate corpus shard.
const MIN_SHARD_ROWS: usize = 2048;
/// How far ahead of its tile the single-query scan prefetches.
const PREFETCH_ROWS: usize = 2 * ONE_ROWS;
/// Rows converted at once in the single-query path for f16/bf16: the f32 copy stays in L1.
const ONE_CHUNK_ROWS: usize = 2 * ONE_ROWS;

/// Exact top-k for a batch of queries (`queries` is `nq × dim`, row-major). Returns one list per
/// query, each `min(k, corpus.len())` hits in [`hit_order`].
///
/// Errors (`Error::InvalidArgument`): k = 0, a corpus with dimension 0 or a ragged length, a
/// query length that is not a multiple of the corpus dimension, a NaN or infinite query value.
pub fn search_batch(corpus: &Corpus, queries: &[f32], k: usize) -> Result<Vec<Vec<Hit>>> {
    search_batch_with(Isa::detect(), corpus, queries, k)
}

/// Exact top-k for one query of `corpus.dim` values; same order and errors as [`search_batch`],
/// and the same hits and scores bit for bit.
pub fn search_one(corpus: &Corpus, query: &[f32], k: usize) -> Result<Vec<Hit>> {
    search_one_with(Isa::detect(), corpus, query, k)
}

fn check_common(corpus: &Corpus, queries: &[f32], k: usize) -> Result<()> {
    if k == 0 {
        return Err(Error::InvalidArgument("k must be at least 1".into()));
    }
    corpus.validate()?;
    if corpus.len() > u32::MAX as usize {
        return Err(Error::InvalidArgument(format!(
            "a corpus of {} rows is beyond the 2^32 rows exact search supports",
            corpus.len()
        )));
    }
    if let Some(i) = queries.iter().position(|x| !x.is_finite()) {
        return Err(Error::InvalidArgument(format!(
            "query {} has a non-finite value ({}) at position {}",
            i / corpus.dim,
            queries[i],
            i % corpus.dim
        )));
    }
    Ok(())
}

pub(crate) fn search_batch_with(
    isa: Isa,
    corpus: &Corpus,
    queries: &[f32],
    k: usize,
) -> Result<Vec<Vec<Hit>>> {
    check_common(corpus, queries, k)?;
    let d = corpus.dim;
    if !queries.len().is_multiple_of(d) {
        return Err(Error::InvalidArgument(format!(
            "queries have {} values, not a multiple of the corpus dimension {d}",
            queries.len()
        )));
    }
    let nq = queries.len() / d;
    let n = corpus.len();
    if nq == 0 {
        return Ok(Vec::new());
    }
    if n == 0 {
        return Ok(vec![Vec::new(); nq]);
    }
    let k = k.min(n);
    let threads = rayon::current_num_threads().max(1);
    let row_shards = (n / MIN_SHARD_ROWS).clamp(1, threads);
    let per_query = row_shards * TopK::capacity_for(k) * std::mem::size_of::<u64>();
    let chunk = (CANDIDATE_BUDGET / per_query / BATCH_LANES).max(1) * BATCH_LANES;
    let mut results = Vec::with_capacity(nq);
    for qs in queries.chunks(chunk * d) {
        results.extend(batch_chunk(isa, corpus, qs, k, row_shards, threads));
    }
    Ok(results)
}

/// Queries transposed into k-major panels of `lanes` (zero-padded), 64-byte aligned so each
/// 16-lane step is exactly one cache line.
struct Panels {
    buf: Vec<f32>,
    off: usize,
    lanes: usize,
    d: usize,
    count: usize,
}

impl Panels {
    fn pack(queries: &[f32], d: usize, lanes: usize) -> Panels {
        let nq = queries.len() / d;
        let count = nq.div_ceil(lanes);
        let len = count * lanes * d;
        let buf = vec![0f32; len + 16];
        let off = buf.as_ptr().align_offset(64).min(16);
        let mut p = Panels {
            buf,
            off,
            lanes,
            d,
            count,
        };
        let data = &mut p.buf[off..off + len];
        for (qi, q) in queries.chunks_exact(d).enumerate() {
            let base = (qi / lanes) * lanes * d + qi % lanes;
            for (k, &x) in q.iter().enumerate() {
                data[base + k * lanes] = x;
            }
        }
        p
    }

    fn panel(&self, i: usize) -> &[f32] {
        let len = self.lanes * self.d;
        &self.buf[self.off + i * len..self.off + (i + 1) * len]
    }
}

/// Rows `range` of the corpus as f32: borrowed when stored as f32, else converted into `scratch`.
fn rows_f32<'s>(
    vectors: &'s Vectors<'_>,
    d: usize,
    range: Range<usize>,
    scratch: &'s mut Vec<f32>,
) -> &'s [f32] {
    match vectors {
        Vectors::F32(v) => &v[range.start * d..range.end * d],
        other => {
            scratch.resize(range.len() * d, 0.0);
            other.to_f32(range.start * d, scratch);
            scratch
        }
    }
}

/// Splits `0..n` into `parts` contiguous ranges of near-equal length.
fn split(n: usize, parts: usize) -> Vec<Range<usize>> {
    let parts = parts.max(1);
    (0..parts)
        .map(|i| (i * n / parts)..((i + 1) * n / parts))
        .collect()
}

fn batch_chunk(
    isa: Isa,
    corpus: &Corpus,
    queries: &[f32],
    k: usize,
    row_shards: usize,
    threads: usize,
) -> Vec<Vec<Hit>> {
    let d = corpus.dim;
    let nq = queries.len() / d;
    let panels = Panels::pack(queries, d, BATCH_LANES);
    // With fewer corpus shards than threads (small corpus), split the queries as well.
    let panel_groups = threads.div_ceil(row_shards).clamp(1, panels.count);
    let groups = split(panels.count, panel_groups);
    let shards = split(corpus.len(), row_shards);
    let items: Vec<(Range<usize>, Range<usize>)> = groups
        .iter()
        .flat_map(|g| shards.iter().map(move |s| (g.clone(), s.clone())))
        .collect();
    let partial: Vec<Vec<Vec<u64>>> = items
        .par_iter()
        .map(|(g, s)| scan_batch(isa, corpus, s.clone(), &panels, g.clone(), nq, k))
        .collect();
    (0..nq)
        .into_par_iter()
        .map(|q| {
            let g = groups
                .iter()
                .position(|g| q < g.end * BATCH_LANES)
                .unwrap_or(0);
            let local = q - groups[g].start * BATCH_LANES;
            let parts: Vec<&[u64]> = (0..row_shards)
                .map(|s| &partial[g * row_shards + s][local][..])
                .collect();
            merge(&parts, k)
        })
        .collect()
}

/// One work item of the batch path: corpus rows `rows` against panels `group`.
fn scan_batch(
    isa: Isa,
    corpus: &Corpus,
    rows: Range<usize>,
    panels: &Panels,
    group: Range<usize>,
    nq: usize,
    k: usize,
) -> Vec<Vec<u64>> {
    let d = corpus.dim;
    let q0 = group.start * BATCH_LANES;
    let q1 = (group.end * BATCH_LANES).min(nq);
    let mut tops: Vec<TopK> = (q0..q1).map(|_| TopK::new(k)).collect();
    // Padding lanes get +inf so they never pass the pre-filter (finite scores).
    let mut thr = vec![f32::INFINITY; group.len() * BATCH_LANES];
    for (t, top) in thr.iter_mut().zip(&tops) {
        *t = top.threshold();
    }
    let block = (BLOCK_BYTES / (4 * d) / BATCH_ROWS).max(1) * BATCH_ROWS;
    let mut scratch = Vec::new();
    let mut out = [0f32; BATCH_ROWS * BATCH_LANES];
    let mut start = rows.start;
    while start < rows.end {
        let end = (start + block).min(rows.end);
        scratch.resize((end - start) * d, 0.0);
        corpus.vectors.to_f32(start * d, &mut scratch);
        let data = &scratch[..];
        let tiles = (end - start).div_ceil(BATCH_ROWS);
        for (pi, p) in group.clone().enumerate() {
            let panel = panels.panel(p);
            // The last two tiles fetch the next panel (each half of it) into cache.
            let next = panels.panel(if p + 1 < group.end {
                p + 1
            } else {
                group.start
            });
            let t = &mut thr[pi * BATCH_LANES..(pi + 1) * BATCH_LANES];
            let mut r = 0;
            while r < end - start {
                let nr = BATCH_ROWS.min(end - start - r);
                let tile_rows = &data[r * d..(r + nr) * d];
                let tile = r / BATCH_ROWS;
                let half = next.len() / 2;
                let ahead: &[f32] = if tile + 2 == tiles {
                    &next[..half]
                } else if tile + 1 == tiles {
                    &next[half..]
                } else {
                    &[]
                };
                if simd::tile(
                    isa,
                    panel,
                    BATCH_LANES,
                    tile_rows,
                    nr,
                    d,
                    t,
                    &mut out,
                    ahead,
                ) {
                    for rr in 0..nr {
                        for l in 0..BATCH_LANES {
                            let s = out[rr * BATCH_LANES + l];
                            if may_enter(s, t[l]) {
                                if let Some(top) = tops.get_mut(pi * BATCH_LANES + l) {
                                    top.push(start + r + rr, s);
                                    t[l] = top.threshold();
                                }
                            }
                        }
                    }
                }
                r += nr;
            }
        }
        start = end;
    }
    tops.into_iter().map(TopK::into_sorted).collect()
}

pub(crate) fn search_one_with(
    isa: Isa,
    corpus: &Corpus,
    query: &[f32],
    k: usize,
) -> Result<Vec<Hit>> {
    let mut out = Vec::new();
    search_one_into_with(
        isa,
        corpus,
        query,
        k,
        &mut OneQueryScratch::default(),
        &mut out,
    )?;
    Ok(out)
}

/// Reusable memory of [`search_one_into`]: the query panel, one selector per corpus shard and
/// the merge buffer. Once a search of the same shape has grown it, a search allocates nothing.
#[derive(Debug, Default)]
pub struct OneQueryScratch {
    panel: Vec<f32>,
    shards: Vec<ShardScratch>,
    all: Vec<u64>,
}

#[derive(Debug)]
struct ShardScratch {
    top: TopK,
    /// f16/bf16 rows widened for the tile kernel.
    rows: Vec<f32>,
}

/// [`search_one`] into `out` (cleared first), with reused working memory: the serving path.
pub fn search_one_into(
    corpus: &Corpus,
    query: &[f32],
    k: usize,
    scratch: &mut OneQueryScratch,
    out: &mut Vec<Hit>,
) -> Result<()> {
    search_one_into_with(Isa::detect(), corpus, query, k, scratch, out)
}

fn search_one_into_with(
    isa: Isa,
    corpus: &Corpus,
    query: &[f32],
    k: usize,
    scratch: &mut OneQueryScratch,
    out: &mut Vec<Hit>,
) -> Result<()> {
    out.clear();
    check_common(corpus, query, k)?;
    if query.len() != corpus.dim {
        return Err(Error::InvalidArgument(format!(
            "query has dimension {}, the corpus has dimension {}",
            query.len(),
            corpus.dim
        )));
    }
    let n = corpus.len();
    if n == 0 {
        return Ok(());
    }
    let k = k.min(n);
    let d = corpus.dim;
    // The 8-lane panel of the tile kernel (query in lane 0), for the rows the rows-as-lanes
    // kernel does not take.
    scratch.panel.clear();
    scratch.panel.resize(d * ONE_LANES, 0.0);
    for (kk, &x) in query.iter().enumerate() {
        scratch.panel[kk * ONE_LANES] = x;
    }
    let threads = rayon::current_num_threads().max(1);
    let parts = (n / MIN_SHARD_ROWS).clamp(1, threads);
    if scratch.shards.len() < parts {
        scratch.shards.resize_with(parts, || ShardScratch {
            top: TopK::new(k),
            rows: Vec::new(),
        });
    }
    let panel = &scratch.panel;
    let shard = |(i, sh): (usize, &mut ShardScratch)| {
        sh.top.reset(k);
        let rows = (i * n / parts)..((i + 1) * n / parts);
        scan_one(isa, corpus, rows, query, panel, sh);
    };
    if parts == 1 {
        shard((0, &mut scratch.shards[0])); // no trip through the thread pool
    } else {
        scratch.shards[..parts]
            .par_iter_mut()
            .enumerate()
            .for_each(shard);
    }
    let parts = scratch.shards[..parts]
        .iter_mut()
        .map(|sh| sh.top.finish() as &[u64]);
    merge_into(parts, k, &mut scratch.all, out);
    Ok(())
}

/// One shard of the single-query path: groups of 8 rows through the rows-as-lanes kernel
/// where the CPU has it, the rest (the last < 8 rows, or everything on other CPUs) through the
/// 8-lane tile kernel with the query in lane 0. Both compute the same scores.
fn scan_one(
    isa: Isa,
    corpus: &Corpus,
    rows: Range<usize>,
    query: &[f32],
    panel: &[f32],
    sh: &mut ShardScratch,
) {
    let d = corpus.dim;
    let top = &mut sh.top;
    let mut out = [0f32; ONE_ROWS * ONE_LANES];
    let start = match corpus.vectors {
        Vectors::F32(v) => rows_as_lanes(isa, query, v, d, rows.clone(), top),
        Vectors::F16(v) => rows_as_lanes(isa, query, v, d, rows.clone(), top),
        Vectors::Bf16(v) => rows_as_lanes(isa, query, v, d, rows.clone(), top),
    };
    // The rest through the tile kernel, which compares lane 0 with the running threshold.
    let mut thr = [f32::INFINITY; ONE_LANES];
    thr[0] = top.threshold();
    let rows = start..rows.end;
    let chunk = match corpus.vectors {
        Vectors::F32(_) => rows.len(),
        _ => ONE_CHUNK_ROWS,
    };
    let mut start = rows.start;
    while start < rows.end {
        let end = (start + chunk).min(rows.end);
        let data = rows_f32(&corpus.vectors, d, start..end, &mut sh.rows);
        let mut r = 0;
        while r < end - start {
            let nr = ONE_ROWS.min(end - start - r);
            let ahead = (r + PREFETCH_ROWS).min(end - start);
            let ahead_end = (ahead + ONE_ROWS).min(end - start);
            let tile_rows = &data[r * d..(r + nr) * d];
            let ahead = &data[ahead * d..ahead_end * d];
            if simd::tile(
                isa, panel, ONE_LANES, tile_rows, nr, d, &thr, &mut out, ahead,
            ) {
                for rr in 0..nr {
                    let s = out[rr * ONE_LANES];
                    if may_enter(s, thr[0]) {
                        top.push(start + r + rr, s);
                        thr[0] = top.threshold();
                    }
                }
            }
            r += nr;
        }
        start = end;
    }
}

/// Whole groups of 8 rows of `rows` through the rows-as-lanes kernel into `top`; returns the
/// first row it did not take (`rows.start` where the CPU has no such kernel).
fn rows_as_lanes<T: simd::Element>(
    isa: Isa,
    query: &[f32],
    vectors: &[T],
    d: usize,
    rows: Range<usize>,
    top: &mut TopK,
) -> usize {
    let mut start = rows.start;
    let mut scores = [0f32; ONE_ROWS];
    while start + ONE_ROWS <= rows.end {
        let ahead = (start + PREFETCH_ROWS).min(rows.end);
        let ahead = ahead..(ahead + ONE_ROWS).min(rows.end);
        let thr = top.threshold();
        let Some(any) = simd::rows8(isa, query, vectors, start, d, ahead, thr, &mut scores) else {
            break;
        };
        if any {
            for (r, &s) in scores.iter().enumerate() {
                top.push(start + r, s); // push re-tests against the current threshold
            }
        }
        start += ONE_ROWS;
    }
    start
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::synthetic::random_unit_vectors;

    /// The portable kernels run the same selection; both paths must agree with each other and
    /// with a sort of all scores computed the portable way.
    #[test]
    fn portable_paths_agree() {
        let d = 19;
        let n = 5000;
        let corpus_v = random_unit_vectors(n, d, 1);
        let queries = random_unit_vectors(21, d, 2);
        let corpus = Corpus::from_f32(&corpus_v, d).unwrap();
        for isa in [Isa::Portable, Isa::detect()] {
            for k in [1, 7, 100, 6000] {
                let batch = search_batch_with(isa, &corpus, &queries, k).unwrap();
                for (qi, q) in queries.chunks_exact(d).enumerate() {
                    let one = search_one_with(isa, &corpus, q, k).unwrap();
                    assert_eq!(one, batch[qi], "isa {isa:?} k {k} q {qi}");
                    assert_eq!(one.len(), k.min(n));
                    assert!(one.windows(2).all(|w| hit_order(&w[0], &w[1]).is_lt()));
                }
            }
        }
    }

    fn select(k: usize, items: &[(usize, f32)]) -> Vec<Hit> {
        let mut t = TopK::new(k);
        for &(i, s) in items {
            t.push(i, s);
        }
        t.into_sorted().into_iter().map(unpack).collect()
    }

    #[test]
    fn topk_selector_handles_nan_and_ties() {
        let items: Vec<(usize, f32)> = [1.0, f32::NAN, 2.0, 2.0, 0.5, 2.0, f32::NAN]
            .iter()
            .enumerate()
            .map(|(i, &s)| (i, s))
            .collect();
        let got: Vec<usize> = select(3, &items).iter().map(|h| h.index).collect();
        assert_eq!(got, vec![2, 3, 5]);
        let items: Vec<(usize, f32)> = (0..1000).rev().map(|i| (i, (i % 3) as f32)).collect();
        let got: Vec<usize> = select(4, &items).iter().map(|h| h.index).collect();
        assert_eq!(got, vec![2, 5, 8, 11]);
        let got = select(3, &[(0, f32::NAN), (1, -1.0)]);
        assert_eq!(
            got[0],
            Hit {
                index: 1,
                score: -1.0
            }
        );
        assert!(got[1].score.is_nan());
    }

    /// Packed keys sort exactly like `hit_order` and round-trip the scores.
    #[test]
    fn packed_keys_follow_hit_order() {
        let scores = [
            f32::NEG_INFINITY,
            -3.5,
            -1e-40,
            -0.0,
            0.0,
            1e-40,
            0.25,
            1.0,
            f32::MAX,
            f32::INFINITY,
            f32::NAN,
        ];
        let mut hits = Vec::new();
        for (i, &s) in scores.iter().enumerate() {
            for j in 0..3u32 {
                hits.push(Hit {
                    index: (j * 100 + i as u32) as usize,
                    score: s,
                });
            }
        }
        let mut by_order = hits.clone();
        by_order.sort_by(hit_order);
        let mut keys: Vec<u64> = hits.iter().map(|h| pack(h.score, h.index as u32)).collect();
        keys.sort_unstable();
        let by_key: Vec<Hit> = keys.into_iter().map(unpack).collect();
        for (a, b) in by_order.iter().zip(&by_key) {
            assert_eq!(a.index, b.index);
            assert!(a.score == b.score || (a.score.is_nan() && b.score.is_nan()));
        }
    }
}
