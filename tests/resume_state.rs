//! A training state that does not fit the data it is resumed on is refused when it is read
//! (`Error::Format` naming the state file), never discovered as an out-of-bounds index in the
//! middle of a training step: the data cursor must name a batch of the epoch, and the mined pool
//! must have one candidate list per training query and embeddings for every corpus document.

mod common;

use rrra::train::checkpoint::{
    read_safetensors, write_safetensors_with_u32, NamedTensor, U32Tensor,
};
use rrra::train::config::{DataSource, TrainConfig};
use rrra::train::trainer::Trainer;
use rrra::Error;
use std::path::Path;

fn write(dir: &Path, name: &str, body: &str) {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, body).unwrap();
}

/// Rewrites the state with `edit` applied to its metadata.
fn edit_metadata(state: &Path, edit: impl Fn(&mut std::collections::BTreeMap<String, String>)) {
    let mut l = read_safetensors(state).unwrap();
    edit(&mut l.metadata);
    let f32s: Vec<NamedTensor<'_>> = l
        .tensors
        .iter()
        .map(|(name, (shape, data))| NamedTensor {
            name: name.clone(),
            shape: shape.clone(),
            data,
        })
        .collect();
    let u32s: Vec<U32Tensor<'_>> = l
        .u32_tensors
        .iter()
        .map(|(name, (shape, data))| U32Tensor {
            name: name.clone(),
            shape: shape.clone(),
            data,
        })
        .collect();
    write_safetensors_with_u32(state, &f32s, &u32s, &l.metadata).unwrap();
}

fn resume_fails(out: &Path, what: &str) {
    let state = out.join("training_state.safetensors");
    match Trainer::resume(out) {
        Err(Error::Format { path, msg }) if path == state && msg.contains(what) => {}
        Err(e) => panic!("expected a format error about {what:?}, got {e}"),
        Ok(_) => panic!("expected a format error about {what:?}, the resume succeeded"),
    }
}

#[test]
fn resume_refuses_a_state_that_does_not_fit_the_data() {
    let d = tempfile::tempdir().unwrap();
    let beir = common::tiny_beir(d.path());
    let out = d.path().join("run");
    let mut cfg = TrainConfig::new(
        common::shared().join("fixtures/tiny-bert"),
        DataSource::Beir {
            dir: beir.clone(),
            split: "train".into(),
        },
        out.clone(),
    );
    cfg.max_steps = Some(1);
    cfg.batch_size = 2;
    cfg.hard_negatives = 1;
    cfg.mine_top_k = 2;
    Trainer::new(cfg).unwrap().run(None, &mut |_| {}).unwrap();
    let state = out.join("training_state.safetensors");
    let good = std::fs::read(&state).unwrap();
    assert_eq!(
        read_safetensors(&state).unwrap().metadata["rrra.has_pool"],
        "true"
    );
    Trainer::resume(&out).unwrap();

    // A cursor past the epoch's batches.
    edit_metadata(&state, |m| {
        m.insert("rrra.cursor".into(), "7".into());
    });
    resume_fails(&out, "data cursor 7");
    std::fs::write(&state, &good).unwrap();

    // The data grew a query (and a document) since the pool was mined.
    write(
        &beir,
        "corpus.jsonl",
        "{\"_id\":\"d1\",\"text\":\"one\"}\n{\"_id\":\"d2\",\"text\":\"two\"}\n{\"_id\":\"d3\",\"text\":\"three\"}\n{\"_id\":\"d4\",\"text\":\"four\"}\n",
    );
    write(
        &beir,
        "queries.jsonl",
        "{\"_id\":\"q1\",\"text\":\"first\"}\n{\"_id\":\"q2\",\"text\":\"second\"}\n{\"_id\":\"q3\",\"text\":\"third\"}\n",
    );
    write(
        &beir,
        "qrels/train.tsv",
        "q1\td1\t1\nq2\td2\t1\nq3\td4\t1\n",
    );
    resume_fails(&out, "mined pool");
}
