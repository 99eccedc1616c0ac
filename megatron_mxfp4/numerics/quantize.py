"""Reference MXFP4 quantizer and GEMM (plain PyTorch, runs on CPU): the oracle for every kernel.

Order of operations for one element (bit-exact contract for all backends, DESIGN §2-§3, v2):
  0. the *logical tensor* is x with the quantized dim moved last and zero-padded along it to Kp, the next
     multiple of max(32, g) (DESIGN §3: no size is refused; padded zeros add nothing to a product, and
     the RHT of a zero-padded block cancels like any other);
  1. x -> float32; if rht_block: y = H_g · diag(s) · x per g-block (butterflies, then · 1/sqrt(g));
  2. per 32-block: amax = max |y|; e = floor(log2 amax) - 2 (exponent bits, clamped); a block with
     NaN/Inf gets scale 0xFF and all-zero codes;
  3. v = (y · 2^-e) · p in float32 (p = prescale; the second product is skipped when p == 1);
  4. code = RTN(v) or SR(v, r), r = the 8-bit dither of the element's row-major flat index i in the
     logical tensor (byte i % 4 of word i // 4 of the dither stream: one Philox call per 16 consecutive
     elements along the quantized dim, `philox.dither_bytes`);
  5. pack two codes per byte along the quantized dim, first element in the low nibble.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from . import format as fmt
from .philox import dither_bytes
from .rht import apply_rht, check_rht_block, draw_signs

ROUNDINGS = ("rtn", "sr")
#: Input dtypes the quantizers read (and the GEMMs write).
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class MXFP4Tensor:
    """An MXFP4-quantized tensor.

    `shape`: the original shape; along `dim` it is zero-padded to `padded_shape[dim]` (a multiple of 32 and
    of `rht_block`), the size the codes, the GEMMs and the dither indices count;
    `data`: uint8 codes packed two per byte along `dim` (padded size halved);
    `scales`: uint8 E8M0, one per 32 elements along `dim` (padded size / 32);
    `prescale`: the factor p applied before rounding (dequantize divides it out);
    `rht_block`/`signs`: the rotation the values live in (0/None: none);
    `swizzled_scales`: optionally the same scales of a 2-d tensor in the 128×4-swizzled layout that
    Blackwell's block-scaled GEMMs read (flat uint8, `ops.layouts.blackwell_scale_layout`), written by a
    quantize kernel in the same pass so that no separate layout pass runs.
    """

    data: torch.Tensor
    scales: torch.Tensor
    prescale: float
    dim: int
    shape: Tuple[int, ...]
    rht_block: int = 0
    signs: Optional[torch.Tensor] = None
    swizzled_scales: Optional[torch.Tensor] = None

    @property
    def padded_shape(self) -> Tuple[int, ...]:
        """`shape` with the quantized dim padded (what a GEMM reduces over)."""
        s = list(self.shape)
        s[self.dim] = self.data.shape[self.dim] * 2
        return tuple(s)

    def codes(self) -> torch.Tensor:
        """Unpacked codes (uint8, `padded_shape`)."""
        d = self.data.movedim(self.dim, -1)
        return fmt.unpack_nibbles(d).movedim(-1, self.dim)

    def values(self, unscaled: bool = False) -> torch.Tensor:
        """float32 codes · 2^e / prescale over `padded_shape` (in the rotated basis when rht_block > 0).
        With `unscaled=True` the prescale is not divided out (the values a GEMM multiplies)."""
        codes = self.codes().movedim(self.dim, -1)
        vals = fmt.e2m1_table(codes.device)[codes.long()]
        vals = vals.reshape(*vals.shape[:-1], vals.shape[-1] // fmt.BLOCK, fmt.BLOCK)
        scale = fmt.decode_scales(self.scales.movedim(self.dim, -1)).unsqueeze(-1)
        out = (vals * scale).flatten(-2)
        if not unscaled and self.prescale != 1.0:
            out = out / self.prescale
        return out.movedim(-1, self.dim)

    def dequantize(self, unscaled: bool = False) -> torch.Tensor:
        """float32 estimate of x: `values()` cut back to `shape`. In the rotated basis (rht_block > 0) the
        padding carries rotated values, so the full `padded_shape` is returned (`invert_rht` on it, then
        cut, gives the estimate of x)."""
        out = self.values(unscaled)
        if self.rht_block or out.shape[self.dim] == self.shape[self.dim]:
            return out
        return out.narrow(self.dim, 0, self.shape[self.dim])


def padded_size(k: int, rht_block: int) -> int:
    """A reduction size k zero-padded to the next multiple of the MX block and of the RHT block."""
    step = max(fmt.BLOCK, rht_block)
    return -(-k // step) * step


def resolve_prescale(rounding: str, prescale: Optional[float]) -> float:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if prescale is None:
        return fmt.SR_PRESCALE if rounding == "sr" else 1.0
    prescale = float(prescale)
    if not 0.0 < prescale <= 1.0:
        raise ValueError(f"prescale must be in (0, 1], got {prescale}")
    return prescale


def check_quantize_args(x: torch.Tensor, dim: int, rht_block: int, signs: Optional[torch.Tensor]) -> int:
    """Validate inputs of quantize_mxfp4 (any size is accepted: DESIGN §3); returns the normalized dim."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"quantize_mxfp4 expects a tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"quantize_mxfp4 supports float32/bfloat16/float16 input, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("quantize_mxfp4 needs at least one dimension")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim {dim} is out of range for a {x.dim()}-d tensor")
    dim %= x.dim()
    check_rht_block(rht_block)
    if signs is not None:
        if not rht_block:
            raise ValueError("signs were given but rht_block is 0")
        if signs.numel() != rht_block:
            raise ValueError(f"signs must have rht_block={rht_block} entries, got {signs.numel()}")
        if signs.device != x.device:
            raise ValueError(f"signs are on {signs.device} but x is on {x.device}")
    return dim


