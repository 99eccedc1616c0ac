#!/usr/bin/env bash
# GPT pretraining launcher: one script, one variable per choice.
#
#   MODEL=345m|1.3b|6.7b|tiny   model + the paper's hyperparameters (tiny: a smoke test)
#   ARM=bf16                    stock Megatron, BF16
#   ARM=te_fp8                  Transformer Engine FP8 (E4M3, tensorwise current scaling)
#   ARM=mxfp4                   --mxfp4-backward, BF16 forward
#   ARM=mxfp4_fp8               --mxfp4-backward, FP8 (E4M3, current scaling) forward
#
# Single node:   ARM=mxfp4 MODEL=345m configs/pretrain_gpt.sh [extra Megatron args]
# Multi-node:    NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<node 0> ARM=... MODEL=... configs/pretrain_gpt.sh
# SLURM:         sbatch configs/slurm_gpt.sbatch (sets NNODES/NODE_RANK/MASTER_ADDR per node)
#
# Data: DATA_PATH=<prefix of a .bin/.idx pair> with VOCAB_FILE/MERGE_FILE (GPT-2 BPE); without
# DATA_PATH, Megatron's mock data and a null tokenizer are used.
# Other knobs (env): GPUS_PER_NODE, MASTER_PORT, TP, PP, SP=1, TRAIN_ITERS, LR_DECAY_ITERS,
# GLOBAL_BATCH, MICRO_BATCH, TRANSFORMER_IMPL (local|transformer_engine; default: TE when importable),
# MXFP4_ARGS (extra --mxfp4-* flags), CKPT_DIR, LOG_DIR, PYTHON, DRY_RUN=1 (print the command only).
# Arguments after the script name are passed to Megatron unchanged (they override the presets).
set -euo pipefail

MODEL=${MODEL:-345m}
ARM=${ARM:-bf16}
PYTHON=${PYTHON:-python3}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}

# ---- model presets (paper §4.1: GPT-3-style, learned absolute positions, LayerNorm, GeLU, tied
# embeddings, dropout 0.1, cosine schedule with 1% warmup, grad clip 1.0)
case "$MODEL" in
  345m) L=24; H=1024; A=16; S=1024; GBS=64;   MBS=8; LR=1.5e-4; MINLR=1e-5;   WD=0.01; ITERS=500000; DECAY=320000; TP_DEF=1 ;;
  1.3b) L=24; H=2048; A=16; S=2048; GBS=1024; MBS=4; LR=2e-4;   MINLR=2e-5;   WD=0.1;  ITERS=20000;  DECAY=20000;  TP_DEF=1 ;;
  6.7b) L=32; H=4096; A=32; S=2048; GBS=256;  MBS=4; LR=1.2e-4; MINLR=1.2e-5; WD=0.1;  ITERS=40000;  DECAY=40000;  TP_DEF=8 ;;
  tiny) L=4;  H=512;  A=8;  S=512;  GBS=16;   MBS=4; LR=1e-3;   MINLR=1e-4;   WD=0.1;  ITERS=30;     DECAY=30;     TP_DEF=1 ;;
  *) echo "pretrain_gpt.sh: unknown MODEL=$MODEL (345m, 1.3b, 6.7b, tiny)" >&2; exit 2 ;;
esac
TP=${TP:-$TP_DEF}
PP=${PP:-1}
GBS=${GLOBAL_BATCH:-$GBS}
MBS=${MICRO_BATCH:-$MBS}
ITERS=${TRAIN_ITERS:-$ITERS}
DECAY=${LR_DECAY_ITERS:-$DECAY}
if [ "$ITERS" -lt "$DECAY" ]; then DECAY=$ITERS; fi

if [ -z "${TRANSFORMER_IMPL:-}" ]; then
  if "$PYTHON" -c "import transformer_engine" >/dev/null 2>&1; then TRANSFORMER_IMPL=transformer_engine; else TRANSFORMER_IMPL=local; fi
fi

