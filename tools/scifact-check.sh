#!/usr/bin/env bash
# The retrieval reproduction: fetch all-MiniLM-L6-v2 if missing, encode the SciFact corpus,
# search its 300 test queries (top 100), evaluate, and compare with the reference metrics of
# sentence-transformers + pytrec_eval when the fixtures are at hand (fails outside tolerance).
#   tools/scifact-check.sh [extra `rrra demo` options]
# Data: $RRRA_SHARED (default ../shared) holds data/scifact and fixtures/.
set -euo pipefail
cd "$(dirname "$0")/.."
model=$(tools/fetch-model.sh)
shared="${RRRA_SHARED:-../shared}"
args=(--model "$model" --data "$shared/data/scifact")
expect="$shared/fixtures/scifact-minilm/expected_metrics.json"
[ -f "$expect" ] && args+=(--expect "$expect")
cargo run --release --quiet --bin rrra -- demo "${args[@]}" "$@"
