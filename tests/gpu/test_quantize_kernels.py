"""The compiled quantize kernels (csrc/, backend "cuda") against the PyTorch reference, bit for bit.

Every test compares packed codes and E8M0 scales byte for byte with `quantize_reference` (run on
the same device: its float32 element-wise operations are IEEE and its Philox stream is integer
arithmetic, so it is the oracle on the GPU as on the CPU; one test checks that as well).
"""
import warnings

import pytest
import torch

from megatron_mxfp4.numerics.quantize import quantize_reference
from megatron_mxfp4.numerics.rht import draw_signs
from megatron_mxfp4.ops import cuda_quantize as cq
from megatron_mxfp4.ops import quantize_mxfp4, quantize_mxfp4_dual
from megatron_mxfp4.ops.dispatch import quantize_dual_reference

DEV = "cuda"
GS = (0, 32, 64, 128, 256)
DTYPES = (torch.bfloat16, torch.float32, torch.float16)
SEED = 0xC0FFEE12_3456789A  # >= 2**63: exercises the unsigned 64-bit key
OFFSET = (7 << 48) | (123456 << 8) | 0x21


def gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


def sample(shape, dtype, seed=0, spread=12):
    """Gaussian values with a per-row binade spread (blocks of very different scales)."""
    g = gen(seed)
    x = torch.randn(shape, generator=g, device=DEV, dtype=torch.float32)
    rows = torch.randint(-spread, spread + 1, (shape[0], 1), generator=g, device=DEV).float()
    x = x * torch.exp2(rows)
    return x.to(dtype)


def signs_for(g, seed):
    if not g:
        return None
    return draw_signs(g, seed, 99, DEV)


def assert_same(got, ref, what=""):
    assert got.shape == ref.shape and got.dim == ref.dim, (what, got.shape, ref.shape, got.dim, ref.dim)
    assert got.prescale == ref.prescale and got.rht_block == ref.rht_block, what
    for name in ("data", "scales"):
        a, b = getattr(got, name), getattr(ref, name)
        assert a.shape == b.shape and a.dtype == b.dtype, (what, name, a.shape, b.shape)
        if not torch.equal(a, b):
            bad = (a != b).nonzero()
            raise AssertionError(f"{what}: {name} differ in {len(bad)} of {a.numel()} bytes, first at "
                                 f"{bad[0].tolist()}: got {a[tuple(bad[0])].item():#04x}, "
                                 f"want {b[tuple(bad[0])].item():#04x}")
    if ref.signs is not None:
        assert torch.equal(got.signs, ref.signs), what


def test_extension_loaded():
    assert cq.is_available(), cq._LOAD_ERROR
    assert cq.supports(torch.zeros(1, device=DEV)) is None
    assert cq.supports(torch.zeros(1)) is not None  # CPU tensors are refused with a reason


