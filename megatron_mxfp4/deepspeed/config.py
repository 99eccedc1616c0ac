"""The `"mxfp4"` section of a DeepSpeed config.

    {
      "train_micro_batch_size_per_gpu": 8,
      "zero_optimization": {"stage": 3},
      "mxfp4": {"enabled": true, "rht_block": 64, "rounding": "sr", "seed": 1234}
    }

Every key other than `enabled` is a field of `MXFP4Recipe` (same name, same meaning, same
validation). As with DeepSpeed's own sections, a missing section or `"enabled": false` turns the
feature off. DeepSpeed ignores top-level keys it does not know, so the section can stay in the
config that is passed to `deepspeed.initialize`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional, Union

from ..recipe import MXFP4Recipe

CONFIG_KEY = "mxfp4"
RECIPE_FIELDS = tuple(f.name for f in dataclasses.fields(MXFP4Recipe))


def load_config(config: Union[str, os.PathLike, Mapping[str, Any], None]) -> dict:
    """A DeepSpeed config as a dict: a mapping is returned as is, a path is read as JSON."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            return json.load(f)
    raise TypeError(f"DeepSpeed config must be a dict or a path to a JSON file, got {type(config).__name__}")


def recipe_from_config(config: Union[str, os.PathLike, Mapping[str, Any], None]) -> Optional[MXFP4Recipe]:
    """The `MXFP4Recipe` named by the config's `"mxfp4"` section, or None when it is absent or disabled.

    Unknown keys are an error (a misspelt option must not silently fall back to its default).
    """
    section = load_config(config).get(CONFIG_KEY)
    if section is None:
        return None
    if not isinstance(section, Mapping):
        raise TypeError(f'DeepSpeed config "{CONFIG_KEY}" must be an object, got {type(section).__name__}')
    unknown = sorted(set(section) - {"enabled", *RECIPE_FIELDS})
    if unknown:
        raise ValueError(f'unknown key(s) {unknown} in DeepSpeed config "{CONFIG_KEY}"; '
                         f'valid keys: {["enabled", *RECIPE_FIELDS]}')
    enabled = section.get("enabled", False)
    if not isinstance(enabled, bool):
        raise ValueError(f'DeepSpeed config "{CONFIG_KEY}.enabled" must be true or false, got {enabled!r}')
    if not enabled:
        return None
    return MXFP4Recipe(**{k: v for k, v in section.items() if k != "enabled"})


def config_section(recipe: Optional[MXFP4Recipe]) -> dict:
    """The `"mxfp4"` config section that `recipe_from_config` reads back as `recipe` (None: disabled)."""
    if recipe is None:
        return {"enabled": False}
    return {"enabled": True, **dataclasses.asdict(recipe)}
