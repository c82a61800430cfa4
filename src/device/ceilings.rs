//! The two ceilings every GPU kernel is judged against, measured on the machine at hand in the
//! same run (never typed in from a data sheet): device-to-device copy bandwidth (the roofline
//! of memory-bound kernels such as top-k scoring and LayerNorm) and a large cuBLAS bf16 GEMM
//! (the roofline of the encoder's matrix work).

use super::runtime::{cuda_err, Gpu};
use crate::error::{Error, Result};
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Ceilings {
    /// Bytes read plus bytes written per second by a large `cuMemcpyDtoD`, in GB/s.
    pub copy_gb_s: f64,
    /// An 8192³ bf16 GEMM with fp32 accumulation through cuBLAS, in TFLOP/s.
    pub bf16_gemm_tflop_s: f64,
}

pub fn measure(gpu: &Gpu) -> Result<Ceilings> {
    let stream = gpu.stream();
    // 2 GiB each way: far beyond the 60 MB L2, long enough to time well.
    let n = 1usize << 29;
    let src = stream
        .alloc_zeros::<f32>(n)
        .map_err(cuda_err("allocating the copy source"))?;
    let mut dst = stream
        .alloc_zeros::<f32>(n)
        .map_err(cuda_err("allocating the copy target"))?;
    let ms = gpu.time_ms(5, || {
        stream
            .memcpy_dtod(&src, &mut dst)
            .map_err(cuda_err("device copy"))
    })?;
    let copy_gb_s = 2.0 * (n * 4) as f64 / (ms * 1e-3) / 1e9;
    drop((src, dst));

    let m = 8192usize;
    let a = stream
        .alloc_zeros::<half::bf16>(m * m)
        .map_err(cuda_err("allocating GEMM inputs"))?;
    // Non-zero data: tensor cores draw less power (and clock higher) on zeros.
    let host: Vec<half::bf16> = (0..m * m)
        .map(|i| half::bf16::from_f32(((i * 2654435761) % 1000) as f32 / 1000.0 - 0.5))
        .collect();
    let mut a = a;
    stream
        .memcpy_htod(&host, &mut a)
        .map_err(cuda_err("filling GEMM inputs"))?;
    let b = stream
        .clone_dtod(&a)
        .map_err(cuda_err("filling GEMM inputs"))?;
    let mut c = stream
        .alloc_zeros::<half::bf16>(m * m)
        .map_err(cuda_err("allocating the GEMM output"))?;
    let blas = CudaBlas::new(stream.clone()).map_err(|e| Error::Cuda(format!("cuBLAS: {e}")))?;
    let cfg = GemmConfig {
        transa: cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N,
        transb: cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N,
        m: m as i32,
        n: m as i32,
        k: m as i32,
        alpha: half::bf16::ONE,
        lda: m as i32,
        ldb: m as i32,
        beta: half::bf16::ZERO,
        ldc: m as i32,
    };
    let ms = gpu.time_ms(10, || {
        // SAFETY: a, b and c each hold m × m elements, the sizes the configuration describes.
        unsafe { blas.gemm(cfg, &a, &b, &mut c) }
            .map_err(|e| Error::Cuda(format!("cuBLAS bf16 GEMM: {e}")))
    })?;
    let bf16_gemm_tflop_s = 2.0 * (m as f64).powi(3) / (ms * 1e-3) / 1e12;
    Ok(Ceilings {
        copy_gb_s,
        bf16_gemm_tflop_s,
    })
}
