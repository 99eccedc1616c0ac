"""The autograd Function behind `MXFP4ColumnParallelLinear` / `MXFP4RowParallelLinear`.

Same communication and gradient contract as megatron-core's
`LinearWithGradAccumulationAndAsyncCommunication` (core 0.19), with the two backward GEMMs under an
`MXFP4Recipe` (`megatron_mxfp4.backward`):

forward   SP: all-gather X along the sequence dim into Megatron's global buffer; Y = X·Wᵀ (+ b) in
          the recipe's forward precision (BF16 = the input's dtype, or FP8 E4M3 current scaling).
          Saves the local (not gathered) X and W.
backward  1. SP: launch the async all-gather of X (needed by wgrad only);
          2. dgrad dX = dY·W (MXFP4 along the local output features, or unquantized);
          3. wait for the gather;
          4. launch the async all-reduce (TP, no SP) or reduce-scatter (SP) of dX, so it overlaps:
          5. wgrad dW = dYᵀ·X (MXFP4 along the gathered tokens, or unquantized) — with gradient-
             accumulation fusion it is added in FP32 into `weight.main_grad` (no apex needed), the
             dummy gradient mcore DDP expects is returned and `grad_added_to_main_grad` is set;
          6. bias gradient from the unquantized dY; wait for the dX collective.
Frozen weights (requires_grad False): no wgrad, X is not saved.

With `recipe.dgrad` and `recipe.wgrad` off and a BF16 forward, every operation is the one stock
Megatron performs, in the same order: losses and gradients are bit-identical (tests/megatron).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import backward as bwd
from ..linear import forward_gemm
from ..recipe import MXFP4Recipe

try:  # same autocast behaviour as Megatron's Function
    _custom_fwd = torch.amp.custom_fwd(device_type="cuda")
    _custom_bwd = torch.amp.custom_bwd(device_type="cuda")
except (AttributeError, TypeError):  # pragma: no cover - older torch
    def _custom_fwd(fn):
        return fn

    _custom_bwd = _custom_fwd


def _all_gather_sequence(x: torch.Tensor, tp_group, async_op: bool):
    """Gather x along dim 0 over tp_group into Megatron's global "mpu" buffer."""
    from megatron.core.parallel_state import get_global_memory_buffer

    size = list(x.size())
    size[0] *= tp_group.size()
    buf = get_global_memory_buffer().get_tensor(size, x.dtype, "mpu")
    handle = torch.distributed.all_gather_into_tensor(buf, x.contiguous(), group=tp_group, async_op=async_op)
    return buf, handle