def qdim(g):
    return max(g, 32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g", GS)
@pytest.mark.parametrize("rounding", ("rtn", "sr"))
@pytest.mark.parametrize("given_signs", (True, False))
def test_rowwise(dtype, g, rounding, given_signs):
    # 72 rows (not a multiple of the 64-row tile), K not a multiple of the 256-column tile
    x = sample((72, 512 + qdim(g)), dtype, seed=g + 1)
    s = signs_for(g, 5) if given_signs else None
    kw = dict(rounding=rounding, rht_block=g, signs=s, seed=SEED, offset=OFFSET)
    assert_same(quantize_mxfp4(x, -1, backend="cuda", **kw), quantize_reference(x, -1, **kw), "rowwise")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g", GS)
@pytest.mark.parametrize("rounding", ("rtn", "sr"))
@pytest.mark.parametrize("n", (200, 196))  # 196 bf16 = 392 bytes per row: not whole 16-byte chunks
def test_columnwise_transposed_view(dtype, g, rounding, n):
    """quantize_mxfp4(base.t(), dim=-1): the backward's dYᵀ / Xᵀ / Wᵀ operands (column kernel)."""
    t = 3 * qdim(g) if g >= 128 else 320 + qdim(g)
    base = sample((t, n), dtype, seed=7 + g)
    x = base.t()
    kw = dict(rounding=rounding, rht_block=g, signs=signs_for(g, 3), seed=SEED, offset=OFFSET + 1)
    assert_same(quantize_mxfp4(x, -1, backend="cuda", **kw), quantize_reference(x, -1, **kw), "columnwise")


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
@pytest.mark.parametrize("g", GS)
@pytest.mark.parametrize("rounding", ("rtn", "sr"))
def test_dual(dtype, g, rounding):
    # multiples of max(g, 32) that are not multiples of the dual tile (64 x 256 for g <= 64)
    t, n = {0: (160, 160), 32: (160, 224), 64: (192, 320), 128: (384, 256), 256: (512, 768)}[g]
    x = sample((t, n), dtype, seed=11 + g)
    kw = dict(rounding=rounding, rht_block=g, signs_row=signs_for(g, 1), signs_col=signs_for(g, 2), seed=SEED,
              offset_row=OFFSET + 2, offset_col=OFFSET + 3)
    row, col = quantize_mxfp4_dual(x, backend="cuda", **kw)
    rrow, rcol = quantize_dual_reference(x, **kw)
    assert_same(row, rrow, "dual rowwise")
    assert_same(col, rcol, "dual columnwise")


@pytest.mark.parametrize("g", (0, 64, 256))
def test_dual_drawn_signs_and_fp16(g):
    x = sample((256, 512), torch.float16, seed=3)
    kw = dict(rounding="sr", rht_block=g, seed=SEED, offset_row=5, offset_col=6)
    row, col = quantize_mxfp4_dual(x, backend="cuda", **kw)
    rrow, rcol = quantize_dual_reference(x, **kw)
    assert_same(row, rrow, "dual rowwise")
    assert_same(col, rcol, "dual columnwise")


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
@pytest.mark.parametrize("g", (0, 32, 128))
@pytest.mark.parametrize("rounding", ("rtn", "sr"))
@pytest.mark.parametrize("transposed", (False, True))
def test_dim0(dtype, g, rounding, transposed):
    """quantize_mxfp4(x, dim=0): the logical order moves the quantized dim last (column / row kernels)."""
    shape = (4 * qdim(g), 136)
    x = sample(shape[::-1], dtype, seed=g).t() if transposed else sample(shape, dtype, seed=g)
    kw = dict(rounding=rounding, rht_block=g, signs=signs_for(g, 4), seed=1, offset=2)
    assert_same(quantize_mxfp4(x, 0, backend="cuda", **kw), quantize_reference(x, 0, **kw), "dim0")


@pytest.mark.parametrize("k", (1, 12, 31, 33, 100, 2047))
@pytest.mark.parametrize("g", GS)
@pytest.mark.parametrize("rounding", ("rtn", "sr"))
def test_any_size_is_zero_padded(k, g, rounding):
    """DESIGN §3: a quantized dimension of any size; the kernels read past the edge as zeros. Rowwise, the
    transposed view (column kernel), dim 0 and the dual kernel, against the reference."""
    kw = dict(rounding=rounding, rht_block=g, seed=SEED, offset=OFFSET)
    x = sample((70, k), torch.bfloat16, seed=k + g)
    assert_same(quantize_mxfp4(x, -1, backend="cuda", **kw), quantize_reference(x, -1, **kw), "rowwise")
    base = sample((k, 40), torch.bfloat16, seed=k + g + 1)
    assert_same(quantize_mxfp4(base.t(), -1, backend="cuda", **kw), quantize_reference(base.t(), -1, **kw), "col")
    assert_same(quantize_mxfp4(base, 0, backend="cuda", **kw), quantize_reference(base, 0, **kw), "dim0")
    xd = sample((k, k + 24), torch.bfloat16, seed=k + g + 2)
    dkw = dict(rounding=rounding, rht_block=g, seed=SEED, offset_row=3, offset_col=4)
    row, col = quantize_mxfp4_dual(xd, backend="cuda", **dkw)
    rrow, rcol = quantize_dual_reference(xd, **dkw)
    assert_same(row, rrow, "dual rowwise")
    assert_same(col, rcol, "dual columnwise")


def test_empty_tensors():
    for shape in ((0, 64), (5, 0)):
        x = torch.empty(shape, device=DEV, dtype=torch.bfloat16)
        q = quantize_mxfp4(x, -1, rounding="sr", rht_block=64, backend="cuda")
        assert q.shape == shape and q.data.numel() == 0
        row, col = quantize_mxfp4_dual(x, rounding="sr", rht_block=64, backend="cuda")
        assert row.shape == shape and col.shape == shape[::-1]


def test_fallbacks_warn_once_and_match():
    cq._warned.clear()
    kw = dict(rounding="sr", rht_block=32, seed=3, offset=4)
    x3 = torch.randn(4, 64, 96, device=DEV)
    with pytest.warns(RuntimeWarning, match="reference"):
        got = quantize_mxfp4(x3, 1, backend="cuda", **kw)
    assert_same(got, quantize_reference(x3, 1, **kw), "3-d dim 1 fallback")
    x3 = x3.permute(1, 0, 2)  # non-contiguous, dim = last: copied
    with pytest.warns(RuntimeWarning, match="copied"):
        got = quantize_mxfp4(x3, -1, backend="cuda", **kw)
    assert_same(got, quantize_reference(x3, -1, **kw), "copied")


def special_blocks(dtype):
    """Rows of 64: NaN / Inf blocks, zeros, subnormals, huge, mixed ranges, grid points and midpoints."""
    f = torch.float32
    grid = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, .25, .75, 1.25, 1.75, 2.5, 3.5, 5, 7], dtype=f)
    rows = [
        torch.cat([grid, -grid, grid * 2, -grid * 0.5]),                     # exact values, ties (RTN)
        torch.full((64,), 0.0).index_fill_(0, torch.tensor([3, 40]), float("nan")),
        torch.randn(64).index_fill_(0, torch.tensor([0]), float("inf")),
        torch.randn(64).index_fill_(0, torch.tensor([33]), float("-inf")),
        torch.zeros(64), -torch.zeros(64),
        torch.randn(64) * 1e-41 if dtype == torch.float32 else torch.randn(64) * 2.0**-130,  # subnormal / tiny
        torch.randn(64) * 3e38 if dtype != torch.float16 else torch.randn(64) * 6e4,           # huge
        torch.cat([torch.randn(32) * 1e30, torch.randn(32) * 1e-30]) if dtype != torch.float16 else
        torch.cat([torch.randn(32) * 1e4, torch.randn(32) * 1e-6]),
        torch.cat([torch.tensor([1e30]), torch.randn(63) * 1e-20]) if dtype != torch.float16 else
        torch.cat([torch.tensor([6e4]), torch.randn(63) * 1e-7]),
        torch.tensor([2.0**-126] * 16 + [2.0**-149] * 16 + [-(2.0**-140)] * 32),
    ]
    x = torch.stack(rows).to(dtype)
    x = torch.cat([x, x.flip(0), (x * 0.5).roll(1, 1)])  # 33 rows
    return x.to(DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g", (0, 32, 64))
@pytest.mark.parametrize("rounding", ("rtn", "sr"))
def test_special_values(dtype, g, rounding):
    x = special_blocks(dtype)
    kw = dict(rounding=rounding, rht_block=g, signs=signs_for(g, 8), seed=SEED, offset=OFFSET)
    assert_same(quantize_mxfp4(x, -1, backend="cuda", **kw), quantize_reference(x, -1, **kw), "special rowwise")
    xt = torch.cat([x, x[:31]]).t()  # 64 tokens x 33 features, the column kernel
    assert_same(quantize_mxfp4(xt.t().contiguous().t(), -1, backend="cuda", **kw),
                quantize_reference(xt, -1, **kw), "special columnwise")
    for p in (1.0, 0.5):  # SR without the 3/4 prescale reaches |v| in [6, 8): saturation
        kwp = dict(kw, prescale=p)
        assert_same(quantize_mxfp4(x, -1, backend="cuda", **kwp), quantize_reference(x, -1, **kwp), f"p={p}")


def test_reference_is_the_same_on_cpu():
    x = sample((64, 256), torch.bfloat16, seed=21)
    kw = dict(rounding="sr", rht_block=64, seed=SEED, offset=9)
    got = quantize_mxfp4(x, -1, backend="cuda", **kw)
    ref = quantize_reference(x.cpu(), -1, **kw)
    assert torch.equal(got.data.cpu(), ref.data) and torch.equal(got.scales.cpu(), ref.scales)


@pytest.mark.parametrize("rounding", ("sr", "rtn"))
def test_large_dual_gpt_shape(rounding):
    x = sample((8192, 4096), torch.bfloat16, seed=5, spread=4)
    kw = dict(rounding=rounding, rht_block=64, signs_row=signs_for(64, 1), signs_col=signs_for(64, 2), seed=SEED,
              offset_row=10, offset_col=11)
    row, col = quantize_mxfp4_dual(x, backend="cuda", **kw)
    rrow, rcol = quantize_dual_reference(x, **kw)
    assert_same(row, rrow, "large dual rowwise")
    assert_same(col, rcol, "large dual columnwise")


def test_device_seed_offset_and_cuda_graph():
    x = sample((256, 512), torch.bfloat16, seed=2)
    s = signs_for(64, 6)
    seed_t = torch.tensor([SEED - 2**64], dtype=torch.int64, device=DEV)  # the bits of the uint64
    off_t = torch.tensor([41], dtype=torch.int64, device=DEV)
    got = quantize_mxfp4(x, -1, rounding="sr", rht_block=64, signs=s, seed=seed_t, offset=off_t, backend="cuda")
    assert_same(got, quantize_reference(x, -1, rounding="sr", rht_block=64, signs=s, seed=SEED, offset=41), "tensor")
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside capture (occupancy query, attribute setting)
        quantize_mxfp4_dual(x, rounding="sr", rht_block=64, signs_row=s, signs_col=s, seed=seed_t,
                            offset_row=off_t, offset_col=off_t, backend="cuda")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        row, col = quantize_mxfp4_dual(x, rounding="sr", rht_block=64, signs_row=s, signs_col=s, seed=seed_t,
                                       offset_row=off_t, offset_col=off_t, backend="cuda")
    for off in (1000, 2**63 + 5):
        off_t.fill_(off - 2**64 if off >= 2**63 else off)
        graph.replay()
        torch.cuda.synchronize()
        rrow, rcol = quantize_dual_reference(x, rounding="sr", rht_block=64, signs_row=s, signs_col=s, seed=SEED,
                                             offset_row=off, offset_col=off)
        assert_same(row, rrow, f"graph replay rowwise offset={off}")
        assert_same(col, rcol, f"graph replay columnwise offset={off}")


def test_bad_inputs_are_named():
    x = sample((64, 96), torch.bfloat16)
    with pytest.raises(TypeError, match="int32"):
        quantize_mxfp4(torch.zeros(4, 32, dtype=torch.int32, device=DEV), backend="cuda")
    with pytest.raises(ValueError, match="signs must have rht_block=32 entries"):
        quantize_mxfp4(x, -1, rht_block=32, signs=torch.ones(64, device=DEV), backend="cuda")
    with pytest.raises(RuntimeError, match="cannot run on cpu"):
        quantize_mxfp4(x.cpu(), -1, backend="cuda")
    with pytest.raises(ValueError, match="offset as a tensor"):
        quantize_mxfp4(x, -1, rounding="sr", offset=torch.tensor([1]), backend="cuda")
    with pytest.raises(ValueError, match="seed must be an unsigned 64-bit"):
        quantize_mxfp4(x, -1, rounding="sr", seed=-1, backend="cuda")
    with pytest.raises(ValueError, match="2-d"):
        quantize_mxfp4_dual(x[0], backend="cuda")


def test_auto_picks_cuda_and_backward_dual_matches_reference():
    from megatron_mxfp4 import MXFP4Recipe
    from megatron_mxfp4 import backward as bwd
    from megatron_mxfp4.ops import available_backends

    assert available_backends(torch.zeros(1, device=DEV), "quantize")[0] == "cuda"
    dy = sample((512, 384), torch.bfloat16, seed=9)
    key = bwd.StreamKey(SEED, 3, 17)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning on the backward's layouts
        got = bwd.quantize_grad_output(dy, MXFP4Recipe(backend="cuda"), key)
    ref = bwd.quantize_grad_output(dy, MXFP4Recipe(backend="reference"), key)
    assert_same(got[0], ref[0], "dgrad operand")
    assert_same(got[1], ref[1], "wgrad operand")
    w = sample((384, 256), torch.bfloat16, seed=10)
    x = sample((512, 256), torch.bfloat16, seed=11)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for t in (w.t(), x.t()):
            kw = dict(rounding="sr", rht_block=64, signs=signs_for(64, 1), seed=SEED, offset=3)
            assert_same(quantize_mxfp4(t, -1, **kw), quantize_reference(t, -1, **kw), "backward operand")


@pytest.mark.parametrize("shape", [(256, 4096), (300, 100), (72, 544)])
def test_swizzled_scales_for_blackwell(shape):
    """The scales written again, in the same pass, in the 128×4 layout of Blackwell's block-scaled GEMMs:
    equal to `blackwell_scale_layout` of the plain scales (rowwise, transposed view, dual). Runs on any GPU
    (the layout is plain stores); only its consumer needs Blackwell."""
    from megatron_mxfp4.ops.layouts import blackwell_scale_layout

    x = sample(shape, torch.bfloat16, seed=shape[1])
    kw = dict(rounding="sr", rht_block=64, seed=SEED, offset=5, swizzle=True)
    for q in (cq.quantize_cuda(x, -1, **kw), cq.quantize_cuda(x.t().contiguous().t(), -1, **kw)):
        assert torch.equal(q.swizzled_scales, blackwell_scale_layout(q.scales))
    row, col = cq.quantize_dual_cuda(x, rounding="sr", rht_block=64, seed=SEED, offset_row=1, offset_col=2,
                                     swizzle=True)
    assert torch.equal(row.swizzled_scales, blackwell_scale_layout(row.scales))
    assert torch.equal(col.swizzled_scales, blackwell_scale_layout(col.scales))
    assert cq.quantize_cuda(x, -1, **dict(kw, swizzle=False)).swizzled_scales is None
