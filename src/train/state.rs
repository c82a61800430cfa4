//! What a checkpoint holds. Two things, each written atomically:
//! - `model/`: the encoder as a Hugging Face / sentence-transformers folder that other tools
//!   load unchanged; its `model.safetensors` metadata records pooling, normalisation, max
//!   lengths, the step and the whole training configuration;
//! - `training_state.safetensors`: everything a resume needs, self-contained — the f32 weights,
//!   the AdamW moments, the mined pool with the embeddings it was mined with, and (metadata) the
//!   configuration, step, epoch, data cursor and AdamW step. The RNG needs no state: its
//!   counters are the step and example indices.
//!
//! The model folder is written first: a crash between the two leaves a state one checkpoint
//! older than the folder, and the resume starts from the state.

use super::checkpoint::{self, ModelFolderSpec, NamedTensor, U32Tensor};
use super::config::TrainConfig;
use super::mining::MinedPool;
use super::trainer::Trainer;
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;

const FORMAT: &str = "rrra-train-state-v1";

fn common_metadata(t: &Trainer) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert("rrra.step".into(), t.step.to_string());
    m.insert("rrra.config".into(), t.cfg.to_json().to_string());
    m.insert("rrra.pooling".into(), t.encoder.pooling().to_string());
    m.insert("rrra.normalize".into(), t.encoder.normalize().to_string());
    m.insert(
        "rrra.query_max_length".into(),
        t.cfg.query_max_length.to_string(),
    );
    m.insert(
        "rrra.doc_max_length".into(),
        t.cfg.doc_max_length.to_string(),
    );
    m
}

/// The encoder as a model folder.
pub(crate) fn write_model(t: &Trainer) -> Result<()> {
    let cfg = t.encoder.config();
    let named = t.encoder.bert().weights.named(cfg);
    let tensors: Vec<NamedTensor<'_>> = named
        .iter()
        .map(|n| NamedTensor {
            name: n.name.clone(),
            shape: n.shape.clone(),
            data: n.data,
        })
        .collect();
    let mut meta = common_metadata(t);
    // transformers refuses safetensors files without a framework tag.
    meta.insert("format".into(), "pt".into());
    checkpoint::write_model_folder(
        &t.paths().model,
        &ModelFolderSpec {
            source_dir: &t.cfg.model,
            pooling: t.encoder.pooling(),
            normalize: t.encoder.normalize(),
            // The inference length stays what the source model says (training may truncate
            // shorter to save time); the training lengths are in the metadata.
            max_seq_length: crate::model::pooling::SentenceTransformersConfig::read(&t.cfg.model)?
                .max_seq_length
                .unwrap_or(t.cfg.doc_max_length),
            dim: t.encoder.dim(),
        },
        &tensors,
        &meta,
    )
}

