"""Operand layouts that the GEMM backends consume, converted from an `MXFP4Tensor` (plain PyTorch).

These functions are the reference twins of the conversion kernels (compiled: `cuda_tiles.to_e4m3_tiles`;
Triton: `triton_gemm.to_e4m3`) and the only layout code of the Blackwell path; they run on CPU and on
CUDA tensors.

**Hopper: E4M3 codes + one float32 scale per tile** (`to_e4m3_reference`). Every E2M1 value is
exact in FP8 E4M3, so an MXFP4 operand [R, K] becomes FP8 codes [R, Kp] (Kp = K rounded up to the
tile, zero-padded) and float32 scales stored as [Kp / tile, R] (so `scales.t()` is the
column-major [R, Kp / tile] matrix that cuBLASLt's 1×128 block scaling wants):

- `tile=32`  ("blocks"): codes are the plain E2M1 values; the scale of block j is 2^e_j. Always exact.
- `tile=128` ("tiles"): the four block exponents of a 1×128 tile are folded into the codes
  relative to the tile's largest exponent: code = v · 2^(e_j − e_max), scale = 2^e_max. Exact in
  E4M3 (down to its smallest subnormal 2^-9) while every non-zero block of the tile lies at most
  8 binades below e_max. A tile that spans more ("bad") cannot be folded: its codes are zero and
  its K-slab is flagged in `bad` (one flag per 128-column slab, set when any row's tile is bad).
  A GEMM on this layout must exclude the flagged slabs (their other rows keep their codes: zero one
  operand's scales there) and add their product exactly (per-slab fallback, `hopper_gemm`).

Zero codes are always +0 (the sign of a zero element is dropped).

All-zero blocks do not count for e_max or the span (their exponent is irrelevant). A block with the
NaN scale (0xFF) makes its whole tile's scale NaN, so the GEMM's row turns NaN as in the reference.
A tile without any non-zero finite block gets e_max = 0.

**Hopper, per-row scales** (`to_e4m3_rows_reference`): every block exponent of a row folded into its
codes relative to one exponent per row, E4M3's headroom above the E2M1 range used as well (6 · 2^6 = 384),
so a row may span 14 binades; the row scale is a float32 vector that cuBLASLt's outer-vector FP8 scaling
applies in the epilogue, the FP8 GEMM's fastest scaled mode. A row spanning more is flagged and added
exactly by the GEMM (per-row fallback).

**Blackwell: E8M0 scales in the 128×4 swizzled layout** (`blackwell_scale_layout`) that cuBLASLt's
1-D block scaling (and `torch._scaled_mm` with `float4_e2m1fn_x2`) reads: the [R, K/32] scale
matrix is padded to [ceil(R/128)·128, ceil(K/32/4)·4]; each 128×4 block is stored as 512
contiguous bytes, blocks in row-major order, and inside a block element (r, c) sits at
(r mod 32)·16 + (r div 32)·4 + c.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..numerics import format as fmt
from ..numerics.quantize import MXFP4Tensor

TILE = 128
#: Largest number of binades a non-zero block may lie below its tile's top exponent for the fold to be exact.
MAX_TILE_SPAN = 8
#: Padding value for E8M0 scales outside the matrix (2^0).
_E8M0_ONE = fmt.E8M0_BIAS


#: Orders of the codes inside each 32-block: "natural", or "split" (its 16 even elements, then its 16
#: odd ones — what one packed byte holds, low nibbles first). Both operands of a GEMM must agree.
ORDERS = ("natural", "split")


@dataclass(frozen=True)
class E4M3Operand:
    """An MXFP4 operand as FP8 E4M3 codes + float32 scales (see the module docstring).

    codes [R, Kp] float8_e4m3fn; scales [Kp / tile, R] float32; bad [ceil(K / 128)] (nonzero = flagged;
    tile=128: K-slabs with a row-tile spanning more than 8 binades, whose codes are zero; tile=32: none);
    k = K; order: the element order inside each 32-block (`ORDERS`).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    bad: torch.Tensor
    tile: int
    k: int
    order: str = "natural"


def _check_operand(t: MXFP4Tensor, what: str = "operand") -> None:
    if not isinstance(t, MXFP4Tensor):
        raise TypeError(f"{what} must be an MXFP4Tensor, got {type(t).__name__}")
    if len(t.shape) != 2 or t.dim != 1:
        raise ValueError(f"{what} must be 2-d and quantized along its last dim, got shape {t.shape} "
                         f"quantized along dim {t.dim}")


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """2^e (float32, exact) for integer e in [-127, 127] (2^-127 is a float32 subnormal)."""
    e = e.to(torch.int32)
    bits = torch.where(e >= -126, (e + fmt.E8M0_BIAS) << 23, torch.full_like(e, 0x00400000))
    return bits.view(torch.float32)


