//! The core commands: encode, search, eval, info, export.

use crate::device_arg::{cuda_precision, parse_precision, Device};
use crate::progress::Phase;
use clap::Args;
use rrra::data::{read_corpus, read_qrels, read_queries, read_run, write_run, Query};
use rrra::device::encoder::Precision;
use rrra::eval::{evaluate, EvalOptions};
use rrra::index::store::Store;
use rrra::index::{npy, Dtype};
use rrra::model::{Encoder, EncoderOptions, Pooling};
use rrra::pipeline::GpuOptions;
use rrra::{pipeline, Error, Result};
use std::path::{Path, PathBuf};

/// Model options shared by encode and search.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Model folder (Hugging Face BERT-family: config.json, model.safetensors, tokenizer.json).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Max tokens per text, special tokens included [default: the model's
    /// sentence_bert_config.json, else 256].
    #[arg(long, value_name = "N")]
    pub max_length: Option<usize>,
    /// Pooling: mean, cls or max [default: the model's 1_Pooling/config.json, else cls].
    #[arg(long, value_name = "MODE")]
    pub pooling: Option<Pooling>,
    /// Texts per encoder batch.
    #[arg(long, default_value_t = 32, value_name = "N")]
    pub batch_size: usize,
}

impl ModelArgs {
    fn options(&self) -> EncoderOptions {
        EncoderOptions {
            max_length: self.max_length,
            pooling: self.pooling,
            normalize: None,
        }
    }
}

#[derive(Args)]
pub struct EncodeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// BEIR corpus file (JSON lines with _id, title, text).
    #[arg(long, value_name = "FILE")]
    pub corpus: PathBuf,
    /// Embedding store to write (replaced atomically).
    #[arg(long, value_name = "STORE")]
    pub out: PathBuf,
    /// Storage type of the vectors: f32, f16 or bf16.
    #[arg(long, default_value = "f32", value_name = "TYPE")]
    pub dtype: Dtype,
    /// Where the encoder runs: cpu, or a CUDA device (cuda is cuda:0).
    #[arg(long, default_value = "cpu", value_name = "cpu|cuda[:N]")]
    pub device: Device,
    /// The GPU encoder's arithmetic: bf16 (tensor cores) or f32 [default: bf16; only with
    /// --device cuda].
    #[arg(long, value_name = "bf16|f32", value_parser = parse_precision)]
    pub precision: Option<Precision>,
}

