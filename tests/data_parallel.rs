//! Data-parallel training on threads: N ranks with `InProcess` give the gradients of one
//! process on the concatenated batch, the gathered labels follow the global layout, and the
//! collectives give bitwise the same result on every rank.

use rrra::model::bert::{Bert, PackedBatch};
use rrra::model::synthetic::{random_bert, small_config};
use rrra::model::weights::BertWeights;
use rrra::model::Pooling;
use rrra::train::collective::{Collective, InProcess};
use rrra::train::encoder_grad::{ActivationMode, DropoutPlan, TrainBatch, TrainableEncoder};
use rrra::train::loss::{info_nce, InfoNceInput, InfoNceStats};
use rrra::train::parallel::{
    all_reduce_gradients, backward_groups, gather_embeddings, shard_gradients, GlobalLayout, Shard,
    StepOptions, StepOutput,
};
use std::time::Duration;

/// Per-tensor relative L2 error allowed against the single-process gradient. The ranks see
/// bitwise the same embeddings and loss gradients (every sequence is encoded alone, with the
/// same dropout keys) but sum the per-token weight-gradient terms in another grouping (each
/// shard's tokens, then across ranks, instead of all tokens at once). Where those terms cancel
/// (a LayerNorm bias's gradient is the sum of the output gradient over every token) the
/// relative error grows well past f32's 6e-8: measured up to 3.8e-6 here, and 1e-5 still
/// catches a wrong row, label, mask, dropout key or scale, which move gradients by 1e-2 to 1.
const GRAD_TOL: f64 = 1e-5;
/// The whole gradient, dominated by tensors without such cancellation (measured 4e-7).
const WHOLE_TOL: f64 = 2e-6;
const TAU: f32 = 0.05;
const BASE: u64 = 3 << 14; // micro-batch 3, as the trainer keys dropout

/// One query of the global batch: its positive and its hard negatives (key, soft log-weight).
#[derive(Clone)]
struct Example {
    query: u32,
    positive: u32,
    negatives: Vec<(u32, f32)>,
}

/// Seven queries; query g's positive is document 100 + g, its negatives 200 + 10 g + k.
/// Extra relevance makes the false-negative mask cross ranks: query 0 is also answered by
/// query 3's positive, query 5 by one of query 3's negatives, query 1 by its own negative; query
/// 6 draws query 0's positive (document 100) as a negative.
fn global_batch() -> Vec<Example> {
    let counts = [2usize, 1, 0, 3, 2, 1, 2];
    (0..7u32)
        .map(|g| Example {
            query: g,
            positive: 100 + g,
            negatives: (0..counts[g as usize] as u32)
                .map(|k| {
                    let key = if g == 6 && k == 1 {
                        100
                    } else {
                        200 + 10 * g + k
                    };
                    (key, -0.05 * ((g * 3 + k) % 5) as f32)
                })
                .collect(),
        })
        .collect()
}

fn is_positive(q: u32, d: u32) -> bool {
    d == 100 + q || (q, d) == (0, 103) || (q, d) == (5, 231) || (q, d) == (1, 210)
}

/// Deterministic token ids of a key; the same document key always gives the same text.
fn tokens(key: u32, salt: u64, vocab: usize) -> Vec<u32> {
    let mut x = (key as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt;
    let len = 3 + (key as usize % 9);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab as u64) as u32
        })
        .collect()
}

/// A shard packed in the trainer's order, with its keys.
struct Packed {
    packed: PackedBatch,
    query_keys: Vec<u32>,
    doc_keys: Vec<u32>,
    negatives: Vec<usize>,
    log_weights: Vec<f32>,
}

fn pack(ex: &[Example], vocab: usize) -> Packed {
    let mut doc_keys: Vec<u32> = ex.iter().map(|e| e.positive).collect();
    let mut log_weights = Vec::new();
    for e in ex {
        for &(d, w) in &e.negatives {
            doc_keys.push(d);
            log_weights.push(w);
        }
    }
    let mut packed = PackedBatch::new();
    for e in ex {
        let t = tokens(e.query, 1, vocab);
        packed.push(&t, &vec![0; t.len()]);
    }
    for &d in &doc_keys {
        let t = tokens(d, 2, vocab);
        packed.push(&t, &vec![0; t.len()]);
    }
    Packed {
        packed,
        query_keys: ex.iter().map(|e| e.query).collect(),
        doc_keys,
        negatives: ex.iter().map(|e| e.negatives.len()).collect(),
        log_weights,
    }
}

