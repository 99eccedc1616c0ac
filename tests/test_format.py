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
    # SR: the dither index runs over the logical order, the quantized dim moved last
    q = quantize_mxfp4(x, dim=dim, rounding="sr", rht_block=32, seed=1, offset=2)
    qt = quantize_mxfp4(x.movedim(dim, -1).contiguous(), dim=-1, rounding="sr", rht_block=32, seed=1, offset=2)
    assert torch.equal(q.codes().movedim(dim, -1), qt.codes())


def test_bfloat16_input_is_quantized_from_its_exact_value():
    x = torch.randn(8, 64).to(torch.bfloat16)
    assert torch.equal(quantize_mxfp4(x).codes(), quantize_mxfp4(x.float()).codes())


def test_sr_threshold_by_enumeration():
    """Contract v2: t = (floor(512 f) + 1) >> 1 sees only q = floor(512 f) (9 bits). Enumerating q proves
    |P(up) - f| = |t/256 - f| <= 1/512 for every f in [q/512, (q+1)/512), i.e. for every float32 f in [0, 1)."""
    q = torch.arange(512)
    lo_f, hi_f = q.double() / 512, (q.double() + 1) / 512
    t = fmt.sr_threshold(lo_f.float())
    assert torch.equal(t, (q + 1) >> 1) and t.min() == 0 and t.max() == 256
    assert torch.equal(fmt.sr_threshold((hi_f - 2**-24).float()), t)  # the largest float32 of the interval
    p_up = t.double() / 256
    assert ((p_up - lo_f).abs() <= 1 / 512).all() and ((p_up - hi_f).abs() <= 1 / 512).all()
    assert (p_up - lo_f).abs().max() == 1 / 512  # the bound is attained: it is the resolution of 8 bits


def test_round_sr_decides_by_the_threshold_on_every_interval_and_dither():
    """Every grid interval, every 9-bit fraction q (at f = q/512 and just below the next boundary) and
    every 8-bit dither r: round_sr rounds up iff r < t(q), with the sign kept and saturation at 6."""
    grid = fmt.E2M1_VALUES
    q = torch.arange(512, dtype=torch.float64)
    for c in range(7):
        lo, gap = grid[c], grid[c + 1] - grid[c]
        for f in (q / 512, (q + 1) / 512 - 2**-20):
            v = (lo + gap * f).float()
            assert torch.equal((v.double() - lo) / gap, f)  # f exact in float32 here
            vv = torch.cat([v, -v]).repeat_interleave(256)
            r = torch.arange(256).repeat(1024)
            codes = fmt.round_sr(vv, r)
            up = (r < fmt.sr_threshold(torch.cat([f, f]).float().repeat_interleave(256))).to(torch.uint8)
            mag = c + up
            want = mag | (torch.signbit(vv).to(torch.uint8) << 3)
            assert torch.equal(codes, want), c
    big = torch.tensor([6.0, 7.5, -6.0])
    assert fmt.round_sr(big, torch.zeros(3, dtype=torch.int64)).tolist() == [7, 7, 15]


@pytest.mark.parametrize("k", [1, 12, 31, 33, 100, 2047])
@pytest.mark.parametrize("rounding, g", [("rtn", 0), ("sr", 0), ("sr", 64), ("rtn", 128)])
def test_any_size_quantizes_as_its_explicit_zero_padding(k, rounding, g):
    """DESIGN §3: a reduction size that is not a multiple of 32 / g is zero-padded; the codes, scales and
    dither indices are those of the explicitly padded tensor, bit for bit."""
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(k))
    kp = -(-k // max(32, g)) * max(32, g)
    xp = torch.nn.functional.pad(x, (0, kp - k))
    q = quantize_mxfp4(x, rounding=rounding, rht_block=g, seed=9, offset=4)
    qp = quantize_mxfp4(xp, rounding=rounding, rht_block=g, seed=9, offset=4)
    assert q.shape == (3, k) and q.padded_shape == (3, kp)
    assert torch.equal(q.data, qp.data) and torch.equal(q.scales, qp.scales)
    d = q.dequantize()
    assert d.shape == ((3, kp) if g else (3, k))
    # along dim 0 as well (the logical order moves the quantized dim last)
    q0 = quantize_mxfp4(x.t(), dim=0, rounding=rounding, rht_block=g, seed=9, offset=4)
    assert torch.equal(q0.data.t(), qp.data) and torch.equal(q0.scales.t(), qp.scales)


def test_empty_tensors_quantize_to_empty_outputs():
    for shape, dim in (((0, 64), -1), ((5, 0), -1), ((0, 7), 0)):
        q = quantize_mxfp4(torch.empty(shape), dim=dim, rounding="sr", rht_block=64)
        assert q.shape == shape and q.data.numel() == 0 and q.dequantize().numel() == 0


@pytest.mark.parametrize("bad, match", [
    (dict(x=torch.randn(4, 64), rht_block=48), "rht_block must be"),
    (dict(x=torch.randint(0, 3, (4, 64))), "float32/bfloat16/float16"),
    (dict(x=torch.randn(4, 64).double()), "float32/bfloat16/float16"),
    (dict(x=torch.randn(4, 64), rounding="nearest"), "rounding must be"),
    (dict(x=torch.randn(4, 64), dim=2), "out of range"),
    (dict(x=torch.randn(4, 64), rht_block=32, signs=torch.ones(16)), "32 entries"),
    (dict(x=torch.randn(4, 64), prescale=1.5), "prescale"),
    (dict(x=torch.randn(4, 64), backend="hopper"), "hopper"),
])
def test_bad_inputs_raise_clear_errors(bad, match):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        quantize_mxfp4(**bad)


def _kernel_code_sr(v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """csrc/mxfp4_quantize_kernel.cuh `code_sr`, emulated with integer ops: the float add rounded toward
    zero is exact here in float64 (both terms < 2^24), then floored."""
    xb = v.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    xc = (xb & 0x7F800000).clamp(127 << 23, 129 << 23)
    w = v.abs().double() * ((((264 << 23) - xc) & 0xFFFFFFFF).to(torch.int32).view(torch.float32)).double()
    c = (0x4B0001FF - (127 << 10)) + (xc >> 13) - 2 * r
    z = torch.floor(w + c.to(torch.int32).view(torch.float32).double()).float().view(torch.int32).to(torch.int64)
    mag = ((z >> 9) & 15).clamp(max=7)
    return (mag | ((xb >> 28) & 8)).to(torch.uint8)


def test_kernel_sr_formula_matches_round_sr():
    """The kernel's one-add SR code (no table, no comparison) equals `round_sr` for every dither value on
    scaled values covering every binade below 8 (subnormals included), the grid points and the 9-bit
    fraction boundaries."""
    g = torch.Generator().manual_seed(7)
    rand = torch.exp2(torch.empty(4000).uniform_(-149, 3, generator=g)) * torch.empty(4000).uniform_(1, 2, generator=g)
    grid = torch.tensor(fmt.E2M1_VALUES)
    gaps = torch.tensor([0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 2.0])
    edges = (grid[:7, None] + gaps[:, None] * torch.arange(0, 513, 37.0) / 512).flatten()
    v = torch.cat([rand, edges, grid, torch.tensor([0.0, 5.999, 6.0, 7.99, 2**-149])]).clamp(max=7.99)
    v = torch.cat([v, -v])
    vv = v.repeat_interleave(256)
    r = torch.arange(256).repeat(v.numel())
    assert torch.equal(_kernel_code_sr(vv, r), fmt.round_sr(vv, r))