def _u64_value(v) -> int:
    return int(v.item()) & ((1 << 64) - 1) if isinstance(v, torch.Tensor) else int(v)


def quantize_reference(
    x: torch.Tensor,
    dim: int = -1,
    rounding: str = "rtn",
    prescale: Optional[float] = None,
    rht_block: int = 0,
    signs: Optional[torch.Tensor] = None,
    seed: int = 0,
    offset: int = 0,
) -> MXFP4Tensor:
    """Quantize `x` to MXFP4 along `dim` (see the module docstring for the exact steps). `seed` / `offset`
    may also be one-element integer tensors holding the bits of the unsigned value (read here: synchronizes)."""
    dim = check_quantize_args(x, dim, rht_block, signs)
    seed, offset = _u64_value(seed), _u64_value(offset)
    p = resolve_prescale(rounding, prescale)
    if rht_block and signs is None:
        signs = draw_signs(rht_block, seed, offset, x.device)
    signs = signs.to(torch.float32) if signs is not None else None

    y = x.to(torch.float32).movedim(dim, -1)
    k = y.shape[-1]
    kp = padded_size(k, rht_block)
    if kp != k:
        y = torch.nn.functional.pad(y, (0, kp - k))
    if rht_block and y.numel():
        y = apply_rht(y, signs)
    blocks = y.reshape(*y.shape[:-1], kp // fmt.BLOCK, fmt.BLOCK)
    finite = torch.isfinite(blocks).all(dim=-1)
    amax = torch.where(finite.unsqueeze(-1), blocks.abs(), torch.zeros_like(blocks)).amax(dim=-1)
    e = fmt.shared_exponent(amax)
    v = blocks * fmt.exp2_int(-e).unsqueeze(-1)
    if p != 1.0:
        v = v * p
    if rounding == "sr":
        r = dither_bytes(seed, offset, y.shape, x.device)
        codes = fmt.round_sr(v, r.reshape(v.shape))
    else:
        codes = fmt.round_rtn(v)
    codes = torch.where(finite.unsqueeze(-1), codes, torch.zeros_like(codes))
    scales = torch.where(finite, (e + fmt.E8M0_BIAS).to(torch.uint8), torch.full_like(e, fmt.E8M0_NAN, dtype=torch.uint8))
    data = fmt.pack_nibbles(codes.flatten(-2))
    return MXFP4Tensor(
        data=data.movedim(-1, dim).contiguous(),
        scales=scales.movedim(-1, dim).contiguous(),
        prescale=p,
        dim=dim,
        shape=tuple(x.shape),
        rht_block=rht_block,
        signs=signs,
    )


def check_gemm_operands(a: MXFP4Tensor, b: MXFP4Tensor, out_dtype: torch.dtype,
                        accumulate_into: Optional[torch.Tensor] = None) -> None:
    """a [M, K] and b [N, K], both quantized along K and rotated (if at all) identically.

    `accumulate_into` (optional): a float32 [M, N] tensor on the operands' device; then out_dtype must be float32.
    """
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, MXFP4Tensor):
            raise TypeError(f"mxfp4_gemm: {name} must be an MXFP4Tensor, got {type(t).__name__}")
        if len(t.shape) != 2 or t.dim != 1:
            raise ValueError(f"mxfp4_gemm: {name} must be 2-d and quantized along its last dim (K); "
                             f"got shape {t.shape} quantized along dim {t.dim}")
    if a.shape[1] != b.shape[1] or a.padded_shape[1] != b.padded_shape[1]:
        raise ValueError(f"mxfp4_gemm: reduction sizes differ: a has K={a.shape[1]} (padded {a.padded_shape[1]}), "
                         f"b has K={b.shape[1]} (padded {b.padded_shape[1]})")
    if a.data.device != b.data.device:
        raise ValueError(f"mxfp4_gemm: a is on {a.data.device} but b is on {b.data.device}")
    if a.rht_block != b.rht_block:
        raise ValueError(f"mxfp4_gemm: operands are rotated differently (rht_block {a.rht_block} vs {b.rht_block}); "
                         "the transform would not cancel")
    # identity first: torch.equal on a GPU synchronizes the host (the backward passes one signs tensor)
    if a.rht_block and a.signs is not b.signs and not torch.equal(a.signs, b.signs):
        raise ValueError("mxfp4_gemm: operands use different RHT signs; the transform would not cancel")
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"mxfp4_gemm: out_dtype must be float32/bfloat16/float16, got {out_dtype}")
    if accumulate_into is not None:
        if not isinstance(accumulate_into, torch.Tensor):
            raise TypeError(f"mxfp4_gemm: accumulate_into must be a tensor, got {type(accumulate_into).__name__}")
        want = (a.shape[0], b.shape[0])
        if accumulate_into.dtype != torch.float32 or tuple(accumulate_into.shape) != want:
            raise ValueError(f"mxfp4_gemm: accumulate_into must be a float32 tensor of shape {want}, got "
                             f"{accumulate_into.dtype} {tuple(accumulate_into.shape)}")
        if accumulate_into.device != a.data.device:
            raise ValueError(f"mxfp4_gemm: accumulate_into is on {accumulate_into.device} but the operands are on "
                             f"{a.data.device}")
        if out_dtype != torch.float32:
            raise ValueError(f"mxfp4_gemm: accumulating into a float32 tensor needs out_dtype=float32, got {out_dtype}")


