//! Data-parallel training: one global batch split over ranks, each rank encoding only its own
//! shard, with gradients that equal a single-process step on the concatenated batch.
//!
//! # Layout
//!
//! Rank `r` holds `B_r` queries, their `B_r` positives and `N_r` hard negatives, packed in the
//! trainer's order: its queries, then their positives, then each query's negatives, query by
//! query. The global batch is the concatenation of the shards in rank order, and the gathered
//! embeddings are arranged exactly as the single-process trainer arranges that batch:
//!
//! ```text
//! queries: [Q_0 | Q_1 | … ]                       B = Σ B_r rows
//! docs:    [P_0 | P_1 | … | N_0 | N_1 | … ]       D = B + Σ N_r rows
//! ```
//!
//! so query `i` of rank `r` has global index `g = off_r + i` (`off_r = Σ_{r'<r} B_r'`), its
//! positive is document `g` (the InfoNCE target), and its negatives sit after every positive,
//! at `B + noff_r + …`. [`GlobalLayout`] holds these offsets; it is gathered from every rank's
//! counts and keys, so no rank needs to know the others' shards in advance.
//!
//! # Why the gradients match
//!
//! Every rank runs [`info_nce`] on the full gathered matrices: identical inputs, so identical
//! loss and embedding gradients on every rank; and since a sequence's embedding does not
//! depend on what else is in its batch, also those of the single-process run, whose layout
//! this is. The loss is the mean over the *global* `B` queries, so `∂L/∂e` is already
//! normalised once for the whole batch. Each rank keeps the rows of `∂L/∂e` that belong to its
//! own sequences and backpropagates them through its own encoder pass; by the chain rule
//! `∂L/∂θ = Σ_r Σ_{s ∈ shard r} (∂L/∂e_s)(∂e_s/∂θ)`, so the *sum* of the ranks' parameter
//! gradients is the single-process gradient. [`all_reduce_gradients`] therefore sums and does
//! not divide by the world size: that division belongs to the usual convention where each rank
//! averages its own loss over its own queries, and is wrong as soon as the shards are uneven.
//! With gradient accumulation, accumulate the micro-batches locally, all-reduce once, then
//! apply the trainer's `1 / micro-batches` scale as before.
//!
//! Dropout masks are keyed by the global sequence index (`example_base | s`, the trainer's
//! `(micro << 14) | s`), so a sequence gets the same masks whichever rank encodes it.
//!
//! The only difference from the single-process step is the order of f32 sums: the weight
//! gradients of a shard are reduced over its own tokens and then added across ranks, where the
//! single process reduces over all tokens at once. With [`InProcess`] the cross-rank sum runs in
//! rank order and every rank copies the one result, so all replicas hold bitwise the same
//! gradient and stay in step after the (deterministic) AdamW update.
//!
//! Scope: the encoder and the loss. The trainer adds the RRRA joint adapter's loss the same
//! way as InfoNCE: every rank computes it on the gathered batch.

use super::encoder_grad::{ActivationMode, DropoutPlan, TrainBatch, TrainableEncoder};
use super::loss::{info_nce, InfoNceInput, InfoNceStats};
use crate::error::{Error, Result};
use crate::model::bert::PackedBatch;
use crate::model::weights::BertWeights;
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Collective communication among the ranks of a group.
///
/// Every rank must call the same collectives in the same order with matching arguments (as
/// with MPI or NCCL). An error may leave the group unusable; implementations say which.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Element-wise sum of `buf` over all ranks, written back into `buf` on every rank. Every
    /// rank passes a buffer of the same length.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// Concatenation of every rank's `local` in rank order into `out`. Variable sizes:
    /// `counts[r]` floats come from rank `r`, every rank passes the same `counts`,
    /// `local.len() == counts[rank]` and `out.len() == Σ counts`.
    fn all_gather(&self, local: &[f32], counts: &[usize], out: &mut [f32]) -> Result<()>;
}

fn check_gather(
    rank: usize,
    world: usize,
    local: &[f32],
    counts: &[usize],
    out: &[f32],
) -> Result<()> {
    if counts.len() != world
        || local.len() != counts[rank]
        || out.len() != counts.iter().sum::<usize>()
    {
        return Err(Error::InvalidArgument(format!(
            "all-gather on rank {rank}: {} local floats, counts {counts:?}, {} output floats",
            local.len(),
            out.len()
        )));
    }
    Ok(())
}