def _split(codes: torch.Tensor) -> torch.Tensor:
    """Natural -> split order inside each 32-block (element 2j+h of a block goes to 16h+j)."""
    r = codes.shape[0]
    return codes.reshape(r, -1, 16, 2).transpose(2, 3).reshape(r, -1)


def _unsplit(codes: torch.Tensor) -> torch.Tensor:
    r = codes.shape[0]
    return codes.reshape(r, -1, 2, 16).transpose(2, 3).reshape(r, -1)


def to_e4m3_reference(t: MXFP4Tensor, tile: int = TILE, order: str = "natural") -> E4M3Operand:
    """Convert a [R, K] MXFP4Tensor (quantized along K) to E4M3 codes + per-`tile` float32 scales."""
    _check_operand(t)
    if tile not in (fmt.BLOCK, TILE):
        raise ValueError(f"tile must be {fmt.BLOCK} or {TILE}, got {tile}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    op = _to_e4m3_natural(t, tile)
    if order == "split":
        op = E4M3Operand(_split(op.codes.view(torch.uint8)).view(torch.float8_e4m3fn).contiguous(), op.scales,
                         op.bad, tile, op.k, "split")
    return op


def _to_e4m3_natural(t: MXFP4Tensor, tile: int) -> E4M3Operand:
    R, K = t.padded_shape
    kp = -(-K // tile) * tile
    codes = t.codes().to(torch.int64)                       # [R, K]
    vals = fmt.e2m1_table(codes.device)[codes]              # E2M1 values, float32
    s = t.scales.to(torch.int32)                            # [R, K/32]
    if kp != K:
        vals = torch.nn.functional.pad(vals, (0, kp - K))
        s = torch.nn.functional.pad(s, (0, (kp - K) // fmt.BLOCK), value=_E8M0_ONE)
    nan_blk = s == fmt.E8M0_NAN
    e = s - fmt.E8M0_BIAS                                   # block exponents [R, Kp/32]
    nb = kp // fmt.BLOCK
    if tile == fmt.BLOCK:
        scale = torch.where(nan_blk, torch.full(e.shape, float("nan"), device=e.device), _pow2(e.clamp(max=127)))
        vals = torch.where(nan_blk.repeat_interleave(fmt.BLOCK, 1) | (vals == 0), torch.zeros_like(vals), vals)
        bad = torch.zeros(-(-K // TILE), dtype=torch.bool, device=e.device)
        return E4M3Operand(vals.to(torch.float8_e4m3fn), scale.t().contiguous(), bad, tile, K)

    per = TILE // fmt.BLOCK
    nt = kp // TILE
    blk_nonzero = (vals.reshape(R, nb, fmt.BLOCK) != 0).any(-1) & ~nan_blk
    e_live = torch.where(blk_nonzero, e, torch.full_like(e, -1000)).reshape(R, nt, per)
    e_max = e_live.amax(-1)                                  # [R, nt]
    e_min = torch.where(blk_nonzero, e, torch.full_like(e, 1000)).reshape(R, nt, per).amin(-1)
    live = e_max > -1000
    e_top = torch.where(live, e_max, torch.zeros_like(e_max))
    bad_rt = live & (e_max - e_min > MAX_TILE_SPAN)          # [R, nt]
    d = (e.reshape(R, nt, per) - e_top.unsqueeze(-1)).clamp(-30, 0)
    folded = vals.reshape(R, nt, per, fmt.BLOCK) * _pow2(d).unsqueeze(-1)
    keep = (~nan_blk.reshape(R, nt, per) & ~bad_rt.unsqueeze(-1)).unsqueeze(-1)
    folded = torch.where(keep & (folded != 0), folded, torch.zeros_like(folded)).reshape(R, kp)
    bad = bad_rt.any(0)
    tile_nan = nan_blk.reshape(R, nt, per).any(-1)
    scale = torch.where(tile_nan, torch.full(e_top.shape, float("nan"), device=e.device), _pow2(e_top))
    return E4M3Operand(folded.reshape(R, kp).to(torch.float8_e4m3fn), scale.t().contiguous(), bad, tile, K)


@dataclass(frozen=True)
class E4M3RowOperand:
    """An MXFP4 operand as FP8 E4M3 codes + one float32 scale per row (the "rows" layout, see
    `to_e4m3_rows_reference`).

    codes [Ro, Kt] float8_e4m3fn (Kt = K rounded up to 128, zero-padded; rows past R zero);
    scales [Ro] float32: 2^E_r · mult (NaN for a row with a NaN block, 0 for a flagged row or a padding row);
    flagged [Ro] bool: rows whose live blocks span more than `MAX_ROW_SPAN` binades (codes zero, scale 0:
    a GEMM on this layout must add those rows' products exactly); k = K.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    flagged: torch.Tensor
    k: int


#: Binades by which an E2M1 value may be raised in E4M3 (6 · 2^6 = 384 <= 448, its largest finite value).
ROW_HEADROOM = 6
#: Largest number of binades a non-zero block may lie below its row's top block for the row fold to be
#: exact: the top block is raised by `ROW_HEADROOM`, the lowest may fall to E4M3's smallest subnormal 2^-9
#: (0.5 · 2^-8), so blocks from e_top - 14 to e_top fit.
MAX_ROW_SPAN = ROW_HEADROOM + MAX_TILE_SPAN
#: Smallest row exponent E_r used (2^E_r stays a normal float32).
_ROW_EXP_MIN = -126


def to_e4m3_rows_reference(t: MXFP4Tensor, mult: float = 1.0, rows_out: int = None) -> E4M3RowOperand:
    """[R, K] MXFP4Tensor (quantized along K) -> E4M3 codes with every block exponent folded in relative to
    one exponent per row, for an FP8 GEMM with per-row (outer-vector) scales.

    E_r = max(e_top - 6, -126) with e_top the largest exponent among the row's live blocks (a non-zero code,
    a finite scale); 0 when there is none. A live block j becomes codes v · 2^(e_j - E_r), exact in E4M3
    while e_j - E_r >= -8; a row with a live block further down is *flagged* (codes zero, scale 0). Blocks
    with the NaN scale are zero codes and make the row's scale NaN (the GEMM's row turns NaN as in the
    reference; such a row is never flagged, and its live blocks below E_r - 8 are zero codes too).
    Scale = float32(2^E_r · mult). Rows R .. rows_out - 1 are zero codes with scale 0.
    The reference twin of the CUDA kernel `cuda_tiles.to_e4m3_rows`, bit for bit.
    """
    _check_operand(t)
    R, K = t.padded_shape
    ro = R if rows_out is None else max(int(rows_out), R)
    kt = -(-K // TILE) * TILE
    codes = t.codes().to(torch.int64)                       # [R, K]
    vals = fmt.e2m1_table(codes.device)[codes]              # E2M1 values, float32
    s = t.scales.to(torch.int32)                            # [R, K/32]
    nb = K // fmt.BLOCK
    nan_blk = s == fmt.E8M0_NAN
    e = s - fmt.E8M0_BIAS
    live = (vals.reshape(R, nb, fmt.BLOCK) != 0).any(-1) & ~nan_blk
    big = torch.full_like(e, 1000)
    e_top = torch.where(live, e, -big).amax(-1, keepdim=True) if nb else torch.full((R, 1), -1000, dtype=torch.int32)
    e_low = torch.where(live, e, big).amin(-1, keepdim=True) if nb else torch.full((R, 1), 1000, dtype=torch.int32)
    has = e_top > -1000
    e_row = torch.where(has, (e_top - ROW_HEADROOM).clamp(min=_ROW_EXP_MIN), torch.zeros_like(e_top))  # [R, 1]
    flagged = (has & (e_low - e_row < -MAX_TILE_SPAN)).squeeze(1)
    row_nan = nan_blk.any(-1) if nb else torch.zeros(R, dtype=torch.bool)
    flagged &= ~row_nan                                     # a NaN row's output is NaN either way
    d = (e - e_row).clamp(-30, ROW_HEADROOM)
    folded = vals.reshape(R, nb, fmt.BLOCK) * _pow2(d).unsqueeze(-1)
    # a block below E_r - 8 is only kept in a NaN row (never flagged): zero codes there, as the kernel writes
    keep = (live & ~flagged.unsqueeze(1) & (e - e_row >= -MAX_TILE_SPAN)).unsqueeze(-1) & (folded != 0)  # +0 zeros
    folded = torch.where(keep, folded, torch.zeros_like(folded)).reshape(R, K)
    scale = (_pow2(e_row.squeeze(1)) * torch.tensor(mult, dtype=torch.float32)).to(torch.float32)
    scale = torch.where(flagged, torch.zeros_like(scale), scale)
    scale = torch.where(row_nan, torch.full_like(scale, float("nan")), scale)
    out = torch.zeros((ro, kt), dtype=torch.float32, device=vals.device)
    out[:R, :K] = folded
    scales = torch.zeros(ro, dtype=torch.float32, device=vals.device)
    scales[:R] = scale
    flags = torch.zeros(ro, dtype=torch.bool, device=vals.device)
    flags[:R] = flagged
    return E4M3RowOperand(out.to(torch.float8_e4m3fn), scales, flags, K)


def e4m3_rows_dequantize(op: E4M3RowOperand) -> torch.Tensor:
    """codes · row scale as float32 [Ro, K] (flagged rows read as zero)."""
    return (op.codes.to(torch.float32) * op.scales.unsqueeze(1))[:, :op.k]


def e4m3_dequantize(op: E4M3Operand) -> torch.Tensor:
    """codes · scale as float32 [R, K], with the flagged slabs of a tile=128 operand read as zero."""
    r = op.codes.shape[0]
    v = op.codes.to(torch.float32).reshape(r, -1, op.tile) * op.scales.t().unsqueeze(-1)
    v = v.reshape(r, -1)
    if op.order == "split":
        v = _unsplit(v)
    bad = op.bad.bool()
    if bad.any():
        v = v.reshape(r, -1, TILE).masked_fill(bad.view(1, -1, 1), 0.0).reshape(r, -1)
    return v[:, :op.k]


def slab_columns(slabs: torch.Tensor, tile: int = TILE) -> torch.Tensor:
    """Element column indices of the K-slabs `slabs` (int64, sorted)."""
    return (slabs.to(torch.int64).unsqueeze(1) * tile + torch.arange(tile, device=slabs.device)).reshape(-1)


def take_slabs(t: MXFP4Tensor, slabs: torch.Tensor, tile: int = TILE) -> MXFP4Tensor:
    """The sub-operand of `t` holding only the K-slabs `slabs` (a 1-d index tensor), in order.

    The last slab may be partial (K not a multiple of the tile); its missing columns are zero codes.
    """
    _check_operand(t)
    R, K = t.padded_shape
    kp = -(-K // tile) * tile
    data, scales = t.data, t.scales
    if kp != K:
        data = torch.nn.functional.pad(data, (0, (kp - K) // 2))
        scales = torch.nn.functional.pad(scales, (0, (kp - K) // fmt.BLOCK), value=_E8M0_ONE)
    per_b, per_s = tile // 2, tile // fmt.BLOCK
    slabs = slabs.to(torch.int64)
    data = data.reshape(R, -1, per_b)[:, slabs].reshape(R, -1)
    scales = scales.reshape(R, -1, per_s)[:, slabs].reshape(R, -1)
    return MXFP4Tensor(data=data.contiguous(), scales=scales.contiguous(), prescale=t.prescale, dim=1,
                       shape=(R, slabs.numel() * tile), rht_block=0, signs=None)


# ------------------------------------------------------------------------------------------------
# Blackwell: swizzled E8M0 scales
# ------------------------------------------------------------------------------------------------

def blackwell_scale_shape(rows: int, k: int):
    """(padded rows, padded scale columns) of the swizzled scale matrix for a [rows, k] operand."""
    if k % fmt.BLOCK:
        raise ValueError(f"K={k} must be a multiple of the MX block {fmt.BLOCK}")
    return -(-rows // 128) * 128, -(-(k // fmt.BLOCK) // 4) * 4


def blackwell_scale_offset(r: int, c: int, padded_cols: int) -> int:
    """Byte offset of scale (r, c) in the swizzled layout (the formula of the module docstring)."""
    block = (r // 128) * (padded_cols // 4) + c // 4
    rr, cc = r % 128, c % 4
    return block * 512 + (rr % 32) * 16 + (rr // 32) * 4 + cc


def blackwell_scale_layout(scales: torch.Tensor) -> torch.Tensor:
    """[R, C] uint8 E8M0 scales -> the flat swizzled uint8 layout (padding holds 2^0)."""
    if scales.dim() != 2 or scales.dtype != torch.uint8:
        raise ValueError(f"scales must be a 2-d uint8 tensor, got {scales.dtype} {tuple(scales.shape)}")
    R, C = scales.shape
    rp, cp = -(-R // 128) * 128, -(-C // 4) * 4
    padded = torch.full((rp, cp), _E8M0_ONE, dtype=torch.uint8, device=scales.device)
    padded[:R, :C] = scales
    # row = rb·128 + g·32 + i, col = cb·4 + j  ->  ((rb, cb) block, i, g, j)
    blocks = padded.reshape(rp // 128, 4, 32, cp // 4, 4).permute(0, 3, 2, 1, 4)
    return blocks.reshape(-1).contiguous()


def blackwell_scale_unlayout(flat: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of `blackwell_scale_layout`: the [rows, cols] scale matrix."""
    rp, cp = -(-rows // 128) * 128, -(-cols // 4) * 4
    if flat.numel() != rp * cp:
        raise ValueError(f"expected {rp * cp} swizzled scales for [{rows}, {cols}], got {flat.numel()}")
    blocks = flat.reshape(rp // 128, cp // 4, 32, 4, 4).permute(0, 3, 2, 1, 4)
    return blocks.reshape(rp, cp)[:rows, :cols]
