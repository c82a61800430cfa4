//! The embedding store: N vectors of dimension d with their document ids and a description of
//! the model that produced them, in one checksummed, memory-mappable file.
//!
//! Layout (version 1, all integers little-endian; the byte table is in docs/FORMAT.md):
//!
//! ```text
//! [0, 128)            header: magic, version, dtype, flags, dim, count, fingerprint,
//!                     offset/length/xxh3 of each section, xxh3 of the header itself
//! [128, 128 + V)      vectors: count × dim elements, row-major (offset 128 is 64-byte aligned)
//! then M bytes        metadata: UTF-8 JSON written by the caller
//! then I bytes        ids: (count + 1) u64 end offsets, then the UTF-8 blob of all ids
//! ```
//!
//! Why this shape: the vectors come first so the writer can stream them straight to disk
//! (the ids and metadata, small, follow at `finish`, then the header is written last), and so
//! they start at a 64-byte aligned offset: the reader hands out `&[f32]`/`&[f16]`/`&[bf16]`
//! views of the memory map with no copy. The id offsets give O(1) `id(i)`. Every byte of the
//! file is covered by a check: the header by its own xxh3, each section by its xxh3 in the
//! header, and the reader rejects gaps that are not zero and trailing bytes, so a flipped bit
//! anywhere is an error, never a wrong answer.

use super::vectors::{Corpus, Dtype, Vectors};
use crate::error::{Error, Result};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use memmap2::Mmap;
use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

/// First 8 bytes of every store.
pub const MAGIC: [u8; 8] = *b"RRRAEMB\0";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 128;
/// Alignment of the vectors section within the file.
pub const VECTORS_ALIGN: usize = 64;
/// Flag bit: every vector has unit L2 norm.
const FLAG_NORMALIZED: u8 = 1;
/// Tolerance of the unit-norm check when `normalized` is claimed.
const NORM_TOLERANCE: f64 = 1e-3;

/// Byte offsets of the header fields (docs/FORMAT.md).
mod field {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 8;
    pub const HEADER_LEN: usize = 12;
    pub const DTYPE: usize = 16;
    pub const FLAGS: usize = 17;
    pub const RESERVED: usize = 18; // 6 zero bytes
    pub const DIM: usize = 24;
    pub const COUNT: usize = 32;
    pub const FINGERPRINT: usize = 40;
    pub const VECTORS: usize = 48; // offset, length, xxh3
    pub const METADATA: usize = 72; // offset, length, xxh3
    pub const IDS: usize = 96; // offset, length, xxh3
    pub const HEADER_XXH3: usize = 120;
}

/// What a store holds besides its rows; fixed when the writer is created.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreSpec {
    pub dim: usize,
    pub dtype: Dtype,
    /// The caller promises unit-norm vectors (scores are then cosines); `push` checks it.
    pub normalized: bool,
    /// Identifies model + max length + pooling; computed by the caller, stored as is, compared
    /// by whoever searches the store with freshly encoded queries.
    pub fingerprint: u64,
    /// Free-form JSON describing the model (must parse as JSON).
    pub metadata_json: String,
}

/// Location of one section in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Section {
    offset: u64,
    len: u64,
    xxh3: u64,
}