/// How long a rank waits for the others before [`InProcess`] gives up on the group.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// Ranks as threads of one process, exchanging through shared memory.
///
/// Deterministic: the sum is computed once, by the last rank to arrive, adding the ranks'
/// buffers in rank order, and every rank copies that one result, so all ranks get bitwise the
/// same values whatever the thread timing. Any error (mismatched calls, a rank waiting past
/// the timeout, a rank's handle dropped) breaks the group: the pending and every later call on
/// every rank fails instead of hanging.
pub struct InProcess {
    rank: usize,
    group: Arc<Group>,
}

struct Group {
    world: usize,
    timeout: Duration,
    state: Mutex<State>,
    turn: Condvar,
}

type Outcome = std::result::Result<Vec<f32>, String>;

struct State {
    /// Completed collectives; a waiting rank knows its call is done when this moves on.
    round: u64,
    arrived: usize,
    slots: Vec<Option<Offer>>,
    /// The last completed call's result. It stays until every rank has arrived at the next
    /// call, hence until every rank has read it.
    outcome: Option<Arc<Outcome>>,
    broken: Option<String>,
}

struct Offer {
    op: Op,
    data: Vec<f32>,
}

#[derive(Debug, Clone, PartialEq)]
enum Op {
    Sum,
    Gather(Vec<usize>),
}

impl InProcess {
    /// `world` connected ranks (one per thread), waiting at most [`DEFAULT_TIMEOUT`].
    pub fn group(world: usize) -> Vec<InProcess> {
        Self::group_with_timeout(world, DEFAULT_TIMEOUT)
    }

    /// As [`InProcess::group`], waiting at most `timeout` for the other ranks at each call.
    pub fn group_with_timeout(world: usize, timeout: Duration) -> Vec<InProcess> {
        let group = Arc::new(Group {
            world,
            timeout,
            state: Mutex::new(State {
                round: 0,
                arrived: 0,
                slots: (0..world).map(|_| None).collect(),
                outcome: None,
                broken: None,
            }),
            turn: Condvar::new(),
        });
        (0..world)
            .map(|rank| InProcess {
                rank,
                group: group.clone(),
            })
            .collect()
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        self.group
            .state
            .lock()
            .map_err(|_| collective_err("a rank panicked inside a collective".into()))
    }

    fn break_group(&self, why: String) -> Error {
        if let Ok(mut st) = self.lock() {
            st.broken.get_or_insert_with(|| why.clone());
        }
        self.group.turn.notify_all();
        collective_err(why)
    }

    /// Offers `data`, waits for every rank, and returns the combined result.
    fn exchange(&self, op: Op, data: Vec<f32>) -> Result<Arc<Outcome>> {
        let g = &*self.group;
        let mut st = self.lock()?;
        if let Some(why) = &st.broken {
            return Err(collective_err(why.clone()));
        }
        let round = st.round;
        st.slots[self.rank] = Some(Offer { op, data });
        st.arrived += 1;
        if st.arrived == g.world {
            let outcome = combine(&mut st.slots);
            if let Err(why) = &outcome {
                st.broken = Some(why.clone());
            }
            st.outcome = Some(Arc::new(outcome));
            st.arrived = 0;
            st.round += 1;
            g.turn.notify_all();
        } else {
            let deadline = Instant::now() + g.timeout;
            // The round check comes first: a call completed just before a rank left is valid.
            while st.round == round {
                if let Some(why) = &st.broken {
                    return Err(collective_err(why.clone()));
                }
                let now = Instant::now();
                if now >= deadline {
                    let why = format!(
                        "rank {} waited {:?} for the other ranks of the group",
                        self.rank, g.timeout
                    );
                    st.broken = Some(why.clone());
                    g.turn.notify_all();
                    return Err(collective_err(why));
                }
                st = g
                    .turn
                    .wait_timeout(st, deadline - now)
                    .map_err(|_| collective_err("a rank panicked inside a collective".into()))?
                    .0;
            }
        }
        st.outcome
            .clone()
            .ok_or_else(|| collective_err("collective finished without a result".into()))
    }

    /// Runs one collective and copies its result into `dst` (outside the lock).
    fn run(&self, op: Op, data: Vec<f32>, dst: &mut [f32]) -> Result<()> {
        match &*self.exchange(op, data)? {
            Ok(v) if v.len() == dst.len() => {
                dst.copy_from_slice(v);
                Ok(())
            }
            Ok(v) => Err(collective_err(format!(
                "rank {} expected {} floats, the collective gave {}",
                self.rank,
                dst.len(),
                v.len()
            ))),
            Err(why) => Err(collective_err(why.clone())),
        }
    }
}

