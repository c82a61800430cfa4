//! `rrra`: the command-line driver of the engine. Thin on purpose: argument parsing, progress
//! and messages here; every computation is a library call.

mod bench;
mod commands;
mod demo;
mod device_arg;
mod device_check;
mod progress;
mod rrra_cmds;
mod train;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "rrra",
    version,
    about = "Dense retrieval engine: encode a corpus with a BERT-family model, search it, evaluate runs.",
    long_about = "Dense retrieval engine: encode a corpus with a BERT-family model (any Hugging Face / \
sentence-transformers folder), store the embeddings in a memory-mapped file, search it exactly, and \
evaluate runs with trec_eval semantics.\n\nA first session:\n  tools/fetch-model.sh                       # all-MiniLM-L6-v2 into ~/.cache/rrra\n  rrra encode --model M --corpus corpus.jsonl --out corpus.rrra\n  rrra search --model M --index corpus.rrra --queries queries.jsonl --qrels qrels/test.tsv --out run.trec\n  rrra eval --run run.trec --qrels qrels/test.tsv"
)]
struct Cli {
    /// Worker threads for encoding and search (default: all cores).
    #[arg(long, global = true, value_name = "N")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Encode a corpus (BEIR corpus.jsonl) into an embedding store.
    Encode(commands::EncodeArgs),
    /// Encode queries and retrieve the top k documents of a store; writes a TREC run.
    Search(commands::SearchArgs),
    /// Evaluate a TREC run against qrels (nDCG, MRR, Recall, MAP, P at several cutoffs).
    Eval(commands::EvalArgs),
    /// Show an embedding store's header and metadata (and verify its checksums).
    Info(commands::InfoArgs),
    /// Export a store's vectors to NumPy .npy (and its ids to a text file).
    Export(commands::ExportArgs),
    /// Run the standard benchmark workloads and print a table against peer figures.
    Bench(bench::BenchArgs),
    /// On a GPU machine: measure the ceilings and time every kernel family (one table).
    DeviceCheck(device_check::DeviceCheckArgs),
    /// Fine-tune a bi-encoder with mined hard negatives (InfoNCE, AdamW; CPU or GPU).
    Train(train::TrainArgs),
    /// RRRA stage 2: train the false-negative adapter on a frozen encoder, choose lambda_rr
    /// on a dev split, report the reranked test retrieval.
    Adapter(rrra_cmds::AdapterArgs),
    /// Rerank a TREC run's top-k with an adapter.
    Rerank(rrra_cmds::RerankArgs),
    /// The comparison experiment: pretrained / uniform / SimANS / TriSampler / RRRA, with and
    /// without the adapter's rerank, over seeds; markdown + JSON + plots.
    Experiment(rrra_cmds::ExperimentArgs),
    /// Merge the results of experiment runs made separately (other seeds or methods) into one
    /// report with mean ± std over all seeds.
    ExperimentMerge(rrra_cmds::MergeArgs),
    /// The built-in end-to-end job: encode SciFact, search its test queries, evaluate.
    Demo(demo::DemoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global()
        {
            eprintln!("error: cannot start {n} threads: {e}");
            return ExitCode::FAILURE;
        }
    }
    let result = match cli.command {
        Command::Encode(a) => commands::encode(a),
        Command::Search(a) => commands::search(a),
        Command::Eval(a) => commands::eval(a),
        Command::Info(a) => commands::info(a),
        Command::Export(a) => commands::export(a),
        Command::Bench(a) => bench::run(a),
        Command::Demo(a) => demo::run(a),
        Command::Adapter(a) => rrra_cmds::adapter(a),
        Command::Rerank(a) => rrra_cmds::rerank(a),
        Command::Experiment(a) => rrra_cmds::experiment(a),
        Command::ExperimentMerge(a) => rrra_cmds::experiment_merge(a),
        Command::Train(a) => train::run(a),
        Command::DeviceCheck(a) => device_check::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    /// clap's own checks of the definitions (ids named by `requires`, duplicate flags, ...),
    /// which otherwise only fire when a command line reaches them.
    #[test]
    fn arguments_are_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
