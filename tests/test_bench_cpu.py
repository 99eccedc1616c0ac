"""CPU smoke tests of the end-to-end benchmarks in bench/ (toy sizes, reference backends).

The scripts run as subprocesses (as a user runs them: `python bench/<name>.py`), so that the
torch.distributed group and megatron-core's CPU shims they install stay out of the test process.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench")


def _load(name):
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(BENCH, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _megatron():
    try:
        import megatron.core  # noqa: F401
    except Exception:
        return False
    return True


def _run(script, *args, timeout=240):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2")
    env.pop("WORLD_SIZE", None)
    p = subprocess.run([sys.executable, os.path.join(BENCH, script), *args], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=timeout)
    return p


def _ok(p):
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


# --------------------------------------------------------------------------------------- common helpers

def test_arm_table_and_selection():
    C = _load("common")
    arms = C.build_arms()
    names = [a.name for a in arms]
    assert len(names) == len(set(names)) == 5 + 2 * 3 * 2
    assert names[:5] == ["bf16_mcore", "bf16_te", "te_fp8_delayed", "te_fp8_current", "ours_fp8_fp8"]
    assert C.BF16_REFERENCE in names and C.FP8_REFERENCE in names
    by = {a.name: a for a in arms}
    r = by["ours_fp8_fp8"].recipe
    assert (r.forward, r.backward_format) == ("fp8", "fp8") and not by["ours_fp8_fp8"].quantizes_mxfp4
    r = by["ours_bf16_mxfp4_g256_rtn"].recipe
    assert (r.forward, r.backward_format, r.rht_block, r.rounding) == ("bf16", "mxfp4", 256, "rtn")
    assert by["ours_fp8_mxfp4_g0_sr"].recipe.effective_rht_block == 0
    assert all(a.needs_te == a.name.startswith(("bf16_te", "te_")) for a in arms)
    assert [a.name for a in C.select_arms(arms, "bf16*,ours_*g64_sr")] == [
        "bf16_mcore", "bf16_te", "ours_bf16_mxfp4_g64_sr", "ours_fp8_mxfp4_g64_sr"]
    with pytest.raises(SystemExit, match="no arm matches"):
        C.select_arms(arms, "nope*")
    assert "| ours_fp8_fp8 |" in C.arms_table(arms)


def test_measure_rotation_and_writers(tmp_path):
    import torch

    C = _load("common")
    calls = []
    t = C.measure(lambda s: calls.append(s), torch.device("cpu"), setup=lambda i: i, warmup=2, iters=5)
    assert calls == list(range(7)) and t.iters == 5 and t.median >= 0 and t.p20 <= t.p80
    with pytest.raises(ValueError, match="iters"):
        C.measure(lambda s: None, torch.device("cpu"), iters=0)
    rot = C.Rotation(lambda i: i * 10, 3)
    assert [rot(i) for i in range(5)] == [0, 10, 20, 0, 10]
    assert C.rotation_count(1 << 30) == 2 and C.rotation_count(1) == 8
    assert C.peak_memory(lambda: None, torch.device("cpu")) is None
    paths = C.write_results(str(tmp_path / "sub" / "x"), {"a": 1}, "# t")
    assert json.load(open(paths[0])) == {"a": 1} and open(paths[1]).read() == "# t\n"
    assert C.markdown_table(["a", "b"], [[1, None]]) == "| a | b |\n|---|---|\n| 1 |  |"
    assert C.fmt(None) == "–" and C.fmt(1234.5) == "1234" and C.fmt(0.012345) == "0.0123"
    assert C.command_line(["bench/x.py", "--arms", "a b"]).endswith("bench/x.py --arms 'a b'")
    with pytest.raises(SystemExit, match="only cuda and cpu"):
        C.pick_device("meta")


# --------------------------------------------------------------------------------------- linear / layer / profile

def test_dry_runs_list_every_arm():
    out = _ok(_run("linear.py", "--dry-run", "--device", "cpu")).stdout
    for name in ("bf16_mcore", "te_fp8_current", "ours_fp8_fp8", "ours_fp8_mxfp4_g256_rtn"):
        assert f"| {name} |" in out
    assert "| fc2 | row | 8192 | 16384 → 4096 |" in out
    out = _ok(_run("layer.py", "--dry-run", "--device", "cpu", "--arms", "ours_bf16*")).stdout
    assert "ours_bf16_mxfp4_g64_sr" in out and "bf16_mcore" not in out


def test_bad_arguments_are_named():
    p = _run("linear.py", "--dry-run", "--model", "7b", "--device", "cpu")
    assert p.returncode != 0 and "--model '7b'" in p.stderr
    p = _run("linear.py", "--dry-run", "--gs", "64,x", "--device", "cpu")
    assert p.returncode != 0 and "--gs" in p.stderr
    p = _run("linear.py", "--device", "cpu")
    assert p.returncode != 0 and "--tiny" in p.stderr
    p = _run("layer.py", "--dry-run", "--arms", "nothing_like_this", "--device", "cpu")
    assert p.returncode != 0 and "no arm matches" in p.stderr


@pytest.mark.skipif(not _megatron(), reason="megatron-core is not installed")
def test_linear_tiny_every_arm(tmp_path):
    stem = str(tmp_path / "linear")
    _ok(_run("linear.py", "--device", "cpu", "--tiny", "--strict", "--out", stem))
    res = json.load(open(stem + ".json"))
    assert res["command"].startswith("python bench/linear.py --device cpu --tiny")
    assert res["device_info"]["device_type"] == "cpu" and res["tp"] == 1
    assert any("CPU smoke run" in n for n in res["notes"])
    te_ok = res["device_info"]["transformer_engine"] is not None
    expected = {a["name"] for a in res["arms"]}
    assert len(expected) == (17 if te_ok else 14)
    assert [s["layer"] for s, _ in res["shapes"]] == ["fc1", "fc2"]
    for shape, rows in res["shapes"]:
        assert {r["arm"] for r in rows} == expected
        by = {r["arm"]: r for r in rows}
        for r in rows:
            assert "error" not in r, r
            for part in ("fwd", "bwd", "fwd_bwd"):
                assert r[part]["ms"] > 0 and r[part]["iters"] == 2
            assert r["x_bf16"]["fwd_bwd"] > 0 and r["tflops_fwd_bwd"] > 0
        assert by["bf16_mcore"]["x_bf16"] == {"fwd": 1.0, "bwd": 1.0, "fwd_bwd": 1.0}
        s = by["ours_bf16_mxfp4_g64_sr"]["split"]
        for k in ("quantize_dy_dual", "quantize_w", "quantize_x", "dgrad_gemm", "wgrad_gemm", "grad_input_total",
                  "grad_weight_total", "quantize_total", "gemm_total", "unaccounted"):
            assert k in s, k
        assert s["gemm_backend"] == "reference" and s["quantize_backend"] == "reference"
        assert "comm_dx_allreduce" not in s  # TP = 1
        assert set(by["ours_fp8_fp8"]["split"]) == {"grad_input_total", "grad_weight_total", "unaccounted"}
        assert set(by["bf16_mcore"]["split"]) == {"dgrad_gemm", "wgrad_gemm", "quantize_total", "gemm_total",
                                                  "unaccounted"}
    goals = {(g["layer"], g["arm"]): g for g in res["goals"]}
    assert goals[("fc1", "ours_bf16_mxfp4_g64_sr")]["ratio"] > 0
    if not te_ok:
        assert goals[("fc1", "ours_fp8_mxfp4_g64_sr")]["met"] is None
    md = open(stem + ".md").read()
    assert "## fc1 (column-parallel)" in md and "Backward split" in md and "## Goals" in md


@pytest.mark.skipif(not _megatron(), reason="megatron-core is not installed")
def test_layer_moe_block_alone(tmp_path):
    """--experts/--part mlp: the MoE block of the layer, its routed experts' linears MXFP4 in our arms."""
    stem = str(tmp_path / "moe")
    _ok(_run("layer.py", "--device", "cpu", "--tiny", "--strict", "--experts", "4", "--topk", "2", "--part", "mlp",
             "--arms", "bf16_mcore,ours_bf16_mxfp4_g64_sr", "--out", stem))
    rows = {r["arm"]: r for r in json.load(open(stem + ".json"))["rows"]}
    assert rows["bf16_mcore"]["layer_class"] == "MoELayer" and rows["bf16_mcore"]["mxfp4_linears"] == 0
    assert rows["ours_bf16_mxfp4_g64_sr"]["mxfp4_linears"] == 8  # 4 experts x (FC1, FC2)
    # the experts' backward quantizers ran as grouped launches (3 per backward: FC2 dY, FC2 X + W, FC1 X + W),
    # none for BF16
    launches = rows["ours_bf16_mxfp4_g64_sr"]["grouped_quantize_launches"]
    assert launches > 0 and launches % 3 == 0, launches
    assert rows["bf16_mcore"]["grouped_quantize_launches"] == 0
    assert "MoE: 4 experts" in open(stem + ".md").read()
    p = _run("layer.py", "--device", "cpu", "--tiny", "--experts", "2", "--topk", "3", "--out", stem)
    assert p.returncode != 0 and "--topk 3" in p.stderr


