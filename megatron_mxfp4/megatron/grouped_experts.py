"""One grouped quantize launch for the FC2 backward operands of all local experts of an MoE layer.

megatron-core's `SequentialMLP` runs its local experts one after another on `torch.split` row slices of the
permuted token buffer and concatenates their outputs; in the backward, the gradient of that concatenation is
one buffer whose row slices are the experts' FC2 output gradients dY_e. `install(seq)` adds two module hooks
to a `SequentialMLP` whose experts are MXFP4 linears:

* forward: while the experts run, each FC2 expert linear registers its call (its `StreamKey`, its input X_e)
  with the layer's `ExpertGroup` and gets the group attached to its key;
* after the experts: the concatenated output passes an identity autograd node whose backward, which runs
  before any expert's backward, quantizes in one grouped launch (`ops.grouped`) the dual copies of every
  dY_e (dgrad rowwise along features, wgrad dY_eᵀ along tokens) and in a second one every X_eᵀ (wgrad, along
  tokens), each expert with its own key, offsets and signs — bit-identical to what its own quantizers compute.

Each expert's Function then takes its operands from the group (`backward.grad_output_operands` and `wgrad` ask
`key.group`), after checking that the tensors it was handed are the ones the group quantized (same storage,
offset, shape and strides); anything else (a diagnostics sample, a guard that runs a GEMM unquantized, a
different gradient) falls back to the expert's own quantizers, with the same bits. The FC1 operands are not
grouped: FC1's output gradients come out of each expert's activation backward one expert at a time.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from .. import diagnostics
from ..backward import StreamKey, _dual_signs
from ..numerics.streams import Gemm, Operand
from ..ops.grouped import quantize_mxfp4_grouped

_active: List["ExpertGroup"] = []  # the group whose experts are running their forward (innermost last)
#: Turns the grouping off (each expert then quantizes its own operands, with the same bits).
ENABLED = True
#: Counters since import (tests and benchmarks read them): grouped launches, operands handed to experts.
STATS = {"launches": 0, "grad_output_hits": 0, "input_hits": 0}


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a and b view the same elements (the group's operands belong to exactly this tensor)."""
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


