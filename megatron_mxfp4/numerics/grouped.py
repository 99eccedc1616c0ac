"""Grouped MXFP4 quantize (reference): the quantizers of many segments — the local experts of an MoE layer —
as one operation, with the outputs in shared buffers.

Definition (the contract every grouped backend is tested against, bit for bit): segment e is a 2-d tensor
x_e [T_e, N_e] (any T_e, 0 included; typically the `torch.split` row slices of one permuted token buffer),
quantized exactly as it would be on its own, with its own key and offsets:

* row copy (mode "row", "dual"):  `quantize_reference(x_e, -1, rounding, prescale, g, signs_row_e, seed_e,
  offset_row_e)` — along N_e (the dgrad operand dY_e); logical index t * Kr_e + n, Kr_e = N_e padded;
* col copy (mode "col", "dual"):  `quantize_reference(x_e.t(), -1, rounding, prescale, g, signs_col_e, seed_e,
  offset_col_e)` — the MXFP4 tensor of x_eᵀ [N_e, T_e] along T_e (the wgrad operands dY_eᵀ, X_eᵀ); each segment
  is zero-padded to its own Kc_e = T_e padded to max(32, g), and its logical index n * Kc_e + t restarts at 0.

So the Philox index restarts in every segment and the key is the segment's (`streams.expert_seed`): the grouped
result is bit-identical to what each expert's own quantizer computes. Signs: given per segment (or one tensor for
all), or drawn from the sign stream at (seed_e, sign_offset_e), by default the copy's own offset (what a single
quantizer draws); `sign_offset_*` lets a grouped launch draw the signs that another operand's quantizer of the
same GEMM will draw (per_call policy: the dY operand's offset).

Outputs live in flat uint8 buffers, one per (copy, data/scales), segment after segment (`grouped_layout`); each
segment's `MXFP4Tensor` holds contiguous views into them, so per-expert GEMMs consume them without copies. With
equal N_e the row copies of all segments are exactly the rows of one [ΣT_e, Kr/2] matrix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch

from . import format as fmt
from .quantize import MXFP4Tensor, check_quantize_args, padded_size, quantize_reference, resolve_prescale
from .rht import draw_signs

GROUPED_MODES = ("row", "col", "dual")
ROW_COPY, COL_COPY = "row", "col"


@dataclass(frozen=True)
class SegmentLayout:
    """Where one segment's copies live in the shared buffers (byte offsets) and their padded lengths.
    `row_k` / `col_k` = 0 where the mode writes no such copy."""

    rows: int
    cols: int
    row_k: int
    row_data: int
    row_scales: int
    col_k: int
    col_data: int
    col_scales: int


@dataclass(frozen=True)
class GroupedLayout:
    """`segments[e]` per segment; totals = sizes of the four flat buffers in bytes."""

    segments: Tuple[SegmentLayout, ...]
    row_data_bytes: int
    row_scales_bytes: int
    col_data_bytes: int
    col_scales_bytes: int


def grouped_layout(shapes: Sequence[Tuple[int, int]], mode: str, rht_block: int) -> GroupedLayout:
    """The shared-buffer layout for segments of `shapes` [(T_e, N_e)] under `mode`: row copy of segment e
    (data [T_e, Kr_e/2], scales [T_e, Kr_e/32], Kr_e = padded N_e) and col copy (data [N_e, Kc_e/2], scales
    [N_e, Kc_e/32], Kc_e = padded T_e), each placed after segment e - 1's in its buffer at the next multiple
    of `SEGMENT_ALIGN` bytes (the gaps are never read)."""
    if mode not in GROUPED_MODES:
        raise ValueError(f"grouped quantize mode must be one of {GROUPED_MODES}, got {mode!r}")
    row, col = mode in ("row", "dual"), mode in ("col", "dual")
    segs = []
    rd = rs = cd = cs = 0
    for t, n in shapes:
        t, n = int(t), int(n)
        rk = padded_size(n, rht_block) if row else 0
        ck = padded_size(t, rht_block) if col else 0
        segs.append(SegmentLayout(t, n, rk, rd, rs, ck, cd, cs))
        if row:
            rd += _aligned(t * rk // 2)
            rs += _aligned(t * rk // fmt.BLOCK)
        if col:
            cd += _aligned(n * ck // 2)
            cs += _aligned(n * ck // fmt.BLOCK)
    return GroupedLayout(tuple(segs), rd, rs, cd, cs)


#: Every segment's block starts at a multiple of this many bytes in its buffer (as a GEMM's operands are
#: aligned; packed rows are whole multiples of 16 bytes already, so the row data stays one matrix).
SEGMENT_ALIGN = 16


def _aligned(nbytes: int) -> int:
    return -(-nbytes // SEGMENT_ALIGN) * SEGMENT_ALIGN


def per_segment(name: str, value, n: int) -> list:
    """`value` for each of n segments: a sequence of n entries, or one value shared by all (a tensor of
    more than one element counts as one value: RHT signs)."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name}: {len(value)} entries for {n} segments")
        return list(value)
    return [value] * n


