"""The two backward GEMMs of a linear layer Y = X·Wᵀ under an `MXFP4Recipe`.

Shared by `linear.py` and the Megatron/DeepSpeed integrations so that every layer quantizes the
same operands along the same dimensions (DESIGN §3):

  dgrad  dX [T, in]  = dY [T, out] · W [out, in]   reduction over out:  a = dY,   b = Wᵀ
  wgrad  dW [out, in] = dYᵀ [out, T] · X [T, in]   reduction over T:    a = dYᵀ,  b = Xᵀ

No size is refused (DESIGN §3): the quantizers zero-pad a reduction dimension to the next multiple of
max(32, g), and the dither indices count the padded size; a GEMM with an empty operand (0 tokens, a
0-sized layer) returns zeros without quantizing. What the quantizers cannot read is refused at the
forward (`check_input_dtypes`).

Each GEMM draws its own RHT signs, shared by its two operands; every operand its own dither. With the
`per_call` sign policy a GEMM's signs are the sign-domain words at its dY operand's offset, so the
quantizer of dY draws them itself (on a GPU, inside the kernel: no host work, no copy) and hands them on
to the W and X quantizers.

A call's offsets are Python ints, or (`recipe.cuda_graphs`, `DeviceCalls`) an int64 vector the GPU computes
from a device-side call counter: the kernels read them on the device, so a captured CUDA graph replays with
the offsets of the next call. Nothing on this path synchronizes with the host.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import diagnostics
from .numerics.quantize import FLOAT_DTYPES, MXFP4Tensor, resolve_prescale
from .numerics.rht import draw_signs
from .numerics.streams import MASK64, Gemm, Operand, stream_offset
from .ops import fp8_matmul, mxfp4_gemm, quantize_mxfp4, quantize_mxfp4_dual
from .ops.dispatch import selected_backend
from .recipe import MXFP4Recipe


#: The operands whose offsets a `DeviceCalls` vector holds, in its order.
DEVICE_SLOTS = ((Gemm.DGRAD, Operand.GRAD_OUTPUT), (Gemm.DGRAD, Operand.WEIGHT), (Gemm.WGRAD, Operand.GRAD_OUTPUT),
                (Gemm.WGRAD, Operand.INPUT))
_SLOT = {k: i for i, k in enumerate(DEVICE_SLOTS)}


@dataclass(frozen=True)
class StreamKey:
    """Identifies one call of one layer: its random bits (seed, layer id, call index) and, for
    diagnostics, the layer's name ("" = not reported). `offsets`: the call's offsets computed on the device
    (`DeviceCalls`), int64 [4] in `DEVICE_SLOTS` order, which then replace the host's `call`. `group`: see
    the field."""

    seed: int
    layer: int
    call: int
    name: str = ""
    offsets: Optional[torch.Tensor] = field(default=None, compare=False)
    #: optional provider of operands quantized ahead of this call (a grouped quantize of an MoE layer's experts,
    #: `megatron.grouped_experts`), each only for exactly the tensor it quantized, else None:
    #: `grad_output_operands(key, dy)` -> (qdy dgrad, qdy wgrad), `weight_operand(key, w, signs)` -> qWᵀ (dgrad)
    #: and `input_operand(key, x, signs)` -> qXᵀ (wgrad), the latter two only when quantized with `signs`
    group: Optional[object] = field(default=None, compare=False, repr=False)

    def offset(self, gemm: Gemm, operand: Operand):
        """The operand's Philox offset: an int, or a one-element int64 view of `offsets` on a GPU (read there
        by the kernels; on the CPU, an int)."""
        if self.offsets is None or operand == Operand.SIGNS:
            return stream_offset(self.layer, self.call, gemm, operand)
        i = _SLOT[(gemm, operand)]
        if self.offsets.is_cuda:
            return self.offsets[i:i + 1]
        return int(self.offsets[i]) & MASK64


class DeviceCalls:
    """A layer's call counter kept on its device (`recipe.cuda_graphs`): each call's four offsets are
    `base + 256 · count` (streams.py: the call index sits at bit 8 and never carries into the layer id below
    2^40 calls), computed and advanced there in two small kernels, so graph replays draw fresh bits as eager
    calls do. Create it outside graph capture (it copies its base vector to the device)."""

    def __init__(self, layer: int, start: int, device):
        base = [stream_offset(layer, 0, g, o) for g, o in DEVICE_SLOTS]
        # the int64 bit patterns of the unsigned offsets (layer ids >= 2^15 set bit 63)
        self.base = torch.tensor([b - (1 << 64) if b >= 1 << 63 else b for b in base], dtype=torch.int64,
                                 device=device)
        self.count = torch.full((), int(start), dtype=torch.int64, device=device)
        self.layer = layer

    def next_offsets(self) -> torch.Tensor:
        """This call's offsets (int64 [4]); the counter moves on to the next call."""
        offsets = torch.add(self.base, self.count, alpha=1 << 8)
        self.count.add_(1)
        return offsets

    def calls(self) -> int:
        """The calls made so far (synchronizes with the device)."""
        return int(self.count.item())


