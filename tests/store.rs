//! Embedding store: round trips, corruption detection, atomic writes, input validation, and the
//! NumPy export.

use half::{bf16, f16};
use rrra::index::synthetic::random_unit_vectors;
use rrra::index::{
    export_ids, export_npy, search_one, write_store, Dtype, Store, StoreSpec, StoreWriter, Vectors,
};
use rrra::Error;
use std::path::{Path, PathBuf};

const META: &str =
    r#"{"model":"sentence-transformers/all-MiniLM-L6-v2","max_len":256,"pooling":"mean"}"#;

fn spec(dim: usize, dtype: Dtype) -> StoreSpec {
    StoreSpec {
        dim,
        dtype,
        normalized: true,
        fingerprint: 0xDEAD_BEEF_0123_4567,
        metadata_json: META.to_string(),
    }
}

fn ids(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| match i % 3 {
            0 => format!("doc-{i}"),
            1 => format!("ünïcødé/{i}"),
            _ => format!("{i}"),
        })
        .collect()
}

fn write(dir: &Path, name: &str, n: usize, dim: usize, dtype: Dtype) -> (PathBuf, Vec<f32>) {
    let p = dir.join(name);
    let v = random_unit_vectors(n, dim, n as u64 + dim as u64);
    write_store(&p, spec(dim, dtype), &ids(n), &v).unwrap();
    (p, v)
}

/// Opening must fail with `Error::Format` about this very file; returns the message.
fn expect_format(path: &Path) -> String {
    match Store::open(path) {
        Err(e @ Error::Format { .. }) => {
            let text = e.to_string();
            assert!(text.contains(&path.display().to_string()), "{text}");
            let Error::Format { path: p, msg } = e else {
                unreachable!()
            };
            assert_eq!(p, path);
            msg
        }
        Err(other) => panic!("expected a format error, got {other:?}"),
        Ok(_) => panic!("corrupt store {} opened", path.display()),
    }
}

fn dir_entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn header_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

#[test]
fn round_trip_every_dtype() {
    let dir = tempfile::tempdir().unwrap();
    for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
        let (n, dim) = (257, 19);
        let (p, v) = write(dir.path(), &format!("s-{dtype}.rrra"), n, dim, dtype);
        let s = Store::open(&p).unwrap();
        assert_eq!((s.len(), s.dim(), s.dtype()), (n, dim, dtype));
        assert!(s.normalized());
        assert_eq!(s.fingerprint(), 0xDEAD_BEEF_0123_4567);
        assert_eq!(s.metadata_json(), META);
        assert_eq!(s.path(), p);
        let want_ids = ids(n);
        assert_eq!(s.ids().collect::<Vec<_>>(), want_ids);
        assert_eq!(s.id(1), want_ids[1]);
        let expect: Vec<f32> = match dtype {
            Dtype::F32 => v.clone(),
            Dtype::F16 => v.iter().map(|&x| f16::from_f32(x).to_f32()).collect(),
            Dtype::Bf16 => v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect(),
        };
        match s.vectors() {
            Vectors::F32(x) => assert_eq!(x, &expect[..]),
            Vectors::F16(x) => assert!(x.iter().zip(&expect).all(|(a, b)| a.to_f32() == *b)),
            Vectors::Bf16(x) => assert!(x.iter().zip(&expect).all(|(a, b)| a.to_f32() == *b)),
        }
        assert_eq!(s.vectors().dtype(), dtype);
        assert_eq!(s.vectors().len(), n * dim);
        let mut row = vec![0f32; dim];
        for i in [0, 100, n - 1] {
            s.row_f32(i, &mut row).unwrap();
            assert_eq!(row, expect[i * dim..(i + 1) * dim]);
        }
        assert!(matches!(
            s.row_f32(n, &mut row),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            s.row_f32(0, &mut row[..3]),
            Err(Error::InvalidArgument(_))
        ));
        // A store searches like its vectors: the nearest neighbour of row 42 is row 42.
        let hits = search_one(&s.corpus(), &expect[42 * dim..43 * dim], 3).unwrap();
        assert_eq!(hits[0].index, 42);
        // Skipping the vector checksum gives the same store.
        let u = Store::open_unverified(&p).unwrap();
        assert_eq!(u.len(), n);
        u.verify_vectors().unwrap();
    }
}

