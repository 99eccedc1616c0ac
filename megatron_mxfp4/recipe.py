"""`MXFP4Recipe`: the one configuration object of the MXFP4 backward (DESIGN §6)."""
from __future__ import annotations

from dataclasses import dataclass

from .numerics.quantize import ROUNDINGS
from .numerics.rht import SIGN_POLICIES, check_rht_block
from .ops.dispatch import BACKENDS

FORWARDS = ("bf16", "fp8")
BACKWARD_FORMATS = ("mxfp4", "fp8")
MOE_MODES = ("experts", "none")


@dataclass(frozen=True)
class MXFP4Recipe:
    """How the backward GEMMs of a linear layer are quantized.

    dgrad / wgrad: run that GEMM in MXFP4 (else in the input's precision).
    rounding: "sr" (3/4 prescale, stochastic, alpha 16/9) or "rtn" (nearest, ties to even).
    rht_block: random Hadamard block g along the reduction dim (0 = off).
    sign_policy: "per_call" | "per_layer" | "deterministic" (s = +1) | "off" (no transform).
    forward: "bf16" (unquantized, the input's dtype) or "fp8" (E4M3, per-tensor current scaling).
    backend: kernel backend ("auto" picks the fastest valid one).
    seed: base Philox seed; the data-parallel rank is folded in per replica.

    Integration options (Megatron; they do not change the numerics of a quantized layer):
    bf16_first_layers / bf16_last_layers: keep the first / last N transformer layers entirely in
        the unquantized path (forward and backward).
    lm_head: also quantize the backward of the LM head (output layer); off by default.
    moe: in a Mixture-of-Experts layer, "experts" quantizes the routed experts' FC1/FC2 and the
        shared experts like a dense MLP; "none" keeps the whole MoE block unquantized. The router
        is never quantized.

    cuda_graphs: keep each layer's call counter on its GPU, which then computes every call's Philox offsets
        (two small kernels per forward), so that a CUDA graph capturing MXFP4 layers draws the bits of the
        next call at every replay, exactly as the same calls run eagerly. The numerics do not change.

    Baseline option: backward_format "fp8" runs the selected backward GEMMs in FP8 E4M3 with
    per-tensor current scaling instead of MXFP4 (rounding / RHT then do not apply): the FP8 arm
    of A/B studies.
    """

    dgrad: bool = True
    wgrad: bool = True
    rounding: str = "sr"
    rht_block: int = 64
    sign_policy: str = "per_call"
    forward: str = "bf16"
    backend: str = "auto"
    seed: int = 1234
    bf16_first_layers: int = 0
    bf16_last_layers: int = 0
    lm_head: bool = False
    backward_format: str = "mxfp4"
    moe: str = "experts"
    cuda_graphs: bool = False

    def __post_init__(self):
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"MXFP4Recipe.rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        check_rht_block(self.rht_block)
        if self.sign_policy not in SIGN_POLICIES:
            raise ValueError(f"MXFP4Recipe.sign_policy must be one of {SIGN_POLICIES}, got {self.sign_policy!r}")
        if self.forward not in FORWARDS:
            raise ValueError(f"MXFP4Recipe.forward must be one of {FORWARDS}, got {self.forward!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"MXFP4Recipe.backend must be one of {BACKENDS}, got {self.backend!r}")
        if not 0 <= int(self.seed) < 2**64:
            raise ValueError(f"MXFP4Recipe.seed must be an unsigned 64-bit integer, got {self.seed}")
        for name in ("bf16_first_layers", "bf16_last_layers"):
            n = getattr(self, name)
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"MXFP4Recipe.{name} must be a non-negative int, got {n!r}")
        if self.backward_format not in BACKWARD_FORMATS:
            raise ValueError(f"MXFP4Recipe.backward_format must be one of {BACKWARD_FORMATS}, "
                             f"got {self.backward_format!r}")
        if self.moe not in MOE_MODES:
            raise ValueError(f"MXFP4Recipe.moe must be one of {MOE_MODES}, got {self.moe!r}")
        for name in ("lm_head", "cuda_graphs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MXFP4Recipe.{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def effective_rht_block(self) -> int:
        """The RHT block actually applied (0 when the sign policy is "off")."""
        return 0 if self.sign_policy == "off" else self.rht_block

    @property
    def quantize_backend(self) -> str:
        """The backend for the quantizer ("hopper"/"blackwell"/"triton" name GEMMs: quantize picks its own)."""
        return self.backend if self.backend in ("auto", "reference", "cuda") else "auto"

    @property
    def gemm_backend(self) -> str:
        """The backend for the GEMM ("cuda" names the quantize kernels: the GEMM picks its own)."""
        return "auto" if self.backend == "cuda" else self.backend

    @property
    def quantizes_backward(self) -> bool:
        return self.dgrad or self.wgrad