impl Packed {
    fn shard(&self) -> Shard<'_> {
        Shard {
            packed: &self.packed,
            query_keys: &self.query_keys,
            doc_keys: &self.doc_keys,
            negatives: &self.negatives,
            negative_log_weights: Some(&self.log_weights),
        }
    }
}

fn model() -> Bert {
    random_bert(small_config(32, 4, 2, 64), 7)
}

fn encoder(bert: &Bert) -> TrainableEncoder<'_> {
    TrainableEncoder {
        bert,
        pooling: Pooling::Mean,
        normalize: true,
    }
}

fn dropout() -> DropoutPlan {
    DropoutPlan {
        hidden: 0.1,
        attention: 0.1,
        seed: 42,
        step: 5,
    }
}

/// The trainer's InfoNCE log-weights for a batch (copied from `Trainer::batch_gradients`).
fn trainer_log_weights(ex: &[Example]) -> Vec<f32> {
    let p = pack(ex, 1);
    let (b_n, d_n) = (ex.len(), p.doc_keys.len());
    let mut log_w = vec![0.0f32; b_n * d_n];
    let mut col = b_n;
    for (b, e) in ex.iter().enumerate() {
        for (j, &d) in p.doc_keys.iter().enumerate() {
            if j != b && is_positive(e.query, d) {
                log_w[b * d_n + j] = f32::NEG_INFINITY;
            }
        }
        for &(_, w) in &e.negatives {
            if log_w[b * d_n + col] != f32::NEG_INFINITY {
                log_w[b * d_n + col] = w;
            }
            col += 1;
        }
    }
    log_w
}

/// One process on the whole batch, as `Trainer::batch_gradients` computes it.
fn single_process(
    bert: &Bert,
    ex: &[Example],
    mode: ActivationMode,
) -> (BertWeights, InfoNceStats) {
    let te = encoder(bert);
    let p = pack(ex, bert.cfg.vocab_size);
    let seqs = p.packed.sequences() as u64;
    let batch = TrainBatch {
        packed: p.packed,
        example_ids: (0..seqs).map(|s| BASE | s).collect(),
    };
    let acts = te.forward(&batch, &dropout(), mode).unwrap();
    let (b_n, h) = (ex.len(), bert.cfg.hidden_size);
    let targets: Vec<usize> = (0..b_n).collect();
    let log_w = trainer_log_weights(ex);
    let (q, d) = acts.embeddings.split_at(b_n * h);
    let mut d_emb = vec![0.0f32; acts.embeddings.len()];
    let (dq, dd) = d_emb.split_at_mut(b_n * h);
    let stats = info_nce(
        &InfoNceInput {
            queries: q,
            docs: d,
            dim: h,
            targets: &targets,
            log_weights: Some(&log_w),
            tau: TAU,
        },
        dq,
        dd,
    )
    .unwrap();
    let mut grads = BertWeights::zeros(&bert.cfg);
    te.backward(&batch, &dropout(), acts, &d_emb, &mut grads)
        .unwrap();
    (grads, stats)
}

/// Splits the batch into consecutive shards of the given sizes.
fn split(ex: &[Example], sizes: &[usize]) -> Vec<Vec<Example>> {
    assert_eq!(sizes.iter().sum::<usize>(), ex.len());
    let mut at = 0;
    sizes
        .iter()
        .map(|&n| {
            at += n;
            ex[at - n..at].to_vec()
        })
        .collect()
}