/// Combines the offers of one call, in rank order.
fn combine(slots: &mut [Option<Offer>]) -> Outcome {
    let offers: Vec<Offer> = slots
        .iter_mut()
        .map(Option::take)
        .collect::<Option<_>>()
        .ok_or("a rank's contribution is missing")?;
    let ops: Vec<&Op> = offers.iter().map(|o| &o.op).collect();
    if ops.iter().any(|&op| op != ops[0]) {
        return Err(format!("ranks called different collectives: {ops:?}"));
    }
    match &offers[0].op {
        Op::Sum => {
            let lens: Vec<usize> = offers.iter().map(|o| o.data.len()).collect();
            if lens.iter().any(|&n| n != lens[0]) {
                return Err(format!("all-reduce buffers differ in length: {lens:?}"));
            }
            let mut it = offers.into_iter();
            let mut acc = it.next().map(|o| o.data).unwrap_or_default();
            for o in it {
                for (a, v) in acc.iter_mut().zip(&o.data) {
                    *a += v;
                }
            }
            Ok(acc)
        }
        Op::Gather(counts) => {
            let mut out = Vec::with_capacity(counts.iter().sum());
            for (r, o) in offers.iter().enumerate() {
                if o.data.len() != counts[r] {
                    return Err(format!(
                        "all-gather: rank {r} sent {} floats, counts say {}",
                        o.data.len(),
                        counts[r]
                    ));
                }
                out.extend_from_slice(&o.data);
            }
            Ok(out)
        }
    }
}

fn collective_err(why: String) -> Error {
    Error::InvalidArgument(format!("collective failed: {why}"))
}

impl Collective for InProcess {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.group.world
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.run(Op::Sum, buf.to_vec(), buf)
    }
    fn all_gather(&self, local: &[f32], counts: &[usize], out: &mut [f32]) -> Result<()> {
        // A rank that cannot take part must not leave the others waiting.
        if let Err(e) = check_gather(self.rank, self.group.world, local, counts, out) {
            return Err(self.break_group(e.to_string()));
        }
        self.run(Op::Gather(counts.to_vec()), local.to_vec(), out)
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        // Ranks still waiting (or arriving later) must learn that this one is gone.
        let mut st = match self.group.state.lock() {
            Ok(st) => st,
            Err(poisoned) => poisoned.into_inner(),
        };
        st.broken
            .get_or_insert_with(|| format!("rank {} left the group", self.rank));
        drop(st);
        self.group.turn.notify_all();
    }
}

/// One rank's part of the global batch.
pub struct Shard<'a> {
    /// The shard's sequences in the trainer's order: its `B_r` queries, then their positives
    /// in the same order, then each query's negatives, query by query.
    pub packed: &'a PackedBatch,
    /// The caller's key of each query (the training-set query index), `[B_r]`.
    pub query_keys: &'a [u32],
    /// The key of each document as packed (corpus index): positives, then negatives.
    pub doc_keys: &'a [u32],
    /// Negatives of each query, `[B_r]`.
    pub negatives: &'a [usize],
    /// InfoNCE log-weight of each negative (soft RRRA; 0 is weight 1); `None`: all 0.
    pub negative_log_weights: Option<&'a [f32]>,
}

/// Counts and keys are sent as f32; integers up to 2^24 are exact.
const F32_EXACT: usize = 1 << 24;

impl Shard<'_> {
    fn check(&self, encoder: &TrainableEncoder<'_>) -> Result<()> {
        let b = self.query_keys.len();
        let n: usize = self.negatives.iter().sum();
        if self.negatives.len() != b
            || self.doc_keys.len() != b + n
            || self.packed.sequences() != 2 * b + n
            || self.negative_log_weights.is_some_and(|w| w.len() != n)
        {
            return Err(Error::InvalidArgument(format!(
                "shard of {b} queries and {n} negatives: {} negative counts, {} document keys, \
                 {} sequences (expected {}), {:?} negative weights",
                self.negatives.len(),
                self.doc_keys.len(),
                self.packed.sequences(),
                2 * b + n,
                self.negative_log_weights.map(<[f32]>::len)
            )));
        }
        if b + n >= F32_EXACT {
            return Err(Error::InvalidArgument(format!(
                "shard of {} sequences is too large to describe exactly",
                2 * b + n
            )));
        }
        if let Some(w) = self.negative_log_weights {
            if w.iter().any(|v| v.is_nan() || *v == f32::INFINITY) {
                return Err(Error::InvalidArgument(
                    "negative log-weights must be finite or -inf".into(),
                ));
            }
        }
        encoder.bert.check(self.packed)
    }
}