def gemm_alpha(a: MXFP4Tensor, b: MXFP4Tensor, alpha: float = 1.0) -> float:
    """alpha / (p_a · p_b), rounded once to float32: undoes both prescales once, on the GEMM output
    (16/9 for SR·SR), times an optional extra output scale `alpha`."""
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"mxfp4_gemm: alpha must be finite, got {alpha}")
    return fmt.round_to_float32(alpha / (a.prescale * b.prescale))


def gemm_reference(a: MXFP4Tensor, b: MXFP4Tensor, out_dtype: torch.dtype = torch.float32, alpha: float = 1.0,
                   accumulate_into: Optional[torch.Tensor] = None) -> torch.Tensor:
    """C = alpha' · Σ_k A[m,k]·B[n,k] from the unscaled MXFP4 values, float32 accumulation,
    alpha' = gemm_alpha(a, b, alpha). With `accumulate_into` (float32 [M, N]) the product is added
    to it in place (C += alpha'·A·Bᵀ, one float32 add per element) and that tensor is returned."""
    check_gemm_operands(a, b, out_dtype, accumulate_into)
    c = a.values(unscaled=True) @ b.values(unscaled=True).t()
    c = c * gemm_alpha(a, b, alpha)
    if accumulate_into is not None:
        return accumulate_into.add_(c)
    return c.to(out_dtype)
