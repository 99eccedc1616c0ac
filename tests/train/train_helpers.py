"""Helpers of the training tests (a module name of its own: several conftest.py files exist)."""
import os
import sys


def run_cli(args, cwd=None, timeout=600):
    """mxfp4-train in a fresh process (for hard stops); returns the CompletedProcess."""
    import subprocess

    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "megatron_mxfp4.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