/// Where every rank's queries and documents sit in the gathered batch (see the module docs).
/// The same on every rank.
#[derive(Debug, Clone, PartialEq)]
pub struct GlobalLayout {
    /// `B_r` of each rank.
    rank_queries: Vec<usize>,
    /// `N_r` of each rank.
    rank_negatives: Vec<usize>,
    /// Negatives of each global query.
    query_negatives: Vec<usize>,
    /// Query keys in global query order.
    pub query_keys: Vec<u32>,
    /// Document keys in global document order (all positives, then all negatives).
    pub doc_keys: Vec<u32>,
    /// Log-weights of the negatives in global negative order.
    pub negative_log_weights: Vec<f32>,
}

impl GlobalLayout {
    /// Gathers every rank's counts and keys. Shard errors are reported on every rank (the
    /// faulty rank's with the details), so no rank is left waiting.
    pub fn gather(
        comm: &dyn Collective,
        shard: &Shard<'_>,
        encoder: &TrainableEncoder<'_>,
    ) -> Result<GlobalLayout> {
        let world = comm.world();
        let local = shard.check(encoder);
        let b = shard.query_keys.len();
        let n: usize = shard.negatives.iter().sum();
        let head = match local {
            Ok(()) => [1.0, b as f32, n as f32],
            Err(_) => [0.0; 3],
        };
        let mut heads = vec![0.0f32; 3 * world];
        comm.all_gather(&head, &vec![3; world], &mut heads)?;
        local?;
        let bad: Vec<usize> = (0..world).filter(|&r| heads[3 * r] != 1.0).collect();
        if !bad.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "the shards of ranks {bad:?} are invalid"
            )));
        }
        let rank_queries: Vec<usize> = (0..world).map(|r| heads[3 * r + 1] as usize).collect();
        let rank_negatives: Vec<usize> = (0..world).map(|r| heads[3 * r + 2] as usize).collect();
        if rank_queries.iter().sum::<usize>() == 0 {
            return Err(Error::InvalidArgument(
                "the global batch has no query".into(),
            ));
        }
        // Per rank: negative counts [B_r], query keys [2 B_r], document keys [2 (B_r + N_r)],
        // negative log-weights [N_r].
        let meta_len = |b: usize, n: usize| 5 * b + 3 * n;
        let mut meta = Vec::with_capacity(meta_len(b, n));
        meta.extend(shard.negatives.iter().map(|&c| c as f32));
        meta.extend(shard.query_keys.iter().flat_map(|&k| encode_key(k)));
        meta.extend(shard.doc_keys.iter().flat_map(|&k| encode_key(k)));
        match shard.negative_log_weights {
            Some(w) => meta.extend_from_slice(w),
            None => meta.resize(meta.len() + n, 0.0),
        }
        let counts: Vec<usize> = (0..world)
            .map(|r| meta_len(rank_queries[r], rank_negatives[r]))
            .collect();
        let mut all = vec![0.0f32; counts.iter().sum()];
        comm.all_gather(&meta, &counts, &mut all)?;

        let mut layout = GlobalLayout {
            rank_queries,
            rank_negatives,
            query_negatives: Vec::new(),
            query_keys: Vec::new(),
            doc_keys: Vec::new(),
            negative_log_weights: Vec::new(),
        };
        let mut negative_keys = Vec::new();
        let mut at = 0;
        for r in 0..world {
            let (b, n) = (layout.rank_queries[r], layout.rank_negatives[r]);
            let m = &all[at..at + counts[r]];
            at += counts[r];
            let (neg, rest) = m.split_at(b);
            let (qk, rest) = rest.split_at(2 * b);
            let (dk, lw) = rest.split_at(2 * (b + n));
            layout
                .query_negatives
                .extend(neg.iter().map(|&c| c as usize));
            layout.query_keys.extend(qk.chunks_exact(2).map(decode_key));
            let dk: Vec<u32> = dk.chunks_exact(2).map(decode_key).collect();
            layout.doc_keys.extend_from_slice(&dk[..b]);
            negative_keys.extend_from_slice(&dk[b..]);
            layout.negative_log_weights.extend_from_slice(lw);
        }
        layout.doc_keys.extend(negative_keys);
        Ok(layout)
    }

    pub fn world(&self) -> usize {
        self.rank_queries.len()
    }
    /// Queries of the global batch, `B`.
    pub fn batch(&self) -> usize {
        self.query_keys.len()
    }
    /// Documents of the global batch, `D = B + Σ N_r`.
    pub fn docs(&self) -> usize {
        self.doc_keys.len()
    }
    /// Global indices of rank `r`'s queries; the same indices are its positives' columns.
    pub fn queries_of(&self, r: usize) -> Range<usize> {
        let off: usize = self.rank_queries[..r].iter().sum();
        off..off + self.rank_queries[r]
    }
    /// Document columns of rank `r`'s negatives.
    pub fn negatives_of(&self, r: usize) -> Range<usize> {
        let off = self.batch() + self.rank_negatives[..r].iter().sum::<usize>();
        off..off + self.rank_negatives[r]
    }
    /// Document columns of global query `g`'s own negatives.
    pub fn own_negatives(&self, g: usize) -> Range<usize> {
        let off = self.batch() + self.query_negatives[..g].iter().sum::<usize>();
        off..off + self.query_negatives[g]
    }
    /// InfoNCE targets: query `g`'s positive is document `g`.
    pub fn targets(&self) -> Vec<usize> {
        (0..self.batch()).collect()
    }
    /// The index the single-process trainer gives sequence `s` of rank `r`'s packed shard:
    /// queries `0..B`, then documents `B + column`.
    pub fn global_sequence(&self, r: usize, s: usize) -> usize {
        let (b, q) = (self.rank_queries[r], self.queries_of(r));
        if s < b {
            q.start + s
        } else if s < 2 * b {
            self.batch() + q.start + (s - b)
        } else {
            self.batch() + self.negatives_of(r).start + (s - 2 * b)
        }
    }

    /// The `[B × D]` InfoNCE log-weights, as the trainer builds them: another positive of the
    /// same query is never its negative (`-inf`), and own negatives carry their soft weight.
    pub fn log_weights(&self, is_positive: &dyn Fn(u32, u32) -> bool) -> Vec<f32> {
        let (b_n, d_n) = (self.batch(), self.docs());
        let mut log_w = vec![0.0f32; b_n * d_n];
        for (b, &q) in self.query_keys.iter().enumerate() {
            let row = &mut log_w[b * d_n..(b + 1) * d_n];
            for (j, &d) in self.doc_keys.iter().enumerate() {
                if j != b && is_positive(q, d) {
                    row[j] = f32::NEG_INFINITY;
                }
            }
            for j in self.own_negatives(b) {
                if row[j] != f32::NEG_INFINITY {
                    row[j] = self.negative_log_weights[j - b_n];
                }
            }
        }
        log_w
    }

    /// Floats rank `r` contributes to the embedding gather.
    fn rank_rows(&self, r: usize) -> usize {
        2 * self.rank_queries[r] + self.rank_negatives[r]
    }
}

