"""Blockwise random Hadamard transform (DESIGN §2.3), float32, fast Walsh-Hadamard.

Each contiguous g-block x of the last dimension becomes H_g · diag(s) · x, with H_g the Sylvester
Hadamard matrix scaled by 1/sqrt(g). Two operands rotated with the same signs along their shared
reduction dimension multiply to the unrotated product, because (H S)ᵀ (H S) = I.
"""
from __future__ import annotations

import functools
import math

import torch

from .format import round_to_float32
from .philox import random_signs

RHT_BLOCKS = (32, 64, 128, 256)
SIGN_POLICIES = ("per_call", "per_layer", "deterministic", "off")


def check_rht_block(g: int) -> int:
    if g not in (0,) + RHT_BLOCKS:
        raise ValueError(f"rht_block must be 0 (off) or one of {RHT_BLOCKS}, got {g}")
    return g


@functools.lru_cache(maxsize=None)
def hadamard_scale(g: int) -> float:
    """1/sqrt(g) rounded once to float32 (exact for g = 64 and 256)."""
    return round_to_float32(1.0 / math.sqrt(g))


def hadamard_matrix(g: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Normalized Sylvester Hadamard matrix H_g (symmetric, H_g · H_gᵀ = I)."""
    h = torch.ones(1, 1, dtype=torch.float64, device=device)
    while h.shape[0] < g:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(g)).to(dtype)


def fwht(x: torch.Tensor, g: int) -> torch.Tensor:
    """Unnormalized Walsh-Hadamard transform of each g-block of the last dim (float32 butterflies)."""
    shape = x.shape
    y = x.reshape(-1, shape[-1] // g, g)
    h = 1
    while h < g:
        y = y.reshape(y.shape[0], y.shape[1], g // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack([a + b, a - b], dim=-2)
        h *= 2
    return y.reshape(shape)


def apply_rht(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """H_g · diag(signs) on every g-block of the last dimension of `x`; g = len(signs). float32 out."""
    g = signs.numel()
    check_rht_block(g)
    if x.shape[-1] % g:
        raise ValueError(f"RHT block {g} does not divide the reduced dimension {x.shape[-1]}")
    xs = x.to(torch.float32).reshape(*x.shape[:-1], x.shape[-1] // g, g) * signs.to(torch.float32)
    return fwht(xs.reshape(x.shape), g) * hadamard_scale(g)


def invert_rht(y: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Inverse of `apply_rht`: diag(signs) · H_g per g-block (H_g is symmetric and orthogonal)."""
    g = signs.numel()
    x = fwht(y.to(torch.float32), g) * hadamard_scale(g)
    return (x.reshape(*y.shape[:-1], y.shape[-1] // g, g) * signs.to(torch.float32)).reshape(y.shape)


def draw_signs(g: int, seed: int, offset: int, device=None) -> torch.Tensor:
    """The g Rademacher signs of the sign stream at (seed, offset)."""
    check_rht_block(g)
    return random_signs(seed, offset, g, device)
