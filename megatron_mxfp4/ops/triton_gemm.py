"""Triton kernels for the MXFP4 GEMM (DESIGN §2.5, §4).

- `to_e4m3`: MXFP4Tensor -> E4M3 codes + float32 per-tile scales (`layouts.to_e4m3_reference` is its
  bit-exact twin): one pass, reads the packed codes and E8M0 scales once.
- `fp8_scaled_gemm`: the exact FP8 tensor-core GEMM. Each K step loads one scale block (SB = 32 or
  128 columns) of E4M3 codes, multiplies it on the tensor cores into a fresh accumulator and adds it,
  times the outer product of the two operands' scales, to the float32 accumulator. With SB = 128 the
  codes carry the block exponents relative to the tile (layouts, "tiles") and the dot promotes its
  partial sum to float32 every 32 K (`max_num_imprecise_acc=32`), so no tensor-core accumulation
  ever adds products of different block scales: all rounding is float32 rounding.
- `dot_scaled_gemm`: Triton `tl.dot_scaled` with e2m1 operands — native block-scaled MMA on sm_100,
  an upcast to BF16 on sm_90. Registered as the portable `triton` backend.

The module imports without Triton (CPU CI); its backends then report that Triton is missing.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..numerics import format as fmt
from ..numerics.quantize import MXFP4Tensor, gemm_alpha
from .dispatch import device_capability, register_gemm
from . import layouts as L
from .layouts import TILE, E4M3Operand, _check_operand

try:  # Triton is optional: CPU-only installs still import the package.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without Triton
    triton = None
    tl = None


def triton_unavailable(t: torch.Tensor, min_capability=(9, 0)) -> Optional[str]:
    """None when the Triton kernels can run on t's device, else the reason."""
    if triton is None:
        return "Triton is not installed"
    if not t.is_cuda:
        return f"needs a CUDA device (tensor is on {t.device})"
    cap = device_capability(t.device)
    if cap < tuple(min_capability):
        return f"needs compute capability >= {min_capability[0]}.{min_capability[1]}, found {cap[0]}.{cap[1]}"
    return None


