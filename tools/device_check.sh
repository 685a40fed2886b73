#!/usr/bin/env bash
# The prepared GPU check of issue 15, for a session lent a GPU machine (see BENCHMARKS.md, "GPU").
#
# That machine has Python 3.12 with torch, scipy, tqdm and matplotlib, but no SimpleITK, no pytest and no
# internet. Before calling the device, fetch the wheels here, into the ignored folder wheels/ (55.8 MB on
# 2026-11-28; with the tracked files, about 9 MB, under the 64 MiB that travels):
#
#   pip download SimpleITK==2.5.5 --python-version 3.12 --only-binary=:all: --no-deps -d wheels/
#   pip download pytest hypothesis --python-version 3.12 --only-binary=:all: -d wheels/   # the CUDA tests
#
# then run, from the repository root, with wheels/ carried (run tool: carry ["wheels"]):
#
#   bash tools/device_check.sh            # OUT (default device-out/) receives every figure; DEVICE=cuda
#
# Try it on a CPU without installing anything: DEVICE=cpu QUICK=1 INSTALL=0 OUT=/tmp/dc bash tools/device_check.sh
set -u
OUT=${OUT:-device-out}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/device_check.log") 2>&1
echo "device check $(date -u +%FT%TZ) on $(hostname): $($PY --version)"

# 1. SimpleITK (and pytest, hypothesis) from the carried wheels, when missing
if ! $PY -c "import SimpleITK" 2>/dev/null || ! $PY -c "import pytest, hypothesis" 2>/dev/null; then
    if ls wheels/*.whl >/dev/null 2>&1; then
        $PY -m pip install --no-index --no-deps --quiet wheels/*.whl || echo "pip could not install wheels/"
    else
        echo "no wheels/ folder: SimpleITK, pytest or hypothesis missing (see the top of this script)"
    fi
fi

# 2. the project, without touching the installed torch; else straight from the source tree (INSTALL=0: no pip)
if [ "${INSTALL:-1}" = 1 ] && ! $PY -m pip install --no-deps --no-build-isolation --quiet . ; then
    echo "pip install . failed (no setuptools?): using PYTHONPATH=AIRRegistration"
fi
export PYTHONPATH="$PWD/AIRRegistration${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import airreg, torch; print('airreg', airreg.__file__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"

# 3. the CUDA tests that CI skips (and the CPU-only fallback test, which skips itself on a GPU)
if $PY -c "import pytest, hypothesis" 2>/dev/null; then
    $PY -m pytest -q -rs -k "cuda" Testing/test_resampling.py Testing/test_registration.py \
        --junitxml="$OUT/cuda-tests.xml" 2>&1 | tail -n 15
else
    echo "pytest/hypothesis not importable: CUDA tests not run"
fi

# 4-6. benchmarks, training throughput and an airreg train timing; summary.md
$PY tools/device_check.py --out "$OUT" --device "$DEVICE" ${QUICK:+--quick}
echo "device check done: rc=$? $(date -u +%FT%TZ); figures in $OUT/summary.md"
