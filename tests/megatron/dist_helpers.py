"""Helpers for the Megatron tests: CPU shims, process groups, tiny models (used by worker.py).

megatron-core 0.19 allocates a few buffers with `torch.cuda.current_device()`, waits on
`torch.cuda.current_stream()` in DDP's grad sync, and seeds its RNG tracker with CUDA. On CPU:
`current_device` returns the CPU device, `current_stream` is a no-op stream, and the RNG tracker is
created in "inference" mode (its forks are no-ops, dropout uses PyTorch's default generator).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from contextlib import contextmanager

import torch

from megatron_mxfp4._cpu_shims import install_cpu_shims  # noqa: F401  (used by the workers)


def init_process_group() -> None:
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group(backend=backend)


@contextmanager
def model_parallel(tp: int, ep: int = 1, etp=None):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as tp_random

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                                 expert_tensor_parallel_size=etp)
    tp_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    try:
        yield
    finally:
        ps.destroy_model_parallel()


def parse_entry_args(entry, argv):
    """The entry point's parsed arguments for `argv` (Megatron's parser reads sys.argv)."""
    old = sys.argv
    sys.argv = ["pretrain_gpt"] + list(argv)
    try:
        return entry.parse_args()
    finally:
        sys.argv = old


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, args, nproc: int = 2, timeout: float = 900, env_extra=None):
    """Run `script` in `nproc` processes (a torchrun-like environment) and wait; returns the
    list of (returncode, output)."""
    port = free_port()
    procs = []
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", CUDA_DEVICE_MAX_CONNECTIONS="1", PYTHONUNBUFFERED="1",
                   PYTHONWARNINGS="ignore")
        env.update(env_extra or {})
        procs.append(subprocess.Popen([sys.executable, script, *args], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    out = []
    for p in procs:
        try:
            o, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            o, _ = p.communicate()
            o += "\n[killed: timeout]"
        out.append((p.returncode, o))
    return out


def tiny_config(tp=1, sp=False, fusion=False, layers=2, dtype=torch.float32, dropout=0.0, hidden=64,
                ffn=256, heads=4, bias=True, **kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads, ffn_hidden_size=ffn,
        tensor_model_parallel_size=tp, sequence_parallel=sp, use_cpu_initialization=True,
        perform_initialization=True, params_dtype=dtype, bf16=dtype == torch.bfloat16,
        gradient_accumulation_fusion=fusion, hidden_dropout=dropout, attention_dropout=dropout,
        bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, add_bias_linear=bias, **kw)


def tiny_moe_config(tp=1, ep=1, etp=None, sp=False, experts=4, topk=2, shared=128, **kw):
    """A tiny MoE config: `experts` routed experts (top-`topk`), a shared expert of width `shared`
    (0 = none), the allgather token dispatcher (the alltoall one creates CUDA streams)."""
    return tiny_config(tp=tp, sp=sp, ffn=128, bias=False, expert_model_parallel_size=ep,
                       expert_tensor_parallel_size=etp, num_moe_experts=experts,
                       moe_router_topk=topk, moe_token_dispatcher_type="allgather",
                       moe_shared_expert_intermediate_size=shared or None, **kw)


def tiny_gpt(config, spec, vocab=128, seq=32):
    from megatron.core.models.gpt import GPTModel

    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=vocab, max_sequence_length=seq,
                    position_embedding_type="rope")


def gpt_batch(batch=2, seq=32, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    pos = torch.arange(seq).unsqueeze(0).expand(batch, seq)
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1).view(1, 1, seq, seq).expand(batch, 1, seq, seq)
    return tokens, pos, mask, labels


def gpt_loss(model, batch):
    tokens, pos, mask, labels = batch
    losses = model(tokens, pos, mask, labels=labels)
    return losses.float().mean()


def scenario(results, name):
    """The metrics of one worker scenario; fails the test with its traceback if it raised."""
    import pytest

    r = results[name]
    if "error" in r:
        pytest.fail(f"scenario {name} raised:\n{r['error']}")
    return r
