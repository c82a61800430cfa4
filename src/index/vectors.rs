//! Element types and borrowed views of embedding matrices.
//!
//! A store keeps its vectors in one of three element types; search code never copies the whole
//! matrix but borrows it through [`Vectors`] (straight from the memory map) and converts small
//! blocks to f32 where it needs to compute. [`Corpus`] adds the row length so a search can run on
//! any in-memory slice as well as on a store.

use super::simd;
use crate::error::{Error, Result};
use half::{bf16, f16};
use std::fmt;
use std::str::FromStr;

/// Element type of stored vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// IEEE binary32: exact, 4 bytes per value.
    F32,
    /// IEEE binary16: half the size; range ±65504, ~3 significant digits (plenty for unit vectors).
    F16,
    /// bfloat16: half the size; the f32 range with ~2 significant digits.
    Bf16,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }

    /// The lower-case name used on the command line and in metadata ("f32", "f16", "bf16").
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }

    /// The code stored in the file header (see docs/FORMAT.md).
    pub(crate) fn code(self) -> u8 {
        match self {
            Dtype::F32 => 0,
            Dtype::F16 => 1,
            Dtype::Bf16 => 2,
        }
    }

    pub(crate) fn from_code(code: u8) -> Option<Dtype> {
        match code {
            0 => Some(Dtype::F32),
            1 => Some(Dtype::F16),
            2 => Some(Dtype::Bf16),
            _ => None,
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Dtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Dtype::F32),
            "f16" | "float16" | "fp16" => Ok(Dtype::F16),
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            _ => Err(Error::InvalidArgument(format!(
                "unknown dtype `{s}` (expected f32, f16 or bf16)"
            ))),
        }
    }
}

/// A borrowed, row-major matrix of vectors in its stored element type (`count * dim` elements).
#[derive(Debug, Clone, Copy)]
pub enum Vectors<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
}

impl<'a> Vectors<'a> {
    pub fn dtype(&self) -> Dtype {
        match self {
            Vectors::F32(_) => Dtype::F32,
            Vectors::F16(_) => Dtype::F16,
            Vectors::Bf16(_) => Dtype::Bf16,
        }
    }

    /// Number of elements (not rows).
    pub fn len(&self) -> usize {
        match self {
            Vectors::F32(v) => v.len(),
            Vectors::F16(v) => v.len(),
            Vectors::Bf16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Converts elements `start .. start + out.len()` to f32 into `out` (exact: every f16 and
    /// bf16 value is an f32), with F16C / AVX2 when the CPU has them.
    ///
    /// # Panics
    /// If the range is out of bounds, like slice indexing.
    pub fn to_f32(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        match self {
            Vectors::F32(v) => out.copy_from_slice(&v[start..end]),
            Vectors::F16(v) => simd::f16_to_f32(&v[start..end], out),
            Vectors::Bf16(v) => simd::bf16_to_f32(&v[start..end], out),
        }
    }
}

/// Vectors plus their dimension: what an exact search scans. Build one from a [`Store`]
/// (`Store::corpus`) or from any slice (`Corpus::new`).
///
/// [`Store`]: crate::index::Store
#[derive(Debug, Clone, Copy)]
pub struct Corpus<'a> {
    pub vectors: Vectors<'a>,
    pub dim: usize,
}

impl<'a> Corpus<'a> {
    /// Checks that `dim > 0` and that the element count is a multiple of `dim`.
    pub fn new(vectors: Vectors<'a>, dim: usize) -> Result<Self> {
        let c = Corpus { vectors, dim };
        c.validate()?;
        Ok(c)
    }

    /// An f32 corpus from a row-major slice.
    pub fn from_f32(vectors: &'a [f32], dim: usize) -> Result<Self> {
        Corpus::new(Vectors::F32(vectors), dim)
    }

    /// Number of rows (0 when `dim` is 0).
    pub fn len(&self) -> usize {
        self.vectors.len().checked_div(self.dim).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The fields are public, so searches re-check them instead of trusting construction.
    pub(crate) fn validate(&self) -> Result<()> {
        if self.dim == 0 {
            return Err(Error::InvalidArgument(
                "corpus dimension must be positive".into(),
            ));
        }
        if !self.vectors.len().is_multiple_of(self.dim) {
            return Err(Error::InvalidArgument(format!(
                "corpus has {} values, not a multiple of its dimension {}",
                self.vectors.len(),
                self.dim
            )));
        }
        Ok(())
    }
}
