#!/usr/bin/env bash
# Builds what tools/device-check.sh runs, for a GPU machine that has no Rust toolchain, into
# folders of at most RRRA_PREBUILT_MIB MiB each (default 58: a 64 MiB transfer with this
# repository's own files), for copy channels that limit the size of a transfer:
#   $1 (default .device)  payload.tar.xz: bin/ (the stripped release binary and the GPU test
#                         binaries) and shared/ (the fixtures and the two collections the GPU
#                         tests and the SciFact checks read); model/: all-MiniLM-L6-v2's small
#                         files, the SHA-256 and part count of its weights, and the weights'
#                         first part;
#   $1-2, $1-3, ...       model/: the weights' further parts.
# On the GPU machine, with the folders beside each other (the first alone runs every stage but
# `model` and `train`; the parts may arrive later, in separate transfers):
#   RRRA_PREBUILT=.device tools/device-check.sh [STAGE ...]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.device}"
budget=$(( ${RRRA_PREBUILT_MIB:-58} * 1024 * 1024 ))
shared="${RRRA_SHARED:-../shared}"
model=$(tools/fetch-model.sh)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bin" "$stage/shared/fixtures" "$stage/shared/data"
cargo build --release --bin rrra
cp target/release/rrra "$stage/bin/"
# a build without nvcc is CPU-only (build.rs only warns): no use on a GPU machine
if ! grep -qa rrra_adamw_update "$stage/bin/rrra"; then
  echo "error: rrra was built without its CUDA kernels (no nvcc): run tools/install-nvcc.sh" >&2
  exit 1
fi
cargo test --release --no-run --message-format=json --test 'gpu_*' \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])' | while read -r t; do cp "$t" "$stage/bin/$(basename "$t" | sed 's/-[0-9a-f]*$//')"; done
strip "$stage"/bin/*
for f in tiny-bert minilm scifact-minilm; do cp -r "$shared/fixtures/$f" "$stage/shared/fixtures/"; done
for d in scifact cranfield; do cp -r "$shared/data/$d" "$stage/shared/data/"; done
rm -rf "$out" "$out"-[0-9]* && mkdir -p "$out/model"
tar -C "$stage" -cJf "$out/payload.tar.xz" bin shared
find "$model" -maxdepth 1 -type f ! -name model.safetensors -exec cp {} "$out/model/" \;
[ -d "$model/1_Pooling" ] && cp -r "$model/1_Pooling" "$out/model/"
(cd "$model" && sha256sum model.safetensors) > "$out/model/model.safetensors.sha256"
# the weights in parts: the first fills what the payload leaves of the first folder, each
# further part a folder of its own
python3 - "$model/model.safetensors" "$out" "$budget" <<'EOF'
import os, sys
weights, out, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
used = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
# (folder number, bytes) per part; folder 1 is `out` itself; 1 MiB of each folder is left for
# the file system's own entries
parts, left, room = [], os.path.getsize(weights), budget - used - (1 << 20)
folder = 1 if room > 0 else 2
while left > 0:
    n = min(left, room if folder == 1 else budget - (1 << 20))
    parts.append((folder, n))
    left -= n
    folder += 1
with open(weights, "rb") as src:
    for i, (k, n) in enumerate(parts):
        d = os.path.join(out if k == 1 else f"{out}-{k}", "model")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"model.safetensors.part-{i:02d}"), "wb") as dst:
            dst.write(src.read(n))
with open(os.path.join(out, "model", "model.safetensors.parts"), "w") as f:
    f.write(f"{len(parts)}\n")
EOF
for d in "$out" "$out"-[0-9]*; do
  [ -d "$d" ] || continue
  size=$(du -sb "$d" | cut -f1)
  echo "$d: $(( size / 1024 / 1024 )) MiB"
  if [ "$size" -gt "$budget" ]; then
    echo "error: $d is over RRRA_PREBUILT_MIB" >&2
    exit 1
  fi
done
