#!/usr/bin/env bash
# Idempotent installer for the whole pinned stack.
#
# Creates (or reuses) a virtual environment outside the repository, installs
# torch/torchvision, builds mmcv 2.1.0 with its compiled ops once and caches the
# wheel, installs the OpenMMLab packages and this project in editable mode, then
# verifies that `mmcv.ops` loads.  A stamp file makes a repeated run a no-op.
#
# Environment:
#   SAR_VENV         virtual environment       (default ~/.cache/sar_backbones/venv)
#   SAR_WHEEL_CACHE  where the mmcv wheel lives (default ~/.cache/sar_backbones/wheels)
#   MAX_JOBS         parallel compile jobs for mmcv (default: number of cores)
#   FORCE_CUDA       1 to compile mmcv's CUDA ops (needs nvcc + a CUDA torch);
#                    default: 1 only if torch sees a GPU.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/sar_backbones"
VENV="${SAR_VENV:-$CACHE/venv}"
WHEELS="${SAR_WHEEL_CACHE:-$CACHE/wheels}"
PYTHON="${PYTHON:-python3.11}"
MMCV_VERSION=2.1.0

log() { printf '[install] %s\n' "$*" >&2; }

stamp_key() {
    cat "$ROOT/requirements/"*.txt "$ROOT/setup.py" "$ROOT/scripts/install.sh" \
        "$ROOT"/sar_backbones/inference/native/*.cpp | sha256sum | cut -d' ' -f1
}

# The editable install must serve this checkout (a fresh clone reuses the venv).
serves_root() {
    (cd / && "$VENV/bin/python" -c "import os, sar_backbones; \
assert os.path.dirname(os.path.dirname(os.path.abspath(sar_backbones.__file__))) == '$ROOT'") 2>/dev/null
}

if [[ -x "$VENV/bin/python" && -f "$VENV/.sar_stamp" && "$(cat "$VENV/.sar_stamp")" == "$(stamp_key)" ]] \
   && "$VENV/bin/python" -c "import mmcv.ops" 2>/dev/null; then
    if ! serves_root; then
        log "pointing the editable install at $ROOT"
        "$VENV/bin/python" -m pip install --disable-pip-version-check -q --no-deps \
            --no-build-isolation -e "$ROOT"
    fi
    # The native kernel's cache is keyed by CPU flags too: a cached venv on a
    # new machine still needs its own build (a no-op when it exists).
    "$VENV/bin/python" -m sar_backbones.inference.native build
    log "environment up to date: $VENV"
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
# Every install is held to the tested versions of the whole stack.
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -c "$ROOT/requirements/constraints.txt")

log "installing torch and build tools"
"${PIP[@]}" -r "$ROOT/requirements/torch.txt"
"${PIP[@]}" -r "$ROOT/requirements/build.txt"

build_mmcv() {
    local src
    src="$(mktemp -d)"
    log "building mmcv $MMCV_VERSION with compiled ops (about 15 minutes on 2 cores)"
    "$VENV/bin/python" -m pip download --no-deps --no-binary :all: -d "$src" "mmcv==$MMCV_VERSION"
    tar -xzf "$src"/mmcv-"$MMCV_VERSION".tar.gz -C "$src"
    # torch >= 2.6 headers need C++20; mmcv 2.1.0 hard-codes C++14/17.
    sed -i -e 's/-std=c++14/-std=c++20/g' -e 's/-std=c++17/-std=c++20/g' \
        "$src/mmcv-$MMCV_VERSION/setup.py"
    local force_cuda="${FORCE_CUDA:-}"
    if [[ -z "$force_cuda" ]]; then
        force_cuda=$("$VENV/bin/python" -c "import torch; print(int(torch.cuda.is_available()))")
    fi
    mkdir -p "$WHEELS"
    (cd "$src/mmcv-$MMCV_VERSION" && \
        MMCV_WITH_OPS=1 FORCE_CUDA="$force_cuda" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
        "$VENV/bin/python" -m pip wheel --no-build-isolation --no-deps -w "$WHEELS" .)
    rm -rf "$src"
}

mmcv_wheel() { ls "$WHEELS"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n1; }

if ! "$VENV/bin/python" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '$MMCV_VERSION'" 2>/dev/null; then
    [[ -n "$(mmcv_wheel)" ]] || build_mmcv
    log "installing cached wheel $(mmcv_wheel)"
    "${PIP[@]}" --no-deps --force-reinstall "$(mmcv_wheel)"
fi

log "installing OpenMMLab packages and test tools"
"${PIP[@]}" -r "$ROOT/requirements/runtime.txt" -r "$ROOT/requirements/tests.txt"
"${PIP[@]}" --no-deps --no-build-isolation -e "$ROOT"

# --- BEGIN native refine kernel (issue 18; owner: inference engine) ---
# Compiles sar_backbones/inference/native/refine.cpp once (about 1.5 minutes on 2 cores) into
# ${XDG_CACHE_HOME:-~/.cache}/sar_backbones/native/<key>, keyed by source hash, torch version
# and CPU vector flags; a no-op when that build exists. Imports never compile: without it the
# sparse path falls back to PyTorch with a warning, and tests/inference/test_native.py fails.
log "building the native refine kernel (cached)"
"$VENV/bin/python" -m sar_backbones.inference.native build
# --- END native refine kernel ---

log "verifying"
"$VENV/bin/python" - <<'PY'
import torch, mmcv, mmcv.ops, mmdet, mmseg, mmpretrain, mmengine
from mmcv.ops import nms
boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.]])
_, keep = nms(boxes, torch.tensor([0.9, 0.8]), 0.5)
assert keep.tolist() == [0], keep
print(f'torch {torch.__version__}, mmcv {mmcv.__version__} (ops ok), mmengine {mmengine.__version__}, '
      f'mmdet {mmdet.__version__}, mmseg {mmseg.__version__}, mmpretrain {mmpretrain.__version__}')
PY
stamp_key > "$VENV/.sar_stamp"
log "done: activate with 'source $VENV/bin/activate'"
