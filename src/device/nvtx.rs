//! NVTX ranges, so that a profiler's timeline (Nsight Systems) shows the engine's stages by
//! name around the kernels they launch. A range is pushed by [`range`] and popped when the
//! returned guard drops. Without a profiler attached, or in a build without the NVTX headers
//! (see build.rs), a range costs next to nothing.

use std::ffi::CStr;

#[cfg(rrra_nvtx)]
extern "C" {
    fn rrra_nvtx_push(name: *const std::ffi::c_char);
    fn rrra_nvtx_pop();
}

/// Pops its range when dropped.
#[must_use = "the range ends when this guard is dropped"]
pub struct Range(std::marker::PhantomData<*const ()>);

/// Opens the range `name` on the calling thread (e.g. `c"rrra encode"`).
pub fn range(name: &CStr) -> Range {
    #[cfg(rrra_nvtx)]
    // SAFETY: a NUL-terminated string that NVTX copies or reads during the call.
    unsafe {
        rrra_nvtx_push(name.as_ptr())
    };
    #[cfg(not(rrra_nvtx))]
    let _ = name;
    Range(std::marker::PhantomData)
}

impl Drop for Range {
    fn drop(&mut self) {
        #[cfg(rrra_nvtx)]
        // SAFETY: pops the range pushed by `range` on this thread (guards are not Send).
        unsafe {
            rrra_nvtx_pop()
        };
    }
}
