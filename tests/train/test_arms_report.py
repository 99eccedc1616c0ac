"""Arms table, CLI validation, LR schedule and the report (no model is trained here)."""
import json
import math
import os

import pytest

from megatron_mxfp4.recipe import MXFP4Recipe
from megatron_mxfp4.train import report
from megatron_mxfp4.train.arms import ARMS, parse_arms, parse_seeds
from megatron_mxfp4.train.cli import build_parser, main, resolve_config
from megatron_mxfp4.train.optim import lr_at
from megatron_mxfp4.train.presets import PRESETS

NAMES = ["bf16", "fp8", "te-fp8", "mxfp4", "mxfp4-sr", "mxfp4-rht", "mxfp4-rht-sr", "mxfp4-rht-sr-fp8fwd",
         "mxfp4-dethad", "mxfp4-wgrad-only", "mxfp4-dgrad-only"]


def test_arms_table_maps_names_to_recipes():
    assert list(ARMS) == NAMES
    r = {n: a.recipe for n, a in ARMS.items()}
    assert r["bf16"] is None and r["te-fp8"] is None and ARMS["te-fp8"].te_fp8
    assert r["mxfp4-rht-sr"] == MXFP4Recipe()  # the paper's recipe is the default recipe
    assert (r["mxfp4"].rounding, r["mxfp4"].effective_rht_block) == ("rtn", 0)
    assert (r["mxfp4-sr"].rounding, r["mxfp4-sr"].effective_rht_block) == ("sr", 0)
    assert (r["mxfp4-rht"].rounding, r["mxfp4-rht"].rht_block) == ("rtn", 64)
    assert r["mxfp4-rht-sr-fp8fwd"].forward == "fp8" and r["mxfp4-rht-sr-fp8fwd"].rounding == "sr"
    assert r["mxfp4-dethad"].sign_policy == "deterministic" and r["mxfp4-dethad"].rounding == "rtn"
    assert (r["mxfp4-wgrad-only"].dgrad, r["mxfp4-wgrad-only"].wgrad) == (False, True)
    assert (r["mxfp4-dgrad-only"].dgrad, r["mxfp4-dgrad-only"].wgrad) == (True, False)
    assert (r["fp8"].forward, r["fp8"].backward_format) == ("fp8", "fp8")
    a = ARMS["mxfp4-rht-sr"].with_seed(7, backend="reference")
    assert a.recipe.seed == 7 and a.recipe.backend == "reference"


def test_te_fp8_arm_uses_delayed_scaling():
    """The te-fp8 arm is the FP8 baseline users run: Transformer Engine's delayed scaling (hybrid E4M3/E5M2,
    amax history 16, max), as bench/'s te_fp8_delayed; no other arm sets FP8 in megatron-core's config."""
    import torch

    from megatron_mxfp4.train.model import transformer_config

    cfg = PRESETS["tiny"]
    c = transformer_config(cfg, ARMS["te-fp8"], torch.float32, 1, False)
    assert (c.fp8, str(c.fp8_recipe).rsplit(".", 1)[-1], c.fp8_amax_history_len, c.fp8_amax_compute_algo) == \
        ("hybrid", "delayed", 16, "max")
    assert transformer_config(cfg, ARMS["bf16"], torch.float32, 1, False).fp8 is None


def test_arm_and_seed_parsing_errors():
    assert [a.name for a in parse_arms("bf16, mxfp4")] == ["bf16", "mxfp4"]
    with pytest.raises(ValueError, match="unknown arm.*'fp4'.*choose from"):
        parse_arms("bf16,fp4")
    with pytest.raises(ValueError, match="listed twice: bf16"):
        parse_arms("bf16,bf16")
    assert parse_seeds("1,2") == [1, 2]
    for bad in ("", "a", "1,1", "-1"):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)




def test_list_arms(capsys):
    assert main(["--list-arms"]) == 0
    out = capsys.readouterr().out
    for n in NAMES:
        assert f"`{n}`" in out


def test_presets_and_overrides():
    args = build_parser().parse_args(["--preset", "small", "--steps", "10", "--lr", "1e-3"])
    cfg = resolve_config(args)
    assert cfg.steps == 10 and cfg.lr == 1e-3 and cfg.layers == 12 and cfg.hidden == 768
    assert 80e6 < PRESETS["small"].params_estimate(8192) < 130e6
    assert 300e6 < PRESETS["gpt-345m"].params_estimate(50304) < 370e6  # the paper's model with GPT-2's vocabulary