/// The decoded header.
#[derive(Debug, Clone, PartialEq)]
struct Header {
    dtype: Dtype,
    normalized: bool,
    dim: u64,
    count: u64,
    fingerprint: u64,
    vectors: Section,
    metadata: Section,
    ids: Section,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[field::MAGIC..field::MAGIC + 8].copy_from_slice(&MAGIC);
        put_u32(&mut h, field::VERSION, VERSION);
        put_u32(&mut h, field::HEADER_LEN, HEADER_LEN as u32);
        h[field::DTYPE] = self.dtype.code();
        h[field::FLAGS] = if self.normalized { FLAG_NORMALIZED } else { 0 };
        put_u64(&mut h, field::DIM, self.dim);
        put_u64(&mut h, field::COUNT, self.count);
        put_u64(&mut h, field::FINGERPRINT, self.fingerprint);
        for (at, s) in [
            (field::VECTORS, self.vectors),
            (field::METADATA, self.metadata),
            (field::IDS, self.ids),
        ] {
            put_u64(&mut h, at, s.offset);
            put_u64(&mut h, at + 8, s.len);
            put_u64(&mut h, at + 16, s.xxh3);
        }
        let sum = xxh3_64(&h[..field::HEADER_XXH3]);
        put_u64(&mut h, field::HEADER_XXH3, sum);
        h
    }

    /// Parses and checks the header alone (not the sections). `bytes` is the whole file.
    fn decode(path: &Path, bytes: &[u8]) -> Result<Header> {
        let bad = |msg: String| Error::format(path, msg);
        let prefix = &bytes[..bytes.len().min(8)];
        if prefix != &MAGIC[..prefix.len()] {
            return Err(bad("not an RRRA embedding store (bad magic bytes)".into()));
        }
        if bytes.len() < HEADER_LEN {
            return Err(bad(format!(
                "truncated: the file has {} bytes, less than the {HEADER_LEN}-byte header",
                bytes.len()
            )));
        }
        let h = &bytes[..HEADER_LEN];
        let version = get_u32(h, field::VERSION);
        if version != VERSION {
            return Err(bad(format!(
                "unsupported store format version {version} (this build reads version {VERSION})"
            )));
        }
        if xxh3_64(&h[..field::HEADER_XXH3]) != get_u64(h, field::HEADER_XXH3) {
            return Err(bad(
                "header checksum mismatch: the header is corrupted".into()
            ));
        }
        let header_len = get_u32(h, field::HEADER_LEN);
        if header_len as usize != HEADER_LEN {
            return Err(bad(format!(
                "header length {header_len}, expected {HEADER_LEN}"
            )));
        }
        let dtype = Dtype::from_code(h[field::DTYPE])
            .ok_or_else(|| bad(format!("unknown dtype code {}", h[field::DTYPE])))?;
        let flags = h[field::FLAGS];
        if flags & !FLAG_NORMALIZED != 0 {
            return Err(bad(format!("unknown flag bits {flags:#04x}")));
        }
        if h[field::RESERVED..field::DIM].iter().any(|&b| b != 0) {
            return Err(bad("reserved header bytes are not zero".into()));
        }
        let section = |at: usize| Section {
            offset: get_u64(h, at),
            len: get_u64(h, at + 8),
            xxh3: get_u64(h, at + 16),
        };
        Ok(Header {
            dtype,
            normalized: flags & FLAG_NORMALIZED != 0,
            dim: get_u64(h, field::DIM),
            count: get_u64(h, field::COUNT),
            fingerprint: get_u64(h, field::FINGERPRINT),
            vectors: section(field::VECTORS),
            metadata: section(field::METADATA),
            ids: section(field::IDS),
        })
    }
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn get_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Ids may not be empty or contain line breaks (the id export and TREC runs are line based).
fn check_id(id: &str) -> std::result::Result<(), &'static str> {
    if id.is_empty() {
        Err("is empty")
    } else if id.contains(['\n', '\r']) {
        Err("contains a line break")
    } else {
        Ok(())
    }
}

/// A unique temporary name next to `path`, removed on drop unless disarmed.
struct TempFile {
    path: Option<PathBuf>,
}