@pytest.mark.skipif(not _megatron(), reason="megatron-core is not installed")
def test_layer_tiny_every_arm(tmp_path):
    stem = str(tmp_path / "layer")
    _ok(_run("layer.py", "--device", "cpu", "--tiny", "--strict", "--out", stem))
    res = json.load(open(stem + ".json"))
    rows = {r["arm"]: r for r in res["rows"]}
    assert all("error" not in r for r in rows.values())
    assert rows["bf16_mcore"]["layer_class"] == "TransformerLayer" and rows["bf16_mcore"]["mxfp4_linears"] == 0
    for name, r in rows.items():
        if name.startswith("ours_"):
            assert r["layer_class"] == "MXFP4TransformerLayer" and r["mxfp4_linears"] == 4, name
            assert r["bf16_reference"] == ("bf16_te" if name.endswith("@te") else "bf16_mcore")
    assert len([n for n in rows if n.startswith("ours_") and not n.endswith("@te")]) == 13
    assert rows["bf16_mcore"]["x_bf16"]["fwd_bwd"] == 1.0
    assert "| ours_fp8_mxfp4_g256_rtn | local |" in open(stem + ".md").read()


@pytest.mark.skipif(not _megatron(), reason="megatron-core is not installed")
def test_profile_backward_tiny(tmp_path):
    stem = str(tmp_path / "prof")
    _ok(_run("profile_backward.py", "--device", "cpu", "--tiny", "--out", stem))
    res = json.load(open(stem + ".json"))
    arms = {a["arm"]: a for a in res["arms"]}
    assert set(arms) == {"ours_bf16_mxfp4_g64_sr", "bf16_mcore"}
    ours = arms["ours_bf16_mxfp4_g64_sr"]
    prof = ours["profile"]
    assert prof["unit"].startswith("CPU ops") and prof["kernels_per_bwd"] > 0 and prof["kernels"]
    assert abs(sum(c["us_per_bwd"] for c in prof["categories"].values()) - prof["busy_us_per_bwd"]) < 1e-6
    for k in ("quantize_dy_dual", "quantize_w", "quantize_x", "dgrad_mxfp4_gemm", "wgrad_mxfp4_gemm"):
        assert ours["standalone_ms"][k] > 0
    assert "measured_minus_standalone_parts_ms" in ours["remainder"]
    assert "standalone_ms" not in arms["bf16_mcore"]
    assert res["floors"]["bf16_gemms_ms"] > 0
    P = _load("profile_backward")
    assert P.categorize("void quantize_kernel<64, 3, 2>(QuantizeParams)") == "quantize (ours, CUDA)"
    assert P.categorize("_to_e4m3_kernel") == "E4M3 tile layout"
    assert P.categorize("mxfp4::detail::to_e4m3_tiles_kernel(mxfp4::TileParams)") == "E4M3 tile layout"
    assert P.categorize("mxfp4::detail::mask_flagged_kernel(int*, int const*, float*, long, long)") == "E4M3 tile layout"
    assert ours["host"]["host_ms_median"] > 0 and ours["host"]["functions"]
    assert P.categorize("sm90_xmma_gemm_e4m3e4m3_bf16") == "GEMM (cuBLAS / cuBLASLt / CUTLASS)"
    assert P.categorize("ncclDevKernel_AllReduce") == "NCCL"


