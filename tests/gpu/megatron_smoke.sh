#!/usr/bin/env bash
# Tiny-GPT smoke run of `python -m megatron_mxfp4.pretrain_gpt` on the visible GPUs (TP = GPU count),
# in each arm, through configs/pretrain_gpt.sh (MODEL=tiny: 4 layers, hidden 512, seq 512, mock data).
#
#   tests/gpu/megatron_smoke.sh OUT_DIR [arm ...]      (default arms: bf16 mxfp4 mxfp4_fp8)
#
# Arms run concurrently (they are tiny); each writes OUT_DIR/smoke_<arm>.log, and
# OUT_DIR/megatron_smoke.json holds the exact commands, the device and the loss at every logged step.
# megatron-core 0.19.2 must be importable. Keeps NCCL's NVLink multicast off (NCCL_NVLS_ENABLE=0).
set -uo pipefail
HERE=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${1:?usage: megatron_smoke.sh OUT_DIR [arm ...]}; shift
ARMS=("$@"); [ ${#ARMS[@]} -gt 0 ] || ARMS=(bf16 mxfp4 mxfp4_fp8)
mkdir -p "$OUT"
CMDS=$(mktemp -d)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
NGPU=${NGPU:-$(python3 -c "import torch; print(torch.cuda.device_count())")}
ITERS=${ITERS:-30}
COMMON_ENV=(MODEL=tiny GPUS_PER_NODE=$NGPU TP=$NGPU TRAIN_ITERS=$ITERS LOG_INTERVAL=${LOG_INTERVAL:-5}
            EVAL_ITERS=0 EVAL_INTERVAL=100000 TRANSFORMER_IMPL=local VOCAB_SIZE=4096)
pids=(); port=${PORT_BASE:-29500}
for arm in "${ARMS[@]}"; do
  port=$((port + 7))
  backend_args=""
  case "$arm" in *_ref) backend_args="--mxfp4-backend reference"; real=${arm%_ref} ;; *) real=$arm ;; esac
  env "${COMMON_ENV[@]}" ARM=$real MASTER_PORT=$port MXFP4_ARGS="$backend_args" DRY_RUN=1 \
      bash "$HERE/configs/pretrain_gpt.sh" --seed 1234 > "$CMDS/cmd_$arm.txt"
  ( cd "$HERE" && env "${COMMON_ENV[@]}" ARM=$real MASTER_PORT=$port MXFP4_ARGS="$backend_args" \
      timeout "${ARM_TIMEOUT:-420}" bash configs/pretrain_gpt.sh --seed 1234 ) > "$OUT/smoke_$arm.log" 2>&1 &
  pids+=($!)
done
rc=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"; r=$?
  echo "arm ${ARMS[$i]}: exit $r"
  [ $r -eq 0 ] || { rc=1; tail -n 40 "$OUT/smoke_${ARMS[$i]}.log"; }
done
python3 - "$OUT" "$CMDS" "$NGPU" "${ARMS[@]}" <<'PY'
import json, os, re, sys
import torch
out, cmds, ngpu, arms = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
pat = re.compile(r"iteration\s+(\d+)/\s*(\d+).*?lm loss: ([0-9.Ee+-]+)")
res = {"device": f"{ngpu}x {torch.cuda.get_device_name(0)}", "torch": torch.__version__, "arms": {}}
try:
    from megatron.core import package_info
    res["megatron_core"] = package_info.__version__
except Exception as e:
    res["megatron_core"] = f"not importable: {e}"
for arm in arms:
    log = open(os.path.join(out, f"smoke_{arm}.log"), errors="replace").read()
    losses = {int(m.group(1)): float(m.group(3)) for m in pat.finditer(log)}
    tput = re.findall(r"throughput per GPU \(TFLOP/s/GPU\): ([0-9.]+)", log)
    elapsed = re.findall(r"elapsed time per iteration \(ms\): ([0-9.]+)", log)
    cmd = open(os.path.join(cmds, f"cmd_{arm}.txt")).read().strip()
    res["arms"][arm] = {"command": "CUDA_DEVICE_MAX_CONNECTIONS=1 NCCL_NVLS_ENABLE=0 PYTHONPATH=. " + cmd,
                        "loss": losses, "last_step": max(losses) if losses else None,
                        "last_loss": losses[max(losses)] if losses else None,
                        "ms_per_iter": [float(x) for x in elapsed], "tflops_per_gpu": [float(x) for x in tput],
                        "mxfp4_line": next((l for l in log.splitlines() if "megatron_mxfp4:" in l), None)}
    print(f"{arm:10s} step {res['arms'][arm]['last_step']}: lm loss {res['arms'][arm]['last_loss']}")
json.dump(res, open(os.path.join(out, "megatron_smoke.json"), "w"), indent=1)
PY
exit $rc
