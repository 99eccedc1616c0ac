#!/usr/bin/env bash
# Compare compile-time variants of the quantize kernels on one GPU: for each "NAME=NVCC_FLAGS" argument the
# extension is rebuilt in place with those flags (MXFP4_NVCC_FLAGS), the kernel tests for g <= 64 run, and
# bench/quantize.py --quick writes $OUT/quantize-NAME.{json,md}. The last variant stays built.
#   bash bench/quantize_variants.sh base= other=-DSOME_MACRO=1
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-bench/results}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
for spec in "$@"; do
  name=${spec%%=*}; flags=${spec#*=}
  echo "== variant $name: ${flags:-(default flags)}"
  rm -rf build megatron_mxfp4/_mxfp4_cuda*.so
  MXFP4_NVCC_FLAGS="$flags" MXFP4_BUILD_EXT=1 MXFP4_CUDA_ARCHS=${MXFP4_CUDA_ARCHS:-90a} MAX_JOBS=$(nproc) \
    python3 setup.py -q build_ext --inplace > "$OUT/build-$name.log" 2>&1 || { tail -20 "$OUT/build-$name.log"; continue; }
  python3 -m pytest -q -p no:cacheprovider tests/gpu/test_quantize_kernels.py -k "not 128 and not 256 and not large" 2>&1 | tail -2
  python3 bench/quantize.py --quick --no-compile --out "$OUT/quantize-$name.json" 2>&1 | grep -E "g=(0|32|64) " | grep -v reference
done
