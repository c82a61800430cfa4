//! Export of a store to NumPy: the vectors as a `.npy` matrix, the ids as a text file, so a
//! store can be inspected or fed to faiss/numpy without this crate.
//!
//! `.npy` version 1.0: the 6-byte magic `\x93NUMPY`, version bytes 1 0, a u16 little-endian
//! header length, then a Python dict literal padded with spaces and a final newline so the data
//! starts at a multiple of 64 bytes, then the raw little-endian data in C order.

use super::store::Store;
use super::vectors::Vectors;
use crate::error::{Error, Result};
use crate::util::atomic_write;
use half::slice::HalfFloatSliceExt;
use std::io::Write;
use std::path::Path;

/// The `.npy` v1.0 header for a C-order matrix of `descr` with the given shape.
fn npy_header(descr: &str, rows: usize, cols: usize) -> Vec<u8> {
    let dict =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    let unpadded = 10 + dict.len() + 1; // magic + version + u16 length, dict, '\n'
    let total = unpadded.div_ceil(64) * 64;
    let mut h = Vec::with_capacity(total);
    h.extend_from_slice(b"\x93NUMPY\x01\x00");
    h.extend_from_slice(&((total - 10) as u16).to_le_bytes());
    h.extend_from_slice(dict.as_bytes());
    h.resize(total - 1, b' ');
    h.push(b'\n');
    h
}

/// Writes the vectors as a `(count, dim)` `.npy` file, atomically: `<f4` for f32 stores, `<f2`
/// for f16 stores, and `<f4` for bf16 stores (NumPy has no bfloat16; the conversion is exact).
pub fn export_npy(store: &Store, path: &Path) -> Result<()> {
    let (rows, cols) = (store.len(), store.dim());
    let io = |e| Error::io(path, e);
    atomic_write(path, |w| {
        match store.vectors() {
            Vectors::F32(v) => {
                w.write_all(&npy_header("<f4", rows, cols)).map_err(io)?;
                for x in v {
                    w.write_all(&x.to_le_bytes()).map_err(io)?;
                }
            }
            Vectors::F16(v) => {
                w.write_all(&npy_header("<f2", rows, cols)).map_err(io)?;
                for x in v {
                    w.write_all(&x.to_bits().to_le_bytes()).map_err(io)?;
                }
            }
            Vectors::Bf16(v) => {
                w.write_all(&npy_header("<f4", rows, cols)).map_err(io)?;
                let mut row = vec![0f32; cols];
                for chunk in v.chunks_exact(cols.max(1)) {
                    chunk.convert_to_f32_slice(&mut row);
                    for x in &row {
                        w.write_all(&x.to_le_bytes()).map_err(io)?;
                    }
                }
            }
        }
        Ok(())
    })
}

/// Writes the ids, one per line in row order (ids never contain line breaks), atomically.
pub fn export_ids(store: &Store, path: &Path) -> Result<()> {
    atomic_write(path, |w| {
        for id in store.ids() {
            w.write_all(id.as_bytes())
                .and_then(|_| w.write_all(b"\n"))
                .map_err(|e| Error::io(path, e))?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_64_aligned_and_parsable() {
        for (r, c) in [(0usize, 1usize), (3, 384), (1_000_000, 768)] {
            let h = npy_header("<f4", r, c);
            assert_eq!(h.len() % 64, 0);
            assert_eq!(&h[..8], b"\x93NUMPY\x01\x00");
            let hl = u16::from_le_bytes([h[8], h[9]]) as usize;
            assert_eq!(10 + hl, h.len());
            let text = std::str::from_utf8(&h[10..]).unwrap();
            assert!(text.ends_with('\n'));
            assert!(text.contains(&format!("'shape': ({r}, {c})")));
        }
    }
}
