//! Pooling of token states into one vector, and the sentence-transformers files that choose it
//! (`1_Pooling/config.json`, `modules.json`, `sentence_bert_config.json`).

use crate::error::{Error, Result};
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pooling {
    Mean,
    Cls,
    Max,
}

impl std::str::FromStr for Pooling {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mean" => Ok(Pooling::Mean),
            "cls" => Ok(Pooling::Cls),
            "max" => Ok(Pooling::Max),
            _ => Err(Error::InvalidArgument(format!(
                "unknown pooling `{s}` (expected mean, cls or max)"
            ))),
        }
    }
}

impl std::fmt::Display for Pooling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Pooling::Mean => "mean",
            Pooling::Cls => "cls",
            Pooling::Max => "max",
        })
    }
}

impl Pooling {
    /// Pools `len` token rows of width `dim` into `out`. An empty sequence pools to the zero
    /// vector in every mode (as the GPU kernels do).
    pub fn pool(self, tokens: &[f32], len: usize, dim: usize, out: &mut [f32]) {
        if len == 0 {
            out.fill(0.0);
            return;
        }
        match self {
            Pooling::Cls => out.copy_from_slice(&tokens[..dim]),
            Pooling::Mean => {
                out.fill(0.0);
                for row in tokens.chunks_exact(dim).take(len) {
                    for (o, v) in out.iter_mut().zip(row) {
                        *o += v;
                    }
                }
                let inv = 1.0 / len.max(1) as f32;
                out.iter_mut().for_each(|o| *o *= inv);
            }
            Pooling::Max => {
                out.fill(f32::NEG_INFINITY);
                for row in tokens.chunks_exact(dim).take(len) {
                    for (o, v) in out.iter_mut().zip(row) {
                        *o = o.max(*v);
                    }
                }
            }
        }
    }
}

/// What a model folder's sentence-transformers files say (each `None` when absent).
#[derive(Debug, Clone, Default)]
pub struct SentenceTransformersConfig {
    pub pooling: Option<Pooling>,
    pub normalize: Option<bool>,
    pub max_seq_length: Option<usize>,
}

impl SentenceTransformersConfig {
    pub fn read(dir: &Path) -> Result<Self> {
        let mut st = SentenceTransformersConfig::default();
        if let Some(v) = read_json_opt(&dir.join("sentence_bert_config.json"))? {
            st.max_seq_length = v
                .get("max_seq_length")
                .and_then(Value::as_u64)
                .map(|n| n as usize);
        }
        let modules = read_json_opt(&dir.join("modules.json"))?;
        let mut pooling_dir = dir.join("1_Pooling");
        if let Some(Value::Array(mods)) = &modules {
            st.normalize = Some(false);
            for m in mods {
                let ty = m.get("type").and_then(Value::as_str).unwrap_or("");
                if ty.ends_with(".Normalize") {
                    st.normalize = Some(true);
                }
                if ty.ends_with(".Pooling") {
                    if let Some(p) = m.get("path").and_then(Value::as_str) {
                        pooling_dir = dir.join(p);
                    }
                }
            }
        }
        let pool_file = pooling_dir.join("config.json");
        if let Some(v) = read_json_opt(&pool_file)? {
            let flag = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
            st.pooling = if flag("pooling_mode_mean_tokens") {
                Some(Pooling::Mean)
            } else if flag("pooling_mode_cls_token") {
                Some(Pooling::Cls)
            } else if flag("pooling_mode_max_tokens") {
                Some(Pooling::Max)
            } else {
                return Err(Error::format(
                    &pool_file,
                    "no supported pooling mode is enabled (mean, cls or max)",
                ));
            };
        }
        Ok(st)
    }
}

fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::parse(path, e.line(), e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::Pooling;

    #[test]
    fn an_empty_sequence_pools_to_zero_in_every_mode() {
        for p in [Pooling::Mean, Pooling::Cls, Pooling::Max] {
            let mut out = [7.0f32; 3];
            p.pool(&[], 0, 3, &mut out);
            assert_eq!(out, [0.0; 3], "{p}");
        }
        let rows = [1.0f32, -2.0, 3.0, 5.0, -4.0, 0.5];
        let mut out = [0.0f32; 3];
        Pooling::Max.pool(&rows, 2, 3, &mut out);
        assert_eq!(out, [5.0, -2.0, 3.0]);
        Pooling::Cls.pool(&rows, 2, 3, &mut out);
        assert_eq!(out, [1.0, -2.0, 3.0]);
        Pooling::Mean.pool(&rows, 2, 3, &mut out);
        assert_eq!(out, [3.0, -3.0, 1.75]);
    }
}