impl TempFile {
    fn next_to(path: &Path) -> PathBuf {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "store".into());
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Streams a store to disk: rows go to a temporary file next to the destination as they are
/// pushed (memory holds only the ids), `finish` adds metadata, ids and the header, fsyncs and
/// renames. Dropping the writer, or any error, removes the temporary file and leaves whatever
/// was at the destination untouched.
pub struct StoreWriter {
    path: PathBuf,
    tmp_path: PathBuf,
    out: BufWriter<File>,
    // Declared after `out` so the file is closed before it is removed.
    tmp: TempFile,
    spec: StoreSpec,
    count: u64,
    vectors_hash: Xxh3,
    id_blob: Vec<u8>,
    id_ends: Vec<u64>,
    id_hashes: HashSet<u64>,
    row: Vec<u8>,
    f16s: Vec<f16>,
    bf16s: Vec<bf16>,
    failed: bool,
}

impl StoreWriter {
    /// Validates `spec` (dim > 0, metadata is JSON) and creates the temporary file.
    pub fn create(path: impl AsRef<Path>, spec: StoreSpec) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if spec.dim == 0 {
            return Err(Error::InvalidArgument(
                "store dimension must be positive".into(),
            ));
        }
        if let Err(e) = serde_json::from_str::<serde_json::Value>(&spec.metadata_json) {
            return Err(Error::InvalidArgument(format!(
                "store metadata is not valid JSON: {e}"
            )));
        }
        let tmp_path = TempFile::next_to(&path);
        let file = File::create(&tmp_path).map_err(|e| Error::io(&tmp_path, e))?;
        let tmp = TempFile {
            path: Some(tmp_path.clone()),
        };
        let mut out = BufWriter::with_capacity(1 << 20, file);
        // Placeholder header, rewritten by `finish` once every section is known.
        out.write_all(&[0u8; HEADER_LEN])
            .map_err(|e| Error::io(&tmp_path, e))?;
        Ok(StoreWriter {
            path,
            tmp_path,
            out,
            tmp,
            spec,
            count: 0,
            vectors_hash: Xxh3::new(),
            id_blob: Vec::new(),
            id_ends: Vec::new(),
            id_hashes: HashSet::new(),
            row: Vec::new(),
            f16s: Vec::new(),
            bf16s: Vec::new(),
            failed: false,
        })
    }

    /// Rows pushed so far.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Appends one row. Rejected (nothing written, the writer stays usable): a wrong length, a
    /// NaN or infinite value, a value beyond the range of the store's dtype, a norm away from 1
    /// when the store is declared normalised, an empty id, an id with a line break, a duplicate
    /// id. An I/O error is final: `finish` then fails too.
    pub fn push(&mut self, id: &str, vector: &[f32]) -> Result<()> {
        if self.failed {
            return Err(Error::InvalidArgument(
                "store writer failed earlier; start again".into(),
            ));
        }
        let dim = self.spec.dim;
        let arg = |msg: String| Error::InvalidArgument(format!("store row `{id}`: {msg}"));
        if let Err(why) = check_id(id) {
            return Err(arg(format!("the id {why}")));
        }
        if vector.len() != dim {
            return Err(arg(format!(
                "vector has length {}, the store has dimension {dim}",
                vector.len()
            )));
        }
        if let Some(j) = vector.iter().position(|x| !x.is_finite()) {
            return Err(arg(format!(
                "non-finite value {} at position {j}",
                vector[j]
            )));
        }
        if self.spec.normalized {
            let norm = vector
                .iter()
                .map(|&x| x as f64 * x as f64)
                .sum::<f64>()
                .sqrt();
            if (norm - 1.0).abs() > NORM_TOLERANCE {
                return Err(arg(format!(
                    "the store is declared normalized but this vector has norm {norm}"
                )));
            }
        }
        let id_hash = xxh3_64(id.as_bytes());
        if self.id_hashes.contains(&id_hash) {
            if let Some(first) = self.find_id(id) {
                return Err(arg(format!("duplicate id (first pushed as row {first})")));
            }
        }
        self.encode_row(vector).map_err(arg)?;
        if let Err(e) = self.out.write_all(&self.row) {
            self.failed = true;
            return Err(Error::io(&self.tmp_path, e));
        }
        self.vectors_hash.update(&self.row);
        self.id_hashes.insert(id_hash);
        self.id_blob.extend_from_slice(id.as_bytes());
        self.id_ends.push(self.id_blob.len() as u64);
        self.count += 1;
        Ok(())
    }

    /// Row index of `id` if it was pushed before (only called on a hash hit).
    fn find_id(&self, id: &str) -> Option<usize> {
        let mut start = 0usize;
        for (i, &end) in self.id_ends.iter().enumerate() {
            if &self.id_blob[start..end as usize] == id.as_bytes() {
                return Some(i);
            }
            start = end as usize;
        }
        None
    }

