"""A small quantize workload for compute-sanitizer (tests/gpu/run.sh): every kernel mode, partial
tiles, padded rows, zero-padded edges, drawn signs, device seed/offset, and the E4M3-tile conversion (partial tiles and
row groups, a flagged slab), the E4M3-row conversion and the native Hopper GEMM in both scalings (flagged rows
and slabs, shapes staged for cuBLASLt). Exits non-zero on any mismatch."""
import torch

from megatron_mxfp4.numerics.quantize import quantize_reference
from megatron_mxfp4.ops import quantize_mxfp4, quantize_mxfp4_dual
from megatron_mxfp4.ops.dispatch import quantize_dual_reference


def same(a, b):
    return torch.equal(a.data, b.data) and torch.equal(a.scales, b.scales)


def main():
    torch.manual_seed(0)
    ok = True
    seed_t = torch.tensor([12345], dtype=torch.int64, device="cuda")
    for dtype in (torch.bfloat16, torch.float32):
        for g in (0, 64, 256):
            k = max(g, 32)
            x = torch.randn(72, 2 * k + (32 if g < 64 else 0) + k, device="cuda").to(dtype)
            kw = dict(rounding="sr", rht_block=g, seed=12345, offset=7)
            ok &= same(quantize_mxfp4(x, -1, backend="cuda", **dict(kw, seed=seed_t)), quantize_reference(x, -1, **kw))
            base = torch.randn(3 * k, 36, device="cuda").to(dtype)  # 36 bf16 columns: padded rows
            ok &= same(quantize_mxfp4(base.t(), -1, backend="cuda", **kw), quantize_reference(base.t(), -1, **kw))
            xd = torch.randn(2 * k, 3 * k, device="cuda").to(dtype)
            dkw = dict(rounding="sr", rht_block=g, seed=3, offset_row=1, offset_col=2)
            r, c = quantize_mxfp4_dual(xd, backend="cuda", **dkw)
            rr, rc = quantize_dual_reference(xd, **dkw)
            ok &= same(r, rr) and same(c, rc)
            xo = torch.randn(33, 100, device="cuda").to(dtype)  # zero-padded edges (DESIGN §3)
            r, c = quantize_mxfp4_dual(xo, backend="cuda", **dkw)
            rr, rc = quantize_dual_reference(xo, **dkw)
            ok &= same(r, rr) and same(c, rc)
            ok &= same(quantize_mxfp4(xo, 0, backend="cuda", **kw), quantize_reference(xo, 0, **kw))
    from megatron_mxfp4.ops import cuda_tiles, layouts

    for rows, k in ((37, 96), (5, 4160)):
        x = torch.randn(rows, k, device="cuda")
        x[1, :32] *= 2.0 ** -20  # row 1, slab 0 spans > 8 binades: flagged
        a = quantize_reference(x, -1, rounding="sr", seed=1)
        oa, ob, bad = cuda_tiles.tile_operands(a, a)
        ref = layouts.to_e4m3_reference(a, 128)
        ok &= torch.equal(ob.codes.view(torch.uint8), ref.codes.view(torch.uint8)) and bool(bad[0]) == bool(ref.bad[0])
    for rows, k in ((37, 96), (5, 4160)):
        x = torch.randn(rows, k, device="cuda")
        x[1, :32] *= 2.0 ** -20  # row 1 spans > 14 binades: flagged
        a = quantize_reference(x, -1, rounding="sr", seed=1)
        got, listed = cuda_tiles.to_e4m3_rows(a, rows_out=rows + 3)
        ref = layouts.to_e4m3_rows_reference(a, rows_out=rows + 3)
        ok &= torch.equal(got.codes.view(torch.uint8), ref.codes.view(torch.uint8)) and listed.tolist() == [1]
    from megatron_mxfp4.ops import hopper_gemm as hg

    if torch.cuda.get_device_capability() == (9, 0) and hg.native_reason() is None:
        for m, n, k in ((37, 21, 96), (64, 48, 4160)):
            x, y = torch.randn(m, k, device="cuda"), torch.randn(n, k, device="cuda")
            x[1, :32] *= 2.0 ** -20
            y[2, 32:64] *= 2.0 ** -20
            a, b = quantize_reference(x, -1, seed=1), quantize_reference(y, -1, seed=2)
            ref = a.dequantize(unscaled=True).double() @ b.dequantize(unscaled=True).double().t()
            for scaling in ("rows", "tiles"):
                c = hg._native_gemm(a, b, torch.float32, 1.0, None, scaling=scaling)
                ok &= ((c.double() - ref).norm() / ref.norm()).item() < 5e-4
    torch.cuda.synchronize()
    print("sanitize workload:", "ok" if ok else "MISMATCH")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
