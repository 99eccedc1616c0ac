"""pytest plugin: run Megatron-LM's own unit tests against the installed megatron-core, optionally with
the MXFP4 linears in place of megatron-core's. test_upstream.py loads it (`-p upstream_plugin`) in a
subprocess, once for a stock control run and once swapped, and compares the two.

Environment:
  MXFP4_UPSTREAM_SWAP=1      every `ColumnParallelLinear` / `RowParallelLinear` megatron-core builds (the
                             LM head included) is an MXFP4 layer with the default recipe (SR, RHT g = 64)
  MXFP4_UPSTREAM_REPORT=...  where to write {nodeid: {outcome, message, mxfp4_layers, mxfp4_backward}}

The same stand-ins are installed in both runs, so that any difference between them is the plugin's:
- without Transformer Engine, its GPT layer submodules (what most of these tests build) are megatron-core's
  local ones, with the arguments the local spec takes;
- without a GPU: megatron-core's CPU shims (`megatron_mxfp4._cpu_shims`), an RNG tracker in inference mode
  (CUDA RNG states do not exist), gloo for NCCL, `torch.cuda.set_device` / `synchronize` as no-ops and one
  "device" for the rank arithmetic, and `.cuda()` of tensors and modules returning them unchanged (so a test
  that builds on the CPU and moves to the GPU runs on the CPU; one that asserts a CUDA device fails in both
  runs alike);
- Megatron-LM's test-data download (a session fixture of its conftest) is not attempted.
"""
from __future__ import annotations

import inspect
import json
import os
import sys
import types
import weakref

import pytest
import torch

from megatron_mxfp4._cpu_shims import install_cpu_shims
from megatron_mxfp4.megatron._compat import shim_typing_override

SWAP = os.environ.get("MXFP4_UPSTREAM_SWAP") == "1"
REPORT = os.environ.get("MXFP4_UPSTREAM_REPORT")
_results: dict = {}
_layers: "weakref.WeakSet" = weakref.WeakSet()
_backward_calls = [0]


def _install_cpu_stand_ins() -> None:
    install_cpu_shims()
    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.device_count = lambda: 1
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    init_process_group = torch.distributed.init_process_group

    def gloo_process_group(*args, backend=None, **kwargs):
        return init_process_group(*args, backend="gloo" if backend in (None, "nccl") else backend, **kwargs)

    torch.distributed.init_process_group = gloo_process_group

    from megatron.core.tensor_parallel import random as tp_random

    initialize_rng_tracker = tp_random.initialize_rng_tracker

    def inference_rng_tracker(use_te_rng_tracker=False, inference_rng_tracker=False, use_cudagraphable_rng=False,
                              force_reset=False):
        initialize_rng_tracker(use_te_rng_tracker, True, use_cudagraphable_rng, force_reset)

    tp_random.initialize_rng_tracker = inference_rng_tracker