def _dummy_wgrad(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    shape = weight.main_grad.shape
    if getattr(weight, "zero_out_wgrad", False):
        return torch.zeros(shape, dtype=dtype, device=weight.device)
    return torch.empty(shape, dtype=dtype, device=weight.device)


class MXFP4ParallelLinearFunction(torch.autograd.Function):
    """Y = X·Wᵀ + b for a tensor-parallel shard, with an MXFP4 backward. See the module docstring."""

    @staticmethod
    @_custom_fwd
    def forward(ctx, input, weight, bias, recipe: MXFP4Recipe, key: bwd.StreamKey,
                gradient_accumulation_fusion: bool, allreduce_dgrad: bool, sequence_parallel: bool,
                tp_group, name: str):
        bwd.check_input_dtypes(recipe, name, input=input, weight=weight)  # before any collective
        wgrad_needed = weight.requires_grad
        ctx.main_grad = weight.main_grad if (gradient_accumulation_fusion and wgrad_needed
                                             and hasattr(weight, "main_grad")) else None
        ctx.save_for_backward(input if wgrad_needed else None, weight)
        ctx.input_shape, ctx.input_dtype = input.shape, input.dtype
        ctx.recipe, ctx.key, ctx.name = recipe, key, name
        ctx.use_bias = bias is not None
        ctx.fusion = gradient_accumulation_fusion
        ctx.allreduce_dgrad = allreduce_dgrad
        ctx.sequence_parallel = sequence_parallel
        ctx.tp_group = tp_group
        ctx.wgrad_needed = wgrad_needed

        if sequence_parallel:
            total_input, _ = _all_gather_sequence(input, tp_group, async_op=False)
        else:
            total_input = input
        if recipe.forward == "bf16":
            output = torch.matmul(total_input, weight.t())  # exactly Megatron's forward GEMM
        else:
            x2d = bwd.as_tokens(total_input)
            output = forward_gemm(x2d, weight.to(x2d.dtype), None, recipe)
            # not a view (as torch.matmul's result): Megatron's cross entropy edits logits in place
            output = torch.ops.aten._unsafe_view(output, (*total_input.shape[:-1], weight.shape[0]))
        if bias is not None:
            output = output + bias
        return output

    @staticmethod
    @_custom_bwd
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        recipe, key = ctx.recipe, ctx.key
        tp_group = ctx.tp_group
        wgrad = ctx.wgrad_needed
        handle = None

        # 1. re-gather X for wgrad (async; the dgrad GEMM runs meanwhile)
        if ctx.sequence_parallel and wgrad:
            total_input, handle = _all_gather_sequence(input, tp_group, async_op=True)
        else:
            total_input = input

        # without a dX collective to overlap (TP = 1), both GEMMs in one native call where it applies
        if wgrad and not ctx.allreduce_dgrad and not ctx.sequence_parallel:
            main_grad = ctx.main_grad if ctx.fusion else None
            fused = bwd.fused_backward(bwd.as_tokens(grad_output), bwd.as_tokens(total_input), weight, recipe, key,
                                       ctx.input_dtype, weight.dtype, accumulate_into=main_grad)
            if fused is not None:
                grad_input = fused[0].view(*grad_output.shape[:-1], weight.shape[1])
                grad_weight = None if main_grad is not None else fused[1]
                if main_grad is not None and hasattr(weight, "grad_added_to_main_grad"):
                    grad_weight = _dummy_wgrad(weight, ctx.input_dtype)
                    weight.grad_added_to_main_grad = True
                grad_bias = bwd.as_tokens(grad_output).sum(dim=0) if ctx.use_bias else None
                return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None

        # 2. dgrad over the local output features (dY read once for both GEMMs when both are MXFP4)
        dy2d = bwd.as_tokens(grad_output)
        qd, qw = bwd.grad_output_operands(dy2d, recipe, key, True, wgrad)
        grad_input = bwd.grad_input(dy2d, weight, recipe, key, qdy=qd, out_dtype=ctx.input_dtype).to(ctx.input_dtype)
        grad_input = grad_input.view(*grad_output.shape[:-1], weight.shape[1])

        # 3. the gather must be complete before wgrad reads X
        if handle is not None:
            handle.wait()
            handle = None
        if wgrad:
            grad_output, total_input = _as_2d(grad_output, total_input)

        # 4. launch the dX collective before any wgrad work so that they overlap
        sub_grad_input = None
        if ctx.allreduce_dgrad:
            handle = torch.distributed.all_reduce(grad_input, group=tp_group, async_op=True)
        elif ctx.sequence_parallel:
            size = list(ctx.input_shape)
            sub_grad_input = torch.empty(size, dtype=ctx.input_dtype, device=grad_input.device,
                                         requires_grad=False)
            handle = torch.distributed.reduce_scatter_tensor(sub_grad_input, grad_input.contiguous(),
                                                             group=tp_group, async_op=True)

        # 5. wgrad over the (gathered) tokens
        grad_weight = None
        if wgrad:
            main_grad = ctx.main_grad
            if ctx.fusion and main_grad is not None:
                # FP32 accumulation into main_grad, in the MXFP4 GEMM's epilogue
                bwd.grad_weight(grad_output, total_input, recipe, key, qdy=qw, accumulate_into=main_grad)
                if hasattr(weight, "grad_added_to_main_grad"):
                    grad_weight = _dummy_wgrad(weight, ctx.input_dtype)
                    weight.grad_added_to_main_grad = True
            else:
                # float32 in MXFP4; the input's dtype, as Megatron, when off
                grad_weight = bwd.grad_weight(grad_output, total_input, recipe, key, qdy=qw,
                                              out_dtype=weight.dtype).to(weight.dtype)

        # 6. bias gradient from the unquantized dY
        grad_bias = None
        if ctx.use_bias:
            dy2d = bwd.as_tokens(grad_output)
            grad_bias = dy2d.sum(dim=0)

        if handle is not None:
            handle.wait()
        dx = sub_grad_input if sub_grad_input is not None else grad_input
        return dx, grad_weight, grad_bias, None, None, None, None, None, None, None


def _as_2d(grad_output: torch.Tensor, total_input: torch.Tensor):
    """Contiguous [tokens, features] views (Megatron's prepare_input_tensors_for_wgrad_compute)."""
    grad_output = grad_output.contiguous()
    total_input = total_input.contiguous()
    if grad_output.dim() > 2:
        grad_output = bwd.as_tokens(grad_output)
        total_input = bwd.as_tokens(total_input)
    return grad_output, total_input


def mxfp4_parallel_linear(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          recipe: MXFP4Recipe, key: bwd.StreamKey, *, gradient_accumulation_fusion: bool,
                          allreduce_dgrad: bool, sequence_parallel: bool, tp_group, name: str = "linear"):
    """Functional form of `MXFP4ParallelLinearFunction` (a TP shard of a linear layer)."""
    if allreduce_dgrad and sequence_parallel:
        raise ValueError("allreduce_dgrad and sequence_parallel cannot both be enabled")
    if (allreduce_dgrad or sequence_parallel) and tp_group is None:
        raise ValueError("a tensor-parallel collective was requested without tp_group")
    return MXFP4ParallelLinearFunction.apply(input, weight, bias, recipe, key, gradient_accumulation_fusion,
                                             allreduce_dgrad, sequence_parallel, tp_group, name)
