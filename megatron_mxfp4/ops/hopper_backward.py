"""A linear layer's MXFP4 backward on Hopper as one extension call (csrc/mxfp4_backward_hopper.h).

For Y = X·Wᵀ with dY [T, out], X [T, in], W [out, in] (2-d, row-major with 16-byte aligned rows), one call
launches the dual quantizer of dY, the column quantizers of W and X and both `hopper` GEMMs, exactly the
kernels and arguments that `backward.dgrad` / `backward.wgrad` issue through the dispatcher one Python call
at a time (so both give the same bits); the host pays for one allocation of the quantized operands and one
call instead of ~30 tensor allocations, checks and launches from Python. `supported` says when it applies;
the caller (`backward.fused_backward`) takes the Python path otherwise.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ..numerics import format as fmt
from ..numerics.rht import hadamard_scale
from . import hopper_gemm as hg
from .cuda_quantize import _DTYPE_CODES, _ext, _row_major, _u64, current_stream_handle, launch_on


def native_reason() -> Optional[str]:
    """None when the extension can run the whole backward in one call, else why not."""
    reason = hg.native_reason()
    if reason is None and not hasattr(_ext, "backward_hopper"):
        reason = "the CUDA extension predates the one-call backward (rebuild it)"
    return reason


def supported(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
              accumulate_into: Optional[torch.Tensor] = None) -> bool:
    """Whether these operands can take the one-call path (else the dispatcher's steps run, with the same bits)."""
    if not (dy.is_cuda and dy.dim() == x.dim() == w.dim() == 2 and dy.device == x.device == w.device):
        return False
    t, out = dy.shape
    if not (t and out and x.shape[1] and x.shape[0] == t and tuple(w.shape) == (out, x.shape[1])):
        return False
    for v in (dy, x, w):
        if v.dtype not in _DTYPE_CODES or not _row_major(v, v.element_size()):
            return False
    if accumulate_into is not None and (accumulate_into.dtype != torch.float32 or accumulate_into.stride(1) != 1
                                        or tuple(accumulate_into.shape) != (out, x.shape[1])
                                        or accumulate_into.device != dy.device):
        return False  # the Python steps check it (mxfp4_gemm refuses a wrong shape) instead of writing past it
    return native_reason() is None


def backward_gemms(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, *, rht_block: int, stochastic: bool,
                   prescale: float, seed, offsets: Sequence, signs_dgrad: Optional[torch.Tensor],
                   signs_wgrad: Optional[torch.Tensor], dx_dtype: torch.dtype, dw_dtype: torch.dtype,
                   accumulate_into: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dX [T, in] in dx_dtype, dW [out, in] in dw_dtype, or `accumulate_into` with dW added) in one call.

    offsets: the Philox offsets (int or one-element int64 CUDA tensor) of (dgrad dY, dgrad W, wgrad dY,
    wgrad X); signs: float32 [g] CUDA tensors, or None for the dY kernel to draw them (g > 0). Call only where
    `supported(dy, x, w, accumulate_into)`."""
    dev = dy.device
    t, out = dy.shape
    n_in = x.shape[1]
    alpha = fmt.round_to_float32(1.0 / (prescale * prescale))
    dx = torch.empty((t, n_in), dtype=dx_dtype, device=dev)
    acc = accumulate_into is not None
    dw = accumulate_into if acc else torch.empty((out, n_in), dtype=dw_dtype, device=dev)
    dx_type, dw_type = hg._OUT_TYPES[dx.dtype], hg._OUT_TYPES[dw.dtype]
    size = _ext.backward_hopper_workspace_size(t, n_in, out, rht_block, dx.data_ptr(), dx.stride(0), dx_type,
                                               dw.data_ptr(), dw.stride(0), dw_type, acc)
    ws = torch.empty(size, dtype=torch.uint8, device=dev)
    u64 = [*_u64("seed", seed, dev)]
    for off in offsets:
        u64 += _u64("offset", off, dev)
    stream = current_stream_handle(dev)
    lt = hg._lt_workspace(dev, stream)
    sd = 0 if signs_dgrad is None else signs_dgrad.data_ptr()
    sw = 0 if signs_wgrad is None else signs_wgrad.data_ptr()
    scaling = hg._SCALINGS[hg.SCALING]
    used = launch_on(dev, _ext.backward_hopper, dy.data_ptr(), _DTYPE_CODES[dy.dtype], dy.stride(0), x.data_ptr(),
                     _DTYPE_CODES[x.dtype], x.stride(0), w.data_ptr(), _DTYPE_CODES[w.dtype], w.stride(0), t, n_in,
                     out, rht_block, stochastic, prescale, hadamard_scale(rht_block) if rht_block else 1.0, *u64, sd,
                     sw, alpha, alpha, dx.data_ptr(), dx.stride(0), dx_type, dw.data_ptr(), dw.stride(0), dw_type, acc,
                     scaling, ws.data_ptr(), size, lt.data_ptr(), hg.LT_WORKSPACE_BYTES,
                     hg.monitor.counter(dev).data_ptr(), stream)
    if used != scaling:
        hg._warn_once("rows_unsupported", "megatron_mxfp4: cuBLASLt has no FP8 GEMM with per-row scales for a "
                                          f"backward GEMM of T={t}, in={n_in}, out={out}; it used 1x128 tile scales")
    hg.monitor.after_call(dev)
    return dx, dw


__all__ = ["native_reason", "supported", "backward_gemms"]
