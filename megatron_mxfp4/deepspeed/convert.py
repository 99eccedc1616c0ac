"""`convert(model, recipe, filter=None)`: give the linear layers of a (DeepSpeed) model an MXFP4 backward.

Converted, by exact type (subclasses that shard or fuse differently are left alone):
  `torch.nn.Linear`                                        -> `MXFP4DeepSpeedLinear`
  HF `transformers.pytorch_utils.Conv1D` (GPT-2's linears)  -> `MXFP4Conv1D`
  AutoTP `LinearLayer` / `LinearAllreduce`                  -> `MXFP4LinearLayer` / `MXFP4LinearAllreduce`

When to call it:
- DeepSpeed ZeRO 0–3 (data parallel): any time before training, on the plain model, on a model
  built under `deepspeed.zero.Init`, or on `engine.module` after `deepspeed.initialize`.
- AutoTP: AutoTP shards the model inside `deepspeed.initialize` and replaces every linear by a
  new `LinearLayer` / `LinearAllreduce`, dropping a conversion made before. Convert `engine.module`
  afterwards, or use `megatron_mxfp4.deepspeed.initialize`, which also re-applies a conversion made
  before it (each converted weight Parameter carries its layer's recipe, id and name, and AutoTP
  keeps the Parameter objects).

Never converted unless asked: the LM head (the module HF's `get_output_embeddings()` returns, a
linear named `lm_head`, `embed_out` or `output_layer`, or one whose weight is an `nn.Embedding`'s
weight); set `recipe.lm_head=True` to include it. `recipe.bf16_first_layers` / `bf16_last_layers`
keep the linears of the first / last N blocks of the model's block stack (its `nn.ModuleList` with
the most linears) unconverted.
"""
from __future__ import annotations

import sys
from typing import Callable, List, Optional, Tuple

from torch import nn

from ..recipe import MXFP4Recipe
from .layers import MXFP4DeepSpeedLinear, _StreamMixin, mxfp4_conv1d_class

HEAD_NAMES = ("lm_head", "embed_out", "output_layer")
_LAYER_ID_LIMIT = 1 << 16


def _conv1d_type():
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None) if mod is not None else None


def _autotp_classes() -> dict:
    if "deepspeed.module_inject.layers" not in sys.modules:  # no AutoTP layer can exist yet
        return {}
    from .autotp import AUTOTP_CLASSES
    return AUTOTP_CLASSES


def _target_class(module: nn.Module) -> Optional[type]:
    """The MXFP4 class a module converts to, or None when it is not a convertible linear."""
    t = type(module)
    if t is nn.Linear:
        return MXFP4DeepSpeedLinear
    conv1d = _conv1d_type()
    if conv1d is not None and t is conv1d:
        return mxfp4_conv1d_class(conv1d)
    return _autotp_classes().get(t)


def _head_modules(model: nn.Module) -> set:
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out = get_out()
        except (NotImplementedError, AttributeError):
            out = None
        if isinstance(out, nn.Module):
            heads.add(id(out))
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, m in model.named_modules():
        if name.rpartition(".")[2] in HEAD_NAMES:
            heads.add(id(m))
        w = getattr(m, "weight", None)
        if w is not None and id(w) in embedding_weights and not isinstance(m, nn.Embedding):
            heads.add(id(m))
    return heads


