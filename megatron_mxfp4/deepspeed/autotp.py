"""MXFP4-backward variants of DeepSpeed AutoTP's training layers (`deepspeed.module_inject.layers`).

AutoTP (`"tensor_parallel": {"autotp_size": N}`) shards the model inside `deepspeed.initialize`,
replacing column-parallel linears with `LinearLayer` and row-parallel ones with `LinearAllreduce`.
Their forward is a plain matmul wrapped in communication Functions; the variants here keep those
Functions (the dX all-reduce of a column-parallel layer in backward, the output all-reduce of a
row-parallel one in forward, the optional output gather) and replace only the matmul:

- `MXFP4LinearLayer` (column-parallel, W [out/tp, in]): dgrad reduces over the local `out/tp`
  features, each TP rank's partial dX is then summed by `ColumnParallel`'s all-reduce. With
  `tp_overlap_comm` the all-reduce of dX is launched before the wgrad work, as in DeepSpeed's
  `AsyncColumnParallel`.
- `MXFP4LinearAllreduce` (row-parallel, W [out, in/tp]): dgrad reduces over the full `out`.

Written against deepspeed 0.19.8 (the pinned version).
"""
from __future__ import annotations

import torch
from deepspeed import comm as ds_comm
from deepspeed.module_inject.layers import (
    ColumnParallel,
    GatherFromTensorParallelRegion,
    LinearAllreduce,
    LinearLayer,
    RowParallel,
    add_bias,
)

from .. import backward as bwd
from ..linear import MXFP4LinearFunction, forward_gemm
from ..recipe import MXFP4Recipe
from .layers import _StreamMixin


class MXFP4AsyncColumnParallelFunction(torch.autograd.Function):
    """Column-parallel Y = X·Wᵀ + b whose backward all-reduces dX asynchronously while wgrad runs."""

    @staticmethod
    def forward(ctx, group, x, weight, bias, recipe: MXFP4Recipe, key: bwd.StreamKey):
        bwd.check_input_dtypes(recipe, key.name or "MXFP4LinearLayer", x=x, weight=weight)
        x2d = bwd.as_tokens(x)
        y = forward_gemm(x2d, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), recipe)
        ctx.save_for_backward(x, weight)
        ctx.group, ctx.recipe, ctx.key, ctx.has_bias = group, recipe, key, bias is not None
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        recipe, key = ctx.recipe, ctx.key
        dy2d = bwd.as_tokens(dy)
        x2d = bwd.as_tokens(x)
        qd, qw = bwd.grad_output_operands(dy2d, recipe, key, True, ctx.needs_input_grad[2])
        dx = bwd.grad_input(dy2d, weight, recipe, key, qdy=qd, out_dtype=x.dtype).to(x.dtype).reshape(x.shape).contiguous()
        handle = ds_comm.all_reduce(dx, group=ctx.group, async_op=True)
        dw = None
        if ctx.needs_input_grad[2]:  # the wgrad work overlaps the dX all-reduce
            dw = bwd.grad_weight(dy2d, x2d, recipe, key, qdy=qw, out_dtype=weight.dtype).to(weight.dtype)
        db = dy2d.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        handle.wait()
        return None, dx, dw, db, None, None


def _no_deferred_collectives(layer) -> None:
    if layer.defer_collectives_to_compiler:
        raise NotImplementedError(
            f"{type(layer).__name__}: the MXFP4 AutoTP layers do not support DeepCompile's 'autotp' pass "
            "(collectives deferred to the compiler); remove 'autotp' from the DeepCompile passes")


class MXFP4LinearLayer(_StreamMixin, LinearLayer):
    """AutoTP's column-parallel `LinearLayer` with an MXFP4 backward."""

    def _mxfp4_tp_group(self):
        return self.mp_group

    def forward(self, input):
        if self.recipe is None:
            return super().forward(input)
        _no_deferred_collectives(self)
        key = self._next_key(input.device)
        if not self.__class__.tp_overlap_comm:
            if getattr(self, "mp_group", None) is not None:
                input = ColumnParallel.apply(self.mp_group, input)
            output = MXFP4LinearFunction.apply(input, self.weight, None, self.recipe, key)
            if self.bias is not None:
                output = add_bias(output, self.bias)
        else:
            output = MXFP4AsyncColumnParallelFunction.apply(self.mp_group, input, self.weight, self.bias,
                                                            self.recipe, key)
        if self.gather_output:
            output = GatherFromTensorParallelRegion.apply(self.mp_group, output, self._partition_sizes)
        return output

    def extra_repr(self) -> str:
        return f"weight={tuple(self.weight.shape)}, recipe={self.recipe}"


class MXFP4LinearAllreduce(_StreamMixin, LinearAllreduce):
    """AutoTP's row-parallel `LinearAllreduce` with an MXFP4 backward."""

    def _mxfp4_tp_group(self):
        return self.mp_group

    def forward(self, input):
        if self.recipe is None:
            return super().forward(input)
        _no_deferred_collectives(self)
        output = MXFP4LinearFunction.apply(input, self.weight, None, self.recipe, self._next_key(input.device))
        output = RowParallel.apply(self.mp_group, output, not self.is_training_mode())
        if self.bias is not None:
            output = add_bias(output, self.bias)
        return output

    def extra_repr(self) -> str:
        return f"weight={tuple(self.weight.shape)}, recipe={self.recipe}"


# AutoTP class -> its MXFP4 variant (exact types only: subclasses such as the vocabulary-parallel
# LM head or fused-QKV layers shard differently and are left alone)
AUTOTP_CLASSES = {LinearLayer: MXFP4LinearLayer, LinearAllreduce: MXFP4LinearAllreduce}
