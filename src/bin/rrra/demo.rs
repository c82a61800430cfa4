//! `rrra demo`, the built-in end-to-end job: encode a BEIR collection (SciFact by default) with
//! all-MiniLM-L6-v2, search its test queries, evaluate, and compare with reference metrics when
//! given. The store is kept in the work folder and reused while model and corpus are unchanged.

use crate::device_arg::{cuda_precision, parse_precision, Device};
use crate::progress::Phase;
use clap::Args;
use rrra::data::{read_beir_folder, write_run};
use rrra::device::encoder::Precision;
use rrra::eval::{evaluate, EvalOptions};
use rrra::index::store::Store;
use rrra::index::Dtype;
use rrra::model::{Encoder, EncoderOptions};
use rrra::pipeline::GpuOptions;
use rrra::util::{cache_dir, default_model_dir};
use rrra::{pipeline, Error, Result};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct DemoArgs {
    /// Model folder [default: $RRRA_MODEL, else the folder tools/fetch-model.sh fills].
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv).
    #[arg(long, value_name = "DIR", default_value = "../shared/data/scifact")]
    pub data: PathBuf,
    /// Qrels split to evaluate.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Where the store, run and metrics go [default: $RRRA_CACHE/demo].
    #[arg(long, value_name = "DIR")]
    pub work: Option<PathBuf>,
    /// Reference metrics (pytrec_eval names, as in expected_metrics.json): print them beside
    /// ours and fail when nDCG@10 differs by more than 0.002 or Recall@100 by more than 0.003.
    #[arg(long, value_name = "FILE")]
    pub expect: Option<PathBuf>,
    #[arg(long, default_value_t = 100)]
    pub k: usize,
    /// Where to run: cpu, or a CUDA device (cuda is cuda:0), which encodes the corpus and the
    /// queries and searches there (the store gets its own file, `<name>.gpu-<precision>.rrra`).
    #[arg(long, default_value = "cpu", value_name = "cpu|cuda[:N]")]
    pub device: Device,
    /// The GPU encoder's arithmetic: bf16 (tensor cores) or f32 [default: bf16; only with
    /// --device cuda].
    #[arg(long, value_name = "bf16|f32", value_parser = parse_precision)]
    pub precision: Option<Precision>,
}

