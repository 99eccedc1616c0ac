"""Helpers of the training tests (a module name of its own: several conftest.py files exist)."""
import os
import sys

# a very small GPT (all reduction dims are multiples of 64: MXFP4 with g = 64 applies everywhere)
SMALL = ["--layers", "1", "--hidden", "64", "--heads", "2", "--ffn", "256", "--seq-length", "64",
         "--global-batch", "4", "--micro-batch", "2", "--eval-samples", "4", "--log-interval", "1", "--threads", "2",
         "--no-progress"]


def run_cli(args, cwd=None, timeout=600):
    """mxfp4-train in a fresh process (for hard stops); returns the CompletedProcess."""
    import subprocess

    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "megatron_mxfp4.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
