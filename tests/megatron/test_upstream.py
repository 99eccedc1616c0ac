"""Megatron-LM's own unit tests of the layers the plugin replaces, run with the MXFP4 linears swapped in.

Set MEGATRON_LM_TESTS to a Megatron-LM checkout whose `tests/` matches the installed megatron-core (the
`core_v0.19.0` tag for 0.19.x); skipped otherwise. The selected files run twice, each run one pytest
subprocess through upstream_plugin.py (which describes the stand-ins installed in both): a stock control
run, and a run where every ColumnParallelLinear / RowParallelLinear is an MXFP4 layer with the default
recipe. Every test must end the same way in both (same outcome; same message when it fails), except the
EXPECTED_DIFFERENCES, each with its reason. `pytest -s` prints the per-test table.

On a CPU-only machine without Transformer Engine (core_v0.19.0 tests, megatron-core 0.19.2), of 205 tests
54 pass in both runs (MLP, attention, transformer layer and block constructors and forwards at their own
sizes: hidden 12 / 128, 32 x 2 tokens, with MXFP4 layers built in the swapped run), 33 are skipped in both
(they ask for CUDA or Transformer Engine), 117 fail or error alike in both for the machine's reasons (one
process, where they need 4-8 ranks; CUDA streams, `device="cuda"` tensors, CUDA-device asserts; TE-only
options such as fused RoPE; parameter counts and checkpoint keys of TE's fused-LayerNorm linears), and
`test_chunked_mlp` is the expected difference. models/test_gpt_model.py imports Transformer Engine at
module level and is not collected; worker.py's `gpt_unit_test_sizes` builds its model with the MXFP4 spec.
"""
import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("megatron.core")

from dist_helpers import free_port  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
UPSTREAM = os.environ.get("MEGATRON_LM_TESTS") and os.path.abspath(os.environ["MEGATRON_LM_TESTS"])

FILES = (
    "tests/unit_tests/tensor_parallel/test_layers.py",
    "tests/unit_tests/tensor_parallel/test_initialization.py",
    "tests/unit_tests/tensor_parallel/test_tp_attrs_without_init.py",
    "tests/unit_tests/transformer/test_mlp.py",
    "tests/unit_tests/transformer/test_attention.py",
    "tests/unit_tests/transformer/test_transformer_layer.py",
    "tests/unit_tests/transformer/test_transformer_block.py",
    "tests/unit_tests/models/test_gpt_model.py",
)

_CORRECTNESS = ("compares the input gradient of a TP/CP-sharded attention with that of an unsharded one at "
                "atol = rtol = 1e-2; with MXFP4 each run rounds with its own random bits (SR, per-call RHT "
                "signs), an error of ~10% of the gradient: unbiased, not equal")
# node id, or node-id prefix ending in "[" (all parametrizations) -> why the MXFP4 run may end differently
EXPECTED_DIFFERENCES = {
    "tests/unit_tests/transformer/test_transformer_layer.py::TestParallelTransformerLayer::test_chunked_mlp":
        "compares the parameter gradients of the MLP run in 1 and in 4 token chunks at atol 1e-6; MXFP4 draws "
        "fresh random bits for every call, and chunking changes the wgrad reduction (64 vs 16 tokens)",
    "tests/unit_tests/transformer/test_attention.py::test_parallel_attention_correctness[": _CORRECTNESS,
    "tests/unit_tests/transformer/test_attention.py::test_parallel_attention_correctness_num_query_groups_less_"
    "than_tp_size[": _CORRECTNESS,
}


def _runs(out) -> tuple:
    """(stock report, MXFP4 report), one run after the other."""
    ini = out / "pytest.ini"
    ini.write_text("[pytest]\n")  # not Megatron-LM's pytest options
    # --import-mode=append and a cwd outside the checkout: `megatron` is the installed megatron-core,
    # never the checkout's sources; `tests` is the checkout's package
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "upstream_plugin",
           "--import-mode=append", "--continue-on-collection-errors", "-c", str(ini), "--rootdir", UPSTREAM,
           *(os.path.join(UPSTREAM, f) for f in FILES)]
    reports = []
    for name in ("stock", "mxfp4"):
        report = out / f"{name}.json"
        env = dict(os.environ, MXFP4_UPSTREAM_SWAP=str(int(name == "mxfp4")), MXFP4_UPSTREAM_REPORT=str(report),
                   PYTHONPATH=os.pathsep.join(p for p in (REPO, HERE, os.environ.get("PYTHONPATH")) if p),
                   OMP_NUM_THREADS="1", WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(free_port()))
        try:
            proc = subprocess.run(cmd, cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=1200)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"the {name} run of Megatron-LM's tests timed out:\n{(e.output or '')[-6000:]}")
        if not report.exists():
            pytest.fail(f"the {name} run of Megatron-LM's tests wrote no report (rc {proc.returncode}):\n"
                        f"{proc.stdout[-6000:]}")
        with open(report) as f:
            reports.append(json.load(f))
    return tuple(reports)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not UPSTREAM:
        pytest.skip("set MEGATRON_LM_TESTS to a Megatron-LM checkout to run its unit tests with the MXFP4 layers")
    missing = [f for f in FILES if not os.path.exists(os.path.join(UPSTREAM, f))]
    if missing:
        pytest.skip(f"MEGATRON_LM_TESTS={UPSTREAM} lacks {missing}")
    return _runs(tmp_path_factory.mktemp("upstream"))


def _expected(nodeid: str):
    return next((why for key, why in EXPECTED_DIFFERENCES.items()
                 if nodeid == key or (key.endswith("[") and nodeid.startswith(key))), None)


def _ending(r) -> tuple:
    if r is None:
        return ("missing", "")
    message = re.sub(r"0x[0-9a-f]+", "0x?", r["message"]) if r["outcome"] in ("failed", "error") else ""
    return r["outcome"], message


@pytest.mark.parametrize("path", FILES)
def test_same_outcome_with_mxfp4_layers(runs, path):
    stock, mxfp4 = runs
    ids = sorted(i for i in set(stock) | set(mxfp4) if i == path or i.startswith(path + "::"))
    assert ids, f"no test of {path} was collected"
    unexpected = []
    print(f"\n{path}")
    for i in ids:
        s, m = stock.get(i), mxfp4.get(i)
        same = _ending(s) == _ending(m)
        why = None if same else _expected(i)
        if not same and why is None:
            unexpected.append(f"{i}: stock {_ending(s)}, MXFP4 {_ending(m)}")
        layers = (m or {}).get("mxfp4_layers", 0)
        note = f"  [{(s or {}).get('message', '')[:100]}]" if s and s["outcome"] != "passed" else ""
        print(f"  {i.partition('::')[2] or '(module)'}: stock {_ending(s)[0]}, MXFP4 {_ending(m)[0]} ({layers} MXFP4 layers, "
              f"{(m or {}).get('mxfp4_backward', 0)} backward GEMMs){note}"
              + ("" if same else f" EXPECTED: {why}" if why else " UNEXPECTED"))
    assert not unexpected, "\n".join(unexpected)


def test_mxfp4_layers_were_used(runs):
    """The swap took effect: tests that passed built MXFP4 layers, and their backward GEMMs ran."""
    _, mxfp4 = runs
    assert sum(r.get("mxfp4_layers", 0) for r in mxfp4.values() if r["outcome"] == "passed") > 0
    assert sum(r.get("mxfp4_backward", 0) for r in mxfp4.values()) > 0
