"""The E4M3 conversions of the Hopper GEMM on the CUDA extension (csrc/mxfp4_tiles.cu, csrc/mxfp4_rows.cu).

`to_e4m3_rows` is the compiled twin of `layouts.to_e4m3_rows_reference` (one float32 scale per row); the
native GEMM runs it inside its own call, this entry point serves the tests.

`to_e4m3_tiles` is the compiled twin of `layouts.to_e4m3_reference(t, 128, "natural")`, bit for bit
(tile scales multiplied by `mult` in float32): one pass that reads the packed codes and block scales
once and writes the E4M3 codes, the float32 tile scales and the slab flags, with no host
synchronization. `tile_operands` prepares both operands of a GEMM in three launches (plus the zeroing
of the flags): convert A, convert B, then zero A's tile scales on every slab flagged in either.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..numerics.quantize import MXFP4Tensor
from .cuda_quantize import _LOAD_ERROR, _ext, current_stream_handle, launch_on
from .layouts import TILE, E4M3Operand, E4M3RowOperand, _check_operand


def supports(t: torch.Tensor) -> Optional[str]:
    """None when the compiled conversion can run on t's device, else the reason."""
    if _ext is None or not hasattr(_ext, "to_e4m3_tiles"):
        return _LOAD_ERROR or "the CUDA extension predates the E4M3-tile kernel (rebuild it)"
    if not t.is_cuda:
        return f"needs a CUDA tensor (tensor is on {t.device})"
    return None


def _call(dev: torch.device, fn, *args) -> None:
    """fn(*args, stream) on dev's current stream, from dev's context."""
    launch_on(dev, fn, *args, current_stream_handle(dev))


def packed_operand(t: MXFP4Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """t's codes with 8-byte aligned unit-stride rows, and its scales with unit-stride rows."""
    data = t.data
    if data.stride(1) != 1 or data.stride(0) % 8 or data.data_ptr() % 8:
        data = data.contiguous() if not data.is_contiguous() else data.clone()
    scales = t.scales if t.scales.stride(1) == 1 else t.scales.contiguous()
    return data, scales


def to_e4m3_tiles(t: MXFP4Tensor, mult: float = 1.0, flags: Optional[torch.Tensor] = None,
                  rows_out: Optional[int] = None) -> E4M3Operand:
    """[R, K] MXFP4Tensor (quantized along K) -> E4M3 codes [Ro, Kp] + float32 tile scales [Kp/128, Ro] in
    natural element order, Ro = `rows_out` (default R; rows past R are zero codes: a GEMM's M or N padded
    for the library). `flags`: an int32 [ceil(K/128)] zero buffer for the slab flags (allocated when
    None); the result's `bad` is that buffer (nonzero = flagged)."""
    _check_operand(t)
    reason = supports(t.data)
    if reason is not None:
        raise RuntimeError(f"megatron_mxfp4 E4M3-tile conversion: {reason}")
    R, K = t.padded_shape
    ro = R if rows_out is None else max(int(rows_out), R)
    nt = -(-K // TILE)
    dev = t.data.device
    data, scales = packed_operand(t)
    codes = torch.empty((ro, nt * TILE), dtype=torch.float8_e4m3fn, device=dev)
    tile_scales = torch.empty((nt, ro), dtype=torch.float32, device=dev)
    if flags is None:
        flags = torch.zeros(nt, dtype=torch.int32, device=dev)
    elif flags.dtype != torch.int32 or flags.numel() != nt or not flags.is_contiguous() or flags.device != dev:
        raise ValueError(f"flags must be a contiguous int32 tensor of {nt} elements on {dev}, got "
                         f"{flags.dtype} {tuple(flags.shape)} on {flags.device}")
    _call(dev, _ext.to_e4m3_tiles, data.data_ptr(), data.stride(0), scales.data_ptr(), scales.stride(0), R, K,
          codes.data_ptr(), tile_scales.data_ptr(), flags.data_ptr(), float(mult), ro)
    return E4M3Operand(codes, tile_scales, flags, TILE, K, "natural")


def to_e4m3_rows(t: MXFP4Tensor, mult: float = 1.0, rows_out: Optional[int] = None):
    """[R, K] MXFP4Tensor (quantized along K) -> the per-row layout of `layouts.to_e4m3_rows_reference` (its
    compiled twin, bit for bit), Ro = `rows_out` rows (default R). Returns (E4M3RowOperand, flagged row
    indices int32 [count]) — the list the GEMM's row fix reads (order unspecified)."""
    _check_operand(t)
    reason = supports(t.data)
    if reason is None and not hasattr(_ext, "to_e4m3_rows"):
        reason = "the CUDA extension predates the E4M3-row kernel (rebuild it)"
    if reason is not None:
        raise RuntimeError(f"megatron_mxfp4 E4M3-row conversion: {reason}")
    R, K = t.padded_shape
    ro = R if rows_out is None else max(int(rows_out), R)
    dev = t.data.device
    data, scales = packed_operand(t)
    codes = torch.empty((ro, -(-K // TILE) * TILE), dtype=torch.float8_e4m3fn, device=dev)
    row_scales = torch.empty(ro, dtype=torch.float32, device=dev)
    flags = torch.empty(ro, dtype=torch.int32, device=dev)
    lst = torch.empty(max(R, 1), dtype=torch.int32, device=dev)
    count = torch.zeros(1, dtype=torch.int32, device=dev)
    _call(dev, _ext.to_e4m3_rows, data.data_ptr(), data.stride(0), scales.data_ptr(), scales.stride(0), R, K,
          codes.data_ptr(), row_scales.data_ptr(), flags.data_ptr(), lst.data_ptr(), count.data_ptr(), float(mult), ro)
    return E4M3RowOperand(codes, row_scales, flags.bool(), K), lst[:int(count.item())]


def tile_operands(a: MXFP4Tensor, b: MXFP4Tensor, mult_b: float = 1.0, row_multiple: int = 1):
    """Both operands of A·Bᵀ in the E4M3-tile layout (B's tile scales times `mult_b`), with A's tile
    scales zeroed on every K-slab flagged in either operand; each operand's rows padded with zero codes to
    a multiple of `row_multiple`. Returns (oa, ob, flags int32 [K/128])."""
    if a.padded_shape[1] != b.padded_shape[1]:
        raise ValueError(f"operands differ in K: {a.padded_shape[1]} and {b.padded_shape[1]}")
    nt = -(-a.padded_shape[1] // TILE)
    dev = a.data.device
    flags = torch.zeros((2, nt), dtype=torch.int32, device=dev)
    up = lambda r: -(-r // row_multiple) * row_multiple  # noqa: E731
    oa = to_e4m3_tiles(a, flags=flags[0], rows_out=up(a.shape[0]))
    ob = to_e4m3_tiles(b, mult=mult_b, flags=flags[1], rows_out=up(b.shape[0]))
    _call(dev, _ext.mask_flagged_slabs, flags[0].data_ptr(), flags[1].data_ptr(), oa.scales.data_ptr(),
          oa.codes.shape[0], nt)
    return oa, ob, flags[0]


__all__ = ["supports", "to_e4m3_tiles", "to_e4m3_rows", "tile_operands", "packed_operand"]
