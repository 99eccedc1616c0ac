"""Experiment: the dual MXFP4 quantize with the Hadamard transform on tensor cores (Triton), against the CUDA kernel.

The CUDA quantizer spends ~7 of its ~40 instructions per element and copy on float32 butterflies and pays a
shared-memory load per element for its column copy (bench/results/ncu-quantize-h200.md). DESIGN §2.3 (v2)
lets the transform run on tensor cores: BF16 × ±1 products are exact, float32 accumulation is exact wherever
the exact result is representable (a g-block spanning ≤ 16 − log2 g binades) and faithful elsewhere. This
prototype asks whether that pays on this GPU before the CUDA kernel is redesigned around it:

* one program reads a [B, B] BF16 tile once (B = max(g, 64)) and multiplies it by the block-diagonal
  diag(s)·H_g on both sides with `tl.dot` (row copy: X·(diag(s)H), column copy: (H diag(s))·X, transposed);
* then amax per 32, E8M0, RTN or the contract's SR (one Philox4x32-10 call per 16 elements, the 8-bit rule
  computed in integers), nibble packing — the layouts of `quantize_dual_reference`, bit for bit where the
  transform is exact.

    python bench/tc_rht.py                    # H200: check + time against the CUDA kernel and the copy
    TRITON_INTERPRET=1 python bench/tc_rht.py --check --shape 200x96   # CPU: bit-exact check only

Not a library backend: BF16 input, dual mode, signs given, g ∈ {32, 64, 128}. On the CPU (Triton's interpreter,
whose BF16 `tl.dot` is unusable) the products run in float32 with `input_precision="ieee"`, so the check there
covers everything but the tensor-core accumulation; on the GPU the check reports exact-regime bit equality and,
for Gaussian data, the share of codes that differ from the butterflies (DESIGN §2.3: ≤ 1e-4, one grid step).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from megatron_mxfp4.numerics.quantize import padded_size, resolve_prescale  # noqa: E402
from megatron_mxfp4.numerics.rht import draw_signs, hadamard_scale  # noqa: E402
from megatron_mxfp4.ops.dispatch import quantize_dual_reference  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (the stream of numerics/philox.py) on uint32 tensors of one shape."""
    m0 = tl.full(c0.shape, 0xD2511F53, tl.uint32)
    m1 = tl.full(c0.shape, 0xCD9E8D57, tl.uint32)
    w0 = tl.full(c0.shape, 0x9E3779B9, tl.uint32)
    w1 = tl.full(c0.shape, 0xBB67AE85, tl.uint32)
    for _ in tl.static_range(10):
        lo0 = c0 * m0
        hi0 = tl.umulhi(c0, m0)
        lo1 = c2 * m1
        hi1 = tl.umulhi(c2, m1)
        n0 = hi1 ^ c1 ^ k0
        n2 = hi0 ^ c3 ^ k1
        c0, c1, c2, c3 = n0, lo1, n2, lo0
        k0 = k0 + w0
        k1 = k1 + w1
    return c0, c1, c2, c3