/// The resume state.
pub(crate) fn write_state(t: &mut Trainer) -> Result<()> {
    let mut meta = common_metadata(t);
    meta.insert("format".into(), FORMAT.into());
    meta.insert("rrra.epoch".into(), t.epoch.to_string());
    meta.insert("rrra.cursor".into(), t.cursor.to_string());
    meta.insert("rrra.adam_step".into(), t.optim.step.to_string());
    meta.insert("rrra.pool_step".into(), t.pool_step.to_string());
    meta.insert("rrra.has_pool".into(), t.pool.is_some().to_string());
    let path = t.paths().state.clone();
    let optim = &t.optim;
    let mut tensors = Vec::new();
    let weights = t.encoder.bert().weights.tensors();
    for (i, w) in weights.iter().enumerate() {
        tensors.push(NamedTensor {
            name: format!("param.{i:03}"),
            shape: vec![w.len()],
            data: w,
        });
        tensors.push(NamedTensor {
            name: format!("adam_m.{i:03}"),
            shape: vec![w.len()],
            data: &optim.m[i],
        });
        tensors.push(NamedTensor {
            name: format!("adam_v.{i:03}"),
            shape: vec![w.len()],
            data: &optim.v[i],
        });
    }
    let mut ids = Vec::new();
    let mut offsets = vec![0u32];
    let mut scores = Vec::new();
    if let Some(pool) = &t.pool {
        for c in &pool.candidates {
            ids.extend(c.iter().map(|&(d, _)| d));
            scores.extend(c.iter().map(|&(_, s)| s));
            offsets.push(ids.len() as u32);
        }
        let dim = pool.dim;
        tensors.push(NamedTensor {
            name: "pool.query_embeddings".into(),
            shape: vec![pool.query_embeddings.len() / dim, dim],
            data: &pool.query_embeddings,
        });
        tensors.push(NamedTensor {
            name: "pool.doc_embeddings".into(),
            shape: vec![pool.doc_embeddings.len() / dim, dim],
            data: &pool.doc_embeddings,
        });
        tensors.push(NamedTensor {
            name: "pool.scores".into(),
            shape: vec![scores.len()],
            data: &scores,
        });
    }
    // The RRRA adapter: parameters, AdamW moments, calibration and the pool's s_FN.
    let mut fn_flat = Vec::new();
    if let Some(j) = &t.joint {
        for (i, (name, data)) in j.file.params.tensors().into_iter().enumerate() {
            tensors.push(NamedTensor {
                name: format!("adapter.{name}"),
                shape: vec![data.len()],
                data,
            });
            tensors.push(NamedTensor {
                name: format!("adapter.adam_m.{i}"),
                shape: vec![data.len()],
                data: &j.optim.m[i],
            });
            tensors.push(NamedTensor {
                name: format!("adapter.adam_v.{i}"),
                shape: vec![data.len()],
                data: &j.optim.v[i],
            });
        }
        fn_flat = j.fn_scores.iter().flatten().copied().collect();
        meta.insert("rrra.adapter_adam_step".into(), j.optim.step.to_string());
        meta.insert(
            "rrra.adapter_calibration".into(),
            serde_json::to_string(&j.file.calibration).unwrap_or_default(),
        );
        meta.insert(
            "rrra.adapter_scored".into(),
            (!j.fn_scores.is_empty()).to_string(),
        );
    }
    if !fn_flat.is_empty() {
        tensors.push(NamedTensor {
            name: "pool.fn_scores".into(),
            shape: vec![fn_flat.len()],
            data: &fn_flat,
        });
    }
    let u32s = if t.pool.is_some() {
        vec![
            U32Tensor {
                name: "pool.doc_ids".into(),
                shape: vec![ids.len()],
                data: &ids,
            },
            U32Tensor {
                name: "pool.offsets".into(),
                shape: vec![offsets.len()],
                data: &offsets,
            },
        ]
    } else {
        Vec::new()
    };
    checkpoint::write_safetensors_with_u32(&path, &tensors, &u32s, &meta)
}

/// The configuration a run was started with.
pub(crate) fn read_config(path: &Path) -> Result<TrainConfig> {
    let meta = checkpoint::read_safetensors_metadata(path)?;
    let text = meta
        .get("rrra.config")
        .ok_or_else(|| Error::format(path, "not a training state (no rrra.config metadata)"))?;
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(Error::format(
            path,
            format!("not a training state of format {FORMAT}"),
        ));
    }
    serde_json::from_str(text)
        .map_err(|e| Error::format(path, format!("bad training configuration: {e}")))
}

/// Restores weights, optimizer, cursor and pool into a trainer built from the same config.
pub(crate) fn restore(t: &mut Trainer, path: &Path) -> Result<()> {
    let loaded = checkpoint::read_safetensors(path)?;
    let meta = &loaded.metadata;
    let num = |k: &str| -> Result<u64> {
        meta.get(k).and_then(|v| v.parse().ok()).ok_or_else(|| {
            Error::format(path, format!("metadata `{k}` is missing or not a number"))
        })
    };
    t.step = num("rrra.step")?;
    t.epoch = num("rrra.epoch")?;
    t.cursor = num("rrra.cursor")? as usize;
    t.optim.step = num("rrra.adam_step")?;
    t.pool_step = num("rrra.pool_step")?;
    let take = |name: &str, len: usize| -> Result<Vec<f32>> {
        match loaded.tensors.get(name) {
            Some((_, v)) if v.len() == len => Ok(v.clone()),
            Some((_, v)) => Err(Error::format(
                path,
                format!("tensor `{name}` has {} values, expected {len}", v.len()),
            )),
            None => Err(Error::format(path, format!("tensor `{name}` is missing"))),
        }
    };
    {
        let mut params = t.encoder.bert_mut().weights.tensors_mut();
        for (i, (p, _)) in params.iter_mut().enumerate() {
            let len = p.len();
            **p = take(&format!("param.{i:03}"), len)?;
        }
    }
    for i in 0..t.optim.m.len() {
        let len = t.optim.m[i].len();
        t.optim.m[i] = take(&format!("adam_m.{i:03}"), len)?;
        t.optim.v[i] = take(&format!("adam_v.{i:03}"), len)?;
    }
    t.encoder.bert_mut().weights.file_hash = 0;
    t.pool = decode_pool(&loaded, path)?;
    // The trainer indexes the pool by training query and corpus document, and the batches by
    // the cursor: a state that disagrees with the data it resumes on must fail here, not panic
    // in the middle of a step.
    let set = t.train_set();
    if let Some(pool) = &t.pool {
        let (queries, docs) = (pool.candidates.len(), pool.doc_embeddings.len() / pool.dim);
        if pool.dim != t.encoder.dim() || queries != set.queries.len() || docs != set.corpus.len() {
            return Err(Error::format(
                path,
                format!(
                    "the mined pool ({queries} queries, {docs} documents of dimension {}) does \
                     not match the training data ({} queries, {} documents) and encoder \
                     (dimension {})",
                    pool.dim,
                    set.queries.len(),
                    set.corpus.len(),
                    t.encoder.dim()
                ),
            ));
        }
    }
    let batches = super::data::epoch_batches(set, t.cfg.seed, t.epoch, t.cfg.batch_size)?.len();
    if t.cursor >= batches {
        return Err(Error::format(
            path,
            format!(
                "data cursor {} is outside the {batches} batches of epoch {}",
                t.cursor, t.epoch
            ),
        ));
    }
    restore_joint(t, &loaded, path)
}

