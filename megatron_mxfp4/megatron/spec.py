"""GPT layer specs with the MXFP4 linears, and the LM-head option.

`swap_linear_specs(spec, recipe)` walks any megatron-core spec tree (ModuleSpec, submodule
dataclasses, `functools.partial` — the MLP is a partial since core 0.18 —, lists) and replaces the
four decoder linears (`linear_qkv`, `linear_proj`, `linear_fc1`, `linear_fc2`):

  ColumnParallelLinear, TEColumnParallelLinear, TELayerNormColumnParallelLinear -> MXFP4ColumnParallelLinear
  RowParallelLinear, TERowParallelLinear                                        -> MXFP4RowParallelLinear

A TE linear with a fused LayerNorm is replaced by a plain linear, so the LayerNorm it carried is
restored in the layer (`input_layernorm` / `pre_mlp_layernorm` become TENorm) and the checkpoint
key map of the local spec is kept. `TransformerLayer` becomes `MXFP4TransformerLayer`, which gives
each MXFP4 linear its Philox layer id from the global layer number (the same on every rank) and
keeps the recipe's first/last N layers unquantized.

MoE layers (`num_experts=N`): with `recipe.moe == "experts"` the FC1/FC2 of the routed experts
(megatron-core's `SequentialMLP`, the local spec's experts; with the local spec `moe_grouped_gemm`
also gives `SequentialMLP`) and of the shared experts are swapped; the router (a plain parameter,
not a parallel linear) is never touched. Grouped-GEMM experts (TE's `TEGroupedMLP`) are refused with
the fix. `recipe.moe == "none"` leaves the whole MoE block stock.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from typing import Any, Callable, List, Optional, Tuple

from ._compat import require_megatron_core

require_megatron_core()

from megatron.core.tensor_parallel import layers as _mcore_layers  # noqa: E402
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear  # noqa: E402
from megatron.core.transformer.identity_op import IdentityOp  # noqa: E402
from megatron.core.transformer.moe.experts import SequentialMLP  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402
from megatron.core.transformer.transformer_layer import TransformerLayer  # noqa: E402

from ..recipe import MXFP4Recipe  # noqa: E402
from . import grouped_experts  # noqa: E402
from .layers import (  # noqa: E402
    APEX_FUSION,
    LM_HEAD_LAYER_ID,
    MXFP4ColumnParallelLinear,
    MXFP4RowParallelLinear,
    _MXFP4ParallelMixin,
    unquantized,
)

LINEAR_FIELDS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
MOE_FIELDS = ("experts", "shared_experts")  # MoESubmodules fields that `recipe.moe` governs
EXPERT_ROLES = ("linear_fc1", "linear_fc2")  # the linears of a routed expert's MLP
_LAYER_SLOTS = 8  # Philox layer ids per transformer layer (ids 8·layer_number + slot)


def _te_classes():
    """(column classes, row classes, fused-LN column classes, norm for a restored LayerNorm)."""
    try:
        from megatron.core.extensions import transformer_engine as te
    except Exception:  # pragma: no cover - the extension module imports without TE in 0.19
        return (), (), (), None
    try:
        from megatron.core.extensions.transformer_engine_spec_provider import _TENormWithResidual as norm
    except Exception:  # pragma: no cover
        norm = getattr(te, "TENorm", None)

    def present(*names):
        return tuple(o for o in (getattr(te, n, None) for n in names) if o is not None)

    return (present("TEColumnParallelLinear"), present("TERowParallelLinear"),
            present("TELayerNormColumnParallelLinear"), norm)


def _same(a, b) -> bool:
    return a is b


def _routed_experts(layer):
    """[(name relative to the layer, role, global expert index, linear)] of the MXFP4 linears of the
    layer's routed experts."""
    out = []
    for rel, seq in layer.named_modules():
        if not isinstance(seq, SequentialMLP):
            continue
        first = seq.ep_group.rank() * seq.num_local_experts  # Megatron's local -> global expert map
        for i, mlp in enumerate(seq.local_experts):
            for role in EXPERT_ROLES:
                m = getattr(mlp, role, None)
                if isinstance(m, _MXFP4ParallelMixin):
                    out.append((f"{rel}.{first + i}.{role}", role, first + i, m))
    return out