@triton.jit
def _quantize_store(y, row_idx, row_ok, col0, K, data_ptr, scales_ptr, seed_lo, seed_hi, off_lo, off_hi, prescale,
                    R: tl.constexpr, B: tl.constexpr, SR: tl.constexpr):
    """y [R, B] float32, quantized along its B columns (positions col0 .. col0 + B of rows `row_idx`)."""
    a = tl.abs(y)
    y3 = tl.reshape(a, (R, B // 32, 32))
    amax = tl.max(y3, axis=2)
    bad = tl.max(tl.where(y3 != y3, 1, tl.where(y3 == float("inf"), 1, 0)), axis=2) > 0
    sbyte = tl.maximum(amax.to(tl.uint32, bitcast=True) >> 23, 2) - 2            # e + 127
    mul = ((254 - sbyte) << 23).to(tl.uint32).to(tl.float32, bitcast=True) * prescale  # 2^-e p, exact
    v = tl.reshape(tl.reshape(y, (R, B // 32, 32)) * mul[:, :, None], (R, B))
    xb = v.to(tl.uint32, bitcast=True)
    xc = tl.minimum(tl.maximum(xb & 0x7F800000, 127 << 23), 129 << 23)
    if SR:
        # the dither byte of element i = row * K + col: byte i % 4 of word (i / 4) % 4 of call i / 16
        blk = (row_idx[:, None].to(tl.int64) * K + col0 + 16 * tl.arange(0, B // 16)[None, :]) >> 4
        zero = tl.zeros((R, B // 16), dtype=tl.uint32)
        c0 = (blk & 0xFFFFFFFF).to(tl.uint32)
        c1 = (blk >> 32).to(tl.uint32)                                             # domain 0 (dither)
        w0, w1, w2, w3 = _philox(c0, c1, zero + off_lo.to(tl.uint32), zero + off_hi.to(tl.uint32),
                                 zero + seed_lo.to(tl.uint32), zero + seed_hi.to(tl.uint32))
        words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (R, B // 16, 4))
        shifts = (8 * tl.arange(0, 4)).to(tl.uint32)
        r = tl.reshape((words[:, :, :, None] >> shifts[None, None, None, :]) & 0xFF, (R, B))
        # W = floor(512 g(|v|)), g the piecewise-linear map of the grid onto 0..7; up iff floor(512 f) >= 2r + 1
        s = ((264 << 23) - xc).to(tl.uint32).to(tl.float32, bitcast=True)          # 2^(137 - xc)
        w = (tl.abs(v) * s).to(tl.int32) + (xc >> 13).to(tl.int32) - (127 << 10)   # < 2048: exact, truncated
        mag = tl.minimum((w + 511 - 2 * r.to(tl.int32)) >> 9, 7)
    else:
        s = ((255 << 23) - xc).to(tl.uint32).to(tl.float32, bitcast=True)          # 2^(128 - xc)
        n = ((tl.abs(v) * s + 8388608.0) - 8388608.0).to(tl.int32)                 # rint, ties to even
        mag = tl.minimum(n + (xc >> 22).to(tl.int32) - 254, 7)
    code = (mag.to(tl.uint32) | ((xb >> 28) & 8))
    code = tl.reshape(tl.where(tl.reshape(bad, (R, B // 32, 1)), 0, tl.reshape(code, (R, B // 32, 32))), (R, B))
    lo, hi = tl.split(tl.reshape(code, (R, B // 2, 2)))
    packed = (lo | (hi << 4)).to(tl.uint8)
    cols2 = col0 // 2 + tl.arange(0, B // 2)  # a tile may reach past K (padded to g < B): those columns are cut
    tl.store(data_ptr + row_idx[:, None].to(tl.int64) * (K // 2) + cols2[None, :], packed,
             mask=row_ok[:, None] & (cols2[None, :] < K // 2))
    sb = tl.where(bad, 255, sbyte).to(tl.uint8)
    cols32 = col0 // 32 + tl.arange(0, B // 32)
    tl.store(scales_ptr + row_idx[:, None].to(tl.int64) * (K // 32) + cols32[None, :], sb,
             mask=row_ok[:, None] & (cols32[None, :] < K // 32))


@triton.jit
def _dual_kernel(x_ptr, T, N, ld, srow_ptr, scol_ptr, rdata, rscales, row_k, cdata, cscales, col_k,
                 seed_lo, seed_hi, orow_lo, orow_hi, ocol_lo, ocol_hi, prescale, hscale,
                 G: tl.constexpr, B: tl.constexpr, SR: tl.constexpr, EXACT: tl.constexpr):
    r0 = tl.program_id(0) * B
    c0 = tl.program_id(1) * B
    rows = r0 + tl.arange(0, B)
    cols = c0 + tl.arange(0, B)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * ld + cols[None, :],
                mask=(rows[:, None] < T) & (cols[None, :] < N), other=0.0)
    i = tl.arange(0, B)
    same = (i[:, None] // G) == (i[None, :] // G)
    p = i[:, None] & i[None, :] & (G - 1)
    p = p ^ (p >> 4)
    p = p ^ (p >> 2)
    p = p ^ (p >> 1)
    h = tl.where(same, 1.0 - 2.0 * (p & 1).to(tl.float32), 0.0)                # block-diagonal Sylvester H_g
    srow = tl.load(srow_ptr + i % G)
    scol = tl.load(scol_ptr + i % G)
    b_row = srow[:, None] * h                                                     # diag(s) H
    a_col = h * scol[None, :]                                                     # H diag(s)
    if EXACT:
        xf = x.to(tl.float32)
        y_row = tl.dot(xf, b_row, input_precision="ieee")
        y_col = tl.dot(a_col, xf, input_precision="ieee")
    else:
        y_row = tl.dot(x, b_row.to(tl.bfloat16), out_dtype=tl.float32)
        y_col = tl.dot(a_col.to(tl.bfloat16), x, out_dtype=tl.float32)
    y_row = y_row * hscale
    y_col = tl.trans(y_col) * hscale                                              # [cols, rows]
    _quantize_store(y_row, rows, rows < T, c0, row_k, rdata, rscales, seed_lo, seed_hi, orow_lo, orow_hi,
                    prescale, B, B, SR)
    _quantize_store(y_col, cols, cols < N, r0, col_k, cdata, cscales, seed_lo, seed_hi, ocol_lo, ocol_hi,
                    prescale, B, B, SR)


def tc_dual(x: torch.Tensor, rounding: str, g: int, signs_row, signs_col, seed: int, offset_row: int,
            offset_col: int, exact: bool = INTERPRET):
    """(row data, row scales, col data, col scales) with the layouts of `quantize_dual_reference`."""
    assert x.dtype == torch.bfloat16 and x.dim() == 2 and x.stride(1) == 1 and g in (32, 64, 128)
    t, n = x.shape
    b = max(g, 64)
    rk, ck = padded_size(n, b), padded_size(t, b)  # tiles of b; the reference pads to g (a multiple of it)
    rk_ref, ck_ref = padded_size(n, g), padded_size(t, g)
    dev = x.device
    rd = torch.empty(t, rk_ref // 2, dtype=torch.uint8, device=dev)
    rs = torch.empty(t, rk_ref // 32, dtype=torch.uint8, device=dev)
    cd = torch.empty(n, ck_ref // 2, dtype=torch.uint8, device=dev)
    cs = torch.empty(n, ck_ref // 32, dtype=torch.uint8, device=dev)
    p = resolve_prescale(rounding, None)
    grid = (ck // b, rk // b)
    # K (the dither index's row length and the outputs' width) is the reference's padded length (to g)
    _dual_kernel[grid](x, t, n, x.stride(0), signs_row.float().contiguous(), signs_col.float().contiguous(),
                       rd, rs, rk_ref, cd, cs, ck_ref, seed & 0xFFFFFFFF, seed >> 32, offset_row & 0xFFFFFFFF,
                       offset_row >> 32, offset_col & 0xFFFFFFFF, offset_col >> 32, p, hadamard_scale(g),
                       G=g, B=b, SR=rounding == "sr", EXACT=exact, enable_fp_fusion=False)
    return rd, rs, cd, cs


def exact_regime(t: int, n: int, g: int, device, seed: int = 0) -> torch.Tensor:
    """BF16 values whose g-blocks span ≤ 16 − log2 g binades (there, every float32 partial sum is exact)."""
    gen = torch.Generator().manual_seed(seed)
    span = 16 - g.bit_length() + 1
    mant = 1 + torch.randint(0, 128, (t, n), generator=gen) / 128
    e = torch.randint(-span // 2, span - span // 2, (t, n), generator=gen)
    sign = torch.where(torch.rand(t, n, generator=gen) < 0.5, -1.0, 1.0)
    x = sign * mant * torch.exp2(e.float())
    x[torch.rand(t, n, generator=gen) < 0.05] = 0.0
    return x.to(torch.bfloat16).to(device)


def check(shape, g: int, rounding: str, device, gaussian: bool = False) -> dict:
    t, n = shape
    x = (torch.randn(t, n, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).to(device) if gaussian
         else exact_regime(t, n, g, device))
    s1, s2 = draw_signs(g, 5, 11, device), draw_signs(g, 5, 12, device)
    got = tc_dual(x, rounding, g, s1, s2, seed=0x1234_5678_9ABC, offset_row=3 << 40, offset_col=7)
    row, col = quantize_dual_reference(x, rounding, None, g, s1, s2, 0x1234_5678_9ABC, 3 << 40, 7)
    want = (row.data, row.scales, col.data, col.scales)
    differ = sum(int((a != b).sum()) for a, b in zip(got, want))
    total = sum(a.numel() for a in want)
    return dict(shape=shape, g=g, rounding=rounding, data="gaussian" if gaussian else "exact regime",
                bytes_differ=differ, bytes=total)


def timing(g: int, rounding: str):
    from common import graph_time  # bench/common.py
    from megatron_mxfp4.ops import quantize_mxfp4_dual

    t, n = 8192, 16384
    xs = [torch.randn(t, n, device="cuda").to(torch.bfloat16) for _ in range(2)]
    s1, s2 = draw_signs(g, 1, 2, "cuda"), draw_signs(g, 1, 3, "cuda")
    k = {"i": 0}

    def nxt():
        k["i"] ^= 1
        return xs[k["i"]]
    tc = graph_time(lambda: tc_dual(nxt(), rounding, g, s1, s2, 7, 1, 2, exact=False))
    cu = graph_time(lambda: quantize_mxfp4_dual(nxt(), rounding=rounding, rht_block=g, signs_row=s1, signs_col=s2,
                                                seed=7, offset_row=1, offset_col=2, backend="cuda"))
    buf = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    out = torch.empty_like(buf)
    cp = graph_time(lambda: out.copy_(buf))
    floor_ms = (t * n * (2 + 2 * 0.53125)) / (2 * buf.numel() / (cp * 1e-3)) * 1e3
    return dict(g=g, rounding=rounding, tc_us=tc * 1e3, cuda_us=cu * 1e3, floor_us=floor_ms * 1e3)


def _sass(cubin: str) -> dict:
    """{kernel name: [SASS instruction, ...]} of a cubin/object (cuobjdump from PATH or Triton's wheel)."""
    import re
    import shutil
    import subprocess

    tool = shutil.which("cuobjdump") or os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                                     "cuobjdump")
    out = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    funcs, cur = {}, None
    for line in out.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(2).strip()))
    return funcs


def _loop_body(instrs) -> int:
    """Instructions of the longest loop (from a backward branch's target to the branch): the per-tile body of a
    persistent kernel; the whole function when it has no loop."""
    import re

    where = {a: i for i, (a, _) in enumerate(instrs)}
    best = len(instrs)
    spans = []
    for i, (a, ins) in enumerate(instrs):
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", ins)
        if m and int(m.group(1), 16) < a and int(m.group(1), 16) in where:
            spans.append(i - where[int(m.group(1), 16)] + 1)
    return max(spans) if spans else best


def _cvt_rs_lines(root: str, tmp: str) -> str:
    """sm_100a: the butterfly dual kernel (BF16, g = 64, SR, 3/4 prescale) with the software rule and with
    Blackwell's cvt.rs under a feed without and with the bias (csrc/mxfp4_cvt_rs.cuh), each path fixed in a copy of
    the sources (the kernel picks one per launch)."""
    import re
    import shutil
    import subprocess

    edits = {"software rule": [("mxfp4_cvt_rs.cuh", "#define MXFP4_HAS_CVT_RS 1", "#define MXFP4_HAS_CVT_RS 0")],
             "cvt.rs, feed without bias": [("mxfp4_quantize_kernel.cuh", "if (SR && (hw_sr & kHwSrOn)) {", "if (SR) {"),
                                           ("mxfp4_cvt_rs.cuh", "if (!(feed & kHwSrBias)) return v;", "return v;")],
             "cvt.rs, feed with bias": [("mxfp4_quantize_kernel.cuh", "if (SR && (hw_sr & kHwSrOn)) {", "if (SR) {"),
                                        ("mxfp4_cvt_rs.cuh", "if (!(feed & kHwSrBias)) return v;", "")]}
    out = ["", "sm_100a, the butterfly kernel at g = 64, SR, prescale 3/4 (Blackwell's stochastic conversion; "
           "not run on hardware):", "", "| SR path | instructions per element and copy |", "|---|---|"]
    for name, subs in edits.items():
        src_dir = os.path.join(tmp, "csrc_" + re.sub(r"\W+", "_", name))
        shutil.copytree(os.path.join(root, "csrc"), src_dir)
        for fname, old, new in subs + [("mxfp4_quantize_kernel.cuh", "prescale <= 0.75f", "true")]:
            path = os.path.join(src_dir, fname)
            with open(path) as f:
                text = f.read()
            assert old in text, (name, fname, old)
            with open(path, "w") as f:
                f.write(text.replace(old, new))
        obj = os.path.join(src_dir, "dual.o")
        subprocess.run(["nvcc", "-O3", "-std=c++17", "-w", "-I" + src_dir, "-gencode=arch=compute_100a,code=sm_100a",
                        "-c", os.path.join(src_dir, "mxfp4_quantize_bf16_dual.cu"), "-o", obj], check=True)
        for fn, instrs in _sass(obj).items():
            dm = subprocess.run(["c++filt", fn], capture_output=True, text=True).stdout
            if "quantize_kernel<__nv_bfloat16, 64, 3, true>" in dm:
                out.append(f"| {name} | {_loop_body(instrs) / 128:.1f} |")
    return "\n".join(out) + "\n"


def sass_table(gs, out_md=None) -> str:
    """SASS instructions per element and copy (sm_90a) that one unit of work executes: the Triton prototype's
    whole program (straight-line: one [B, B] tile, both copies, 128 threads), and the per-tile loop body of the
    CUDA kernels (csrc/, built here with nvcc): the butterfly dual kernel (64 x 256 tile, 256 threads) and, at
    g = 64, the tensor-core dual kernel (mxfp4_quantize_tc.cu, 64 x 64 tile, 128 threads). These kernels are
    instruction-bound, so this is the count that bounds their speed; loads, stores and tensor-core work are one
    instruction each (the Triton prototype has one SR encoder for every prescale). g = 32 is left out: there the butterfly kernel's inner loops run twice per tile, which a
    static count of the tile loop does not see."""
    import re
    import subprocess
    import tempfile

    gs = [g for g in gs if g >= 64]

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import shutil

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tmp = tempfile.mkdtemp()
    cuda = {}
    # The SR kernels pick their encoder per launch (`prescale <= 0.75f`: the recipe's 3/4 prescale, or not); a
    # static count of a loop holding both would add them up, so each is counted from a copy of the sources with
    # that choice fixed.
    for prescaled in (True, False):
        src_dir = os.path.join(tmp, f"csrc_{prescaled}")
        shutil.copytree(os.path.join(root, "csrc"), src_dir)
        for name in ("mxfp4_quantize_kernel.cuh", "mxfp4_quantize_tc.cu"):
            path = os.path.join(src_dir, name)
            with open(path) as f:
                text = f.read()
            assert "prescale <= 0.75f" in text, name
            with open(path, "w") as f:
                f.write(text.replace("prescale <= 0.75f", "true" if prescaled else "false"))
        for src, pat, elems in (("mxfp4_quantize_bf16_dual.cu",
                                 r"quantize_kernel<__nv_bfloat16, (\d+), 3, (true|false)>", None),
                                ("mxfp4_quantize_tc.cu", r"quantize_dual_tc_kernel<(true|false)>", 2 * 64 * 64 / 128)):
            obj = os.path.join(tmp, f"{src}.{prescaled}.o")
            subprocess.run(["nvcc", "-O3", "-std=c++17", "-w", "-I" + src_dir, "-gencode=arch=compute_90a,code=sm_90a",
                            "-c", os.path.join(src_dir, src), "-o", obj], check=True)
            for name, instrs in _sass(obj).items():
                dm = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout
                m = re.search(pat, dm)
                if not m:
                    continue
                sr = m.group(m.lastindex) == "true"
                arm = "sr 3/4" if sr and prescaled else ("sr 1" if sr else "rtn")
                if elems is None:  # butterflies: 64 x 256 tile, 256 threads: 64 elements of each copy per thread
                    cuda[("bf", int(m.group(1)), arm)] = _loop_body(instrs) / 128
                else:
                    cuda[("tc", 64, arm)] = _loop_body(instrs) / elems
    params = list(_dual_kernel.fn.__code__.co_varnames[:_dual_kernel.fn.__code__.co_argcount])
    types = dict(x_ptr="*bf16", T="i32", N="i32", ld="i32", srow_ptr="*fp32", scol_ptr="*fp32", rdata="*u8",
                 rscales="*u8", row_k="i32", cdata="*u8", cscales="*u8", col_k="i32", seed_lo="i64", seed_hi="i64",
                 orow_lo="i64", orow_hi="i64", ocol_lo="i64", ocol_hi="i64", prescale="fp32", hscale="fp32")
    lines = ["| g | rounding | CUDA butterflies | CUDA tensor cores | Triton tensor cores (prototype) |",
             "|---|---|---|---|---|"]
    for g in gs:
        for arm in ("sr 3/4", "sr 1", "rtn"):
            sr = arm != "rtn"
            const = dict(G=g, B=max(g, 64), SR=sr, EXACT=False)
            sig = {p: ("constexpr" if p in const else types[p]) for p in params}
            src = ASTSource(fn=_dual_kernel, signature=sig, constexprs={(params.index(k),): v for k, v in const.items()})
            cc = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, enable_fp_fusion=False))
            cub = os.path.join(tmp, f"tc_{g}_{sr}.cubin")
            with open(cub, "wb") as f:
                f.write(cc.asm["cubin"])
            b = max(g, 64)
            per_triton = sum(len(v) for v in _sass(cub).values()) * 128 / (2 * b * b)
            tc = cuda.get(("tc", g, arm))
            rounding = {"sr 3/4": "SR, prescale 3/4 (the recipe)", "sr 1": "SR, prescale 1", "rtn": "RTN"}[arm]
            lines.append(f"| {g} | {rounding} | {cuda[('bf', g, arm)]:.1f} | "
                         f"{'' if tc is None else f'{tc:.1f}'} | {per_triton:.1f} |")
    text = "\n".join(lines) + "\n" + _cvt_rs_lines(root, tmp)
    if out_md:
        with open(out_md, "w") as f:
            f.write("# The dual quantizer's instructions per element and copy (static SASS, sm_90a)\n\n"
                    f"Command: `python bench/tc_rht.py --sass --g {','.join(map(str, gs))} --out {out_md}` "
                    "(no GPU needed: Triton compiles for sm_90 offline, nvcc for sm_90a)  \n"
                    f"triton {triton.__version__}; BF16 input, both copies. {' '.join(sass_table.__doc__.split())}"
                    "\n\n" + text)
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only the bit-exactness check")
    ap.add_argument("--sass", action="store_true", help="only the static SASS comparison (no GPU needed)")
    ap.add_argument("--out", default=None, help="with --sass: write the table there (markdown)")
    ap.add_argument("--shape", default="300x200", help="check shape TxN")
    ap.add_argument("--g", default="32,64,128")
    args = ap.parse_args()
    if args.sass:
        print(sass_table([int(v) for v in args.g.split(",")], args.out), end="")
        return
    device = "cpu" if INTERPRET else "cuda"
    shape = tuple(int(v) for v in args.shape.split("x"))
    gs = [int(v) for v in args.g.split(",")]
    ok = True
    for g in gs:
        for rounding in ("sr", "rtn"):
            for gaussian in ((False,) if INTERPRET else (False, True)):
                r = check(shape, g, rounding, device, gaussian)
                exact = r["data"] == "exact regime"
                ok &= (r["bytes_differ"] == 0) if exact else True
                print(f"check {r['shape'][0]}x{r['shape'][1]} g={g:<3} {rounding:<3} {r['data']:<12} "
                      f"{r['bytes_differ']} of {r['bytes']} bytes differ from the reference", flush=True)
    if not ok:
        raise SystemExit("tc_rht: the exact-regime check failed")
    if args.check or INTERPRET:
        return
    print(f"device {torch.cuda.get_device_name()}; [8192, 16384] BF16 dual quantize, CUDA-graph replays")
    print("| g | rounding | tensor-core RHT (Triton) µs | CUDA kernel µs | byte floor µs | TC % of floor | CUDA % |")
    print("|---|---|---|---|---|---|---|")
    for g in gs:
        for rounding in ("sr", "rtn"):
            r = timing(g, rounding)
            print(f"| {g} | {rounding} | {r['tc_us']:.1f} | {r['cuda_us']:.1f} | {r['floor_us']:.1f} | "
                  f"{100 * r['floor_us'] / r['tc_us']:.1f} | {100 * r['floor_us'] / r['cuda_us']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
