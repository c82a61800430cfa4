#!/usr/bin/env bash
# The main job on its built-in default: the whole RRRA pipeline on a generated collection with
# planted false negatives (nothing downloaded but all-MiniLM-L6-v2, fetched once if missing).
# It generates the collection, hides half the positives of multi-positive training queries,
# assesses the pretrained encoder, fine-tunes it with uniform / SimANS / TriSampler / RRRA hard
# negatives (same budget), trains the adapter on each, reranks, and prints the comparison table
# with the false-negative detection AUCs.
#   tools/demo.sh [extra `rrra experiment` options, e.g. --seeds 1,2,3]
# Output: $RRRA_DEMO_OUT (default ~/.cache/rrra/demo-rrra): results.md, results.json, plots/.
set -euo pipefail
cd "$(dirname "$0")/.."
model=$(tools/fetch-model.sh)
out="${RRRA_DEMO_OUT:-$HOME/.cache/rrra/demo-rrra}"
cargo run --release --quiet --bin rrra -- experiment --synthetic --model "$model" --out "$out" \
    --seeds 1 --max-steps 20 --doc-max-length 48 --query-max-length 32 --eval-max-length 64 "$@"