    /// Converts a validated row into `self.row` (little-endian bytes of the store's dtype).
    fn encode_row(&mut self, v: &[f32]) -> std::result::Result<(), String> {
        self.row.clear();
        match self.spec.dtype {
            Dtype::F32 => {
                for x in v {
                    self.row.extend_from_slice(&x.to_le_bytes());
                }
            }
            Dtype::F16 => {
                self.f16s.resize(v.len(), f16::ZERO);
                self.f16s.convert_from_f32_slice(v);
                if let Some(j) = self.f16s.iter().position(|x| !x.is_finite()) {
                    return Err(format!("value {} at position {j} overflows f16", v[j]));
                }
                for x in &self.f16s {
                    self.row.extend_from_slice(&x.to_bits().to_le_bytes());
                }
            }
            Dtype::Bf16 => {
                self.bf16s.resize(v.len(), bf16::ZERO);
                self.bf16s.convert_from_f32_slice(v);
                if let Some(j) = self.bf16s.iter().position(|x| !x.is_finite()) {
                    return Err(format!("value {} at position {j} overflows bf16", v[j]));
                }
                for x in &self.bf16s {
                    self.row.extend_from_slice(&x.to_bits().to_le_bytes());
                }
            }
        }
        Ok(())
    }

    /// Writes metadata, ids and the header, fsyncs, and renames over the destination.
    pub fn finish(mut self) -> Result<()> {
        if self.failed {
            return Err(Error::InvalidArgument(
                "store writer failed earlier; nothing was written".into(),
            ));
        }
        let tmp_path = self.tmp_path.clone();
        let io = |e| Error::io(&tmp_path, e);
        let esize = self.spec.dtype.size() as u64;
        let vectors_len = self.count * self.spec.dim as u64 * esize;
        let metadata = self.spec.metadata_json.as_bytes();
        let mut ids = Vec::with_capacity((self.count as usize + 1) * 8 + self.id_blob.len());
        ids.extend_from_slice(&0u64.to_le_bytes());
        for end in &self.id_ends {
            ids.extend_from_slice(&end.to_le_bytes());
        }
        ids.extend_from_slice(&self.id_blob);
        let vectors = Section {
            offset: HEADER_LEN as u64,
            len: vectors_len,
            xxh3: self.vectors_hash.digest(),
        };
        let metadata_s = Section {
            offset: vectors.offset + vectors.len,
            len: metadata.len() as u64,
            xxh3: xxh3_64(metadata),
        };
        let ids_s = Section {
            offset: metadata_s.offset + metadata_s.len,
            len: ids.len() as u64,
            xxh3: xxh3_64(&ids),
        };
        let header = Header {
            dtype: self.spec.dtype,
            normalized: self.spec.normalized,
            dim: self.spec.dim as u64,
            count: self.count,
            fingerprint: self.spec.fingerprint,
            vectors,
            metadata: metadata_s,
            ids: ids_s,
        };
        self.out.write_all(metadata).map_err(io)?;
        self.out.write_all(&ids).map_err(io)?;
        self.out.seek(SeekFrom::Start(0)).map_err(io)?;
        self.out.write_all(&header.encode()).map_err(io)?;
        self.out.flush().map_err(io)?;
        self.out.get_ref().sync_all().map_err(io)?;
        std::fs::rename(&self.tmp_path, &self.path).map_err(|e| Error::io(&self.path, e))?;
        // Renamed: nothing left to remove. Make the rename durable (best effort, as atomic_write).
        self.tmp.path = None;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

/// Writes a whole store at once: `vectors` is `ids.len() × spec.dim`, row-major.
pub fn write_store(
    path: impl AsRef<Path>,
    spec: StoreSpec,
    ids: &[String],
    vectors: &[f32],
) -> Result<()> {
    let dim = spec.dim;
    if dim == 0 || vectors.len() != ids.len() * dim {
        return Err(Error::InvalidArgument(format!(
            "{} ids need {} vector values of dimension {dim}, got {}",
            ids.len(),
            ids.len() * dim,
            vectors.len()
        )));
    }
    let mut w = StoreWriter::create(path, spec)?;
    for (id, v) in ids.iter().zip(vectors.chunks_exact(dim)) {
        w.push(id, v)?;
    }
    w.finish()
}

/// The bytes of an open store: the file's memory map, or (for [`Store::from_image`]) a copy in
/// memory that starts at a 64-byte aligned address, as a map does.
enum Image {
    Map(Mmap),
    Heap {
        buf: Vec<u8>,
        start: usize,
        len: usize,
    },
}

impl std::ops::Deref for Image {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Image::Map(m) => m,
            Image::Heap { buf, start, len } => &buf[*start..*start + *len],
        }
    }
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Image::Map(m) => write!(f, "Map({} bytes)", m.len()),
            Image::Heap { len, .. } => write!(f, "Heap({len} bytes)"),
        }
    }
}

