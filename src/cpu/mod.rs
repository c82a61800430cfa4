//! The CPU reference kernels: plain, deterministic f32 code parallelised with rayon.
//! Every CUDA kernel is checked against these; they are also the real fallback path.
//!
//! Each op is written for row-major matrices. Results never depend on the thread count:
//! parallelism only ever splits independent rows.

/// Defines `fn name(args)` that runs `body` compiled for AVX2+FMA when the CPU has them, and the
/// baseline build otherwise. Same source, same arithmetic order: only the vector width differs.
macro_rules! dispatch_avx2 {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),*) $body:block) => {
        $(#[$m])* $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) { body($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports the features the function was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

pub mod attention;
pub mod backward;
pub mod gemm;
pub mod math;
pub mod panel_gemm;