/// The mined pool of a training state (`None` when the state has none), checked to be
/// self-consistent: offsets that tile the candidate lists, one list per query embedding, and
/// candidates that name documents of the pool.
pub(crate) fn decode_pool(
    loaded: &checkpoint::LoadedTensors,
    path: &Path,
) -> Result<Option<MinedPool>> {
    if loaded.metadata.get("rrra.has_pool").map(String::as_str) != Some("true") {
        return Ok(None);
    }
    let get = |n: &str| {
        loaded
            .tensors
            .get(n)
            .ok_or_else(|| Error::format(path, format!("tensor `{n}` is missing")))
    };
    let u = |n: &str| {
        loaded
            .u32_tensors
            .get(n)
            .map(|(_, v)| v.as_slice())
            .ok_or_else(|| Error::format(path, format!("tensor `{n}` is missing")))
    };
    let (qshape, q) = get("pool.query_embeddings")?;
    let (_, d) = get("pool.doc_embeddings")?;
    let (_, scores) = get("pool.scores")?;
    let ids = u("pool.doc_ids")?;
    let offsets = u("pool.offsets")?;
    let dim = qshape.get(1).copied().unwrap_or(0);
    let bad = || Error::format(path, "pool tensors disagree in size");
    if dim == 0
        || !q.len().is_multiple_of(dim)
        || !d.len().is_multiple_of(dim)
        || q.len() / dim + 1 != offsets.len()
        || ids.len() != scores.len()
        || offsets.first() != Some(&0)
        || offsets.last().map(|&o| o as usize) != Some(ids.len())
    {
        return Err(bad());
    }
    let docs = d.len() / dim;
    if let Some(&id) = ids.iter().find(|&&id| id as usize >= docs) {
        return Err(Error::format(
            path,
            format!("pool candidate {id} is outside the pool's {docs} documents"),
        ));
    }
    let mut candidates = Vec::with_capacity(offsets.len() - 1);
    for w in offsets.windows(2) {
        let (a, b) = (w[0] as usize, w[1] as usize);
        if a > b || b > ids.len() {
            return Err(bad());
        }
        candidates.push(
            ids[a..b]
                .iter()
                .copied()
                .zip(scores[a..b].iter().copied())
                .collect(),
        );
    }
    Ok(Some(MinedPool {
        dim,
        query_embeddings: q.clone(),
        doc_embeddings: d.clone(),
        candidates,
    }))
}

