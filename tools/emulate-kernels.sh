#!/usr/bin/env bash
# Runs CUDA kernels on the CPU through a block emulator (tools/kernel-emulator/emu.h: one host
# thread per CUDA thread) against the CPU reference, on a machine without a GPU:
#   * kernels/adapter_train.cu in the launch order of device::adapter_train, with cuBLAS
#     replaced by a column-major f32 sgemm behind the same row-major mapping, against
#     adapter::{score, backward} for four shapes;
#   * kernels/encoder_train.cu: the row-wise forward kernels against plain loops, the dropout
#     kernels and the training attention kernel against the CPU's own dropout and attention;
#   * kernels/{sampler,infonce,adamw}.cu against C++ transliterations of their CPU references;
#   * kernels/{backward,attention_backward}.cu as device::{backward,attention_backward} launch
#     them, against cpu::backward (pooling and the embedding scatter against train::encoder_grad's
#     loops), bitwise where the kernels claim the CPU's order;
#   * kernels/{attention,adapter,embeddings,layernorm,gelu,l2norm,pooling}.cu as
#     device::{encoder,adapter} launch them (mma.sync / ldmatrix from mma_sync.h), against
#     cpu::attention, adapter::score and the CPU row ops;
#   * kernels/topk.cu as device::topk drives it (chunks, thresholds, ping-pong lists, query
#     preparation, select, sort, decode) against an exact CPU top-k: bitwise on dyadic data,
#     within 1e-5 of sum |q c| on random data;
#   * device::encoder_train's whole training step (forward_train with and without dropout,
#     backward, micro-batches accumulated on the device), cuBLAS replaced as above, against
#     train::encoder_grad (and tiny-bert's float64 gradients when ../shared has the fixture).
# The reference outputs come from examples/kernel_reference.rs. Needs g++ with C++20 (<barrier>).
# This checks the kernels' arithmetic and indexing, not the GPU's math library or scheduling.
set -euo pipefail
cd "$(dirname "$0")/.."
work="${RRRA_EMULATOR_DIR:-target/kernel-emulator}"
mkdir -p "$work"
cargo build --release --quiet --example kernel_reference
target/release/examples/kernel_reference "$work"
flags=(-std=gnu++20 -O2 -ffp-contract=off -Wno-unknown-pragmas -I tools/kernel-emulator
    -I tools/kernel-emulator/include -I kernels -pthread)
g++ "${flags[@]}" tools/kernel-emulator/adapter_train.cpp -o "$work/adapter_train"
g++ "${flags[@]}" tools/kernel-emulator/encoder_train.cpp -o "$work/encoder_train"
g++ "${flags[@]}" tools/kernel-emulator/train_ops.cpp -o "$work/train_ops"
g++ "${flags[@]}" tools/kernel-emulator/encoder_backward.cpp -o "$work/encoder_backward"
g++ "${flags[@]}" tools/kernel-emulator/inference.cpp -o "$work/inference"
g++ "${flags[@]}" tools/kernel-emulator/topk.cpp -o "$work/topk"
g++ "${flags[@]}" tools/kernel-emulator/encoder_step.cpp -o "$work/encoder_step"
status=0
for shape in "37 53 3 7" "16 2 40 2" "33 17 1 1" "64 96 4 20"; do
    set -- $shape
    "$work/adapter_train" "$1" "$2" "$3" "$4" "$work/adapter_$1_$2_$3_$4.bin" | tail -n 1 || status=1
done
"$work/encoder_train" "$work" | tail -n 2 || status=1
"$work/train_ops" | tail -n 1 || status=1
"$work/encoder_backward" "$work" | tail -n 1 || status=1
"$work/inference" "$work" | tail -n 1 || status=1
"$work/topk" | tail -n 1 || status=1
"$work/encoder_step" "$work" | tail -n 1 || status=1
exit $status