def next_stream_key(owner, recipe: MXFP4Recipe, seed: int, layer: int, name: str, device) -> StreamKey:
    """The key of `owner`'s next call and the advance of its counter: the host int `owner._mxfp4_calls`, and
    with `recipe.cuda_graphs` on a GPU the `DeviceCalls` in `owner._mxfp4_device_calls` (made from the host
    count at the first such call, and again when the layer id or the device changes)."""
    call = owner._mxfp4_calls
    owner._mxfp4_calls = call + 1
    if not (recipe.cuda_graphs and torch.device(device).type == "cuda"):
        return StreamKey(seed, layer, call, name)
    dc = getattr(owner, "_mxfp4_device_calls", None)
    if dc is None or dc.layer != layer or dc.count.device != torch.device(device):
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{name or 'an MXFP4 layer'}: run one eager forward before capturing it in a CUDA "
                               "graph (its device call counter is made then; warm-up calls are the usual practice)")
        dc = owner._mxfp4_device_calls = DeviceCalls(layer, call, device)
    return StreamKey(seed, layer, call, name, offsets=dc.next_offsets())


def calls_made(owner) -> int:
    """How many calls `owner` has made (its device counter where it has one: graph replays count too)."""
    dc = getattr(owner, "_mxfp4_device_calls", None)
    return dc.calls() if dc is not None else owner._mxfp4_calls


def set_calls(owner, calls: int) -> None:
    """Restore `owner`'s call counter (a checkpoint); a device counter is made anew from it."""
    owner._mxfp4_calls = int(calls)
    owner._mxfp4_device_calls = None


def as_tokens(t: torch.Tensor) -> torch.Tensor:
    """t [..., n] as [tokens, n] (`reshape(-1, n)` cannot infer the token count when n = 0)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def check_input_dtypes(recipe: MXFP4Recipe, what: str, **tensors: Optional[torch.Tensor]) -> None:
    """At the forward, before any work: refuse a tensor that the recipe's backward quantizers (or its
    FP8 forward) cannot read, in one line naming the dtype and the supported ones."""
    if not (recipe.dgrad or recipe.wgrad or recipe.forward == "fp8"):
        return
    for name, t in tensors.items():
        if t is not None and t.dtype not in FLOAT_DTYPES:
            supported = ", ".join(str(d).removeprefix("torch.") for d in FLOAT_DTYPES)
            raise TypeError(f"{what}: {name} is {str(t.dtype).removeprefix('torch.')}; the MXFP4 layers support "
                            f"{supported} (cast the model, or use recipe=None)")


def gemm_signs(recipe: MXFP4Recipe, key: StreamKey, gemm: Gemm, device) -> Optional[torch.Tensor]:
    """The RHT signs of one GEMM per the recipe's sign policy (None when the RHT is off)."""
    g = recipe.effective_rht_block
    if not g:
        return None
    if recipe.sign_policy == "deterministic":
        return torch.ones(g, dtype=torch.float32, device=device)
    if recipe.sign_policy == "per_call":  # what the dY quantizer draws itself when given no signs
        offset = key.offset(gemm, Operand.GRAD_OUTPUT)
        if isinstance(offset, torch.Tensor):  # a device offset (synchronizes: the backward lets dY's kernel draw)
            offset = int(offset.item()) & MASK64
        return draw_signs(g, key.seed, offset, device)
    return _per_layer_signs(g, key.seed, stream_offset(key.layer, 0, gemm, Operand.SIGNS), torch.device(device))