if triton is not None:

    @triton.jit
    def _pow2(e):
        """2^e as float32 for int32 e in [-127, 127] (exact; 2^-127 is subnormal)."""
        bits = tl.where(e >= -126, (e + 127) << 23, 0x00400000)
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _e2m1(nib):
        """Signed E2M1 value of int32 codes 0..15 as float32; both zero codes give +0."""
        mag = nib & 7
        e2 = mag >> 1
        half = (mag & 1).to(tl.float32) * 0.5
        pw = tl.where(e2 == 3, 4.0, tl.where(e2 == 2, 2.0, 1.0))
        val = tl.where(e2 == 0, half, (1.0 + half) * pw)
        val = tl.where((nib & 8) != 0, -val, val)
        return tl.where(mag == 0, 0.0, val)

    @triton.jit
    def _tile_scales(nzb, sb, rows, rmask, blk, smask, out_scale_ptr, bad_ptr, pid_t, R, mult,
                     FOLD: tl.constexpr, HAS_MULT: tl.constexpr, BR: tl.constexpr):
        """Scales of one 128-column tile of BR rows from their four E8M0 block scales `sb` [BR, 4]
        (`nzb`: which blocks hold a nonzero code). FOLD: one scale per tile (its largest live block
        exponent; a row whose blocks span > 8 binades is flagged in `bad_ptr` and zeroed), else one
        per block. Stores the scales; returns the per-block factor [BR, 4] folded into the codes."""
        isnan = sb == 255
        e = sb - 127
        qnan = tl.full([BR, 4], 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)
        if FOLD:
            live = nzb & (~isnan)
            emax = tl.max(tl.where(live, e, -1000), axis=1)
            emin = tl.min(tl.where(live, e, 1000), axis=1)
            has = emax > -1000
            etop = tl.where(has, emax, 0)
            bad_r = has & ((emax - emin) > 8)
            d = tl.minimum(tl.maximum(e - etop[:, None], -30), 0)
            fblk = tl.where((~isnan) & (~bad_r[:, None]), _pow2(d), 0.0)
            sc = _pow2(etop)
            if HAS_MULT:
                sc = sc * mult
            tnan = tl.max(isnan.to(tl.int32), axis=1) > 0
            sc = tl.where(tnan, tl.max(qnan, axis=1), sc)
            tl.store(out_scale_ptr + pid_t * R + rows, sc, mask=rmask)
            tl.atomic_max(bad_ptr + pid_t, tl.max(bad_r.to(tl.int32), axis=0))
        else:
            fblk = tl.where(isnan, 0.0, 1.0)
            sc = _pow2(tl.minimum(e, 127))
            if HAS_MULT:
                sc = sc * mult
            sc = tl.where(isnan, qnan, sc)
            tl.store(out_scale_ptr + blk[None, :] * R + rows[:, None], sc, mask=smask)
        return fblk

    @triton.jit
    def _to_e4m3_kernel(data_ptr, scale_ptr, codes_ptr, out_scale_ptr, bad_ptr, R, KB, NB, KP,
                        stride_d, stride_s, mult,
                        FOLD: tl.constexpr, HAS_MULT: tl.constexpr, BR: tl.constexpr):
        """One program: BR rows x one 128-column tile (64 packed bytes, 4 scales per row)."""
        pid_r = tl.program_id(0)
        pid_t = tl.program_id(1)
        rows = pid_r * BR + tl.arange(0, BR)
        rmask = rows < R
        kb = pid_t * 64 + tl.arange(0, 64)
        byte = tl.load(data_ptr + rows[:, None] * stride_d + kb[None, :],
                       mask=rmask[:, None] & (kb < KB)[None, :], other=0).to(tl.int32)
        blk = pid_t * 4 + tl.arange(0, 4)
        smask = rmask[:, None] & (blk < NB)[None, :]
        sb = tl.load(scale_ptr + rows[:, None] * stride_s + blk[None, :], mask=smask, other=127).to(tl.int32)
        nzb = tl.max(tl.reshape(((byte & 0x77) != 0).to(tl.int32), (BR, 4, 16)), axis=2) > 0
        fblk = _tile_scales(nzb, sb, rows, rmask, blk, smask, out_scale_ptr, bad_ptr, pid_t, R, mult,
                            FOLD, HAS_MULT, BR)
        lo = tl.reshape(_e2m1(byte & 15), (BR, 4, 16)) * fblk[:, :, None]
        hi = tl.reshape(_e2m1(byte >> 4), (BR, 4, 16)) * fblk[:, :, None]
        v = tl.reshape(tl.join(lo, hi), (BR, 128))
        v = tl.where(v == 0.0, 0.0, v)
        kk = pid_t * 128 + tl.arange(0, 128)
        tl.store(codes_ptr + rows[:, None] * KP + kk[None, :], v.to(tl.float8e4nv),
                 mask=rmask[:, None] & (kk < KP)[None, :])

    @triton.jit
    def _to_e4m3_split_kernel(data_ptr, scale_ptr, codes_ptr, out_scale_ptr, bad_ptr, R, KB, NB, KP,
                              stride_d, stride_s, mult,
                              FOLD: tl.constexpr, HAS_MULT: tl.constexpr, BR: tl.constexpr):
        """As `_to_e4m3_kernel`, writing each 32-block's codes in "split" order (its 16 even elements,
        then its 16 odd ones): 3-d tiles [BR, 4 blocks, 16 bytes], no register shuffles."""
        pid_r = tl.program_id(0)
        pid_t = tl.program_id(1)
        rows = pid_r * BR + tl.arange(0, BR)
        rmask = rows < R
        blk = pid_t * 4 + tl.arange(0, 4)
        j = tl.arange(0, 16)
        kb3 = blk[None, :, None] * 16 + j[None, None, :]
        r3 = rows[:, None, None]
        byte = tl.load(data_ptr + r3 * stride_d + kb3, mask=(r3 < R) & (kb3 < KB), other=0).to(tl.int32)
        smask = rmask[:, None] & (blk < NB)[None, :]
        sb = tl.load(scale_ptr + rows[:, None] * stride_s + blk[None, :], mask=smask, other=127).to(tl.int32)
        nzb = tl.max(((byte & 0x77) != 0).to(tl.int32), axis=2) > 0
        fblk = _tile_scales(nzb, sb, rows, rmask, blk, smask, out_scale_ptr, bad_ptr, pid_t, R, mult,
                            FOLD, HAS_MULT, BR)
        lo = _e2m1(byte & 15) * fblk[:, :, None]
        hi = _e2m1(byte >> 4) * fblk[:, :, None]
        lo = tl.where(lo == 0.0, 0.0, lo)
        hi = tl.where(hi == 0.0, 0.0, hi)
        col = blk[None, :, None] * 32 + j[None, None, :]
        cmask = (r3 < R) & (col < KP)
        base = codes_ptr + r3 * KP + col
        tl.store(base, lo.to(tl.float8e4nv), mask=cmask)
        tl.store(base + 16, hi.to(tl.float8e4nv), mask=cmask)

    @triton.jit
    def _decode_block(data_ptr, scale_ptr, rows, stride_d, stride_s, kb, NB, B: tl.constexpr):
        """Block kb (32 elements) of the given rows of a packed MXFP4 operand: E4M3 values [B, 32] and
        float32 scales [B] (NaN for 0xFF)."""
        ok = (tl.zeros([B], tl.int32) + kb) < NB
        j = tl.arange(0, 16)
        byte = tl.load(data_ptr + rows[:, None] * stride_d + kb * 16 + j[None, :],
                       mask=ok[:, None] & (j < 16)[None, :], other=0).to(tl.int32)
        v = tl.reshape(tl.join(_e2m1(byte & 15), _e2m1(byte >> 4)), (B, 32))
        s = tl.load(scale_ptr + rows * stride_s + kb, mask=ok, other=127).to(tl.int32)
        qnan = tl.full([B], 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)
        sc = tl.where(s == 255, qnan, _pow2(tl.minimum(s - 127, 127)))
        return v.to(tl.float8e4nv), sc

    @triton.jit
    def _slab_fix_kernel(a_data, a_scale, b_data, b_scale, bad_ptr, c_ptr, counter_ptr, M, N, NT, NB,
                         stride_ad, stride_as, stride_bd, stride_bs, stride_cm, stride_cn, alpha,
                         BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr, HAS_ALPHA: tl.constexpr,
                         NTP: tl.constexpr):
        """C += alpha · A[:, S]·B[:, S]ᵀ over the flagged 128-column slabs S, straight from the packed
        MXFP4 operands, promoting every 32-K block to float32 (exact). Every program first reads all NT
        flags in one vector load (NTP: NT rounded up to a power of two) and returns when none is set, so
        the launch costs one load per program in the common case."""
        ft = tl.arange(0, NTP)
        if tl.max(tl.load(bad_ptr + ft, mask=ft < NT, other=0), axis=0) != 0:
            pid = tl.program_id(0)
            pid_m, pid_n = _tile_ids(pid, M, N, BM, BN, GROUP_M)
            rm = pid_m * BM + tl.arange(0, BM)
            rn = pid_n * BN + tl.arange(0, BN)
            ram = rm % M
            rbn = rn % N
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for t in range(0, NT):
                if tl.load(bad_ptr + t) != 0:
                    for j in tl.static_range(4):
                        av, sa = _decode_block(a_data, a_scale, ram, stride_ad, stride_as, t * 4 + j, NB, BM)
                        bv, sb = _decode_block(b_data, b_scale, rbn, stride_bd, stride_bs, t * 4 + j, NB, BN)
                        p = tl.dot(av, tl.trans(bv))
                        acc += p * (sa[:, None] * sb[None, :])
            if HAS_ALPHA:
                acc = acc * alpha
            cmask = (rm < M)[:, None] & (rn < N)[None, :]
            c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
            acc = tl.load(c_ptrs, mask=cmask, other=0.0).to(tl.float32) + acc
            tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=cmask)
            if pid == 0:
                tl.atomic_add(counter_ptr, 1)

    @triton.jit
    def _tile_ids(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        gsz = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % gsz
        pid_n = (pid % per_group) // gsz
        return pid_m, pid_n

    @triton.jit
    def _fp8_scaled_gemm_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, c_ptr, M, N, NS,
                                stride_a, stride_b, stride_cm, stride_cn, alpha,
                                SB: tl.constexpr, IMPRECISE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                                GROUP_M: tl.constexpr, ACCUM: tl.constexpr, HAS_ALPHA: tl.constexpr):
        pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BM, BN, GROUP_M)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        ram = rm % M
        rbn = rn % N
        rk = tl.arange(0, SB)
        a_ptrs = a_ptr + ram[:, None] * stride_a + rk[None, :]
        b_ptrs = b_ptr + rbn[None, :] * stride_b + rk[:, None]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for s in range(0, NS):
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
            sa = tl.load(sa_ptr + s * M + ram)
            sb = tl.load(sb_ptr + s * N + rbn)
            t = tl.dot(a, b, max_num_imprecise_acc=IMPRECISE)
            acc += t * (sa[:, None] * sb[None, :])
            a_ptrs += SB
            b_ptrs += SB
        if HAS_ALPHA:
            acc = acc * alpha
        cmask = (rm < M)[:, None] & (rn < N)[None, :]
        c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
        if ACCUM:
            acc = tl.load(c_ptrs, mask=cmask, other=0.0) + acc
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=cmask)

    @triton.jit
    def _dot_scaled_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, c_ptr, M, N, K,
                           stride_a, stride_b, stride_sa, stride_sb, stride_cm, stride_cn, alpha,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                           ACCUM: tl.constexpr, HAS_ALPHA: tl.constexpr):
        pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BM, BN, GROUP_M)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        ram = rm % M
        rbn = rn % N
        rk2 = tl.arange(0, BK // 2)
        rks = tl.arange(0, BK // 32)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            km2 = (k // 2 + rk2) < K // 2
            kms = (k // 32 + rks) < K // 32
            a = tl.load(a_ptr + ram[:, None] * stride_a + (k // 2 + rk2)[None, :], mask=km2[None, :], other=0)
            b = tl.load(b_ptr + rbn[None, :] * stride_b + (k // 2 + rk2)[:, None], mask=km2[:, None], other=0)
            sa = tl.load(sa_ptr + ram[:, None] * stride_sa + (k // 32 + rks)[None, :], mask=kms[None, :], other=127)
            sb = tl.load(sb_ptr + rbn[:, None] * stride_sb + (k // 32 + rks)[None, :], mask=kms[None, :], other=127)
            acc = tl.dot_scaled(a, sa, "e2m1", b, sb, "e2m1", acc)
        if HAS_ALPHA:
            acc = acc * alpha
        cmask = (rm < M)[:, None] & (rn < N)[None, :]
        c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
        if ACCUM:
            acc = tl.load(c_ptrs, mask=cmask, other=0.0) + acc
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=cmask)


def _need_triton(t: torch.Tensor) -> None:
    reason = triton_unavailable(t, (8, 9))
    if reason is not None:
        raise RuntimeError(f"megatron_mxfp4 Triton kernels: {reason}")


#: Element order of the converted codes inside each 32-block: "split" (16 even, then 16 odd elements;
#: the faster conversion) or "natural". A GEMM is unchanged by a K permutation applied to both operands
#: that keeps every 32-block in place.
CONVERSION_ORDER = "split"


def to_e4m3(t: MXFP4Tensor, tile: int = TILE, mult: float = 1.0, order: Optional[str] = None,
            flags: Optional[torch.Tensor] = None) -> E4M3Operand:
    """Triton twin of `layouts.to_e4m3_reference` (bit-exact for mult=1); `mult` scales the float32
    scales (used to fold the GEMM's alpha into one operand). `flags`: an int32 [ceil(K/128)] zero
    buffer to write the slab flags into (allocated when None); the operand's `bad` is that buffer
    (nonzero = flagged). No host synchronization."""
    _check_operand(t)
    _need_triton(t.data)
    order = order or CONVERSION_ORDER
    if tile not in (fmt.BLOCK, TILE):
        raise ValueError(f"tile must be {fmt.BLOCK} or {TILE}, got {tile}")
    if order not in L.ORDERS:
        raise ValueError(f"order must be one of {L.ORDERS}, got {order!r}")
    R, K = t.padded_shape
    kp = -(-K // tile) * tile
    dev = t.data.device
    data = t.data if t.data.stride(1) == 1 else t.data.contiguous()
    scales_in = t.scales if t.scales.stride(1) == 1 else t.scales.contiguous()
    codes = torch.empty((R, kp), dtype=torch.float8_e4m3fn, device=dev)
    scales = torch.empty((kp // tile, R), dtype=torch.float32, device=dev)
    nt = -(-K // TILE)
    if flags is None:
        flags = torch.zeros(nt, dtype=torch.int32, device=dev)
    kernel = _to_e4m3_split_kernel if order == "split" else _to_e4m3_kernel
    br = 64
    kernel[(triton.cdiv(R, br), nt)](data, scales_in, codes, scales, flags, R, K // 2, K // fmt.BLOCK, kp,
                                     data.stride(0), scales_in.stride(0), float(mult), FOLD=tile == TILE,
                                     HAS_MULT=float(mult) != 1.0, BR=br, num_warps=4)
    return E4M3Operand(codes, scales, flags, tile, K, order)


def fix_bad_slabs(a: MXFP4Tensor, b: MXFP4Tensor, bad: torch.Tensor, alpha: float, out: torch.Tensor,
                  counter: torch.Tensor, config=(128, 128, 4, 8)) -> torch.Tensor:
    """out += alpha · A[:, S]·B[:, S]ᵀ over the 128-column slabs S flagged in `bad` (int32 [K/128], on the
    device), exactly; adds 1 to `counter` (int32 [1]) when any slab was flagged. No host synchronization."""
    _need_triton(a.data)
    M, K = a.padded_shape
    N = b.shape[0]
    bm, bn, warps, group = config
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _slab_fix_kernel[grid](a.data, a.scales, b.data, b.scales, bad, out, counter, M, N, bad.numel(), K // fmt.BLOCK,
                           a.data.stride(0), a.scales.stride(0), b.data.stride(0), b.scales.stride(0),
                           out.stride(0), out.stride(1), float(alpha), BM=bm, BN=bn, GROUP_M=group,
                           HAS_ALPHA=float(alpha) != 1.0, NTP=triton.next_power_of_2(max(bad.numel(), 1)),
                           num_warps=warps)
    return out


#: (BM, BN, num_warps, num_stages, GROUP_M) per scale block; picked by measurement on the H200 (bench/gemm.py).
FP8_GEMM_CONFIGS = {32: (128, 128, 4, 4, 8), 128: (64, 128, 4, 4, 8)}
DOT_SCALED_CONFIG = (128, 256, 128, 8, 3, 8)  # BM, BN, BK, num_warps, num_stages, GROUP_M


def _epilogue_target(m, n, out_dtype, accumulate_into, dev):
    if accumulate_into is not None:
        return accumulate_into, True
    return torch.empty((m, n), dtype=out_dtype, device=dev), False


def fp8_scaled_gemm(oa: E4M3Operand, ob: E4M3Operand, out_dtype=torch.float32, alpha: float = 1.0,
                    accumulate_into: Optional[torch.Tensor] = None, config=None) -> torch.Tensor:
    """alpha · A·Bᵀ from two E4M3 operands of the same tile (32: exact on any input; 128: exact on the
    slabs that are not flagged bad — their codes are zero, the caller adds them). `alpha` is the final
    float32 factor. Accumulates into `accumulate_into` (float32) when given."""
    if oa.tile != ob.tile or oa.codes.shape[1] != ob.codes.shape[1] or oa.order != ob.order:
        raise ValueError(f"operands differ in tile ({oa.tile}, {ob.tile}), padded K "
                         f"({oa.codes.shape[1]}, {ob.codes.shape[1]}) or order ({oa.order}, {ob.order})")
    _need_triton(oa.codes)
    M, N = oa.codes.shape[0], ob.codes.shape[0]
    sb_ = oa.tile
    bm, bn, warps, stages, group = config or FP8_GEMM_CONFIGS[sb_]
    c, accum = _epilogue_target(M, N, out_dtype, accumulate_into, oa.codes.device)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _fp8_scaled_gemm_kernel[grid](
        oa.codes, ob.codes, oa.scales, ob.scales, c, M, N, oa.codes.shape[1] // sb_,
        oa.codes.stride(0), ob.codes.stride(0), c.stride(0), c.stride(1), float(alpha),
        SB=sb_, IMPRECISE=32 if sb_ > 32 else None, BM=bm, BN=bn, GROUP_M=group, ACCUM=accum,
        HAS_ALPHA=float(alpha) != 1.0, num_warps=warps, num_stages=stages)
    return c


def dot_scaled_gemm(a: MXFP4Tensor, b: MXFP4Tensor, out_dtype=torch.float32, alpha: float = 1.0,
                    accumulate_into: Optional[torch.Tensor] = None, config=None) -> torch.Tensor:
    """The `triton` backend: alpha · a·bᵀ through `tl.dot_scaled` (e2m1 × e2m1, E8M0 scales)."""
    _need_triton(a.data)
    M, K = a.padded_shape
    N = b.shape[0]
    al = gemm_alpha(a, b, alpha)
    bm, bn, bk, warps, stages, group = config or DOT_SCALED_CONFIG
    c, accum = _epilogue_target(M, N, out_dtype, accumulate_into, a.data.device)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _dot_scaled_kernel[grid](
        a.data, b.data, a.scales, b.scales, c, M, N, K, a.data.stride(0), b.data.stride(0),
        a.scales.stride(0), b.scales.stride(0), c.stride(0), c.stride(1), al,
        BM=bm, BN=bn, BK=bk, GROUP_M=group, ACCUM=accum, HAS_ALPHA=al != 1.0, num_warps=warps, num_stages=stages)
    return c


def _triton_backend_supports(t: torch.Tensor) -> Optional[str]:
    return triton_unavailable(t, (9, 0))


register_gemm("triton", dot_scaled_gemm, _triton_backend_supports, priority=10)