def test_host_cost_smoke(tmp_path):
    stem = str(tmp_path / "host")
    _ok(_run("host.py", "--device", "cpu", "--iters", "2", "--warmup", "1", "--shapes", "64x32x64", "--out", stem))
    res = json.load(open(stem + ".json"))
    assert [r["arm"] for r in res["rows"]] == ["nn_linear", "mxfp4_bf16fwd", "mxfp4_fp8fwd"]
    assert all(r["shape"] == [64, 32, 64] and r["host_ms"] > 0 for r in res["rows"])
    assert "× nn.Linear" in open(stem + ".md").read()
    p = _run("host.py", "--device", "cpu", "--shapes", "3x4")
    assert p.returncode != 0 and "TxINxOUT" in p.stderr


# --------------------------------------------------------------------------------------- step

LOG = """\
> megatron_mxfp4: MXFP4 backward MXFP4Recipe(dgrad=True, wgrad=True, rounding='sr', rht_block=64)
 [2026-11-28 10:00:00.000000] iteration        1/      30 | consumed samples:            8 | elapsed time per iteration (ms): 9000.0 | throughput per GPU (TFLOP/s/GPU): 30.0 | learning rate: 1.0E-04 | global batch size:     8 | lm loss: 1.100000E+01 | loss scale: 1.0 | number of skipped iterations:   0 | number of nan iterations:   0 |
[Rank 0] (after 1 iterations) memory (MB) | allocated: 100.00 | max allocated: 2000.50 | reserved: 3000.00 | max reserved: 3000.00
 [2026-11-28 10:00:05.000000] iteration        5/      30 | consumed samples:           40 | elapsed time per iteration (ms): 400.0 | throughput per GPU (TFLOP/s/GPU): 300.0 | learning rate: 1.0E-04 | global batch size:     8 | lm loss: 1.000000E+01 | loss scale: 1.0 | number of skipped iterations:   0 | number of nan iterations:   0 |
 [2026-11-28 10:00:07.000000] iteration       15/      30 | consumed samples:          120 | elapsed time per iteration (ms): 410.0 | throughput per GPU (TFLOP/s/GPU): 290.0 | learning rate: 1.0E-04 | global batch size:     8 | lm loss: 9.000000E+00 | loss scale: 1.0 | number of skipped iterations:   0 | number of nan iterations:   0 |
[Rank 0] (after 15 iterations) memory (MB) | allocated: 100.00 | max allocated: 2100.25 | reserved: 3000.00 | max reserved: 3000.00
 [2026-11-28 10:00:09.000000] iteration       20/      30 | consumed samples:          160 | elapsed time per iteration (ms): 390.0 | throughput per GPU (TFLOP/s/GPU): 310.0 | learning rate: 1.0E-04 | global batch size:     8 | lm loss: 8.500000E+00 | loss scale: 1.0 | number of skipped iterations:   1 | number of nan iterations:   0 |
 [2026-11-28 10:00:11.000000] iteration       30/      30 | consumed samples:          240 | elapsed time per iteration (ms): 420.0 | throughput per GPU (TFLOP/s/GPU): 280.0 | learning rate: 1.0E-04 | global batch size:     8 | lm loss: 8.000000E+00 | loss scale: 1.0 | number of skipped iterations:   0 | number of nan iterations:   0 |
"""