/// The RRRA adapter's part of the state (nothing to do for other samplers).
fn restore_joint(t: &mut Trainer, loaded: &checkpoint::LoadedTensors, path: &Path) -> Result<()> {
    let Some(j) = t.joint.as_mut() else {
        return Ok(());
    };
    let meta = &loaded.metadata;
    let missing = |k: &str| Error::format(path, format!("`{k}` is missing or malformed"));
    let tensor = |n: &str, len: usize| -> Result<Vec<f32>> {
        match loaded.tensors.get(n) {
            Some((_, v)) if v.len() == len => Ok(v.clone()),
            _ => Err(missing(n)),
        }
    };
    let lens: Vec<usize> = j
        .file
        .params
        .tensors()
        .iter()
        .map(|(_, d)| d.len())
        .collect();
    let names: Vec<&str> = j.file.params.tensors().iter().map(|(n, _)| *n).collect();
    for (i, (p, (name, len))) in j
        .file
        .params
        .tensors_mut()
        .into_iter()
        .zip(names.iter().zip(&lens))
        .enumerate()
    {
        p.copy_from_slice(&tensor(&format!("adapter.{name}"), *len)?);
        j.optim.m[i] = tensor(&format!("adapter.adam_m.{i}"), *len)?;
        j.optim.v[i] = tensor(&format!("adapter.adam_v.{i}"), *len)?;
    }
    j.optim.step = meta
        .get("rrra.adapter_adam_step")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| missing("rrra.adapter_adam_step"))?;
    j.file.calibration = meta
        .get("rrra.adapter_calibration")
        .and_then(|v| serde_json::from_str(v).ok())
        .ok_or_else(|| missing("rrra.adapter_calibration"))?;
    j.fn_scores.clear();
    if meta.get("rrra.adapter_scored").map(String::as_str) == Some("true") {
        let pool = t.pool.as_ref().ok_or_else(|| missing("pool"))?;
        let total: usize = pool.candidates.iter().map(Vec::len).sum();
        let flat = tensor("pool.fn_scores", total)?;
        let mut at = 0;
        for c in &pool.candidates {
            j.fn_scores.push(flat[at..at + c.len()].to_vec());
            at += c.len();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool of 2 queries and 3 documents of dimension 2, as `write_state` lays it out.
    fn pool_state() -> checkpoint::LoadedTensors {
        let mut l = checkpoint::LoadedTensors::default();
        l.metadata.insert("rrra.has_pool".into(), "true".into());
        let f = |shape: Vec<usize>, v: Vec<f32>| (shape, v);
        l.tensors.insert(
            "pool.query_embeddings".into(),
            f(vec![2, 2], vec![1.0, 0.0, 0.0, 1.0]),
        );
        l.tensors.insert(
            "pool.doc_embeddings".into(),
            f(vec![3, 2], vec![1.0, 0.0, 0.0, 1.0, 0.6, 0.8]),
        );
        l.tensors
            .insert("pool.scores".into(), f(vec![3], vec![0.6, 0.8, 0.0]));
        l.u32_tensors
            .insert("pool.doc_ids".into(), (vec![3], vec![2, 2, 0]));
        l.u32_tensors
            .insert("pool.offsets".into(), (vec![3], vec![0, 1, 3]));
        l
    }

    #[test]
    fn pool_decodes() {
        let p = Path::new("state.safetensors");
        let pool = decode_pool(&pool_state(), p).unwrap().unwrap();
        assert_eq!(pool.dim, 2);
        assert_eq!(
            pool.candidates,
            vec![vec![(2, 0.6)], vec![(2, 0.8), (0, 0.0)]]
        );
        assert!((pool.score(1, 2) - 0.8).abs() < 1e-6);
        let mut none = pool_state();
        none.metadata.insert("rrra.has_pool".into(), "false".into());
        assert!(decode_pool(&none, p).unwrap().is_none());
    }

    /// Pools that once decoded and then made the trainer index out of bounds (`MinedPool::score`
    /// and the batch gathering slice by query, document and dimension).
    #[test]
    fn inconsistent_pools_are_format_errors() {
        let p = Path::new("state.safetensors");
        type Damage = Box<dyn Fn(&mut checkpoint::LoadedTensors)>;
        let cases: Vec<(&str, Damage)> = vec![
            (
                "candidate beyond the documents",
                Box::new(|l| l.u32_tensors.get_mut("pool.doc_ids").unwrap().1[1] = 3),
            ),
            (
                "documents not a multiple of dim",
                Box::new(|l| {
                    l.tensors.get_mut("pool.doc_embeddings").unwrap().1.pop();
                }),
            ),
            (
                "queries not a multiple of dim",
                Box::new(|l| {
                    l.tensors
                        .get_mut("pool.query_embeddings")
                        .unwrap()
                        .1
                        .push(0.5);
                }),
            ),
            (
                "more candidate lists than queries",
                Box::new(|l| {
                    l.u32_tensors.get_mut("pool.offsets").unwrap().1 = vec![0, 1, 2, 3];
                }),
            ),
            (
                "offsets not starting at 0",
                Box::new(|l| l.u32_tensors.get_mut("pool.offsets").unwrap().1[0] = 1),
            ),
            (
                "decreasing offsets",
                Box::new(|l| {
                    l.u32_tensors.get_mut("pool.offsets").unwrap().1 = vec![0, 4, 3];
                }),
            ),
            (
                "no dimension",
                Box::new(|l| {
                    l.tensors.get_mut("pool.query_embeddings").unwrap().0 = vec![4];
                }),
            ),
            (
                "missing tensor",
                Box::new(|l| {
                    l.tensors.remove("pool.scores");
                }),
            ),
        ];
        for (name, corrupt) in cases {
            let mut l = pool_state();
            corrupt(&mut l);
            match decode_pool(&l, p) {
                Err(Error::Format { .. }) => {}
                other => panic!("{name}: {other:?}"),
            }
        }
    }
}
