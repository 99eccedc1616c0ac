"""Grouped quantize dispatch: many segments (the local experts of an MoE layer) in one kernel launch.

`quantize_mxfp4_grouped(segments, mode, ...)` has the contract of `numerics.grouped.quantize_grouped_reference`
(segment e quantized exactly as on its own, with its own seed, offsets and signs; outputs as views into shared
buffers) and runs

* `cuda`: the grouped kernel of csrc/ (`mxfp4_quantize_grouped.cuh`): one launch per 32 segments (the segment
  table travels in the kernel's parameters, so a captured CUDA graph replays it; seeds and offsets may be
  device scalars as for `quantize_cuda`), bit-identical to the reference and to per-segment `quantize_cuda`
  calls. Float32 input with g = 256 has no dual tile: the row and column copies then take one launch each.
* `reference`: the PyTorch oracle (any device).

`backend="auto"` takes `cuda` for CUDA segments when the extension has the grouped kernel.
"""
from __future__ import annotations

from array import array
from typing import Optional, Sequence

import torch

from ..numerics.grouped import (GROUPED_MODES, allocate_grouped, check_segments, grouped_layout, grouped_tensors,
                                per_segment, quantize_grouped_reference)
from ..numerics.quantize import check_quantize_args, resolve_prescale
from ..numerics.rht import hadamard_scale
from . import cuda_quantize as cq

_MODE_CODES = {"row": cq.ROW, "col": cq.COL, "dual": cq.DUAL}


def supports(x) -> Optional[str]:
    """None when the grouped kernel can quantize segments like `x`, else the reason."""
    reason = cq.supports(x)
    if reason is None and not hasattr(cq._ext, "quantize_grouped"):
        return "the CUDA extension was built without the grouped quantize kernel (rebuild it)"
    return reason


def _i64(v: int) -> int:
    """The int64 bit pattern of an unsigned 64-bit value (the table is int64)."""
    return v - (1 << 64) if v >= 1 << 63 else v


def _ptr(t: Optional[torch.Tensor]) -> int:
    return t.data_ptr() if t is not None else 0


def quantize_grouped_cuda(segments: Sequence[torch.Tensor], mode: str = "dual", rounding: str = "sr",
                          prescale: Optional[float] = None, rht_block: int = 0, seeds=0, offset_row=0, offset_col=0,
                          signs_row=None, signs_col=None, sign_offset_row=None, sign_offset_col=None):
    """`quantize_grouped_reference` in one launch (per 32 segments) of the grouped kernel; same arguments,
    same result form, same bits."""
    segs = check_segments(segments)
    if mode not in GROUPED_MODES:
        raise ValueError(f"grouped quantize mode must be one of {GROUPED_MODES}, got {mode!r}")
    reason = supports(segs[0])
    if reason is not None:
        raise RuntimeError(f"grouped cuda quantizer cannot run: {reason}")
    n, g, dev = len(segs), rht_block, segs[0].device
    p = resolve_prescale(rounding, prescale)
    do_row, do_col = mode != "col", mode != "row"
    seeds_l = per_segment("seeds", seeds, n)
    offs_r, offs_c = per_segment("offset_row", offset_row, n), per_segment("offset_col", offset_col, n)
    sig_r, sig_c = per_segment("signs_row", signs_row, n), per_segment("signs_col", signs_col, n)
    soff_r = per_segment("sign_offset_row", sign_offset_row, n)
    soff_c = per_segment("sign_offset_col", sign_offset_col, n)
    layout = grouped_layout([tuple(s.shape) for s in segs], mode, g)
    bufs = allocate_grouped(layout, dev)
    sz = segs[0].element_size()

    def signs_for(given, on):
        """(float32 signs in, signs out views) per segment: the caller's, or rows of one buffer the kernel fills."""
        if not (g and on):
            return [None] * n, [None] * n
        ins = [None if s is None else s.to(torch.float32).contiguous() for s in given]
        drawn = [i for i, s in enumerate(ins) if s is None]
        out = [None] * n
        if drawn:
            buf = torch.empty(len(drawn), g, dtype=torch.float32, device=dev)
            for j, i in enumerate(drawn):
                out[i] = buf[j]
        return ins, out

    rin, rout = signs_for(sig_r, do_row)
    cin, cout = signs_for(sig_c, do_col)
    for i, x in enumerate(segs):
        if do_row:
            check_quantize_args(x, 1, g, rin[i])
        if do_col:
            check_quantize_args(x, 0, g, cin[i])
    keep = []  # copies and scalar tensors that must live until the launch is queued
    rows = []
    for i, (x, lay) in enumerate(zip(segs, layout.segments)):
        if x.numel() and not cq._row_major(x, sz):
            cq._warn_once("grouped-copy", f"grouped segment of shape {tuple(x.shape)} and strides {x.stride()} is "
                                          "copied to a row-major layout first")
            x = cq._row_major_copy(x, sz)
            keep.append(x)
        seed_p, seed_v = cq._u64("seed", seeds_l[i], dev)
        ro_p, ro_v = cq._u64("offset_row", offs_r[i], dev) if do_row else (0, 0)
        co_p, co_v = cq._u64("offset_col", offs_c[i], dev) if do_col else (0, 0)
        rs_p, rs_v = cq._u64("sign_offset_row", soff_r[i], dev) if soff_r[i] is not None else (ro_p, ro_v)
        cs_p, cs_v = cq._u64("sign_offset_col", soff_c[i], dev) if soff_c[i] is not None else (co_p, co_v)
        x_ptr = x.data_ptr() if x.numel() else 0
        rd = bufs["row_data"][lay.row_data:] if do_row and lay.rows else None
        rsc = bufs["row_scales"][lay.row_scales:] if do_row and lay.rows else None
        cd = bufs["col_data"][lay.col_data:] if do_col and lay.col_k and lay.cols else None
        csc = bufs["col_scales"][lay.col_scales:] if do_col and lay.col_k and lay.cols else None
        rows.append([x_ptr, lay.rows, lay.cols, x.stride(0) if x.numel() else _empty_ld(lay.cols, sz),
                     _ptr(rd), _ptr(rsc), lay.row_k, _ptr(cd), _ptr(csc), lay.col_k,
                     _ptr(rin[i]), _ptr(rout[i]), _ptr(cin[i]), _ptr(cout[i]),
                     seed_p, _i64(seed_v), ro_p, _i64(ro_v), co_p, _i64(co_v), rs_p, _i64(rs_v), cs_p, _i64(cs_v)])
    dcode = cq._DTYPE_CODES[segs[0].dtype]
    hs = hadamard_scale(g) if g else 1.0
    if mode == "dual" and not cq._ext.tile_shape(dcode, g, cq.DUAL)[0]:
        # no fused tile (float32 with g = 256): the row copies, then the column copies
        launches = [(cq.ROW, [_only(r, "row") for r in rows]), (cq.COL, [_only(r, "col") for r in rows])]
    else:
        launches = [(_MODE_CODES[mode], rows)]
    if rounding == "sr":
        cq.check_hw_sr(dev)
    stream = cq.current_stream_handle(dev)
    fields, cap = cq._ext.GROUP_SEGMENT_FIELDS, cq._ext.GROUP_MAX_SEGMENTS
    for code, table in launches:
        for start in range(0, n, cap):
            chunk = table[start:start + cap]
            flat = array("q", [v for r in chunk for v in r])
            assert len(flat) == fields * len(chunk)
            cq.launch_on(dev, cq._ext.quantize_grouped, dcode, g, code, rounding == "sr", flat.buffer_info()[0],
                         len(chunk), p, hs, stream)
    return grouped_tensors(layout, bufs, mode, p, g, [a if a is not None else b for a, b in zip(rin, rout)],
                           [a if a is not None else b for a, b in zip(cin, cout)])


