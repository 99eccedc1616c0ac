#!/usr/bin/env bash
# One GPU round for the quantizer work: build + the GPU test group + compute-sanitizer (tests/gpu/run.sh),
# then the quantize benchmark (every g at [8192, 16384]) and both backward GEMMs from BF16 tensors.
# Results go to $OUT (when set) and bench/results/. Each stage has its own time limit.
#   bash bench/gpu_round.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-bench/results}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.used --format=csv,noheader || true
timeout 300 bash tests/gpu/run.sh -q -p no:cacheprovider -rf ${GPU_TEST_ARGS:-} 2>&1 | tee "$OUT/gpu-tests.log" | tail -40
timeout 150 python3 bench/quantize.py --quick --no-compile --out "$OUT/quantize-h200.json" 2>&1 | tail -40
timeout 120 python3 bench/gemm.py --backward --models 6.7b,1.3b --out "$OUT/gemm-backward-h200" 2>&1 | tail -20
