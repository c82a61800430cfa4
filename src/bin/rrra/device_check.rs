//! `rrra device-check`: on a GPU machine, measure the ceilings (device copy bandwidth, a large
//! cuBLAS bf16 GEMM), time every kernel family and print one table with each kernel's share of
//! the ceiling that bounds it. The GPU correctness tests run separately (tools/device-check.sh
//! runs both).

use crate::device_arg::Device;
use clap::Args;
use rrra::device::{
    adamw, adapter, adapter_train, attention_backward, backward, ceilings, encoder, encoder_train,
    infonce, sampler, topk, train_step, Gpu, KernelTiming,
};
use rrra::{Error, Result};
use std::path::PathBuf;

#[derive(Args)]
pub struct DeviceCheckArgs {
    /// The CUDA device to measure (cuda is cuda:0).
    #[arg(long, default_value = "cuda", value_name = "cuda[:N]")]
    pub device: Device,
    /// Folder for the JSON results [default: $RRRA_DEVICE_LOG, else none].
    #[arg(long, value_name = "DIR")]
    pub log_dir: Option<PathBuf>,
    /// Only these parts (comma-separated): top-k, encoder, adapter, adapter-training, sampler,
    /// infonce, adamw, encoder-backward, attention-backward, encoder-training,
    /// training-products, training-step, query-path [default: all].
    #[arg(long, value_delimiter = ',', value_name = "PART")]
    pub only: Vec<String>,
}

/// A kernel family's timings.
type Bench = fn(&Gpu) -> Result<Vec<KernelTiming>>;

/// The parts of the check, as `--only` names them.
const PARTS: [&str; 13] = [
    "top-k",
    "encoder",
    "adapter",
    "adapter-training",
    "sampler",
    "infonce",
    "adamw",
    "encoder-backward",
    "attention-backward",
    "encoder-training",
    "training-products",
    "training-step",
    "query-path",
];

