//! Saving what training produces: F32 safetensors files (model weights, optimiser state) and
//! complete Hugging Face / sentence-transformers model folders that `SentenceTransformer(dir)`,
//! `AutoModel.from_pretrained(dir)` and this crate's own loader all open.
//!
//! Every file goes through [`atomic_write`], and a model folder is assembled beside its final
//! place and renamed in, so a crash at any moment leaves either the old checkpoint or the new
//! one, never a mixture.

use crate::error::{Error, Result};
use crate::model::pooling::Pooling;
use crate::util::atomic_write;
use safetensors::{Dtype, SafeTensors};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A tensor to save: name, shape, f32 data.
pub struct NamedTensor<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: &'a [f32],
}

/// A U32 tensor to save (indices, e.g. a training state's mined pool).
pub struct U32Tensor<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: &'a [u32],
}

/// Every tensor of a safetensors file, and its `__metadata__` (empty when absent).
#[derive(Debug, Clone, Default)]
pub struct LoadedTensors {
    pub tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    /// U32 tensors (only [`write_safetensors_with_u32`] writes them).
    pub u32_tensors: BTreeMap<String, (Vec<usize>, Vec<u32>)>,
    pub metadata: BTreeMap<String, String>,
}

/// A tensor of either dtype, as the writer lays it out.
enum Data<'a> {
    F32(&'a [f32]),
    U32(&'a [u32]),
}

struct Entry<'a> {
    name: &'a str,
    shape: &'a [usize],
    data: Data<'a>,
}

impl Entry<'_> {
    fn len(&self) -> usize {
        match self.data {
            Data::F32(d) => d.len(),
            Data::U32(d) => d.len(),
        }
    }
    fn dtype(&self) -> &'static str {
        match self.data {
            Data::F32(_) => "F32",
            Data::U32(_) => "U32",
        }
    }
}

impl Data<'_> {
    /// Appends the little-endian bytes of elements `range` to `buf`.
    fn extend_le_bytes(&self, range: std::ops::Range<usize>, buf: &mut Vec<u8>) {
        match self {
            Data::F32(d) => buf.extend(d[range].iter().flat_map(|v| v.to_le_bytes())),
            Data::U32(d) => buf.extend(d[range].iter().flat_map(|v| v.to_le_bytes())),
        }
    }
}

/// Values converted to bytes per write call: bounds the extra memory of saving.
const WRITE_CHUNK: usize = 1 << 14;

