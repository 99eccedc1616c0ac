"""`MXFP4ColumnParallelLinear` / `MXFP4RowParallelLinear`: megatron-core's tensor-parallel linears
with the backward GEMMs in MXFP4.

They subclass megatron-core's layers (same constructor, parameters, state_dict and sharded
checkpoint layout) plus a keyword `recipe: MXFP4Recipe` (and an optional `layer_id`), and override
only `_forward_impl` (a method since core 0.14) to call the project's own autograd Function
(`function.py`). `recipe=None` is exactly stock Megatron.

- Any sizes (DESIGN §3): dgrad reduces over the local output features (`output_size / tp` for
  column-parallel, `output_size` for row-parallel), wgrad over the (gathered) tokens, any count (0 included:
  MoE experts), each zero-padded inside the quantizers. The forward refuses only input dtypes the quantizers cannot read.
- Gradient-accumulation fusion is honoured without apex: the layer is built from a shallow copy of
  the config with the flag off (the stock constructor demands apex), and the Function adds the FP32
  wgrad into `weight.main_grad` itself.
- Cases the plugin does not cover (embedding-wgrad deferral, GTP weight remat, Megatron-FSDP
  params) go to the stock path with a one-time warning; `delay_wgrad_compute` is rejected.
- Randomness: a Philox stream keyed by `derive_seed(recipe.seed, data-parallel rank)` (identical on
  the tensor-parallel ranks of a replica, decorrelated across replicas), the layer id and a per-layer
  call counter. An expert linear (`is_expert`, built by megatron-core's MoE experts) uses its
  expert-data-parallel rank instead (expert-tensor-parallel ranks share the bits) and, once the
  transformer layer has told it, its global expert index (`expert_seed`). Megatron's and PyTorch's
  generators are never touched, so dropout masks are the same with and without the plugin.
"""
from __future__ import annotations

import copy
import itertools
import warnings
from dataclasses import replace
from typing import Optional

import torch

from ._compat import require_megatron_core

require_megatron_core()

from megatron.core.tensor_parallel import layers as _mcore_layers  # noqa: E402
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear  # noqa: E402

from .. import backward as bwd  # noqa: E402
from ..numerics.streams import derive_seed, expert_seed  # noqa: E402
from ..recipe import MXFP4Recipe  # noqa: E402
from . import grouped_experts  # noqa: E402
from .function import mxfp4_parallel_linear  # noqa: E402

# `_forward_impl` keywords of megatron-core 0.19 ...
_KNOWN_KWARGS = ("bias", "gradient_accumulation_fusion", "allreduce_dgrad", "sequence_parallel",
                 "grad_output_buffer", "wgrad_deferral_limit", "tp_group", "gtp_remat_size")
# ... and keywords of later releases, accepted only at these (their "off") values.
_FUTURE_KWARG_DEFAULTS = {"output_dtype": None}

# Layer ids (the top 16 bits of the Philox offset): ids set by MXFP4TransformerLayer are
# 8·layer_number + slot (>= 8); the LM head takes 1; standalone layers count down from 0xFFFF.
LM_HEAD_LAYER_ID = 1
# apex's fused wgrad-accumulation kernel, as found at import (the plugin never calls it)
APEX_FUSION = bool(_mcore_layers._grad_accum_fusion_available)
_standalone_ids = itertools.count(0xFFFF, -1)
_warned = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def unquantized(recipe: MXFP4Recipe) -> MXFP4Recipe:
    """The recipe of a layer kept in BF16 (forward and backward unquantized, same stream seed)."""
    return replace(recipe, dgrad=False, wgrad=False, forward="bf16")


def data_parallel_rank() -> int:
    """The data-parallel rank (context-parallel ranks included) folded into the Philox seed."""
    from megatron.core import parallel_state as ps

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 0
    if not ps.model_parallel_is_initialized():
        return torch.distributed.get_rank()
    return ps.get_data_parallel_rank(with_context_parallel=True)


def expert_data_parallel_rank() -> int:
    """The rank among the replicas of an expert shard (they see different tokens), folded into an
    expert linear's Philox seed."""
    from megatron.core import parallel_state as ps

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 0
    if not ps.model_parallel_is_initialized():
        return torch.distributed.get_rank()
    return ps.get_expert_data_parallel_rank()


