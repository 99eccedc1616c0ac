"""DeepSpeed integration (DESIGN §6): MXFP4 backward GEMMs for DeepSpeed models, ZeRO 0–3 and AutoTP.

    import deepspeed
    from megatron_mxfp4 import MXFP4Recipe
    from megatron_mxfp4.deepspeed import convert, initialize, recipe_from_config

    # either: convert, then the stock initialize (ZeRO 0-3)
    convert(model, MXFP4Recipe())
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                   config=ds_config)
    # or: the recipe from the config's "mxfp4" section, converted after initialize (needed for AutoTP)
    engine, optimizer, _, _ = initialize(model=model, model_parameters=model.parameters(), config=ds_config)

Importing this package does not import deepspeed; `initialize` and the AutoTP layers do.
"""
from .config import CONFIG_KEY, config_section, load_config, recipe_from_config
from .convert import HEAD_NAMES, convert, converted_modules, restore_conversions, unconvert
from .layers import MXFP4Conv1DFunction, MXFP4DeepSpeedLinear, replica_rank


def initialize(*args, config=None, recipe=None, filter=None, **kwargs):
    """`deepspeed.initialize`, then `convert(engine.module, recipe, filter)`.

    `recipe` defaults to the config's `"mxfp4"` section (`recipe_from_config`); when neither gives
    one, only layers converted before the call are kept converted (AutoTP replaces them: they are
    restored with `restore_conversions`). Returns what `deepspeed.initialize` returns.
    """
    import deepspeed

    if recipe is None:
        recipe = recipe_from_config(config)
    out = deepspeed.initialize(*args, config=config, **kwargs)
    restore_conversions(out[0].module)
    convert(out[0].module, recipe, filter=filter)
    return out


def __getattr__(name):  # the AutoTP layers need deepspeed: import them on first use
    if name in ("MXFP4LinearLayer", "MXFP4LinearAllreduce", "MXFP4AsyncColumnParallelFunction"):
        from . import autotp
        return getattr(autotp, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CONFIG_KEY", "HEAD_NAMES", "MXFP4Conv1DFunction", "MXFP4DeepSpeedLinear", "MXFP4LinearAllreduce",
    "MXFP4LinearLayer", "config_section", "convert", "converted_modules", "initialize", "load_config",
    "recipe_from_config", "replica_rank", "restore_conversions", "unconvert",
]