@functools.lru_cache(maxsize=4096)
def _per_layer_signs(g: int, seed: int, offset: int, device: torch.device) -> torch.Tensor:
    """`per_layer` signs never change during a run: drawn once per (layer, GEMM, device), then reused."""
    return draw_signs(g, seed, offset, device)


def _dual_signs(recipe: MXFP4Recipe, key: StreamKey, gemm: Gemm, device) -> Optional[torch.Tensor]:
    """The signs to hand a dY quantizer: None when it draws exactly `gemm_signs` itself."""
    if recipe.sign_policy == "per_call" and recipe.effective_rht_block:
        return None
    return gemm_signs(recipe, key, gemm, device)


def _quantize(t: torch.Tensor, recipe: MXFP4Recipe, key: StreamKey, gemm: Gemm, operand: Operand, signs):
    return quantize_mxfp4(
        t, dim=-1, rounding=recipe.rounding, rht_block=recipe.effective_rht_block, signs=signs,
        seed=key.seed, offset=key.offset(gemm, operand), backend=recipe.quantize_backend,
    )


def quantize_grad_output(dy: torch.Tensor, recipe: MXFP4Recipe, key: StreamKey, signs=None):
    """dY [T, out] quantized for both GEMMs from one read (the dual kernel): (dgrad operand, along out;
    wgrad operand dYᵀ, along tokens), bit-identical to what `dgrad` and `wgrad` quantize themselves.
    `signs`: (dgrad, wgrad) RHT signs to use, the values `gemm_signs` gives (drawn ahead by a grouped launch
    that quantized this call's W and X with them); default: the sign policy's."""
    if signs is None:
        signs = (_dual_signs(recipe, key, Gemm.DGRAD, dy.device), _dual_signs(recipe, key, Gemm.WGRAD, dy.device))
    return quantize_mxfp4_dual(
        dy, rounding=recipe.rounding, rht_block=recipe.effective_rht_block, signs_row=signs[0], signs_col=signs[1],
        seed=key.seed, offset_row=key.offset(Gemm.DGRAD, Operand.GRAD_OUTPUT),
        offset_col=key.offset(Gemm.WGRAD, Operand.GRAD_OUTPUT), backend=recipe.quantize_backend,
    )


def grad_output_operands(dy: torch.Tensor, recipe: MXFP4Recipe, key: StreamKey, dgrad_needed: bool = True,
                         wgrad_needed: bool = True):
    """(qdy for `dgrad`, qdy for `wgrad`): both from `quantize_grad_output` when both GEMMs quantize dY
    in MXFP4, else (None, None) and each GEMM quantizes its own operand."""
    if not (dgrad_needed and wgrad_needed and recipe.dgrad and recipe.wgrad and recipe.backward_format == "mxfp4"
            and dy.numel() and diagnostics.gemm_quantized(key.name, "dgrad")
            and diagnostics.gemm_quantized(key.name, "wgrad")):
        return None, None
    if key.group is not None:  # quantized ahead, with the same bits (a grouped launch)
        ready = key.group.grad_output_operands(key, dy)
        if ready is not None:
            return ready
    return quantize_grad_output(dy, recipe, key)


