"""MXFP4 GEMM on Blackwell (sm_100) block-scaled tensor cores, through cuBLASLt (DESIGN §4).

The operands go to `torch.nn.functional.scaled_mm` as they are: the packed codes viewed as
`torch.float4_e2m1fn_x2` (two E2M1 values per byte, first element in the low nibble — our packing)
and the E8M0 scales as `torch.float8_e8m0fnu` in the 128×4 swizzled layout cuBLASLt requires
(`layouts.blackwell_scale_layout`), with `ScalingType.BlockWise1x32` and
`SwizzleType.SWIZZLE_32_4_4`. The tensor core applies each 32-block's scale pair itself, so the
product is exact up to float32 accumulation. alpha is applied to the float32 result (as the
reference does), then the output is cast or accumulated into `accumulate_into`.

Selected by capability (10.x only). On such GPUs the `cuda` quantizer writes the swizzled scales in the
same pass (`MXFP4Tensor.swizzled_scales`, checked bit for bit on the H200 against
`layouts.blackwell_scale_layout`); the layout conversion is unit-tested on CPU. This path has not been run
on Blackwell hardware by this project.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..numerics.quantize import MXFP4Tensor, gemm_alpha
from .dispatch import device_capability, register_gemm
from .layouts import _check_operand, blackwell_scale_layout


def _api():
    try:
        from torch.nn.functional import ScalingType, SwizzleType, scaled_mm

        return scaled_mm, ScalingType.BlockWise1x32, SwizzleType.SWIZZLE_32_4_4
    except (ImportError, AttributeError):
        return None


def blackwell_supports(t: torch.Tensor) -> Optional[str]:
    if not t.is_cuda:
        return f"needs a CUDA device (tensor is on {t.device})"
    cap = device_capability(t.device)
    if cap[0] != 10:
        return f"native MXFP4 tensor cores need compute capability 10.x (Blackwell), found {cap[0]}.{cap[1]}"
    if not (hasattr(torch, "float4_e2m1fn_x2") and hasattr(torch, "float8_e8m0fnu")) or _api() is None:
        return f"torch {torch.__version__} lacks float4_e2m1fn_x2 / float8_e8m0fnu / scaled_mm block scaling"
    return None


def blackwell_operand(t: MXFP4Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(codes as float4_e2m1fn_x2 [R, K/2], swizzled scales as float8_e8m0fnu, flat) for cuBLASLt: the
    quantizer's swizzled copy when it wrote one (the `cuda` quantizer does on Blackwell), else made here."""
    _check_operand(t)
    data = t.data if t.data.is_contiguous() else t.data.contiguous()
    swz = t.swizzled_scales if t.swizzled_scales is not None else blackwell_scale_layout(t.scales)
    return data.view(torch.float4_e2m1fn_x2), swz.view(torch.float8_e8m0fnu)


def blackwell_gemm(a: MXFP4Tensor, b: MXFP4Tensor, out_dtype=torch.float32, alpha: float = 1.0,
                   accumulate_into: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The `blackwell` backend: cuBLASLt block-scaled MXFP4 (not run on hardware by this project)."""
    scaled_mm, blockwise1x32, swizzle = _api()
    qa, sa = blackwell_operand(a)
    qb, sb = blackwell_operand(b)
    out = scaled_mm(qa, qb.t(), sa, blockwise1x32, sb, blockwise1x32, swizzle_a=swizzle, swizzle_b=swizzle,
                    output_dtype=torch.float32)
    alpha_t = gemm_alpha(a, b, alpha)
    if alpha_t != 1.0:
        out.mul_(alpha_t)
    if accumulate_into is not None:
        return accumulate_into.add_(out)
    return out if out_dtype == torch.float32 else out.to(out_dtype)


register_gemm("blackwell", blackwell_gemm, blackwell_supports, priority=40)