/// A read-only, memory-mapped store. Opening checks everything; accessors then cannot fail.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    map: Image,
    header: Header,
    metadata: String,
    /// Start of the id blob (after the offset table) in the file.
    id_blob: usize,
}

impl Store {
    /// Opens and fully verifies a store, the vectors' checksum included.
    pub fn open(path: impl AsRef<Path>) -> Result<Store> {
        Self::open_with(path.as_ref(), true)
    }

    /// Like [`Store::open`] but skips the checksum of the vectors section, the one check that
    /// reads all the vector data (about 0.1 s per GB once in memory, plus reading it from disk);
    /// all other checks still run.
    pub fn open_unverified(path: impl AsRef<Path>) -> Result<Store> {
        Self::open_with(path.as_ref(), false)
    }

    fn open_with(path: &Path, verify_vectors: bool) -> Result<Store> {
        let bad = |msg: String| Error::format(path, msg);
        if cfg!(target_endian = "big") {
            return Err(bad(
                "stores are little-endian; big-endian hosts are not supported".into(),
            ));
        }
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if file_len < HEADER_LEN as u64 {
            let mut head = Vec::new();
            std::io::Read::read_to_end(&mut &file, &mut head).map_err(|e| Error::io(path, e))?;
            Header::decode(path, &head)?;
            return Err(bad("truncated header".into()));
        }
        // SAFETY: the map is read-only and private to this `Store`. Writers in this crate never
        // modify a store in place (they write a new file and rename it over the old name, which
        // leaves this mapping on the old inode); a store truncated or rewritten in place by
        // another program while mapped is outside this contract.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::check(path, Image::Map(map), verify_vectors)
    }

    /// A store from its bytes in memory, checked like [`Store::open`] (`path` only names it in
    /// errors). The bytes are copied to a 64-byte aligned buffer, so the vectors are viewed in
    /// place exactly as from a map: tests of the typed views run where memory maps cannot
    /// (Miri).
    pub(crate) fn from_image(path: &Path, bytes: &[u8]) -> Result<Store> {
        let mut buf = vec![0u8; bytes.len() + VECTORS_ALIGN - 1];
        // `align_offset` may give up (usize::MAX); the alignment check in `check` then refuses.
        let start = buf
            .as_ptr()
            .align_offset(VECTORS_ALIGN)
            .min(VECTORS_ALIGN - 1);
        buf[start..start + bytes.len()].copy_from_slice(bytes);
        let image = Image::Heap {
            buf,
            start,
            len: bytes.len(),
        };
        Self::check(path, image, true)
    }