class _MXFP4ParallelMixin:
    """What the column- and row-parallel variants share."""

    recipe: Optional[MXFP4Recipe]

    def _mxfp4_init(self, recipe: Optional[MXFP4Recipe], layer_id: Optional[int], name: Optional[str],
                    emulated_fusion: bool) -> None:
        if recipe is not None and not isinstance(recipe, MXFP4Recipe):
            raise TypeError(f"recipe must be an MXFP4Recipe or None, got {type(recipe).__name__}")
        if getattr(self.config, "delay_wgrad_compute", False) and recipe is not None:
            raise ValueError(f"{self._mxfp4_name(name)}: delay_wgrad_compute is not supported by the MXFP4 "
                             "layers (it is a TE/MoE feature); turn it off or use recipe=None")
        self.recipe = recipe
        self.mxfp4_name = self._mxfp4_name(name)
        self.mxfp4_layer_id = next(_standalone_ids) if layer_id is None else int(layer_id)
        self.mxfp4_expert = None  # global index of a routed expert (set by MXFP4TransformerLayer)
        if not 0 <= self.mxfp4_layer_id < (1 << 16):
            raise ValueError(f"{self.mxfp4_name}: layer_id must be in [0, 65536), got {layer_id}")
        self._mxfp4_calls = 0
        self._mxfp4_seed = None
        self._emulated_fusion = emulated_fusion

    def _mxfp4_name(self, name: Optional[str]) -> str:
        return name or f"{type(self).__name__}({self.input_size}, {self.output_size})"

    def set_mxfp4(self, recipe: Optional[MXFP4Recipe], layer_id: Optional[int] = None,
                  name: Optional[str] = None, expert: Optional[int] = None) -> None:
        """Re-configure after construction (used by the spec's transformer layer for layer ids, the
        global index of a routed expert and the BF16 first/last layers). A layer built with emulated
        fusion keeps a recipe (unquantized if needed): the stock path would need apex."""
        if recipe is None and self._emulated_fusion:
            raise ValueError(f"{self.mxfp4_name}: built with gradient-accumulation fusion but without apex; "
                             "it cannot return to the stock path (use unquantized(recipe))")
        self.recipe = recipe
        if layer_id is not None:
            if not 0 <= layer_id < (1 << 16):
                raise ValueError(f"{self.mxfp4_name}: layer_id must be in [0, 65536), got {layer_id}")
            self.mxfp4_layer_id = int(layer_id)
        if name is not None:
            self.mxfp4_name = name
        if expert is not None:
            if not self.is_expert:
                raise ValueError(f"{self.mxfp4_name}: an expert index for a linear built with is_expert=False")
            self.mxfp4_expert = int(expert)
        self._mxfp4_seed = None

    def _stream_key(self, device) -> bwd.StreamKey:
        if self._mxfp4_seed is None:
            if not self.is_expert:
                self._mxfp4_seed = derive_seed(self.recipe.seed, data_parallel_rank())
            elif self.mxfp4_expert is None:  # a standalone expert linear: its own layer id
                self._mxfp4_seed = derive_seed(self.recipe.seed, expert_data_parallel_rank())
            else:
                self._mxfp4_seed = expert_seed(self.recipe.seed, expert_data_parallel_rank(), self.mxfp4_expert)
        return bwd.next_stream_key(self, self.recipe, self._mxfp4_seed, self.mxfp4_layer_id, self.mxfp4_name, device)

    def _forward_impl(self, input, weight, *args, **kwargs):
        if self.recipe is None:
            return super()._forward_impl(input, weight, *args, **kwargs)
        if args:
            raise TypeError(f"{self.mxfp4_name}: _forward_impl takes keyword arguments only, got {len(args)} "
                            "positional ones (megatron-core version mismatch?)")
        for k, v in kwargs.items():
            if k in _KNOWN_KWARGS:
                continue
            if k in _FUTURE_KWARG_DEFAULTS and v == _FUTURE_KWARG_DEFAULTS[k]:
                continue
            raise TypeError(f"{self.mxfp4_name}: unsupported _forward_impl argument {k}={v!r}; the MXFP4 layer "
                            f"supports megatron-core 0.19 (use recipe=None for the stock path)")
        fallback = None
        if kwargs.get("grad_output_buffer") is not None:
            fallback = "embedding-wgrad deferral (defer_embedding_wgrad_compute)"
        elif kwargs.get("gtp_remat_size", 1) > 1:
            fallback = "GTP weight rematerialization (gtp_remat_size > 1)"
        elif hasattr(weight, "__fsdp_param__"):
            fallback = "Megatron-FSDP parameters"
        if fallback is not None:
            if self._emulated_fusion:
                raise RuntimeError(f"{self.mxfp4_name}: {fallback} needs the stock path, which needs apex for "
                                   "gradient-accumulation fusion; install apex or pass "
                                   "--no-gradient-accumulation-fusion")
            _warn_once(fallback, f"megatron_mxfp4: {fallback} is not covered by the MXFP4 layers; "
                                 f"{self.mxfp4_name} and layers like it use megatron-core's stock (BF16) path")
            return super()._forward_impl(input, weight, **kwargs)
        key = self._stream_key(weight.device)
        if self.is_expert:  # an expert of a grouped SequentialMLP gets its layer's group
            key = grouped_experts.register(self, key, input, weight)
        return mxfp4_parallel_linear(
            input, weight, kwargs.get("bias"), self.recipe, key,
            gradient_accumulation_fusion=bool(kwargs.get("gradient_accumulation_fusion", False)),
            allreduce_dgrad=bool(kwargs.get("allreduce_dgrad", False)),
            sequence_parallel=bool(kwargs.get("sequence_parallel", False)),
            tp_group=kwargs.get("tp_group") or self.tp_group,
            name=self.mxfp4_name,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe}"


