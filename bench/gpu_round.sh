#!/usr/bin/env bash
# One GPU round for the kernel work: build + the GPU test group + compute-sanitizer (tests/gpu/run.sh), then
# the quantize benchmark (every g at [8192, 16384]), the GEMM alone in both `hopper` scalings (per-row and
# 1x128 tiles) next to cuBLAS BF16 / FP8, both backward GEMMs from BF16 tensors (both scalings), and the host
# cost of one linear (the one-call backward against the Python steps, a CUDA-graph replay).
# Results go to $OUT (when set) and bench/results/. Each stage has its own time limit; STAGES picks stages
# (default: tests,quantize,gemm,backward,host; also tc_rht: bench/tc_rht.py's check and timing).
#   bash bench/gpu_round.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-bench/results}
STAGES=${STAGES:-tests,quantize,gemm,backward,host}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.used --format=csv,noheader || true
if [[ ,$STAGES, == *,tests,* ]]; then
  MXFP4_GEMM_ERRORS="$OUT/gemm-errors-h200.json" timeout 300 bash tests/gpu/run.sh -q -p no:cacheprovider -rf \
    ${GPU_TEST_ARGS:-} 2>&1 | tee "$OUT/gpu-tests.log" | tail -40
else  # the other stages still need the extension
  MXFP4_BUILD_EXT=1 MXFP4_CUDA_ARCHS=${MXFP4_CUDA_ARCHS:-90a} python3 setup.py -q build_ext --inplace 2>&1 | tail -3
fi
[[ ,$STAGES, == *,quantize,* ]] &&
  timeout 150 python3 bench/quantize.py --quick --no-compile --out "$OUT/quantize-h200.json" 2>&1 | tail -40
[[ ,$STAGES, == *,tc_rht,* ]] &&  # the tensor-core transform prototype against the CUDA kernel (opt-in stage)
  timeout 120 python3 bench/tc_rht.py 2>&1 | tee "$OUT/tc-rht-h200.md" | tail -14
[[ ,$STAGES, == *,gemm,* ]] &&
  timeout 150 python3 bench/gemm.py --models 6.7b,1.3b --tp 1 \
    --methods bf16,fp8_tensor,fp8_row,fp8_1x128,hopper_rows,hopper_tiles --out "$OUT/gemm-scaling-h200" 2>&1 | tail -30
[[ ,$STAGES, == *,backward,* ]] &&
  timeout 150 python3 bench/gemm.py --backward --models 6.7b,1.3b --out "$OUT/gemm-backward-h200" 2>&1 | tail -20
[[ ,$STAGES, == *,host,* ]] &&
  timeout 120 python3 bench/host.py --out "$OUT/host-h200" 2>&1 | tail -14
exit 0