def test_lr_schedule():
    cfg = PRESETS["tiny"]
    assert lr_at(0, cfg) == pytest.approx(cfg.lr / cfg.warmup)
    assert lr_at(cfg.warmup - 1, cfg) == pytest.approx(cfg.lr)
    assert lr_at(cfg.steps, cfg) == pytest.approx(cfg.min_lr)
    mid = cfg.warmup + (cfg.steps - cfg.warmup) // 2
    assert lr_at(mid, cfg) == pytest.approx((cfg.lr + cfg.min_lr) / 2, rel=0.02)


def _fake_run(root, arm, seed, losses, val, tps=1000.0):
    d = root / f"{arm}-s{seed}"
    d.mkdir(parents=True)
    with open(d / "metrics.jsonl", "w") as f:
        for i, l in enumerate(losses):
            f.write(json.dumps({"kind": "train", "step": i, "loss": l, "step_time": 0.1}) + "\n")
        f.write(json.dumps({"kind": "valid", "step": len(losses) - 1, "loss": val}) + "\n")
    (d / "done.json").write_text(json.dumps({"final_val_loss": val, "final_train_loss": losses[-1],
                                             "tokens_per_s": tps, "peak_memory_mb": 100.0, "device": "cpu",
                                             "dtype": "float32", "memory_kind": "process peak RSS"}))


def test_report_aggregates_seeds_and_pairs_the_gap(tmp_path):
    _fake_run(tmp_path, "bf16", 1, [5.0, 4.0, 3.0], 3.00)
    _fake_run(tmp_path, "bf16", 2, [5.0, 4.1, 3.1], 3.10)
    _fake_run(tmp_path, "mxfp4", 1, [5.0, 4.2, 3.3], 3.20)
    _fake_run(tmp_path, "mxfp4", 2, [5.0, 4.3, 3.4], 3.40)
    d = tmp_path / "mxfp4-rht-sr-s1"  # unfinished: counted as running
    d.mkdir()
    (d / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 0, "loss": 5.0, "step_time": 0.1}) + "\n")
    rows = {r["arm"]: r for r in report.aggregate(str(tmp_path))}
    assert list(rows) == ["bf16", "mxfp4", "mxfp4-rht-sr"]  # table order
    assert rows["bf16"]["final_val_mean"] == pytest.approx(3.05)
    assert rows["bf16"]["final_val_sd"] == pytest.approx(math.sqrt(0.005))
    assert rows["mxfp4"]["gap_to_bf16_mean"] == pytest.approx(0.25)  # (0.20 + 0.30) / 2, paired by seed
    assert rows["mxfp4"]["gap_to_bf16_sd"] == pytest.approx(math.sqrt(0.005))
    assert rows["mxfp4-rht-sr"]["seeds_done"] == [] and rows["mxfp4-rht-sr"]["final_val_mean"] is None
    tab = report.write_summary(str(tmp_path), {"preset": "tiny", "command": "mxfp4-train --preset tiny",
                                               "config": dict(PRESETS["tiny"].to_dict(), steps=3)})
    assert "| mxfp4 | 1,2 | 3.300 ± 0.141 | +0.250 ± 0.071 |" in tab
    assert "running: 1@1/3" in tab
    md = (tmp_path / "summary.md").read_text()
    assert tab in md and "float32" in md and "mxfp4-train --preset tiny" in md
    json.loads((tmp_path / "summary.json").read_text())
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "loss.png").stat().st_size > 10_000
    assert "![loss](loss.png)" in md


def test_fp8_backward_format_is_the_fp8_reference_gemm():
    """The `fp8` arm's backward: dgrad and wgrad are E4M3 current-scaled GEMMs of the exact
    operands (any reduction size; rounding/RHT do not apply), and a bad format names the value."""
    import torch

    from megatron_mxfp4 import mxfp4_linear
    from megatron_mxfp4.numerics.fp8 import fp8_matmul_reference

    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 40, generator=g, requires_grad=True)  # 48 tokens, 40 features: not MX-blockable
    w = torch.randn(24, 40, generator=g, requires_grad=True)
    dy = torch.randn(48, 24, generator=g)
    mxfp4_linear(x, w, None, MXFP4Recipe(backward_format="fp8", rht_block=0)).backward(dy)
    assert torch.equal(x.grad, fp8_matmul_reference(dy, w.detach().t().contiguous(), torch.float32))
    assert torch.equal(w.grad, fp8_matmul_reference(dy.t().contiguous(), x.detach().t().contiguous(), torch.float32))
    rel = (x.grad - dy @ w.detach()).norm() / (dy @ w.detach()).norm()
    assert 0 < rel < 0.1
    with pytest.raises(ValueError, match="backward_format.*'fp4'"):
        MXFP4Recipe(backward_format="fp4")


