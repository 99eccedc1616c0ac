"""FP8 E4M3 with per-tensor current scaling: the optional forward of the recipe (reference)."""
from __future__ import annotations

import torch

E4M3_MAX = 448.0


def fp8_scale(x: torch.Tensor) -> torch.Tensor:
    """Current scaling: a float32 scalar s with amax(x) / s = 448 (1 for an all-zero tensor)."""
    amax = x.detach().abs().amax().to(torch.float32)
    return torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))


def quantize_fp8(x: torch.Tensor):
    """(E4M3 tensor, float32 scale) with x ≈ codes · scale; NaN/Inf propagate through the scale."""
    s = fp8_scale(x)
    return (x.to(torch.float32) / s).to(torch.float8_e4m3fn), s


def fp8_matmul_reference(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a [M, K] · b [N, K]ᵀ with both operands in E4M3 (current scaling), float32 accumulation."""
    qa, sa = quantize_fp8(a)
    qb, sb = quantize_fp8(b)
    return ((qa.to(torch.float32) @ qb.to(torch.float32).t()) * (sa * sb)).to(out_dtype)
