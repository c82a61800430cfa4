//! The CUDA kernels are compiled at build time (build.rs) and embedded. Without nvcc the crate
//! builds CPU-only and these checks skip with a reason; CI installs nvcc, so there they must run.

use rrra::device::{cuda_compiled, kernel_module, KERNEL_MODULES};

fn skip_without_nvcc() -> bool {
    if cuda_compiled() {
        return false;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must compile the kernels: nvcc was not found at build time"
    );
    eprintln!("skipped: built without nvcc (CPU-only build)");
    true
}

#[test]
fn every_kernel_file_is_embedded_as_a_fatbin() {
    if skip_without_nvcc() {
        return;
    }
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/kernels");
    let mut sources: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            (p.extension()? == "cu").then(|| p.file_stem().unwrap().to_string_lossy().into_owned())
        })
        .collect();
    sources.sort();
    let embedded: Vec<&str> = KERNEL_MODULES.iter().map(|m| m.name).collect();
    assert_eq!(embedded, sources);
    for m in KERNEL_MODULES {
        // A fatbin container starts with the magic 0xBA55ED50 (little endian).
        assert_eq!(
            &m.fatbin[..4],
            &[0x50, 0xED, 0x55, 0xBA],
            "{}: not a fatbin",
            m.name
        );
    }
}

#[test]
fn l2norm_kernel_compiles_for_sm90_without_spills() {
    if skip_without_nvcc() {
        return;
    }
    let m = kernel_module("l2norm").expect("l2norm module");
    let report = m.ptxas_report;
    assert!(
        report.contains("Compiling entry function 'rrra_l2_normalize_f32' for 'sm_90'"),
        "{report}"
    );
    assert!(
        report.contains("0 bytes spill stores, 0 bytes spill loads"),
        "{report}"
    );
}