def test_step_log_parsing_and_ratios():
    S = _load("step")
    parsed = S.parse_log(LOG)
    assert [iv["iteration"] for iv in parsed["intervals"]] == [1, 5, 15, 20, 30]
    assert parsed["max_allocated_mb"] == [2000.5, 2100.25]
    assert parsed["recipe_line"].startswith("MXFP4 backward MXFP4Recipe(")
    s = S.summarize(parsed, skip=10, seq=2048, tp=2)
    assert s["status"] == "ok" and s["intervals_used"] == 3 and s["ms_per_iter"] == 410.0
    assert s["tflops_per_gpu"] == 290.0 and s["last_loss"] == 8.0 and s["skipped_iterations"] == 1
    assert s["tokens_per_s"] == pytest.approx(8 * 2048 / 0.41) and s["tokens_per_s_per_gpu"] == pytest.approx(s["tokens_per_s"] / 2)
    assert s["peak_allocated_mib"] == 2100.25
    assert S.summarize(S.parse_log(LOG), skip=30, seq=2048, tp=1)["status"] == "no timed interval after warm-up"
    assert S.summarize(S.parse_log("nothing"), skip=0, seq=2048, tp=1)["status"] == "no iteration logged"
    rows = [dict(arm="bf16_local", impl="local", status="ok", ms_per_iter=400.0),
            dict(arm="mxfp4_local", impl="local", status="ok", ms_per_iter=300.0),
            dict(arm="te_fp8_delayed", impl="transformer_engine", status="ok", ms_per_iter=250.0),
            dict(arm="mxfp4_te", impl="transformer_engine", status="ok", ms_per_iter=275.0),
            dict(arm="bf16_te", impl="transformer_engine", status="skipped")]
    S.add_ratios(rows)
    assert rows[1]["x_bf16"] == 0.75 and rows[1]["x_te_fp8"] == 1.2
    assert rows[3]["x_bf16"] is None and rows[3]["x_te_fp8"] == 1.1  # bf16_te did not run