pub fn run(a: DeviceCheckArgs) -> Result<()> {
    let Some(ordinal) = a.device.cuda_ordinal() else {
        return Err(Error::InvalidArgument(format!(
            "--device {}: the device check measures a GPU; pass --device cuda[:N]",
            a.device
        )));
    };
    if let Some(bad) = a.only.iter().find(|p| !PARTS.contains(&p.as_str())) {
        return Err(Error::InvalidArgument(format!(
            "--only {bad}: the parts are {}",
            PARTS.join(", ")
        )));
    }
    let wanted = |part: &str| a.only.is_empty() || a.only.iter().any(|p| p == part);
    let gpu = Gpu::open(ordinal)?;
    println!("{}", gpu.info());
    let ceil = ceilings::measure(&gpu)?;
    println!(
        "ceilings measured now: device copy {:.0} GB/s (read + write), cuBLAS bf16 GEMM 8192^3 {:.0} TFLOP/s",
        ceil.copy_gb_s, ceil.bf16_gemm_tflop_s
    );
    let dir = a
        .log_dir
        .or_else(|| std::env::var_os("RRRA_DEVICE_LOG").map(PathBuf::from));
    if let Some(dir) = &dir {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    // Rows are printed, and the JSON rewritten, as each family finishes, so a later failure
    // (or a kill at a time limit) loses nothing measured before it. One family failing, even
    // by a panic, must not hide the others' numbers; the command fails at the end if any did.
    let mut report = Report {
        device: gpu.info().clone(),
        ceilings: ceil,
        kernels: Vec::new(),
        query_path: Vec::new(),
        failed: Vec::new(),
    };
    println!("| kernel | problem | ms | GB/s | % of copy | TFLOP/s | % of bf16 GEMM |");
    println!("|---|---|---|---|---|---|---|");
    let families: [Bench; 12] = [
        topk::bench,
        encoder::bench,
        adapter::bench,
        adapter_train::bench,
        sampler::bench,
        infonce::bench,
        adamw::bench,
        backward::bench,
        attention_backward::bench,
        encoder_train::bench,
        encoder_train::bench_products,
        train_step::bench,
    ];
    for (what, bench) in PARTS.into_iter().zip(families).filter(|(p, _)| wanted(p)) {
        eprintln!("timing {what} kernels ...");
        match guarded(what, || bench(&gpu)) {
            Ok(r) => {
                for row in &r {
                    print_row(row, &ceil);
                }
                report.kernels.extend(r);
            }
            Err(e) => {
                eprintln!("error: {what} benchmark failed: {e}");
                report.failed.push(format!("{what}: {e}"));
            }
        }
        report.write(dir.as_deref())?;
    }
    let paths = if wanted("query-path") {
        &[(false, false), (true, false), (true, true)][..]
    } else {
        &[]
    };
    for &(graphs, rerank) in paths {
        let what = format!("batch-1 query path (graphs {graphs}, rerank {rerank})");
        match guarded(&what, || query_path_latency(&gpu, graphs, rerank)) {
            Ok(l) => {
                println!(
                    "batch-1 query path (16-token query, MiniLM-L6 shape bf16 encode{} + mean pool + L2, top-100 over 1M x 384 f32{}, results on the host), {} queries: p50 {:.3} ms, p95 {:.3} ms, p99 {:.3} ms",
                    if graphs { " as a CUDA graph" } else { "" },
                    if rerank { ", adapter logits of the 100 hits (d = h = 384) and the rerank" } else { "" },
                    l.queries, l.p50_ms, l.p95_ms, l.p99_ms
                );
                report.query_path.push(l);
            }
            Err(e) => {
                eprintln!("error: {what} failed: {e}");
                report.failed.push(format!("{what}: {e}"));
            }
        }
        report.write(dir.as_deref())?;
    }
    if report.failed.is_empty() {
        Ok(())
    } else {
        Err(Error::Cuda(format!(
            "{} of the device check's parts failed: {}",
            report.failed.len(),
            report.failed.join("; ")
        )))
    }
}

/// What `kernels.json` holds.
#[derive(serde::Serialize)]
struct Report {
    device: rrra::device::DeviceInfo,
    ceilings: ceilings::Ceilings,
    kernels: Vec<KernelTiming>,
    query_path: Vec<QueryLatency>,
    /// The parts that failed, with their errors.
    failed: Vec<String>,
}

impl Report {
    /// Rewrites `dir/kernels.json` (atomically) when there is a log folder.
    fn write(&self, dir: Option<&std::path::Path>) -> Result<()> {
        let Some(dir) = dir else { return Ok(()) };
        let path = dir.join("kernels.json");
        let json = serde_json::to_string(self).map_err(|e| Error::Cuda(e.to_string()))?;
        rrra::util::atomic_write(&path, |w| {
            use std::io::Write;
            w.write_all(json.as_bytes())
                .map_err(|e| Error::io(&path, e))
        })
    }
}

/// `f`, with a panic turned into an error naming `what`: a bug in one benchmark must not end
/// the whole check.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into());
        Err(Error::Cuda(format!("{what} panicked: {msg}")))
    })
}

/// One table row: time, and the achieved rate against the ceiling that bounds it.
fn print_row(r: &KernelTiming, ceil: &ceilings::Ceilings) {
    let s = r.ms * 1e-3;
    let gbs = r.bytes / s / 1e9;
    let tf = r.flops / s / 1e12;
    let cell = |v: f64, ok: bool, digits: usize| {
        if ok {
            format!("{v:.digits$}")
        } else {
            "–".to_string()
        }
    };
    println!(
        "| {} | {} | {:.3} | {} | {} | {} | {} |",
        r.name,
        r.shape,
        r.ms,
        cell(gbs, r.bytes > 0.0, 0),
        cell(100.0 * gbs / ceil.copy_gb_s, r.bytes > 0.0, 0),
        cell(tf, r.flops > 0.0, 1),
        cell(100.0 * tf / ceil.bf16_gemm_tflop_s, r.flops > 0.0, 0),
    );
}

