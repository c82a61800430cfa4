#!/usr/bin/env bash
# The GPU check, in one command, on a machine with an NVIDIA GPU:
#   1. build the release binary and the GPU test binaries (skipped when RRRA_PREBUILT names a
#      folder made by tools/device-prebuild.sh on a machine with Rust: its payload and model
#      parts are unpacked in place);
#   2. run every GPU test with RRRA_REQUIRE_GPU=1 (a test that cannot find the GPU fails);
#   3. `rrra device-check`: measured ceilings and every kernel family's timing, one table, and
#      the batch-1 query path (eager, as a CUDA graph, with the adapter's rerank);
#   4. SciFact end to end on the GPU (`rrra demo --device cuda`, bf16 and f32) against the
#      reference metrics, when the model is at hand ($RRRA_MODEL, or the prebuilt folder's);
#   5. SciFact fine-tuning on the GPU (`rrra train --device cuda:0`, SimANS a = 200, one epoch)
#      against the CPU run of docs/PERF.md (nDCG@10 0.6872 in 839 s; within ±0.005 is the
#      target), when RRRA_DEVICE_TRAIN=1 (the test split encoded and searched on the GPU, f32);
#   6. the Retriever served from the GPU under 1, 2 and 8 client threads
#      (`rrra bench --only query-load --device cuda:0`), when the model is at hand;
#   7. the peers on the same machine when python3 has torch: tools/peer-torch-gpu.py.
# Full logs go to $RRRA_DEVICE_LOG (default ./device-logs). Exit status: non-zero when a test
# or a step failed. Meant to finish in well under 8 minutes on an H200.
set -uo pipefail
cd "$(dirname "$0")/.."
log="${RRRA_DEVICE_LOG:-device-logs}"
mkdir -p "$log"
status=0
step() { echo "== $*" | tee -a "$log/summary.txt"; }

if [ -n "${RRRA_PREBUILT:-}" ]; then
  [ -f "$RRRA_PREBUILT/payload.tar.xz" ] && tar -C "$RRRA_PREBUILT" -xJf "$RRRA_PREBUILT/payload.tar.xz"
  if ls "$RRRA_PREBUILT"/model/model.safetensors.part-* >/dev/null 2>&1; then
    cat "$RRRA_PREBUILT"/model/model.safetensors.part-* > "$RRRA_PREBUILT/model/model.safetensors"
    rm -f "$RRRA_PREBUILT"/model/model.safetensors.part-*
  fi
  [ -f "$RRRA_PREBUILT/model/model.safetensors" ] && export RRRA_MODEL="${RRRA_MODEL:-$RRRA_PREBUILT/model}"
  bin="$RRRA_PREBUILT/bin"
  export RRRA_SHARED="${RRRA_SHARED:-$RRRA_PREBUILT/shared}"
else
  step "build"
  cargo build --release --bin rrra 2>&1 | tee "$log/build.txt" || exit 1
  bin=target/device-bin
  rm -rf "$bin" && mkdir -p "$bin"
  cp target/release/rrra "$bin/"
  cargo test --release --no-run --message-format=json --test 'gpu_*' 2>>"$log/build.txt" \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])' | while read -r t; do cp "$t" "$bin/$(basename "$t" | sed 's/-[0-9a-f]*$//')"; done
fi
# cuBLAS may sit outside the loader's path on machines with only the toolkit folder.
if ! ldconfig -p 2>/dev/null | grep -q libcublas.so; then
  for d in /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-*/targets/x86_64-linux/lib; do
    [ -d "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" && break
  done
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$log/gpu.txt"

export RRRA_REQUIRE_GPU=1
for t in "$bin"/gpu_*; do
  name=$(basename "$t")
  step "test $name"
  if ! "$t" --test-threads 1 2>&1 | tee "$log/test-$name.txt" | tail -n 3; then
    status=1
    echo "FAILED: $name" | tee -a "$log/summary.txt"
  fi
done

step "kernels"
"$bin/rrra" device-check --log-dir "$log" 2>&1 | tee "$log/kernels.txt" || status=1

shared="${RRRA_SHARED:-../shared}"
if [ -n "${RRRA_MODEL:-}" ] && [ -d "$shared/data/scifact" ]; then
  for p in bf16 f32; do
    step "SciFact on the GPU ($p)"
    "$bin/rrra" demo --device cuda --precision "$p" --model "$RRRA_MODEL" \
      --data "$shared/data/scifact" --work "$log/demo" \
      --expect "$shared/fixtures/scifact-minilm/expected_metrics.json" \
      2>&1 | tee "$log/scifact-$p.txt" | tail -n 12 || status=1
  done
else
  step "SciFact skipped: no model (RRRA_MODEL) or no data/scifact"
fi

if [ -n "${RRRA_MODEL:-}" ] && [ -f "$shared/data/scifact/queries.jsonl" ]; then
  step "Retriever on the GPU under load"
  "$bin/rrra" bench --model "$RRRA_MODEL" --shared "$shared" --only query-load --device cuda:0 \
    --json "$log/query-load-gpu.json" 2>&1 | tee "$log/query-load-gpu.txt" | tail -n 12 || status=1
fi

if [ "${RRRA_DEVICE_TRAIN:-0}" = 1 ] && [ -n "${RRRA_MODEL:-}" ] && [ -d "$shared/data/scifact" ]; then
  step "SciFact fine-tuning on the GPU (CPU run: nDCG@10 0.6872, 839 s)"
  SAMPLERS="simans:a=200" RRRA_BIN="$bin/rrra" RRRA_SHARED="$shared" WORK="$log/train-scifact" \
    EVAL_DEVICE=cuda:0 \
    tools/train-scifact.sh --device cuda:0 > "$log/train-scifact.txt" 2>&1 || status=1
  tail -n 2 "$log/train-scifact/summary.txt" 2>/dev/null | tee -a "$log/summary.txt"
fi

if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
  step "peers (PyTorch on this machine)"
  python3 tools/peer-torch-gpu.py 2>&1 | tee "$log/peers.txt" || status=1
else
  step "peers skipped: python3 has no CUDA PyTorch"
fi
exit $status