def _empty_ld(cols: int, sz: int) -> int:
    """A valid leading dimension for a segment without elements (>= cols, whole 16-byte chunks)."""
    step = 16 // sz
    return max(step, -(-cols // step) * step)


def _only(r: list, copy: str) -> list:
    """A table row restricted to one copy (the other's outputs, k, signs and offsets zeroed)."""
    r = list(r)
    if copy == "row":
        r[7:10] = [0, 0, 0]
        r[12:14] = [0, 0]
        r[18:20] = [0, 0]
        r[22:24] = [0, 0]
    else:
        r[4:7] = [0, 0, 0]
        r[10:12] = [0, 0]
        r[16:18] = [0, 0]
        r[20:22] = [0, 0]
    return r


def quantize_mxfp4_grouped(segments: Sequence[torch.Tensor], mode: str = "dual", rounding: str = "sr",
                           prescale: Optional[float] = None, rht_block: int = 0, seeds=0, offset_row=0, offset_col=0,
                           signs_row=None, signs_col=None, sign_offset_row=None, sign_offset_col=None,
                           backend: str = "auto"):
    """Quantize every segment x_e [T_e, N_e] as `numerics.grouped.quantize_grouped_reference` defines (see it
    for the arguments and the result: per segment an `MXFP4Tensor`, or a (row, col) pair for mode "dual",
    viewing shared buffers). `backend`: "auto" (the grouped kernel for CUDA segments where built, else the
    reference), "cuda" or "reference"."""
    segs = check_segments(segments)
    kw = dict(mode=mode, rounding=rounding, prescale=prescale, rht_block=rht_block, seeds=seeds,
              offset_row=offset_row, offset_col=offset_col, signs_row=signs_row, signs_col=signs_col,
              sign_offset_row=sign_offset_row, sign_offset_col=sign_offset_col)
    if backend == "auto":
        backend = "cuda" if segs[0].is_cuda and supports(segs[0]) is None else "reference"
    if backend == "cuda":
        return quantize_grouped_cuda(segs, **kw)
    if backend == "reference":
        return quantize_grouped_reference(segs, **kw)
    raise ValueError(f"grouped quantize backend must be 'auto', 'cuda' or 'reference', got {backend!r}")


__all__ = ["quantize_mxfp4_grouped", "quantize_grouped_cuda", "supports"]