pub fn run(a: DemoArgs) -> Result<()> {
    let gpu = cuda_precision(a.device, a.precision)?;
    let model = a.model.clone().unwrap_or_else(default_model_dir);
    if !model.join("model.safetensors").is_file() {
        return Err(Error::format(
            &model,
            "model not found; run tools/fetch-model.sh (or pass --model DIR)",
        ));
    }
    let work = a.work.clone().unwrap_or_else(|| cache_dir().join("demo"));
    std::fs::create_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    let name = a
        .data
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());

    let data = read_beir_folder(&a.data, &a.split)?;
    let encoder = Encoder::load(&model, &EncoderOptions::default())?;
    eprintln!(
        "{name}: {} documents, {} {} queries judged; model {} (dim {}, max length {}) on {}",
        data.corpus.len(),
        data.qrels.len(),
        a.split,
        model.display(),
        encoder.dim(),
        encoder.max_length(),
        a.device
    );

    let store_path = match gpu {
        Some((_, precision)) => work.join(format!("{name}.gpu-{precision}.rrra")),
        None => work.join(format!("{name}.rrra")),
    };
    if store_is_current(&store_path, &encoder, &data.corpus) {
        eprintln!("reusing {} (same model and corpus)", store_path.display());
    } else {
        let phase = Phase::new(data.corpus.len(), "encoded");
        match gpu {
            Some((ordinal, precision)) => {
                let opts = GpuOptions {
                    ordinal,
                    precision,
                    batch_size: 64,
                };
                pipeline::encode_corpus_on_gpu(
                    &encoder,
                    &data.corpus,
                    &store_path,
                    Dtype::F32,
                    &opts,
                    &phase.tick(),
                )?
            }
            None => pipeline::encode_corpus(
                &encoder,
                &data.corpus,
                &store_path,
                Dtype::F32,
                32,
                &phase.tick(),
            )?,
        }
        phase.finish("docs");
    }
    let store = Store::open(&store_path)?;
    pipeline::check_store_matches(&store, &store_path, &encoder)?;

    let queries: Vec<_> = data
        .queries
        .iter()
        .filter(|q| data.qrels.get(&q.id).is_some())
        .cloned()
        .collect();
    let phase = Phase::new(queries.len(), "searched");
    let run = match gpu {
        Some((ordinal, precision)) => {
            let opts = GpuOptions {
                ordinal,
                precision,
                batch_size: 32,
            };
            let tick = phase.tick();
            rrra::retriever::search_on_gpu(&model, &store_path, &queries, a.k, None, &opts, &tick)?
        }
        None => pipeline::search(&encoder, &store, &queries, a.k, 32, &phase.tick())?,
    };
    phase.finish("queries");
    let run_path = work.join(format!("{name}.{}.run.trec", a.split));
    write_run(&run_path, &run, "rrra")?;

    let e = evaluate(&run, &data.qrels, &EvalOptions::default());
    print!("{}", e.table());
    let metrics_path = work.join(format!("{name}.{}.metrics.json", a.split));
    let text = e.to_json().to_string();
    rrra::util::atomic_write(&metrics_path, |w| {
        use std::io::Write;
        w.write_all(text.as_bytes())
            .map_err(|err| Error::io(&metrics_path, err))
    })?;
    eprintln!(
        "wrote {} and {}",
        run_path.display(),
        metrics_path.display()
    );
    if let Some(expect) = &a.expect {
        compare(expect, &e.mean)?;
    }
    Ok(())
}

fn store_is_current(path: &Path, encoder: &Encoder, corpus: &[rrra::data::Document]) -> bool {
    let Ok(store) = Store::open(path) else {
        return false;
    };
    let meta: serde_json::Value = serde_json::from_str(store.metadata_json()).unwrap_or_default();
    store.fingerprint() == encoder.fingerprint()
        && store.len() == corpus.len()
        && meta["corpus_xxh3"].as_str() == Some(&format!("{:016x}", pipeline::corpus_hash(corpus)))
}

/// Prints our metrics beside the reference and fails outside the stated tolerances.
fn compare(path: &Path, ours: &std::collections::BTreeMap<String, f64>) -> Result<()> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::parse(path, e.line(), e.to_string()))?;
    let reference = v.get("metrics").unwrap_or(&v);
    // (reference name, our key, tolerance that fails the run)
    let rows = [
        ("ndcg_cut_10", "ndcg@10", Some(0.002)),
        ("recall_100", "recall@100", Some(0.003)),
        ("recip_rank", "mrr", None),
        ("recall_1", "recall@1", None),
        ("recall_5", "recall@5", None),
        ("recall_10", "recall@10", None),
        ("map_cut_100", "map@100", None),
    ];
    println!("\n| metric | rrra | reference | difference |");
    println!("|---|---|---|---|");
    let mut failures = Vec::new();
    for (rname, ours_key, tol) in rows {
        let (Some(r), Some(o)) = (
            reference.get(rname).and_then(|x| x.as_f64()),
            ours.get(ours_key),
        ) else {
            continue;
        };
        println!("| {ours_key} | {o:.4} | {r:.4} | {:+.4} |", o - r);
        if let Some(t) = tol {
            if (o - r).abs() > t {
                failures.push(format!(
                    "{ours_key} {o:.4} vs reference {r:.4} (tolerance {t})"
                ));
            }
        }
    }
    if failures.is_empty() {
        println!("\nwithin tolerance of {}", path.display());
        Ok(())
    } else {
        Err(Error::mismatch(
            path,
            format!("metrics differ from the reference: {}", failures.join("; ")),
        ))
    }
}
