//! `rrra device-check`: on a GPU machine, measure the ceilings (device copy bandwidth, a large
//! cuBLAS bf16 GEMM), time every kernel family and print one table with each kernel's share of
//! the ceiling that bounds it. The GPU correctness tests run separately (tools/device-check.sh
//! runs both).

use clap::Args;
use rrra::device::{ceilings, encoder, topk, Gpu, KernelTiming};
use rrra::{Error, Result};
use std::path::PathBuf;

#[derive(Args)]
pub struct DeviceCheckArgs {
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// Folder for the JSON results [default: $RRRA_DEVICE_LOG, else none].
    #[arg(long, value_name = "DIR")]
    pub log_dir: Option<PathBuf>,
}

pub fn run(a: DeviceCheckArgs) -> Result<()> {
    let gpu = Gpu::open(a.device)?;
    println!("{}", gpu.info());
    let ceil = ceilings::measure(&gpu)?;
    println!(
        "ceilings measured now: device copy {:.0} GB/s (read + write), cuBLAS bf16 GEMM 8192^3 {:.0} TFLOP/s",
        ceil.copy_gb_s, ceil.bf16_gemm_tflop_s
    );
    let mut rows: Vec<KernelTiming> = Vec::new();
    for (what, bench) in [
        (
            "top-k",
            topk::bench as fn(&Gpu) -> Result<Vec<KernelTiming>>,
        ),
        ("encoder", encoder::bench),
    ] {
        eprintln!("timing {what} kernels ...");
        match bench(&gpu) {
            Ok(r) => rows.extend(r),
            // One family failing must not hide the others' numbers.
            Err(e) => eprintln!("error: {what} benchmark failed: {e}"),
        }
    }
    println!("| kernel | problem | ms | GB/s | % of copy | TFLOP/s | % of bf16 GEMM |");
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        let s = r.ms * 1e-3;
        let gbs = r.bytes / s / 1e9;
        let tf = r.flops / s / 1e12;
        let cell = |v: f64, ok: bool, digits: usize| {
            if ok {
                format!("{v:.digits$}")
            } else {
                "–".to_string()
            }
        };
        println!(
            "| {} | {} | {:.3} | {} | {} | {} | {} |",
            r.name,
            r.shape,
            r.ms,
            cell(gbs, r.bytes > 0.0, 0),
            cell(100.0 * gbs / ceil.copy_gb_s, r.bytes > 0.0, 0),
            cell(tf, r.flops > 0.0, 1),
            cell(100.0 * tf / ceil.bf16_gemm_tflop_s, r.flops > 0.0, 0),
        );
    }
    let dir = a
        .log_dir
        .or_else(|| std::env::var_os("RRRA_DEVICE_LOG").map(PathBuf::from));
    if let Some(dir) = dir {
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let path = dir.join("kernels.json");
        let json = serde_json::json!({
            "device": gpu.info(),
            "ceilings": ceil,
            "kernels": rows,
        });
        rrra::util::atomic_write(&path, |w| {
            use std::io::Write;
            w.write_all(json.to_string().as_bytes())
                .map_err(|e| Error::io(&path, e))
        })?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
