"""Diagnostics: statistics on synthetic gradients with known noise, the guard, rank agreement."""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_mxfp4 import mxfp4_gemm, quantize_mxfp4
from megatron_mxfp4.diagnostics import MXFP4Monitor, gemm_error_stats, operand_stats


def test_error_stats_recover_known_snr():
    g = torch.Generator().manual_seed(0)
    exact = torch.randn(256, 256, generator=g)
    for snr in (0.5, 2.0, 10.0):
        noise = torch.randn(256, 256, generator=g)
        noise *= exact.norm() / (snr * noise.norm())
        s = gemm_error_stats(exact, exact + noise)
        assert s["snr"] == pytest.approx(snr, rel=1e-5)
        assert s["rel_err"] == pytest.approx(1 / snr, rel=1e-5)
        # independent noise: cos = 1 / sqrt(1 + 1/snr²) up to sampling (65k entries: ±1%)
        assert s["cosine"] == pytest.approx((1 + snr**-2) ** -0.5, rel=0.02)


def test_operand_stats_count_clipping_blocks_and_flushes():
    x = torch.ones(2, 64)
    x[0, 0] = 7.0  # block 0: max 7 = 7·2^0 → would clip without the prescale
    x[1, 32] = 4.0  # block 3: max 4 → fine
    x[1, 33:40] = 1e-6  # tiny entries beside a large max → flushed to zero
    q = quantize_mxfp4(x, rounding="rtn")
    clip, zero = operand_stats(x, None, q.codes())
    assert clip == pytest.approx(1 / 4)
    assert zero == pytest.approx(7 / 128)



def test_operand_stats_of_a_zero_padded_reduction():
    """K = 40 (an expert's token count): padded to the RHT block like the quantizer pads it (DESIGN §3)."""
    from megatron_mxfp4.numerics.rht import draw_signs

    x = torch.ones(2, 40)
    x[0, 0] = 7.0
    signs = draw_signs(64, 1, 2)
    q = quantize_mxfp4(x, rounding="rtn", rht_block=64, signs=signs)
    clip, zero = operand_stats(x, signs, q.codes())
    assert 0 <= clip <= 1 and 0 <= zero < 1
    assert operand_stats(x, None, quantize_mxfp4(x, rounding="rtn").codes()) == (0.25, 0.0)  # 1 of 2 x 2 blocks


def _feed(mon, snrs):
    for snr in snrs:
        if mon.sampling:
            mon.record("layers.0.fc1", "wgrad", dict(snr=snr, rel_err=1 / snr))
        mon.end_step()


def test_guard_switches_exactly_after_patience_low_checks():
    mon = MXFP4Monitor(interval=1, snr_threshold=2.0, patience=3)
    _feed(mon, [5, 1, 1, 5, 1, 1])  # interrupted run of low checks: no switch
    assert mon.switched() == {} and mon.quantized("layers.0.fc1", "wgrad")
    _feed(mon, [1])  # third consecutive low check at step 6
    assert mon.switched() == {("layers.0.fc1", "wgrad"): 6}
    assert not mon.quantized("layers.0.fc1", "wgrad") and mon.quantized("layers.0.fc1", "dgrad")
    assert any(r.get("event") == "switched_to_unquantized" for r in mon.history)


def test_guard_off_by_default_and_sampling_interval():
    mon = MXFP4Monitor(interval=4)
    sampled = []
    for step in range(9):
        sampled.append(mon.sampling)
        if mon.sampling:
            mon.record("l", "dgrad", dict(snr=0.1))
        mon.end_step()
    assert sampled == [True, False, False, False, True, False, False, False, True]
    assert mon.switched() == {} and len(mon.history) == 3


def test_unquantized_tail_schedule():
    mon = MXFP4Monitor(interval=0, unquantized_tail=0.25, total_steps=8)
    flags = []
    for _ in range(8):
        flags.append(mon.quantized("l", "dgrad"))
        mon.end_step()
    assert flags == [True] * 6 + [False] * 2
    with pytest.raises(ValueError, match="total_steps"):
        MXFP4Monitor(unquantized_tail=0.1)


