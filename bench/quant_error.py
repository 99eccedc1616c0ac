"""Quantization error of RTN / SR / RHT+RTN / RHT+SR on a gradient with outlier columns.

For a [256, 4096] gradient quantized along its 4096 columns: the relative error of a single draw,
and ‖mean of N draws − x‖ / ‖x‖ (bias: shrinks like 1/sqrt(N) only for unbiased rounding).
RHT errors are measured in the original basis (each draw rotated back with its own signs).

    python bench/quant_error.py [--draws 256] [--out bench/results/quant_error-cpu.md]
"""
import argparse
import json
import platform
import sys
import time

import torch

from megatron_mxfp4 import quantize_mxfp4
from megatron_mxfp4.numerics.rht import draw_signs, invert_rht


def outlier_gradient(rows=256, cols=4096, n_outlier_cols=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * 1e-3
    cols_idx = torch.randperm(cols, generator=g)[:n_outlier_cols]
    x[:, cols_idx] *= 50.0
    return x.to(torch.bfloat16).float()


def estimate(x, rounding, rht, draw):
    signs = draw_signs(rht, 1, 2 * draw + 1) if rht else None
    q = quantize_mxfp4(x, rounding=rounding, rht_block=rht, signs=signs, seed=1, offset=2 * draw)
    d = q.dequantize()
    return invert_rht(d, signs) if rht else d


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=256)
    ap.add_argument("--rht-block", type=int, default=64)
    ap.add_argument("--out", default=None, help="write the markdown table and JSON here")
    args = ap.parse_args(argv)
    x = outlier_gradient()
    norm = x.norm().item()
    rows = []
    t0 = time.time()
    for name, rounding, rht in (("RTN", "rtn", 0), ("SR", "sr", 0), (f"RHT{args.rht_block}+RTN", "rtn", args.rht_block),
                                (f"RHT{args.rht_block}+SR", "sr", args.rht_block)):
        single = (estimate(x, rounding, rht, 0) - x).norm().item() / norm
        stochastic = rounding == "sr" or rht
        n = args.draws if stochastic else 1
        acc = torch.zeros_like(x, dtype=torch.float64)
        for i in range(n):
            acc += estimate(x, rounding, rht, i).double()
        bias = (acc / n - x.double()).norm().item() / norm
        rows.append(dict(method=name, single_draw_rel_err=single, draws=n, mean_rel_err=bias,
                         expected_if_unbiased=single / n**0.5))
    cmd = "python " + " ".join(sys.argv)
    lines = [
        f"Gradient [256, 4096] (N(0, 1e-6), 16 outlier columns ×50), quantized along dim 1; {args.draws} draws.",
        "", "| method | rel. error, one draw | ‖mean of draws − x‖/‖x‖ | draws | one-draw / √draws |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['single_draw_rel_err']:.4f} | {r['mean_rel_err']:.4f} | {r['draws']} | "
                     f"{r['expected_if_unbiased']:.4f} |")
    table = "\n".join(lines)
    print(table)
    print(f"({time.time() - t0:.1f} s)")
    if args.out:
        device = f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}"
        with open(args.out, "w") as f:
            f.write(f"# Quantization error on an outlier gradient\n\nCommand: `{cmd}`\n\nDevice: {device}\n\n{table}\n")
        with open(args.out.rsplit(".", 1)[0] + ".json", "w") as f:
            json.dump(dict(command=cmd, device=device, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