class MXFP4TransformerLayer(TransformerLayer):
    """`TransformerLayer` that binds its MXFP4 linears to the global layer number: Philox layer id
    8·layer_number + slot (MTP layers are numbered after the decoder's), and the recipe's
    `bf16_first_layers` / `bf16_last_layers` run unquantized. The routed experts take one slot per
    role (FC1, FC2) after the other linears and their global expert index (folded into the key), so
    the ids do not depend on the number of experts."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        number = self.layer_number + (self.config.num_layers if getattr(self, "is_mtp_layer", False) else 0)
        experts = _routed_experts(self)
        expert_linears = {id(m) for *_, m in experts}
        dense = [(n, m) for n, m in self.named_modules()
                 if isinstance(m, _MXFP4ParallelMixin) and id(m) not in expert_linears]
        roles = sorted({role for _, role, _, _ in experts}, key=EXPERT_ROLES.index)
        if len(dense) + len(roles) > _LAYER_SLOTS:
            raise ValueError(f"a transformer layer holds {len(dense)} MXFP4 linears and {len(roles)} expert roles; "
                             f"at most {_LAYER_SLOTS} get distinct random streams")
        if (number + 1) * _LAYER_SLOTS > (1 << 16):
            raise ValueError(f"layer number {number} is too large for the 16-bit Philox layer id")
        slots = [(rel, m, slot, None) for slot, (rel, m) in enumerate(dense)]
        slots += [(rel, m, len(dense) + roles.index(role), e) for rel, role, e, m in experts]
        for rel, m, slot, expert in slots:
            # a name unique across layers and ranks (diagnostics, error messages): the global layer
            # index and, for an expert, the global expert index
            m.set_mxfp4(self._layer_recipe(m.recipe), layer_id=_LAYER_SLOTS * number + slot,
                        name=f"decoder.layers.{number - 1}.{rel}", expert=expert)
        for seq in self.modules():  # the experts' backward quantizers: grouped launches per layer
            if isinstance(seq, SequentialMLP):
                grouped_experts.install(seq)

    def _layer_recipe(self, recipe: Optional[MXFP4Recipe]) -> Optional[MXFP4Recipe]:
        if recipe is not None and not getattr(self, "is_mtp_layer", False):
            if self.layer_number <= recipe.bf16_first_layers or \
                    self.layer_number > self.config.num_layers - recipe.bf16_last_layers:
                return unquantized(recipe)
        return recipe


def _linear_spec(cls, recipe: MXFP4Recipe) -> ModuleSpec:
    return ModuleSpec(module=cls, params={"recipe": recipe})


def swap_linear_specs(spec: Any, recipe: MXFP4Recipe, *, strict: bool = True) -> Any:
    """A copy of `spec` with the decoder linears replaced by the MXFP4 classes (module docstring).
    `strict`: raise when nothing was swapped. The input spec is not modified."""
    if not isinstance(recipe, MXFP4Recipe):
        raise TypeError(f"recipe must be an MXFP4Recipe, got {type(recipe).__name__}")
    te_col, te_row, te_ln_col, te_norm = _te_classes()
    column = {ColumnParallelLinear, *te_col, *te_ln_col}
    row = {RowParallelLinear, *te_row}
    swapped: List[Tuple[Tuple[str, ...], Any]] = []

    def target(obj):
        key = obj.module if isinstance(obj, ModuleSpec) and not obj.params and obj.submodules is None else obj
        if any(_same(key, c) for c in column):
            return MXFP4ColumnParallelLinear, any(_same(key, c) for c in te_ln_col)
        if any(_same(key, c) for c in row):
            return MXFP4RowParallelLinear, False
        return None, False

    def walk(obj, path):
        if path and path[-1] in LINEAR_FIELDS:
            cls, fused_ln = target(obj)
            if cls is not None:
                swapped.append((path, fused_ln))
                return _linear_spec(cls, recipe)
        if path and path[-1] in MOE_FIELDS:
            if recipe.moe == "none":
                return obj
            if path[-1] == "experts":
                _check_experts(obj)
        if isinstance(obj, ModuleSpec):
            module = MXFP4TransformerLayer if obj.module is TransformerLayer else obj.module
            return dataclasses.replace(obj, module=module, params=dict(obj.params),
                                       submodules=walk(obj.submodules, path), metainfo=dict(obj.metainfo))
        if isinstance(obj, functools.partial):
            return functools.partial(obj.func, *[walk(a, path) for a in obj.args],
                                     **{k: walk(v, path + (k,)) for k, v in obj.keywords.items()})
        if isinstance(obj, (list, tuple)):
            return type(obj)(walk(o, path) for o in obj)
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            n_before = len(swapped)
            changes = {f.name: walk(getattr(obj, f.name), path + (f.name,))
                       for f in dataclasses.fields(obj) if f.init}
            new = dataclasses.replace(obj, **changes)
            _restore_norms(new, swapped[n_before:], path, te_norm)
            return new
        return obj

    out = walk(spec, ())
    if strict and not swapped:
        raise ValueError("swap_linear_specs: the spec holds none of linear_qkv/linear_proj/linear_fc1/linear_fc2 "
                         "as a megatron-core or TE parallel linear; nothing to swap")
    return out


def _check_experts(spec) -> None:
    """Routed experts are covered as megatron-core's `SequentialMLP` (one MLP per local expert)."""
    module = spec.func if isinstance(spec, functools.partial) else getattr(spec, "module", spec)
    if module is not SequentialMLP:
        name = getattr(module, "__name__", repr(module))
        raise ValueError(f"the MoE experts are {name}; the MXFP4 backward covers megatron-core's SequentialMLP "
                         "experts: build them without grouped GEMM (moe_grouped_gemm=False, no --moe-grouped-gemm) "
                         "or keep them stock with recipe moe='none' (--mxfp4-moe none)")