#[test]
fn streaming_writer_and_empty_store() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("stream.rrra");
    let mut s = spec(3, Dtype::F32);
    s.normalized = false;
    s.metadata_json = "{}".into();
    let mut w = StoreWriter::create(&p, s.clone()).unwrap();
    assert!(w.is_empty());
    for i in 0..1000 {
        w.push(&format!("d{i}"), &[i as f32, -(i as f32), 0.5])
            .unwrap();
    }
    assert_eq!(w.len(), 1000);
    w.finish().unwrap();
    let st = Store::open(&p).unwrap();
    assert!(!st.normalized());
    assert_eq!(st.metadata_json(), "{}");
    let mut row = [0f32; 3];
    st.row_f32(999, &mut row).unwrap();
    assert_eq!(row, [999.0, -999.0, 0.5]);
    assert_eq!(st.id(999), "d999");
    assert_eq!(dir_entries(dir.path()), vec!["stream.rrra"]);

    let e = dir.path().join("empty.rrra");
    StoreWriter::create(&e, s).unwrap().finish().unwrap();
    let st = Store::open(&e).unwrap();
    assert!(st.is_empty());
    assert_eq!(st.ids().count(), 0);
    assert_eq!(st.vectors().len(), 0);
}

#[test]
fn truncated_files_are_format_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = write(dir.path(), "t.rrra", 10, 8, Dtype::F16);
    let bytes = std::fs::read(&p).unwrap();
    let vec_end = 128 + 10 * 8 * 2;
    let cuts = [
        0,
        1,
        7,
        8,
        64,
        127,
        128,
        129,
        200,
        vec_end,
        vec_end + 5,
        bytes.len() - 1,
    ];
    for &cut in &cuts {
        let q = dir.path().join(format!("cut{cut}.rrra"));
        std::fs::write(&q, &bytes[..cut]).unwrap();
        let msg = expect_format(&q);
        assert!(msg.contains("truncated"), "cut at {cut}: {msg}");
    }
    // Trailing garbage is rejected too.
    let q = dir.path().join("long.rrra");
    let mut long = bytes.clone();
    long.push(0);
    std::fs::write(&q, &long).unwrap();
    expect_format(&q);
}

#[test]
fn wrong_magic_and_version() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = write(dir.path(), "m.rrra", 4, 4, Dtype::F32);
    let bytes = std::fs::read(&p).unwrap();

    let mut b = bytes.clone();
    b[0..8].copy_from_slice(b"NOTASTOR");
    let q = dir.path().join("magic.rrra");
    std::fs::write(&q, &b).unwrap();
    assert!(expect_format(&q).contains("magic"));
    std::fs::write(&q, b"{\"json\": true}\n").unwrap();
    assert!(expect_format(&q).contains("magic"));

    // Version 2 with a valid header checksum: refused by version, not by checksum.
    let mut b = bytes.clone();
    b[8..12].copy_from_slice(&2u32.to_le_bytes());
    let sum = xxhash_rust::xxh3::xxh3_64(&b[..120]);
    b[120..128].copy_from_slice(&sum.to_le_bytes());
    let q = dir.path().join("v2.rrra");
    std::fs::write(&q, &b).unwrap();
    let msg = expect_format(&q);
    assert!(msg.contains("version 2"), "{msg}");
}

/// Flips one byte at every position of a small store, in every section and in the header: each
/// must be refused by `open`. With `open_unverified`, flips in the vectors get through to
/// `verify_vectors`, which must refuse them.
#[test]
fn any_flipped_byte_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    for dtype in [Dtype::F32, Dtype::Bf16] {
        let (p, _) = write(dir.path(), &format!("f-{dtype}.rrra"), 5, 4, dtype);
        let bytes = std::fs::read(&p).unwrap();
        let vectors = (header_u64(&bytes, 48), header_u64(&bytes, 56));
        let metadata = (header_u64(&bytes, 72), header_u64(&bytes, 80));
        let ids = (header_u64(&bytes, 96), header_u64(&bytes, 104));
        assert_eq!(vectors.0, 128);
        assert_eq!(ids.0 + ids.1, bytes.len() as u64);
        let section = |i: usize| {
            let i = i as u64;
            let inside = |s: (u64, u64)| i >= s.0 && i < s.0 + s.1;
            if i < 128 {
                "header"
            } else if inside(vectors) {
                "vectors"
            } else if inside(metadata) {
                "metadata"
            } else if inside(ids) {
                "ids"
            } else {
                "padding"
            }
        };
        let q = dir.path().join("flip.rrra");
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..bytes.len() {
            for mask in [0x01u8, 0x80] {
                let mut b = bytes.clone();
                b[i] ^= mask;
                std::fs::write(&q, &b).unwrap();
                let msg = expect_format(&q);
                let name = section(i);
                seen.insert(name);
                match name {
                    "vectors" | "metadata" | "ids" => {
                        assert!(msg.contains(name), "byte {i}: {msg}")
                    }
                    _ => {}
                }
                if name == "vectors" {
                    let s = Store::open_unverified(&q).unwrap();
                    assert!(matches!(s.verify_vectors(), Err(Error::Format { .. })));
                }
            }
        }
        let want: std::collections::BTreeSet<&str> = ["header", "vectors", "metadata", "ids"]
            .into_iter()
            .collect();
        assert_eq!(seen, want);
    }
}

