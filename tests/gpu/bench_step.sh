#!/usr/bin/env bash
# Full GPT training steps through `python -m megatron_mxfp4.pretrain_gpt`, every arm (issue 7), on a
# machine with 2 GPUs (e.g. 2× H200):
#
#   bash tests/gpu/bench_step.sh 1.3b      GPT-1.3B, TP=1: two arms at a time, one per GPU
#   bash tests/gpu/bench_step.sh 6.7b      GPT-6.7B, TP=2 over NCCL, distributed optimizer: one arm at a time
#
# One model per call (each fits a 10-minute command; bench/step.py stops starting arms when its time
# budget is spent and says so). Prepares the machine like tests/gpu/bench_all.sh (megatron-core from
# .whl/, the CUDA extension built in place when missing); Transformer Engine is used when it imports.
# Results: bench/results/step-<model>-<device>.{json,md} and the per-arm logs; with $OUT set, the
# markdown and JSON are copied there, the logs packed into $OUT/step-<model>-logs.tgz, and the whole
# output is $OUT/bench_step_<model>.log.
# Env: ARMS (bench/step.py --arms patterns), DEADLINE (seconds, default 570), STEP_ARGS (extra flags),
# LINEAR_TP2=1 (first, a TP=2 bench/linear.py run of the main arms: the dX all-reduce as "comm");
# BENCH_SMOKE=1 checks this script on a CPU (bench/step.py --dry-run; no build).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
MODEL=${1:?usage: bench_step.sh 1.3b|6.7b}
START=$(date +%s)
DEADLINE=${DEADLINE:-570}
PY=${PYTHON:-python3}
RES=bench/results
mkdir -p "$RES"
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT"; exec > >(tee -a "$OUT/bench_step_$MODEL.log") 2>&1; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHON=$PY
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 CUDA_DEVICE_MAX_CONNECTIONS=1

echo "== devices"; nvidia-smi --query-gpu=index,name,clocks.sm,power.draw,memory.used --format=csv,noheader || true
if ! $PY -c "import megatron.core" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
$PY -c "import megatron.core" || { echo "megatron-core does not import: carry its wheel in .whl/"; exit 2; }
if [ "${BENCH_SMOKE:-0}" = 1 ]; then
  echo "== BENCH_SMOKE=1: commands only"
  # shellcheck disable=SC2086
  exec $PY bench/step.py --model "$MODEL" ${ARMS:+--arms "$ARMS"} --dry-run ${STEP_ARGS:-}
fi
if ! $PY -c "from megatron_mxfp4.ops import cuda_quantize as c; assert c.is_available(), c._LOAD_ERROR" 2>/dev/null; then
  echo "== build"
  ( export MXFP4_BUILD_EXT=1 MXFP4_CUDA_ARCHS=${MXFP4_CUDA_ARCHS:-90a} MAX_JOBS=${MAX_JOBS:-$(nproc)}
    time $PY setup.py -q build_ext --inplace ) || { echo "extension build failed"; exit 3; }
fi
status=0
if [ "${LINEAR_TP2:-0}" = 1 ]; then
  echo "== linear at TP=2"
  timeout 150 "$PY" -m torch.distributed.run --nproc-per-node 2 --master-port 29411 bench/linear.py --model "$MODEL" \
    --layers qkv,fc1 --arms 'bf16_mcore,ours_fp8_fp8,ours_*_g64_sr' || status=1
fi
budget=$(( DEADLINE - ($(date +%s) - START) - 15 ))
# shellcheck disable=SC2086
$PY bench/step.py --model "$MODEL" ${ARMS:+--arms "$ARMS"} --time-budget "$budget" ${STEP_ARGS:-} || status=1

if [ -n "${OUT:-}" ]; then
  for f in "$RES"/step-"$MODEL"-*.json "$RES"/step-"$MODEL"-*.md; do [ -f "$f" ] && cp "$f" "$OUT/"; done
  logs=(); for d in "$RES"/step-"$MODEL"-*-logs; do [ -d "$d" ] && logs+=("$(basename "$d")"); done
  [ ${#logs[@]} -gt 0 ] && tar -C "$RES" -czf "$OUT/step-$MODEL-logs.tgz" "${logs[@]}"
  if [ "${LINEAR_TP2:-0}" = 1 ]; then
    for f in "$RES"/linear-tp2-*.md "$RES"/linear-tp2-*.json; do [ -f "$f" ] && cp "$f" "$OUT/"; done
  fi
  echo "== in \$OUT:" "$OUT"/*
fi
echo "== done in $(( $(date +%s) - START )) s, status $status"
exit $status
