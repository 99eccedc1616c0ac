"""The "cuda" quantizer: the fused kernels of csrc/ (RHT + E8M0 scale + SR/RTN + packing) (DESIGN §4).

Registers itself with the dispatcher on import: `quantize_mxfp4(..., backend="auto")` picks it for
CUDA tensors when the extension `megatron_mxfp4._mxfp4_cuda` is built (sm_80 or newer), and
`quantize_mxfp4_dual` uses its dual kernel (one read of dY, both copies written).

Every result is bit-identical to `quantize_reference` on the same arguments, any size included (the
kernels read past the input's edge as zeros and write the padded copies). Layouts:

* dim = last of a row-major tensor: the row kernel (quantized along the contiguous dimension);
* dim = last of a 2-d transposed view `base.t()` (how the backward hands dYᵀ, Xᵀ and Wᵀ over):
  the column kernel reads `base` and writes the packed [N, T/2] layout directly;
* dim = 0 of a 2-d tensor: the logical order moves the quantized dim last, so this is the column
  kernel on the tensor (or the row kernel on its transposed view), outputs transposed back;
* any other layout is copied (dim = last) or falls back to the reference, each with a one-time warning.

`seed` and `offset` may be Python ints or one-element int64 CUDA tensors holding the bits of the
unsigned 64-bit value (read by the kernel on the device: safe under CUDA graph capture). RHT signs
are taken by their sign bit (the recipe's signs are ±1); without `signs` the kernel draws them from
the sign stream and returns them in `MXFP4Tensor.signs`.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Optional, Tuple

import torch

from ..numerics.quantize import MXFP4Tensor, check_quantize_args, padded_size, quantize_reference, resolve_prescale
from ..numerics.rht import hadamard_scale
from .dispatch import device_capability, quantize_dual_reference, register_dual_quantizer, register_quantizer
from .layouts import blackwell_scale_shape

try:
    _ext = importlib.import_module(__name__.rsplit(".", 2)[0] + "._mxfp4_cuda")
    _LOAD_ERROR: Optional[str] = None
except ImportError as _e:  # not built (CPU install, or no nvcc at install time)
    _ext = None
    _LOAD_ERROR = f"the CUDA extension megatron_mxfp4._mxfp4_cuda is not available ({_e})"

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
ROW, COL, DUAL = 1, 2, 3
_warned = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"megatron_mxfp4 cuda quantizer: {msg}", RuntimeWarning, stacklevel=4)


def supports(x) -> Optional[str]:
    """None when the kernels can quantize `x`, else the reason."""
    if _ext is None:
        return _LOAD_ERROR
    if not isinstance(x, torch.Tensor) or not x.is_cuda:
        return "the cuda quantizer needs a CUDA tensor"
    if device_capability(x.device) < (8, 0):
        return f"{torch.cuda.get_device_name(x.device)} is older than sm_80"
    return None


def _raw_stream_fallback(index: int) -> int:
    return torch.cuda.current_stream(index).cuda_stream


#: The current CUDA stream of a device index as an integer handle (the cheap private accessor that Triton
#: and Inductor use, where this torch has it: a launch happens several times per backward GEMM).
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or _raw_stream_fallback


def current_stream_handle(device: torch.device) -> int:
    """The current stream of `device` as the integer the extension's launchers take."""
    return _raw_stream(device.index if device.index is not None else torch.cuda.current_device())


def launch_on(device: torch.device, fn, *args, **kwargs):
    """fn(*args, **kwargs) from `device`'s context, so that its launches reach the tensors' GPU (switching
    devices only when it is not the current one: this runs several times per backward GEMM). Returns fn's
    result."""
    if device.index is None or device.index == torch.cuda.current_device():
        return fn(*args, **kwargs)
    with torch.cuda.device(device):
        return fn(*args, **kwargs)


def is_available() -> bool:
    return _ext is not None


def _u64(name: str, v, device) -> Tuple[int, int]:
    """(device pointer, value) of a seed/offset given as an int or a one-element int64 CUDA tensor."""
    if isinstance(v, torch.Tensor):
        if v.device != device or v.dtype not in (torch.int64, torch.uint64) or v.numel() != 1:
            raise ValueError(f"{name} as a tensor must be one int64 element on {device}, got "
                             f"{v.dtype} {tuple(v.shape)} on {v.device}")
        if not v.is_contiguous():
            raise ValueError(f"{name} tensor must be contiguous")
        return v.data_ptr(), 0
    v = int(v)
    if not 0 <= v < 2**64:
        raise ValueError(f"{name} must be an unsigned 64-bit integer, got {v}")
    return 0, v


