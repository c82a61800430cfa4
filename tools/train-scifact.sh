#!/usr/bin/env bash
# Fine-tunes all-MiniLM-L6-v2 on the SciFact train split with each hard-negative sampler and
# evaluates every result on the test split (nDCG@10 etc., max length from the model: 256).
#   tools/train-scifact.sh [extra `rrra train` options, e.g. --device cuda:0]
# Env: SAMPLERS (default "simans simans:a=200 uniform trisampler inbatch"; "inbatch" trains
# with in-batch negatives only, no mining), WORK (default $RRRA_CACHE/train-scifact or
# ~/.cache/rrra/train-scifact), RRRA_SHARED (default ../shared), THREADS (default: all cores),
# RRRA_MODEL (default: tools/fetch-model.sh), RRRA_BIN (a built rrra; default: build it),
# EVAL_DEVICE (where the test split is encoded and searched: cpu, the default, or cuda[:N]).
# Prints one summary line per sampler, ending "nDCG@10 X ..." and "training wall time N s".
# Budget (the defaults below): 1 epoch, batch 16, query 64 / document 128 tokens, 3 hard
# negatives per query from the top-200, lr 2e-5 with 10% warm-up, tau 0.05, seed 42.
set -euo pipefail
cd "$(dirname "$0")/.."
model="${RRRA_MODEL:-$(tools/fetch-model.sh)}"
shared="${RRRA_SHARED:-../shared}"
work="${WORK:-${RRRA_CACHE:-$HOME/.cache/rrra}/train-scifact}"
threads=()
[ -n "${THREADS:-}" ] && threads=(--threads "$THREADS")
# the evaluation's encodes in f32 wherever they run, so CPU and GPU runs compare
eval_device=()
[ -n "${EVAL_DEVICE:-}" ] && [ "$EVAL_DEVICE" != cpu ] &&
  eval_device=(--device "$EVAL_DEVICE" --precision f32)
rrra="${RRRA_BIN:-target/release/rrra}"
[ -n "${RRRA_BIN:-}" ] || cargo build --release --quiet --bin rrra
mkdir -p "$work"
for sampler in ${SAMPLERS:-simans simans:a=200 uniform trisampler inbatch}; do
  out="$work/$sampler"
  rm -rf "$out"
  start=$(date +%s)
  negatives=(--sampler "$sampler" --hard-negatives 3)
  [ "$sampler" = inbatch ] && negatives=(--hard-negatives 0)
  "$rrra" "${threads[@]}" train --model "$model" --beir "$shared/data/scifact" --split train \
    --out "$out" "${negatives[@]}" --doc-max-length 128 \
    --batch-size 16 --epochs 1 --seed 42 "$@" 2>&1 | tee "$work/$sampler.train.txt"
  end=$(date +%s)
  "$rrra" "${threads[@]}" demo --model "$out/model" --data "$shared/data/scifact" \
    --work "$out/eval" "${eval_device[@]}" 2>&1 | tee "$work/$sampler.eval.txt"
  echo "$sampler: training wall time $((end - start)) s" | tee -a "$work/summary.txt"
  python3 - "$out/eval/scifact.test.metrics.json" "$sampler" <<'PY' | tee -a "$work/summary.txt"
import json, sys
m = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]}: nDCG@10 {m['ndcg@10']:.4f}  MRR@10 {m['mrr@10']:.4f}  "
      f"R@1 {m['recall@1']:.4f}  R@10 {m['recall@10']:.4f}  R@100 {m['recall@100']:.4f}")
PY
done
