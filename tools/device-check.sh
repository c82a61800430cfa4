#!/usr/bin/env bash
# The GPU check, on a machine with an NVIDIA GPU:
#   tools/device-check.sh [STAGE ...]
# Stages, in this order (default: all but train; RRRA_DEVICE_TRAIN=1 adds train):
#   tests    every GPU test but gpu_minilm, with RRRA_REQUIRE_GPU=1 (a test that cannot find
#            the GPU fails instead of skipping);
#   kernels  `rrra device-check`: the ceilings measured in the same run, every kernel family's
#            time against them in one table, and the batch-1 query path (eager, as a CUDA
#            graph, with the adapter's rerank); RRRA_DEVICE_CHECK_ONLY=a,b passes --only a,b;
#   peers    PyTorch on the same machine and shapes (tools/peer-torch-gpu.py), when python3
#            has CUDA PyTorch;
#   model    what needs all-MiniLM-L6-v2 ($RRRA_MODEL, or the prebuilt parts): gpu_minilm,
#            SciFact end to end on the GPU in bf16 and in f32 against the reference metrics,
#            and the Retriever served from the GPU under 1, 2 and 8 client threads;
#   train    SciFact fine-tuning on the GPU (`rrra train --device cuda:0`, SimANS a = 200, one
#            epoch, the test split encoded and searched on the GPU in f32) against the CPU run
#            of docs/PERF.md (nDCG@10 0.6872 in 839 s; within ±0.005 is the target).
# Binaries are built here with cargo, or taken from RRRA_PREBUILT (tools/device-prebuild.sh):
# its payload is unpacked once, and the model's parts, gathered from RRRA_PREBUILT and its
# siblings RRRA_PREBUILT-2, -3, ..., are joined once all are there and checked against their
# SHA-256. Every step runs under a time limit, so a hang costs that step, not the run. Logs go
# to $RRRA_DEVICE_LOG (default device-logs); with RRRA_DEVICE_ARCHIVE=FILE they are also packed
# into that one .tar.gz at the end. Exit status: non-zero when a step failed or timed out.
set -uo pipefail
cd "$(dirname "$0")/.."
log="${RRRA_DEVICE_LOG:-device-logs}"
mkdir -p "$log"
work=$(mktemp -d)
status=0
stages=("$@")
if [ ${#stages[@]} -eq 0 ]; then
  stages=(tests kernels peers model)
  [ "${RRRA_DEVICE_TRAIN:-0}" = 1 ] && stages+=(train)
fi
for s in "${stages[@]}"; do
  case "$s" in
    tests | kernels | peers | model | train) ;;
    *) echo "unknown stage $s: expected tests, kernels, peers, model or train" >&2; exit 2 ;;
  esac
done
wants() { [[ " ${stages[*]} " == *" $1 "* ]]; }
step() { echo "== $*" | tee -a "$log/summary.txt"; }
finish() {
  rm -rf "$work"
  echo "== summary"
  cat "$log/summary.txt" 2>/dev/null
  if [ -n "${RRRA_DEVICE_ARCHIVE:-}" ]; then
    tar -czf "$RRRA_DEVICE_ARCHIVE" -C "$log" . && echo "logs packed into $RRRA_DEVICE_ARCHIVE"
  fi
}
trap finish EXIT
# run NAME SECONDS LOG COMMAND...: one step under its time limit, its output in LOG
run() {
  local name=$1 secs=$2 out=$3 rc
  shift 3
  step "$name"
  timeout -k 10 "$secs" "$@" > "$out" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then
    tail -n 3 "$out"
    return 0
  fi
  tail -n 20 "$out"
  status=1
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    echo "TIMED OUT after $secs s: $name" | tee -a "$log/summary.txt"
  else
    echo "FAILED (exit $rc): $name" | tee -a "$log/summary.txt"
  fi
  return $rc
}

