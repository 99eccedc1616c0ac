#!/usr/bin/env bash
# The convergence study on GPUs (docs/convergence.md). One call trains for at most LIMIT seconds
# on every visible GPU (one mxfp4-train process per GPU, the (arm, seed) jobs sharded across them),
# resuming whatever earlier calls left in $RUN, then writes the report and packs the metrics into
# $OUT/convergence.tgz (when $OUT is set). Run it again until it prints "all runs finished".
#
#   bash bench/convergence.sh [LIMIT_SECONDS]        (default 540)
#
# Environment: ARMS, SEEDS, PRESET (small), DATA (.study/wiki; empty: the preset's built-in corpus, tokenized
# into $RUN/data once, e.g. PRESET=study DATA= reads the GPU machine's own site-packages), RUN (runs/convergence), IMPL (local),
# EXTRA (more mxfp4-train flags, e.g. "--steps 400"), PER_GPU (processes per GPU, default 1: a small
# model's MXFP4 arms leave a GPU idle while the host launches kernels, so two processes share it well).
# Carried wheels in .whl/ are installed first.
set -uo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
LIMIT=${1:-540}
PY=${PYTHON:-python3}
ARMS=${ARMS:-bf16,mxfp4,mxfp4-sr,mxfp4-rht,mxfp4-rht-sr,mxfp4-dethad,mxfp4-rht-sr-fp8fwd,te-fp8}
SEEDS=${SEEDS:-1,2}
PRESET=${PRESET:-small}
DATA=${DATA-.study/wiki}
RUN=${RUN:-runs/convergence}
IMPL=${IMPL:-local}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
if ! ls megatron_mxfp4/_mxfp4_cuda*.so >/dev/null 2>&1; then
  echo "== building the CUDA extension (sm_90a)"
  MXFP4_BUILD_EXT=1 MXFP4_CUDA_ARCHS=${MXFP4_CUDA_ARCHS:-90a} MAX_JOBS=$(nproc) $PY setup.py -q build_ext --inplace \
    || echo "CUDA extension build failed: the MXFP4 arms use the other backends"
fi
if [[ ",$ARMS," == *",te-fp8,"* ]] && ! $PY -c "import transformer_engine.pytorch" >/dev/null 2>&1; then
  ARMS=$(echo ",$ARMS," | sed 's/,te-fp8,/,/; s/^,//; s/,$//')
  echo "Transformer Engine is not installed here: te-fp8 left out"
fi
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
[ "$NGPU" -ge 1 ] || { echo "no GPU visible"; exit 1; }
mkdir -p "$RUN"
left=$((LIMIT - ($(date +%s) - t0) - 30))   # 30 s for the report and the archive
[ "$left" -gt 60 ] || { echo "too little time left ($left s)"; exit 1; }
NPROC=$((NGPU * ${PER_GPU:-1}))
echo "== training on $NGPU GPU(s), $NPROC process(es), at most $left s: arms $ARMS, seeds $SEEDS, preset $PRESET"
pids=()
for i in $(seq 0 $((NPROC - 1))); do
  CUDA_VISIBLE_DEVICES=$((i % NGPU)) $PY -m megatron_mxfp4.train --preset "$PRESET" ${DATA:+--data-path "$DATA"} --arms "$ARMS" \
    --seeds "$SEEDS" --out "$RUN" --shard "$i/$NPROC" --transformer-impl "$IMPL" --time-limit "$left" \
    --no-progress ${EXTRA:-} > "$RUN/gpu$i.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"; rc=$?
  echo "== process $i (GPU $((i % NGPU))): exit $rc ($( [ $rc = 0 ] && echo finished || { [ $rc = 3 ] && echo 'time limit: call again' || echo FAILED; }))"
  grep -v -i "warn" "$RUN/gpu$i.log" | tail -n 6
  [ $rc = 0 ] || status=$rc
done
$PY -m megatron_mxfp4.train --report-only --out "$RUN" || true
[ $status = 0 ] && echo "all runs finished"
if [ -n "${OUT:-}" ]; then
  (cd "$RUN" && find . -maxdepth 2 \( -name metrics.jsonl -o -name done.json -o -name config.json -o -name 'summary.*' \
     -o -name loss.png -o -name diagnostics.jsonl -o -name 'gpu*.log' \) -print0 | tar czf "$OUT/convergence.tgz" --null -T -)
  ls -la "$OUT"
fi
exit $status
