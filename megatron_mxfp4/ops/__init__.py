"""Kernel layer: one dispatch for quantize, GEMM and the FP8 forward (DESIGN §4).

`backend="auto"` picks the fastest backend registered for the tensor's device; an explicit backend
that cannot run on it is an error, never a silent fallback.
"""
from .dispatch import (
    available_backends,
    fp8_matmul,
    mxfp4_gemm,
    quantize_mxfp4,
    register_gemm,
    register_quantizer,
)

__all__ = [
    "available_backends", "fp8_matmul", "mxfp4_gemm", "quantize_mxfp4", "register_gemm", "register_quantizer",
]
