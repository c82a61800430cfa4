/* The argument block of the adapter kernels (kernels/adapter.cu), defined once: the kernels
 * include this header, and build.rs turns it into Rust with bindgen (src/device/adapter.rs).
 * Plain C: no includes, so bindgen needs nothing but libclang. Both sides assert its size and
 * alignment (static_assert in the .cu file, const assertions in Rust). */
#ifndef RRRA_ADAPTER_PARAMS_H
#define RRRA_ADAPTER_PARAMS_H

/* Candidates scored per block: each weight element loaded from L2 is used this many times. */
#define RRRA_ADAPTER_TILE_PAIRS 8
#define RRRA_ADAPTER_ARGS_SIZE 112

typedef struct RrraAdapterArgs {
    const float* queries;    /* [Q × d] */
    const void* candidates;  /* rows of f32/f16/bf16 (the kernel's type), d elements each */
    const unsigned int* rows; /* [Q × k] row of each pair in `candidates`; NULL: pair i·k + j is row i·k + j */
    float* u;                /* [Q × h] W1sum·q + b1: written by rrra_adapter_query_bias */
    const float* w_sum_t;    /* [d × h] (W1a + W1c)ᵀ */
    const float* b1;         /* [h] */
    const float* w_pair_t;   /* [2d × h] [W1c − W1a | W1b]ᵀ */
    const float* w2_t;       /* [h × d] W2ᵀ */
    const float* b2;         /* [d] */
    float* logits;           /* [Q × k] out */
    float* stats;            /* [Q × k × 4] out: p, QA, CA, alpha; or NULL */
    int d;
    int h;
    int k;                   /* candidates per query */
    int smem_floats;         /* floats of shared memory before the f64 reduction scratch */
    float beta;
    float beta0;
} RrraAdapterArgs;

#endif