def _restore_norms(layer_sub, swaps, path, te_norm) -> None:
    """In a TransformerLayerSubmodules whose fused-LN linears were swapped, put the LayerNorm back."""
    if not (hasattr(layer_sub, "input_layernorm") and hasattr(layer_sub, "pre_mlp_layernorm")):
        return
    rel = [p[len(path):] for p, fused in swaps if fused]
    keys = dict(getattr(layer_sub, "sharded_state_dict_keys_map", None) or {})
    for field, linear, prefix in (("input_layernorm", "linear_qkv", "self_attention.linear_qkv.layer_norm_"),
                                  ("pre_mlp_layernorm", "linear_fc1", "mlp.linear_fc1.layer_norm_")):
        if any(r and r[-1] == linear for r in rel):
            if getattr(layer_sub, field) not in (None, IdentityOp):
                raise ValueError(f"{field} is already set while its LayerNorm is fused into {linear}")
            if te_norm is None:  # pragma: no cover
                raise RuntimeError("a fused-LayerNorm TE linear was swapped but TENorm is unavailable")
            setattr(layer_sub, field, te_norm)
            keys[field + "."] = prefix
    if keys and hasattr(layer_sub, "sharded_state_dict_keys_map"):
        layer_sub.sharded_state_dict_keys_map = keys


def get_gpt_layer_spec(recipe: MXFP4Recipe, base_spec: Optional[ModuleSpec] = None, *,
                       transformer_engine: bool = False, **spec_kwargs) -> ModuleSpec:
    """The GPT layer spec with MXFP4 linears.

    base_spec: a spec to convert; by default megatron-core's local spec
    (`get_gpt_layer_local_spec(**spec_kwargs)`), or its TE spec with `transformer_engine=True`
    (which needs Transformer Engine installed). `num_experts=N` gives the MoE layer: its experts
    follow `recipe.moe` (module docstring).
    """
    if base_spec is None:
        from megatron.core.models.gpt import gpt_layer_specs as specs

        if transformer_engine:
            base_spec = specs.get_gpt_layer_with_transformer_engine_spec(**spec_kwargs)
        else:
            base_spec = specs.get_gpt_layer_local_spec(**spec_kwargs)
    elif spec_kwargs or transformer_engine:
        raise TypeError("pass either base_spec or the arguments of megatron-core's spec function, not both")
    return swap_linear_specs(base_spec, recipe)


class MXFP4LayerSpecProvider:
    """A callable `transformer_layer_spec` for megatron.training's `GPTModelConfig`:
    `(model_cfg, vp_stage=None) -> spec` building the base spec (`default_layer_spec` when `base`
    is None, else the given spec or spec callable) and swapping in the MXFP4 linears."""

    def __init__(self, recipe: MXFP4Recipe, base: Any = None):
        self.recipe = recipe
        self.base = base

    def __call__(self, model_cfg, vp_stage: Optional[int] = None):
        base = self.base
        if base is None:
            from megatron.training.models.gpt import default_layer_spec

            spec = default_layer_spec(model_cfg, vp_stage)
        elif isinstance(base, ModuleSpec) or not callable(base):
            spec = base
        elif "vp_stage" in inspect.signature(base).parameters:
            spec = base(model_cfg, vp_stage=vp_stage)
        else:
            spec = base(model_cfg)
        return swap_linear_specs(spec, self.recipe)

    def __repr__(self) -> str:
        return f"MXFP4LayerSpecProvider(recipe={self.recipe}, base={self.base!r})"