/// A u32 key as two 16-bit halves: exact in f32, whatever the transport does with floats.
fn encode_key(k: u32) -> [f32; 2] {
    [(k >> 16) as f32, (k & 0xFFFF) as f32]
}

fn decode_key(v: &[f32]) -> u32 {
    ((v[0] as u32) << 16) | v[1] as u32
}

/// Every rank's `local`, of any length, concatenated in rank order (lengths below 2^24).
pub fn gather_all(comm: &dyn Collective, local: &[f32]) -> Result<Vec<f32>> {
    let world = comm.world();
    if local.len() >= F32_EXACT {
        return Err(Error::InvalidArgument(format!(
            "{} values are too many to gather",
            local.len()
        )));
    }
    let mut lens = vec![0.0f32; world];
    comm.all_gather(&[local.len() as f32], &vec![1; world], &mut lens)?;
    let counts: Vec<usize> = lens.iter().map(|&l| l as usize).collect();
    let mut out = vec![0.0f32; counts.iter().sum()];
    comm.all_gather(local, &counts, &mut out)?;
    Ok(out)
}

/// Every rank's embeddings (`local`: `[sequences × h]` in shard order) gathered into the
/// global layout: queries `[B × h]` and documents `[D × h]`.
pub fn gather_embeddings(
    comm: &dyn Collective,
    layout: &GlobalLayout,
    local: &[f32],
    h: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let world = layout.world();
    let counts: Vec<usize> = (0..world).map(|r| layout.rank_rows(r) * h).collect();
    let mut all = vec![0.0f32; counts.iter().sum()];
    comm.all_gather(local, &counts, &mut all)?;
    let mut queries = vec![0.0f32; layout.batch() * h];
    let mut docs = vec![0.0f32; layout.docs() * h];
    let mut at = 0;
    for r in 0..world {
        let (q, neg) = (layout.queries_of(r), layout.negatives_of(r));
        let rows = &all[at..at + counts[r]];
        at += counts[r];
        let (rq, rest) = rows.split_at(q.len() * h);
        let (rp, rn) = rest.split_at(q.len() * h);
        queries[q.start * h..q.end * h].copy_from_slice(rq);
        docs[q.start * h..q.end * h].copy_from_slice(rp);
        docs[neg.start * h..neg.end * h].copy_from_slice(rn);
    }
    Ok((queries, docs))
}

