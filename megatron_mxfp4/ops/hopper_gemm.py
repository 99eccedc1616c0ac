"""MXFP4 GEMM on Hopper (sm_90) FP8 tensor cores (DESIGN §2.5, §4).

Every E2M1 value is exact in FP8 E4M3, so an MXFP4 product can run on the FP8 tensor cores.
Two backends:

`hopper` (fast; error ≤ 5e-4 relative, DESIGN §2.5), in one of two scalings (`SCALING`, default "tiles"):

"rows" (native call only; not yet the default: its kernels compile but have not run on a GPU — the GPU tests
and `bench/gemm.py`'s `hopper` vs `hopper_tiles` columns decide): each operand becomes E4M3 codes with every block exponent of a
row folded in relative to one exponent per row + one float32 scale per row (`layouts.to_e4m3_rows_reference`;
E4M3's headroom above the E2M1 range lets a row span 14 binades), multiplied by cuBLASLt's FP8 GEMM with
outer-vector scaling, its fastest scaled FP8 mode on Hopper (≈ 1.2 PFLOP/s against ≈ 0.93 for 1×128 tiles at
GPT-6.7B backward shapes). A row spanning more is excluded from the GEMM (scale 0) and added exactly by a
fix kernel (per-row fallback, warned about once). Where cuBLASLt offers no outer-vector kernel for a
problem, that call takes the tile scaling (warned about once).

"tiles": each operand becomes E4M3 codes with the
block exponents folded in relative to their 1×128 tile + one float32 scale per tile
(`layouts`, "tiles"; converted by the CUDA extension's kernel, `cuda_tiles`), multiplied by cuBLASLt's FP8 GEMM with 1×128 block scaling on both operands
(`torch.nn.functional.scaled_mm`, `ScalingType.BlockWise1x128`). The tensor core adds products of
the four blocks of a tile before the scale is applied and drops low bits when their exponents
differ (measured 8e-5 at a 4-binade spread, 1.9e-4 at 8). K-slabs in which some row-tile of either
operand spans more than 8 binades cannot be folded exactly: they are excluded from the FP8 GEMM
(A's tile scales zeroed there) and a second Triton kernel adds their product exactly from the packed
MXFP4 operands, promoting every 32-K block (per-slab fallback; warned about once). Nothing
synchronizes with the host: when no slab is flagged the fix kernel only reads the flags.
With a BF16 output and flagged slabs, the output is rounded to BF16 twice.

`hopper_exact` (exact; ≤ 1e-5, float32 summation order only): the Triton FP8 kernel of
`triton_gemm` with promotion to float32 every 32 K, so products of different block scales never
meet inside the tensor core. Variant "tiles" (default) uses the same folded operands with the scale
applied per 128 K and the same per-slab fallback; variant "blocks" uses plain E2M1 codes with one
scale per 32-block (no fallback needed). On the H200 the "tiles" GEMM runs at 540–570 TFLOP/s and
"blocks" at ~220 (bench/results/gemm-h200.md): each 32-K promotion waits for its wgmma, which
serializes the tensor cores with the float32 adds.

alpha is applied in the epilogue (folded into B's tile scales on the cuBLASLt path); BF16/FP16/FP32
output; `accumulate_into` adds to an FP32 main_grad in place.

The `hopper` GEMM is one call into the CUDA extension (csrc/mxfp4_gemm_hopper.h: flags, both conversions,
the slab mask, cuBLASLt, the slab fix) where the extension links cuBLASLt; otherwise the same steps run
from Python through torch's `scaled_mm` (warned about once: more host time per GEMM).
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import replace
from typing import Optional

import torch

from ..numerics.quantize import MXFP4Tensor, gemm_alpha
from . import cuda_tiles
from .cuda_quantize import _ext, current_stream_handle, launch_on
from .dispatch import device_capability, register_gemm
from .layouts import TILE
from .triton_gemm import fix_bad_slabs, fp8_scaled_gemm, to_e4m3, triton_unavailable

#: Which exact kernel `hopper_exact` runs: "tiles" (folded codes, scale per 128 K) or "blocks".
EXACT_VARIANT = "tiles"
#: Scaling of the `hopper` GEMM's native call: "tiles" (one scale per 1×128 tile) or "rows" (one per row).
SCALING = "tiles"
_SCALINGS = {"tiles": 0, "rows": 1}

_warned = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


class _FallbackMonitor:
    """Counts GEMM calls that needed the per-slab fallback, without synchronizing: the fix kernel bumps a
    device counter, which is copied to pinned host memory every `poll_every` calls and read (once that
    copy has landed) at a later poll, to warn once."""

    def __init__(self, poll_every: int = 16):
        self._state = {}
        self.poll_every = poll_every

    @staticmethod
    def _key(device):
        device = torch.device(device)
        return device.index if device.index is not None else torch.cuda.current_device()

    def counter(self, device) -> torch.Tensor:
        st = self._state.get(self._key(device))
        if st is None:
            st = self._state[self._key(device)] = dict(dev=torch.zeros(1, dtype=torch.int32, device=device),
                                                       host=torch.zeros(1, dtype=torch.int32, pin_memory=True),
                                                       event=None, calls=0)
        return st["dev"]

    def after_call(self, device) -> None:
        if "bad_slabs" in _warned or torch.cuda.is_current_stream_capturing():  # polled by eager calls only
            return
        st = self._state[self._key(device)]
        st["calls"] += 1
        if (st["calls"] - 1) % self.poll_every:
            return
        ev = st["event"]
        if ev is not None:
            if not ev.query():  # the last copy has not landed: poll again later
                return
            if int(st["host"][0]) > 0:
                _warn_once("bad_slabs", "megatron_mxfp4: some GEMM operands could not be folded into E4M3 exactly "
                                        "(a 1x128 tile spanning more than 8 binades, or a row more than 14); those "
                                        "slabs or rows were computed on the exact 32-K path")
                return
        st["host"].copy_(st["dev"], non_blocking=True)
        if ev is None:
            ev = st["event"] = torch.cuda.Event()
        ev.record()

    def calls_with_fallback(self, device) -> int:
        """How many calls on `device` needed the fallback so far (synchronizes)."""
        st = self._state.get(self._key(device))
        return 0 if st is None else int(st["dev"].item())


monitor = _FallbackMonitor()


@functools.lru_cache(maxsize=None)
def _blockwise_api():
    try:
        from torch.nn.functional import ScalingType, scaled_mm

        return scaled_mm, ScalingType.BlockWise1x128
    except (ImportError, AttributeError):
        return None


def _sm90_reason(t: torch.Tensor) -> Optional[str]:
    reason = triton_unavailable(t, (9, 0))
    if reason is not None:
        return reason
    cap = device_capability(t.device)
    if cap != (9, 0):
        return f"the Hopper FP8 path is built for compute capability 9.0, found {cap[0]}.{cap[1]}"
    return None


def hopper_supports(t: torch.Tensor) -> Optional[str]:
    reason = _sm90_reason(t)
    if reason is None and _blockwise_api() is None:
        reason = (f"torch {torch.__version__} lacks torch.nn.functional.scaled_mm with "
                  "ScalingType.BlockWise1x128 (needs torch >= 2.10)")
    return reason


def _finish(out: torch.Tensor, out_dtype, accumulate_into):
    if accumulate_into is not None:
        if out is not accumulate_into:
            accumulate_into.add_(out)
        return accumulate_into
    return out if out.dtype == out_dtype else out.to(out_dtype)


def tile_operands(a: MXFP4Tensor, b: MXFP4Tensor, mult_b: float = 1.0, row_multiple: int = 1):
    """Both operands in the E4M3-tile layout, ready for a GEMM: A's scales are zeroed on the slabs flagged in
    either operand (those are added by `fix_bad_slabs`), each operand's rows padded with zero codes to a
    multiple of `row_multiple`. Returns (oa, ob, flags int32 [K/128]).

    Uses the compiled conversion of the CUDA extension (`cuda_tiles`, natural order); without the
    extension, the Triton kernel (warned about once; padded rows are copied on)."""
    reason = cuda_tiles.supports(a.data)
    if reason is None:
        return cuda_tiles.tile_operands(a, b, mult_b, row_multiple)
    _warn_once("tiles", f"megatron_mxfp4: E4M3-tile conversion on the slower Triton kernel ({reason})")
    flags = torch.zeros((2, -(-a.padded_shape[1] // TILE)), dtype=torch.int32, device=a.data.device)
    oa = _pad_rows(to_e4m3(a, TILE, flags=flags[0]), row_multiple)
    ob = _pad_rows(to_e4m3(b, TILE, mult=mult_b, flags=flags[1]), row_multiple)
    bad = flags.amax(0)
    oa = replace(oa, scales=torch.where(bad.unsqueeze(1) != 0, 0.0, oa.scales))
    return oa, ob, bad


def _pad_rows(op, multiple: int):
    """An E4M3 operand with zero rows appended up to a multiple of `multiple` (codes and tile scales)."""
    pad = -op.codes.shape[0] % multiple
    if not pad:
        return op
    codes = torch.nn.functional.pad(op.codes.view(torch.uint8), (0, 0, 0, pad)).view(torch.float8_e4m3fn)
    return replace(op, codes=codes, scales=torch.nn.functional.pad(op.scales, (0, pad)))


def exact_gemm(a: MXFP4Tensor, b: MXFP4Tensor, out_dtype=torch.float32, alpha: float = 1.0,
               accumulate_into: Optional[torch.Tensor] = None, variant: Optional[str] = None) -> torch.Tensor:
    """The `hopper_exact` backend (see the module docstring)."""
    variant = variant or EXACT_VARIANT
    alpha_t = gemm_alpha(a, b, alpha)
    if variant == "blocks":
        return fp8_scaled_gemm(to_e4m3(a, 32), to_e4m3(b, 32), out_dtype, alpha_t, accumulate_into)
    if variant != "tiles":
        raise ValueError(f"variant must be 'tiles' or 'blocks', got {variant!r}")
    dev = a.data.device
    oa, ob, bad = tile_operands(a, b)
    out = fp8_scaled_gemm(oa, ob, out_dtype, alpha_t, accumulate_into)
    fix_bad_slabs(a, b, bad, alpha_t, out, monitor.counter(dev))
    monitor.after_call(dev)
    return out


_OUT_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
#: cuBLASLt's workspace, one per (device, stream) as torch keeps its own (the size torch gives cuBLASLt on Hopper)
LT_WORKSPACE_BYTES = 32 << 20
_lt_workspaces = {}


def native_reason() -> Optional[str]:
    """None when the extension runs the whole Hopper GEMM in one call, else why not."""
    if _ext is None:
        return cuda_tiles.supports(torch.empty(0))
    if not getattr(_ext, "gemm_hopper_available", lambda: False)():
        return "the CUDA extension was built without cuBLASLt (or predates the native GEMM): rebuild it"
    return None


def _lt_workspace(device: torch.device, stream: int) -> torch.Tensor:
    key = (device.index, stream)
    ws = _lt_workspaces.get(key)
    if ws is None:
        ws = _lt_workspaces[key] = torch.empty(LT_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    return ws


def _native_gemm(a: MXFP4Tensor, b: MXFP4Tensor, out_dtype, alpha: float, accumulate_into,
                 scaling: Optional[str] = None) -> torch.Tensor:
    """The `hopper` GEMM as one extension call; alpha = the final float32 factor; scaling: `SCALING` if None."""
    scaling = scaling or SCALING
    if scaling not in _SCALINGS:
        raise ValueError(f"hopper_gemm.SCALING must be one of {sorted(_SCALINGS)}, got {scaling!r}")
    M, N, K = a.shape[0], b.shape[0], a.padded_shape[1]
    dev = a.data.device
    ad, asc = cuda_tiles.packed_operand(a)
    bd, bsc = cuda_tiles.packed_operand(b)
    acc = accumulate_into is not None
    c = accumulate_into if acc else torch.empty((M, N), dtype=out_dtype, device=dev)
    ctype = _OUT_TYPES[c.dtype]
    ws_bytes = _ext.gemm_hopper_workspace_size(M, N, K, ctype, acc, c.data_ptr(), c.stride(0))
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device=dev)
    stream = current_stream_handle(dev)
    lt = _lt_workspace(dev, stream)
    used = launch_on(dev, _ext.gemm_hopper, ad.data_ptr(), ad.stride(0), asc.data_ptr(), asc.stride(0), M,
                     bd.data_ptr(), bd.stride(0), bsc.data_ptr(), bsc.stride(0), N, K, alpha, c.data_ptr(), c.stride(0),
                     ctype, acc, ws.data_ptr(), ws_bytes, lt.data_ptr(), LT_WORKSPACE_BYTES,
                     monitor.counter(dev).data_ptr(), _SCALINGS[scaling], stream)
    if used != _SCALINGS[scaling]:
        _warn_once("rows_unsupported", f"megatron_mxfp4: cuBLASLt has no FP8 GEMM with per-row scales for M={M} "
                                       f"N={N} K={K} ({c.dtype} output); such calls use 1x128 tile scales (slower)")
    monitor.after_call(dev)
    return c


def hopper_gemm(a: MXFP4Tensor, b: MXFP4Tensor, out_dtype=torch.float32, alpha: float = 1.0,
                accumulate_into: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The `hopper` backend: cuBLASLt FP8 with 1×128 tile scales + exact per-slab fallback. cuBLASLt wants M
    and N in multiples of 16: other sizes get zero rows in the layout and the product is cut back."""
    if a.shape[0] and b.shape[0] and a.padded_shape[1] and (accumulate_into is None or accumulate_into.stride(1) == 1):
        reason = native_reason()
        if reason is None:
            return _native_gemm(a, b, out_dtype, gemm_alpha(a, b, alpha), accumulate_into)
        _warn_once("native", f"megatron_mxfp4: the Hopper GEMM runs its steps from Python through torch's scaled_mm "
                             f"(more host time per GEMM): {reason}")
    return scaled_mm_gemm(a, b, out_dtype, alpha, accumulate_into)


