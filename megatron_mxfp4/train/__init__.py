"""`mxfp4-train`: A/B training runs of a megatron-core GPT (arms, presets, run folders, reports).

Entry points: the console script ``mxfp4-train`` and ``python -m megatron_mxfp4.train``.
"""
from .arms import ARMS, Arm, parse_arms
from .presets import PRESETS, Config

__all__ = ["ARMS", "Arm", "Config", "PRESETS", "main", "parse_arms"]


def main(argv=None):
    from .cli import main as _main

    return _main(argv)