def test_step_arms_and_dry_run():
    S = _load("step")
    arms = {a.name: a for a in S.step_arms()}
    assert not arms["ours_fp8_fp8"].runnable and arms["ours_fp8_fp8"].mxfp4_args == "--mxfp4-backward-format fp8"
    assert arms["mxfp4_local"].mxfp4_args == "--mxfp4-rht-block 64 --mxfp4-rounding sr"
    assert arms["mxfp4_fp8_te_g256_rtn"].impl == "transformer_engine"
    assert [a.name for a in S.select(list(arms.values()), None)] == S.DEFAULT_ARMS.split(",")
    with pytest.raises(SystemExit):
        S.select(list(arms.values()), "x*")
    out = _ok(_run("step.py", "--model", "6.7b", "--dry-run", "--arms", "bf16_local,mxfp4_fp8_local,ours_fp8_fp8")).stdout
    assert "--tensor-model-parallel-size 2" in out and "--recompute-activations" in out
    assert "-m megatron_mxfp4.pretrain_gpt" in out and "--mxfp4-forward fp8" in out
    assert "--mxfp4-backward-format fp8" in out
    p = _run("step.py", "--model", "1.3b", "--dry-run", "--iters", "10", "--skip", "10")
    assert p.returncode != 0 and "--skip 10" in p.stderr
    out = _ok(_run("step.py", "--model", "345m", "--dry-run", "--arms", "mxfp4_local")).stdout  # the paper's 345M
    assert "--hidden-size 1024" in out and "--micro-batch-size 8" in out and "--seq-length 1024" in out


FAKE_LAUNCHER = r"""#!/usr/bin/env bash
# stands in for configs/pretrain_gpt.sh: prints Megatron-style log lines (ms/iter depends on the arm)
if [ "${DRY_RUN:-0}" = 1 ]; then echo "fake-launch ARM=$ARM IMPL=$TRANSFORMER_IMPL GPUS=$CUDA_VISIBLE_DEVICES $*"; exit 0; fi
[ "$ARM" = mxfp4_fp8 ] && { echo "Traceback: out of memory"; exit 1; }
case "$ARM" in bf16) ms=400 ;; mxfp4) ms=300 ;; *) ms=350 ;; esac
echo "> megatron_mxfp4: MXFP4 backward $MXFP4_ARGS"
for it in 5 10 15 20 25 30; do
  echo " [t] iteration       $it/      30 | consumed samples: 1 | elapsed time per iteration (ms): $ms.0 | throughput per GPU (TFLOP/s/GPU): 100.0 | global batch size:    16 | lm loss: 5.0E+00 | loss scale: 1.0 | number of skipped iterations:   0 |"
done
echo "[Rank 0] (after 30 iterations) memory (MB) | allocated: 1.00 | max allocated: 1234.00 | reserved: 2.00 | max reserved: 2.00"
"""