    /// Every check of `open` past reading the file, on the whole file's bytes.
    fn check(path: &Path, map: Image, verify_vectors: bool) -> Result<Store> {
        let bad = |msg: String| Error::format(path, msg);
        let bytes: &[u8] = &map;
        let header = Header::decode(path, bytes)?;
        let len = bytes.len() as u64;

        // Sizes: every section inside the file, sections disjoint, nothing unaccounted for.
        let esize = header.dtype.size() as u64;
        if header.dim == 0 {
            return Err(bad("dimension is 0".into()));
        }
        let expected = header
            .count
            .checked_mul(header.dim)
            .and_then(|x| x.checked_mul(esize))
            .ok_or_else(|| bad("count × dim overflows".into()))?;
        if header.vectors.len != expected {
            return Err(bad(format!(
                "vectors section has {} bytes, {} × {} {} needs {expected}",
                header.vectors.len, header.count, header.dim, header.dtype
            )));
        }
        if header.vectors.offset % VECTORS_ALIGN as u64 != 0 {
            return Err(bad(format!(
                "vectors section at offset {} is not {VECTORS_ALIGN}-byte aligned",
                header.vectors.offset
            )));
        }
        let mut sections = [
            ("vectors", header.vectors),
            ("metadata", header.metadata),
            ("ids", header.ids),
        ];
        let mut end_of_all = HEADER_LEN as u64;
        for (name, s) in &sections {
            let end = s
                .offset
                .checked_add(s.len)
                .ok_or_else(|| bad(format!("{name} section bounds overflow")))?;
            if s.offset < HEADER_LEN as u64 {
                return Err(bad(format!("{name} section overlaps the header")));
            }
            end_of_all = end_of_all.max(end);
        }
        if len < end_of_all {
            return Err(bad(format!(
                "truncated: the file has {len} bytes, its header describes {end_of_all}"
            )));
        }
        if len > end_of_all {
            return Err(bad(format!(
                "{} unexpected bytes after the last section",
                len - end_of_all
            )));
        }
        sections.sort_by_key(|(_, s)| s.offset);
        let mut pos = HEADER_LEN as u64;
        for (name, s) in &sections {
            if s.offset < pos {
                return Err(bad(format!("{name} section overlaps another section")));
            }
            if bytes[pos as usize..s.offset as usize]
                .iter()
                .any(|&b| b != 0)
            {
                return Err(bad(format!("non-zero padding before the {name} section")));
            }
            pos = s.offset + s.len;
        }

        // Checksums.
        let slice = |s: Section| &bytes[s.offset as usize..(s.offset + s.len) as usize];
        for (name, s) in [("metadata", header.metadata), ("ids", header.ids)] {
            if xxh3_64(slice(s)) != s.xxh3 {
                return Err(bad(format!(
                    "{name} checksum mismatch: the {name} section is corrupted"
                )));
            }
        }
        if verify_vectors && xxh3_64(slice(header.vectors)) != header.vectors.xxh3 {
            return Err(bad(
                "vectors checksum mismatch: the vectors section is corrupted".into(),
            ));
        }

        // Contents.
        let metadata = std::str::from_utf8(slice(header.metadata))
            .map_err(|_| bad("metadata is not valid UTF-8".into()))?
            .to_owned();
        let count = usize::try_from(header.count).map_err(|_| bad("count too large".into()))?;
        let ids = slice(header.ids);
        let table = count
            .checked_add(1)
            .and_then(|x| x.checked_mul(8))
            .filter(|&t| t <= ids.len())
            .ok_or_else(|| bad("ids section is shorter than its offset table".into()))?;
        let blob = &ids[table..];
        let mut prev = 0u64;
        // The writer refuses duplicates; a file made otherwise must not map one id to two rows.
        let mut seen: std::collections::HashMap<&str, usize> =
            std::collections::HashMap::with_capacity(count.min(1 << 20));
        for i in 0..=count {
            let end = get_u64(ids, i * 8);
            if (i == 0 && end != 0) || end < prev || end > blob.len() as u64 {
                return Err(bad(format!("id offset table is inconsistent at entry {i}")));
            }
            if i > 0 {
                let id = std::str::from_utf8(&blob[prev as usize..end as usize])
                    .map_err(|_| bad(format!("id of row {} is not valid UTF-8", i - 1)))?;
                if let Err(why) = check_id(id) {
                    return Err(bad(format!("id of row {} {why}", i - 1)));
                }
                if let Some(first) = seen.insert(id, i - 1) {
                    return Err(bad(format!(
                        "id {id:?} of row {} repeats row {first}",
                        i - 1
                    )));
                }
            }
            prev = end;
        }
        if prev != blob.len() as u64 {
            return Err(bad("id blob has bytes after the last id".into()));
        }
        let id_blob = (header.ids.offset as usize) + table;
        let store = Store {
            path: path.to_path_buf(),
            map,
            header,
            metadata,
            id_blob,
        };
        let align = match store.header.dtype {
            Dtype::F32 => std::mem::align_of::<f32>(),
            Dtype::F16 => std::mem::align_of::<f16>(),
            Dtype::Bf16 => std::mem::align_of::<bf16>(),
        };
        if !(store.vectors_ptr() as usize).is_multiple_of(align.max(VECTORS_ALIGN)) {
            return Err(bad("vectors are not aligned in memory".into()));
        }
        Ok(store)
    }