/// Wall-clock latency of the serving path for one query, end to end from token ids on the host
/// to hits on the host: encode (bf16) → pooled, normalised embedding → exact top-100 over a
/// resident 1M × 384 f32 corpus, then, with `rerank`, the adapter's logits of the 100 hits read
/// from the resident corpus and the rerank's ordering on the host. Random weights and data
/// (latency does not depend on them).
#[derive(Debug, Clone, serde::Serialize)]
struct QueryLatency {
    graphs: bool,
    rerank: bool,
    queries: usize,
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
}

fn query_path_latency(gpu: &Gpu, graphs: bool, rerank: bool) -> Result<QueryLatency> {
    use rrra::device::encoder::{GpuBert, Precision};
    use rrra::index::Dtype;
    use rrra::model::synthetic::{minilm_l6_config, random_batch, random_bert};
    use rrra::model::Pooling;
    let cfg = minilm_l6_config();
    let bert = random_bert(cfg.clone(), 7);
    // One stream of its own for the encoder, the search and the rerank, as a serving worker
    // has (`GpuQueryEngine`); graphs cannot be captured on the legacy default stream.
    let stream = gpu.new_stream()?;
    let mut enc = GpuBert::on_stream(gpu, stream.clone(), &bert, Precision::Bf16, 64, 1)?;
    enc.use_graphs(graphs);
    let corpus = topk::GpuCorpus::synthetic(gpu, 1_000_000, cfg.hidden_size, Dtype::F32, 11)?;
    gpu.synchronize()?;
    let mut params = rrra::adapter::AdapterParams::init(cfg.hidden_size, cfg.hidden_size, 3)?;
    for (i, w) in params.w2.iter_mut().enumerate() {
        *w = ((i % 7) as f32 - 3.0) * 1e-3;
    }
    let mut ad = rrra::device::adapter::GpuAdapter::on_stream(gpu, stream.clone(), &params, 100)?;
    let (mut rows, mut logits) = (vec![0u32; 100], vec![0.0f32; 100]);
    let mut one = |q: &[f32], hits: &[rrra::index::Hit]| -> Result<()> {
        if rerank {
            for (r, h) in rows.iter_mut().zip(hits) {
                *r = h.index as u32;
            }
            ad.logits_for_rows(&corpus, q, &rows, 100, &mut logits)?;
            let scores: Vec<f32> = hits.iter().map(|h| h.score).collect();
            let ranked = rrra::adapter::rerank::rerank_list(&scores, &logits, 0.05, 1.0);
            std::hint::black_box(ranked);
        }
        Ok(())
    };
    let mut searcher = topk::GpuSearcher::on_stream(gpu, stream, 1, 100, 1 << 20)?;
    searcher.reserve(cfg.hidden_size)?;
    let batches: Vec<_> = (0..64)
        .map(|i| random_batch(&cfg, 1, 16..=16, 100 + i))
        .collect();
    // Warm-up: first launches load modules and fill caches.
    for b in batches.iter().take(8) {
        let q = enc.embed(b, Pooling::Mean, true)?;
        let hits = searcher.search(&corpus, &q, 100)?;
        one(&q, &hits[0])?;
    }
    let n = 500;
    let mut ms = Vec::with_capacity(n);
    for i in 0..n {
        let t = std::time::Instant::now();
        let q = enc.embed(&batches[i % batches.len()], Pooling::Mean, true)?;
        let hits = searcher.search(&corpus, &q, 100)?;
        if let Some(h) = hits.first() {
            one(&q, h)?;
        }
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        if hits.first().map(Vec::len) != Some(100) {
            return Err(Error::Cuda(
                "the query path returned fewer than 100 hits".into(),
            ));
        }
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    let at = |p: f64| ms[((n - 1) as f64 * p).round() as usize];
    Ok(QueryLatency {
        graphs,
        rerank,
        queries: n,
        p50_ms: at(0.5),
        p95_ms: at(0.95),
        p99_ms: at(0.99),
    })
}
