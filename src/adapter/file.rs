//! The adapter on disk: one safetensors file (`adapter.safetensors`, stored beside the encoder
//! it was trained on) holding the MLP and the two scales, with the false-negative calibration,
//! the reranking exponent, the temperature and every training knob in its metadata.

use super::calibrate::FnCalibration;
use super::fit::AdapterTrainConfig;
use super::AdapterParams;
use crate::error::{Error, Result};
use crate::train::checkpoint::{self, NamedTensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const FORMAT: &str = "rrra-adapter-v1";
/// The file name inside a model folder.
pub const FILE_NAME: &str = "adapter.safetensors";

/// Everything reranking and resampling need.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterFile {
    pub params: AdapterParams,
    pub calibration: FnCalibration,
    /// Exponent of `p` in the rerank score `s_base · p^lambda_rr`.
    pub lambda_rr: f64,
    /// Temperature of the retriever scores `s/tau` (the softmax of `s_base`).
    pub tau: f32,
    pub train_config: AdapterTrainConfig,
    /// Free-form facts recorded with the adapter: the encoder it was trained on, the class
    /// counts, the dev-split lambda table, timings.
    pub info: serde_json::Value,
}

/// `path` itself when it names a file, else `path/adapter.safetensors`.
pub fn resolve(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(FILE_NAME)
    } else {
        path.to_path_buf()
    }
}