pub fn encode(a: EncodeArgs) -> Result<()> {
    let gpu = cuda_precision(a.device, a.precision)?;
    let encoder = Encoder::load(&a.model.model, &a.model.options())?;
    let docs = read_corpus(&a.corpus)?;
    eprintln!(
        "encoding {} documents with {} (dim {}, max length {}, {} pooling{}) on {}{}",
        docs.len(),
        a.model.model.display(),
        encoder.dim(),
        encoder.max_length(),
        encoder.pooling(),
        if encoder.normalize() {
            ", normalised"
        } else {
            ""
        },
        a.device,
        gpu.map_or(String::new(), |(_, p)| format!(" ({p})")),
    );
    let phase = Phase::new(docs.len(), "encoded");
    match gpu {
        None => pipeline::encode_corpus(
            &encoder,
            &docs,
            &a.out,
            a.dtype,
            a.model.batch_size,
            &phase.tick(),
        )?,
        Some((ordinal, precision)) => pipeline::encode_corpus_on_gpu(
            &encoder,
            &docs,
            &a.out,
            a.dtype,
            &GpuOptions {
                ordinal,
                precision,
                batch_size: a.model.batch_size,
            },
            &phase.tick(),
        )?,
    }
    phase.finish("docs");
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

#[derive(Args)]
pub struct SearchArgs {
    /// Model folder; must be the model that encoded the store.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Embedding store written by `rrra encode`.
    #[arg(long, value_name = "STORE")]
    pub index: PathBuf,
    /// BEIR queries file (JSON lines with _id, text).
    #[arg(long, value_name = "FILE")]
    pub queries: PathBuf,
    /// Qrels (TSV): only the queries judged there are searched.
    #[arg(long, value_name = "FILE")]
    pub qrels: Option<PathBuf>,
    /// Documents retrieved per query (1 to 10000).
    #[arg(long, default_value_t = 100)]
    pub k: usize,
    /// TREC run to write (replaced atomically).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Queries per encoder batch.
    #[arg(long, default_value_t = 32, value_name = "N")]
    pub batch_size: usize,
    /// Run tag written in the last column of the run.
    #[arg(long, default_value = "rrra")]
    pub tag: String,
    /// Rerank the top k with this adapter (file, or a folder holding adapter.safetensors).
    #[arg(long, value_name = "PATH")]
    pub rerank: Option<PathBuf>,
    /// Where queries are encoded and searched (and reranked): cpu, or a CUDA device (cuda is
    /// cuda:0), which serves them as `Retriever` does on a GPU.
    #[arg(long, default_value = "cpu", value_name = "cpu|cuda[:N]")]
    pub device: Device,
    /// The GPU encoder's arithmetic: bf16 (tensor cores) or f32 [default: bf16; only with
    /// --device cuda].
    #[arg(long, value_name = "bf16|f32", value_parser = parse_precision)]
    pub precision: Option<Precision>,
}

pub fn search(a: SearchArgs) -> Result<()> {
    if a.k == 0 || a.k > 10_000 {
        return Err(Error::InvalidArgument(format!(
            "--k {} is outside 1..=10000",
            a.k
        )));
    }
    let run = match cuda_precision(a.device, a.precision)? {
        None => search_on_cpu(&a)?,
        Some((ordinal, precision)) => search_on_gpu(
            &a,
            &GpuOptions {
                ordinal,
                precision,
                batch_size: a.batch_size,
            },
        )?,
    };
    write_run(&a.out, &run, &a.tag)?;
    eprintln!(
        "wrote {} ({} queries, top {})",
        a.out.display(),
        run.len(),
        a.k
    );
    Ok(())
}

/// `search` on the CPU: top k, then the adapter's rerank of it when asked.
fn search_on_cpu(a: &SearchArgs) -> Result<rrra::data::Run> {
    let store = Store::open(&a.index)?;
    // Rebuild the encoder exactly as the store was built (max length, pooling), then verify.
    let encoder = Encoder::load(&a.model, &pipeline::store_encoder_options(&store))?;
    pipeline::check_store_matches(&store, &a.index, &encoder)?;
    let queries = judged_queries(&a.queries, a.qrels.as_deref())?;
    let phase = Phase::new(queries.len(), "searched");
    let mut run = pipeline::search(&encoder, &store, &queries, a.k, a.batch_size, &phase.tick())?;
    phase.finish("queries");
    if let Some(path) = &a.rerank {
        let adapter = rrra::adapter::file::AdapterFile::load(path)?;
        adapter.check_dim(encoder.dim(), path)?;
        run = pipeline::rerank_run(&encoder, &store, &queries, &run, path, &adapter, a.k)?;
        eprintln!(
            "reranked with {} (lambda_rr {})",
            path.display(),
            adapter.lambda_rr
        );
    }
    Ok(run)
}

/// `search` on a GPU: the same top k and rerank, served as `Retriever` serves on a GPU (which
/// opens and checks the store, the model and the adapter as the CPU path does).
fn search_on_gpu(a: &SearchArgs, gpu: &GpuOptions) -> Result<rrra::data::Run> {
    let queries = judged_queries(&a.queries, a.qrels.as_deref())?;
    let phase = Phase::new(queries.len(), "searched");
    let run = rrra::retriever::search_on_gpu(
        &a.model,
        &a.index,
        &queries,
        a.k,
        a.rerank.as_deref(),
        gpu,
        &phase.tick(),
    )?;
    phase.finish("queries");
    if let Some(path) = &a.rerank {
        // read again only for the message: the retriever does not expose the file
        let adapter = rrra::adapter::file::AdapterFile::load(path)?;
        eprintln!(
            "reranked on {} with {} (lambda_rr {})",
            a.device,
            path.display(),
            adapter.lambda_rr
        );
    }
    Ok(run)
}

/// The queries of `path`; with qrels, only those judged there (a qrels query missing from the
/// queries file is an error naming its line).
fn judged_queries(path: &Path, qrels: Option<&Path>) -> Result<Vec<Query>> {
    let mut queries = read_queries(path)?;
    if let Some(qrels_path) = qrels {
        let qrels = read_qrels(qrels_path)?;
        let known: std::collections::HashSet<&str> =
            queries.iter().map(|q| q.id.as_str()).collect();
        qrels.check_queries_known(qrels_path, |q| known.contains(q))?;
        queries.retain(|q: &Query| qrels.get(&q.id).is_some());
    }
    Ok(queries)
}

#[derive(Args)]
pub struct EvalArgs {
    /// TREC run (qid Q0 docid rank score tag).
    #[arg(long, value_name = "FILE")]
    pub run: PathBuf,
    /// Qrels (TSV with a header: query-id, corpus-id, score).
    #[arg(long, value_name = "FILE")]
    pub qrels: PathBuf,
    /// Print one JSON object (mean metrics as keys, plus per_query) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Cutoffs, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 3, 5, 10, 20, 100, 1000])]
    pub cutoffs: Vec<usize>,
    /// Drop results whose doc id equals the query id (BEIR's option for corpora that contain
    /// their queries).
    #[arg(long)]
    pub ignore_identical_ids: bool,
}

pub fn eval(a: EvalArgs) -> Result<()> {
    let run = read_run(&a.run)?;
    let qrels = read_qrels(&a.qrels)?;
    // Run queries missing from the qrels are ignored (trec_eval), but when none is judged the
    // two files do not belong together and every metric would silently be 0.
    if !qrels.is_empty() {
        if let Some(first) = run.queries().next() {
            if run.queries().all(|q| qrels.get(q).is_none()) {
                return Err(Error::mismatch(
                    &a.run,
                    format!(
                        "none of the {} queries of the run (first {first:?}) is judged in {}",
                        run.len(),
                        a.qrels.display()
                    ),
                ));
            }
        }
    }
    let opts = EvalOptions {
        ks: a.cutoffs,
        ignore_identical_ids: a.ignore_identical_ids,
    };
    let e = evaluate(&run, &qrels, &opts);
    if a.json {
        println!("{}", e.to_json());
    } else {
        print!("{}", e.table());
    }
    Ok(())
}

#[derive(Args)]
pub struct InfoArgs {
    /// Embedding store.
    #[arg(value_name = "STORE")]
    pub index: PathBuf,
}

pub fn info(a: InfoArgs) -> Result<()> {
    let s = Store::open(&a.index)?;
    println!("store       {}", a.index.display());
    println!("documents   {}", s.len());
    println!("dimension   {}", s.dim());
    println!("dtype       {}", s.dtype());
    println!("normalised  {}", s.normalized());
    println!("fingerprint {:016x}", s.fingerprint());
    println!("metadata    {}", s.metadata_json());
    println!("checksums   ok");
    Ok(())
}

#[derive(Args)]
pub struct ExportArgs {
    /// Embedding store.
    #[arg(long, value_name = "STORE")]
    pub index: PathBuf,
    /// .npy file to write: float32 (float16 for f16 stores), shape (documents, dimension).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Also write the document ids, one per line, in row order.
    #[arg(long, value_name = "FILE")]
    pub ids: Option<PathBuf>,
}

pub fn export(a: ExportArgs) -> Result<()> {
    let s = Store::open(&a.index)?;
    npy::export_npy(&s, &a.out)?;
    if let Some(ids) = &a.ids {
        npy::export_ids(&s, ids)?;
    }
    eprintln!("wrote {} ({} x {})", a.out.display(), s.len(), s.dim());
    Ok(())
}
