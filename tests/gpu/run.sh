#!/usr/bin/env bash
# GPU test group: builds the CUDA extension in place, runs every test under tests/gpu, then runs
# compute-sanitizer (memcheck) once on a small quantize case. Run from anywhere on a CUDA machine:
#   bash tests/gpu/run.sh [extra pytest arguments]
# MXFP4_CUDA_ARCHS selects the build targets (default here: 90a, the H100/H200); MXFP4_GPU_TESTS
# narrows the test selection (default: tests/gpu).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
export MXFP4_BUILD_EXT=1 MXFP4_CUDA_ARCHS=${MXFP4_CUDA_ARCHS:-90a} MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build, also for scripts run directly
echo "== build (archs ${MXFP4_CUDA_ARCHS})"
time $PY setup.py -q build_ext --inplace
echo "== ${MXFP4_GPU_TESTS:-tests/gpu}"
status=0
$PY -m pytest -q ${MXFP4_GPU_TESTS:-tests/gpu} "$@" || status=$?
echo "== compute-sanitizer memcheck"
if command -v compute-sanitizer >/dev/null; then
  compute-sanitizer --tool memcheck --error-exitcode 3 $PY tests/gpu/sanitize_quantize.py || status=$?
else
  echo "compute-sanitizer not found: skipped"
fi
exit $status