#[test]
fn dropped_writer_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("never.rrra");
    let mut w = StoreWriter::create(&p, spec(4, Dtype::F16)).unwrap();
    w.push("a", &[1.0, 0.0, 0.0, 0.0]).unwrap();
    assert_eq!(
        dir_entries(dir.path()).len(),
        1,
        "the temporary file exists while writing"
    );
    drop(w);
    assert!(dir_entries(dir.path()).is_empty());

    // Same with an existing store at the destination: it stays as it was.
    let (old, _) = write(dir.path(), "keep.rrra", 3, 4, Dtype::F32);
    let before = std::fs::read(&old).unwrap();
    let mut w = StoreWriter::create(&old, spec(4, Dtype::F32)).unwrap();
    w.push("x", &[0.0, 1.0, 0.0, 0.0]).unwrap();
    drop(w);
    assert_eq!(std::fs::read(&old).unwrap(), before);
    assert_eq!(dir_entries(dir.path()), vec!["keep.rrra"]);
}

#[test]
fn failing_finish_leaves_existing_file_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = write(dir.path(), "live.rrra", 3, 4, Dtype::F32);
    let before = std::fs::read(&p).unwrap();
    let mut w = StoreWriter::create(&p, spec(4, Dtype::F32)).unwrap();
    w.push("new", &[0.0, 0.0, 1.0, 0.0]).unwrap();
    // Someone removes the temporary file under the writer: the final rename fails.
    for name in dir_entries(dir.path()) {
        if name.starts_with(".live.rrra.tmp") {
            std::fs::remove_file(dir.path().join(name)).unwrap();
        }
    }
    assert!(matches!(w.finish(), Err(Error::Io { .. })));
    assert_eq!(std::fs::read(&p).unwrap(), before);
    assert_eq!(dir_entries(dir.path()), vec!["live.rrra"]);
    Store::open(&p).unwrap();

    // The destination is a non-empty directory: the rename fails, the temp file is removed.
    let d = dir.path().join("busy");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join("inside"), b"x").unwrap();
    let mut w = StoreWriter::create(&d, spec(4, Dtype::F32)).unwrap();
    w.push("new", &[0.0, 0.0, 1.0, 0.0]).unwrap();
    assert!(w.finish().is_err());
    assert_eq!(dir_entries(dir.path()), vec!["busy", "live.rrra"]);
    assert_eq!(std::fs::read(d.join("inside")).unwrap(), b"x");
}