def _config_for_stock_init(config, recipe):
    """(config to build with, emulated_fusion): fusion without apex is done by the plugin."""
    if recipe is not None and config.gradient_accumulation_fusion and not APEX_FUSION:
        cfg = copy.copy(config)
        cfg.gradient_accumulation_fusion = False
        return cfg, True
    return config, False


class MXFP4ColumnParallelLinear(_MXFP4ParallelMixin, ColumnParallelLinear):
    """`ColumnParallelLinear` with MXFP4 dgrad/wgrad (see the module docstring). dgrad reduces over
    `output_size / tp`."""

    def __init__(self, input_size, output_size, *, config, recipe: Optional[MXFP4Recipe] = None,
                 layer_id: Optional[int] = None, **kwargs):
        build_cfg, emulated = _config_for_stock_init(config, recipe)
        ColumnParallelLinear.__init__(self, input_size, output_size, config=build_cfg, **kwargs)
        if emulated:
            self.config = config
            self.gradient_accumulation_fusion = True
        self._mxfp4_init(recipe, layer_id, kwargs.get("name"), emulated)

    @classmethod
    def adopt(cls, module: ColumnParallelLinear, recipe: MXFP4Recipe, layer_id: int,
              name: str = "output_layer") -> "MXFP4ColumnParallelLinear":
        """Turn an existing `ColumnParallelLinear` (e.g. GPTModel's LM head) into this class in
        place, keeping its parameters. Returns the module."""
        if type(module) is not ColumnParallelLinear:
            raise TypeError(f"adopt expects a megatron-core ColumnParallelLinear, got {type(module).__name__}")
        module.__class__ = cls
        emulated = bool(module.gradient_accumulation_fusion) and not APEX_FUSION
        module._mxfp4_init(recipe, layer_id, name, emulated_fusion=emulated)
        return module


class MXFP4RowParallelLinear(_MXFP4ParallelMixin, RowParallelLinear):
    """`RowParallelLinear` with MXFP4 dgrad/wgrad (see the module docstring). dgrad reduces over the
    full `output_size`; the TP reduction of Y stays in Megatron's mappings (outside the Function)."""

    def __init__(self, input_size, output_size, *, config, recipe: Optional[MXFP4Recipe] = None,
                 layer_id: Optional[int] = None, **kwargs):
        build_cfg, emulated = _config_for_stock_init(config, recipe)
        RowParallelLinear.__init__(self, input_size, output_size, config=build_cfg, **kwargs)
        if emulated:
            self.config = config
            self.gradient_accumulation_fusion = True
        self._mxfp4_init(recipe, layer_id, kwargs.get("name"), emulated)
