#!/usr/bin/env bash
# Builds what tools/device-check.sh runs, for a GPU machine that has no Rust toolchain, into $1
# (default .device):
#   payload.tar.xz    bin/ (the stripped release binary and GPU test binaries) and shared/ (the
#                     fixtures and the two collections the GPU tests and the SciFact check read);
#   model/            all-MiniLM-L6-v2 with model.safetensors cut into 32 MB parts
#                     (model.safetensors.part-*), for copy channels that limit a transfer's size.
# Then, on the GPU machine, with $1 copied there:
#   RRRA_PREBUILT=.device tools/device-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.device}"
shared="${RRRA_SHARED:-../shared}"
model=$(tools/fetch-model.sh)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bin" "$stage/shared/fixtures" "$stage/shared/data"
cargo build --release --bin rrra
cp target/release/rrra "$stage/bin/"
cargo test --release --no-run --message-format=json --test 'gpu_*' \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])' | while read -r t; do cp "$t" "$stage/bin/$(basename "$t" | sed 's/-[0-9a-f]*$//')"; done
strip "$stage"/bin/*
for f in tiny-bert minilm scifact-minilm; do cp -r "$shared/fixtures/$f" "$stage/shared/fixtures/"; done
for d in scifact cranfield; do cp -r "$shared/data/$d" "$stage/shared/data/"; done
rm -rf "$out" && mkdir -p "$out/model"
tar -C "$stage" -cJf "$out/payload.tar.xz" bin shared
find "$model" -maxdepth 1 -type f ! -name model.safetensors -exec cp {} "$out/model/" \;
[ -d "$model/1_Pooling" ] && cp -r "$model/1_Pooling" "$out/model/"
split -b 32M -d "$model/model.safetensors" "$out/model/model.safetensors.part-"
du -sh "$out"/payload.tar.xz "$out"/model