impl AdapterFile {
    /// Writes atomically (a temporary file renamed over `path`).
    pub fn save(&self, path: &Path) -> Result<()> {
        self.params.check()?;
        let tensors: Vec<NamedTensor<'_>> = self
            .params
            .tensors()
            .iter()
            .map(|(name, data)| NamedTensor {
                name: (*name).to_string(),
                shape: match *name {
                    "w1" => vec![self.params.h, 3 * self.params.d],
                    "w1_pos" => vec![self.params.h, 2 * self.params.d],
                    "w2" => vec![self.params.d, self.params.h],
                    _ => vec![data.len()],
                },
                data,
            })
            .collect();
        let json = |v: serde_json::Result<String>| {
            v.map_err(|e| Error::InvalidArgument(format!("adapter metadata: {e}")))
        };
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), FORMAT.to_string());
        meta.insert("rrra.dim".into(), self.params.d.to_string());
        meta.insert("rrra.hidden".into(), self.params.h.to_string());
        meta.insert("rrra.lambda_rr".into(), self.lambda_rr.to_string());
        meta.insert("rrra.tau".into(), self.tau.to_string());
        meta.insert(
            "rrra.calibration".into(),
            json(serde_json::to_string(&self.calibration))?,
        );
        meta.insert(
            "rrra.train_config".into(),
            json(serde_json::to_string(&self.train_config))?,
        );
        meta.insert("rrra.info".into(), self.info.to_string());
        checkpoint::write_safetensors(path, &tensors, &meta)
    }

    /// Reads and checks an adapter file (or the one inside a model folder).
    pub fn load(path: &Path) -> Result<Self> {
        let path = resolve(path);
        if !path.is_file() {
            return Err(Error::format(&path, "adapter file not found"));
        }
        let loaded = checkpoint::read_safetensors(&path)?;
        let meta = &loaded.metadata;
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(Error::format(
                &path,
                format!("not an adapter file (format {FORMAT})"),
            ));
        }
        let get = |k: &str| {
            meta.get(k)
                .ok_or_else(|| Error::format(&path, format!("metadata `{k}` is missing")))
        };
        let num = |k: &str| -> Result<f64> {
            get(k)?
                .parse()
                .map_err(|_| Error::format(&path, format!("metadata `{k}` is not a number")))
        };
        let parse = |k: &str| -> Result<serde_json::Value> {
            serde_json::from_str(get(k)?)
                .map_err(|e| Error::format(&path, format!("metadata `{k}`: {e}")))
        };
        let dim = |k: &str| -> Result<usize> {
            get(k)?.parse().map_err(|_| {
                Error::format(&path, format!("metadata `{k}` is not a positive integer"))
            })
        };
        // A NaN or infinite weight would make every rerank score NaN: refuse it here, by name.
        let finite = |name: &str, v: &[f32]| -> Result<()> {
            match v.iter().position(|x| !x.is_finite()) {
                Some(i) => Err(Error::format(
                    &path,
                    format!("tensor `{name}` has a non-finite value at element {i}"),
                )),
                None => Ok(()),
            }
        };
        let tensor = |name: &str| -> Result<Vec<f32>> {
            let v = loaded
                .tensors
                .get(name)
                .map(|(_, v)| v.clone())
                .ok_or_else(|| Error::format(&path, format!("tensor `{name}` is missing")))?;
            finite(name, &v)?;
            Ok(v)
        };
        let scalar = |name: &str| -> Result<f32> {
            match tensor(name)?.as_slice() {
                [v] => Ok(*v),
                v => Err(Error::format(
                    &path,
                    format!("tensor `{name}` should hold one value, holds {}", v.len()),
                )),
            }
        };
        let params = AdapterParams {
            d: dim("rrra.dim")?,
            h: dim("rrra.hidden")?,
            w1: tensor("w1")?,
            b1: tensor("b1")?,
            w2: tensor("w2")?,
            b2: tensor("b2")?,
            beta: scalar("beta")?,
            beta0: scalar("beta0")?,
            w1_pos: match loaded.tensors.get("w1_pos") {
                Some(_) => tensor("w1_pos")?,
                None => Vec::new(),
            },
        };
        // Sizes are compared as products in `check`: bound them first so those cannot overflow.
        if params.d > 1 << 20 || params.h > 1 << 20 {
            return Err(Error::format(
                &path,
                format!(
                    "implausible adapter size d = {}, h = {}",
                    params.d, params.h
                ),
            ));
        }
        params
            .check()
            .map_err(|e| Error::format(&path, e.to_string()))?;
        let bad =
            |k: &str, e: serde_json::Error| Error::format(&path, format!("metadata `{k}`: {e}"));
        Ok(AdapterFile {
            calibration: serde_json::from_value(parse("rrra.calibration")?)
                .map_err(|e| bad("rrra.calibration", e))?,
            train_config: serde_json::from_value(parse("rrra.train_config")?)
                .map_err(|e| bad("rrra.train_config", e))?,
            info: parse("rrra.info")?,
            lambda_rr: Some(num("rrra.lambda_rr")?)
                .filter(|l| l.is_finite())
                .ok_or_else(|| Error::format(&path, "metadata `rrra.lambda_rr` is not finite"))?,
            tau: Some(num("rrra.tau")? as f32)
                .filter(|t| t.is_finite() && *t > 0.0)
                .ok_or_else(|| {
                    Error::format(&path, "metadata `rrra.tau` is not a finite positive number")
                })?,
            params,
        })
    }

    /// An error naming `path` unless the adapter reads embeddings of dimension `dim`.
    pub fn check_dim(&self, dim: usize, path: &Path) -> Result<()> {
        if self.params.d == dim {
            Ok(())
        } else {
            Err(Error::Mismatch {
                path: resolve(path),
                msg: format!(
                    "the adapter reads {}-dimensional embeddings but the encoder produces {dim}",
                    self.params.d
                ),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let mut params = AdapterParams::init(6, 4, 1).unwrap();
        params.beta = 7.5;
        let f = AdapterFile {
            params,
            calibration: FnCalibration {
                w_score: 3.0,
                w_logit: 0.5,
                bias: -2.0,
                scorer: super::super::calibrate::FnScorer::Combined,
            },
            lambda_rr: 2.0,
            tau: 0.05,
            train_config: AdapterTrainConfig::default(),
            info: serde_json::json!({"encoder": "x"}),
        };
        f.save(&dir.path().join(FILE_NAME)).unwrap();
        let back = AdapterFile::load(dir.path()).unwrap();
        assert_eq!(back, f);
        back.check_dim(6, dir.path()).unwrap();
        let e = back.check_dim(384, dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("adapter.safetensors") && e.contains("384"),
            "{e}"
        );
        let missing = AdapterFile::load(&dir.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("nope"), "{missing}");
        // a safetensors file that is not an adapter
        let other = dir.path().join("other.safetensors");
        checkpoint::write_safetensors(&other, &[], &BTreeMap::new()).unwrap();
        assert!(AdapterFile::load(&other)
            .unwrap_err()
            .to_string()
            .contains("not an adapter"));
    }
}