/// Writes an F32 safetensors file atomically (little-endian), with string → string `metadata`
/// in `__metadata__` (omitted when empty).
///
/// The bytes depend only on the inputs: tensors are laid out in name order and the header keys
/// are written sorted, so the same weights always give the same file (and the same content
/// hash). Duplicate or reserved names and shapes that disagree with the data are
/// `InvalidArgument`, reported before anything is written.
pub fn write_safetensors(
    path: &Path,
    tensors: &[NamedTensor<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    write_safetensors_with_u32(path, tensors, &[], metadata)
}

/// [`write_safetensors`] with U32 tensors beside the F32 ones (same layout rules).
pub fn write_safetensors_with_u32(
    path: &Path,
    tensors: &[NamedTensor<'_>],
    u32_tensors: &[U32Tensor<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut order: Vec<Entry<'_>> = tensors
        .iter()
        .map(|t| Entry {
            name: &t.name,
            shape: &t.shape,
            data: Data::F32(t.data),
        })
        .chain(u32_tensors.iter().map(|t| Entry {
            name: &t.name,
            shape: &t.shape,
            data: Data::U32(t.data),
        }))
        .collect();
    order.sort_by(|a, b| a.name.cmp(b.name));
    let header = safetensors_header(path, &order, metadata)?;
    atomic_write(path, |w| {
        let io = |e| Error::io(path, e);
        w.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(io)?;
        w.write_all(&header).map_err(io)?;
        let mut buf = Vec::with_capacity(4 * WRITE_CHUNK);
        for t in order {
            for start in (0..t.len()).step_by(WRITE_CHUNK) {
                buf.clear();
                t.data
                    .extend_le_bytes(start..(start + WRITE_CHUNK).min(t.len()), &mut buf);
                w.write_all(&buf).map_err(io)?;
            }
        }
        Ok(())
    })
}

/// The JSON header for tensors already in name order: `__metadata__` first, then one entry per
/// tensor with contiguous offsets; padded with spaces to a multiple of 8 bytes like the reference
/// writer, so the data that follows is aligned.
fn safetensors_header(
    path: &Path,
    order: &[Entry<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let bad = |msg: String| Error::InvalidArgument(format!("{}: {msg}", path.display()));
    // Built as text rather than through a JSON map so the key order never depends on serde_json
    // features enabled elsewhere in the build.
    let mut entries: Vec<String> = Vec::with_capacity(order.len() + 1);
    if !metadata.is_empty() {
        let pairs: Vec<String> = metadata
            .iter()
            .map(|(k, v)| format!("{}:{}", json_string(k), json_string(v)))
            .collect();
        entries.push(format!("\"__metadata__\":{{{}}}", pairs.join(",")));
    }
    let mut seen = BTreeSet::new();
    let mut offset = 0usize;
    for t in order {
        if t.name.is_empty() || t.name == "__metadata__" {
            return Err(bad(format!("`{}` cannot name a tensor", t.name)));
        }
        if !seen.insert(t.name) {
            return Err(bad(format!("tensor `{}` is given twice", t.name)));
        }
        let elements = t
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| {
                bad(format!(
                    "tensor `{}`: shape {:?} overflows",
                    t.name, t.shape
                ))
            })?;
        if elements != t.len() {
            return Err(bad(format!(
                "tensor `{}`: shape {:?} holds {elements} values but {} were given",
                t.name,
                t.shape,
                t.len()
            )));
        }
        let end = 4 * elements + offset;
        let shape: Vec<String> = t.shape.iter().map(usize::to_string).collect();
        entries.push(format!(
            "{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{offset},{end}]}}",
            json_string(t.name),
            t.dtype(),
            shape.join(",")
        ));
        offset = end;
    }
    let mut bytes = format!("{{{}}}", entries.join(",")).into_bytes();
    bytes.resize(bytes.len().next_multiple_of(8), b' ');
    Ok(bytes)
}

/// A JSON string literal (quotes and escapes included).
fn json_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// Reads every tensor of an F32 safetensors file and its `__metadata__`. A tensor of another
/// dtype, or a file that is not valid safetensors (truncated, corrupt header), is
/// `Error::Format` naming the file (and the tensor).
pub fn read_safetensors(path: &Path) -> Result<LoadedTensors> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::format(path, format!("not a valid safetensors file: {e}")))?;
    // `deserialize` checked that the header parses and the offsets tile the data exactly.
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::format(path, format!("not a valid safetensors file: {e}")))?;
    let mut out = LoadedTensors::default();
    if let Some(m) = header.metadata() {
        out.metadata = m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    }
    for (name, view) in st.iter() {
        // Both dtypes are 4-byte little-endian words; F32 is the same bits reinterpreted.
        let words = || {
            view.data()
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        if view.dtype() == Dtype::U32 {
            out.u32_tensors
                .insert(name.to_string(), (view.shape().to_vec(), words().collect()));
            continue;
        }
        if view.dtype() != Dtype::F32 {
            return Err(Error::format(
                path,
                format!(
                    "tensor `{name}` has dtype {:?}; expected F32 (or U32)",
                    view.dtype()
                ),
            ));
        }
        let data: Vec<f32> = words().map(f32::from_bits).collect();
        out.tensors
            .insert(name.to_string(), (view.shape().to_vec(), data));
    }
    Ok(out)
}

/// Only the `__metadata__` of a safetensors file (reads the header, not the tensors).
pub fn read_safetensors_metadata(path: &Path) -> Result<BTreeMap<String, String>> {
    use std::io::Read;
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    // A cut file is a format error like any other bad content, not an I/O "unexpected EOF".
    let truncated = || Error::format(path, format!("truncated: {file_len} bytes"));
    if file_len < 8 {
        return Err(truncated());
    }
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| Error::io(path, e))?;
    let n = u64::from_le_bytes(len);
    if n > file_len - 8 && n <= 100 << 20 {
        return Err(truncated());
    }
    if n > 100 << 20 {
        return Err(Error::format(
            path,
            format!("header of {n} bytes is implausible"),
        ));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| Error::format(path, format!("not a valid safetensors header: {e}")))?;
    Ok(v.get("__metadata__")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect()
        })
        .unwrap_or_default())
}