/// Rank `r`'s rows of the global embedding gradients, in its shard order.
pub fn local_rows(layout: &GlobalLayout, r: usize, dq: &[f32], dd: &[f32], h: usize) -> Vec<f32> {
    let (q, neg) = (layout.queries_of(r), layout.negatives_of(r));
    let mut out = Vec::with_capacity(layout.rank_rows(r) * h);
    out.extend_from_slice(&dq[q.start * h..q.end * h]);
    out.extend_from_slice(&dd[q.start * h..q.end * h]);
    out.extend_from_slice(&dd[neg.start * h..neg.end * h]);
    out
}

/// Knobs of one data-parallel micro-batch.
#[derive(Debug, Clone, Copy)]
pub struct StepOptions {
    pub tau: f32,
    pub dropout: DropoutPlan,
    pub activations: ActivationMode,
    /// Dropout key of global sequence `s` is `example_base | s` (the trainer's `micro << 14`).
    pub example_base: u64,
}

/// What a data-parallel micro-batch computed (the same on every rank).
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// The loss over the whole global batch.
    pub stats: InfoNceStats,
    pub layout: GlobalLayout,
}

/// Forward of this rank's shard, InfoNCE over the gathered global batch, and backward of this
/// rank's share: adds this rank's part of `∂L/∂θ` to `grads`. Every rank of `comm` must call it
/// for the same micro-batch; then [`all_reduce_gradients`] (once per optimizer step) makes
/// `grads` the full gradient. `is_positive(query key, doc key)` masks false negatives.
///
/// Shard errors are reported on every rank. The encoder forward is checked up front, so it
/// should not fail later; if it did, the other ranks would wait in the embedding gather until
/// the transport reports the failure ([`InProcess`]: that rank's handle dropped, or the
/// timeout).
pub fn shard_gradients(
    comm: &dyn Collective,
    encoder: &TrainableEncoder<'_>,
    shard: &Shard<'_>,
    opts: &StepOptions,
    is_positive: &dyn Fn(u32, u32) -> bool,
    grads: &mut BertWeights,
) -> Result<StepOutput> {
    let layout = GlobalLayout::gather(comm, shard, encoder)?;
    let (rank, h) = (comm.rank(), encoder.bert.cfg.hidden_size);
    let seqs = shard.packed.sequences();
    let batch = TrainBatch {
        packed: shard.packed.clone(),
        example_ids: (0..seqs)
            .map(|s| opts.example_base | layout.global_sequence(rank, s) as u64)
            .collect(),
    };
    // A rank may hold no query at an uneven epoch end: it only takes part in the collectives.
    let acts = match seqs {
        0 => None,
        _ => Some(encoder.forward(&batch, &opts.dropout, opts.activations)?),
    };
    let local = acts.as_ref().map_or(&[][..], |a| a.embeddings.as_slice());
    let (queries, docs) = gather_embeddings(comm, &layout, local, h)?;
    let log_w = layout.log_weights(is_positive);
    let targets = layout.targets();
    let mut dq = vec![0.0f32; queries.len()];
    let mut dd = vec![0.0f32; docs.len()];
    // Every rank computes the whole (cheap) loss: identical inputs give identical gradients,
    // and no reduction of the document gradients is needed.
    let stats = info_nce(
        &InfoNceInput {
            queries: &queries,
            docs: &docs,
            dim: h,
            targets: &targets,
            log_weights: Some(&log_w),
            tau: opts.tau,
        },
        &mut dq,
        &mut dd,
    )?;
    if !stats.loss.is_finite() {
        return Err(Error::InvalidArgument(format!(
            "the loss became {}: lower the learning rate",
            stats.loss
        )));
    }
    if let Some(acts) = acts {
        let d_emb = local_rows(&layout, rank, &dq, &dd, h);
        encoder.backward(&batch, &opts.dropout, acts, &d_emb, grads)?;
    }
    Ok(StepOutput { stats, layout })
}

