"""Backend registry and dispatch for the MXFP4 quantizer, the MXFP4 GEMM and the FP8 matmul.

A backend registers a function and a predicate `supports(tensor) -> Optional[str]` that returns
None when it can run on that tensor's device, or the reason it cannot. Backends are tried in
priority order for `backend="auto"`.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from ..numerics.fp8 import fp8_matmul_reference
from ..numerics.quantize import FLOAT_DTYPES, MXFP4Tensor, check_gemm_operands, check_quantize_args, gemm_reference, quantize_reference

BACKENDS = ("auto", "reference", "cuda", "hopper", "hopper_exact", "blackwell", "triton")


@dataclass(frozen=True)
class _Backend:
    name: str
    fn: Callable
    supports: Callable[[torch.Tensor], Optional[str]]
    priority: int


def _anywhere(_: torch.Tensor) -> Optional[str]:
    return None


_QUANTIZERS: Dict[str, _Backend] = {"reference": _Backend("reference", quantize_reference, _anywhere, 0)}
_GEMMS: Dict[str, _Backend] = {"reference": _Backend("reference", gemm_reference, _anywhere, 0)}
_DUALS: Dict[str, _Backend] = {}
_warned = set()
#: backend="auto" choice per (table, device): a device's capabilities do not change within a process, and
#: asking every backend's predicate on every call costs the host ~20 µs per backend in each backward GEMM.
_AUTO: Dict[tuple, _Backend] = {}


@functools.lru_cache(maxsize=None)
def _capability_of(index: int) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def device_capability(device: torch.device) -> Tuple[int, int]:
    """(major, minor) compute capability of a CUDA device, looked up once per device: backends ask on
    every call, and a device's capability does not change within a process."""
    device = torch.device(device)
    return _capability_of(device.index if device.index is not None else torch.cuda.current_device())


def register_quantizer(name: str, fn: Callable, supports: Callable, priority: int) -> None:
    _QUANTIZERS[name] = _Backend(name, fn, supports, priority)
    _AUTO.clear()


def register_gemm(name: str, fn: Callable, supports: Callable, priority: int) -> None:
    _GEMMS[name] = _Backend(name, fn, supports, priority)
    _AUTO.clear()


def register_dual_quantizer(name: str, fn: Callable, supports: Callable, priority: int) -> None:
    """A fused kernel for `quantize_mxfp4_dual` (same signature as `quantize_dual_reference`)."""
    _DUALS[name] = _Backend(name, fn, supports, priority)
    _AUTO.clear()


def available_backends(x: torch.Tensor, kind: str = "gemm"):
    """Names of the backends of `kind` ("gemm" or "quantize") that can run on x's device, best first."""
    table = _GEMMS if kind == "gemm" else _QUANTIZERS
    ok = [b for b in table.values() if b.supports(x) is None]
    return [b.name for b in sorted(ok, key=lambda b: -b.priority)]


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _select(table: Dict[str, _Backend], backend: str, x: torch.Tensor, what: str) -> _Backend:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        key = (id(table), x.device)
        best = _AUTO.get(key)
        if best is not None:
            return best
        best = _AUTO[key] = sorted((b for b in table.values() if b.supports(x) is None), key=lambda b: -b.priority)[0]
        if x.is_cuda and best.name == "reference":
            _warn_once(what, f"megatron_mxfp4: no compiled {what} kernel is available for {x.device}; "
                             "using the slow PyTorch reference (build the CUDA extension for speed)")
        return best
    b = table.get(backend)
    if b is None:
        raise RuntimeError(f"{what} backend {backend!r} is not available in this build "
                           f"(registered: {sorted(table)})")
    reason = b.supports(x)
    if reason is not None:
        raise RuntimeError(f"{what} backend {backend!r} cannot run on {x.device}: {reason}")
    return b


def selected_backend(kind: str, backend: str, x: torch.Tensor) -> str:
    """The name of the backend that `quantize_mxfp4` ("quantize"), `quantize_mxfp4_dual` ("dual") or
    `mxfp4_gemm` ("gemm") runs for `backend` on x's device (raises as they would for an unusable one)."""
    table = {"quantize": _QUANTIZERS, "dual": _DUALS, "gemm": _GEMMS}[kind]
    return _select(table, backend, x, {"quantize": "quantize", "dual": "dual quantize", "gemm": "GEMM"}[kind]).name


