#!/usr/bin/env bash
# The GPU measurements of issue 19 on a lent device machine (one H100/H200, no package registry), in two runs that
# fit its 15 minutes of device time (each run well under its 10-minute limit). Nothing here runs in CI.
#
#   bench/gpu_device_run.sh wheels    HERE, where pip works: the wheels each run carries, into .whl-ours/ and
#                                     .whl-original/ (both in .git/info/exclude; ~48 MB and ~33 MB: the carry
#                                     limit is 64 MiB a call, so the original's run leaves PyAV behind)
#   bench/gpu_device_run.sh ours      ON THE DEVICE (carry: .whl-ours): bench/load.py --device cuda (render start
#                                     -> first UNet call), bench/gpu.py --variants cached,in_memory,diffusers,
#                                     bench/gpu_settings.py (cuDNN, channels_last, SDPA, the two-process same-bits
#                                     check); every result file into $OUT
#   bench/gpu_device_run.sh original  ON THE DEVICE (carry: .whl-original): the original Diffutoon (PyPI
#                                     diffsynth==1.1.7) in its own venv through bench/original_diffutoon.py,
#                                     bench/gpu.py --variants original, then bench/gpu_settings.py --compile
#
# The device image has torch, transformers 5, accelerate, safetensors, cupy, einops, imageio, opencv, timm...
# (/work/.library/device/KINDS.md); ours also needs diffusers, PyAV, pydantic and zstandard; the original pins
# transformers 4.46.2 (so tokenizers < 0.21 and huggingface-hub < 1.0, in its own venv, which sees the image's
# packages for the rest) and imports controlnet-aux 0.0.7 and ftfy. Both runs write the same seeded random files
# (bench/original_diffutoon.py's write_weights), so every variant reads the same weights. Merge the two gpu.json files with
# `python bench/gpu_device_run.sh`'s last step (below) or by hand: the original's keys into ours.
set -euo pipefail
cd "$(dirname "$0")/.."
phase="${1:?usage: bench/gpu_device_run.sh wheels|ours|original}"
PY="${PYTHON:-python3}"
MODELS=/tmp/diffsynth_models          # bench/original_diffutoon.py's weights (gpu.py, gpu_settings.py)
LOAD_MODELS=/tmp/diffsynth_load_models  # bench/load.py's (upstream dtypes)
OUT="${OUT:-/tmp/diffsynth_gpu_out}"
mkdir -p "$OUT"
platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"

fetch() {  # folder, then NAME==VERSION...
  local folder="$1"; shift
  local exclude; exclude="$(git rev-parse --git-path info/exclude)"  # a worktree's .git is a file
  mkdir -p "$(dirname "$exclude")"
  grep -qxF "/$folder/" "$exclude" 2>/dev/null || echo "/$folder/" >> "$exclude"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
    -d "$folder" "$@"
}

install() {  # folder, target
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$2" "$1"/*.whl
}

case "$phase" in
wheels)
  version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
  fetch .whl-ours "diffusers==$(version diffusers)" "av==$(version av)" "pydantic==$(version pydantic)" \
    "pydantic-core==$(version pydantic-core)" "annotated-types==$(version annotated-types)" \
    "typing-inspection==$(version typing-inspection)" "zstandard==$(version zstandard)" importlib-metadata
  fetch .whl-original diffsynth==1.1.7 transformers==4.46.2 "tokenizers>=0.20,<0.21" "huggingface-hub>=0.23.2,<1.0" \
    ftfy wcwidth "diffusers==$(version diffusers)" "pydantic==$(version pydantic)" \
    "pydantic-core==$(version pydantic-core)" "annotated-types==$(version annotated-types)" \
    "typing-inspection==$(version typing-inspection)" "zstandard==$(version zstandard)" importlib-metadata
  "$PY" -m pip wheel -q --no-deps -w .whl-original controlnet-aux==0.0.7  # an sdist on PyPI: built here
  du -sh .whl-ours .whl-original
  ;;
ours)
  install .whl-ours /tmp/site && export PYTHONPATH="/tmp/site:$PWD"
  export PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
  # each step bounded, so the run stays under the 10-minute limit and what finished still comes back
  timeout 100 "$PY" bench/load.py --device cuda --runs 3 --label gpu --models "$LOAD_MODELS" --out "$OUT/load.json" \
    || echo "load.py did not finish"
  timeout 300 "$PY" bench/gpu.py --models "$MODELS" --variants cached,in_memory,diffusers --out "$OUT/gpu.json" \
    || echo "gpu.py did not finish"
  timeout 120 "$PY" bench/gpu_settings.py --models "$MODELS" --out "$OUT/gpu_settings.json" \
    || echo "gpu_settings.py did not finish"
  ;;
original)
  # ours without PyAV (the original-only path of bench/gpu.py needs none); the original's pins in its own venv
  mkdir -p /tmp/wheels-ours /tmp/wheels-original
  cp .whl-original/{diffusers,pydantic,pydantic_core,annotated_types,typing_inspection,zstandard,importlib_metadata}-*.whl /tmp/wheels-ours/
  install /tmp/wheels-ours /tmp/site && export PYTHONPATH="/tmp/site:$PWD"
  export PYTHONUNBUFFERED=1
  venv="${DIFFSYNTH_ORACLE_VENV:-$HOME/.cache/diffsynth-oracle/venv}"
  "$PY" -m venv --system-site-packages "$venv"
  for wheel in .whl-original/{diffsynth,transformers,tokenizers,huggingface_hub,ftfy,wcwidth,controlnet_aux}-*.whl; do
    cp "$wheel" /tmp/wheels-original/
  done
  "$venv/bin/python" -m pip install -q --no-index --no-deps --no-compile /tmp/wheels-original/*.whl
  timeout 300 "$PY" bench/gpu.py --models "$MODELS" --variants original --original-python "$venv/bin/python" \
    --out "$OUT/gpu_original.json" || echo "gpu.py --variants original did not finish"
  # torch.compile (first call with an empty inductor cache, then in a second process with it filled) in the time left
  timeout 200 "$PY" bench/gpu_settings.py --models "$MODELS" --compile --out "$OUT/gpu_settings_compile.json" \
    || echo "gpu_settings.py --compile did not finish"
  ;;
*)
  echo "usage: bench/gpu_device_run.sh wheels|ours|original" >&2; exit 2 ;;
esac