/// Sums every parameter gradient over the ranks (see the module docs for why it is a sum and
/// not a mean). Call once per optimizer step, after the local accumulation.
pub fn all_reduce_gradients(comm: &dyn Collective, grads: &mut BertWeights) -> Result<()> {
    for (t, _) in grads.tensors_mut() {
        comm.all_reduce_sum(t)?;
    }
    Ok(())
}

/// [`Collective`] over NCCL: one process per GPU.
///
/// **Not yet run on GPUs**: this compiles (`cargo check --features nccl`) but has not been
/// exercised on a multi-GPU machine, so treat it as untested.
///
/// Buffers are host slices, staged through the device for each call (simple, not fast: a GPU
/// trainer would reduce its device buffers directly). The unique id is shared through a file:
/// rank 0 writes it atomically (temporary file, then rename) and the other ranks poll for it.
/// The path must be fresh for each launch (or deleted by the launcher before the ranks start):
/// a stale file from an earlier run with the same world size would be read as valid.
///
/// NCCL documents no summation order: its ring and tree algorithms give every rank the same
/// reduced values in practice, but neither the order nor the equality is part of its API, so
/// results may differ in the last bits from [`InProcess`].
#[cfg(feature = "nccl")]
pub mod nccl {
    use super::{check_gather, Collective};
    use crate::error::{Error, Result};
    use cudarc::driver::{CudaContext, CudaStream, DriverError};
    use cudarc::nccl::result::NcclError;
    use cudarc::nccl::{Comm, Id, ReduceOp};
    use std::ffi::c_char;
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    const MAGIC: &[u8; 8] = b"RRRANCCL";
    const ID_BYTES: usize = 128;

    pub struct Nccl {
        /// NCCL communicators are not thread-safe: calls are serialised.
        comm: Mutex<Comm>,
        stream: Arc<CudaStream>,
        rank: usize,
        world: usize,
    }

    // SAFETY: `Comm` is `!Send`/`!Sync` only because it holds NCCL's raw communicator pointer.
    // NCCL allows a communicator to be used from any thread as long as calls on it are not
    // concurrent, which the mutex guarantees; the stream is cudarc's own thread-safe handle and
    // every call binds the context to the calling thread first.
    unsafe impl Send for Nccl {}
    unsafe impl Sync for Nccl {}

    fn cuda(what: &'static str) -> impl Fn(DriverError) -> Error {
        move |e| Error::Cuda(format!("{what}: {e:?}"))
    }

    fn nccl(what: &'static str) -> impl Fn(NcclError) -> Error {
        move |e| Error::Cuda(format!("NCCL {what}: {e:?}"))
    }

    impl Nccl {
        /// Joins a group of `world` processes as `rank`, on device `ordinal`. Rank 0 creates
        /// the unique id and writes it to `id_file`; the others wait up to `timeout` for it.
        /// Then NCCL's own initialisation blocks until every rank has joined (no timeout).
        pub fn join(
            ordinal: usize,
            rank: usize,
            world: usize,
            id_file: &Path,
            timeout: Duration,
        ) -> Result<Nccl> {
            if rank >= world || world > i32::MAX as usize {
                return Err(Error::InvalidArgument(format!(
                    "rank {rank} of a group of {world}"
                )));
            }
            // SAFETY: these only try to dlopen the libraries; cudarc panics on first use of a
            // missing one, so check before any call.
            if !unsafe { cudarc::driver::sys::is_culib_present() } {
                return Err(Error::CudaUnavailable(
                    "the CUDA driver library (libcuda) is not installed".into(),
                ));
            }
            if !unsafe { cudarc::nccl::sys::is_culib_present() } {
                return Err(Error::CudaUnavailable(
                    "the NCCL library (libnccl) is not installed".into(),
                ));
            }
            let ctx = CudaContext::new(ordinal).map_err(cuda("creating a context"))?;
            let stream = ctx.new_stream().map_err(cuda("creating a stream"))?;
            let id = if rank == 0 {
                let id = Id::new().map_err(nccl("creating the unique id"))?;
                write_id(id_file, &id, world)?;
                id
            } else {
                read_id(id_file, world, timeout)?
            };
            let comm = Comm::from_rank(stream.clone(), rank, world, id)
                .map_err(nccl("joining the group"))?;
            Ok(Nccl {
                comm: Mutex::new(comm),
                stream,
                rank,
                world,
            })
        }

