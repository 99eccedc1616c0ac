"""The training arms, by name: the one table that maps an arm to its `MXFP4Recipe`.

In every arm the embeddings, the LM head, attention and norms are unquantized; only the four
decoder linears (QKV, attention output, FC1, FC2) change. `recipe=None` is stock megatron-core.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional

from ..recipe import MXFP4Recipe


@dataclass(frozen=True)
class Arm:
    name: str
    recipe: Optional[MXFP4Recipe]
    description: str
    te_fp8: bool = False  # Transformer Engine FP8 (its own linears; needs TE)

    def with_seed(self, seed: int, backend: str = "auto") -> "Arm":
        """The arm with the run's seed in its Philox stream seed and the chosen kernel backend."""
        if self.recipe is None:
            return self
        return replace(self, recipe=replace(self.recipe, seed=int(seed), backend=backend))


_R = MXFP4Recipe
ARMS: Dict[str, Arm] = {a.name: a for a in (
    Arm("bf16", None, "BF16 forward and backward (stock megatron-core linears)"),
    Arm("fp8", _R(forward="fp8", backward_format="fp8"),
        "FP8 E4M3 forward and backward GEMMs, per-tensor current scaling (torch._scaled_mm)"),
    Arm("te-fp8", None, "Transformer Engine FP8 (hybrid E4M3/E5M2, delayed scaling, amax history 16), TE linears", te_fp8=True),
    Arm("mxfp4", _R(rounding="rtn", rht_block=0), "MXFP4 backward, round-to-nearest, no Hadamard"),
    Arm("mxfp4-sr", _R(rounding="sr", rht_block=0), "MXFP4 backward, stochastic rounding, no Hadamard"),
    Arm("mxfp4-rht", _R(rounding="rtn", rht_block=64), "MXFP4 backward, random Hadamard g=64, round-to-nearest"),
    Arm("mxfp4-rht-sr", _R(rounding="sr", rht_block=64), "MXFP4 backward, random Hadamard g=64 + SR (the paper)"),
    Arm("mxfp4-rht-sr-fp8fwd", _R(rounding="sr", rht_block=64, forward="fp8"),
        "FP8 E4M3 forward + MXFP4 backward with random Hadamard g=64 + SR"),
    Arm("mxfp4-dethad", _R(rounding="rtn", rht_block=32, sign_policy="deterministic"),
        "MXFP4 backward, deterministic (sign-free) Hadamard g=32, round-to-nearest"),
    Arm("mxfp4-wgrad-only", _R(dgrad=False), "only wgrad in MXFP4 (RHT g=64 + SR); dgrad BF16"),
    Arm("mxfp4-dgrad-only", _R(wgrad=False), "only dgrad in MXFP4 (RHT g=64 + SR); wgrad BF16"),
)}


def parse_arms(text: str) -> List[Arm]:
    """Arms from a comma list of names; unknown or repeated names are an error naming them."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError("--arms is empty; choose from " + ", ".join(ARMS))
    unknown = [n for n in names if n not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {', '.join(map(repr, unknown))}; choose from {', '.join(ARMS)}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"arm(s) listed twice: {', '.join(dup)}")
    return [ARMS[n] for n in names]


def parse_seeds(text: str) -> List[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be a comma list of integers, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must be distinct non-negative integers, got {text!r}")
    return seeds


def arms_table() -> str:
    rows = ["| arm | recipe | what |", "|---|---|---|"]
    for a in ARMS.values():
        r = "—" if a.recipe is None else _short(a.recipe)
        rows.append(f"| `{a.name}` | {r} | {a.description} |")
    return "\n".join(rows)


def _short(r: MXFP4Recipe) -> str:
    d = MXFP4Recipe()
    parts = [f"{f}={getattr(r, f)!r}" for f in ("dgrad", "wgrad", "rounding", "rht_block", "sign_policy", "forward",
                                                 "backward_format") if getattr(r, f) != getattr(d, f)]
    return "MXFP4Recipe(" + ", ".join(parts) + ")"