def check_segments(segments: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """The segments as a list of 2-d float tensors on one device (any row count, 0 included)."""
    segs = list(segments)
    if not segs:
        raise ValueError("grouped quantize needs at least one segment")
    dev, dt = segs[0].device, segs[0].dtype
    for i, s in enumerate(segs):
        if not isinstance(s, torch.Tensor) or s.dim() != 2:
            raise ValueError(f"segment {i} must be a 2-d tensor, got {getattr(s, 'shape', type(s).__name__)}")
        if s.device != dev or s.dtype != dt:
            raise ValueError(f"segment {i} is {s.dtype} on {s.device}; segment 0 is {dt} on {dev}")
    return segs


def segment_views(buffer: torch.Tensor, offset: int, rows: int, row_bytes: int) -> torch.Tensor:
    """A contiguous [rows, row_bytes] view of the flat uint8 `buffer` at byte `offset`."""
    return buffer[offset: offset + rows * row_bytes].view(rows, row_bytes)


def allocate_grouped(layout: GroupedLayout, device) -> dict:
    """The four flat uint8 buffers of a layout (uninitialized: every byte is written by the quantizer)."""
    def buf(n):
        return torch.empty(n, dtype=torch.uint8, device=device)

    return {"row_data": buf(layout.row_data_bytes), "row_scales": buf(layout.row_scales_bytes),
            "col_data": buf(layout.col_data_bytes), "col_scales": buf(layout.col_scales_bytes)}


def grouped_tensors(layout: GroupedLayout, buffers: dict, mode: str, prescale: float, rht_block: int,
                    signs_row: Sequence[Optional[torch.Tensor]], signs_col: Sequence[Optional[torch.Tensor]]):
    """Per-segment `MXFP4Tensor`s viewing `buffers` (see `quantize_grouped_reference` for the result's form)."""
    out = []
    for i, s in enumerate(layout.segments):
        row = col = None
        if s.row_k:
            row = MXFP4Tensor(
                data=segment_views(buffers["row_data"], s.row_data, s.rows, s.row_k // 2),
                scales=segment_views(buffers["row_scales"], s.row_scales, s.rows, s.row_k // fmt.BLOCK),
                prescale=prescale, dim=1, shape=(s.rows, s.cols), rht_block=rht_block, signs=signs_row[i])
        if mode in ("col", "dual"):
            col = MXFP4Tensor(
                data=segment_views(buffers["col_data"], s.col_data, s.cols, s.col_k // 2),
                scales=segment_views(buffers["col_scales"], s.col_scales, s.cols, s.col_k // fmt.BLOCK),
                prescale=prescale, dim=1, shape=(s.cols, s.rows), rht_block=rht_block, signs=signs_col[i])
        out.append(row if mode == "row" else col if mode == "col" else (row, col))
    return out


SeedLike = Union[int, torch.Tensor]


def quantize_grouped_reference(
    segments: Sequence[torch.Tensor],
    mode: str = "dual",
    rounding: str = "sr",
    prescale: Optional[float] = None,
    rht_block: int = 0,
    seeds: Union[SeedLike, Sequence[SeedLike]] = 0,
    offset_row: Union[SeedLike, Sequence[SeedLike]] = 0,
    offset_col: Union[SeedLike, Sequence[SeedLike]] = 0,
    signs_row=None,
    signs_col=None,
    sign_offset_row=None,
    sign_offset_col=None,
):
    """Quantize every segment x_e [T_e, N_e] (float32/bfloat16/float16, one device) as the module docstring
    defines: per segment its own seed (`seeds`: one per segment, or one for all), offsets (`offset_row`,
    `offset_col`: one per segment or one for all), signs (`signs_row`/`signs_col`: None = drawn, a float32
    [g] tensor for all, or a per-segment sequence with None entries drawn) drawn at `sign_offset_*` (default:
    the copy's offset). Seeds and offsets may be ints or one-element int64 tensors holding the bits of the
    unsigned value.

    Returns one entry per segment: mode "row" an `MXFP4Tensor` of x_e along dim 1 (shape (T_e, N_e)); "col"
    the `MXFP4Tensor` of x_eᵀ along dim 1 (shape (N_e, T_e)); "dual" the pair (row, col). Their `data` and
    `scales` are contiguous views into flat shared buffers laid out by `grouped_layout`.
    """
    segs = check_segments(segments)
    n = len(segs)
    layout = grouped_layout([tuple(s.shape) for s in segs], mode, rht_block)
    p = resolve_prescale(rounding, prescale)
    g = rht_block
    seeds_l = per_segment("seeds", seeds, n)
    offs = {ROW_COPY: per_segment("offset_row", offset_row, n), COL_COPY: per_segment("offset_col", offset_col, n)}
    given = {ROW_COPY: per_segment("signs_row", signs_row, n), COL_COPY: per_segment("signs_col", signs_col, n)}
    sign_offs = {ROW_COPY: per_segment("sign_offset_row", sign_offset_row, n),
                 COL_COPY: per_segment("sign_offset_col", sign_offset_col, n)}
    buffers = allocate_grouped(layout, segs[0].device)
    used = {ROW_COPY: [None] * n, COL_COPY: [None] * n}
    copies = [c for c, on in ((ROW_COPY, mode != "col"), (COL_COPY, mode != "row")) if on]
    for i, (x, lay) in enumerate(zip(segs, layout.segments)):
        seed = _u64(seeds_l[i])
        for copy in copies:
            xc = x if copy == ROW_COPY else x.t()
            check_quantize_args(xc, -1, g, given[copy][i])
            off = _u64(offs[copy][i])
            signs = given[copy][i]
            if g and signs is None:
                so = sign_offs[copy][i]
                signs = draw_signs(g, seed, off if so is None else _u64(so), x.device)
            q = quantize_reference(xc, -1, rounding, p, g, signs, seed, off)
            used[copy][i] = q.signs
            k, start = (lay.row_k, lay.row_data) if copy == ROW_COPY else (lay.col_k, lay.col_data)
            s_start = lay.row_scales if copy == ROW_COPY else lay.col_scales
            buffers[f"{copy}_data"][start: start + q.data.numel()] = q.data.reshape(-1)
            buffers[f"{copy}_scales"][s_start: s_start + q.scales.numel()] = q.scales.reshape(-1)
            assert q.data.shape[-1] * 2 == k
    return grouped_tensors(layout, buffers, mode, p, g, used[ROW_COPY], used[COL_COPY])


def _u64(v) -> int:
    if isinstance(v, torch.Tensor):
        return int(v.item()) & ((1 << 64) - 1)
    v = int(v)
    if not 0 <= v < 1 << 64:
        raise ValueError(f"seeds and offsets must be unsigned 64-bit integers, got {v}")
    return v


__all__ = ["GROUPED_MODES", "GroupedLayout", "SegmentLayout", "grouped_layout", "quantize_grouped_reference",
           "allocate_grouped", "grouped_tensors", "per_segment", "check_segments"]