def test_jsonl_log(tmp_path):
    path = tmp_path / "diag.jsonl"
    mon = MXFP4Monitor(interval=1, jsonl_path=str(path))
    _feed(mon, [3.0, 4.0])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["snr"] for r in rows] == [3.0, 4.0] and rows[1]["step"] == 1


def _rank_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mon = MXFP4Monitor(interval=1, snr_threshold=2.0, patience=2)
    # Rank 0 sees low SNR, rank 1 high: the mean (1.5 then 2.5, ...) decides identically on both.
    per_rank = {0: [1.0, 1.0, 1.0, 1.0], 1: [2.0, 4.0, 2.5, 2.5]}[rank]
    _feed(mon, per_rank)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"switched": {f"{k[0]}/{k[1]}": v for k, v in mon.switched().items()},
                   "snr": [r["snr"] for r in mon.history if "event" not in r]}, f)
    dist.destroy_process_group()


def test_guard_decisions_agree_across_two_ranks(tmp_path):
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1
    assert r0["snr"] == [1.5, 2.5, 1.75, 1.75]
    assert r0["switched"] == {"layers.0.fc1/wgrad": 3}


def test_monitor_sees_every_gemm_of_a_converted_model_and_guard_switches():
    from torch import nn

    from megatron_mxfp4 import MXFP4Recipe, convert_linears
    from megatron_mxfp4.diagnostics import set_active_monitor

    torch.manual_seed(0)
    model = convert_linears(nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)), MXFP4Recipe())
    # Threshold above any achievable SNR: the guard must switch every GEMM after `patience` checks.
    mon = MXFP4Monitor(interval=1, snr_threshold=1e9, patience=2)
    set_active_monitor(mon)
    try:
        x = torch.randn(64, 64, requires_grad=True)
        for _ in range(3):
            model(x).square().mean().backward()
            mon.end_step()
    finally:
        set_active_monitor(None)
    stats = [r for r in mon.history if "event" not in r]
    assert {(r["layer"], r["gemm"]) for r in stats} == {(n, g) for n in ("0", "2") for g in ("dgrad", "wgrad")}
    first = [r for r in stats if r["step"] == 0]
    assert all(2.0 < r["snr"] < 100 and r["cosine"] > 0.9 for r in first)  # MXFP4+SR+RHT: SNR ~ 5-10
    assert set(mon.switched().values()) == {1}
    # After the switch the GEMMs run unquantized, so there is nothing left to measure.
    assert not [r for r in stats if r["step"] == 2]


def test_report_summary_and_heatmap(tmp_path):
    from megatron_mxfp4.report import main as report_main

    mon = MXFP4Monitor(interval=1, snr_threshold=2.0, patience=1, jsonl_path=str(tmp_path / "diagnostics.jsonl"))
    for snr in (5.0, 1.0):
        for layer in ("decoder.layers.0.mlp.linear_fc1", "decoder.layers.1.mlp.linear_fc1"):
            mon.record(layer, "wgrad", dict(snr=snr))
        mon.end_step()
    pytest.importorskip("matplotlib")
    report_main([str(tmp_path)])
    png = tmp_path / "diagnostics-snr.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"


def test_sampling_overhead_from_the_runs_own_step_times():
    from megatron_mxfp4.report import sampling_overhead

    # 400 steps of 100 ms; the sampled steps 0, 100, 200, 300 take 150 ms (step 0 also pays warm-up).
    train = [{"kind": "train", "step": s, "step_time": 0.1 + (0.05 if s % 100 == 0 else 0.0) + (1.0 if s == 0 else 0)}
             for s in range(400)]
    o = sampling_overhead(train, [0, 100, 200, 300])
    assert o["sampled_steps"] == 3 and o["interval"] == 100
    assert o["extra_per_sample_s"] == pytest.approx(0.05)
    assert o["overhead"] == pytest.approx(0.05 / (100 * 0.1))  # 0.5 %
    with pytest.raises(ValueError, match="unsampled"):
        sampling_overhead(train[:2], [0])