def test_step_runs_arms_on_slots_with_a_fake_launcher(tmp_path):
    """The scheduling, logging, parsing and writing of step.py, with a launcher that only prints logs."""
    launcher = tmp_path / "fake.sh"
    launcher.write_text(FAKE_LAUNCHER)
    stem = str(tmp_path / "step")
    p = _ok(_run("step.py", "--model", "tiny", "--gpus", "0,1", "--launcher", str(launcher), "--out", stem,
                 "--arms", "bf16_local,mxfp4_local,mxfp4_fp8_local,te_fp8_delayed,ours_fp8_fp8,mxfp4_local_g0_rtn"))
    res = json.load(open(stem + ".json"))
    rows = {r["arm"]: r for r in res["rows"]}
    assert list(rows) == ["bf16_local", "mxfp4_local", "mxfp4_fp8_local", "te_fp8_delayed", "ours_fp8_fp8",
                          "mxfp4_local_g0_rtn"]
    assert rows["bf16_local"]["status"] == "ok" and rows["bf16_local"]["ms_per_iter"] == 400.0
    assert rows["mxfp4_local"]["x_bf16"] == 0.75 and rows["mxfp4_local"]["peak_allocated_mib"] == 1234.0
    assert rows["mxfp4_local"]["tokens_per_s"] == pytest.approx(16 * 512 / 0.3)
    assert rows["mxfp4_local_g0_rtn"]["recipe_line"].endswith("--mxfp4-rht-block 0 --mxfp4-rounding rtn")
    assert rows["mxfp4_fp8_local"]["status"].startswith("failed (exit 1") and "out of memory" in rows["mxfp4_fp8_local"]["log_tail"]
    if res["device_info"]["transformer_engine"] is None:
        assert rows["te_fp8_delayed"]["status"].startswith("skipped")
    assert rows["ours_fp8_fp8"]["env"]["MXFP4_ARGS"] == "--mxfp4-backward-format fp8"
    gpus = {rows[a]["env"]["CUDA_VISIBLE_DEVICES"] for a in ("bf16_local", "mxfp4_local", "mxfp4_local_g0_rtn")}
    assert gpus == {"0", "1"}  # two slots of one GPU each
    assert any("2 arms ran at a time" in n for n in res["notes"])
    md = open(stem + ".md").read()
    assert "| mxfp4_local | local | 300 |" in md and "fake-launch ARM=mxfp4" in md
    assert os.path.exists(os.path.join(res["log_dir"], "mxfp4_local.log"))
    assert "mxfp4_fp8_local: failed" in p.stdout


@pytest.mark.skipif(not _megatron(), reason="megatron-core is not installed")
def test_step_commands_parse_in_megatron():
    """Every runnable arm's command line is accepted by Megatron's parser with the intended flags."""
    S = _load("step")
    import megatron_mxfp4.megatron  # noqa: F401  (typing.override on Python 3.11)
    from megatron.training.arguments import parse_args

    from megatron_mxfp4.megatron import add_mxfp4_args

    cfg = S.MODELS["1.3b"]
    for name in ("bf16_local", "te_fp8_delayed", "te_fp8_current", "mxfp4_te", "mxfp4_fp8_local_g256_rtn"):
        arm = next(a for a in S.step_arms() if a.name == name)
        cmd = S.launcher_command(S.arm_env(arm, "1.3b", cfg, [0], 29999, 30, 5),
                                 S.extra_args(arm, cfg, 5, 1234)).split()
        i = cmd.index("megatron_mxfp4.pretrain_gpt")
        old = sys.argv
        sys.argv = ["pretrain_gpt"] + cmd[i + 1:]
        try:
            a = parse_args(extra_args_provider=add_mxfp4_args)
        finally:
            sys.argv = old
        assert a.train_iters == 30 and a.log_interval == 5 and a.log_memory_interval == 5 and a.log_throughput
        assert a.micro_batch_size == 4 and a.global_batch_size == 8 and a.use_distributed_optimizer
        assert a.transformer_impl == arm.impl
        if name == "te_fp8_delayed":
            assert (a.fp8, a.fp8_recipe) == ("hybrid", "delayed")
        elif name == "te_fp8_current":
            assert (a.fp8, a.fp8_recipe) == ("e4m3", "tensorwise")
        else:
            assert a.fp8 is None
        assert a.mxfp4_backward == name.startswith("mxfp4")
        if name == "mxfp4_fp8_local_g256_rtn":
            assert (a.mxfp4_forward, a.mxfp4_rht_block, a.mxfp4_rounding) == ("fp8", 256, "rtn")


