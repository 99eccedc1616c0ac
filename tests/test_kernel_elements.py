"""The quantize kernels' element encoders (csrc/mxfp4_element.cuh), compiled for the host with nvcc and run on
the CPU, against the reference's `round_rtn` / `round_sr`: the device source itself, not an emulation of it.

Inputs: every (grid interval, ⌊512 f⌋ bucket) at both bucket ends with all 256 dither bytes and both signs
(the rule's whole decision table), the RTN midpoints and their neighbours, ±0, subnormals, values up to 8 (no
prescale) and a log-uniform sample over the float32 exponents. `code_sr_at` (the unclamped encoder placed in
its nibble), `pack8_sr` (eight of them with their dither bytes taken from two Philox words) and
`pack8_sr_pairs` (the same, two elements per instruction in FP16 lanes) are checked on their domain |v| ≤ 6.
Skipped without nvcc.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import csrc_build  # noqa: E402

from megatron_mxfp4.numerics.format import E2M1_VALUES, round_rtn, round_sr  # noqa: E402
from megatron_mxfp4.ops import cvt_rs  # noqa: E402

NVCC = csrc_build.nvcc_path()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    exe = str(tmp_path_factory.mktemp("elements") / "element_harness")
    r = subprocess.run([NVCC, "-O2", "-std=c++17", "-I" + os.path.join(ROOT, "csrc"), "-o", exe,
                        os.path.join(ROOT, "tests", "csrc", "element_harness.cu")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return exe


def run(harness, tmp_path, v: torch.Tensor, r: torch.Tensor):
    rec = np.zeros(v.numel(), dtype=[("v", "<f4"), ("r", "u1")])
    rec["v"] = v.numpy()
    rec["r"] = r.numpy().astype(np.uint8)
    src, dst = str(tmp_path / "in.bin"), str(tmp_path / "out.bin")
    rec.tofile(src)
    p = subprocess.run([harness, src, dst], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    raw = np.fromfile(dst, dtype=np.uint8)
    n = v.numel()
    per = torch.from_numpy(raw[:3 * n].reshape(-1, 3).copy())
    return (per[:, 0], per[:, 1], per[:, 2], torch.from_numpy(raw[3 * n:4 * n].copy()),
            torch.from_numpy(raw[4 * n:].copy()))


def inputs():
    v, words = cvt_rs.probe_table()  # every (interval, bucket, end, sign) x all 256 bytes
    r = cvt_rs.word_bytes(words)
    grid = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    mids = torch.cat([(grid[:-1] + grid[1:]) / 2, grid, torch.tensor([6.5, 7.0, 7.5, 7.999999, 1e-40, 1e-45])])
    around = torch.cat([mids, torch.nextafter(mids, torch.zeros_like(mids)), torch.nextafter(mids, mids + 1)])
    gen = torch.Generator().manual_seed(0)
    logu = torch.exp2(torch.empty(200_000).uniform_(-150, 3, generator=gen)).clamp(max=7.999)
    extra = torch.cat([around, -around, logu, -logu])
    er = torch.randint(0, 256, (extra.numel(),), generator=gen)
    return torch.cat([v, extra]), torch.cat([r, er])


def test_encoders_equal_the_reference(harness, tmp_path):
    v, r = inputs()
    rtn, sr, sat, packed, pairs = run(harness, tmp_path, v, r)
    want_rtn, want_sr = round_rtn(v), round_sr(v, r)
    assert torch.equal(rtn, want_rtn), int((rtn != want_rtn).sum())
    assert torch.equal(sr, want_sr), int((sr != want_sr).sum())
    dom = v.abs() <= 6  # v = 6 happens: 3/4 of the largest float below 8 rounds to 6
    assert int(dom.sum()) > 3_000_000
    assert torch.equal(sat[dom], want_sr[dom]), int((sat[dom] != want_sr[dom]).sum())
    assert bool((sat[~dom] == 0xFF).all())
    groups = dom[: v.numel() // 8 * 8].view(-1, 8).all(dim=1).repeat_interleave(8)
    assert int(groups.sum()) > 2_000_000
    idx = torch.nonzero(groups).flatten()
    assert torch.equal(packed[idx], want_sr[idx]), int((packed[idx] != want_sr[idx]).sum())
    assert torch.equal(pairs[idx], want_sr[idx]), int((pairs[idx] != want_sr[idx]).sum())


def test_the_harness_can_fail(harness, tmp_path):
    """Negative control: a dither byte off by one changes codes that the reference pins."""
    v, r = inputs()
    _, sr, _, _, _ = run(harness, tmp_path, v, (r + 1) % 256)
    assert int((sr != round_sr(v, r)).sum()) > 10_000