def _as_int(v) -> int:
    """A seed/offset for the reference (synchronizes when it is a tensor)."""
    if isinstance(v, torch.Tensor):
        return int(v.item()) & (2**64 - 1)
    return int(v)


def _prepare_signs(signs: Optional[torch.Tensor], g: int, device):
    """(signs in, signs out): the caller's float32 signs, or a buffer the kernel fills with its drawn signs."""
    if not g:
        return None, None
    if signs is None:
        return None, torch.empty(g, dtype=torch.float32, device=device)
    s = signs.to(torch.float32).contiguous()
    return s, None


def _row_major(x: torch.Tensor, sz: int) -> bool:
    """x is 2-d with contiguous rows, a leading dimension of whole 16-byte chunks and a 16-byte aligned
    start (the kernel loads 16-byte chunks; a last partial chunk reads into the row's padding)."""
    return (x.dim() == 2 and x.stride(1) == 1 and x.stride(0) >= x.shape[1] and (x.stride(0) * sz) % 16 == 0
            and x.data_ptr() % 16 == 0)


def _row_major_copy(x: torch.Tensor, sz: int) -> torch.Tensor:
    """x (2-d) as a row-major matrix the kernel can read: rows padded to 16 bytes if needed."""
    if _row_major(x, sz):
        return x
    step = 16 // sz
    cols = -(-x.shape[1] // step) * step
    if cols == x.shape[1]:
        return x.contiguous() if not x.is_contiguous() else x.clone()
    buf = torch.empty(x.shape[0], cols, dtype=x.dtype, device=x.device)
    buf[:, : x.shape[1]] = x
    return buf[:, : x.shape[1]]


def _copy_args(spec, dev) -> list:
    """The extension's arguments for one written copy: (data, scales, signs, signs_out, offset, swizzled) ->
    data, scales, k, signs, signs_out, offset pointer, offset value (swizzled scales go last)."""
    if spec is None:
        return [0, 0, 0, 0, 0, 0, 0]
    data, scales, signs, signs_out, offset, _ = spec
    off_ptr, off_val = _u64("offset", offset, dev)
    return [data.data_ptr(), scales.data_ptr(), data.shape[1] * 2, signs.data_ptr() if signs is not None else 0,
            signs_out.data_ptr() if signs_out is not None else 0, off_ptr, off_val]


_sr_checked = set()  # device indices whose cvt.rs self-test has run (ops/cvt_rs.py)


def check_hw_sr(device: torch.device) -> None:
    """Before the first stochastic rounding on `device`: Blackwell's cvt.rs self-test (ops/cvt_rs.py), which
    switches the SR kernels to the instruction only where it reproduces the contract bit for bit. One set lookup
    afterwards."""
    if device.type != "cuda":  # host-memory stand-ins of the kernels (tests)
        return
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx in _sr_checked:
        return
    from . import cvt_rs

    cvt_rs.ensure(_ext, device)
    if cvt_rs.tested(idx):
        _sr_checked.add(idx)


#: Experimental, off by default: the dual kernel with the Hadamard transform on tensor cores
#: (csrc/mxfp4_quantize_tc.cu) for BF16 dY with g = 64 — the reference's bits where the transform is exact, within
#: DESIGN §2.3's tolerance elsewhere; its speed against the butterfly kernel is measured by bench/quantize.py.
TC_DUAL = False


def _launch(mode: int, base: torch.Tensor, g: int, sr: bool, p: float, seed, *, row=None, col=None,
            tc: bool = False) -> None:
    """One kernel launch on base [rows, cols] (row-major); row/col = (data, scales, signs, signs_out, offset,
    swizzled scales or None) of each copy written, its padded length read off `data` (DESIGN §3). Positional
    arguments: this runs once or twice per backward GEMM, and keyword parsing costs the host more than the launch."""
    dev = base.device
    if sr:
        check_hw_sr(dev)
    seed_ptr, seed_val = _u64("seed", seed, dev)
    swz = [spec[5].data_ptr() if spec is not None and spec[5] is not None else 0 for spec in (row, col)]
    launch_on(dev, _ext.quantize, _DTYPE_CODES[base.dtype], g, mode, sr, base.data_ptr(), base.shape[0], base.shape[1],
              base.stride(0), *_copy_args(row, dev), *_copy_args(col, dev), seed_ptr, seed_val, p,
              hadamard_scale(g) if g else 1.0, current_stream_handle(dev), *swz, tc)


def _outputs(n: int, k: int, g: int, device):
    """Packed data [n, kp/2] and scales [n, kp/32] of n vectors quantized along k padded to kp."""
    kp = padded_size(k, g)
    return (torch.empty(n, kp // 2, dtype=torch.uint8, device=device),
            torch.empty(n, kp // 32, dtype=torch.uint8, device=device))


def _swizzled(n: int, k: int, g: int, device, swizzle: Optional[bool]) -> Optional[torch.Tensor]:
    """The buffer for a GEMM operand's scales in the 128×4-swizzled layout (None when not wanted: by default
    on Blackwell, whose GEMMs read it). Its padding (rows to 128, scale columns to 4) holds 2^0, as
    `layouts.blackwell_scale_layout` pads; the kernel writes the rest."""
    if swizzle is None:
        swizzle = device_capability(device) >= (10, 0)
    if not swizzle:
        return None
    rp, cp = blackwell_scale_shape(n, padded_size(k, g))
    if rp == n and cp * 32 == padded_size(k, g):
        return torch.empty(rp * cp, dtype=torch.uint8, device=device)
    return torch.full((rp * cp,), 127, dtype=torch.uint8, device=device)


def quantize_cuda(x: torch.Tensor, dim: int = -1, rounding: str = "rtn", prescale: Optional[float] = None,
                  rht_block: int = 0, signs: Optional[torch.Tensor] = None, seed=0, offset=0,
                  swizzle: Optional[bool] = None) -> MXFP4Tensor:
    """`quantize_reference` on the GPU (same arguments, same bits); see the module docstring. A 2-d operand
    quantized along its last dim also gets `swizzled_scales` when `swizzle` (default: on Blackwell)."""
    dim = check_quantize_args(x, dim, rht_block, signs)
    reason = supports(x)
    if reason is not None:
        raise RuntimeError(f"cuda quantizer cannot run: {reason}")
    p = resolve_prescale(rounding, prescale)
    sr = rounding == "sr"
    g = rht_block
    sz = x.element_size()
    nd = x.dim()
    if x.numel() == 0:  # nothing to launch (the reference draws the signs on the host)
        return quantize_reference(x, dim, rounding, prescale, g, signs, _as_int(seed), _as_int(offset))
    sig_in, sig_out = _prepare_signs(signs, g, x.device)

    def result(data, scales, swz=None):
        return MXFP4Tensor(data=data, scales=scales, prescale=p, dim=dim, shape=tuple(x.shape), rht_block=g,
                           signs=sig_in if sig_in is not None else sig_out, swizzled_scales=swz)

    if nd == 2 and x.shape[0] > 1 and x.stride(0) == 1 and not x.is_contiguous():
        # x = base.t() with base [C, R] row-major: quantizing x along dim 1 is the column kernel on base
        # (logical index r*Kp + k); along dim 0 it is the row kernel on base, outputs transposed back.
        base = _row_major_copy(x.t(), sz)
        if dim == 1:
            data, scales = _outputs(x.shape[0], x.shape[1], g, x.device)
            swz = _swizzled(x.shape[0], x.shape[1], g, x.device, swizzle)
            _launch(COL, base, g, sr, p, seed, col=(data, scales, sig_in, sig_out, offset, swz))
            return result(data, scales, swz)
        data, scales = _outputs(x.shape[1], x.shape[0], g, x.device)
        _launch(ROW, base, g, sr, p, seed, row=(data, scales, sig_in, sig_out, offset, None))
        return result(data.t().contiguous(), scales.t().contiguous())
    if nd == 2 and dim == 0:
        base = _row_major_copy(x, sz)  # [T, N] quantized along T: the column kernel, outputs transposed back
        data, scales = _outputs(x.shape[1], x.shape[0], g, x.device)
        _launch(COL, base, g, sr, p, seed, col=(data, scales, sig_in, sig_out, offset, None))
        return result(data.t().contiguous(), scales.t().contiguous())
    if dim == nd - 1:
        if not x.is_contiguous() or x.data_ptr() % 16:
            _warn_once("copy", f"input of shape {tuple(x.shape)} and strides {x.stride()} is copied to a "
                               "contiguous layout first")
            x_c = x.contiguous() if not x.is_contiguous() else x.clone()
        else:
            x_c = x
        k = x.shape[-1]
        base = _row_major_copy(x_c.reshape(-1, k), sz)
        data, scales = _outputs(base.shape[0], k, g, x.device)
        swz = _swizzled(base.shape[0], k, g, x.device, swizzle) if nd == 2 else None
        _launch(ROW, base, g, sr, p, seed, row=(data, scales, sig_in, sig_out, offset, swz))
        return result(data.reshape(*x.shape[:-1], data.shape[1]), scales.reshape(*x.shape[:-1], scales.shape[1]), swz)
    _warn_once(f"fallback-{nd}-{dim}", f"no kernel for dim {dim} of a {nd}-d tensor; using the PyTorch reference")
    return quantize_reference(x, dim, rounding, prescale, rht_block, signs, _as_int(seed), _as_int(offset))


def quantize_dual_cuda(x: torch.Tensor, rounding: str = "sr", prescale: Optional[float] = None, rht_block: int = 0,
                       signs_row: Optional[torch.Tensor] = None, signs_col: Optional[torch.Tensor] = None, seed=0,
                       offset_row=0, offset_col=0, swizzle: Optional[bool] = None) -> Tuple[MXFP4Tensor, MXFP4Tensor]:
    """`quantize_dual_reference` on the GPU: one read of x [T, N], both copies written (with their
    `swizzled_scales` when `swizzle`, by default on Blackwell)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"quantize_mxfp4_dual needs a 2-d tensor, got {getattr(x, 'shape', type(x).__name__)}")
    check_quantize_args(x, 1, rht_block, signs_row)
    check_quantize_args(x, 0, rht_block, signs_col)
    reason = supports(x)
    if reason is not None:
        raise RuntimeError(f"cuda quantizer cannot run: {reason}")
    p = resolve_prescale(rounding, prescale)
    sr = rounding == "sr"
    g = rht_block
    t, n = x.shape
    sz = x.element_size()
    if x.numel() == 0:  # nothing to launch (the reference draws the signs on the host)
        return quantize_dual_reference(x, rounding, prescale, g, signs_row, signs_col, _as_int(seed),
                                       _as_int(offset_row), _as_int(offset_col))
    if not _row_major(x, sz):
        _warn_once("dual-copy", f"dual input of shape {tuple(x.shape)} and strides {x.stride()} is copied to a "
                                "row-major layout first")
    base = _row_major_copy(x, sz)
    rs_in, rs_out = _prepare_signs(signs_row, g, x.device)
    cs_in, cs_out = _prepare_signs(signs_col, g, x.device)
    row_data, row_scales = _outputs(t, n, g, x.device)
    col_data, col_scales = _outputs(n, t, g, x.device)
    row_swz, col_swz = _swizzled(t, n, g, x.device, swizzle), _swizzled(n, t, g, x.device, swizzle)
    row = (row_data, row_scales, rs_in, rs_out, offset_row, row_swz)
    col = (col_data, col_scales, cs_in, cs_out, offset_col, col_swz)
    if TC_DUAL and x.dtype == torch.bfloat16 and g == 64 and row_swz is None and col_swz is None:
        _launch(DUAL, base, g, sr, p, seed, row=row, col=col, tc=True)
    elif _ext.tile_shape(_DTYPE_CODES[x.dtype], g, DUAL)[0]:
        _launch(DUAL, base, g, sr, p, seed, row=row, col=col)
    else:  # no fused tile (float32 with g = 256): two reads
        _launch(ROW, base, g, sr, p, seed, row=row)
        _launch(COL, base, g, sr, p, seed, col=col)
    rowwise = MXFP4Tensor(data=row_data, scales=row_scales, prescale=p, dim=1, shape=(t, n), rht_block=g,
                          signs=rs_in if rs_in is not None else rs_out, swizzled_scales=row_swz)
    colwise = MXFP4Tensor(data=col_data, scales=col_scales, prescale=p, dim=1, shape=(n, t), rht_block=g,
                          signs=cs_in if cs_in is not None else cs_out, swizzled_scales=col_swz)
    return rowwise, colwise


register_quantizer("cuda", quantize_cuda, supports, priority=10)
register_dual_quantizer("cuda", quantize_dual_cuda, supports, priority=10)

__all__ = ["quantize_cuda", "quantize_dual_cuda", "supports", "is_available", "quantize_dual_reference"]