# --------------------------------------------------------------------------------------- Blackwell model

def test_blackwell_model(tmp_path):
    M = _load("blackwell_model")
    out = tmp_path / "bw.md"
    res = M.main(["--out", str(out), "--json", str(tmp_path / "bw.json")])
    md = out.read_text()
    assert md.startswith("# MXFP4 backward on Blackwell: a MODEL, not a measurement")
    assert "## Formulas" in md and "t_other        = f / (1 − f)" in md
    for url in M.SOURCES.values():
        assert url in md
    assert "assumed" in md and "Sensitivity" in md
    for model in ("1.3b", "6.7b"):
        for dev in ("H200", "B200", "B300"):
            r = res["results"][model][dev]
            sp = r["speedups"]
            assert r["step_ms"]["BF16"] > r["gemm_ms"]["BF16"] > 0
            assert sp["step_fp8_vs_bf16"] > 1  # FP8 GEMMs are faster in every column
            # the step speed-up is diluted: smaller than the backward's own (when the backward is faster)
            if sp["bwd_mxfp4_vs_bf16"] > 1:
                assert 1 < sp["step_ours_bf16_vs_bf16"] < sp["bwd_mxfp4_vs_bf16"]
        # Blackwell's FP4 tensor cores make the MXFP4 backward relatively faster than on the H200
        assert res["results"][model]["B200"]["speedups"]["bwd_mxfp4_vs_bf16"] > \
            res["results"][model]["H200"]["speedups"]["bwd_mxfp4_vs_bf16"]
    q = M.load_quantize(M.os.path.join(M.RESULTS, "quantize-h200.json"))
    t = M.quantize_ms(q["tb_s"], "dual", 64, "sr", 8192 * 16384)
    assert 0.4 < t < 0.7  # the measured dual g=64 SR kernel on [8192, 16384]: 557 µs
    f0 = M.speedups(M.step_model("6.7b", "B200", q, M.load_gemm(M.os.path.join(M.RESULTS, "gemm-h200.json")), 0.0))
    f5 = M.speedups(M.step_model("6.7b", "B200", q, M.load_gemm(M.os.path.join(M.RESULTS, "gemm-h200.json")), 0.5))
    assert f0["step_ours_bf16_vs_bf16"] > f5["step_ours_bf16_vs_bf16"] > 1
    with pytest.raises(SystemExit, match="--f"):
        M.main(["--f", "1.5", "--out", str(out)])


_TC_RHT_CONTROL = """
import sys, torch
sys.argv = ["tc_rht"]
sys.path.insert(0, "bench")
import tc_rht
from megatron_mxfp4.ops.dispatch import quantize_dual_reference
x = tc_rht.exact_regime(70, 130, 64, "cpu", seed=3)
s1, s2 = tc_rht.draw_signs(64, 5, 11), tc_rht.draw_signs(64, 5, 12)
got = tc_rht.tc_dual(x, "sr", 64, s1, s2, seed=9, offset_row=1, offset_col=2)
for name, args in (("same", (s1, s2, 9, 1, 2)), ("signs", (s2, s1, 9, 1, 2)), ("offset", (s1, s2, 9, 2, 2))):
    row, col = quantize_dual_reference(x, "sr", None, 64, *args)
    diff = sum(int((a != b).sum()) for a, b in zip(got, (row.data, row.scales, col.data, col.scales)))
    print(name, diff)
"""


def test_tensor_core_rht_prototype_is_bit_exact_on_cpu():
    """bench/tc_rht.py under Triton's interpreter: bit for bit the reference's dual quantize on inputs where the
    transform is exact (every g, SR and RTN, sizes that are no multiple of the tile), and the comparison fails
    for swapped signs or another Philox offset (the check can fail)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, os.path.join(BENCH, "tc_rht.py"), "--check", "--shape", "150x100"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("check")]
    assert len(lines) == 6 and all(" 0 of " in ln for ln in lines), p.stdout
    p = subprocess.run([sys.executable, "-c", _TC_RHT_CONTROL], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    diff = dict(ln.split() for ln in p.stdout.splitlines())
    assert diff["same"] == "0" and int(diff["signs"]) > 1000 and int(diff["offset"]) > 1000, diff