    /// Recomputes the vectors checksum (for stores opened with [`Store::open_unverified`]).
    pub fn verify_vectors(&self) -> Result<()> {
        let s = self.header.vectors;
        let bytes = &self.map[s.offset as usize..(s.offset + s.len) as usize];
        if xxh3_64(bytes) != s.xxh3 {
            return Err(Error::format(
                &self.path,
                "vectors checksum mismatch: the vectors section is corrupted",
            ));
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn dim(&self) -> usize {
        self.header.dim as usize
    }
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.header.count as usize
    }
    pub fn is_empty(&self) -> bool {
        self.header.count == 0
    }
    pub fn dtype(&self) -> Dtype {
        self.header.dtype
    }
    pub fn normalized(&self) -> bool {
        self.header.normalized
    }
    pub fn fingerprint(&self) -> u64 {
        self.header.fingerprint
    }
    pub fn metadata_json(&self) -> &str {
        &self.metadata
    }

    /// Id of row `i`.
    ///
    /// # Panics
    /// If `i >= self.len()`, like slice indexing.
    pub fn id(&self, i: usize) -> &str {
        assert!(
            i < self.len(),
            "row {i} out of range for a store of {} rows",
            self.len()
        );
        let table = self.header.ids.offset as usize;
        let start = get_u64(&self.map, table + i * 8) as usize;
        let end = get_u64(&self.map, table + (i + 1) * 8) as usize;
        // Validated at open; `get`/`from_utf8` only guard against a file changed under the map.
        self.map
            .get(self.id_blob + start..self.id_blob + end)
            .and_then(|b| std::str::from_utf8(b).ok())
            .unwrap_or("")
    }

    /// All ids in row order.
    pub fn ids(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        (0..self.len()).map(move |i| self.id(i))
    }

    fn vectors_ptr(&self) -> *const u8 {
        self.map[self.header.vectors.offset as usize..].as_ptr()
    }

    /// The stored matrix, borrowed from the memory map (`len() * dim()` elements).
    pub fn vectors(&self) -> Vectors<'_> {
        let n = self.len() * self.dim();
        let ptr = self.vectors_ptr();
        // SAFETY: `open` checked that the section lies inside the map, holds exactly
        // `n * size_of::<T>()` bytes and starts at an address aligned for `T` (64 bytes); the
        // host is little-endian like the file; f32, f16 and bf16 accept every bit pattern; the
        // map is read-only and lives as long as `&self`.
        unsafe {
            match self.header.dtype {
                Dtype::F32 => Vectors::F32(std::slice::from_raw_parts(ptr as *const f32, n)),
                Dtype::F16 => Vectors::F16(std::slice::from_raw_parts(ptr as *const f16, n)),
                Dtype::Bf16 => Vectors::Bf16(std::slice::from_raw_parts(ptr as *const bf16, n)),
            }
        }
    }

