"""Codebook, scale rule, RTN and packing against the independent scalar model."""
import math
import struct

import pytest
import torch

from megatron_mxfp4 import quantize_mxfp4
from megatron_mxfp4.numerics import format as fmt
from scalar_model import GRID, floor_log2, quantize_block_rtn


def f32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


def test_codebook_exhaustive():
    table = fmt.e2m1_table()
    assert table[:8].tolist() == GRID
    assert table[8:].tolist() == [-v for v in GRID]
    # Every code is a fixed point of RTN (−0 keeps its sign bit).
    codes = fmt.round_rtn(table)
    assert codes.tolist() == list(range(16))
    # The bit layout: sign bit 3, exponent bits 2..1 (bias 1), mantissa bit 0.
    for code in range(16):
        s, e, m = code >> 3, (code >> 1) & 3, code & 1
        mag = (m * 0.5) if e == 0 else (1 + m / 2) * 2.0 ** (e - 1)
        assert table[code].item() == (-mag if s else mag)


def test_pack_roundtrip_all_bytes_and_order():
    data = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(fmt.pack_nibbles(fmt.unpack_nibbles(data)), data)
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    packed = fmt.pack_nibbles(codes)
    assert packed.tolist() == [[0x21, 0x0F]]  # first element in the low nibble
    with pytest.raises(ValueError, match="even"):
        fmt.pack_nibbles(torch.zeros(3, dtype=torch.uint8))


def test_e8m0_decode_exhaustive():
    s = torch.arange(256, dtype=torch.uint8)
    vals = fmt.decode_scales(s)
    for i in range(255):
        assert vals[i].item() == 2.0 ** (i - 127), i
    assert math.isnan(vals[255].item())


def _interesting_floats():
    vals = [0.0, 1.0, 1.5, 2.0 - 2**-23, 2.0, 3.0, 6.0, 7.99, 8.0, 1e-30, 3.4e38, 1.17549435e-38,
            1.17549421e-38, 1e-40, 1.4e-45, 2.0**-126, 2.0**-125, 2.0**-124, 2.0**127]
    g = torch.Generator().manual_seed(0)
    rand = torch.exp2(torch.empty(2000).uniform_(-149, 127, generator=g)).tolist()
    return [f32(v) for v in vals + rand]


def test_shared_exponent_matches_frexp():
    vals = _interesting_floats()
    e = fmt.shared_exponent(torch.tensor(vals, dtype=torch.float32))
    for v, got in zip(vals, e.tolist()):
        want = -127 if v == 0.0 else max(-127, min(127, floor_log2(v) - 2))
        assert got == want, (v, got, want)


def _adversarial_blocks():
    """Blocks of 32 that stress every branch of the scale and rounding rules."""
    g = torch.Generator().manual_seed(1)
    blocks = []
    for e in (-127, -126, -100, -3, 0, 1, 20, 125):
        base = 2.0**e
        # Ties at every midpoint, both signs, plus the block max fixing the exponent.
        mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
        b = [4.0 * base] + [m * base for m in mids] + [-m * base for m in mids]
        # Values in (6, 8) · 2^e, which clip to 6 under RTN; and just around thresholds.
        b += [6.5 * base, -7.9 * base, 7.0 * base, 5.0000005 * base, 0.2499999 * base, 0.0, -0.0]
        b += [float(t) * base for t in torch.randn(32 - len(b), generator=g)]
        blocks.append([f32(v) for v in b[:32]])
    blocks.append([0.0] * 32)  # all-zero block: smallest scale, zero codes
    blocks.append([1e-45 * (i % 3) for i in range(32)])  # subnormals
    blocks.append([3.0e38 * (1 - 2 * (i % 2)) for i in range(32)])  # huge
    nan_block = [float(i) for i in range(32)]
    nan_block[5] = float("nan")
    inf_block = [float(i) for i in range(32)]
    inf_block[7] = float("-inf")
    blocks += [nan_block, inf_block]
    return [[f32(v) for v in b] for b in blocks]


def test_rtn_matches_scalar_model_on_adversarial_inputs():
    blocks = _adversarial_blocks()
    x = torch.tensor(blocks, dtype=torch.float32)  # [n_blocks, 32]: one MX block per row
    q = quantize_mxfp4(x, dim=-1, rounding="rtn")
    codes = q.codes()
    for i, block in enumerate(blocks):
        scale, want = quantize_block_rtn(block)
        assert q.scales[i, 0].item() == scale, (i, block[:4])
        assert codes[i].tolist() == want, (i, block)


def test_nonfinite_blocks_propagate_and_leave_others_intact():
    x = torch.randn(4, 64)
    x[1, 40] = float("nan")
    x[3, 0] = float("inf")
    q = quantize_mxfp4(x, dim=-1, rounding="sr")
    d = q.dequantize()
    assert torch.isnan(d[1, 32:]).all() and torch.isnan(d[3, :32]).all()
    assert torch.isfinite(d[1, :32]).all() and torch.isfinite(d[3, 32:]).all()
    assert torch.isfinite(d[[0, 2]]).all()
    assert q.scales[1, 1].item() == 0xFF and q.scales[3, 0].item() == 0xFF


def test_rtn_error_bound_and_saturation():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 256, generator=g) * torch.exp2(torch.randint(-20, 20, (64, 1), generator=g).float())
    q = quantize_mxfp4(x, rounding="rtn")
    err = (q.dequantize() - x).abs().reshape(64, 8, 32)
    scale = fmt.decode_scales(q.scales).unsqueeze(-1)
    # Half the largest gap (1 at the top of the grid) except clipped values (< 2 · 2^e).
    assert (err <= 2.0 * scale).all()
    inside = x.abs().reshape(64, 8, 32) <= 6 * scale
    assert (err[inside] <= (1.0 * scale.expand_as(err))[inside]).all()


@pytest.mark.parametrize("dim", [0, 1, 2, -1])
def test_quantize_along_any_dim(dim):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 32, 96, generator=g)
    q = quantize_mxfp4(x, dim=dim, rounding="rtn")
    qt = quantize_mxfp4(x.movedim(dim, -1).contiguous(), dim=-1, rounding="rtn")
    assert q.data.shape[dim] == x.shape[dim] // 2 and q.scales.shape[dim] == x.shape[dim] // 32
    assert torch.equal(q.codes().movedim(dim, -1), qt.codes())
    assert torch.equal(q.dequantize().movedim(dim, -1), qt.dequantize())


def test_bfloat16_input_is_quantized_from_its_exact_value():
    x = torch.randn(8, 64).to(torch.bfloat16)
    assert torch.equal(quantize_mxfp4(x).codes(), quantize_mxfp4(x.float()).codes())


@pytest.mark.parametrize("bad, match", [
    (dict(x=torch.randn(4, 48)), "multiple of the MX block 32"),
    (dict(x=torch.randn(4, 96), rht_block=64), "multiple of rht_block=64"),
    (dict(x=torch.randn(4, 64), rht_block=48), "rht_block must be"),
    (dict(x=torch.randint(0, 3, (4, 64))), "float32/bfloat16/float16"),
    (dict(x=torch.randn(4, 64), rounding="nearest"), "rounding must be"),
    (dict(x=torch.randn(4, 64), dim=2), "out of range"),
    (dict(x=torch.randn(4, 64), rht_block=32, signs=torch.ones(16)), "32 entries"),
    (dict(x=torch.randn(4, 64), prescale=1.5), "prescale"),
    (dict(x=torch.randn(4, 64), backend="hopper"), "hopper"),
])
def test_bad_inputs_raise_clear_errors(bad, match):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        quantize_mxfp4(**bad)