def test_report_prints_the_overhead_of_a_training_run(tmp_path, capsys):
    from megatron_mxfp4.report import main as report_main

    pytest.importorskip("matplotlib")
    mon = MXFP4Monitor(interval=10, jsonl_path=str(tmp_path / "diagnostics.jsonl"))
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(40):
            if mon.sampling:
                mon.record("decoder.layers.0.mlp.linear_fc1", "wgrad", dict(snr=5.0))
            mon.end_step()
            f.write(json.dumps({"kind": "train", "step": step, "step_time": 0.2 if step % 10 == 0 else 0.1}) + "\n")
    report_main([str(tmp_path)])
    assert "sampling overhead: 10.00% of training time" in capsys.readouterr().out


def test_measure_gemm_records_every_statistic_under_its_name():
    from megatron_mxfp4 import diagnostics

    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(64, 128, generator=g), torch.randn(32, 128, generator=g)
    a[0, :32] *= 100  # a block that clips without the prescale, and small entries that flush
    signs = torch.where(torch.rand(64, generator=g) < 0.5, -1.0, 1.0)
    qa = quantize_mxfp4(a, rounding="sr", rht_block=64, signs=signs, seed=1, offset=1)
    qb = quantize_mxfp4(b, rounding="sr", rht_block=64, signs=signs, seed=1, offset=2)
    approx = mxfp4_gemm(qa, qb)
    mon = MXFP4Monitor(interval=1)
    diagnostics.set_active_monitor(mon)
    try:
        diagnostics.measure_gemm("l0", "dgrad", lambda: a @ b.t(), approx, a, qa, b, qb, signs)
    finally:
        diagnostics.set_active_monitor(None)
    (rec,) = mon.end_step()
    want = gemm_error_stats(a @ b.t(), approx)
    want["clip_frac_a"], want["zero_frac_a"] = operand_stats(a, signs, qa.codes())
    want["clip_frac_b"], want["zero_frac_b"] = operand_stats(b, signs, qb.codes())
    assert want["clip_frac_a"] > 0 and want["zero_frac_a"] > 0 and want["clip_frac_a"] != want["clip_frac_b"]
    for name, value in want.items():
        assert rec[name] == pytest.approx(value, rel=1e-12), name


def test_operand_fractions_on_strided_rows_estimate_the_whole_operand(monkeypatch):
    from megatron_mxfp4 import diagnostics

    g = torch.Generator().manual_seed(5)
    x = torch.randn(4096, 256, generator=g) * torch.rand(4096, 1, generator=g)  # rows of different scale
    x[:, ::7] *= 40  # outlier columns: blocks near the clipping range, small entries flushed
    signs = torch.where(torch.rand(64, generator=g) < 0.5, -1.0, 1.0)
    q = quantize_mxfp4(x, rounding="sr", rht_block=64, signs=signs, seed=2, offset=9)
    full = operand_stats(x, signs, q.codes())
    monkeypatch.setattr(diagnostics, "OPERAND_STAT_ROWS", 512)
    xs, cs = diagnostics._strided_rows(x, q)
    assert xs.shape[0] == 512 and torch.equal(cs, q.codes()[::8])
    est = diagnostics._operand_stats(xs, signs, cs).tolist()
    assert full[0] > 0.01 and full[1] > 0.01
    # 512 of 4096 rows, 8 blocks each: a binomial fraction over 4096 blocks, 5 standard errors apart at most
    for f, e in zip(full, est):
        assert abs(e - f) <= 5 * (f * (1 - f) / 4096) ** 0.5 + 1e-12


def test_exact_product_is_the_float32_product_on_cpu():
    from megatron_mxfp4.diagnostics import exact_product

    a = torch.randn(64, 96).bfloat16()
    b = torch.randn(96, 32).bfloat16()
    assert torch.equal(exact_product(a, b), a.float() @ b.float())