    /// The store as a search corpus.
    pub fn corpus(&self) -> Corpus<'_> {
        Corpus {
            vectors: self.vectors(),
            dim: self.dim(),
        }
    }

    /// Row `i` converted to f32 into `out` (`out.len() == dim()`).
    pub fn row_f32(&self, i: usize, out: &mut [f32]) -> Result<()> {
        if i >= self.len() || out.len() != self.dim() {
            return Err(Error::InvalidArgument(format!(
                "row {i} into a buffer of {} (store has {} rows of dimension {})",
                out.len(),
                self.len(),
                self.dim()
            )));
        }
        self.vectors().to_f32(i * self.dim(), out);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store image laid out by hand as docs/FORMAT.md says, so these tests need no file (they
    /// run under Miri, which cannot map files): vectors at 128, then metadata, then ids.
    fn image(dtype: Dtype, dim: usize, rows: &[f32], ids: &[&str], meta: &str) -> Vec<u8> {
        let mut vectors = Vec::new();
        for &x in rows {
            match dtype {
                Dtype::F32 => vectors.extend_from_slice(&x.to_le_bytes()),
                Dtype::F16 => vectors.extend_from_slice(&f16::from_f32(x).to_bits().to_le_bytes()),
                Dtype::Bf16 => {
                    vectors.extend_from_slice(&bf16::from_f32(x).to_bits().to_le_bytes())
                }
            }
        }
        let mut id_section = 0u64.to_le_bytes().to_vec();
        let mut blob = Vec::new();
        for id in ids {
            blob.extend_from_slice(id.as_bytes());
            id_section.extend_from_slice(&(blob.len() as u64).to_le_bytes());
        }
        id_section.extend_from_slice(&blob);
        let section = |offset: usize, bytes: &[u8]| Section {
            offset: offset as u64,
            len: bytes.len() as u64,
            xxh3: xxh3_64(bytes),
        };
        let vectors_s = section(HEADER_LEN, &vectors);
        let meta_at = HEADER_LEN + vectors.len();
        let header = Header {
            dtype,
            normalized: false,
            dim: dim as u64,
            count: ids.len() as u64,
            fingerprint: 42,
            vectors: vectors_s,
            metadata: section(meta_at, meta.as_bytes()),
            ids: section(meta_at + meta.len(), &id_section),
        };
        [&header.encode()[..], &vectors, meta.as_bytes(), &id_section].concat()
    }

    const META: &str = r#"{"model":"tiny"}"#;

    #[test]
    fn in_memory_views_read_every_dtype() {
        // Values every dtype holds exactly, and more than 8 per row so the wide conversion
        // paths run as well as their tails.
        let dim = 11;
        let rows: Vec<f32> = (0..3 * dim).map(|i| (i as f32 - 16.0) * 0.25).collect();
        let ids = ["a", "ünï", "c-3"];
        for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
            let bytes = image(dtype, dim, &rows, &ids, META);
            let store = Store::from_image(Path::new("mem.rrra"), &bytes).unwrap();
            assert_eq!((store.len(), store.dim(), store.dtype()), (3, dim, dtype));
            assert_eq!(store.ids().collect::<Vec<_>>(), ids);
            assert_eq!(store.metadata_json(), META);
            let v = store.vectors();
            assert_eq!(v.len(), rows.len());
            let elem = |i: usize| match v {
                Vectors::F32(s) => s[i],
                Vectors::F16(s) => s[i].to_f32(),
                Vectors::Bf16(s) => s[i].to_f32(),
            };
            assert!((0..rows.len()).all(|i| elem(i) == rows[i]), "{dtype}");
            let mut row = vec![0f32; dim];
            for i in 0..3 {
                store.row_f32(i, &mut row).unwrap();
                assert_eq!(row, rows[i * dim..(i + 1) * dim], "{dtype} row {i}");
            }
            let mut all = vec![0f32; rows.len()];
            v.to_f32(0, &mut all);
            assert_eq!(all, rows);
            let hits = crate::index::topk::search_one(&store.corpus(), &row, 2).unwrap();
            assert_eq!(hits[0].index, 2, "{dtype}");
        }
        let empty = image(Dtype::F32, 4, &[], &[], META);
        let store = Store::from_image(Path::new("mem.rrra"), &empty).unwrap();
        assert!(store.is_empty() && store.vectors().is_empty());
    }

    /// The hand-made image is byte for byte what the writer produces.
    #[test]
    #[cfg_attr(miri, ignore = "writes a file")]
    fn image_matches_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.rrra");
        let rows = [0.5f32, -1.0, 2.0, 0.25, 0.0, 8.0];
        let spec = StoreSpec {
            dim: 3,
            dtype: Dtype::F16,
            normalized: false,
            fingerprint: 42,
            metadata_json: META.into(),
        };
        write_store(&p, spec, &["x".into(), "y".into()], &rows).unwrap();
        let on_disk = std::fs::read(&p).unwrap();
        assert_eq!(on_disk, image(Dtype::F16, 3, &rows, &["x", "y"], META));
        let mapped = Store::open(&p).unwrap();
        let copied = Store::from_image(&p, &on_disk).unwrap();
        assert_eq!(
            mapped.ids().collect::<Vec<_>>(),
            copied.ids().collect::<Vec<_>>()
        );
    }

    #[test]
    fn in_memory_images_are_checked_like_files() {
        let p = Path::new("mem.rrra");
        let good = image(Dtype::F32, 2, &[1.0, 0.0], &["a"], META);
        let format = |bytes: &[u8]| match Store::from_image(p, bytes) {
            Err(Error::Format { .. }) => {}
            other => panic!("{other:?}"),
        };
        format(&good[..100]);
        format(&good[..good.len() - 1]);
        format(&[good.as_slice(), &[0]].concat());
        let mut flipped = good.clone();
        flipped[HEADER_LEN] ^= 1;
        format(&flipped);
    }
}