def dgrad(dy: torch.Tensor, weight: torch.Tensor, recipe: MXFP4Recipe, key: StreamKey,
          qdy: Optional[MXFP4Tensor] = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """dX = dY · W with both operands in MXFP4 along out. dy [T, out], weight [out, in].
    `qdy`: dY already quantized (`grad_output_operands`). `out_dtype`: written by the GEMM's epilogue
    (float32 accumulation, one rounding to out_dtype; float32 while diagnostics sample)."""
    if not (dy.numel() and weight.numel()):  # 0 tokens or a 0-sized layer: nothing to quantize
        return torch.zeros(dy.shape[0], weight.shape[1], dtype=out_dtype, device=dy.device)
    exact = lambda: diagnostics.exact_product(dy, weight)  # noqa: E731
    if not diagnostics.gemm_quantized(key.name, "dgrad"):
        return exact()
    if recipe.backward_format == "fp8":
        return fp8_matmul(dy, weight.t().contiguous(), out_dtype=out_dtype)
    a = qdy if qdy is not None else _quantize(dy, recipe, key, Gemm.DGRAD, Operand.GRAD_OUTPUT,
                                              _dual_signs(recipe, key, Gemm.DGRAD, dy.device))
    signs = a.signs
    b = key.group.weight_operand(key, weight, signs) if key.group is not None else None
    if b is None:
        b = _quantize(weight.t(), recipe, key, Gemm.DGRAD, Operand.WEIGHT, signs)
    if diagnostics.sampling():  # the statistics compare the float32 product
        out = mxfp4_gemm(a, b, out_dtype=torch.float32, backend=recipe.gemm_backend)
        diagnostics.measure_gemm(key.name, "dgrad", exact, out, dy, a, weight.t(), b, signs)
        return out
    return mxfp4_gemm(a, b, out_dtype=out_dtype, backend=recipe.gemm_backend)


def wgrad(dy: torch.Tensor, x: torch.Tensor, recipe: MXFP4Recipe, key: StreamKey,
          qdy: Optional[MXFP4Tensor] = None, accumulate_into: Optional[torch.Tensor] = None,
          out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """dW = dYᵀ · X with both operands in MXFP4 along tokens. dy [T, out], x [T, in].
    `qdy`: dYᵀ already quantized (`grad_output_operands`). `accumulate_into`: a float32 [out, in]
    tensor (Megatron's `main_grad`) that dW is added to in place by the GEMM's epilogue, and returned;
    else dW in `out_dtype` (float32 while diagnostics sample)."""
    if not (dy.numel() and x.numel()):  # 0 tokens or a 0-sized layer: dW = 0 (or main_grad as it is)
        if accumulate_into is not None:
            return accumulate_into
        return torch.zeros(dy.shape[1], x.shape[1], dtype=out_dtype, device=dy.device)
    exact = lambda: diagnostics.exact_product(dy.t(), x)  # noqa: E731
    if not diagnostics.gemm_quantized(key.name, "wgrad"):
        return _accumulate(exact(), accumulate_into)
    if recipe.backward_format == "fp8":
        od = torch.float32 if accumulate_into is not None else out_dtype
        return _accumulate(fp8_matmul(dy.t().contiguous(), x.t().contiguous(), out_dtype=od), accumulate_into)
    a = qdy if qdy is not None else _quantize(dy.t(), recipe, key, Gemm.WGRAD, Operand.GRAD_OUTPUT,
                                              _dual_signs(recipe, key, Gemm.WGRAD, dy.device))
    signs = a.signs
    b = key.group.input_operand(key, x, signs) if key.group is not None else None
    if b is None:
        b = _quantize(x.t(), recipe, key, Gemm.WGRAD, Operand.INPUT, signs)
    if diagnostics.sampling():  # the statistics need dW on its own
        out = mxfp4_gemm(a, b, out_dtype=torch.float32, backend=recipe.gemm_backend)
        diagnostics.measure_gemm(key.name, "wgrad", exact, out, dy.t(), a, x.t(), b, signs)
        return _accumulate(out, accumulate_into)
    od = torch.float32 if accumulate_into is not None else out_dtype
    return mxfp4_gemm(a, b, out_dtype=od, backend=recipe.gemm_backend, accumulate_into=accumulate_into)


def _accumulate(dw: torch.Tensor, into: Optional[torch.Tensor]) -> torch.Tensor:
    return dw if into is None else into.add_(dw)


def fused_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, recipe: MXFP4Recipe, key: StreamKey,
                   dx_dtype: torch.dtype, dw_dtype: torch.dtype,
                   accumulate_into: Optional[torch.Tensor] = None):
    """(dX, dW) of `dgrad` and `wgrad` (dX in dx_dtype; dW in dw_dtype, or added to `accumulate_into`) in one
    native call (`ops.hopper_backward`) where it applies: both GEMMs in MXFP4, the dispatcher's choice the
    compiled quantizer and the `hopper` GEMM, no diagnostics sampling or guard override, operands it reads as
    they are. The same kernels with the same arguments as the two Python calls, so the same bits; None where
    it does not apply, or where a grouped launch (MoE experts, `key.group`) quantizes the operands ahead (the
    caller then runs `grad_input` and `grad_weight`). dy [T, out], x [T, in], weight [out, in]."""
    if not (dy.is_cuda and recipe.dgrad and recipe.wgrad and recipe.backward_format == "mxfp4"):
        return None
    if key.group is not None:  # an MoE expert whose operands a grouped launch quantizes ahead
        return None
    if diagnostics.sampling() or not (diagnostics.gemm_quantized(key.name, "dgrad")
                                      and diagnostics.gemm_quantized(key.name, "wgrad")):
        return None
    from .ops import hopper_backward as hb  # the kernel layer's native entry point (CUDA builds only)

    if not hb.supported(dy, x, weight, accumulate_into):
        return None
    if (selected_backend("quantize", recipe.quantize_backend, dy) != "cuda"
            or selected_backend("dual", recipe.quantize_backend, dy) != "cuda"
            or selected_backend("gemm", recipe.gemm_backend, dy) != "hopper"):
        return None
    g = recipe.effective_rht_block
    signs = [_dual_signs(recipe, key, gemm, dy.device) for gemm in (Gemm.DGRAD, Gemm.WGRAD)]
    signs = [None if s is None else s.to(torch.float32).contiguous() for s in signs]
    offsets = (key.offset(Gemm.DGRAD, Operand.GRAD_OUTPUT), key.offset(Gemm.DGRAD, Operand.WEIGHT),
               key.offset(Gemm.WGRAD, Operand.GRAD_OUTPUT), key.offset(Gemm.WGRAD, Operand.INPUT))
    return hb.backward_gemms(dy, x, weight, rht_block=g, stochastic=recipe.rounding == "sr",
                             prescale=resolve_prescale(recipe.rounding, None), seed=key.seed, offsets=offsets,
                             signs_dgrad=signs[0], signs_wgrad=signs[1], dx_dtype=dx_dtype, dw_dtype=dw_dtype,
                             accumulate_into=accumulate_into)


def grad_input(dy: torch.Tensor, weight: torch.Tensor, recipe: MXFP4Recipe, key: StreamKey,
               qdy: Optional[MXFP4Tensor] = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """dX = dY · W under the recipe: `dgrad` (in `out_dtype`) when `recipe.dgrad`, else the unquantized
    product in dY's dtype (exactly what a stock linear layer computes)."""
    if not recipe.dgrad:
        return dy @ weight.to(dy.dtype)
    return dgrad(dy, weight, recipe, key, qdy=qdy, out_dtype=out_dtype)


def grad_weight(dy: torch.Tensor, x: torch.Tensor, recipe: MXFP4Recipe, key: StreamKey,
                qdy: Optional[MXFP4Tensor] = None, accumulate_into: Optional[torch.Tensor] = None,
                out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """dW = dYᵀ · X under the recipe: `wgrad` (in `out_dtype`) when `recipe.wgrad`, else the unquantized
    product in dY's dtype. With `accumulate_into` (float32 [out, in]) dW is added to it instead."""
    if not recipe.wgrad:
        return _accumulate(dy.t() @ x.to(dy.dtype), accumulate_into)
    return wgrad(dy, x, recipe, key, qdy=qdy, accumulate_into=accumulate_into, out_dtype=out_dtype)
