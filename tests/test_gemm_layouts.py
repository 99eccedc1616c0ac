"""GEMM operand layouts (CPU): E4M3 codes + tile scales for Hopper, swizzled E8M0 scales for Blackwell,
the per-slab fallback, the GEMM epilogues of the reference, and backend gating.

Each check compares against the reference MXFP4 values (`dequantize`) or an independent formula, and
carries a negative control where a wrong layout could still pass."""
import os
import subprocess
import sys

import pytest
import torch

from megatron_mxfp4 import MXFP4Recipe, mxfp4_gemm
from megatron_mxfp4.numerics import format as fmt
from megatron_mxfp4.numerics.quantize import MXFP4Tensor, gemm_alpha, gemm_reference, quantize_reference
from megatron_mxfp4.ops import available_backends, layouts as L
from megatron_mxfp4.ops.blackwell_gemm import blackwell_operand

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spread_operand(rows, k, spread, seed, top=0, prescale=0.75):
    """[rows, k] MXFP4 operand with random codes whose block exponents lie 0..spread binades below
    `top` (random per block; one block per 128-tile sits at `top`, so a tile spans up to `spread`)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (rows, k), generator=g, dtype=torch.uint8)
    d = torch.randint(0, spread + 1, (rows, k // 32), generator=g)
    d.view(rows, -1)[:, ::4] = 0
    scales = (fmt.E8M0_BIAS + top - d).to(torch.uint8)
    return MXFP4Tensor(fmt.pack_nibbles(codes), scales, prescale, 1, (rows, k))


def emulate_hopper(a, b):
    """The hopper backend's arithmetic in float64 on CPU: tile layout product + exact bad slabs."""
    oa, ob = L.to_e4m3_reference(a), L.to_e4m3_reference(b)
    c = L.e4m3_dequantize(oa).double() @ L.e4m3_dequantize(ob).double().t()
    bad = oa.bad | ob.bad
    if bad.any():
        s = bad.nonzero().flatten()
        sa, sb = L.take_slabs(a, s), L.take_slabs(b, s)
        c += sa.dequantize(unscaled=True).double() @ sb.dequantize(unscaled=True).double().t()
    return c, bad


def exact64(a, b):
    return a.dequantize(unscaled=True).double() @ b.dequantize(unscaled=True).double().t()


# ------------------------------------------------------------------------------------------------
# Hopper layout: E4M3 codes + scales
# ------------------------------------------------------------------------------------------------

def test_blocks_layout_is_exact_on_any_spread():
    t = spread_operand(24, 320, 40, seed=1)
    op = L.to_e4m3_reference(t, tile=32)
    assert op.codes.dtype == torch.float8_e4m3fn and op.scales.shape == (10, 24)
    assert torch.equal(L.e4m3_dequantize(op), t.dequantize(unscaled=True))
    assert not op.bad.any()


@pytest.mark.parametrize("spread", [0, 4, 8])
def test_tiles_layout_is_exact_within_8_binades(spread):
    t = spread_operand(40, 512, spread, seed=2 + spread, top=5)
    op = L.to_e4m3_reference(t)
    assert op.scales.shape == (4, 40)
    assert not op.bad.any()
    assert torch.equal(L.e4m3_dequantize(op), t.dequantize(unscaled=True))
    # scales are powers of two: the tile's top block exponent
    m, e = torch.frexp(op.scales)
    assert torch.all(m == 0.5)


