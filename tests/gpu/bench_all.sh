#!/usr/bin/env bash
# End-to-end speed benchmarks on ONE GPU (issue 7): bench/linear.py (GPT-6.7B's four linears),
# bench/profile_backward.py (GPT-6.7B FC1), bench/layer.py (GPT-6.7B, then GPT-1.3B), every arm.
#
#   bash tests/gpu/bench_all.sh            on the GPU machine, from anywhere
#
# Before the benchmarks: builds the CUDA extension in place when it does not import yet (as
# tests/gpu/run.sh), and installs carried wheels from .whl/ (megatron-core) into /tmp/site when
# megatron.core does not import. Transformer Engine is used when it imports (install it first, in the
# same machine, before this script); without it the TE arms are skipped with a line saying so.
#
# Results: the JSON + markdown of every script go to bench/results/ in the working copy; when $OUT is
# set (a folder that collects the results, kept to a few files) they are also packed into
# $OUT/bench-results.tgz, the markdown tables are copied to $OUT, and the whole log is $OUT/bench_all.log.
# Env: QUICK=1 (6.7B FC1 only, SR arms, 10 iterations); DEADLINE (seconds for the whole script,
# default 570: each stage gets what is left); LINEAR_ARGS / PROFILE_ARGS / LAYER_ARGS (extra flags);
# BENCH_SMOKE=1 runs the same flow on a CPU at toy sizes (no build; a check of this script).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
START=$(date +%s)
DEADLINE=${DEADLINE:-570}
PY=${PYTHON:-python3}
RES=bench/results
mkdir -p "$RES"
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT"; exec > >(tee -a "$OUT/bench_all.log") 2>&1; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 CUDA_DEVICE_MAX_CONNECTIONS=1

left() { echo $(( DEADLINE - ($(date +%s) - START) )); }
stage() {  # stage NAME MAX_SECONDS command...
  local name=$1 max=$2; shift 2
  local t; t=$(left); [ "$t" -gt "$max" ] && t=$max
  if [ "$t" -lt 30 ]; then echo "== $name: skipped, $(left) s left of the ${DEADLINE} s deadline"; return 0; fi
  echo "== $name (limit $t s): $*"
  timeout --signal=TERM --kill-after=10 "$t" "$@"; local rc=$?
  echo "== $name: exit $rc after $(( $(date +%s) - START )) s in total"
  [ $rc -eq 0 ] || status=1
}
status=0

echo "== device"; nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,memory.used --format=csv,noheader || true
if ! $PY -c "import megatron.core" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
fi
$PY -c 'from megatron.core import package_info; import torch; print("megatron-core", package_info.__version__, "torch", torch.__version__)' \
  || { echo "megatron-core does not import: carry its wheel in .whl/ (see docs/performance.md)"; exit 2; }
$PY -c "import transformer_engine as t; print('Transformer Engine', t.__version__)" 2>/dev/null \
  || echo "Transformer Engine not installed: the TE arms will be skipped"
SMOKE=()
if [ "${BENCH_SMOKE:-0}" = 1 ]; then
  SMOKE=(--device cpu --tiny); RES=$(mktemp -d); export BENCH_OUT=$RES
  echo "== BENCH_SMOKE=1: CPU, toy sizes, results in $RES"
elif ! $PY -c "from megatron_mxfp4.ops import cuda_quantize as c; assert c.is_available(), c._LOAD_ERROR" 2>/dev/null; then
  echo "== build (archs ${MXFP4_CUDA_ARCHS:-90a})"
  ( export MXFP4_BUILD_EXT=1 MXFP4_CUDA_ARCHS=${MXFP4_CUDA_ARCHS:-90a} MAX_JOBS=${MAX_JOBS:-$(nproc)}
    time $PY setup.py -q build_ext --inplace ) || { echo "extension build failed"; exit 3; }
fi

if [ "${QUICK:-0}" = 1 ]; then
  Q_LIN=(--layers fc1 --roundings sr --iters 10 --warmup 3); Q_LAY=(--roundings sr --iters 10 --warmup 3)
else
  Q_LIN=(); Q_LAY=()
fi
# shellcheck disable=SC2086
stage linear 240 $PY bench/linear.py --model 6.7b "${SMOKE[@]}" "${Q_LIN[@]}" ${LINEAR_ARGS:-}
# shellcheck disable=SC2086
stage profile 120 $PY bench/profile_backward.py --model 6.7b --layer fc1 "${SMOKE[@]}" ${PROFILE_ARGS:-}
# shellcheck disable=SC2086
stage layer-6.7b 180 $PY bench/layer.py --model 6.7b "${SMOKE[@]}" "${Q_LAY[@]}" ${LAYER_ARGS:-}
# shellcheck disable=SC2086
stage layer-1.3b 120 $PY bench/layer.py --model 1.3b "${SMOKE[@]}" "${Q_LAY[@]}" ${LAYER_ARGS:-}

if [ -n "${OUT:-}" ]; then
  files=()
  for f in "$RES"/linear-*.json "$RES"/linear-*.md "$RES"/profile-backward-*.json "$RES"/profile-backward-*.md \
           "$RES"/layer-*.json "$RES"/layer-*.md; do
    [ -f "$f" ] || continue
    case "$f" in *-cpu.*) [ ${#SMOKE[@]} -gt 0 ] || continue ;; esac
    files+=("$(basename "$f")")
  done
  if [ ${#files[@]} -gt 0 ]; then
    tar -C "$RES" -czf "$OUT/bench-results.tgz" "${files[@]}"
    for f in "${files[@]}"; do case "$f" in *.md) cp "$RES/$f" "$OUT/" ;; esac; done
  fi
  echo "== in \$OUT:" "$OUT"/*
fi
echo "== done in $(( $(date +%s) - START )) s, status $status"
exit $status