def test_docs_arms_table_matches_the_code():
    from megatron_mxfp4.train.arms import arms_table

    doc = open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "training.md"), encoding="utf-8").read()
    missing = [line for line in arms_table().splitlines() if line not in doc]
    assert not missing, "docs/training.md's arms table is out of date: " + "; ".join(missing)


def _diagnosed_run(root, name, snrs, step_times=None):
    """An arm folder with a diagnostics log (one check of two GEMMs of two layers per value of `snrs`)."""
    from megatron_mxfp4.diagnostics import MXFP4Monitor

    d = root / name
    d.mkdir(parents=True)
    mon = MXFP4Monitor(interval=1, jsonl_path=str(d / "diagnostics.jsonl"))
    for snr in snrs:
        for i, layer in enumerate(("decoder.layers.0.mlp.linear_fc1", "decoder.layers.1.mlp.linear_fc1")):
            for gemm in ("dgrad", "wgrad"):
                mon.record(layer, gemm, dict(snr=snr + i))
        mon.end_step()
    return d


def test_mxfp4_report_on_a_run_folder_of_several_arms(tmp_path, capsys):
    """`mxfp4-report runs/tiny`: one heat map per arm folder with diagnostics, one table for all."""
    from megatron_mxfp4.report import main as report_main

    pytest.importorskip("matplotlib")
    _fake_run(tmp_path, "bf16", 1, [5.0, 4.0], 4.0)  # no diagnostics: not in the table
    _diagnosed_run(tmp_path, "mxfp4-s1", [3.0, 2.0, 2.5])
    _diagnosed_run(tmp_path, "mxfp4-rht-sr-s1", [6.0, 7.0])
    assert report_main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| mxfp4-s1 | 4 | 3 | 2 (0.mlp.linear_fc1 dgrad, step 1) | 3 | 0 | — |" in out
    assert "| mxfp4-rht-sr-s1 | 4 | 2 | 6 (0.mlp.linear_fc1 dgrad, step 0) | 7.5 | 0 | — |" in out
    assert "bf16" not in out
    for arm in ("mxfp4-s1", "mxfp4-rht-sr-s1"):
        assert (tmp_path / arm / "diagnostics-snr.png").read_bytes()[:4] == b"\x89PNG"
    assert report_main([str(tmp_path / "mxfp4-s1")]) == 0  # one arm's folder: the per-layer table
    assert "| decoder.layers.1.mlp.linear_fc1 | wgrad | 3 | 4 | 3.5 | 3 |" in capsys.readouterr().out


def test_mxfp4_report_errors_in_one_line(tmp_path, capsys):
    from megatron_mxfp4.report import main as report_main

    _fake_run(tmp_path, "bf16", 1, [5.0, 4.0], 4.0)
    for argv, fragment in (([str(tmp_path)], "no diagnostics log in"), ([str(tmp_path / "none")], "does not exist")):
        assert report_main(argv) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("mxfp4-report: error: ") and fragment in err[0], err
    _diagnosed_run(tmp_path, "mxfp4-s1", [3.0])
    _diagnosed_run(tmp_path, "mxfp4-sr-s1", [3.0])
    assert report_main([str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "holds 2 runs" in capsys.readouterr().err


def test_model_flops_and_mfu_column():
    from megatron_mxfp4.train.metrics import peak_flops
    from megatron_mxfp4.train.presets import PRESETS
    from megatron_mxfp4.train.report import table

    cfg = PRESETS["tiny"]  # 2 layers, hidden 128, ffn 512, seq 128
    weights = 2 * (4 * 128 * 128 + 2 * 128 * 512) + 1000 * 128
    assert cfg.model_flops_per_token(1000) == 6 * weights + 12 * 2 * 128 * 128
    moe = cfg.override(experts=8, topk=2)
    assert moe.model_flops_per_token(1000) - cfg.model_flops_per_token(1000) == 6 * 2 * 2 * 128 * 512  # top-2 MLPs
    assert peak_flops("NVIDIA H200", "bfloat16") == 989.4e12 and peak_flops("NVIDIA H200", "float32") is None
    assert peak_flops("cpu (2 cores)", "bfloat16") is None
    row = dict(arm="bf16", seeds=[1], seeds_done=[1], final_val_mean=3.0, final_val_sd=None, gap_to_bf16_mean=None,
               gap_to_bf16_sd=None, final_train_mean=3.1, tokens_per_s=1000.0, mfu=0.4123, peak_memory_mb=10.0,
               steps_done={1: 5})
    text = table([row, dict(row, arm="mxfp4", mfu=None)])
    assert "| MFU |" in text.splitlines()[0] and "| 41.2% |" in text and "| 1,000 | — |" in text
