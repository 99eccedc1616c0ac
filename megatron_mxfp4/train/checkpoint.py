"""Resumable checkpoints of one arm: model, optimizer (FP32 masters + Adam moments), random
generators and the MXFP4 layers' call counters (their Philox offsets), so that a run killed after
a checkpoint continues with the same loss trajectory.

Layout: ``ckpt/iter_0000100/tp00.pt`` (one file per tensor-parallel rank, written by data-parallel
rank 0) and ``ckpt/latest`` (the step of the newest complete checkpoint, written last).
Resuming needs the same tensor-parallel size.

A checkpoint holds tensors, numbers, strings, None and plain containers only, and is read back with
torch's weights-only unpickler, whose allowlist is exactly that: loading one runs no pickled code,
and a file that holds anything else is refused.
"""
from __future__ import annotations

import os
import pickle
import re
import shutil
from typing import Optional

import torch

from ..backward import calls_made, set_calls
from .errors import UsageError

KEEP = 2


def ckpt_dir(run_dir: str, step: int) -> str:
    """The folder of the checkpoint saved after `step`."""
    return os.path.join(run_dir, "ckpt", f"iter_{step:07d}")


def latest_step(run_dir: str) -> Optional[int]:
    path = os.path.join(run_dir, "ckpt", "latest")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    return int(text) if text else None


def mxfp4_counters(model) -> dict:
    """Call counters of the MXFP4 layers (they key the random streams), by module name."""
    return {n: calls_made(m) for n, m in model.named_modules() if hasattr(m, "_mxfp4_calls")}


def set_mxfp4_counters(model, counters: dict) -> None:
    modules = {n: m for n, m in model.named_modules() if hasattr(m, "_mxfp4_calls")}
    if set(modules) != set(counters):
        raise RuntimeError("checkpoint does not match the model's MXFP4 layers (different arm or model?): "
                           f"{sorted(set(modules) ^ set(counters))[:4]}")
    for n, m in modules.items():
        set_calls(m, counters[n])


def rng_state() -> dict:
    from megatron.core.tensor_parallel import random as tp_random

    st = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state()
    tracker = tp_random.get_cuda_rng_tracker()
    try:
        st["tracker"] = {k: v.clone() if torch.is_tensor(v) else v for k, v in tracker.get_states().items()}
    except Exception:  # the CPU ("inference") tracker has no states
        st["tracker"] = None
    return st


def set_rng_state(st: dict) -> None:
    from megatron.core.tensor_parallel import random as tp_random

    torch.set_rng_state(st["cpu"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])
    if st.get("tracker"):
        tp_random.get_cuda_rng_tracker().set_states(st["tracker"])


def save(run_dir: str, step: int, gpt, optimizer, dist, extra: dict) -> None:
    d = ckpt_dir(run_dir, step)
    if dist.dp_rank == 0:
        os.makedirs(d, exist_ok=True)
        state = {"step": step, "model": gpt.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_state(),
                 "mxfp4_counters": mxfp4_counters(gpt), "tp": dist.tp, **extra}
        tmp = os.path.join(d, f"tp{dist.tp_rank:02d}.pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, os.path.join(d, f"tp{dist.tp_rank:02d}.pt"))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if dist.rank == 0:
        tmp = os.path.join(run_dir, "ckpt", "latest.tmp")
        with open(tmp, "w") as f:
            f.write(f"{step}\n")
        os.replace(tmp, os.path.join(run_dir, "ckpt", "latest"))
        _prune(run_dir, step)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _prune(run_dir: str, newest: int, keep: int = KEEP) -> None:
    root = os.path.join(run_dir, "ckpt")
    steps = sorted(int(n[5:]) for n in os.listdir(root) if n.startswith("iter_") and n[5:].isdigit())
    for s in steps:
        if s != newest and s not in steps[-keep:]:
            shutil.rmtree(ckpt_dir(run_dir, s), ignore_errors=True)


def keep_only_latest(run_dir: str) -> None:
    """A finished run keeps its final checkpoint only."""
    step = latest_step(run_dir)
    if step is not None:
        _prune(run_dir, step, keep=1)


def read(path: str) -> dict:
    """The state in a checkpoint file, on the CPU; UsageError when the file holds anything but
    tensors and plain values (its pickle could run code: it is not unpickled)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"a reference to {found.group(1)}" if found else "pickle instructions"
        raise UsageError(f"refusing to load checkpoint {path}: it holds {what}, which a run state never does, and "
                         "unpickling it could run code; delete it, or the arm's folder, to train that arm afresh") \
            from None


def load(run_dir: str, step: int, gpt, optimizer, dist) -> dict:
    path = os.path.join(ckpt_dir(run_dir, step), f"tp{dist.tp_rank:02d}.pt")
    if not os.path.exists(path):
        raise UsageError(f"checkpoint {path} is missing (resuming needs the same --tp as the run that saved it)")
    state = read(path)
    if state.get("tp", 1) != dist.tp:
        raise UsageError(f"checkpoint {path} was saved with --tp {state.get('tp')}; this run has --tp {dist.tp}")
    gpt.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    set_mxfp4_counters(gpt, state["mxfp4_counters"])
    set_rng_state(state["rng"])
    return state
