"""The experimental dual kernel with the Hadamard transform on tensor cores (csrc/mxfp4_quantize_tc.cu,
`cuda_quantize.TC_DUAL`) against the reference: bit for bit where the transform is exact (BF16 blocks spanning
≤ 10 binades at g = 64, DESIGN §2.3), and within the contract's tolerance elsewhere (≤ 1e-4 of the codes
differ, each by one grid step, scales equal).
"""
import pytest
import torch

from megatron_mxfp4.numerics.format import unpack_nibbles
from megatron_mxfp4.numerics.rht import draw_signs
from megatron_mxfp4.ops import cuda_quantize as cq
from megatron_mxfp4.ops.dispatch import quantize_dual_reference

DEV = "cuda"
SHAPES = ((64, 64), (1, 64), (63, 65), (300, 200), (2047, 130), (1024, 4096))


@pytest.fixture
def tc(monkeypatch):
    monkeypatch.setattr(cq, "TC_DUAL", True)


def exact_regime(t, n, seed):
    """BF16 values with 8-bit mantissas and exponents in [-5, 4]: every float32 partial sum of a 64-block is
    exact, so any summation order gives the butterflies' result."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    mant = 1 + torch.randint(0, 128, (t, n), generator=g, device=DEV) / 128
    e = torch.randint(-5, 5, (t, n), generator=g, device=DEV).float()
    sign = torch.where(torch.rand(t, n, generator=g, device=DEV) < 0.5, -1.0, 1.0)
    x = sign * mant * torch.exp2(e)
    x[torch.rand(t, n, generator=g, device=DEV) < 0.05] = 0.0
    return x.to(torch.bfloat16)


def _run(x, rounding, signs, seed=0xC0FFEE12_3456789A, offsets=((7 << 48) | 0x21, 5)):
    s_row, s_col = signs
    got = cq.quantize_dual_cuda(x, rounding, rht_block=64, signs_row=s_row, signs_col=s_col, seed=seed,
                                offset_row=offsets[0], offset_col=offsets[1], swizzle=False)
    ref = quantize_dual_reference(x, rounding, None, 64, s_row, s_col, seed, offsets[0], offsets[1])
    return got, ref


@pytest.mark.parametrize("rounding", ["sr", "rtn"])
@pytest.mark.parametrize("shape", SHAPES)
def test_bit_exact_where_the_transform_is_exact(tc, shape, rounding):
    x = exact_regime(*shape, seed=shape[0])
    signs = (draw_signs(64, 3, 1, DEV), draw_signs(64, 3, 2, DEV))
    got, ref = _run(x, rounding, signs)
    for a, b, what in ((got[0], ref[0], "row"), (got[1], ref[1], "column")):
        assert torch.equal(a.scales, b.scales), what
        assert torch.equal(a.data, b.data), (what, int((a.data != b.data).sum()))


def test_drawn_signs_device_offsets_and_non_finite(tc):
    x = exact_regime(256, 192, seed=7)
    x[5, 17] = float("nan")
    x[100, 3] = float("inf")
    seed = torch.tensor([0x1234], dtype=torch.int64, device=DEV)
    off = (torch.tensor([99], dtype=torch.int64, device=DEV), torch.tensor([1 << 40], dtype=torch.int64, device=DEV))
    got = cq.quantize_dual_cuda(x, "sr", rht_block=64, seed=seed, offset_row=off[0], offset_col=off[1], swizzle=False)
    ref = quantize_dual_reference(x, "sr", None, 64, got[0].signs, got[1].signs, 0x1234, 99, 1 << 40)
    ref_signs = (draw_signs(64, 0x1234, 99, DEV), draw_signs(64, 0x1234, 1 << 40, DEV))
    assert torch.equal(got[0].signs, ref_signs[0]) and torch.equal(got[1].signs, ref_signs[1])
    for a, b in zip(got, ref):
        assert torch.equal(a.scales, b.scales) and torch.equal(a.data, b.data)
    assert (got[0].scales == 0xFF).any() and (got[1].scales == 0xFF).any()


@pytest.mark.parametrize("rounding", ["sr", "rtn"])
def test_gaussian_within_the_contract_tolerance(tc, rounding):
    g = torch.Generator(device=DEV).manual_seed(11)
    x = (torch.randn(4096, 2048, generator=g, device=DEV) * torch.exp2(torch.randint(
        -12, 13, (4096, 1), generator=g, device=DEV).float())).to(torch.bfloat16)
    signs = (draw_signs(64, 3, 1, DEV), draw_signs(64, 3, 2, DEV))
    got, ref = _run(x, rounding, signs)
    for a, b, what in ((got[0], ref[0], "row"), (got[1], ref[1], "column")):
        assert torch.equal(a.scales, b.scales), what
        ca, cb = unpack_nibbles(a.data).long(), unpack_nibbles(b.data).long()
        differ = ca != cb
        frac = differ.float().mean().item()
        print(f"{what} copy, {rounding}: {frac:.2e} of the codes differ from the butterflies")
        assert frac <= 1e-4, (what, frac)
        step = ((ca & 7) - (cb & 7)).abs()
        assert bool(((step == 1) & ((ca & 8) == (cb & 8)) | (~differ)).all()), what


def test_same_as_the_butterfly_kernel_where_exact(tc, monkeypatch):
    x = exact_regime(512, 384, seed=3)
    signs = (draw_signs(64, 3, 1, DEV), draw_signs(64, 3, 2, DEV))
    got, _ = _run(x, "sr", signs)
    monkeypatch.setattr(cq, "TC_DUAL", False)
    want, _ = _run(x, "sr", signs)
    for a, b in zip(got, want):
        assert torch.equal(a.data, b.data) and torch.equal(a.scales, b.scales)