/// One thread per rank: the data-parallel micro-batch, then the gradient all-reduce.
fn data_parallel(
    bert: &Bert,
    ex: &[Example],
    sizes: &[usize],
    mode: ActivationMode,
) -> Vec<(BertWeights, StepOutput)> {
    let shards = split(ex, sizes);
    let comms = InProcess::group(sizes.len());
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .zip(&shards)
            .map(|(comm, shard)| {
                s.spawn(move || -> rrra::error::Result<(BertWeights, StepOutput)> {
                    let p = pack(shard, bert.cfg.vocab_size);
                    let opts = StepOptions {
                        tau: TAU,
                        dropout: dropout(),
                        activations: mode,
                        example_base: BASE,
                    };
                    let mut grads = BertWeights::zeros(&bert.cfg);
                    let out = shard_gradients(
                        &comm,
                        &encoder(bert),
                        &p.shard(),
                        &opts,
                        &is_positive,
                        &mut grads,
                    )?;
                    all_reduce_gradients(&comm, &mut grads)?;
                    Ok((grads, out))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect()
    })
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let diff: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    let norm: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    if norm == 0.0 {
        if diff == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        (diff / norm).sqrt()
    }
}

fn bits(w: &BertWeights) -> Vec<u32> {
    w.tensors()
        .iter()
        .flat_map(|t| t.iter().map(|v| v.to_bits()))
        .collect()
}

#[test]
fn one_rank_is_bitwise_the_single_process_step() {
    let bert = model();
    let ex = global_batch();
    let (want, stats) = single_process(&bert, &ex, ActivationMode::Keep);
    let got = data_parallel(&bert, &ex, &[ex.len()], ActivationMode::Keep);
    assert_eq!(got[0].1.stats, stats);
    assert!(bits(&got[0].0) == bits(&want), "gradients differ");
}

#[test]
fn ranks_match_the_single_process_gradients() {
    let bert = model();
    let ex = global_batch();
    let (want, want_stats) = single_process(&bert, &ex, ActivationMode::Keep);
    assert!(want_stats.loss.is_finite() && want_stats.loss > 0.0);
    let cases: [(&[usize], ActivationMode); 4] = [
        (&[4, 3], ActivationMode::Keep),
        (&[3, 2, 2], ActivationMode::Keep),
        (&[1, 5, 1], ActivationMode::Recompute),
        (&[3, 0, 4], ActivationMode::Keep), // a rank with nothing to encode
    ];
    for (sizes, mode) in cases {
        let ranks = data_parallel(&bert, &ex, sizes, mode);
        let reference = bits(&ranks[0].0);
        for (r, (grads, out)) in ranks.iter().enumerate() {
            // the all-reduce hands every rank the one rank-order sum
            assert!(
                bits(grads) == reference,
                "{sizes:?}: rank {r} differs from rank 0"
            );
            assert_eq!(out.stats, ranks[0].1.stats, "{sizes:?}: rank {r} stats");
            let loss_err = (out.stats.loss - want_stats.loss).abs() / want_stats.loss;
            assert!(
                loss_err < 1e-6,
                "{sizes:?}: loss {} vs {}",
                out.stats.loss,
                want_stats.loss
            );
            assert_eq!(out.stats.accuracy, want_stats.accuracy);
        }
        let mut worst = 0.0f64;
        for (t, (g, w)) in ranks[0].0.tensors().iter().zip(want.tensors()).enumerate() {
            let e = rel_l2(g, w);
            assert!(
                e <= GRAD_TOL,
                "{sizes:?}: tensor {t} relative L2 error {e:e}"
            );
            worst = worst.max(e);
        }
        let flat = |w: &BertWeights| -> Vec<f32> { w.tensors().concat() };
        let whole = rel_l2(&flat(&ranks[0].0), &flat(&want));
        assert!(
            whole <= WHOLE_TOL,
            "{sizes:?}: whole-gradient relative L2 error {whole:e}"
        );
        eprintln!("{sizes:?} {mode:?}: relative L2 error {whole:e}, worst tensor {worst:e}");
    }
}

/// The layout of a [3, 2, 2] split, checked against the single-process batch by hand.
#[test]
fn gathered_labels_follow_the_global_layout() {
    let bert = model();
    let h = bert.cfg.hidden_size;
    let ex = global_batch();
    let whole = pack(&ex, bert.cfg.vocab_size);
    let sizes = [3usize, 2, 2];
    let shards = split(&ex, &sizes);
    let comms = InProcess::group(3);
    let results: Vec<(GlobalLayout, Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .zip(&shards)
            .map(|(comm, shard)| {
                let bert = &bert;
                s.spawn(move || {
                    let p = pack(shard, bert.cfg.vocab_size);
                    let layout = GlobalLayout::gather(&comm, &p.shard(), &encoder(bert)).unwrap();
                    // each local row filled with the index of its global sequence
                    let rank = comm.rank();
                    let local: Vec<f32> = (0..p.packed.sequences())
                        .flat_map(|s| vec![layout.global_sequence(rank, s) as f32; h])
                        .collect();
                    let (q, d) = gather_embeddings(&comm, &layout, &local, h).unwrap();
                    (layout, q, d)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let (layout, q, d) = &results[0];
    for other in &results[1..] {
        assert_eq!(other.0, *layout);
        assert!(other.1 == *q && other.2 == *d);
    }
    let b = ex.len();
    assert_eq!(
        (layout.world(), layout.batch(), layout.docs()),
        (3, 7, 7 + 11)
    );
    assert_eq!(layout.targets(), (0..7).collect::<Vec<_>>());
    // query i of rank r is global query off_r + i; its positive is document off_r + i
    assert_eq!(layout.queries_of(0), 0..3);
    assert_eq!(layout.queries_of(1), 3..5);
    assert_eq!(layout.queries_of(2), 5..7);
    // negatives: rank 0 has 2 + 1 + 0, rank 1 3 + 2, rank 2 1 + 2, after the 7 positives
    assert_eq!(layout.negatives_of(0), 7..10);
    assert_eq!(layout.negatives_of(1), 10..15);
    assert_eq!(layout.negatives_of(2), 15..18);
    let own: Vec<_> = (0..b).map(|g| layout.own_negatives(g)).collect();
    assert_eq!(own, [7..9, 9..10, 10..10, 10..13, 13..15, 15..16, 16..18]);
    // keys in the single-process order
    assert_eq!(layout.query_keys, whole.query_keys);
    assert_eq!(layout.doc_keys, whole.doc_keys);
    assert_eq!(layout.negative_log_weights, whole.log_weights);
    // the false-negative mask crosses ranks exactly as in the single process
    let log_w = layout.log_weights(&is_positive);
    let want = trainer_log_weights(&ex);
    let same = log_w
        .iter()
        .zip(&want)
        .all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(same, "log-weights differ from the trainer's");
    let d_n = layout.docs();
    assert_eq!(log_w[3], f32::NEG_INFINITY); // query 0 vs query 3's positive (rank 1)
    assert_eq!(log_w[5 * d_n + 11], f32::NEG_INFINITY); // query 5 vs document 231 (rank 1)
    assert_eq!(log_w[d_n + 9], f32::NEG_INFINITY); // query 1's own negative, also relevant
    assert_eq!(log_w[17], f32::NEG_INFINITY); // query 0 vs document 100 drawn by query 6
    assert_eq!(log_w[6 * d_n + 17], layout.negative_log_weights[10]);
    // gathered rows: query g holds g, document j holds B + j (the trainer's sequence index)
    for (g, row) in q.chunks_exact(h).enumerate() {
        assert!(row.iter().all(|&v| v == g as f32), "query row {g}");
    }
    for (j, row) in d.chunks_exact(h).enumerate() {
        assert!(row.iter().all(|&v| v == (b + j) as f32), "document row {j}");
    }
}

#[test]
fn all_reduce_and_all_gather_are_bitwise_identical_on_every_rank() {
    let world = 3;
    let n = 4096;
    // values spanning many magnitudes, so the summation order shows in the last bits
    let data = |r: usize| -> Vec<f32> {
        (0..n)
            .map(|i| {
                let x = ((i * 7919 + r * 104729) % 1000) as f32 / 1000.0 - 0.5;
                x * 10f32.powi(((i + 3 * r) % 13) as i32 - 6)
            })
            .collect()
    };
    let counts = [3usize, 0, 5];
    let comms = InProcess::group(world);
    let results: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                s.spawn(move || {
                    let r = comm.rank();
                    let mut sum = data(r);
                    comm.all_reduce_sum(&mut sum).unwrap();
                    let local: Vec<f32> = (0..counts[r]).map(|i| (10 * r + i) as f32).collect();
                    let mut all = vec![0.0f32; 8];
                    comm.all_gather(&local, &counts, &mut all).unwrap();
                    (sum, all)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // the rank-order sum ((x0 + x1) + x2)
    let (x0, x1, x2) = (data(0), data(1), data(2));
    let want: Vec<u32> = (0..n)
        .map(|i| ((x0[i] + x1[i]) + x2[i]).to_bits())
        .collect();
    for (r, (sum, all)) in results.iter().enumerate() {
        let got: Vec<u32> = sum.iter().map(|v| v.to_bits()).collect();
        assert!(got == want, "rank {r}: all-reduce differs");
        assert_eq!(all, &[0.0, 1.0, 2.0, 20.0, 21.0, 22.0, 23.0, 24.0]);
    }
}

#[test]
fn misuse_fails_on_every_rank_instead_of_hanging() {
    // buffers of different lengths
    let comms = InProcess::group_with_timeout(2, Duration::from_secs(20));
    let errs: Vec<bool> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                s.spawn(move || {
                    let mut buf = vec![1.0f32; 3 + comm.rank()];
                    let first = comm.all_reduce_sum(&mut buf).is_err();
                    // the group stays broken
                    first && comm.all_reduce_sum(&mut [1.0]).is_err()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(errs, [true, true]);

    // a rank that leaves: the other is told, not left waiting for the timeout
    let mut comms = InProcess::group_with_timeout(2, Duration::from_secs(60));
    let last = comms.pop().unwrap();
    let started = std::time::Instant::now();
    let waiter = std::thread::spawn(move || last.all_reduce_sum(&mut [1.0]));
    std::thread::sleep(Duration::from_millis(50));
    drop(comms);
    assert!(waiter.join().unwrap().is_err());
    assert!(started.elapsed() < Duration::from_secs(30));

    // a rank waiting alone times out
    let comms = InProcess::group_with_timeout(2, Duration::from_millis(100));
    assert!(comms[0].all_reduce_sum(&mut [1.0]).is_err());

    // an invalid shard on one rank is an error on every rank
    let bert = model();
    let ex = global_batch();
    let shards = split(&ex, &[4, 3]);
    let comms = InProcess::group_with_timeout(2, Duration::from_secs(20));
    let errs: Vec<bool> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .zip(&shards)
            .map(|(comm, shard)| {
                let bert = &bert;
                s.spawn(move || {
                    let mut p = pack(shard, bert.cfg.vocab_size);
                    if comm.rank() == 1 {
                        p.doc_keys.pop();
                    }
                    GlobalLayout::gather(&comm, &p.shard(), &encoder(bert)).is_err()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(errs, [true, true]);
}

/// The groups a resident optimizer sums as the backward finishes them cover every parameter
/// tensor once: layer l's group is layer l's twelve tensors, from the last layer down, and
/// the embeddings' five come last.
#[test]
fn backward_groups_follow_the_backward_over_every_tensor() {
    let bert = model();
    let w = &bert.weights;
    let tensors = w.tensors();
    let groups = backward_groups(w.layers.len());
    assert_eq!(groups.len(), w.layers.len() + 1);
    let mut seen = vec![0; tensors.len()];
    for g in &groups {
        for i in g.clone() {
            seen[i] += 1;
        }
    }
    assert!(seen.iter().all(|&n| n == 1), "each tensor once: {seen:?}");
    let same = |i: usize, t: &[f32]| std::ptr::eq(tensors[i].as_ptr(), t.as_ptr());
    for (k, g) in groups.iter().enumerate().take(w.layers.len()) {
        let layer = &w.layers[w.layers.len() - 1 - k];
        assert_eq!(g.len(), 12);
        assert!(same(g.start, &layer.qkv_w) && same(g.end - 1, &layer.out_ln_b));
    }
    let emb = groups.last().unwrap();
    assert_eq!(emb.clone(), 0..5);
    assert!(same(0, &w.word_emb) && same(4, &w.emb_ln_b));
}
