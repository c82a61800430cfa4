//! The GPU side of the engine. Kernels from `kernels/*.cu` are compiled by build.rs into
//! fatbins and embedded here; a CPU-only build (no nvcc at build time) embeds none, and every
//! op runs on the CPU reference path in [`crate::cpu`].

/// One compiled `kernels/<name>.cu`: its fatbin and the ptxas resource report of its kernels.
#[derive(Debug, Clone, Copy)]
pub struct KernelModule {
    pub name: &'static str,
    pub fatbin: &'static [u8],
    pub ptxas_report: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/kernel_modules.rs"));

/// True when this build embeds compiled CUDA kernels.
pub const fn cuda_compiled() -> bool {
    cfg!(rrra_cuda)
}

/// The embedded module called `name`, if this build has it.
pub fn kernel_module(name: &str) -> Option<&'static KernelModule> {
    KERNEL_MODULES.iter().find(|m| m.name == name)
}

pub mod runtime;
pub use runtime::KernelTiming;
pub use runtime::{unavailable_reason, DeviceInfo, GemmMath, Gpu};

pub mod adapter;
pub mod adapter_train;
pub mod ceilings;
pub mod encoder;
pub mod encoder_train;
pub mod mining;
pub mod nvtx;
pub mod retriever;
pub mod topk;

// Training ops on the device (loss, optimizer, negative sampling).
pub mod adamw;
pub mod attention_backward;
pub mod backward;
pub mod infonce;
pub mod sampler;
pub mod train_step;
