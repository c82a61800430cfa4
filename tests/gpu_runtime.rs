//! The GPU runtime: without a driver or device it says why and never panics; with one, the
//! embedded kernels load and the first kernel matches the CPU reference.

mod common;

use cudarc::driver::{LaunchConfig, PushKernelArg};
use rrra::device::{unavailable_reason, Gpu};
use rrra::index::synthetic::random_unit_vectors;

#[test]
fn opening_a_gpu_never_panics() {
    match Gpu::open(0) {
        Ok(gpu) => {
            println!("{}", gpu.info());
            assert!(gpu.info().multiprocessors > 0);
            assert!(unavailable_reason().is_none());
        }
        Err(e) => {
            // The typed error carries the reason the probe found.
            let reason = unavailable_reason().expect("an error implies a reason");
            assert!(e.to_string().contains(&reason), "{e} / {reason}");
        }
    }
    // A device ordinal that cannot exist is an error value too.
    assert!(Gpu::open(1 << 20).is_err());
}

#[test]
fn l2_normalize_kernel_matches_the_cpu() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    // rows × dim with dim both a multiple of 4 (float4 path) and not (scalar path)
    for (rows, dim) in [(1000usize, 384usize), (257, 37)] {
        let mut host: Vec<f32> = random_unit_vectors(rows, dim, 5)
            .iter()
            .enumerate()
            .map(|(i, v)| v * (1.0 + (i % 7) as f32))
            .collect();
        host[..dim].fill(0.0); // a zero row stays zero
        let stream = gpu.stream();
        let mut dev = stream.clone_htod(&host).unwrap();
        let f = gpu.function("l2norm", "rrra_l2_normalize_f32").unwrap();
        let warps_per_block = 8u32;
        let cfg = LaunchConfig {
            grid_dim: ((rows as u32).div_ceil(warps_per_block), 1, 1),
            block_dim: (32 * warps_per_block, 1, 1),
            shared_mem_bytes: 0,
        };
        let (r, d) = (rows as i32, dim as i32);
        let mut launch = stream.launch_builder(&f);
        launch.arg(&mut dev).arg(&r).arg(&d);
        // SAFETY: the kernel reads and writes rows × dim floats of `dev`, which holds exactly that.
        unsafe { launch.launch(cfg) }.unwrap();
        let got = stream.clone_dtoh(&dev).unwrap();
        for row in host.chunks_exact_mut(dim) {
            rrra::cpu::math::l2_normalize(row);
        }
        // Same formula, warp-tree instead of sequential summation: a few ulps of a unit vector.
        for (i, (g, w)) in got.iter().zip(&host).enumerate() {
            assert!((g - w).abs() < 1e-6, "element {i}: {g} vs {w}");
        }
    }
}
