/* NVTX ranges for the Rust side (src/device/nvtx.rs). NVTX 3 is header-only: the first call
 * looks for a profiler's injection library (Nsight Systems sets NVTX_INJECTION64_PATH) and every
 * call is a near-free no-op when none is attached. Compiled by build.rs with the host C compiler
 * in the CUDA build when the NVTX headers are found. */
#include <nvtx3/nvToolsExt.h>

void rrra_nvtx_push(const char* name) { nvtxRangePushA(name); }
void rrra_nvtx_pop(void) { nvtxRangePop(); }
