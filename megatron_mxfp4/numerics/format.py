"""The MXFP4 format (OCP Microscaling v1.0): E2M1 elements, E8M0 scales, packing.

This module is the single source of truth for the codebook, the shared-exponent rule, the
rounding rules (RTN and SR) and the nibble packing. Every backend reproduces these bit for bit.
"""
from __future__ import annotations

import struct

import torch

#: MX block size: one E8M0 scale per this many consecutive elements along the reduction dim.
BLOCK = 32
#: Magnitudes of E2M1 codes 0..7; codes 8..15 are their negatives (sign = bit 3).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
#: floor(log2(E2M1_MAX)): the element format's largest exponent.
E2M1_EMAX = 2
#: E8M0: value 2^(byte - 127); 0xFF encodes NaN.
E8M0_BIAS = 127
E8M0_NAN = 0xFF
#: Clamp range of the shared exponent (E8M0 without the NaN code).
EXP_MIN, EXP_MAX = -127, 127
#: SR prescale: 3/4 maps the scaled block max from [4, 8) into [3, 6), so nothing clips.
SR_PRESCALE = 0.75

# RTN decision thresholds on |v| (the midpoints of the grid). "Ties to even": at a midpoint
# the code with an even mantissa bit wins, i.e. the tie goes up at 0.75, 1.75, 3.5 and down at
# 0.25, 1.25, 2.5, 5. `_RTN_UP_ON_TIE[i]` says whether the i-th midpoint is crossed by a tie.
_RTN_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_RTN_UP_ON_TIE = (False, True, False, True, False, True, False)


def e2m1_table(device=None) -> torch.Tensor:
    """All 16 E2M1 code values as float32, indexed by code (sign in bit 3)."""
    mags = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)
    return torch.cat([mags, -mags])


def shared_exponent(amax: torch.Tensor) -> torch.Tensor:
    """Shared block exponent e = floor(log2(amax)) - 2, clamped to [-127, 127] (int32).

    floor(log2) is read exactly from the float32 exponent bits. Subnormal and zero amax give the
    smallest exponent. `amax` must be float32, finite and >= 0 (non-finite blocks are handled by
    the caller: they get the NaN scale).
    """
    if amax.dtype != torch.float32:
        raise TypeError(f"shared_exponent expects float32 amax, got {amax.dtype}")
    biased = (amax.view(torch.int32) >> 23) & 0xFF
    # Exponent field 0 (zero or subnormal) has floor(log2) <= -127, which clamps anyway.
    e = torch.where(biased == 0, torch.full_like(biased, EXP_MIN), biased - E8M0_BIAS - E2M1_EMAX)
    return e.clamp(EXP_MIN, EXP_MAX)


def exp2_int(e: torch.Tensor) -> torch.Tensor:
    """2^e as an exact float32 for integer e in [-126, 127], built from the exponent bits."""
    return ((e.to(torch.int32) + E8M0_BIAS) << 23).view(torch.float32)


def decode_scales(scales: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes -> float32 2^(s - 127); 0xFF -> NaN. Exact (2^-127 is a float32 subnormal)."""
    s = scales.to(torch.int32)
    val = exp2_int((s - E8M0_BIAS).clamp(min=-126))
    val = torch.where(s == 0, val * 0.5, val)  # 2^-127 is subnormal: halve 2^-126 exactly
    return torch.where(s == E8M0_NAN, torch.full_like(val, float("nan")), val)


def round_rtn(v: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8, 0..15) of float32 `v` by round-to-nearest, ties to even, saturating at 6."""
    a = v.abs()
    mag = torch.zeros_like(a, dtype=torch.uint8)
    for t, up in zip(_RTN_MIDPOINTS, _RTN_UP_ON_TIE):
        mag += (a >= t) if up else (a > t)
    return mag | (torch.signbit(v).to(torch.uint8) << 3)


def sr_threshold(f: torch.Tensor) -> torch.Tensor:
    """The contract-v2 threshold t = (floor(512 f) + 1) >> 1 = floor(256 f + 1/2) (int64, 0..256) of a
    float32 fraction f in [0, 1): an element rounds up iff its 8-bit dither r < t, so P(up) = t / 256 and
    |P(up) - f| <= 1/512. 512 f is exact in float32 (a power-of-two scaling)."""
    return (torch.floor(f * 512.0).to(torch.int64) + 1) >> 1


def round_sr(v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8) of float32 `v` by stochastic rounding with 8-bit dither `r` (integers 0..255).

    |v| in [lo, hi] between neighbouring grid values has the fraction f = (|v| - lo) / (hi - lo), exact in
    float32 (Sterbenz; the gaps are powers of two), and rounds up iff r < `sr_threshold(f)`, so every
    backend makes the same decision for the same r. |v| >= 6 saturates at 6.
    """
    a = v.abs()
    grid = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=v.device)
    # bucketize wants contiguous input (it warns and copies otherwise)
    lo_code = (torch.bucketize(a.contiguous(), grid, right=True) - 1).clamp(0, 7)
    lo = grid[lo_code]
    hi = grid[(lo_code + 1).clamp(max=7)]
    gap = torch.where(lo_code == 7, torch.ones_like(a), hi - lo)
    f = torch.where(lo_code == 7, torch.zeros_like(a), (a - lo) / gap)
    up = r.to(torch.int64) < sr_threshold(f)
    mag = (lo_code + up.to(lo_code.dtype)).to(torch.uint8)
    return mag | (torch.signbit(v).to(torch.uint8) << 3)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack uint8 codes (last dim even) two per byte, first element in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_nibbles needs an even last dimension, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_nibbles(data: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles`: uint8 bytes [..., n] -> codes [..., 2n]."""
    lo = data & 0x0F
    hi = data >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def round_to_float32(x: float) -> float:
    """x rounded once (to nearest, ties to even) to float32, as a Python float. A host-side scalar
    helper (no tensor, no device): the GEMM's alpha and the Hadamard scale are float32 numbers."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:  # beyond float32's range: rounds to infinity
        return float("inf") if x > 0 else float("-inf")