/// What the sentence-transformers side of a model folder says.
pub struct ModelFolderSpec<'a> {
    /// The model folder training started from: config.json and the tokenizer files are copied
    /// from it byte for byte.
    pub source_dir: &'a Path,
    pub pooling: Pooling,
    pub normalize: bool,
    pub max_seq_length: usize,
    /// Width of the token embeddings (BERT's hidden size).
    pub dim: usize,
}

/// Copied when present; `config.json` and `tokenizer.json` are required on top of these.
const OPTIONAL_TOKENIZER_FILES: [&str; 3] = [
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
];

/// Writes a complete Hugging Face / sentence-transformers model folder at `dir`:
/// `model.safetensors` (tensors + metadata); `config.json`, `tokenizer.json` and whichever of
/// `tokenizer_config.json`, `special_tokens_map.json`, `vocab.txt` exist, copied from
/// `spec.source_dir`; `modules.json` (Transformer, Pooling at `1_Pooling`, Normalize at
/// `2_Normalize` when `spec.normalize`); `1_Pooling/config.json`; `sentence_bert_config.json`.
///
/// The folder appears complete or not at all: everything is written into a sibling temporary
/// folder, fsynced, then renamed to `dir`. An existing `dir` is first renamed aside and removed
/// only once the new one is in place; on any error it is left untouched and the temporary
/// folder is removed. `source_dir` may be `dir` itself (everything is read before the swap).
pub fn write_model_folder(
    dir: &Path,
    spec: &ModelFolderSpec<'_>,
    tensors: &[NamedTensor<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    if spec.dim == 0 || spec.max_seq_length == 0 {
        return Err(Error::InvalidArgument(format!(
            "{}: model folder needs a positive dimension and max_seq_length (got {} and {})",
            dir.display(),
            spec.dim,
            spec.max_seq_length
        )));
    }
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| {
            Error::InvalidArgument(format!("{}: not a usable folder name", dir.display()))
        })?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let existing = match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() || m.file_type().is_symlink() => true,
        Ok(_) => {
            return Err(Error::InvalidArgument(format!(
                "{}: exists and is not a folder",
                dir.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(Error::io(dir, e)),
    };

    // Unique per process and call, so concurrent saves never share a scratch folder.
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let tag = format!(
        "{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let tmp = parent.join(format!(".{name}.tmp-{tag}"));
    if tmp.exists() {
        // Only a crashed run of a process with the same id could have left it.
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut guard = RemoveDirOnDrop(Some(tmp.clone()));
    fill_model_folder(&tmp, spec, tensors, metadata)?;
    sync_dir(&tmp);

    if existing {
        let aside = parent.join(format!(".{name}.old-{tag}"));
        std::fs::rename(dir, &aside).map_err(|e| Error::io(dir, e))?;
        if let Err(e) = std::fs::rename(&tmp, dir) {
            // Put the old folder back so the caller still has its last checkpoint.
            let _ = std::fs::rename(&aside, dir);
            return Err(Error::io(dir, e));
        }
        guard.0 = None;
        sync_dir(&parent);
        // The new folder is durable in place; failing to delete the old one loses nothing, so
        // it is not reported as a failed save.
        let _ = std::fs::remove_dir_all(&aside);
    } else {
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
        guard.0 = None;
        sync_dir(&parent);
    }
    Ok(())
}

fn fill_model_folder(
    tmp: &Path,
    spec: &ModelFolderSpec<'_>,
    tensors: &[NamedTensor<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    // The source files first: a source folder that cannot be copied fails before the large
    // weights are written.
    for file in ["config.json", "tokenizer.json"] {
        copy_file(&spec.source_dir.join(file), &tmp.join(file))?;
    }
    for file in OPTIONAL_TOKENIZER_FILES {
        let src = spec.source_dir.join(file);
        match std::fs::metadata(&src) {
            Ok(_) => copy_file(&src, &tmp.join(file))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&src, e)),
        }
    }

    write_safetensors(&tmp.join("model.safetensors"), tensors, metadata)?;

    let mut modules = vec![
        json!({"idx": 0, "name": "0", "path": "",
               "type": "sentence_transformers.models.Transformer"}),
        json!({"idx": 1, "name": "1", "path": "1_Pooling",
               "type": "sentence_transformers.models.Pooling"}),
    ];
    if spec.normalize {
        modules.push(json!({"idx": 2, "name": "2", "path": "2_Normalize",
                            "type": "sentence_transformers.models.Normalize"}));
        // Normalize has no parameters; sentence-transformers still saves (and expects) its
        // folder.
        make_dir(&tmp.join("2_Normalize"))?;
    }
    write_json(&tmp.join("modules.json"), &serde_json::Value::from(modules))?;

    let pooling_dir = tmp.join("1_Pooling");
    make_dir(&pooling_dir)?;
    // Exactly the keys every sentence-transformers version accepts (older ones reject unknown
    // constructor arguments).
    let pooling = json!({
        "word_embedding_dimension": spec.dim,
        "pooling_mode_cls_token": spec.pooling == Pooling::Cls,
        "pooling_mode_mean_tokens": spec.pooling == Pooling::Mean,
        "pooling_mode_max_tokens": spec.pooling == Pooling::Max,
        "pooling_mode_mean_sqrt_len_tokens": false,
    });
    write_json(&pooling_dir.join("config.json"), &pooling)?;
    sync_dir(&pooling_dir);

    let st = json!({"max_seq_length": spec.max_seq_length, "do_lower_case": false});
    write_json(&tmp.join("sentence_bert_config.json"), &st)?;
    Ok(())
}

fn copy_file(src: &Path, dst: &Path) -> Result<()> {
    // Read and rewritten rather than `fs::copy`, which would also copy read-only permissions.
    let bytes = std::fs::read(src).map_err(|e| Error::io(src, e))?;
    atomic_write(dst, |w| w.write_all(&bytes).map_err(|e| Error::io(dst, e)))
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    atomic_write(path, |w| {
        serde_json::to_writer_pretty(&mut *w, value)
            .map_err(|e| Error::io(path, std::io::Error::other(e)))?;
        w.write_all(b"\n").map_err(|e| Error::io(path, e))
    })
}

fn make_dir(path: &Path) -> Result<()> {
    std::fs::create_dir(path).map_err(|e| Error::io(path, e))
}

/// Makes a folder's entries durable. Best effort: some platforms cannot open a folder for
/// syncing, and the files themselves are already synced.
fn sync_dir(path: &Path) {
    if let Ok(d) = File::open(path) {
        let _ = d.sync_all();
    }
}

struct RemoveDirOnDrop(Option<PathBuf>);
impl Drop for RemoveDirOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::pooling::SentenceTransformersConfig;

    fn meta(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The shared tiny-bert fixture when available, else a minimal folder built in `scratch`.
    fn source_folder(scratch: &Path) -> PathBuf {
        let shared = std::env::var_os("RRRA_SHARED")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"));
        let fixture = shared.join("fixtures/tiny-bert");
        if fixture.join("tokenizer.json").is_file() && fixture.join("config.json").is_file() {
            return fixture;
        }
        let src = scratch.join("source");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("config.json"), b"{\"hidden_size\": 4}\n").unwrap();
        std::fs::write(src.join("tokenizer.json"), b"{\"version\": \"1.0\"}").unwrap();
        std::fs::write(src.join("vocab.txt"), b"[PAD]\n[UNK]\n").unwrap();
        src
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn safetensors_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("w.safetensors");
        let a: Vec<f32> = (0..12).map(|i| i as f32 * 0.25 - 1.0).collect();
        let b = vec![f32::MIN_POSITIVE, -0.0, f32::MAX, 1e-40, f32::NAN, 3.0];
        let scalar = [7.5f32];
        let tensors = [
            NamedTensor {
                name: "z.weight".into(),
                shape: vec![3, 4],
                data: &a,
            },
            NamedTensor {
                name: "a.bias".into(),
                shape: vec![6],
                data: &b,
            },
            NamedTensor {
                name: "s".into(),
                shape: vec![],
                data: &scalar,
            },
        ];
        let m = meta(&[("format", "pt"), ("step", "42"), ("quote\"d", "é\n")]);
        write_safetensors(&p, &tensors, &m).unwrap();

        let back = read_safetensors(&p).unwrap();
        assert_eq!(back.metadata, m);
        assert_eq!(back.tensors.len(), 3);
        for t in &tensors {
            let (shape, data) = &back.tensors[&t.name];
            assert_eq!(shape, &t.shape);
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(data), bits(t.data));
        }
        // The reference parser agrees, and the data offsets are 8-byte aligned.
        let bytes = std::fs::read(&p).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("z.weight").unwrap().shape(), &[3, 4]);
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        assert_eq!(n % 8, 0);
        // Same inputs, same bytes.
        let p2 = tmp.path().join("w2.safetensors");
        write_safetensors(&p2, &tensors, &m).unwrap();
        assert_eq!(std::fs::read(&p2).unwrap(), bytes);
        // No metadata: the header simply has none.
        write_safetensors(&p2, &tensors[..1], &BTreeMap::new()).unwrap();
        assert!(read_safetensors(&p2).unwrap().metadata.is_empty());
        assert_eq!(names_in(tmp.path()), ["w.safetensors", "w2.safetensors"]);
    }

    #[test]
    fn bad_tensor_lists_are_rejected_before_writing() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("w.safetensors");
        let d = [1.0f32; 4];
        let t = |name: &str, shape: Vec<usize>| NamedTensor {
            name: name.into(),
            shape,
            data: &d,
        };
        let none = BTreeMap::new();
        for bad in [
            vec![t("x", vec![3])],
            vec![t("x", vec![2, 2]), t("x", vec![4])],
            vec![t("__metadata__", vec![4])],
            vec![t("x", vec![usize::MAX, 2])],
        ] {
            let r = write_safetensors(&p, &bad, &none);
            assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
        }
        assert!(names_in(tmp.path()).is_empty());
    }

    #[test]
    fn non_f32_tensor_is_a_format_error() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("half.safetensors");
        let raw = [0u8; 8];
        let view = safetensors::tensor::TensorView::new(Dtype::F16, vec![4], &raw).unwrap();
        let bytes = safetensors::serialize([("h.weight", view)], None).unwrap();
        std::fs::write(&p, bytes).unwrap();
        let err = read_safetensors(&p).unwrap_err();
        assert!(matches!(err, Error::Format { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("half.safetensors") && msg.contains("h.weight"),
            "{msg}"
        );
    }

    #[test]
    fn corrupt_or_truncated_files_are_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let good = tmp.path().join("good.safetensors");
        let d: Vec<f32> = (0..64).map(|i| i as f32).collect();
        let t = [NamedTensor {
            name: "w".into(),
            shape: vec![8, 8],
            data: &d,
        }];
        write_safetensors(&good, &t, &meta(&[("k", "v")])).unwrap();
        let bytes = std::fs::read(&good).unwrap();

        let mut huge = bytes.clone();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        let mut garbled = bytes.clone();
        garbled[9] = b'#';
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("short", bytes[..5].to_vec()),
            ("truncated-header", bytes[..20].to_vec()),
            ("truncated-data", bytes[..bytes.len() - 3].to_vec()),
            ("trailing", [bytes.as_slice(), &[0u8; 4]].concat()),
            ("huge-header", huge),
            ("garbled", garbled),
        ];
        for (name, content) in cases {
            let p = tmp.path().join(format!("{name}.safetensors"));
            std::fs::write(&p, content).unwrap();
            let err = read_safetensors(&p).unwrap_err();
            assert!(matches!(err, Error::Format { .. }), "{name}: {err:?}");
            assert!(err.to_string().contains(name), "{err}");
        }
        let missing = read_safetensors(&tmp.path().join("missing.safetensors")).unwrap_err();
        assert!(matches!(missing, Error::Io { .. }));
    }

    fn tiny_tensors(data: &[f32]) -> Vec<NamedTensor<'_>> {
        vec![NamedTensor {
            name: "embeddings.LayerNorm.weight".into(),
            shape: vec![data.len()],
            data,
        }]
    }

    #[test]
    fn model_folder_fresh_and_over_existing() {
        let tmp = tempfile::tempdir().unwrap();
        let src = source_folder(tmp.path());
        let parent = tmp.path().join("out");
        let dir = parent.join("model");
        let data = vec![0.5f32; 32];
        let m = meta(&[("step", "10")]);

        let spec = ModelFolderSpec {
            source_dir: &src,
            pooling: Pooling::Mean,
            normalize: true,
            max_seq_length: 128,
            dim: 32,
        };
        write_model_folder(&dir, &spec, &tiny_tensors(&data), &m).unwrap();
        let st = SentenceTransformersConfig::read(&dir).unwrap();
        assert_eq!(st.pooling, Some(Pooling::Mean));
        assert_eq!(st.normalize, Some(true));
        assert_eq!(st.max_seq_length, Some(128));
        assert!(dir.join("2_Normalize").is_dir());
        for f in ["config.json", "tokenizer.json"]
            .into_iter()
            .chain(OPTIONAL_TOKENIZER_FILES)
        {
            let s = src.join(f);
            if s.exists() {
                assert_eq!(
                    std::fs::read(dir.join(f)).unwrap(),
                    std::fs::read(s).unwrap()
                );
            } else {
                assert!(!dir.join(f).exists());
            }
        }
        let loaded = read_safetensors(&dir.join("model.safetensors")).unwrap();
        assert_eq!(loaded.metadata, m);
        assert_eq!(loaded.tensors["embeddings.LayerNorm.weight"].1, data);
        let pool: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("1_Pooling/config.json")).unwrap())
                .unwrap();
        assert_eq!(pool["word_embedding_dimension"], 32);
        assert_eq!(names_in(&parent), ["model"]);

        // Over the existing folder, with different settings: the old content is gone.
        std::fs::write(dir.join("stale.txt"), b"old").unwrap();
        let data2 = vec![-1.0f32; 32];
        let spec2 = ModelFolderSpec {
            pooling: Pooling::Cls,
            normalize: false,
            max_seq_length: 64,
            ..spec
        };
        write_model_folder(&dir, &spec2, &tiny_tensors(&data2), &BTreeMap::new()).unwrap();
        let st = SentenceTransformersConfig::read(&dir).unwrap();
        assert_eq!(st.pooling, Some(Pooling::Cls));
        assert_eq!(st.normalize, Some(false));
        assert_eq!(st.max_seq_length, Some(64));
        assert!(!dir.join("stale.txt").exists());
        assert!(!dir.join("2_Normalize").exists());
        let loaded = read_safetensors(&dir.join("model.safetensors")).unwrap();
        assert_eq!(loaded.tensors["embeddings.LayerNorm.weight"].1, data2);
        assert_eq!(names_in(&parent), ["model"]);

        // Max pooling reads back too, and the source folder may be the target itself.
        let spec3 = ModelFolderSpec {
            source_dir: &dir,
            pooling: Pooling::Max,
            ..spec2
        };
        write_model_folder(&dir, &spec3, &tiny_tensors(&data2), &BTreeMap::new()).unwrap();
        let st = SentenceTransformersConfig::read(&dir).unwrap();
        assert_eq!(st.pooling, Some(Pooling::Max));
        assert_eq!(
            std::fs::read(dir.join("tokenizer.json")).unwrap(),
            std::fs::read(src.join("tokenizer.json")).unwrap()
        );
        assert_eq!(names_in(&parent), ["model"]);
    }

    #[test]
    fn fixture_weights_survive_a_model_folder_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let src = source_folder(tmp.path());
        let weights = src.join("model.safetensors");
        if !weights.is_file() {
            return; // Only the shared fixture carries real weights.
        }
        let orig = read_safetensors(&weights).unwrap();
        let tensors: Vec<NamedTensor<'_>> = orig
            .tensors
            .iter()
            .map(|(name, (shape, data))| NamedTensor {
                name: name.clone(),
                shape: shape.clone(),
                data,
            })
            .collect();
        let dir = tmp.path().join("saved");
        let spec = ModelFolderSpec {
            source_dir: &src,
            pooling: Pooling::Mean,
            normalize: true,
            max_seq_length: 128,
            dim: 32,
        };
        write_model_folder(&dir, &spec, &tensors, &orig.metadata).unwrap();
        let back = read_safetensors(&dir.join("model.safetensors")).unwrap();
        assert_eq!(back.metadata, orig.metadata);
        assert_eq!(back.tensors.len(), orig.tensors.len());
        for (name, (shape, data)) in &orig.tensors {
            let (s2, d2) = &back.tensors[name];
            assert_eq!(s2, shape, "{name}");
            assert!(
                data.iter().zip(d2).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{name}"
            );
        }
        // The crate's own loader opens the saved folder.
        let cfg = crate::model::config::BertConfig::from_file(&dir.join("config.json")).unwrap();
        let w =
            crate::model::weights::BertWeights::load(&dir.join("model.safetensors"), &cfg).unwrap();
        assert_eq!(w.layers.len(), cfg.num_hidden_layers);
    }

    #[test]
    fn failed_model_folder_write_leaves_existing_untouched() {
        let tmp = tempfile::tempdir().unwrap();
        let src = source_folder(tmp.path());
        let parent = tmp.path().join("out");
        let dir = parent.join("model");
        let data = vec![0.25f32; 32];
        let spec = ModelFolderSpec {
            source_dir: &src,
            pooling: Pooling::Mean,
            normalize: true,
            max_seq_length: 128,
            dim: 32,
        };
        write_model_folder(&dir, &spec, &tiny_tensors(&data), &BTreeMap::new()).unwrap();
        let before: Vec<(String, Vec<u8>)> = names_in(&dir)
            .into_iter()
            .filter(|n| dir.join(n).is_file())
            .map(|n| {
                let bytes = std::fs::read(dir.join(&n)).unwrap();
                (n, bytes)
            })
            .collect();

        // A source folder without tokenizer.json.
        let broken = tmp.path().join("broken");
        std::fs::create_dir(&broken).unwrap();
        std::fs::copy(src.join("config.json"), broken.join("config.json")).unwrap();
        let bad_spec = ModelFolderSpec {
            source_dir: &broken,
            pooling: Pooling::Cls,
            normalize: false,
            max_seq_length: 32,
            dim: 32,
        };
        let other = vec![9.0f32; 32];
        let err = write_model_folder(&dir, &bad_spec, &tiny_tensors(&other), &BTreeMap::new())
            .unwrap_err();
        assert!(err.to_string().contains("tokenizer.json"), "{err}");

        // Bad tensors fail too, after the source files were copied.
        let mismatched = [NamedTensor {
            name: "w".into(),
            shape: vec![5],
            data: &other,
        }];
        assert!(write_model_folder(&dir, &spec, &mismatched, &BTreeMap::new()).is_err());

        assert_eq!(names_in(&parent), ["model"]);
        for (n, bytes) in &before {
            assert_eq!(&std::fs::read(dir.join(n)).unwrap(), bytes, "{n} changed");
        }
        let st = SentenceTransformersConfig::read(&dir).unwrap();
        assert_eq!(st.pooling, Some(Pooling::Mean));

        // A failed first write leaves no folder at all.
        let fresh = parent.join("fresh");
        assert!(
            write_model_folder(&fresh, &bad_spec, &tiny_tensors(&other), &BTreeMap::new()).is_err()
        );
        assert_eq!(names_in(&parent), ["model"]);
    }
}
