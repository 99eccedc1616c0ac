"""Megatron integration tests: skipped when megatron-core (and triton, which it imports) is absent.

The distributed scenarios run once per pytest run in 2 processes (gloo on CPU) through worker.py
(`mcore_results`) and moe_worker.py (`moe_results`); the fixtures hold their metrics and each test
asserts on its own scenario.
"""
import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def megatron_available() -> bool:
    try:
        import megatron.core  # noqa: F401
    except Exception:
        return False
    return True


def _run_worker(tmp_path_factory, script):
    if not megatron_available():
        pytest.skip("megatron-core is not installed")
    sys.path.insert(0, HERE)
    import dist_helpers

    out = tmp_path_factory.mktemp(os.path.splitext(script)[0])
    env = {"MXFP4_TEST_CKPT_DIR": str(out / "ckpt")}
    runs = dist_helpers.launch(os.path.join(HERE, script), [str(out)], nproc=2, timeout=900, env_extra=env)
    path = out / "results.json"
    if not path.exists():
        logs = "\n\n".join(f"--- rank {i} (rc {rc}) ---\n{o[-6000:]}" for i, (rc, o) in enumerate(runs))
        pytest.fail(f"the 2-process Megatron worker {script} wrote no results:\n{logs}")
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def mcore_results(tmp_path_factory):
    return _run_worker(tmp_path_factory, "worker.py")


@pytest.fixture(scope="session")
def moe_results(tmp_path_factory):
    """The MoE scenarios (moe_worker.py), in their own 2-process run."""
    return _run_worker(tmp_path_factory, "moe_worker.py")