def test_tiles_layout_flags_wide_slabs_and_zeroes_them():
    t = spread_operand(16, 384, 0, seed=7)
    codes, scales = t.codes(), t.scales.clone()
    scales[3, 5] -= 9          # slab 1 (blocks 4..7): one row-tile spans 9 binades
    t9 = MXFP4Tensor(fmt.pack_nibbles(codes), scales, t.prescale, 1, t.shape)
    op = L.to_e4m3_reference(t9)
    assert op.bad.tolist() == [False, True, False]
    deq, ref = L.e4m3_dequantize(op), t9.dequantize(unscaled=True)
    assert torch.all(deq[:, 128:256] == 0)
    assert torch.all(op.codes[3, 128:256].float() == 0)          # the bad row-tile's codes are zero
    assert torch.equal(op.codes[4, 128:256].float() * op.scales[1, 4], ref[4, 128:256])   # other rows kept
    keep = torch.ones(384, dtype=torch.bool)
    keep[128:256] = False
    assert torch.equal(deq[:, keep], ref[:, keep])
    # control: 8 binades is still folded exactly
    scales[3, 5] += 1
    op8 = L.to_e4m3_reference(MXFP4Tensor(fmt.pack_nibbles(codes), scales, t.prescale, 1, t.shape))
    assert not op8.bad.any()


def test_zero_blocks_do_not_count_for_the_span():
    x = torch.randn(4, 128) * 1000.0
    x[1, 32:64] = 0.0           # amax = 0: the smallest scale (2^-127), far below the others
    t = quantize_reference(x)
    assert int(t.scales[1, 1]) == 0
    op = L.to_e4m3_reference(t)
    assert not op.bad.any()
    assert torch.equal(L.e4m3_dequantize(op), t.dequantize(unscaled=True))


