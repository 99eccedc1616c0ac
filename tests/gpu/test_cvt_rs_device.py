"""Blackwell's stochastic conversion behind its self-test (ops/cvt_rs.py, csrc/mxfp4_cvt_rs.cuh) on the GPU.

Hopper (what runs here): the probe reports the instruction missing, the self-test leaves the software rule
without a warning, and a feed set by hand changes no bit (sm_90a code has only the software rule).
Blackwell (sm_100a; not run on our machines): the self-test's verdict, and, where it allowed the instruction,
the kernels with it equal the software rule bit for bit on every g, dtype and mode.
"""
import warnings

import pytest
import torch

from megatron_mxfp4.ops import cuda_quantize as cq
from megatron_mxfp4.ops import cvt_rs
from megatron_mxfp4.ops.dispatch import device_capability

DEV = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
BLACKWELL = DEV is not None and device_capability(DEV)[0] == 10


def _cases():
    g = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(515, 700, generator=g, device="cuda") * torch.logspace(-4, 4, 700, device="cuda")
    x[3, 7] = float("nan")
    x[9, 100] = float("inf")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for rht in (0, 32, 64, 128, 256):
            xd = x.to(dtype)
            yield f"{dtype} g={rht} dual", lambda xd=xd, rht=rht: cq.quantize_dual_cuda(
                xd, "sr", rht_block=rht, seed=3, offset_row=5, offset_col=6)
            yield f"{dtype} g={rht} dim0", lambda xd=xd, rht=rht: (cq.quantize_cuda(
                xd, 0, "sr", rht_block=rht, seed=4, offset=7),)
            yield f"{dtype} g={rht} rows p=1", lambda xd=xd, rht=rht: (cq.quantize_cuda(
                xd, -1, "sr", prescale=1.0, rht_block=rht, seed=8, offset=9),)


def _equal_under(feed):
    idx = DEV.index
    bad = []
    for name, run in _cases():
        cq._ext.set_hw_sr_feed(idx, 0)
        soft = run()
        cq._ext.set_hw_sr_feed(idx, feed)
        hard = run()
        for a, b in zip(soft, hard):
            if not (torch.equal(a.data, b.data) and torch.equal(a.scales, b.scales)):
                bad.append(name)
    cq._ext.set_hw_sr_feed(idx, cvt_rs.feed_in_use(DEV))
    return bad


@pytest.mark.skipif(BLACKWELL, reason="Hopper behaviour")
def test_hopper_has_no_instruction_and_ignores_a_feed():
    f, why = cvt_rs.calibrate(cvt_rs.device_probe(cq._ext, DEV), DEV)
    assert f == 0 and "does not contain cvt.rs" in why
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cq.quantize_cuda(torch.randn(64, 64, device=DEV), -1, "sr", seed=1)  # the self-test: silent here
    assert cvt_rs.feed_in_use(DEV) == 0 and cq._ext.hw_sr_feed(DEV.index) == 0
    assert _equal_under(cvt_rs.feed(complement=True, bias=True)) == []


@pytest.mark.skipif(not BLACKWELL, reason="needs a Blackwell GPU (sm_100)")
def test_blackwell_self_test_and_kernels():
    f, why = cvt_rs.calibrate(cvt_rs.device_probe(cq._ext, DEV), DEV)
    print(f"cvt.rs self-test on {torch.cuda.get_device_name(DEV)}: feed {f:#x}: {why}")
    if f == 0:
        pytest.skip(f"the software rule stays on this GPU: {why}")
    assert _equal_under(f) == []
