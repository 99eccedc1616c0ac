"""Per-tensor current-scaling E4M3 cast in two launches (the FP8 forward's operand cast).

Runs on the CUDA extension (csrc/mxfp4_fp8_cast.h: both operands of a GEMM in one call, two launches) where
it is built, else on the two Triton kernels below, with the same arithmetic.

`quantize_fp8_fused(x)` is the compiled twin of `numerics.fp8.quantize_fp8`, bit for bit: one kernel reduces
amax |x| into a device scalar (float32 bits compared as integers: every |x| is non-negative, so the integer
order is the float order, and a NaN's bits exceed every finite value's, so NaN propagates as in `amax`), a
second computes s = amax · float32(1/448) (1 when amax is 0 or NaN; on CUDA, PyTorch divides a tensor by a
Python number as a product with its float32 reciprocal, so the reference's `amax / 448` is this product) and writes
E4M3(x / s) (an IEEE division, as the reference's division by the 0-d scale tensor) rounded to
nearest-even, with NaN (its sign kept) for NaN and for |x / s| > 464 as torch's cast gives (only reachable when
amax is NaN, s = 1; otherwise |x / s| <= 448). Nothing synchronizes with the host.
The reference takes about eight element-wise launches per operand.

The weight is cast again in every forward. Reusing its cast across the micro-batches of a step would need to
know that the weight has not changed, and its autograd version counter does not say so in Megatron: the
optimizer writes through `.data` and the parameter all-gather writes into the bucket buffer the parameters
view, neither of which moves the counter (a cache keyed on it would keep a stale weight).
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch

from ..numerics.format import round_to_float32
from ..numerics.fp8 import E4M3_MAX, quantize_fp8
from .cuda_quantize import _DTYPE_CODES, _ext, current_stream_handle, launch_on
from .dispatch import device_capability

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs
    triton = None

_BLOCK = 4096
_INV_MAX = round_to_float32(1.0 / E4M3_MAX)  # what torch on CUDA multiplies by for `tensor / E4M3_MAX`


def _native() -> bool:
    return _ext is not None and hasattr(_ext, "fp8_cast")


def supports(x: torch.Tensor) -> Optional[str]:
    """None when the fused cast can run on x, else the reason."""
    if triton is None and not _native():
        return "neither the CUDA extension nor Triton is available"
    if not x.is_cuda:
        return f"needs a CUDA tensor (tensor is on {x.device})"
    if device_capability(x.device) < (8, 9):
        return "E4M3 needs compute capability >= 8.9"
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"casts float32/bfloat16/float16, got {x.dtype}"
    return None


if triton is not None:

    @triton.jit
    def _amax_kernel(x_ptr, amax_bits_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        a = tl.abs(tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32))
        bits = a.to(tl.int32, bitcast=True)  # a >= 0 (NaN: positive quiet bits), so int order = float order
        tl.atomic_max(amax_bits_ptr, tl.max(bits, axis=0))

    @triton.jit
    def _cast_kernel(x_ptr, amax_bits_ptr, codes_ptr, scale_ptr, n, inv_max, BLOCK: tl.constexpr):
        amax = tl.load(amax_bits_ptr).to(tl.float32, bitcast=True)
        s = tl.where(amax > 0, amax * inv_max, 1.0)  # 0 or NaN: 1, as in the reference
        pid = tl.program_id(0)
        if pid == 0:
            tl.store(scale_ptr, s)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        y = tl.math.div_rn(tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32), s)
        code = y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        # torch's cast gives NaN (0x7F with y's sign bit) above 464 (rounding up to the 480 pattern, which is
        # NaN in e4m3fn) and for NaN; the cvt saturates to 448 instead
        sign = ((y.to(tl.uint32, bitcast=True) >> 24) & 0x80).to(tl.uint8)
        code = tl.where((tl.abs(y) > 464.0) | (y != y), sign | 0x7F, code)
        tl.store(codes_ptr + offs, code, mask=mask)


def quantize_fp8_fused(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 tensor of x's shape, float32 0-d scale) with x ≈ codes · scale: `quantize_fp8` in two launches."""
    reason = supports(x)
    if reason is not None:
        raise RuntimeError(f"megatron_mxfp4 fused FP8 cast: {reason}")
    if _native():
        return quantize_fp8_pair(x)[0]
    return triton_cast(x)


def triton_cast(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """`quantize_fp8_fused` on the two Triton kernels (where the extension is not built)."""
    xc = x if x.is_contiguous() else x.contiguous()
    n = xc.numel()
    amax_bits = torch.zeros((), dtype=torch.int32, device=x.device)
    codes = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((), dtype=torch.float32, device=x.device)
    grid = (max(1, triton.cdiv(n, _BLOCK)),)
    _amax_kernel[grid](xc, amax_bits, n, BLOCK=_BLOCK)
    _cast_kernel[grid](xc, amax_bits, codes.view(torch.uint8), scale, n, _INV_MAX, BLOCK=_BLOCK)
    return codes, scale


def quantize_fp8_pair(a: torch.Tensor, b: Optional[torch.Tensor] = None):
    """`quantize_fp8_fused` of a GEMM's operands in one extension call (two launches for both):
    ((codes_a, scale_a), (codes_b, scale_b)), the second None without b."""
    dev = a.device
    ops = [t if t.is_contiguous() else t.contiguous() for t in ((a,) if b is None else (a, b))]
    outs = [(torch.empty(t.shape, dtype=torch.float8_e4m3fn, device=dev), torch.empty((), dtype=torch.float32,
                                                                                     device=dev)) for t in ops]
    work = torch.empty(len(ops), dtype=torch.int32, device=dev)
    args = []
    for t, (codes, scale) in zip(ops, outs):
        args += [t.data_ptr(), _DTYPE_CODES[t.dtype], t.numel(), codes.data_ptr(), scale.data_ptr()]
    if b is None:
        args += [0, 0, 0, 0, 0]  # no second operand (count = 1)
    launch_on(dev, _ext.fp8_cast, *args, len(ops), _INV_MAX, work.data_ptr(), current_stream_handle(dev))
    return outs[0], (outs[1] if b is not None else None)


_warned = set()


def quantize_fp8_any(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """`quantize_fp8_fused` where it runs, else the reference `quantize_fp8` (the same bits; on a GPU with a
    one-time warning, since it is the slower path)."""
    reason = supports(x)
    if reason is None:
        return quantize_fp8_fused(x)
    if x.is_cuda and "fallback" not in _warned:
        _warned.add("fallback")
        warnings.warn(f"megatron_mxfp4: the FP8 forward casts with PyTorch ops ({reason})", RuntimeWarning,
                      stacklevel=2)
    return quantize_fp8(x)


__all__ = ["supports", "quantize_fp8_fused", "quantize_fp8_pair", "quantize_fp8_any"]
