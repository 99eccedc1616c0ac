import os
import sys

import pytest
import torch


@pytest.fixture(scope="module")
def megatron_cpu():
    """megatron-core on the CPU in this process (what `mxfp4-train --device cpu` sets up), torn
    down afterwards: parallel state, process group and the torch.cuda shims."""
    saved = {k: getattr(torch.cuda, k) for k in ("current_device", "current_stream")}
    from megatron_mxfp4.train.model import import_megatron

    import_megatron()
    yield
    import megatron.core.parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for k, v in saved.items():
        setattr(torch.cuda, k, v)


def run_cli(args, cwd=None, timeout=600):
    """mxfp4-train in a fresh process (for hard stops); returns the CompletedProcess."""
    import subprocess

    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "megatron_mxfp4.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
