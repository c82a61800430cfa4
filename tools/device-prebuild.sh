#!/usr/bin/env bash
# Builds what tools/device-check.sh runs, for a GPU machine that has no Rust toolchain: the
# stripped release binary and GPU test binaries in $1/bin (default .device/bin), and the small
# fixtures the GPU tests read in $1/shared. Then, on the GPU machine:
#   RRRA_PREBUILT=.device tools/device-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.device}"
shared="${RRRA_SHARED:-../shared}"
rm -rf "$out" && mkdir -p "$out/bin" "$out/shared/fixtures"
cargo build --release --bin rrra
cp target/release/rrra "$out/bin/"
cargo test --release --no-run --message-format=json --test 'gpu_*' \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])' | while read -r t; do cp "$t" "$out/bin/$(basename "$t" | sed 's/-[0-9a-f]*$//')"; done
strip "$out"/bin/*
cp -r "$shared/fixtures/tiny-bert" "$out/shared/fixtures/"
du -sh "$out"