class ExpertGroup:
    """The FC2 calls of one forward of one `SequentialMLP` and, after the grouped launches, their operands."""

    def __init__(self, fc2_linears):
        self.fc2 = {id(m): i for i, m in enumerate(fc2_linears)}
        self.recipes = [m.recipe for m in fc2_linears]
        self.calls: Dict[int, Tuple[StreamKey, torch.Tensor]] = {}
        self.key_index: Dict[int, int] = {}  # id(key) -> local expert (the keys live in `calls`)
        self.ready: Dict[int, tuple] = {}  # local expert -> (dy_e, qd, qw, x_e, qx)
        self.launches = 0  # grouped launches made (tests and benchmarks read it)

    def register(self, linear, key: StreamKey, x: torch.Tensor) -> StreamKey:
        i = self.fc2.get(id(linear))
        if i is None:
            return key
        key = StreamKey(key.seed, key.layer, key.call, key.name, key.offsets, group=self)
        self.calls[i] = (key, x)
        self.key_index[id(key)] = i
        return key

    def complete(self) -> bool:
        return len(self.calls) == len(self.fc2) > 1

    def prepare(self, grad: torch.Tensor) -> None:
        """Quantize every expert's FC2 dY (dual) and X (columnwise) from `grad`, the gradient of the experts'
        concatenated outputs, when every expert runs both GEMMs in MXFP4 under one recipe."""
        keys = [self.calls[i][0] for i in range(len(self.fc2))]
        xs = [self.calls[i][1] for i in range(len(self.fc2))]
        recipe = self.recipes[0]
        if not (recipe.dgrad and recipe.wgrad and recipe.backward_format == "mxfp4") or diagnostics.sampling():
            return
        if any(not (diagnostics.gemm_quantized(k.name, "dgrad") and diagnostics.gemm_quantized(k.name, "wgrad"))
               for k in keys):
            return
        counts = [x.shape[0] for x in xs]
        if grad.dim() != 2 or grad.shape[0] != sum(counts) or any(x.dim() != 2 for x in xs):
            return
        dys = list(torch.split(grad, counts))
        g, dev = recipe.effective_rht_block, grad.device
        backend = "reference" if recipe.quantize_backend == "reference" else "auto"
        common = dict(rounding=recipe.rounding, rht_block=g, seeds=[k.seed for k in keys], backend=backend)
        duals = quantize_mxfp4_grouped(
            dys, "dual", offset_row=[k.offset(Gemm.DGRAD, Operand.GRAD_OUTPUT) for k in keys],
            offset_col=[k.offset(Gemm.WGRAD, Operand.GRAD_OUTPUT) for k in keys],
            signs_row=[_dual_signs(recipe, k, Gemm.DGRAD, dev) for k in keys],
            signs_col=[_dual_signs(recipe, k, Gemm.WGRAD, dev) for k in keys], **common)
        qxs = quantize_mxfp4_grouped(
            xs, "col", offset_col=[k.offset(Gemm.WGRAD, Operand.INPUT) for k in keys],
            signs_col=[qw.signs for _, qw in duals], **common)
        self.launches += 2
        STATS["launches"] += 2
        for i in range(len(keys)):
            self.ready[i] = (dys[i], duals[i][0], duals[i][1], xs[i], qxs[i])

    def grad_output_operands(self, key: StreamKey, dy: torch.Tensor):
        """(qdy for dgrad, qdy for wgrad) of the expert whose key this is, if the group quantized exactly `dy`."""
        r = self.ready.get(self.key_index.get(id(key)))
        if r is None or not _same_tensor(r[0], dy):
            return None
        STATS["grad_output_hits"] += 1
        return r[1], r[2]

    def input_operand(self, key: StreamKey, x: torch.Tensor, signs):
        """The wgrad operand Xᵀ of the expert whose key this is, if the group quantized exactly `x` with
        `signs` (the wgrad dY operand's); the expert's operands are released."""
        r = self.ready.pop(self.key_index.get(id(key)), None)
        if r is None or not _same_tensor(r[3], x) or r[4].signs is not signs:
            return None
        STATS["input_hits"] += 1
        return r[4]


class _GroupedBackward(torch.autograd.Function):
    """Identity on the experts' concatenated output; its backward runs the group's grouped quantizers."""

    @staticmethod
    def forward(ctx, out, group):
        ctx.group = group
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        ctx.group.prepare(grad)
        return grad, None


def _pre_hook(module, args):
    _active.append(ExpertGroup([mlp.linear_fc2 for mlp in module.local_experts]))


def _post_hook(module, args, output):
    group = _active.pop()
    if not (torch.is_grad_enabled() and group.complete()):
        return output
    recipes = group.recipes
    if any(r is None or r != recipes[0] for r in recipes):
        return output
    out, bias = output
    if not isinstance(out, torch.Tensor) or not out.requires_grad:
        return output
    return _GroupedBackward.apply(out, group), bias


def register(linear, key: StreamKey, x: torch.Tensor) -> StreamKey:
    """Called by an expert linear's forward: attaches the running layer's group to its key (FC2 experts)."""
    if not (ENABLED and _active) or x.dim() != 2:
        return key
    return _active[-1].register(linear, key, x)


def install(seq) -> bool:
    """Add the grouping hooks to a `SequentialMLP` whose every local expert's FC2 is an MXFP4 linear (more than
    one local expert). Returns whether it did (once per module)."""
    from .layers import _MXFP4ParallelMixin

    if getattr(seq, "_mxfp4_grouped", False) or len(seq.local_experts) < 2:
        return False
    if not all(isinstance(getattr(m, "linear_fc2", None), _MXFP4ParallelMixin) for m in seq.local_experts):
        return False
    seq.register_forward_pre_hook(_pre_hook)
    seq.register_forward_hook(_post_hook)
    seq._mxfp4_grouped = True
    return True
