//! Entry points shared by the fuzz targets (`fuzz/`) and the corpus replay test
//! (`tests/fuzz_corpus.rs`), so both run exactly the same code on an input. Not a stable API.
//!
//! Every function takes raw bytes, hands them to one reader of the crate (through a scratch
//! file when the reader only takes a path) and returns what the reader returned; the property
//! under test is that it returns at all: `Ok` or a typed `Err`, never a panic, an abort, an
//! unbounded allocation or a hang. A few also check a property of what they accepted (a run
//! written back reads back, two readers of one header agree) and panic, with `oracle:` in the
//! message, when it fails.

use crate::error::Result;
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The fuzz targets, one per file format (the names of `fuzz/fuzz_targets/*.rs` and of the
/// corpus folders `fuzz/corpus/<target>/`).
pub const TARGETS: [&str; 9] = [
    "jsonl_corpus",
    "jsonl_queries",
    "train_jsonl",
    "qrels_tsv",
    "trec_run",
    "store",
    "safetensors_meta",
    "bert_config",
    "adapter_file",
];

/// Runs the target called `target` on `bytes`; `None` for an unknown name.
pub fn run(target: &str, bytes: &[u8]) -> Option<Result<()>> {
    Some(match target {
        "jsonl_corpus" => parse_jsonl_corpus(bytes),
        "jsonl_queries" => parse_jsonl_queries(bytes),
        "train_jsonl" => parse_train_jsonl(bytes),
        "qrels_tsv" => parse_qrels_tsv(bytes),
        "trec_run" => parse_trec_run(bytes),
        "store" => parse_store(bytes),
        "safetensors_meta" => parse_safetensors_meta(bytes),
        "bert_config" => parse_bert_config(bytes),
        "adapter_file" => parse_adapter_file(bytes),
        _ => return None,
    })
}

/// `corpus.jsonl` ([`crate::data::beir::read_corpus`]).
pub fn parse_jsonl_corpus(bytes: &[u8]) -> Result<()> {
    with_file("corpus.jsonl", bytes, |p| {
        crate::data::beir::read_corpus(p).map(drop)
    })
}

/// `queries.jsonl` ([`crate::data::beir::read_queries`]).
pub fn parse_jsonl_queries(bytes: &[u8]) -> Result<()> {
    with_file("queries.jsonl", bytes, |p| {
        crate::data::beir::read_queries(p).map(drop)
    })
}

/// A FlagEmbedding or Tevatron training file ([`crate::train::data::read_jsonl_train`]).
pub fn parse_train_jsonl(bytes: &[u8]) -> Result<()> {
    with_file("train.jsonl", bytes, |p| {
        crate::train::data::read_jsonl_train(p).map(drop)
    })
}

/// A qrels file, BEIR TSV or TREC ([`crate::data::beir::read_qrels`]).
pub fn parse_qrels_tsv(bytes: &[u8]) -> Result<()> {
    with_file("qrels.tsv", bytes, |p| {
        let q = crate::data::beir::read_qrels(p)?;
        // The lookups the evaluation makes afterwards.
        for qid in q.queries() {
            let _ = (q.num_relevant(qid), q.line_of(qid));
        }
        q.check_docs_known(p, |d| d.len() % 2 == 0).ok();
        Ok(())
    })
}

/// A TREC run ([`crate::data::trec::read_run`]), written back and read again: a run the writer
/// accepts must read back with the same queries and documents (panics otherwise).
pub fn parse_trec_run(bytes: &[u8]) -> Result<()> {
    with_file("run.trec", bytes, |p| {
        let run = crate::data::trec::read_run(p)?;
        let back = p.with_extension("back");
        // The writer may refuse ids the reader takes (Unicode whitespace); that is no finding.
        if crate::data::trec::write_run(&back, &run, "fuzz").is_ok() {
            let again = crate::data::trec::read_run(&back);
            let _ = std::fs::remove_file(&back);
            let same = |a: &crate::data::Run, b: &crate::data::Run| {
                a.iter().zip(b.iter()).all(|((qa, da), (qb, db))| {
                    qa == qb && da.iter().map(|d| &d.0).eq(db.iter().map(|d| &d.0))
                })
            };
            match again {
                Ok(again) if again.len() == run.len() && same(&again, &run) => {}
                other => panic!("oracle: a written run does not read back: {other:?}"),
            }
        }
        Ok(())
    })
}

/// An embedding store ([`crate::index::Store::open`]), then every accessor and one search.
///
/// The bytes are also opened a second time with every checksum recomputed, so the checks
/// behind the checksums (sizes, offsets, the id table) see inputs a fuzzer could otherwise
/// never reach; that second result only matters for not panicking.
pub fn parse_store(bytes: &[u8]) -> Result<()> {
    let first = with_file("store.rrra", bytes, open_store);
    let fixed = fix_store_checksums(bytes);
    if fixed != bytes {
        let _ = with_file("store.rrra", &fixed, open_store);
    }
    first
}

fn open_store(path: &Path) -> Result<()> {
    use crate::index::{topk, Store};
    let unverified = Store::open_unverified(path);
    let opened = Store::open(path);
    // The in-memory copy goes through the same checks and must agree with the map.
    if let Ok(bytes) = std::fs::read(path) {
        let copied = Store::from_image(path, &bytes);
        if copied.is_ok() != opened.is_ok() {
            panic!("oracle: mapped {opened:?} but copied {copied:?}");
        }
    }
    let store = opened?;
    if let Ok(u) = unverified {
        u.verify_vectors()?;
    }
    let _ = (
        store.metadata_json(),
        store.fingerprint(),
        store.normalized(),
    );
    for id in store.ids() {
        std::hint::black_box(id);
    }
    if store.is_empty() {
        return Ok(());
    }
    // Reads every row through the typed views of the map (the alignment casts).
    let mut row = vec![0f32; store.dim()];
    for i in 0..store.len() {
        store.row_f32(i, &mut row)?;
    }
    let query = vec![1.0f32; store.dim()];
    topk::search_one(&store.corpus(), &query, 3)?;
    Ok(())
}

/// Recomputes the section checksums (of the sections that lie inside the input) and then the
/// header checksum of a store image, at the byte offsets of docs/FORMAT.md.
pub fn fix_store_checksums(bytes: &[u8]) -> Vec<u8> {
    use xxhash_rust::xxh3::xxh3_64;
    let mut b = bytes.to_vec();
    if b.len() < 128 {
        return b;
    }
    let get = |b: &[u8], at: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(a)
    };
    for at in [48, 72, 96] {
        let (off, len) = (get(&b, at), get(&b, at + 8));
        if let Some(end) = off.checked_add(len).filter(|&e| e <= b.len() as u64) {
            let sum = xxh3_64(&b[off as usize..end as usize]);
            b[at + 16..at + 24].copy_from_slice(&sum.to_le_bytes());
        }
    }
    let sum = xxh3_64(&b[..120]);
    b[120..128].copy_from_slice(&sum.to_le_bytes());
    b
}