#[test]
fn bad_rows_are_rejected_and_the_writer_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("v.rrra");
    let mut w = StoreWriter::create(&p, spec(3, Dtype::F16)).unwrap();
    let unit = [0.6f32, 0.8, 0.0];
    w.push("ok", &unit).unwrap();
    let bad = |r: rrra::Result<()>| match r {
        Err(Error::InvalidArgument(m)) => m,
        other => panic!("expected InvalidArgument, got {other:?}"),
    };
    assert!(bad(w.push("nan", &[f32::NAN, 0.8, 0.0])).contains("non-finite"));
    assert!(bad(w.push("inf", &[0.6, f32::INFINITY, 0.0])).contains("non-finite"));
    assert!(bad(w.push("neg", &[f32::NEG_INFINITY, 0.0, 0.0])).contains("non-finite"));
    let m = bad(w.push("short", &[1.0, 0.0]));
    assert!(m.contains('2') && m.contains('3'), "{m}");
    assert!(bad(w.push("ok", &unit)).contains("duplicate"));
    assert!(bad(w.push("", &unit)).contains("empty"));
    assert!(bad(w.push("a\nb", &unit)).contains("line break"));
    assert!(bad(w.push("long", &[3.0, 4.0, 0.0])).contains("norm"));
    w.push("ok2", &[0.0, 0.0, 1.0]).unwrap();
    w.finish().unwrap();
    let s = Store::open(&p).unwrap();
    assert_eq!(s.ids().collect::<Vec<_>>(), vec!["ok", "ok2"]);

    // Values beyond the f16 range would become infinite.
    let mut sp = spec(2, Dtype::F16);
    sp.normalized = false;
    let mut w = StoreWriter::create(dir.path().join("big.rrra"), sp.clone()).unwrap();
    assert!(bad(w.push("big", &[1e6, 0.0])).contains("f16"));
    drop(w);
    sp.dtype = Dtype::F32;
    let mut w = StoreWriter::create(dir.path().join("big32.rrra"), sp).unwrap();
    w.push("big", &[1e6, 0.0]).unwrap();
    drop(w);

    // Bad specs and mismatched one-shot input.
    let mut sp = spec(0, Dtype::F32);
    assert!(matches!(
        StoreWriter::create(dir.path().join("z"), sp.clone()),
        Err(Error::InvalidArgument(_))
    ));
    sp.dim = 2;
    sp.metadata_json = "{not json".into();
    assert!(matches!(
        StoreWriter::create(dir.path().join("z"), sp),
        Err(Error::InvalidArgument(_))
    ));
    let r = write_store(
        dir.path().join("z"),
        spec(2, Dtype::F32),
        &ids(3),
        &[1.0; 5],
    );
    assert!(matches!(r, Err(Error::InvalidArgument(_))));
    let dup = vec!["a".to_string(), "a".to_string()];
    let r = write_store(dir.path().join("z"), spec(1, Dtype::F32), &dup, &[1.0, 1.0]);
    assert!(matches!(r, Err(Error::InvalidArgument(_))));
    let mut left = dir_entries(dir.path());
    left.retain(|n| n != "v.rrra");
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn dtype_names() {
    for d in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
        assert_eq!(d.to_string().parse::<Dtype>().unwrap(), d);
    }
    assert_eq!("BF16".parse::<Dtype>().unwrap(), Dtype::Bf16);
    assert!(matches!(
        "f64".parse::<Dtype>(),
        Err(Error::InvalidArgument(_))
    ));
    assert_eq!(
        (Dtype::F32.size(), Dtype::F16.size(), Dtype::Bf16.size()),
        (4, 2, 2)
    );
}

/// Minimal `.npy` v1.0 reader: (descr, shape, data bytes).
fn read_npy(path: &Path) -> (String, (usize, usize), Vec<u8>) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..6], b"\x93NUMPY");
    assert_eq!((b[6], b[7]), (1, 0));
    let hl = u16::from_le_bytes([b[8], b[9]]) as usize;
    assert_eq!((10 + hl) % 64, 0, "data must start 64-byte aligned");
    let header = std::str::from_utf8(&b[10..10 + hl]).unwrap();
    assert!(header.ends_with('\n'));
    assert!(header.contains("'fortran_order': False"));
    let descr = header
        .split("'descr': '")
        .nth(1)
        .unwrap()
        .split('\'')
        .next()
        .unwrap()
        .to_string();
    let shape = header
        .split("'shape': (")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap();
    let dims: Vec<usize> = shape
        .split(',')
        .map(|s| s.trim().parse().unwrap())
        .collect();
    (descr, (dims[0], dims[1]), b[10 + hl..].to_vec())
}

#[test]
fn npy_and_id_export() {
    let dir = tempfile::tempdir().unwrap();
    for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
        let (n, dim) = (33, 7);
        let (p, v) = write(dir.path(), &format!("n-{dtype}.rrra"), n, dim, dtype);
        let s = Store::open(&p).unwrap();
        let out = dir.path().join(format!("n-{dtype}.npy"));
        export_npy(&s, &out).unwrap();
        let (descr, shape, data) = read_npy(&out);
        assert_eq!(shape, (n, dim));
        match dtype {
            Dtype::F32 | Dtype::Bf16 => {
                assert_eq!(descr, "<f4");
                let got: Vec<f32> = data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                let want: Vec<f32> = if dtype == Dtype::F32 {
                    v.clone()
                } else {
                    v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
                };
                assert_eq!(got, want);
            }
            Dtype::F16 => {
                assert_eq!(descr, "<f2");
                let got: Vec<f16> = data
                    .chunks_exact(2)
                    .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                    .collect();
                let want: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
                assert_eq!(got, want);
            }
        }
        let idp = dir.path().join(format!("n-{dtype}.ids"));
        export_ids(&s, &idp).unwrap();
        let text = std::fs::read_to_string(&idp).unwrap();
        assert_eq!(text.lines().collect::<Vec<_>>(), ids(n));
        assert!(text.ends_with('\n'));
    }
    // Nothing but the outputs: no temporary files left.
    assert!(dir_entries(dir.path()).iter().all(|n| !n.starts_with('.')));
}
