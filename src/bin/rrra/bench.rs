//! `rrra bench`: the standard workloads, printed as a table next to the peer figures.

use crate::device_arg::Device;
use clap::Args;
use rrra::bench::{self, Measurement};
use rrra::index::Dtype;
use rrra::model::{Encoder, EncoderOptions};
use rrra::{data, Error, Result};
use std::path::PathBuf;

#[derive(Args)]
pub struct BenchArgs {
    /// Model folder (all-MiniLM-L6-v2 for the published workloads).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// The shared folder holding bench/sentences-56tok.txt and data/scifact.
    #[arg(long, value_name = "DIR", default_value = "../shared")]
    pub shared: PathBuf,
    /// Workloads to run, comma-separated: encode-sentences, encode-docs, topk-batch, topk-single,
    /// train-step, query-path (batch-1 encode + top-100 + adapter rerank latency per stage, f32
    /// and f16 stores), query-load (the Retriever shared by 1, 2 and 8 client threads); the
    /// last two are not in the default set.
    #[arg(long, value_delimiter = ',', default_values_t = ["encode-sentences".to_string(), "encode-docs".into(), "topk-batch".into(), "topk-single".into(), "train-step".into()])]
    pub only: Vec<String>,
    /// Timed repetitions per workload, after one untimed warm-up (encode-docs: always 1;
    /// topk-batch: at least 3); the median is reported.
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Also write the measurements as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Where query-load serves from: cpu, or a CUDA device (cuda is cuda:0; bf16 encoder, CUDA
    /// graphs, 8 worker streams). The other workloads run on the CPU.
    #[arg(long, default_value = "cpu", value_name = "cpu|cuda[:N]")]
    pub device: Device,
}

pub fn run(a: BenchArgs) -> Result<()> {
    let gpu_ordinal = a.device.cuda_ordinal();
    let wants = |w: &str| a.only.iter().any(|o| o == w);
    for w in &a.only {
        if ![
            "encode-sentences",
            "encode-docs",
            "topk-batch",
            "topk-single",
            "train-step",
            "query-path",
            "query-load",
        ]
        .contains(&w.as_str())
        {
            return Err(Error::InvalidArgument(format!("unknown workload `{w}`")));
        }
    }
    let mut rows: Vec<Measurement> = Vec::new();
    if wants("encode-sentences") || wants("encode-docs") {
        let model = a
            .model
            .clone()
            .unwrap_or_else(rrra::util::default_model_dir);
        let enc = Encoder::load(&model, &EncoderOptions::default())?;
        if wants("encode-sentences") {
            let path = a.shared.join("bench/sentences-56tok.txt");
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("encode-sentences: {} sentences ...", lines.len());
            rows.push(bench::encode_sentences(&enc, &lines, a.reps)?);
        }
        if wants("encode-docs") {
            let docs = data::read_corpus(&a.shared.join("data/scifact/corpus.jsonl"))?;
            eprintln!("encode-docs: 1024 documents ...");
            // One timed pass: it takes about a minute, and the warm-up pass doubles that.
            rows.push(bench::encode_docs(&enc, &docs, 1)?);
        }
    }
    if wants("train-step") {
        let model = a
            .model
            .clone()
            .unwrap_or_else(rrra::util::default_model_dir);
        let mut enc = Encoder::load(&model, &EncoderOptions::default())?;
        let docs = data::read_corpus(&a.shared.join("data/scifact/corpus.jsonl"))?;
        let queries = data::read_queries(&a.shared.join("data/scifact/queries.jsonl"))?;
        let q: Vec<&str> = queries.iter().map(|q| q.text.as_str()).collect();
        let d: Vec<&str> = docs.iter().map(|d| d.text.as_str()).collect();
        eprintln!("train-step: 16 queries x 4 documents ...");
        rows.push(bench::train_step(&mut enc, &q, &d, a.reps)?);
    }
    if wants("topk-batch") || wants("topk-single") {
        eprintln!(
            "top-k data: {} x {} ...",
            bench::TOPK_CORPUS,
            bench::TOPK_DIM
        );
        let (corpus, queries) = bench::topk_data();
        if wants("topk-batch") {
            // At least 3 timed passes: one takes about a second and the machine is noisy.
            rows.push(bench::topk_batch(&corpus, &queries, a.reps.max(3))?);
        }
        if wants("topk-single") {
            let some = &queries[..100 * bench::TOPK_DIM];
            rows.push(bench::topk_single(&corpus, some, a.reps)?);
        }
    }
    let serving_queries = || -> Result<Vec<String>> {
        let queries = data::read_queries(&a.shared.join("data/scifact/queries.jsonl"))?;
        Ok(queries.into_iter().take(300).map(|q| q.text).collect())
    };
    let model = a
        .model
        .clone()
        .unwrap_or_else(rrra::util::default_model_dir);
    let mut latency = Vec::new();
    if wants("query-path") {
        let enc = Encoder::load(
            &model,
            &EncoderOptions {
                max_length: Some(bench::QUERY_MAX_TOKENS),
                ..Default::default()
            },
        )?;
        let texts = serving_queries()?;
        let q: Vec<&str> = texts.iter().map(String::as_str).collect();
        for dtype in [Dtype::F32, Dtype::F16] {
            eprintln!(
                "query-path: {} queries, {dtype} store {} x {}, rerank {} ...",
                q.len(),
                bench::QUERY_STORE,
                enc.dim(),
                bench::QUERY_RERANK_K
            );
            latency.push(bench::query_path(&enc, &q, dtype)?);
        }
    }
    let mut load = Vec::new();
    if wants("query-load") {
        let texts = serving_queries()?;
        let q: Vec<&str> = texts.iter().map(String::as_str).collect();
        let dir = tempfile_dir()?;
        // one worker stream per client at most
        let gpu = gpu_ordinal.map(|ordinal| rrra::device::retriever::GpuEngineOptions {
            ordinal,
            workers: 8,
            ..Default::default()
        });
        let on = gpu_ordinal.map_or("the CPU".to_string(), |o| format!("GPU {o}"));
        for dtype in [Dtype::F32, Dtype::F16] {
            eprintln!(
                "query-load on {on}: {} queries, {dtype} store {} documents, 1/2/8 clients ...",
                q.len(),
                bench::QUERY_STORE
            );
            let points = bench::query_load(&model, dir.path(), &q, &[1, 2, 8], dtype, gpu.clone());
            load.push((dtype.name(), points?));
        }
    }
    println!(
        "threads: {}, cpu: {}",
        rayon::current_num_threads(),
        cpu_model().unwrap_or_else(|| "unknown".into())
    );
    println!("| workload | rrra | unit | peer | peer figure | ratio to peer (mid) |");
    println!("|---|---|---|---|---|---|");
    for m in &rows {
        let mid = (m.peer.0 + m.peer.1) / 2.0;
        let peer = if m.peer.0 == m.peer.1 {
            format!("{}", m.peer.0)
        } else {
            format!("{}–{}", m.peer.0, m.peer.1)
        };
        println!(
            "| {} | {:.1} | {} | {} | {} | {:.2}× |",
            m.workload,
            m.throughput,
            m.unit,
            m.peer_name,
            peer,
            m.throughput / mid
        );
    }
    for l in &latency {
        println!();
        println!(
            "batch-1 query path, {} store, {} queries (ms) | p50 | p95 | p99 |",
            l.store_dtype, l.queries
        );
        println!("|---|---|---|---|");
        for (name, p) in [
            ("encode (≤ 16 tokens)", l.encode),
            ("top-100 search", l.search),
            ("adapter scoring + rerank of 100", l.adapter),
            ("total", l.total),
        ] {
            println!("| {name} | {:.3} | {:.3} | {:.3} |", p.p50, p.p95, p.p99);
        }
        println!(
            "adapter share of the query latency (median over queries): {:.1}%",
            100.0 * l.adapter_share
        );
    }
    for (dtype, points) in &load {
        println!();
        let on = gpu_ordinal.map_or("CPU".to_string(), |o| format!("GPU {o}"));
        println!("Retriever under load on the {on}, {dtype} store: retrieve(k 10, rerank 100)");
        println!("| clients | requests | p50 ms | p95 ms | p99 ms | requests/s |");
        println!("|---|---|---|---|---|---|");
        for p in points {
            println!(
                "| {} | {} | {:.2} | {:.2} | {:.2} | {:.1} |",
                p.clients, p.requests, p.latency.p50, p.latency.p95, p.latency.p99, p.throughput
            );
        }
    }
    if let Some(p) = &a.json {
        let text = serde_json::to_string_pretty(&serde_json::json!({
            "workloads": rows, "query_path": latency,
            "query_load": load.iter().map(|(d, p)| serde_json::json!({"store": d, "gpu": gpu_ordinal, "points": p})).collect::<Vec<_>>(),
        }))
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        rrra::util::atomic_write(p, |w| {
            use std::io::Write;
            w.write_all(text.as_bytes()).map_err(|e| Error::io(p, e))
        })?;
    }
    Ok(())
}

fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("model name"))?;
    Some(line.split(':').nth(1)?.trim().to_string())
}

/// A scratch folder for the load benchmark's store and adapter, removed when dropped.
fn tempfile_dir() -> Result<TempDir> {
    let base = std::env::temp_dir();
    let path = base.join(format!("rrra-bench-{}", std::process::id()));
    std::fs::create_dir_all(&path).map_err(|e| Error::io(&path, e))?;
    Ok(TempDir(path))
}

struct TempDir(PathBuf);

impl TempDir {
    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