/// A safetensors file: its metadata alone ([`crate::train::checkpoint::read_safetensors_metadata`]),
/// the whole file ([`crate::train::checkpoint::read_safetensors`]), and the two training-state
/// readers on top (the saved configuration and the mined pool).
pub fn parse_safetensors_meta(bytes: &[u8]) -> Result<()> {
    use crate::train::{checkpoint, state};
    with_file("training_state.safetensors", bytes, |p| {
        let meta = checkpoint::read_safetensors_metadata(p);
        let _ = state::read_config(p);
        let loaded = checkpoint::read_safetensors(p);
        if let Ok(l) = &loaded {
            let _ = state::decode_pool(l, p);
        }
        // The header alone must say what the full read says about the metadata.
        if let Ok(l) = &loaded {
            match &meta {
                Ok(m) if *m == l.metadata => {}
                other => panic!("oracle: the header read disagrees with the full read: {other:?}"),
            }
        }
        meta?;
        loaded.map(drop)
    })
}

/// A model's `config.json` ([`crate::model::config::BertConfig::from_file`]).
pub fn parse_bert_config(bytes: &[u8]) -> Result<()> {
    with_file("config.json", bytes, |p| {
        let cfg = crate::model::config::BertConfig::from_file(p)?;
        std::hint::black_box(cfg.head_dim());
        Ok(())
    })
}

/// An RRRA adapter file ([`crate::adapter::file::AdapterFile::load`]).
pub fn parse_adapter_file(bytes: &[u8]) -> Result<()> {
    with_file("adapter.safetensors", bytes, |p| {
        crate::adapter::file::AdapterFile::load(p).map(drop)
    })
}

/// A scratch folder per thread (the replay test runs targets on several threads), reused by
/// every call and removed when the thread ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

thread_local! {
    static SCRATCH: RefCell<Option<Scratch>> = const { RefCell::new(None) };
}

/// Writes `bytes` to the file `name` in this thread's scratch folder and calls `f` on its path.
fn with_file<T>(name: &str, bytes: &[u8], f: impl FnOnce(&Path) -> T) -> T {
    let path = SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let dir = &s
            .get_or_insert_with(|| {
                static NEXT: AtomicU64 = AtomicU64::new(0);
                let dir = std::env::temp_dir().join(format!(
                    "rrra-fuzz-{}-{}",
                    std::process::id(),
                    NEXT.fetch_add(1, Ordering::Relaxed)
                ));
                Scratch(dir)
            })
            .0;
        // A harness failure, not a finding: without the scratch file nothing can be tested.
        std::fs::create_dir_all(dir).expect("cannot create the fuzzing scratch folder");
        dir.join(name)
    });
    std::fs::write(&path, bytes).expect("cannot write the fuzzing scratch file");
    f(&path)
}
