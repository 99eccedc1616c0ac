"""mxfp4-train's MoE presets: tiny-moe trains on the CPU with MXFP4 experts."""
import json
import os

from megatron_mxfp4.train.cli import main
from megatron_mxfp4.train.metrics import read_jsonl
from megatron_mxfp4.train.presets import PRESETS


def test_moe_presets_are_the_dense_ones_with_experts():
    for name in ("tiny", "small"):
        moe = PRESETS[name + "-moe"]
        assert (moe.experts, moe.topk) == (8, 2) and moe.ffn == PRESETS[name].ffn // 4
        assert moe.override(ffn=PRESETS[name].ffn, experts=0, topk=2) == PRESETS[name]
    # 8 experts of a quarter width: twice the MLP weights of the dense model, a router, no linear biases
    tiny, dense = PRESETS["tiny-moe"], PRESETS["tiny"]
    h = tiny.hidden
    assert tiny.params_estimate(100) - dense.params_estimate(100) == tiny.layers * (
        8 * 2 * h * 128 + 8 * h - (2 * h * 512 + 512 + h) - 4 * h)


def test_tiny_moe_trains_with_mxfp4_experts(tmp_path, megatron_cpu):
    out = str(tmp_path / "run")
    assert main(["--preset", "tiny-moe", "--arms", "bf16,mxfp4-rht-sr", "--steps", "3", "--eval-interval", "2",
                 "--eval-samples", "8", "--seq-length", "64", "--out", out, "--threads", "2", "--no-progress"]) == 0
    losses = {}
    for arm in ("bf16", "mxfp4-rht-sr"):
        rows = [r for r in read_jsonl(os.path.join(out, f"{arm}-s1", "metrics.jsonl")) if r["kind"] == "train"]
        assert len(rows) == 3
        losses[arm] = [r["loss"] for r in rows]
    assert losses["bf16"][0] == losses["mxfp4-rht-sr"][0]  # same init and batch, unquantized forward
    assert losses["bf16"][-1] != losses["mxfp4-rht-sr"][-1]  # the experts' backward differs
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["config"]["experts"] == 8
