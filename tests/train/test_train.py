"""mxfp4-train end to end on the CPU: the shortened quick start, every arm, identical starts,
exact resume after a hard stop, run-folder guard, user datasets."""
import json
import os

import pytest
import torch

from train_helpers import SMALL, run_cli

from megatron_mxfp4.train.cli import main
from megatron_mxfp4.train.metrics import read_jsonl

NON_TE = ["bf16", "fp8", "mxfp4", "mxfp4-sr", "mxfp4-rht", "mxfp4-rht-sr", "mxfp4-rht-sr-fp8fwd", "mxfp4-dethad",
          "mxfp4-wgrad-only", "mxfp4-dgrad-only"]


def _train(run_dir):
    return [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if r["kind"] == "train"]


def _valid(run_dir):
    return [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if r["kind"] == "valid"]


def test_quick_start_shortened(tmp_path, megatron_cpu, capsys):
    """The README's quick start (tiny preset, built-in corpus, three arms), 4 steps instead of 250."""
    out = str(tmp_path / "run")
    assert main(["--preset", "tiny", "--arms", "bf16,mxfp4,mxfp4-rht-sr", "--steps", "4", "--eval-interval", "2",
                 "--eval-samples", "16", "--out", out, "--threads", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for arm in ("bf16", "mxfp4", "mxfp4-rht-sr"):
        assert len(_train(os.path.join(out, f"{arm}-s1"))) == 4
        assert [r["step"] for r in _valid(os.path.join(out, f"{arm}-s1"))] == [1, 3]
        assert f"| {arm} | 1 |" in printed
    first = {a: _train(os.path.join(out, f"{a}-s1"))[0]["loss"] for a in ("bf16", "mxfp4", "mxfp4-rht-sr")}
    assert len(set(first.values())) == 1, first  # same init, same batch, same (unquantized) forward
    later = {a: _train(os.path.join(out, f"{a}-s1"))[-1]["loss"] for a in ("bf16", "mxfp4", "mxfp4-rht-sr")}
    assert len(set(later.values())) == 3, later  # the backward differs
    md = open(os.path.join(out, "summary.md")).read()
    assert "float32" in md and "stdlib" in md and os.path.exists(os.path.join(out, "loss.png"))
    # then `mxfp4-report runs/tiny`: a heat map per MXFP4 arm, one table
    from megatron_mxfp4.report import main as report_main

    assert report_main([out]) == 0
    table = capsys.readouterr().out
    for arm in ("mxfp4", "mxfp4-rht-sr"):
        assert f"| {arm}-s1 | 16 | 1 |" in table and os.path.exists(os.path.join(out, f"{arm}-s1", "diagnostics-snr.png"))
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["config"]["steps"] == 4 and cfg["data"]["tokens"] > 1_000_000
    # re-running the finished command trains nothing and reprints the table
    assert main(["--preset", "tiny", "--arms", "bf16,mxfp4,mxfp4-rht-sr", "--steps", "4", "--eval-interval", "2",
                 "--eval-samples", "16", "--out", out, "--threads", "2", "--no-progress"]) == 0
    assert "start;" not in capsys.readouterr().out
    # other settings in the same folder are refused, in one line
    assert main(["--preset", "tiny", "--arms", "bf16", "--steps", "4", "--eval-interval", "2", "--lr", "1e-2",
                 "--eval-samples", "16", "--out", out, "--no-progress"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("mxfp4-train: error: ") and "other settings (lr: 0.002 -> 0.01)" in err[0]


def test_every_arm_starts_identically_and_trains(tmp_path, small_data, megatron_cpu):
    from megatron_mxfp4.train.arms import ARMS
    from megatron_mxfp4.train.cli import build_parser, resolve_config
    from megatron_mxfp4.train.model import Dist, build_model

    cfg = resolve_config(build_parser().parse_args(SMALL))
    dist = Dist(rank=0, world=1, local_rank=0, tp=1, dp=1, dp_rank=0, tp_rank=0, device=torch.device("cpu"))
    ref = None
    for name in NON_TE:
        _, gpt = build_model(cfg, ARMS[name].with_seed(5), dist, torch.float32, "local", 8192, seed=5)
        params = {k: v.detach().clone() for k, v in gpt.named_parameters()}
        if ref is None:
            ref = params
        assert params.keys() == ref.keys(), name
        assert all(torch.equal(params[k], ref[k]) for k in ref), name
    out = str(tmp_path / "arms")
    assert main(["--data-path", small_data, "--arms", ",".join(NON_TE), "--steps", "2", "--eval-interval", "2",
                 "--out", out, *SMALL]) == 0
    first = {a: _train(os.path.join(out, f"{a}-s1"))[0]["loss"] for a in NON_TE}
    unquantized_forward = [a for a in NON_TE if a not in ("fp8", "mxfp4-rht-sr-fp8fwd")]
    assert len({first[a] for a in unquantized_forward}) == 1, first
    assert first["fp8"] != first["bf16"] and abs(first["fp8"] - first["bf16"]) < 0.05
    for a in NON_TE:
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in _train(os.path.join(out, f"{a}-s1")))
    md = open(os.path.join(out, "summary.md")).read()
    assert all(f"| {a} | 1 |" in md for a in NON_TE)


def test_tensor_parallel_matches_one_process(tmp_path, small_data, megatron_cpu):
    """torchrun-style TP=2 (gloo, 2 processes): the bf16 arm follows the single-process losses; the
    MXFP4 arm trains (its dgrad reduces over the TP-local 384 / 2 QKV features)."""
    import socket
    import subprocess
    import sys

    args = ["--data-path", small_data, "--arms", "bf16,mxfp4-rht-sr", "--steps", "3", "--eval-interval", "3",
            *SMALL[:-5], "--hidden", "128", "--no-progress"]
    one = str(tmp_path / "one")
    assert main([*args, "--out", one]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        procs.append(subprocess.Popen([sys.executable, "-m", "megatron_mxfp4.train", *args, "--tp", "2",
                                       "--threads", "1", "--out", str(tmp_path / "tp2")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    ref = [r["loss"] for r in _train(os.path.join(one, "bf16-s1"))]
    tp = [r["loss"] for r in _train(str(tmp_path / "tp2" / "bf16-s1"))]
    assert tp == pytest.approx(ref, abs=1e-5)
    mx = _train(str(tmp_path / "tp2" / "mxfp4-rht-sr-s1"))
    assert len(mx) == 3 and mx[0]["loss"] == pytest.approx(ref[0], abs=1e-5)
    assert json.load(open(tmp_path / "tp2" / "config.json"))["tp"] == 2


def test_bf16_weights_with_fp32_masters(tmp_path, small_data, megatron_cpu):
    """--dtype bf16 (the GPU default): BF16 model weights, FP32 masters and Adam state in the
    checkpoint, finite losses; the first loss is close to the float32 run's."""
    out = str(tmp_path / "bf16w")
    assert main(["--data-path", small_data, "--arms", "bf16,mxfp4-rht-sr", "--steps", "2", "--eval-interval", "2",
                 "--dtype", "bf16", "--out", out, *SMALL]) == 0
    from megatron_mxfp4.train import checkpoint

    sd = checkpoint.read(os.path.join(out, "mxfp4-rht-sr-s1", "ckpt", "iter_0000001", "tp00.pt"))
    weights = [v for k, v in sd["model"].items() if k.endswith("linear_fc1.weight")]
    assert weights and all(w.dtype == torch.bfloat16 for w in weights)
    masters = [m for m in sd["optimizer"]["master"] if m is not None]
    assert masters and all(m.dtype == torch.float32 for m in masters)
    done = json.load(open(os.path.join(out, "mxfp4-rht-sr-s1", "done.json")))
    assert done["dtype"] == "bfloat16" and done["final_val_loss"] < 10
    assert "compute dtype bfloat16" in open(os.path.join(out, "summary.md")).read()




def test_hard_stop_resumes_on_the_same_trajectory(tmp_path, small_data, megatron_cpu):
    """A run stopped hard after step 4 (last checkpoint: step 2) and started again logs exactly
    the losses, gradient norms and validation losses of an uninterrupted run (dropout on, SR+RHT
    random streams, gradient accumulation over two micro batches)."""
    common = ["--data-path", small_data, "--arms", "mxfp4-rht-sr", "--seeds", "3", "--steps", "8",
              "--save-interval", "3", "--eval-interval", "4", "--dropout", "0.1", *SMALL]
    ref_dir, cut_dir = str(tmp_path / "ref"), str(tmp_path / "cut")
    assert main([*common, "--out", ref_dir]) == 0
    p = run_cli([*common, "--out", cut_dir, "--exit-after-step", "4"])
    assert p.returncode != 0 and "stopped after step 4" in p.stderr, p.stderr[-2000:]
    run = os.path.join(cut_dir, "mxfp4-rht-sr-s3")
    assert [r["step"] for r in _train(run)] == [0, 1, 2, 3, 4]
    assert open(os.path.join(run, "ckpt", "latest")).read().strip() == "2"
    assert not os.path.exists(os.path.join(run, "done.json"))
    assert main([*common, "--out", cut_dir]) == 0
    ref = os.path.join(ref_dir, "mxfp4-rht-sr-s3")
    a, b = _train(ref), _train(run)
    assert [r["step"] for r in b] == list(range(8))
    assert [(r["loss"], r["grad_norm"]) for r in a] == [(r["loss"], r["grad_norm"]) for r in b]
    assert [(r["step"], r["loss"]) for r in _valid(ref)] == [(r["step"], r["loss"]) for r in _valid(run)]
    assert sorted(os.listdir(os.path.join(run, "ckpt"))) == ["iter_0000007", "latest"]  # finished: the final one
    # without restoring the MXFP4 call counters the random streams would repeat: the trajectory differs
    from megatron_mxfp4.train import checkpoint

    sd = checkpoint.read(os.path.join(run, "ckpt", "iter_0000007", "tp00.pt"))
    assert sd["mxfp4_counters"] and all(v > 0 for v in sd["mxfp4_counters"].values())
    assert checkpoint.latest_step(run) == 7
    # --time-limit: a graceful stop after the first step (checkpoint, exit code 3), then the same command
    tl_dir = str(tmp_path / "tl")
    assert main([*common, "--out", tl_dir, "--time-limit", "0"]) == 3
    tl_run = os.path.join(tl_dir, "mxfp4-rht-sr-s3")
    assert checkpoint.latest_step(tl_run) == 0 and len(_train(tl_run)) == 1
    assert main([*common, "--out", tl_dir]) == 0
    assert [(r["loss"], r["grad_norm"]) for r in _train(tl_run)] == [(r["loss"], r["grad_norm"]) for r in a]


def test_diagnostics_guard_switches_and_survives_a_resume(tmp_path, small_data, megatron_cpu):
    """--diagnostics-interval 1 logs every MXFP4 GEMM; an unreachable SNR threshold switches each of
    them to the unquantized backward after `patience` checks; a run killed after the switch resumes
    with the guard state (the same losses as an uninterrupted run)."""
    common = ["--data-path", small_data, "--arms", "mxfp4-rht-sr", "--steps", "4", "--eval-interval", "4",
              "--save-interval", "2", "--diagnostics-interval", "1", "--guard-snr", "1e9", "--guard-patience", "2",
              *SMALL]
    ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
    assert main([*common, "--out", ref]) == 0
    rows = read_jsonl(os.path.join(ref, "mxfp4-rht-sr-s1", "diagnostics.jsonl"))
    stats = [r for r in rows if "event" not in r]
    switches = [r for r in rows if r.get("event") == "switched_to_unquantized"]
    gemms = {(r["layer"], r["gemm"]) for r in stats}
    assert len(gemms) == 8  # 1 layer x (qkv, proj, fc1, fc2) x (dgrad, wgrad)
    assert {r["step"] for r in stats} == {0, 1} and len(switches) == 8 and {r["step"] for r in switches} == {1}
    with pytest.raises(SystemExit):
        main([*common, "--out", cut, "--exit-after-step", "2"])
    run = os.path.join(cut, "mxfp4-rht-sr-s1")
    assert open(os.path.join(run, "ckpt", "latest")).read().strip() == "1"  # saved just after the switch
    assert main([*common, "--out", cut]) == 0
    # Steps 2 and 3 must run unquantized again after the resume: same gradient norms and losses.
    assert [(r["loss"], r["grad_norm"]) for r in _train(run)] == [(r["loss"], r["grad_norm"]) for r in
                                                                   _train(os.path.join(ref, "mxfp4-rht-sr-s1"))]


def test_fused_attention_spec_trains_like_the_local_one(tmp_path, megatron_cpu):
    """--transformer-impl local_sdpa: every arm's attention is PyTorch's fused kernel; without dropout the
    first loss is the local spec's (same init, same batch) up to float32 rounding."""
    from megatron_mxfp4.megatron.attention import SDPAttention
    from megatron_mxfp4.train.arms import ARMS
    from megatron_mxfp4.train.model import layer_spec

    for arm in ("bf16", "mxfp4-rht-sr"):
        spec = layer_spec(ARMS[arm], "local_sdpa")
        assert spec.submodules.self_attention.submodules.core_attention is SDPAttention
    losses = {}
    for impl in ("local", "local_sdpa"):
        out = str(tmp_path / impl)
        assert main(["--preset", "tiny", "--arms", "bf16", "--steps", "2", "--eval-interval", "2", "--dropout", "0",
                     "--eval-samples", "16", "--out", out, "--threads", "2", "--no-progress",
                     "--transformer-impl", impl]) == 0
        losses[impl] = [r["loss"] for r in _train(os.path.join(out, "bf16-s1"))]
    assert losses["local_sdpa"][0] == pytest.approx(losses["local"][0], rel=1e-5)