# The model's weights from the prebuilt parts, once every part is there and checks out.
join_model() {
  local dir="$RRRA_PREBUILT/model" want have
  [ -f "$dir/model.safetensors" ] && return 0
  [ -f "$dir/model.safetensors.parts" ] || return 1
  want=$(cat "$dir/model.safetensors.parts")
  mapfile -t parts < <(ls "$RRRA_PREBUILT"/model/model.safetensors.part-* \
    "$RRRA_PREBUILT"-[0-9]*/model/model.safetensors.part-* 2>/dev/null \
    | awk -F/ '{print $NF "\t" $0}' | sort | cut -f2)
  have=${#parts[@]}
  if [ "$have" -ne "$want" ]; then
    step "model incomplete: $have of $want parts of its weights are here"
    return 1
  fi
  cat "${parts[@]}" > "$dir/model.safetensors.joined"
  if (cd "$dir" && sed 's/model.safetensors$/model.safetensors.joined/' model.safetensors.sha256 \
      | sha256sum -c --quiet -); then
    mv "$dir/model.safetensors.joined" "$dir/model.safetensors"
  else
    rm -f "$dir/model.safetensors.joined"
    step "model parts do not match their SHA-256"
    return 1
  fi
}

if [ -n "${RRRA_PREBUILT:-}" ]; then
  bin="$RRRA_PREBUILT/bin"
  if [ ! -x "$bin/rrra" ]; then
    tar -C "$RRRA_PREBUILT" -xJf "$RRRA_PREBUILT/payload.tar.xz" \
      || { step "no payload in $RRRA_PREBUILT"; exit 1; }
  fi
  join_model && export RRRA_MODEL="${RRRA_MODEL:-$RRRA_PREBUILT/model}"
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
shared="${RRRA_SHARED:-../shared}"
# cuBLAS may sit outside the loader's path: the toolkit's folder, or the wheels PyTorch uses.
if ! ldconfig -p 2>/dev/null | grep -q 'libcublas\.so'; then
  wheels=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__file__))' 2>/dev/null)
  for d in /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-*/targets/x86_64-linux/lib \
      ${wheels:+"$wheels"/cu13/lib "$wheels"/cublas/lib}; do
    if ls "$d"/libcublas.so* >/dev/null 2>&1; then
      export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
      break
    fi
  done
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$log/gpu.txt"
export RRRA_REQUIRE_GPU=1

if wants tests; then
  for t in "$bin"/gpu_*; do
    name=$(basename "$t")
    [ "$name" = gpu_minilm ] && continue
    run "test $name" 300 "$log/test-$name.txt" "$t" --test-threads 1
  done
fi

if wants kernels; then
  only=()
  [ -n "${RRRA_DEVICE_CHECK_ONLY:-}" ] && only=(--only "$RRRA_DEVICE_CHECK_ONLY")
  run "kernels" 420 "$log/kernels.txt" "$bin/rrra" device-check --log-dir "$log" "${only[@]}"
  grep -E '^(\||ceilings|batch-1|error)' "$log/kernels.txt"
fi

if wants peers; then
  if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
    run "peers (PyTorch on this machine)" 300 "$log/peers.txt" \
      env PYTHONUNBUFFERED=1 python3 tools/peer-torch-gpu.py
    grep -E '^\|' "$log/peers.txt"
  else
    step "peers skipped: python3 has no CUDA PyTorch"
  fi
fi

if wants model || wants train; then
  if [ -z "${RRRA_MODEL:-}" ] || [ ! -d "$shared/data/scifact" ]; then
    step "model and train skipped: no model (RRRA_MODEL or every prebuilt part) or no data/scifact"
    stages=("${stages[@]/model/}")
    stages=("${stages[@]/train/}")
  fi
fi

if wants model; then
  run "test gpu_minilm" 300 "$log/test-gpu_minilm.txt" "$bin/gpu_minilm" --test-threads 1
  for p in bf16 f32; do
    run "SciFact on the GPU ($p)" 300 "$log/scifact-$p.txt" \
      "$bin/rrra" demo --device cuda --precision "$p" --model "$RRRA_MODEL" \
      --data "$shared/data/scifact" --work "$work/demo-$p" \
      --expect "$shared/fixtures/scifact-minilm/expected_metrics.json"
    cp "$work/demo-$p"/*.metrics.json "$log/scifact-$p.metrics.json" 2>/dev/null
  done
  run "Retriever on the GPU under load" 300 "$log/query-load-gpu.txt" \
    "$bin/rrra" bench --model "$RRRA_MODEL" --shared "$shared" --only query-load \
    --device cuda:0 --json "$log/query-load-gpu.json"
fi

if wants train; then
  run "SciFact fine-tuning on the GPU (CPU run: nDCG@10 0.6872, 839 s)" 580 \
    "$log/train-scifact.txt" env SAMPLERS="simans:a=200" RRRA_BIN="$bin/rrra" \
    RRRA_SHARED="$shared" WORK="$work/train-scifact" EVAL_DEVICE=cuda:0 \
    tools/train-scifact.sh --device cuda:0
  cp "$work/train-scifact/summary.txt" "$log/train-summary.txt" 2>/dev/null \
    && tail -n 2 "$log/train-summary.txt" | tee -a "$log/summary.txt"
fi
exit $status
