"""Command-line flags of the MXFP4 backward for Megatron-LM launch scripts.

`add_mxfp4_args(parser)` is an `extra_args_provider` for `megatron.training`'s
`parse_and_validate_args` (it returns the parser); `recipe_from_args(args)` turns the parsed flags
into an `MXFP4Recipe`, or None when `--mxfp4-backward` is absent (stock Megatron).
This module does not import megatron: argparse only.
"""
from __future__ import annotations

import argparse
from typing import Optional

from ..numerics.quantize import ROUNDINGS
from ..numerics.rht import SIGN_POLICIES
from ..ops.dispatch import BACKENDS
from ..recipe import BACKWARD_FORMATS, FORWARDS, MOE_MODES, MXFP4Recipe

GEMMS = ("dgrad", "wgrad", "both")
_DEFAULT = MXFP4Recipe()


def _rht_block(text: str) -> int:
    try:
        g = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--mxfp4-rht-block must be an integer, got {text!r}")
    if g not in (0, 32, 64, 128, 256):
        raise argparse.ArgumentTypeError(f"--mxfp4-rht-block must be one of 0, 32, 64, 128, 256, got {g}")
    return g


def _non_negative(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {n}")
    return n


def _seed(text: str) -> int:
    try:
        s = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--mxfp4-seed must be an integer, got {text!r}")
    if not 0 <= s < 2**64:
        raise argparse.ArgumentTypeError(f"--mxfp4-seed must be in [0, 2^64), got {s}")
    return s


def add_mxfp4_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `--mxfp4-*` flags (group "MXFP4 backward") to `parser` and return it."""
    g = parser.add_argument_group(title="MXFP4 backward",
                                  description="backward GEMMs of the decoder linears in MXFP4 (megatron_mxfp4)")
    g.add_argument("--mxfp4-backward", action="store_true",
                   help="run dgrad/wgrad of QKV, proj, FC1, FC2 in MXFP4 with stochastic rounding and a "
                        "random Hadamard transform")
    g.add_argument("--mxfp4-gemms", choices=GEMMS, default="both",
                   help="which backward GEMMs are quantized (default: both)")
    g.add_argument("--mxfp4-rounding", choices=ROUNDINGS, default=_DEFAULT.rounding,
                   help=f"rounding of the MXFP4 operands (default: {_DEFAULT.rounding})")
    g.add_argument("--mxfp4-rht-block", type=_rht_block, default=_DEFAULT.rht_block,
                   help=f"random Hadamard transform block (0 = off; default: {_DEFAULT.rht_block})")
    g.add_argument("--mxfp4-sign-policy", choices=SIGN_POLICIES, default=_DEFAULT.sign_policy,
                   help=f"RHT sign policy (default: {_DEFAULT.sign_policy})")
    g.add_argument("--mxfp4-forward", choices=FORWARDS, default=_DEFAULT.forward,
                   help="forward GEMM precision of the MXFP4 layers: bf16, or fp8 (E4M3, per-tensor current "
                        f"scaling) (default: {_DEFAULT.forward})")
    g.add_argument("--mxfp4-backward-format", choices=BACKWARD_FORMATS, default=_DEFAULT.backward_format,
                   help="format of the backward GEMMs: mxfp4, or fp8 (E4M3 current scaling: the FP8 baseline) "
                        f"(default: {_DEFAULT.backward_format})")
    g.add_argument("--mxfp4-backend", choices=BACKENDS, default=_DEFAULT.backend,
                   help=f"kernel backend (default: {_DEFAULT.backend})")
    g.add_argument("--mxfp4-seed", type=_seed, default=_DEFAULT.seed,
                   help=f"base seed of the SR/RHT random streams; the data-parallel rank is folded in "
                        f"(default: {_DEFAULT.seed})")
    g.add_argument("--mxfp4-bf16-first-layers", type=_non_negative, default=0,
                   help="keep the first N transformer layers unquantized (default: 0)")
    g.add_argument("--mxfp4-bf16-last-layers", type=_non_negative, default=0,
                   help="keep the last N transformer layers unquantized (default: 0)")
    g.add_argument("--mxfp4-lm-head", action="store_true",
                   help="also run the LM head's backward GEMMs in MXFP4 (default: BF16)")
    g.add_argument("--mxfp4-moe", choices=MOE_MODES, default=_DEFAULT.moe,
                   help="with --num-experts: 'experts' runs the routed and shared experts' backward GEMMs in "
                        "MXFP4, 'none' keeps the MoE block in BF16; the router is never quantized "
                        f"(default: {_DEFAULT.moe})")
    g.add_argument("--mxfp4-cuda-graphs", action="store_true",
                   help="keep the MXFP4 layers' call counters on the GPU so that CUDA graphs replay with fresh "
                        "random bits per call, as eager calls do (on by itself with Megatron's CUDA-graph options)")
    return parser


def _megatron_cuda_graphs(args) -> bool:
    """Whether Megatron's own flags ask for CUDA graphs (--cuda-graph-impl, --enable-cuda-graph,
    --external-cuda-graph)."""
    impl = getattr(args, "cuda_graph_impl", None)
    return (impl not in (None, "none") or bool(getattr(args, "enable_cuda_graph", False))
            or bool(getattr(args, "external_cuda_graph", False)))


def recipe_from_args(args) -> Optional[MXFP4Recipe]:
    """The recipe selected by the parsed flags, or None without `--mxfp4-backward`."""
    if not getattr(args, "mxfp4_backward", False):
        return None
    if getattr(args, "fp8", None):
        raise ValueError(f"--mxfp4-backward cannot be combined with --fp8-format {args.fp8} (TE FP8); use "
                         "--mxfp4-forward fp8 for an FP8 forward in the MXFP4 layers")
    if getattr(args, "fp4", None):
        raise ValueError(f"--mxfp4-backward cannot be combined with --fp4-format {args.fp4}")
    gemms = args.mxfp4_gemms
    if gemms not in GEMMS:
        raise ValueError(f"--mxfp4-gemms must be one of {GEMMS}, got {gemms!r}")
    return MXFP4Recipe(
        dgrad=gemms in ("dgrad", "both"),
        wgrad=gemms in ("wgrad", "both"),
        rounding=args.mxfp4_rounding,
        rht_block=args.mxfp4_rht_block,
        sign_policy=args.mxfp4_sign_policy,
        forward=args.mxfp4_forward,
        backend=args.mxfp4_backend,
        seed=args.mxfp4_seed,
        bf16_first_layers=args.mxfp4_bf16_first_layers,
        bf16_last_layers=args.mxfp4_bf16_last_layers,
        lm_head=bool(args.mxfp4_lm_head),
        backward_format=args.mxfp4_backward_format,
        moe=args.mxfp4_moe,
        cuda_graphs=bool(getattr(args, "mxfp4_cuda_graphs", False)) or _megatron_cuda_graphs(args),
    )