def test_nan_block_makes_the_tile_scale_nan():
    x = torch.randn(3, 256)
    x[2, 140] = float("inf")
    t = quantize_reference(x)
    for tile in (32, 128):
        op = L.to_e4m3_reference(t, tile)
        nan = torch.isnan(op.scales.t())
        expect = torch.zeros_like(nan)
        expect[2, 140 // tile] = True
        assert torch.equal(nan, expect)
        assert torch.equal(torch.isnan(L.e4m3_dequantize(op)).any(1), torch.tensor([False, False, True]))


@pytest.mark.parametrize("tile", [32, 128])
def test_split_order_permutes_within_blocks_only(tile):
    t = spread_operand(8, 256, 5, seed=13)
    nat, spl = L.to_e4m3_reference(t, tile), L.to_e4m3_reference(t, tile, order="split")
    assert torch.equal(L.e4m3_dequantize(spl), L.e4m3_dequantize(nat))
    assert torch.equal(spl.scales, nat.scales)
    # element 2j+h of a block sits at 16h+j: byte j's low nibble first, then the high nibbles
    c = spl.codes.view(torch.uint8)[:, :32]
    n = nat.codes.view(torch.uint8)[:, :32]
    assert torch.equal(c[:, :16], n[:, 0::2]) and torch.equal(c[:, 16:], n[:, 1::2])
    assert not torch.equal(c, n)   # control: the order does change the bytes
    # a GEMM on split operands equals the one on natural operands
    b = spread_operand(6, 256, 5, seed=14)
    sb = L.to_e4m3_reference(b, tile, order="split")
    c_split = spl.codes.float() * spl.scales.t().repeat_interleave(tile, 1) @ \
        (sb.codes.float() * sb.scales.t().repeat_interleave(tile, 1)).t()
    assert torch.allclose(c_split, L.e4m3_dequantize(nat) @ L.e4m3_dequantize(L.to_e4m3_reference(b, tile)).t(),
                          rtol=1e-6, atol=0)


def test_partial_last_tile_is_zero_padded():
    t = spread_operand(8, 160, 3, seed=11)   # K = 160: one full tile + 32 columns
    op = L.to_e4m3_reference(t)
    assert op.codes.shape == (8, 256) and op.k == 160
    assert torch.all(op.codes[:, 160:].to(torch.float32) == 0)
    assert torch.equal(L.e4m3_dequantize(op), t.dequantize(unscaled=True))


def test_take_slabs_selects_columns():
    t = spread_operand(6, 320, 20, seed=12)
    sub = L.take_slabs(t, torch.tensor([0, 2]))
    full = t.dequantize(unscaled=True)
    got = sub.dequantize(unscaled=True)
    assert got.shape == (6, 256)
    assert torch.equal(got[:, :128], full[:, :128])
    assert torch.equal(got[:, 128:192], full[:, 256:320])
    assert torch.all(got[:, 192:] == 0)


@pytest.mark.parametrize("spread", [0, 4, 8, 12, 20, 40])
def test_hopper_arithmetic_with_slab_fallback_matches_float64(spread):
    """The fast path's function (tile layout + exact bad slabs) equals the exact product on any spread."""
    a = spread_operand(48, 640, spread, seed=20 + spread)
    b = spread_operand(40, 640, spread, seed=60 + spread)
    c, bad = emulate_hopper(a, b)
    ref = exact64(a, b)
    assert (bad.any().item()) == (spread > 8)
    assert ((c - ref).norm() / ref.norm()).item() < 1e-12
    # control: dropping the bad slabs instead of adding them exactly is visibly wrong
    if spread > 8:
        oa, ob = L.to_e4m3_reference(a), L.to_e4m3_reference(b)
        dropped = L.e4m3_dequantize(oa).double() @ L.e4m3_dequantize(ob).double().t()
        assert ((dropped - ref).norm() / ref.norm()).item() > 1e-3


def test_adversarial_cross_scales_need_the_fallback():
    """a's big block meets b's tiny block and vice versa: the two products are equal in size, so the
    folded tile (which would drop the tiny blocks) must not be used for that slab."""
    k = 128
    xa = torch.ones(1, k)
    xb = torch.ones(1, k)
    xa[:, 32:] *= 2.0 ** -30
    xb[:, :32] *= 2.0 ** -30
    a, b = quantize_reference(xa), quantize_reference(xb)
    c, bad = emulate_hopper(a, b)
    assert bad.tolist() == [True]
    assert torch.allclose(c, exact64(a, b), rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------------
# Hopper layout with one scale per row (outer-vector FP8 scaling)
# ------------------------------------------------------------------------------------------------

def emulate_hopper_rows(a, b):
    """The row-scaled hopper arithmetic in float64 on CPU: row layout product + flagged rows exactly."""
    oa, ob = L.to_e4m3_rows_reference(a), L.to_e4m3_rows_reference(b)
    c = L.e4m3_rows_dequantize(oa).double() @ L.e4m3_rows_dequantize(ob).double().t()
    ref = exact64(a, b)
    c[oa.flagged] = ref[oa.flagged]
    c[:, ob.flagged] = ref[:, ob.flagged]
    return c, oa.flagged, ob.flagged


@pytest.mark.parametrize("spread", [0, 6, 14])
def test_rows_layout_is_exact_within_14_binades(spread):
    t = spread_operand(24, 640, spread, seed=90 + spread, top=3)
    op = L.to_e4m3_rows_reference(t)
    assert op.codes.shape == (24, 640) and op.scales.shape == (24,) and op.codes.dtype == torch.float8_e4m3fn
    assert not op.flagged.any()
    assert torch.equal(L.e4m3_rows_dequantize(op), t.dequantize(unscaled=True))
    # the headroom is used: the top block's 6 sits at 384 in E4M3
    assert op.codes.to(torch.float32).abs().max().item() == 384.0
    assert torch.equal(op.scales, torch.full((24,), 2.0 ** (3 - 6)))


def test_rows_layout_flags_rows_spanning_more_than_14_binades():
    t = spread_operand(16, 256, 0, seed=101)
    s = t.scales.clone()
    s[3, 5] -= 15                        # row 3: one block 15 binades down -> flagged
    s[7, 2] -= 14                        # row 7: 14 binades -> still exact
    t = MXFP4Tensor(t.data, s, t.prescale, 1, t.shape)
    op = L.to_e4m3_rows_reference(t, mult=0.5)
    assert op.flagged.tolist() == [r == 3 for r in range(16)]
    assert op.scales[3].item() == 0.0 and torch.all(op.codes[3].to(torch.float32) == 0)
    full = t.dequantize(unscaled=True)
    keep = ~op.flagged
    assert torch.equal(L.e4m3_rows_dequantize(op)[keep], full[keep] * 0.5)


def test_rows_layout_zero_blocks_nan_rows_and_padding():
    t = spread_operand(6, 160, 2, seed=102)
    codes = t.codes().clone()
    codes[1, 32:64] = 0                  # a dead block far below: does not count for the span
    s = t.scales.clone()
    s[1, 1] = 0
    s[4, 2] = fmt.E8M0_NAN               # a NaN block: the row's scale is NaN
    t = MXFP4Tensor(fmt.pack_nibbles(codes), s, t.prescale, 1, t.shape)
    op = L.to_e4m3_rows_reference(t, rows_out=16)
    assert op.codes.shape == (16, 256) and not op.flagged.any()
    assert torch.isnan(op.scales[4]) and torch.isfinite(op.scales[torch.arange(16) != 4]).all()
    assert torch.all(op.codes[6:].to(torch.float32) == 0) and torch.all(op.scales[6:] == 0)
    assert torch.all(op.codes[:, 160:].to(torch.float32) == 0)
    ok = torch.tensor([r != 4 for r in range(6)])
    assert torch.equal(L.e4m3_rows_dequantize(op)[:6][ok], t.dequantize(unscaled=True)[ok])
    # zero codes are +0, never -0
    assert not torch.any(op.codes.view(torch.uint8) == 0x80)


def test_rows_layout_nan_row_blocks_below_the_fold_range_are_zero():
    """A NaN row is never flagged; its live blocks more than 8 binades below the row exponent (which E4M3 cannot
    hold exactly) are zero codes, not rounded ones: the kernel's table lookup has no rounding to match."""
    t = spread_operand(4, 128, 0, seed=103)
    codes = t.codes().clone()
    codes[:, :64] = 3                    # 1.5 in blocks 0 and 1
    codes[:, 64:96] = 11                 # -1.5 in block 2
    s = t.scales.clone()
    s[:, 1] = fmt.E8M0_NAN
    s[0, 2] -= 15                        # 9 below E_r = e_top - 6: 1.5 * 2^-9 would round to 2^-8
    s[1, 2] -= 14                        # 8 below: exact
    t = MXFP4Tensor(fmt.pack_nibbles(codes), s, t.prescale, 1, t.shape)
    op = L.to_e4m3_rows_reference(t)
    assert not op.flagged.any() and torch.isnan(op.scales).all()
    c = op.codes.view(torch.uint8)
    assert torch.all(c[0, 64:96] == 0) and torch.all(c[0, :32] == 0x6C)          # 1.5 * 2^6 = 96
    assert torch.all(c[1, 64:96] == 0x83)                                        # -1.5 * 2^-8 = -3 * 2^-9
    assert torch.all(c[:, 32:64] == 0)                                           # the NaN block


@pytest.mark.parametrize("spread", [0, 10, 14, 20])
def test_hopper_rows_arithmetic_with_row_fallback_matches_float64(spread):
    a = spread_operand(48, 640, spread, seed=120 + spread)
    b = spread_operand(40, 640, spread, seed=160 + spread)
    c, fa, fb = emulate_hopper_rows(a, b)
    ref = exact64(a, b)
    assert bool(fa.any() or fb.any()) == (spread > 14)
    assert ((c - ref).norm() / ref.norm()).item() < 1e-12
    if spread > 14:  # control: reading flagged rows as zero is visibly wrong
        oa, ob = L.to_e4m3_rows_reference(a), L.to_e4m3_rows_reference(b)
        dropped = L.e4m3_rows_dequantize(oa).double() @ L.e4m3_rows_dequantize(ob).double().t()
        assert ((dropped - ref).norm() / ref.norm()).item() > 1e-3


# ------------------------------------------------------------------------------------------------
# Blackwell layout
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows,cols", [(128, 4), (300, 13), (1, 1), (256, 8)])
def test_blackwell_swizzle_matches_formula(rows, cols):
    s = torch.randint(0, 255, (rows, cols), dtype=torch.uint8)
    flat = L.blackwell_scale_layout(s)
    rp, cp = L.blackwell_scale_shape(rows, cols * 32)
    assert flat.numel() == rp * cp
    for r in range(rows):
        for c in range(cols):
            assert flat[L.blackwell_scale_offset(r, c, cp)] == s[r, c]
    assert torch.equal(L.blackwell_scale_unlayout(flat, rows, cols), s)


def test_blackwell_swizzle_hand_positions():
    s = torch.zeros(256, 8, dtype=torch.uint8)
    s[33, 1] = 1     # block (0, 0): (33 % 32)·16 + (33 // 32)·4 + 1 = 21
    s[127, 3] = 2    # block (0, 0): 31·16 + 3·4 + 3 = 511
    s[0, 4] = 3      # block (0, 1): 512
    s[128, 0] = 4    # block (1, 0): 2 blocks per block-row -> 1024
    flat = L.blackwell_scale_layout(s)
    assert flat[21] == 1 and flat[511] == 2 and flat[512] == 3 and flat[1024] == 4
    assert int((flat != 0).sum()) == 4
    # control: a plain row-major flattening puts them elsewhere
    assert s.flatten()[21] == 0


def test_blackwell_padding_is_unit_scale():
    flat = L.blackwell_scale_layout(torch.zeros(5, 3, dtype=torch.uint8))
    full = L.blackwell_scale_unlayout(flat, 128, 4)
    assert torch.all(full[:5, :3] == 0)
    assert torch.all(full[5:, :] == fmt.E8M0_BIAS) and torch.all(full[:, 3] == fmt.E8M0_BIAS)


def test_blackwell_operands_decode_to_the_reference_product():
    a, b = spread_operand(130, 192, 6, seed=30), spread_operand(72, 192, 6, seed=31)

    def decode(t):
        q, s = blackwell_operand(t)
        assert q.dtype == torch.float4_e2m1fn_x2 and s.dtype == torch.float8_e8m0fnu
        codes = fmt.unpack_nibbles(q.view(torch.uint8))
        vals = fmt.e2m1_table()[codes.long()]
        sc = fmt.decode_scales(L.blackwell_scale_unlayout(s.view(torch.uint8), t.shape[0], t.shape[1] // 32))
        return vals * sc.repeat_interleave(32, 1)

    c = (decode(a) @ decode(b).t()) * gemm_alpha(a, b)
    assert torch.equal(c, gemm_reference(a, b))
    # control: reading the swizzled bytes as a row-major matrix scrambles the scales
    q, s = blackwell_operand(a)
    wrong = s.view(torch.uint8)[: 130 * 6].reshape(130, 6)
    assert not torch.equal(wrong, a.scales)


# ------------------------------------------------------------------------------------------------
# Epilogues (reference = oracle) and dispatch
# ------------------------------------------------------------------------------------------------

def test_reference_alpha_and_accumulate():
    a, b = spread_operand(32, 256, 3, seed=40), spread_operand(16, 256, 3, seed=41)
    c = gemm_reference(a, b)
    assert torch.allclose(mxfp4_gemm(a, b, alpha=0.5), c * 0.5, rtol=1e-6, atol=0)
    main = torch.randn(32, 16)
    before = main.clone()
    out = mxfp4_gemm(a, b, accumulate_into=main)
    assert out is main
    assert torch.allclose(main, before + c, rtol=1e-6, atol=1e-6)
    assert mxfp4_gemm(a, b, out_dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("bad,match", [
    (lambda: torch.zeros(32, 16, dtype=torch.bfloat16), "float32 tensor of shape"),
    (lambda: torch.zeros(16, 32), "float32 tensor of shape"),
])
def test_accumulate_into_is_checked(bad, match):
    a, b = spread_operand(32, 256, 3, seed=42), spread_operand(16, 256, 3, seed=43)
    with pytest.raises(ValueError, match=match):
        mxfp4_gemm(a, b, accumulate_into=bad())


def test_accumulate_needs_fp32_out_and_finite_alpha():
    a, b = spread_operand(32, 256, 3, seed=44), spread_operand(16, 256, 3, seed=45)
    with pytest.raises(ValueError, match="out_dtype=float32"):
        mxfp4_gemm(a, b, out_dtype=torch.bfloat16, accumulate_into=torch.zeros(32, 16))
    with pytest.raises(ValueError, match="alpha must be finite"):
        mxfp4_gemm(a, b, alpha=float("inf"))


@pytest.mark.parametrize("backend", ["hopper", "hopper_exact", "blackwell", "triton"])
def test_gpu_backends_refuse_cpu_with_reason(backend):
    a, b = spread_operand(32, 256, 3, seed=46), spread_operand(16, 256, 3, seed=47)
    with pytest.raises(RuntimeError, match=f"GEMM backend '{backend}' cannot run on cpu"):
        mxfp4_gemm(a, b, backend=backend)
    assert available_backends(a.data) == ["reference"]


def test_compiled_tile_conversion_refuses_cpu_with_reason():
    from megatron_mxfp4.ops import cuda_tiles

    a = spread_operand(32, 256, 3, seed=48)
    reason = cuda_tiles.supports(a.data)
    assert reason and ("CUDA" in reason or "cuda" in reason)
    with pytest.raises(RuntimeError, match="E4M3-tile conversion"):
        cuda_tiles.to_e4m3_tiles(a)
    with pytest.raises(TypeError, match="MXFP4Tensor"):
        cuda_tiles.to_e4m3_tiles(a.data)


def test_recipe_accepts_hopper_exact():
    assert MXFP4Recipe(backend="hopper_exact").gemm_backend == "hopper_exact"
    with pytest.raises(ValueError, match="backend"):
        MXFP4Recipe(backend="hopper-fast")


def test_package_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
            "import torch, megatron_mxfp4\n"
            "from megatron_mxfp4.ops import dispatch\n"
            "print(dispatch._GEMMS['triton'].supports(torch.zeros(1)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Triton is not installed" in out.stdout


def test_triton_kernels_match_reference_in_interpreter():
    """Runs the conversion and GEMM kernels under Triton's CPU interpreter (logic check; the GPU
    tests check them compiled)."""
    pytest.importorskip("triton")
    script = r"""
import os, torch
os.environ["TRITON_INTERPRET"] = "1"
import triton
from megatron_mxfp4.ops import triton_gemm as tg, layouts as L
from megatron_mxfp4.numerics.quantize import quantize_reference, gemm_alpha
torch.manual_seed(0)
R, K = 40, 320
x = torch.randn(R, K) * torch.exp2(torch.randint(-6, 1, (R, K // 32)).float()).repeat_interleave(32, 1)
x[3, 0:32] = 0; x[5, 64:96] = float("nan"); x[7, 128:160] *= 2.0 ** -12
t = quantize_reference(x, rounding="sr", seed=3)
for tile, order in ((32, "natural"), (128, "natural"), (32, "split"), (128, "split")):
    ref = L.to_e4m3_reference(t, tile, order=order)
    kp = -(-K // tile) * tile
    codes = torch.empty((R, kp), dtype=torch.float8_e4m3fn); scales = torch.empty((kp // tile, R))
    flags = torch.zeros(3, dtype=torch.int32)
    kern = tg._to_e4m3_split_kernel if order == "split" else tg._to_e4m3_kernel
    kern[(2, 3)](t.data, t.scales, codes, scales, flags, R, K // 2, K // 32, kp,
        t.data.stride(0), t.scales.stride(0), 1.0, FOLD=tile == 128, HAS_MULT=False, BR=32)
    assert flags.bool().tolist() == ref.bad.tolist() == ([False, True, False] if tile == 128 else [False] * 3)
    assert torch.equal(codes.view(torch.uint8), ref.codes.view(torch.uint8)), tile
    assert torch.equal(scales.view(torch.int32), ref.scales.view(torch.int32)), tile
y = torch.randn(24, K)
b = quantize_reference(y, rounding="sr", seed=4)
a = quantize_reference(x.nan_to_num(0.0)[:32], rounding="sr", seed=5)
ref = a.dequantize(unscaled=True).double() @ b.dequantize(unscaled=True).double().t() * gemm_alpha(a, b)
oa, ob = L.to_e4m3_reference(a, 32), L.to_e4m3_reference(b, 32)
c = torch.empty(32, 24)
tg._fp8_scaled_gemm_kernel[(4,)](oa.codes, ob.codes, oa.scales, ob.scales, c, 32, 24, K // 32, oa.codes.stride(0),
    ob.codes.stride(0), c.stride(0), c.stride(1), gemm_alpha(a, b), SB=32, IMPRECISE=None, BM=16, BN=16,
    GROUP_M=2, ACCUM=False, HAS_ALPHA=True)
assert ((c.double() - ref).norm() / ref.norm()).item() < 1e-6
c2 = torch.empty(32, 24)
tg._dot_scaled_kernel[(4,)](a.data, b.data, a.scales, b.scales, c2, 32, 24, K, a.data.stride(0), b.data.stride(0),
    a.scales.stride(0), b.scales.stride(0), c2.stride(0), c2.stride(1), gemm_alpha(a, b), BM=16, BN=16, BK=128,
    GROUP_M=2, ACCUM=False, HAS_ALPHA=True)
assert ((c2.double() - ref).norm() / ref.norm()).item() < 1e-6
# the slab fix kernel adds exactly the flagged slabs (1 and the partial slab 2) to c3
c3 = torch.zeros(32, 24)
cnt = torch.zeros(1, dtype=torch.int32)
bad = torch.tensor([0, 1, 1], dtype=torch.int32)
tg._slab_fix_kernel[(4,)](a.data, a.scales, b.data, b.scales, bad, c3, cnt, 32, 24, 3, K // 32, a.data.stride(0),
    a.scales.stride(0), b.data.stride(0), b.scales.stride(0), c3.stride(0), c3.stride(1), gemm_alpha(a, b),
    BM=16, BN=16, GROUP_M=2, HAS_ALPHA=True, NTP=4)
da, db = a.dequantize(unscaled=True).double(), b.dequantize(unscaled=True).double()
ref3 = da[:, 128:] @ db[:, 128:].t() * gemm_alpha(a, b)
assert ((c3.double() - ref3).norm() / ref3.norm()).item() < 1e-6 and int(cnt) == 1
c4 = torch.full((32, 24), 7.0)
tg._slab_fix_kernel[(4,)](a.data, a.scales, b.data, b.scales, bad * 0, c4, cnt, 32, 24, 3, K // 32, a.data.stride(0),
    a.scales.stride(0), b.data.stride(0), b.scales.stride(0), c4.stride(0), c4.stride(1), gemm_alpha(a, b),
    BM=16, BN=16, GROUP_M=2, HAS_ALPHA=True, NTP=4)
assert torch.all(c4 == 7.0) and int(cnt) == 1
print("OK")
"""
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=env,
                         timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr


def _kernel_swizzled_offset(r, c, padded_cols):
    """csrc/mxfp4_quantize_kernel.cuh `swizzled_scale_offset`, transcribed (shifts and masks)."""
    return ((r >> 7) * (padded_cols >> 2) + (c >> 2)) * 512 + (r & 31) * 16 + ((r >> 5) & 3) * 4 + (c & 3)


@pytest.mark.parametrize("rows, k", [(1, 32), (130, 96), (256, 4096), (300, 160)])
def test_quantize_kernel_swizzled_scale_offsets_match_the_layout(rows, k):
    """The quantize kernel writes each scale of a GEMM operand at `swizzled_scale_offset` (Blackwell's 128×4
    layout, written in the same pass); every real scale lands where `blackwell_scale_layout` puts it."""
    cols = k // 32
    scales = torch.randint(0, 255, (rows, cols), dtype=torch.uint8)
    want = L.blackwell_scale_layout(scales)
    _, pc = L.blackwell_scale_shape(rows, k)
    got = torch.full_like(want, 127)
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    got[_kernel_swizzled_offset(r, c, pc).flatten()] = scales.flatten()
    assert torch.equal(got, want)
