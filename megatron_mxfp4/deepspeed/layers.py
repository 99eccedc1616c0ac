"""MXFP4-backward variants of the linear modules found in DeepSpeed models.

`convert` (convert.py) turns a module into one of these by switching its class in place, so the
module keeps its identity, its Parameter objects, its hooks (ZeRO-3's gather/release hooks, AutoTP's
bookkeeping) and its state_dict keys; no module is constructed, which is why conversion works on a
model built under `deepspeed.zero.Init` and on the model of an initialized engine alike.

ZeRO-3: every Function here saves the weight *Parameter itself* (never a view, a cast or a copy of
its data). ZeRO-3 releases the parameter after the forward (its `.data` becomes an empty tensor) and
gathers it again before the module's backward; the saved Parameter then sees the gathered data, and
nothing the Function holds keeps the released storage alive.

Randomness: the Philox seed folds in the *replica* rank (`replica_rank`): the data-parallel rank,
identical on the tensor-parallel ranks of one AutoTP replica, so replicated layers stay identical
across those ranks (AutoTP does not reduce their gradients).
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn.functional as F

from .. import backward as bwd
from ..linear import MXFP4Linear, MXFP4LinearFunction, forward_gemm
from ..numerics.streams import derive_seed
from ..recipe import MXFP4Recipe


def _tp_group_of_deepspeed():
    """DeepSpeed's tensor-parallel group when AutoTP set one up, else None."""
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:
        return None
    try:
        return groups.get_tensor_model_parallel_group()
    except (AssertionError, RuntimeError):
        return None


def replica_rank(tp_group=None) -> int:
    """The rank folded into the Philox seed: one value per data-parallel replica.

    Without tensor parallelism it is the global rank; with it, the lowest global rank of this
    rank's tensor-parallel group (the same on all TP ranks of a replica, distinct across replicas).
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    group = tp_group if tp_group is not None else _tp_group_of_deepspeed()
    if group is not None and dist.get_world_size(group) > 1:
        return min(dist.get_process_group_ranks(group))
    return dist.get_rank()


class _StreamMixin:
    """The random-stream state a converted module carries: recipe, layer id, call counter, seed."""

    recipe: MXFP4Recipe
    layer_id: int

    def _mxfp4_setup(self, recipe: MXFP4Recipe, layer_id: int, name: str = "") -> None:
        self.recipe = recipe
        self.layer_id = layer_id
        self.mxfp4_name = name or f"linear{layer_id}"  # the layer's label in diagnostics
        self._mxfp4_calls = 0
        self._mxfp4_seed: Optional[int] = None

    def _mxfp4_tp_group(self):
        return None

    def _next_key(self, device) -> bwd.StreamKey:
        if self._mxfp4_seed is None:  # at the first forward, when the process groups exist
            self._mxfp4_seed = derive_seed(self.recipe.seed, replica_rank(self._mxfp4_tp_group()))
        return bwd.next_stream_key(self, self.recipe, self._mxfp4_seed, self.layer_id, self.mxfp4_name, device)


class MXFP4DeepSpeedLinear(_StreamMixin, MXFP4Linear):
    """An `nn.Linear` (an `MXFP4Linear`) whose random stream is keyed by the replica rank."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recipe is None:
            return F.linear(x, self.weight, self.bias)
        return MXFP4LinearFunction.apply(x, self.weight, self.bias, self.recipe, self._next_key(x.device))


class MXFP4Conv1DFunction(torch.autograd.Function):
    """Y = X·W + b for a transposed weight W [in, out] (HF `Conv1D`), with an MXFP4 backward.

    The Parameter W is saved as is and transposed only inside backward (a saved `W.t()` view would
    pin the storage ZeRO-3 releases).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, recipe: MXFP4Recipe, key: bwd.StreamKey):
        if x.shape[-1] != weight.shape[0]:
            raise ValueError(f"input features {x.shape[-1]} do not match Conv1D weight {tuple(weight.shape)} "
                             f"[in, out]")
        bwd.check_input_dtypes(recipe, key.name or "MXFP4Conv1D", x=x, weight=weight)
        x2d = bwd.as_tokens(x)
        w = weight.to(x.dtype)
        b = None if bias is None else bias.to(x.dtype)
        if recipe.forward == "bf16":  # the operation of HF Conv1D itself
            y = torch.addmm(b, x2d, w) if b is not None else torch.mm(x2d, w)
        else:
            y = forward_gemm(x2d, w.t(), b, recipe)
        ctx.save_for_backward(x, weight)
        ctx.recipe, ctx.key, ctx.has_bias = recipe, key, bias is not None
        return y.reshape(*x.shape[:-1], weight.shape[1])

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        recipe, key = ctx.recipe, ctx.key
        dy2d = bwd.as_tokens(dy)
        x2d = bwd.as_tokens(x)
        dx = dw = db = None
        qd, qw = bwd.grad_output_operands(dy2d, recipe, key, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        if ctx.needs_input_grad[0]:
            dx = bwd.grad_input(dy2d, weight.t(), recipe, key, qdy=qd, out_dtype=x.dtype).to(x.dtype).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            if recipe.wgrad:
                dw = bwd.wgrad(dy2d, x2d, recipe, key, qdy=qw, out_dtype=weight.dtype).t()
            else:  # Xᵀ·dY, the product HF Conv1D's own backward forms (bit-identical when off)
                dw = x2d.t().to(dy2d.dtype) @ dy2d
            dw = dw.to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2d.sum(0)
        return dx, dw, db, None, None


_conv1d_classes: dict = {}


def mxfp4_conv1d_class(base: type) -> type:
    """The MXFP4 subclass of HF's `Conv1D` class `base` (made once; `isinstance(m, Conv1D)` still holds)."""
    cls = _conv1d_classes.get(base)
    if cls is None:
        def forward(self, x):
            if self.recipe is None:
                return base.forward(self, x)
            return MXFP4Conv1DFunction.apply(x, self.weight, self.bias, self.recipe, self._next_key(x.device))

        def __repr__(self):
            return f"MXFP4Conv1D(nf={self.nf}, nx={self.nx}, recipe={self.recipe})"

        cls = type("MXFP4Conv1D", (_StreamMixin, base),
                   {"forward": forward, "__repr__": __repr__, "__module__": __name__,
                    "__doc__": "HF `Conv1D` (Y = X·W + b, W [in, out]) with an MXFP4 backward."})
        _conv1d_classes[base] = cls
        globals()["MXFP4Conv1D"] = cls  # importable (and picklable) by name
    return cls
