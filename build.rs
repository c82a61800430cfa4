//! Compiles every `kernels/*.cu` into a fatbin (sm_90 machine code + compute_90 PTX by default)
//! and embeds it in the crate, with the `-Xptxas -v` resource report of each kernel.
//!
//! nvcc is looked up in `$NVCC`, `$CUDA_HOME/bin`, `PATH`, then the private environment that
//! `tools/install-nvcc.sh` creates. Without nvcc (or with `RRRA_NO_CUDA=1`) the crate builds
//! CPU-only and says so in a warning. Targets: `RRRA_CUDA_ARCHS="90 100"` (default `90`).
//! No GPU is queried: the build machine need not have one.
//!
//! In the CUDA build, the argument structs that kernels and Rust share (`kernels/*_params.h`)
//! are turned into Rust by bindgen (`OUT_DIR/kernel_params.rs`); libclang is found through
//! `LIBCLANG_PATH`, the system's library folders, or the private environment of
//! `tools/install-nvcc.sh`, which installs it. The CPU-only build does not need it.
//!
//! It also generates the C header `include/rrra.h` from `src/capi.rs` (cbindgen, settings in
//! `cbindgen.toml`).

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    generate_header();
    println!("cargo::rustc-check-cfg=cfg(rrra_cuda)");
    println!("cargo::rustc-check-cfg=cfg(rrra_nvtx)");
    println!("cargo::rerun-if-changed=kernels");
    for v in [
        "NVCC",
        "CUDA_HOME",
        "RRRA_NO_CUDA",
        "RRRA_CUDA_ARCHS",
        "RRRA_CACHE",
        "LIBCLANG_PATH",
        "PATH",
    ] {
        println!("cargo::rerun-if-env-changed={v}");
    }
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let mut sources: Vec<PathBuf> = fs::read_dir("kernels")
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    sources.retain(|p| p.extension().is_some_and(|e| e == "cu"));
    sources.sort();

    let disabled = env::var_os("RRRA_NO_CUDA").is_some_and(|v| v != "0");
    let nvcc = if disabled { None } else { find_nvcc() };
    let mut table = String::from("pub static KERNEL_MODULES: &[KernelModule] = &[\n");
    match &nvcc {
        None if disabled => println!("cargo::warning=RRRA_NO_CUDA is set: building the CPU path only"),
        None => println!(
            "cargo::warning=nvcc not found (set NVCC or CUDA_HOME, or run tools/install-nvcc.sh): building the CPU path only"
        ),
        Some(nvcc) => {
            println!("cargo::rustc-cfg=rrra_cuda");
            generate_params(&out);
            build_nvtx_shim(nvcc);
            let archs = env::var("RRRA_CUDA_ARCHS").unwrap_or_else(|_| "90".into());
            for src in &sources {
                let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
                let fatbin = out.join(format!("{stem}.fatbin"));
                let report = out.join(format!("{stem}.ptxas.txt"));
                compile(nvcc, src, &fatbin, &report, &archs);
                table.push_str(&format!(
                    "    KernelModule {{ name: {stem:?}, fatbin: include_bytes!({:?}), ptxas_report: include_str!({:?}) }},\n",
                    fatbin.display().to_string(),
                    report.display().to_string()
                ));
            }
        }
    }
    table.push_str("];\n");
    fs::write(out.join("kernel_modules.rs"), table).expect("write kernel table");
}

fn compile(nvcc: &Path, src: &Path, fatbin: &Path, report: &Path, archs: &str) {
    let mut cmd = Command::new(nvcc);
    cmd.arg("--fatbin")
        .arg("-O3")
        .arg("-std=c++17")
        .arg("-Xptxas")
        .arg("-v");
    cmd.arg("-Ikernels");
    let archs: Vec<&str> = archs.split([' ', ',']).filter(|a| !a.is_empty()).collect();
    for a in &archs {
        cmd.arg(format!("-gencode=arch=compute_{a},code=sm_{a}"));
    }
    // PTX of the newest target, so newer GPUs can JIT it.
    if let Some(last) = archs.last() {
        cmd.arg(format!("-gencode=arch=compute_{last},code=compute_{last}"));
    }
    cmd.arg("-o").arg(fatbin).arg(src);
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        panic!("nvcc failed on {}:\n{stderr}", src.display());
    }
    // ptxas writes its resource usage (registers, spills, shared memory) to stderr.
    fs::write(report, &stderr).expect("write ptxas report");
}