        fn lock(&self) -> Result<std::sync::MutexGuard<'_, Comm>> {
            self.comm
                .lock()
                .map_err(|_| Error::Cuda("NCCL communicator poisoned by a panic".into()))
        }
    }

    fn write_id(path: &Path, id: &Id, world: usize) -> Result<()> {
        let mut bytes = Vec::with_capacity(MAGIC.len() + 4 + ID_BYTES);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&(world as u32).to_le_bytes());
        bytes.extend(id.internal().iter().map(|&c| c as u8));
        crate::util::atomic_write(path, |w| {
            std::io::Write::write_all(w, &bytes).map_err(|e| Error::io(path, e))
        })
    }

    fn read_id(path: &Path, world: usize, timeout: Duration) -> Result<Id> {
        let deadline = Instant::now() + timeout;
        loop {
            match std::fs::read(path) {
                Ok(bytes) => return parse_id(path, &bytes, world),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(path, e)),
            }
            if Instant::now() >= deadline {
                return Err(Error::io(
                    PathBuf::from(path),
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("rank 0 did not write the NCCL id within {timeout:?}"),
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn parse_id(path: &Path, bytes: &[u8], world: usize) -> Result<Id> {
        let header = MAGIC.len() + 4;
        if bytes.len() != header + ID_BYTES || &bytes[..MAGIC.len()] != MAGIC {
            return Err(Error::format(path, "not an rrra NCCL id file"));
        }
        let file_world = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if file_world as usize != world {
            return Err(Error::mismatch(
                path,
                format!("NCCL id written for {file_world} ranks, this group has {world}"),
            ));
        }
        let mut internal = [0 as c_char; ID_BYTES];
        for (o, &b) in internal.iter_mut().zip(&bytes[header..]) {
            *o = b as c_char;
        }
        Ok(Id::uninit(internal))
    }

    impl Collective for Nccl {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world(&self) -> usize {
            self.world
        }
        fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
            // Every rank passes the same length, so all skip an empty call together.
            if buf.is_empty() {
                return Ok(());
            }
            let comm = self.lock()?;
            let s = &self.stream;
            s.context()
                .bind_to_thread()
                .map_err(cuda("binding the context"))?;
            let mut dev = s.clone_htod(&*buf).map_err(cuda("copying to the device"))?;
            comm.all_reduce_in_place(&mut dev, &ReduceOp::Sum)
                .map_err(nccl("all-reduce"))?;
            s.memcpy_dtoh(&dev, buf)
                .map_err(cuda("copying to the host"))?;
            s.synchronize().map_err(cuda("synchronizing"))
        }
        fn all_gather(&self, local: &[f32], counts: &[usize], out: &mut [f32]) -> Result<()> {
            check_gather(self.rank, self.world, local, counts, out)?;
            // NCCL gathers equal sizes: pad every rank's part to the largest, then compact.
            let max = counts.iter().copied().max().unwrap_or(0);
            if max == 0 {
                return Ok(());
            }
            let mut padded = vec![0.0f32; max];
            padded[..local.len()].copy_from_slice(local);
            let comm = self.lock()?;
            let s = &self.stream;
            s.context()
                .bind_to_thread()
                .map_err(cuda("binding the context"))?;
            let send = s
                .clone_htod(&padded)
                .map_err(cuda("copying to the device"))?;
            let mut recv = s
                .alloc_zeros::<f32>(max * self.world)
                .map_err(cuda("allocating"))?;
            comm.all_gather(&send, &mut recv)
                .map_err(nccl("all-gather"))?;
            let all = s.clone_dtoh(&recv).map_err(cuda("copying to the host"))?;
            s.synchronize().map_err(cuda("synchronizing"))?;
            let mut at = 0;
            for (r, &c) in counts.iter().enumerate() {
                out[at..at + c].copy_from_slice(&all[r * max..r * max + c]);
                at += c;
            }
            Ok(())
        }
    }
}
