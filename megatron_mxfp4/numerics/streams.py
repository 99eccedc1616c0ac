"""Where every random bit of a backward pass comes from (DESIGN §2.4).

A Philox stream is keyed by (seed, offset). The seed folds in the data-parallel rank (replicas
decorrelated, tensor-parallel ranks identical) — for a routed MoE expert its expert-data-parallel rank
and its global expert index (`expert_seed`); the 64-bit offset packs

    bits 63..48  layer id      (16 bits)
    bits 47..8   call index    (40 bits: step × micro-batch, counted per layer)
    bits  7..4   GEMM          (dgrad / wgrad)
    bits  3..0   operand       (signs / dY / W / X)

so that no two operands of any GEMM of any layer in any call share bits. The RHT signs live in Philox's
sign domain (a counter bit), apart from every dither: `per_call` signs of a GEMM are the sign-domain words
at its dY operand's offset (what the dual dY kernel draws), `per_layer` signs those at the SIGNS slot of
call 0.

Routed experts: all experts of one MoE layer share the layer id of their role (FC1 or FC2) and differ by
key, so the layer id space does not grow with the number of experts (16 bits hold 8 ids per layer for
8192 layers) and one grouped launch for a layer's local experts needs one offset and a key per expert.
"""
from __future__ import annotations

import enum

MASK64 = (1 << 64) - 1
_LAYER_BITS, _CALL_BITS = 16, 40


class Gemm(enum.IntEnum):
    DGRAD = 1
    WGRAD = 2


class Operand(enum.IntEnum):
    SIGNS = 0  # the RHT signs of the per_layer policy (call 0); per_call signs use dY's offset (sign domain)
    GRAD_OUTPUT = 1  # dY
    WEIGHT = 2  # W (dgrad)
    INPUT = 3  # X (wgrad)


def stream_offset(layer: int, call: int, gemm: Gemm, operand: Operand) -> int:
    """The Philox offset of one operand of one GEMM of one call of one layer."""
    if not 0 <= layer < (1 << _LAYER_BITS):
        raise ValueError(f"layer id must be in [0, {1 << _LAYER_BITS}), got {layer}")
    call %= 1 << _CALL_BITS  # wraps after 2^40 calls per layer
    return (layer << 48) | (call << 8) | (int(gemm) << 4) | int(operand)


def derive_seed(seed: int, dp_rank: int = 0) -> int:
    """64-bit Philox key for a data-parallel rank (splitmix64 of seed and rank)."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(dp_rank) + 1) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def expert_seed(seed: int, replica_rank: int, expert: int) -> int:
    """64-bit Philox key of a routed MoE expert: `derive_seed` of its replica (expert-data-parallel rank:
    the ranks that hold the same expert shard and see other tokens) with the global expert index folded in."""
    return derive_seed(derive_seed(seed, replica_rank), expert)