/// Every `kernels/*_params.h` through bindgen into one Rust file (structs and constants).
fn generate_params(out: &Path) {
    let mut headers: Vec<PathBuf> = fs::read_dir("kernels")
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    headers.retain(|p| p.to_string_lossy().ends_with("_params.h"));
    headers.sort();
    if env::var_os("LIBCLANG_PATH").is_none() {
        if let Some(dir) = private_env_site_packages()
            .map(|s| s.join("clang/native"))
            .filter(|d| d.join("libclang.so").is_file())
        {
            // SAFETY: the build script is single-threaded here.
            env::set_var("LIBCLANG_PATH", dir);
        }
    }
    let mut rust = String::new();
    for h in &headers {
        let bindings = bindgen::Builder::default()
            .header(h.to_string_lossy())
            .use_core()
            .derive_default(false)
            .derive_debug(true)
            .derive_copy(true)
            .generate_comments(false)
            .layout_tests(true)
            .generate()
            .unwrap_or_else(|e| {
                panic!(
                    "bindgen failed on {} ({e}). It needs libclang: run tools/install-nvcc.sh \
                     (installs it beside nvcc), install your distribution's libclang, set \
                     LIBCLANG_PATH, or build CPU-only with RRRA_NO_CUDA=1",
                    h.display()
                )
            });
        rust.push_str(&bindings.to_string());
    }
    fs::write(out.join("kernel_params.rs"), rust).expect("write kernel_params.rs");
}

/// The NVTX shim (`kernels/nvtx_shim.c`) when the NVTX 3 headers are found next to nvcc, under
/// `$CUDA_HOME/include` or in the private environment; otherwise the ranges are no-ops (a
/// warning says so): profiler markers are not worth failing a build for.
fn build_nvtx_shim(nvcc: &Path) {
    println!("cargo::rerun-if-changed=kernels/nvtx_shim.c");
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(bin) = nvcc.parent() {
        dirs.push(bin.join("../include"));
    }
    if let Some(h) = env::var_os("CUDA_HOME") {
        dirs.push(PathBuf::from(h).join("include"));
    }
    if let Some(s) = private_env_site_packages() {
        dirs.push(s.join("nvidia/cu13/include"));
    }
    let Some(include) = dirs
        .into_iter()
        .find(|d| d.join("nvtx3/nvToolsExt.h").is_file())
    else {
        println!("cargo::warning=NVTX headers not found: GPU stages carry no profiler ranges (tools/install-nvcc.sh installs them)");
        return;
    };
    cc::Build::new()
        .file("kernels/nvtx_shim.c")
        .include(include)
        .warnings(false)
        .compile("rrra_nvtx_shim");
    println!("cargo::rustc-link-lib=dl");
    println!("cargo::rustc-cfg=rrra_nvtx");
}

/// `site-packages` of the private Python environment that tools/install-nvcc.sh creates.
fn private_env_site_packages() -> Option<PathBuf> {
    let cache = env::var_os("RRRA_CACHE")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/rrra")))?;
    fs::read_dir(cache.join("nvcc-venv/lib"))
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages"))
        .find(|p| p.is_dir())
}

fn find_nvcc() -> Option<PathBuf> {
    let exists = |p: PathBuf| p.is_file().then_some(p);
    if let Some(p) = env::var_os("NVCC") {
        return exists(PathBuf::from(p));
    }
    if let Some(p) =
        env::var_os("CUDA_HOME").and_then(|h| exists(PathBuf::from(h).join("bin/nvcc")))
    {
        return Some(p);
    }
    if let Some(p) = env::var_os("PATH")
        .and_then(|path| env::split_paths(&path).find_map(|d| exists(d.join("nvcc"))))
    {
        return Some(p);
    }
    exists(private_env_site_packages()?.join("nvidia/cu13/bin/nvcc"))
}

/// Writes the C header to `OUT_DIR/rrra.h` and copies it to `include/rrra.h` when its content
/// changed, so a build leaves the committed header alone unless the C interface moved.
///
/// Only `src/capi.rs` is parsed (no `cargo metadata`, no other module), so generation does not
/// depend on the rest of the crate: a failure is a bug in that file and fails the build. A
/// source tree that cannot be written (a packaged or read-only checkout) is only a warning.
fn generate_header() {
    println!("cargo::rerun-if-changed=src/capi.rs");
    println!("cargo::rerun-if-changed=cbindgen.toml");
    let config = cbindgen::Config::from_file("cbindgen.toml")
        .unwrap_or_else(|e| panic!("cbindgen.toml: {e}"));
    let header = cbindgen::Builder::new()
        .with_config(config)
        .with_src("src/capi.rs")
        .generate()
        .unwrap_or_else(|e| panic!("generating the C header from src/capi.rs: {e}"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR")).join("rrra.h");
    header.write_to_file(&out);
    let fresh = fs::read(&out).expect("read the generated header");
    let committed = Path::new("include/rrra.h");
    if fs::read(committed).ok().as_deref() != Some(&fresh[..]) {
        if let Err(e) = fs::create_dir_all("include").and_then(|()| fs::write(committed, &fresh)) {
            println!(
                "cargo::warning=cannot update include/rrra.h ({e}); the header is in {}",
                out.display()
            );
        }
    }
}
