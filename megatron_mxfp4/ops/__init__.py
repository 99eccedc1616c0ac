"""Kernel layer: one dispatch for quantize, GEMM and the FP8 forward (DESIGN §4).

`backend="auto"` picks the fastest backend registered for the tensor's device; an explicit backend
that cannot run on it is an error, never a silent fallback. Compiled/Triton backends live in their
own modules, which register themselves on import (a missing module is simply absent).
"""
import importlib as _importlib

from .dispatch import (
    available_backends,
    fp8_matmul,
    mxfp4_gemm,
    quantize_mxfp4,
    quantize_mxfp4_dual,
    register_dual_quantizer,
    register_gemm,
    register_quantizer,
)

for _name in ("cuda_quantize", "hopper_gemm", "blackwell_gemm", "triton_gemm"):
    try:
        _importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as _e:
        if _e.name != f"{__name__}.{_name}":
            raise

__all__ = [
    "available_backends", "fp8_matmul", "mxfp4_gemm", "quantize_mxfp4", "quantize_mxfp4_dual", "register_dual_quantizer",
    "register_gemm", "register_quantizer",
]