def quantize_mxfp4(x, dim=-1, rounding="rtn", prescale=None, rht_block=0, signs=None, seed=0, offset=0,
                   backend="auto") -> MXFP4Tensor:
    """Quantize `x` to MXFP4 along `dim` (DESIGN §2, §6). See `numerics.quantize` for the contract."""
    check_quantize_args(x, dim, rht_block, signs)
    b = _select(_QUANTIZERS, backend, x, "quantize")
    return b.fn(x, dim=dim, rounding=rounding, prescale=prescale, rht_block=rht_block, signs=signs,
                seed=seed, offset=offset)


def quantize_dual_reference(x, rounding="sr", prescale=None, rht_block=0, signs_row=None, signs_col=None, seed=0,
                            offset_row=0, offset_col=0):
    """Both copies of a 2-d x [T, N] that a backward needs: (rowwise, columnwise) =
    (`quantize_reference(x, -1, ..., signs_row, seed, offset_row)`,
     `quantize_reference(x.t(), -1, ..., signs_col, seed, offset_col)`)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"quantize_mxfp4_dual needs a 2-d tensor, got {getattr(x, 'shape', type(x).__name__)}")
    row = quantize_reference(x, -1, rounding, prescale, rht_block, signs_row, seed, offset_row)
    col = quantize_reference(x.t(), -1, rounding, prescale, rht_block, signs_col, seed, offset_col)
    return row, col


_DUALS["reference"] = _Backend("reference", quantize_dual_reference, _anywhere, 0)


def quantize_mxfp4_dual(x, rounding="sr", prescale=None, rht_block=0, signs_row=None, signs_col=None, seed=0,
                        offset_row=0, offset_col=0, backend="auto"):
    """Quantize x [T, N] along N (rowwise copy) and along T (columnwise copy, returned as the MXFP4
    tensor of x.t() [N, T]) from one read of x, each copy with its own signs and Philox offset.
    Bit-identical to the two `quantize_mxfp4` calls of `quantize_dual_reference`."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"quantize_mxfp4_dual needs a 2-d tensor, got {getattr(x, 'shape', type(x).__name__)}")
    check_quantize_args(x, 1, rht_block, signs_row)
    check_quantize_args(x, 0, rht_block, signs_col)
    b = _select(_DUALS, backend, x, "dual quantize")
    return b.fn(x, rounding=rounding, prescale=prescale, rht_block=rht_block, signs_row=signs_row,
                signs_col=signs_col, seed=seed, offset_row=offset_row, offset_col=offset_col)


def mxfp4_gemm(a: MXFP4Tensor, b: MXFP4Tensor, out_dtype=torch.float32, backend="auto", *, alpha: float = 1.0,
               accumulate_into: Optional[torch.Tensor] = None) -> torch.Tensor:
    """alpha · a · bᵀ / (p_a · p_b) for a [M, K], b [N, K], both quantized along K (DESIGN §2.5).

    `alpha`: an extra output scale (default 1). `accumulate_into`: a float32 [M, N] tensor (e.g. a
    wgrad's FP32 main_grad) that the product is added to in place and returned (out_dtype float32).
    """
    check_gemm_operands(a, b, out_dtype, accumulate_into)
    g = _select(_GEMMS, backend, a.data, "GEMM")
    return g.fn(a, b, out_dtype=out_dtype, alpha=alpha, accumulate_into=accumulate_into)


def fp8_matmul(a: torch.Tensor, b: torch.Tensor, out_dtype=None) -> torch.Tensor:
    """a [M, K] · b [N, K]ᵀ with E4M3 operands under per-tensor current scaling, float32 accumulation.

    Uses `torch._scaled_mm` on GPUs with FP8 tensor cores (sm_89+), the operands cast by the fused kernels of
    `fp8_cast` (bit-identical to `numerics.fp8.quantize_fp8`), the emulated reference elsewhere.
    """
    out_dtype = out_dtype or a.dtype
    if a.is_cuda and device_capability(a.device) >= (8, 9):
        from . import fp8_cast  # imports this module

        if fp8_cast._native() and a.dtype in FLOAT_DTYPES and b.dtype in FLOAT_DTYPES:
            (qa, sa), (qb, sb) = fp8_cast.quantize_fp8_pair(a, b)  # both operands in one call
        else:
            qa, sa = fp8_cast.quantize_fp8_any(a)
            qb, sb = fp8_cast.quantize_fp8_any(b)
        return torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype)
    if a.is_cuda:
        _warn_once("fp8", f"megatron_mxfp4: {a.device} has no FP8 tensor cores; emulating the FP8 forward")
    return fp8_matmul_reference(a, b, out_dtype)
