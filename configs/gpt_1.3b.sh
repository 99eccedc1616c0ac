#!/usr/bin/env bash
# GPT 1.3b with the paper's hyperparameters; choose the arm with ARM=bf16|te_fp8|mxfp4|mxfp4_fp8.
# Single node: ARM=mxfp4 configs/gpt_1.3b.sh
# Multi-node (run on every node): NNODES=2 NODE_RANK=$i MASTER_ADDR=<node 0 address> ARM=mxfp4 configs/gpt_1.3b.sh
# See pretrain_gpt.sh for every knob.
MODEL=1.3b exec "$(dirname "$0")/pretrain_gpt.sh" "$@"
