//! Small helpers: atomic file replacement (every writer), and where cached things live.

use crate::error::{Error, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Writes `path` atomically: the content goes to a temporary file in the same folder, is flushed
/// and fsynced, then renamed over `path`. On any error (or a panic in `write`) the temporary file
/// is removed and `path` is left as it was, so a reader never sees a half-written file.
pub fn atomic_write<F>(path: &Path, write: F) -> Result<()>
where
    F: FnOnce(&mut BufWriter<File>) -> Result<()>,
{
    let tmp = temp_path(path);
    let mut guard = RemoveOnDrop(Some(tmp.clone()));
    let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    write(&mut w)?;
    w.flush().map_err(|e| Error::io(&tmp, e))?;
    let file = w
        .into_inner()
        .map_err(|e| Error::io(&tmp, e.into_error()))?;
    file.sync_all().map_err(|e| Error::io(&tmp, e))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    // Disarmed rather than forgotten: `mem::forget` would leak the path on every write.
    guard.0 = None;
    // Make the rename itself durable; failure here loses nothing, so it is not an error.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// The cache folder: `$RRRA_CACHE`, else `~/.cache/rrra` (the folder tools/fetch-model.sh and
/// tools/install-nvcc.sh fill), else `.rrra-cache` when there is no home folder.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("RRRA_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/rrra")))
        .unwrap_or_else(|| PathBuf::from(".rrra-cache"))
}

/// The reference model's folder: `$RRRA_MODEL`, else where tools/fetch-model.sh puts
/// all-MiniLM-L6-v2.
pub fn default_model_dir() -> PathBuf {
    std::env::var_os("RRRA_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("models/all-MiniLM-L6-v2"))
}

/// A temporary name beside `path`, unique per process and per call: two threads of one
/// process writing the same file (the last rename wins) never share a temporary.
fn temp_path(path: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

struct RemoveOnDrop(Option<PathBuf>);
impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_write_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.bin");
        std::fs::write(&p, b"old").unwrap();
        let r = atomic_write(&p, |w| {
            w.write_all(b"new partial").unwrap();
            Err(Error::InvalidArgument("boom".into()))
        });
        assert!(r.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        atomic_write(&p, |w| w.write_all(b"new").map_err(|e| Error::io("x", e))).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
    }

    #[test]
    fn concurrent_writers_of_one_file_do_not_collide() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shared.bin");
        std::thread::scope(|s| {
            for t in 0..8u8 {
                let p = &p;
                s.spawn(move || {
                    for _ in 0..20 {
                        atomic_write(p, |w| {
                            w.write_all(&[t; 4096]).map_err(|e| Error::io("x", e))
                        })
                        .unwrap();
                    }
                });
            }
        });
        // one writer's whole content, and no temporary left behind
        let got = std::fs::read(&p).unwrap();
        assert_eq!(got.len(), 4096);
        assert!(got.iter().all(|&b| b == got[0]));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
