"""The MXFP4-backward linear layer: autograd Function, functional form and an `nn.Linear` drop-in.

Forward: Y = X·Wᵀ + b in the input's dtype (or FP8 E4M3 when `recipe.forward == "fp8"`).
Backward: dgrad and wgrad in MXFP4 per the recipe (`backward.py`), the bias gradient from the
unquantized dY, gradients returned in the dtypes of X and W. Every call draws fresh random bits:
the module's call counter is part of the Philox offset.
"""
from __future__ import annotations

import itertools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import backward as bwd
from .numerics.streams import derive_seed
from .ops import fp8_matmul
from .recipe import MXFP4Recipe

_layer_ids = itertools.count()
_functional_calls = itertools.count()


def forward_gemm(x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 recipe: MXFP4Recipe) -> torch.Tensor:
    """Y = X·Wᵀ + b for x2d [T, in], weight [out, in] in the recipe's forward precision (x's dtype out)."""
    if recipe.forward == "fp8":
        y = fp8_matmul(x2d, weight, out_dtype=x2d.dtype)
        return y if bias is None else y + bias.to(y.dtype)
    return F.linear(x2d, weight, bias)


def data_parallel_rank() -> int:
    """The rank folded into the Philox seed in plain PyTorch (every rank is a data-parallel replica)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


class MXFP4LinearFunction(torch.autograd.Function):
    """Y = X·Wᵀ + b with an MXFP4 backward. x [..., in], weight [out, in], bias [out] or None."""

    @staticmethod
    def forward(ctx, x, weight, bias, recipe: MXFP4Recipe, key: bwd.StreamKey):
        if x.shape[-1] != weight.shape[1]:
            raise ValueError(f"input features {x.shape[-1]} do not match weight {tuple(weight.shape)}")
        bwd.check_input_dtypes(recipe, key.name or "mxfp4_linear", x=x, weight=weight)
        x2d = bwd.as_tokens(x)
        y = forward_gemm(x2d, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), recipe)
        ctx.save_for_backward(x, weight)
        ctx.recipe, ctx.key, ctx.has_bias = recipe, key, bias is not None
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        recipe, key = ctx.recipe, ctx.key
        dy2d = bwd.as_tokens(dy)
        x2d = bwd.as_tokens(x)
        dx = dw = db = None
        fused = None
        if ctx.needs_input_grad[0] and ctx.needs_input_grad[1]:  # both GEMMs in one native call where it applies
            fused = bwd.fused_backward(dy2d, x2d, weight, recipe, key, x.dtype, weight.dtype)
        if fused is not None:
            dx, dw = fused[0].reshape(x.shape), fused[1]
        else:
            qd, qw = bwd.grad_output_operands(dy2d, recipe, key, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
            if ctx.needs_input_grad[0]:
                dx = bwd.grad_input(dy2d, weight, recipe, key, qdy=qd, out_dtype=x.dtype).to(x.dtype).reshape(x.shape)
            if ctx.needs_input_grad[1]:
                dw = bwd.grad_weight(dy2d, x2d, recipe, key, qdy=qw, out_dtype=weight.dtype).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2d.sum(0)
        return dx, dw, db, None, None


def _check_linear_inputs(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not t.is_floating_point():
            raise TypeError(f"mxfp4_linear: {name} must be a floating-point tensor, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"mxfp4_linear: {name} is on {t.device} but x is on {x.device}")
    if weight.dim() != 2:
        raise ValueError(f"mxfp4_linear: weight must be 2-d [out, in], got shape {tuple(weight.shape)}")


def mxfp4_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    recipe: MXFP4Recipe = MXFP4Recipe(),
    *,
    layer_id: int = 0,
    call_index: Optional[int] = None,
    name: str = "",
) -> torch.Tensor:
    """`F.linear` whose backward GEMMs run in MXFP4 under `recipe`.

    x [..., in], weight [out, in], any sizes: dgrad reduces over `out` and wgrad over the flattened
    tokens of x, each zero-padded inside the quantizers (DESIGN §3). `call_index` selects the random
    stream; by default each call takes a fresh one. `name` labels the layer in diagnostics.
    """
    _check_linear_inputs(x, weight, bias)
    if recipe is None:
        return F.linear(x, weight, bias)
    call = next(_functional_calls) if call_index is None else call_index
    key = bwd.StreamKey(derive_seed(recipe.seed, data_parallel_rank()), layer_id, call, name)
    return MXFP4LinearFunction.apply(x, weight, bias, recipe, key)


class MXFP4Linear(nn.Linear):
    """`nn.Linear` with an MXFP4 backward. Same parameters and state_dict keys as `nn.Linear`.

    `recipe=None` behaves exactly like `nn.Linear`. Any feature and token counts: the backward
    zero-pads its reduction dimensions (DESIGN §3).
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None,
                 recipe: Optional[MXFP4Recipe] = MXFP4Recipe(), layer_id: Optional[int] = None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.recipe = recipe
        self.layer_id = (next(_layer_ids) % (1 << 16)) if layer_id is None else layer_id
        self.mxfp4_name = f"linear{self.layer_id}"  # convert_linears sets the qualified name
        self._mxfp4_calls = 0  # keys the random bits of each call (`backward.next_stream_key`)

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: Optional[MXFP4Recipe] = MXFP4Recipe(),
                    layer_id: Optional[int] = None) -> "MXFP4Linear":
        """Wrap an existing `nn.Linear`, sharing its parameters (no copy)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                  recipe=recipe, layer_id=layer_id)
        new.weight = linear.weight
        new.bias = linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recipe is None:
            return F.linear(x, self.weight, self.bias)
        _check_linear_inputs(x, self.weight, self.bias)
        seed = derive_seed(self.recipe.seed, data_parallel_rank())
        key = bwd.next_stream_key(self, self.recipe, seed, self.layer_id, self.mxfp4_name, x.device)
        return MXFP4LinearFunction.apply(x, self.weight, self.bias, self.recipe, key)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe}"


def convert_linears(model: nn.Module, recipe: Optional[MXFP4Recipe] = MXFP4Recipe(),
                    filter: Optional[Callable[[str, nn.Linear], bool]] = None) -> nn.Module:
    """Replace every `nn.Linear` in `model` (in place) with an `MXFP4Linear` sharing its parameters.

    `filter(qualified_name, module) -> bool` chooses which linears to convert (default: all).
    Layer ids follow module order, so they are the same on every rank. Returns `model`.
    """
    if type(model) is nn.Linear:
        raise TypeError("convert_linears converts the children of a module; wrap a bare nn.Linear with "
                        "MXFP4Linear.from_linear")
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Linear and (filter is None or filter(name, m))]
    for layer_id, (name, m) in enumerate(targets):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = MXFP4Linear.from_linear(m, recipe, layer_id=layer_id % (1 << 16))
        new.mxfp4_name = name
        setattr(parent, child, new)
    return model
