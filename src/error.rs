//! The one error type of the library. Every variant names the file it is about (and the line where
//! there is one), so a CLI user reads one clear sentence and a service can match on the kind.

use std::path::{Path, PathBuf};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operating system refused an operation on a file.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A text file (JSONL, TSV, TREC run, JSON config) has a bad line.
    #[error("{path}:{line}: {msg}")]
    Parse {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    /// A file is not what it claims to be (bad magic, checksum, truncated, wrong dtype, ...).
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// A model file lacks a tensor the architecture needs.
    #[error("{path}: missing tensor `{name}`")]
    MissingTensor { path: PathBuf, name: String },
    /// A model tensor has the wrong shape.
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    TensorShape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// Two inputs that must agree do not (a store built by another model, a dimension mismatch).
    #[error("{path}: {msg}")]
    Mismatch { path: PathBuf, msg: String },
    /// A caller passed an argument outside its domain (k = 0, an empty batch, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The CUDA driver or a device is not available; the CPU path still is.
    #[error("CUDA unavailable: {0}")]
    CudaUnavailable(String),
    /// A CUDA driver or library call failed on an available device.
    #[error("CUDA error: {0}")]
    Cuda(String),
}

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
    pub fn parse(path: impl AsRef<Path>, line: usize, msg: impl Into<String>) -> Self {
        Error::Parse {
            path: path.as_ref().to_path_buf(),
            line,
            msg: msg.into(),
        }
    }
    pub fn format(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }
    pub fn mismatch(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Mismatch {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }
}