def _unwrap(chunk):
    m = chunk
    while not hasattr(m, "output_layer") and hasattr(m, "module"):
        m = m.module
    return m


def convert_output_layer(model, recipe: MXFP4Recipe):
    """Give a GPTModel's LM head (`output_layer`) the plugin's Function: with the MXFP4 backward when
    `recipe.lm_head`, else unquantized when it was built with gradient-accumulation fusion but
    there is no apex (the plugin then does the FP32 accumulation). Accepts a model or a list of
    model chunks (wrappers with `.module` are unwrapped); returns its argument."""
    if recipe is None:
        return model
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        head = getattr(_unwrap(chunk), "output_layer", None)
        if head is None or type(head) is not ColumnParallelLinear:
            continue
        if recipe.lm_head:
            MXFP4ColumnParallelLinear.adopt(head, recipe, LM_HEAD_LAYER_ID, name="output_layer")
        elif head.gradient_accumulation_fusion and not APEX_FUSION:
            MXFP4ColumnParallelLinear.adopt(head, unquantized(recipe), LM_HEAD_LAYER_ID, name="output_layer")
    return model


def check_fusion_covered(model) -> None:
    """Raise if a stock megatron-core linear would call apex's fused wgrad kernel (absent)."""
    if APEX_FUSION:
        return
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        for name, m in chunk.named_modules():
            if type(m) in (ColumnParallelLinear, RowParallelLinear) and m.gradient_accumulation_fusion:
                raise RuntimeError(f"{name} is a stock {type(m).__name__} with gradient-accumulation fusion, which "
                                   "needs apex; pass --no-gradient-accumulation-fusion or install apex")


def lm_head_pre_wrap_hook(recipe: MXFP4Recipe) -> Callable:
    """A `GPTModelConfig.pre_wrap_hooks` entry: `convert_output_layer`, then `check_fusion_covered`."""
    def hook(model_chunks):
        convert_output_layer(model_chunks, recipe)
        check_fusion_covered(model_chunks)
        return model_chunks

    return hook


@contextlib.contextmanager
def fusion_without_apex():
    """Let megatron-core build stock linears with gradient-accumulation fusion when apex is
    missing. Every such linear must then run the plugin's Function: `convert_output_layer` converts
    the LM head of a GPTModel and `check_fusion_covered` verifies the rest."""
    saved = _mcore_layers._grad_accum_fusion_available
    _mcore_layers._grad_accum_fusion_available = True
    try:
        yield
    finally:
        _mcore_layers._grad_accum_fusion_available = saved


def allow_fusion_without_apex() -> None:
    """`fusion_without_apex` for the rest of the process (the training entry point builds the model
    inside `pretrain`); pair it with `lm_head_pre_wrap_hook`."""
    _mcore_layers._grad_accum_fusion_available = True


def configure_gpt_model_config(model_cfg, recipe: Optional[MXFP4Recipe], gradient_accumulation_fusion: bool = False):
    """Put the MXFP4 layer spec into megatron.training's `GPTModelConfig` (wrapping the spec it
    already holds, if any) and register the LM-head pre-wrap hook. With gradient-accumulation fusion
    and no apex, stock megatron-core linears are allowed to be built (the hook gives the LM head the
    plugin's Function, which accumulates into main_grad itself, and checks that no stock linear is
    left to call apex). Returns `model_cfg`; `recipe=None` leaves it untouched."""
    if recipe is None:
        return model_cfg
    if isinstance(model_cfg.transformer_layer_spec, MXFP4LayerSpecProvider):
        raise ValueError("the model config already holds the MXFP4 layer spec")
    model_cfg.transformer_layer_spec = MXFP4LayerSpecProvider(recipe, base=model_cfg.transformer_layer_spec)
    if gradient_accumulation_fusion and not APEX_FUSION:
        allow_fusion_without_apex()
    model_cfg.pre_wrap_hooks.append(lm_head_pre_wrap_hook(recipe))
    return model_cfg


def configure_from_args(model_cfg, args):
    """`configure_gpt_model_config` driven by parsed Megatron args with the `--mxfp4-*` flags."""
    from .args import recipe_from_args

    return configure_gpt_model_config(model_cfg, recipe_from_args(args),
                                      bool(getattr(args, "gradient_accumulation_fusion", False)))