def scaled_mm_gemm(a: MXFP4Tensor, b: MXFP4Tensor, out_dtype=torch.float32, alpha: float = 1.0,
                   accumulate_into: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The `hopper` GEMM's steps from Python: the tile conversions of `cuda_tiles`, torch's `scaled_mm`, the
    Triton slab fix (the route without the native call, and its twin in the tests)."""
    M, N = a.shape[0], b.shape[0]
    scaled_mm, blockwise = _blockwise_api()
    dev = a.data.device
    alpha_t = gemm_alpha(a, b, alpha)
    oa, ob, bad = tile_operands(a, b, alpha_t, row_multiple=16)
    od = torch.float32 if accumulate_into is not None else out_dtype
    out = scaled_mm(oa.codes, ob.codes.t(), oa.scales.t(), blockwise, ob.scales.t(), blockwise, output_dtype=od)
    if out.shape != (M, N):
        out = out[:M] if out.shape[1] == N else out[:M, :N].contiguous()
    fix_bad_slabs(a, b, bad, alpha_t, out, monitor.counter(dev))
    monitor.after_call(dev)
    return _finish(out, out_dtype, accumulate_into)


register_gemm("hopper", hopper_gemm, hopper_supports, priority=30)
register_gemm("hopper_exact", exact_gemm, _sm90_reason, priority=20)