def _block_index(model: nn.Module, linears: List[Tuple[str, nn.Module]]):
    """name -> (block index, number of blocks) within the model's block stack (the ModuleList
    holding the most of `linears`)."""
    best, best_count = None, 0
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m):
            prefix = f"{name}." if name else ""
            count = sum(1 for n, _ in linears if n.startswith(prefix))
            if count > best_count:
                best, best_count = (prefix, len(m)), count
    if best is None:
        return None
    prefix, n_blocks = best
    index = {}
    for n, _ in linears:
        if n.startswith(prefix):
            head = n[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                index[n] = int(head)
    return index, n_blocks


def _unwrap(model):
    """The module of a DeepSpeed engine (or of any wrapper exposing `.module`), else the model."""
    if type(model).__name__ in ("DeepSpeedEngine", "PipelineEngine", "DeepSpeedHybridEngine") and \
            isinstance(getattr(model, "module", None), nn.Module):
        return model.module
    return model


def convert(model: nn.Module, recipe: Optional[MXFP4Recipe] = MXFP4Recipe(),
            filter: Optional[Callable[[str, nn.Module], bool]] = None) -> nn.Module:
    """Give the linear layers of `model` (or of a DeepSpeed engine's module) an MXFP4 backward, in place.

    `filter(qualified_name, module) -> bool` chooses among the convertible layers (default: all but
    the LM head). `recipe=None` leaves the model unchanged. Chosen layers already converted get `recipe`
    (and keep their layer id and call counter). Layers of any size convert (the backward zero-pads
    its reduction dimensions, DESIGN §3). Returns the model (the engine's module when an engine was passed).
    """
    if recipe is None:
        return _unwrap(model)
    if not isinstance(recipe, MXFP4Recipe):
        raise TypeError(f"convert: recipe must be an MXFP4Recipe or None, got {type(recipe).__name__}")
    model = _unwrap(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be an nn.Module or a DeepSpeed engine, got {type(model).__name__}")
    if _target_class(model) is not None:
        raise TypeError("convert converts the submodules of a model; wrap a bare linear in a module first")

    candidates = []  # (name, module, target class or None when already converted), in module order
    for name, m in model.named_modules():
        if isinstance(m, _StreamMixin):
            candidates.append((name, m, None))
        else:
            target = _target_class(m)
            if target is not None:
                candidates.append((name, m, target))
    if len(candidates) > _LAYER_ID_LIMIT:
        raise ValueError(f"convert: {len(candidates)} linear layers exceed the {_LAYER_ID_LIMIT} layer ids")

    heads = set() if recipe.lm_head else _head_modules(model)
    skip_blocks = set()
    if recipe.bf16_first_layers or recipe.bf16_last_layers:
        found = _block_index(model, [(n, m) for n, m, _ in candidates])
        if found is None:
            raise ValueError("convert: recipe.bf16_first_layers / bf16_last_layers need a block stack "
                             "(an nn.ModuleList of transformer blocks), and this model has none; use `filter`")
        index, n_blocks = found
        keep = set(range(recipe.bf16_first_layers)) | set(range(n_blocks - recipe.bf16_last_layers, n_blocks))
        skip_blocks = {n for n, i in index.items() if i in keep}

    for layer_id, (name, m, target) in enumerate(candidates):
        if id(m) in heads or name in skip_blocks or (filter is not None and not filter(name, m)):
            continue
        if target is None:  # already converted: take the new recipe, keep the stream position
            m.recipe = recipe
            m._mxfp4_seed = None
            m.weight._mxfp4_conversion = (recipe, m.layer_id, m.mxfp4_name)
            continue
        m.__class__ = target
        m._mxfp4_setup(recipe, layer_id, name)
        m.weight._mxfp4_conversion = (recipe, layer_id, name)
    return model


def restore_conversions(model: nn.Module) -> int:
    """Convert again the AutoTP layers whose weight was converted before AutoTP replaced its module
    (see the module docstring); returns how many were restored."""
    model = _unwrap(model)
    classes = _autotp_classes()
    restored = 0
    for m in model.modules():
        target = classes.get(type(m))
        conversion = getattr(getattr(m, "weight", None), "_mxfp4_conversion", None)
        if target is None or conversion is None:
            continue
        m.__class__ = target
        m._mxfp4_setup(*conversion)  # (recipe, layer id, name)
        restored += 1
    return restored


def converted_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The (name, module) pairs of `model` that carry an MXFP4 backward."""
    return [(n, m) for n, m in _unwrap(model).named_modules() if isinstance(m, _StreamMixin)]


def unconvert(model: nn.Module) -> nn.Module:
    """Turn converted layers back into their original classes (in place); returns the model."""
    model = _unwrap(model)
    for _, m in converted_modules(model):
        base = next(c for c in type(m).__mro__[1:] if not issubclass(c, _StreamMixin))
        if base.__name__ == "MXFP4Linear":
            base = nn.Linear
        for attr in ("recipe", "layer_id", "mxfp4_name", "_mxfp4_calls", "_mxfp4_device_calls", "_mxfp4_seed"):
            m.__dict__.pop(attr, None)
        m.weight.__dict__.pop("_mxfp4_conversion", None)
        m.__class__ = base
    return model