MODEL_ARGS=(--num-layers "$L" --hidden-size "$H" --num-attention-heads "$A" --seq-length "$S"
            --max-position-embeddings "$S" --position-embedding-type learned_absolute
            --attention-dropout 0.1 --hidden-dropout 0.1 --init-method-std 0.02)
TRAIN_ARGS=(--micro-batch-size "$MBS" --global-batch-size "$GBS" --train-iters "$ITERS" --lr "$LR"
            --min-lr "$MINLR" --lr-decay-style cosine --lr-decay-iters "$DECAY" --lr-warmup-fraction 0.01
            --weight-decay "$WD" --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.999 --bf16
            --use-distributed-optimizer --no-gradient-accumulation-fusion)
PAR_ARGS=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP")
if [ "${SP:-0}" = 1 ]; then PAR_ARGS+=(--sequence-parallel); fi

if [ -n "${DATA_PATH:-}" ]; then
  DATA_ARGS=(--data-path "$DATA_PATH" --split 949,50,1 --tokenizer-type GPT2BPETokenizer
             --vocab-file "${VOCAB_FILE:?set VOCAB_FILE}" --merge-file "${MERGE_FILE:?set MERGE_FILE}")
else
  DATA_ARGS=(--mock-data --tokenizer-type NullTokenizer --vocab-size "${VOCAB_SIZE:-50257}")
fi
LOG_ARGS=(--log-interval "${LOG_INTERVAL:-10}" --eval-interval "${EVAL_INTERVAL:-1000}" --eval-iters "${EVAL_ITERS:-10}"
          --log-throughput)
if [ -n "${CKPT_DIR:-}" ]; then LOG_ARGS+=(--save "$CKPT_DIR/$MODEL-$ARM" --load "$CKPT_DIR/$MODEL-$ARM" --save-interval 1000); fi
if [ -n "${LOG_DIR:-}" ]; then LOG_ARGS+=(--tensorboard-dir "$LOG_DIR/$MODEL-$ARM"); fi

# ---- the arm (the only difference between runs of an A/B)
case "$ARM" in
  bf16)      ARM_ARGS=(--transformer-impl "$TRANSFORMER_IMPL") ;;
  te_fp8)    ARM_ARGS=(--transformer-impl transformer_engine --fp8-format e4m3 --fp8-recipe tensorwise) ;;
  mxfp4)     ARM_ARGS=(--transformer-impl "$TRANSFORMER_IMPL" --mxfp4-backward --mxfp4-forward bf16) ;;
  mxfp4_fp8) ARM_ARGS=(--transformer-impl "$TRANSFORMER_IMPL" --mxfp4-backward --mxfp4-forward fp8) ;;
  *) echo "pretrain_gpt.sh: unknown ARM=$ARM (bf16, te_fp8, mxfp4, mxfp4_fp8)" >&2; exit 2 ;;
esac
# megatron-core's local spec without apex: torch LayerNorm (no persistent LN kernel) and no fused
# masked-softmax extension
if [ "$ARM" != te_fp8 ] && [ "$TRANSFORMER_IMPL" = local ]; then
  ARM_ARGS+=(--no-persist-layer-norm --no-masked-softmax-fusion)
fi
case "$ARM" in mxfp4*) if [ -n "${MXFP4_ARGS:-}" ]; then read -r -a EXTRA_MX <<< "$MXFP4_ARGS"; ARM_ARGS+=("${EXTRA_MX[@]}"); fi ;; esac

export CUDA_DEVICE_MAX_CONNECTIONS=1
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
LAUNCH=("$PYTHON" -m torch.distributed.run --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK"
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m megatron_mxfp4.pretrain_gpt)
CMD=("${LAUNCH[@]}" "${MODEL_ARGS[@]}" "${TRAIN_ARGS[@]}" "${PAR_ARGS[@]}" "${DATA_ARGS[@]}" "${LOG_ARGS[@]}"
     "${ARM_ARGS[@]}" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
exec "${CMD[@]}"