def _local_stand_in_for_te():
    """megatron-core's local GPT layer submodules, called with the TE function's arguments it takes."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    te_fn, local_fn = specs.get_gpt_layer_with_transformer_engine_submodules, specs.get_gpt_layer_local_submodules
    te_sig, local_params = inspect.signature(te_fn), inspect.signature(local_fn).parameters

    def get_gpt_layer_with_transformer_engine_submodules(*args, **kwargs):
        bound = te_sig.bind(*args, **kwargs).arguments
        return local_fn(**{k: v for k, v in bound.items() if k in local_params})

    return te_fn, get_gpt_layer_with_transformer_engine_submodules


def _swap_linears() -> None:
    """Make `ColumnParallelLinear(...)` / `RowParallelLinear(...)` build MXFP4 subclasses with the default
    recipe, wherever megatron-core or a test calls them. Through `__new__`, not by rebinding the names:
    megatron-core's own `super(ColumnParallelLinear, self)` must keep finding the stock class."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    import megatron_mxfp4.backward as bwd
    from megatron_mxfp4 import MXFP4Recipe
    from megatron_mxfp4.megatron import MXFP4ColumnParallelLinear, MXFP4RowParallelLinear

    for name in ("grad_input", "grad_weight"):  # count the backward GEMMs the swapped layers run
        fn = getattr(bwd, name)

        def counted(*args, _fn=fn, **kwargs):
            _backward_calls[0] += 1
            return _fn(*args, **kwargs)

        setattr(bwd, name, counted)

    def with_default_recipe(cls):
        def __init__(self, *args, recipe=MXFP4Recipe(), **kwargs):
            cls.__init__(self, *args, recipe=recipe, **kwargs)
            _layers.add(self)

        return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": __name__})

    swapped = {ColumnParallelLinear: with_default_recipe(MXFP4ColumnParallelLinear),
               RowParallelLinear: with_default_recipe(MXFP4RowParallelLinear)}

    def __new__(cls, *args, **kwargs):
        return object.__new__(swapped.get(cls, cls))

    for stock in swapped:
        stock.__new__ = staticmethod(__new__)


def _rebind(old, new) -> None:
    """Replace `old` by `new` wherever a loaded megatron module holds it (modules imported later take it
    from the patched defining module)."""
    for mod_name, mod in list(sys.modules.items()):
        if mod_name.startswith("megatron.") and isinstance(mod, types.ModuleType):
            for attr, value in list(vars(mod).items()):
                if value is old:
                    setattr(mod, attr, new)


def _setup() -> None:
    shim_typing_override()
    if not torch.cuda.is_available():
        _install_cpu_stand_ins()
    # Megatron-LM's conftest imports its downloader (which needs `requests`) to fetch data these tests do not read
    stub = types.ModuleType("tests.test_utils.python_scripts.download_unit_tests_dataset")

    def download_and_extract_asset(assets_dir):
        raise RuntimeError("not downloaded by this harness")

    stub.download_and_extract_asset = download_and_extract_asset
    sys.modules[stub.__name__] = stub

    import megatron.core

    checkout = os.environ.get("MEGATRON_LM_TESTS")
    if checkout and os.path.abspath(megatron.core.__file__).startswith(os.path.abspath(checkout) + os.sep):
        raise RuntimeError(f"megatron.core was imported from the checkout {checkout}, not the installed megatron-core")
    from megatron.core.extensions.transformer_engine import HAVE_TE

    if not HAVE_TE:
        _rebind(*_local_stand_in_for_te())
    if SWAP:
        _swap_linears()
    print(f"upstream_plugin: megatron-core {megatron.core.__version__} at {os.path.dirname(megatron.core.__file__)}; "
          f"{'MXFP4 linears' if SWAP else 'stock linears'}; Transformer Engine {'present' if HAVE_TE else 'absent'}")


_setup()


def _message(report) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    return crash.message if crash is not None else str(report.longrepr).strip().splitlines()[-1]


def pytest_collectreport(report):
    if report.failed:  # a module that cannot be imported here (run with --continue-on-collection-errors)
        _results[report.nodeid] = {"outcome": "error", "message": _message(report)}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _layers.clear()
    _backward_calls[0] = 0


def pytest_runtest_logreport(report):
    r = _results.setdefault(report.nodeid, {"outcome": "passed", "message": ""})
    if report.failed and r["outcome"] == "passed":
        r["outcome"] = "failed" if report.when == "call" else "error"
        r["message"] = _message(report)
    elif report.skipped and r["outcome"] == "passed":
        r["outcome"] = "skipped"
        r["message"] = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if report.when == "teardown":
        r["mxfp4_layers"] = len(_layers)
        r["mxfp4_backward"] = _backward_calls[0]


def pytest_sessionfinish(session, exitstatus):
    if REPORT:
        with open(REPORT, "w") as f:
            json.dump(_results, f, indent=1)
