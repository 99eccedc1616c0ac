"""MXFP4 GEMM throughput side by side with BF16 / FP8 cuBLAS and Triton dot_scaled at GPT backward shapes.

Shapes: GPT-1.3B (h=2048) and GPT-6.7B (h=4096), T tokens, ffn = 4h, tensor-parallel shards TP: QKV and
FC1 are column-parallel (out/TP), attention proj and FC2 row-parallel (in/TP). For a layer [in → out]:
dgrad dX = dY·W is (M, N, K) = (T, in, out); wgrad dW = dYᵀ·X is (out, in, T).

Methods (BF16 output unless noted; TFLOP/s = 2MNK / median time, `triton.testing.do_bench`, L2 flushed):
  bf16            torch.mm on BF16 (cuBLAS)
  fp8_tensor      torch._scaled_mm, E4M3, per-tensor scales
  fp8_row         torch._scaled_mm, E4M3, row/column scales
  fp8_1x128       F.scaled_mm, E4M3, 1×128 block scales on both operands (cuBLASLt)
  dot_scaled      our `triton` backend: tl.dot_scaled e2m1 (BF16 upcast on sm_90)
  hopper_gemm     our `hopper` backend's GEMM alone, operands already in the E4M3-tile layout
  hopper          our `hopper` backend end to end from MXFP4Tensors (its default scaling, `hopper_gemm.SCALING`)
  hopper_rows     the native call with one float32 scale per row (row conversion + cuBLASLt outer-vector FP8
                  GEMM + row-fix launch)
  hopper_tiles    the native call with 1×128 tile scales (tile conversions + mask + cuBLASLt 1×128 GEMM + slab fix)
  hopper_acc      as `hopper`, accumulating into an FP32 main_grad (wgrad rows only)
  exact_tiles     our exact Triton kernel (32-K promotion, folded tiles), layout precomputed
  exact_blocks    our exact Triton kernel (plain codes, scale per 32), layout precomputed
  exact           our `hopper_exact` backend end to end
Operands of our methods: BF16 N(0,1) data with outlier columns, RHT (g=64) + RTN with the SR prescale 3/4
(alpha = 16/9 in the epilogue); the FP8/BF16 baselines use random data of the same shapes.

    python bench/gemm.py [--models 1.3b,6.7b] [--tp 1,2,8] [--tokens 8192] [--tune] [--out bench/results/gemm-h200]

`--backward` measures instead, per linear layer, both backward GEMMs *from BF16 tensors* dY [T, out],
X [T, in], W [out, in] (what a backward pass costs around the GEMMs as well):
  bf16            dX = dY·W and dW = dYᵀ·X, two cuBLAS BF16 GEMMs
  fp8_tensor      per-tensor E4M3 casts of dY (both layouts), W and X (amax, scale, cast, transpose copies;
                  PyTorch ops, unfused) + two torch._scaled_mm; fp8_gemms: the two GEMMs alone
  mxfp4           the library's backward: dual RHT + SR quantize of dY, columnwise quantize of W and X,
                  two `hopper` GEMMs (`backward.quantize_grad_output`, `dgrad`, `wgrad`; default recipe)
  mxfp4_rows      as `mxfp4` with the `hopper` GEMM's per-row scaling
  mxfp4_tiles     as `mxfp4` with its 1×128 tile scaling
  mxfp4_quant     the three quantize launches of `mxfp4` alone (their share)
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_mxfp4.numerics.quantize import gemm_alpha, quantize_reference  # noqa: E402

from common import gpu_clocks, write_results  # noqa: E402  (bench/common.py)

MODELS = {"1.3b": 2048, "6.7b": 4096}
METHODS = ["bf16", "fp8_tensor", "fp8_row", "fp8_1x128", "dot_scaled", "hopper_gemm", "hopper", "hopper_rows",
           "hopper_tiles",
           "hopper_acc", "exact_tiles", "exact_blocks", "exact"]


def gemm_shapes(models, tps, tokens):
    for model in models:
        h = MODELS[model]
        for tp in tps:
            layers = {"qkv": (h, 3 * h // tp), "proj": (h // tp, h), "fc1": (h, 4 * h // tp), "fc2": (4 * h // tp, h)}
            for layer, (din, dout) in layers.items():
                yield dict(model=model, tp=tp, layer=layer, gemm="dgrad", M=tokens, N=din, K=dout)
                yield dict(model=model, tp=tp, layer=layer, gemm="wgrad", M=dout, N=din, K=tokens)


def bench_ms(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=40, return_mode="median")


def mx_operand(rows, k, seed, signs):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(rows, k, generator=g, device="cuda", dtype=torch.bfloat16)
    x[:, torch.randint(0, k, (max(k // 512, 1),), generator=g, device="cuda")] *= 64.0
    return quantize_reference(x, rounding="rtn", prescale=0.75, rht_block=64, signs=signs)


def tune(M, N, K, signs, log):
    """Sweep the exact kernel's tile configs at one shape; returns the best per scale block."""
    from megatron_mxfp4.ops import triton_gemm as tg

    a, b = mx_operand(M, K, 1, signs), mx_operand(N, K, 2, signs)
    al = gemm_alpha(a, b)
    cands = {128: [(128, 64, 4, 4, 8), (128, 64, 4, 3, 8), (128, 64, 4, 5, 8), (64, 128, 4, 4, 8), (128, 32, 4, 4, 8),
                   (64, 64, 4, 4, 8), (256, 64, 8, 4, 8)],
             32: [(128, 128, 4, 4, 8)]}
    best = {}
    for sb in (128, 32):
        oa, ob = tg.to_e4m3(a, sb), tg.to_e4m3(b, sb)
        for cfg in cands[sb]:
            try:
                ms = bench_ms(lambda: tg.fp8_scaled_gemm(oa, ob, torch.bfloat16, al, config=cfg))
                tf = 2 * M * N * K / ms / 1e9
            except Exception as e:  # out of resources etc.
                tf = 0.0
                log(f"  tune SB={sb} {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            log(f"  tune SB={sb} BM,BN,warps,stages,group={cfg}: {tf:.0f} TFLOP/s")
            if tf > best.get(sb, (None, 0.0))[1]:
                best[sb] = (cfg, tf)
    for cfg in [(128, 256, 128, 8, 3, 8)]:
        try:
            ms = bench_ms(lambda: tg.dot_scaled_gemm(a, b, torch.bfloat16, config=cfg))
            tf = 2 * M * N * K / ms / 1e9
        except Exception as e:
            tf = 0.0
            log(f"  tune dot_scaled {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
        log(f"  tune dot_scaled BM,BN,BK,warps,stages,group={cfg}: {tf:.0f} TFLOP/s")
        if tf > best.get("dot_scaled", (None, 0.0))[1]:
            best["dot_scaled"] = (cfg, tf)
    return best


def run_shape(s, methods, signs, seed):
    import torch.nn.functional as F
    from torch.nn.functional import ScalingType

    from megatron_mxfp4.ops import triton_gemm as tg
    from megatron_mxfp4.ops.hopper_gemm import _native_gemm, exact_gemm, hopper_gemm, tile_operands

    M, N, K = s["M"], s["N"], s["K"]
    flop = 2.0 * M * N * K
    res = {}
    abf = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    bbf = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    a8, b8 = abf.to(torch.float8_e4m3fn), bbf.to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")
    sa_row, sb_row = torch.rand(M, 1, device="cuda") + 0.5, torch.rand(1, N, device="cuda") + 0.5
    sa_blk = (torch.rand(M, K // 128, device="cuda") + 0.5).t().contiguous().t()
    sb_blk = (torch.rand(N, K // 128, device="cuda") + 0.5).t().contiguous().t()
    qa, qb = mx_operand(M, K, seed, signs), mx_operand(N, K, seed + 1, signs)
    al = gemm_alpha(qa, qb)
    oa, ob, bad = tile_operands(qa, qb, al)
    oa_e, ob_e, _ = tile_operands(qa, qb)
    oa32, ob32 = tg.to_e4m3(qa, 32), tg.to_e4m3(qb, 32)
    nbad = int(bad.sum())
    main = torch.zeros(M, N, device="cuda")
    bw = ScalingType.BlockWise1x128
    fns = {
        "bf16": lambda: torch.mm(abf, bbf.t()),
        "fp8_tensor": lambda: torch._scaled_mm(a8, b8.t(), one, one, out_dtype=torch.bfloat16),
        "fp8_row": lambda: torch._scaled_mm(a8, b8.t(), sa_row, sb_row, out_dtype=torch.bfloat16),
        "fp8_1x128": lambda: F.scaled_mm(a8, b8.t(), sa_blk, bw, sb_blk, bw, output_dtype=torch.bfloat16),
        "dot_scaled": lambda: tg.dot_scaled_gemm(qa, qb, torch.bfloat16),
        "hopper_gemm": lambda: F.scaled_mm(oa.codes, ob.codes.t(), oa.scales.t(), bw, ob.scales.t(), bw,
                                           output_dtype=torch.bfloat16),
        "hopper": lambda: hopper_gemm(qa, qb, torch.bfloat16),
        "hopper_rows": lambda: _native_gemm(qa, qb, torch.bfloat16, al, None, scaling="rows"),
        "hopper_tiles": lambda: _native_gemm(qa, qb, torch.bfloat16, al, None, scaling="tiles"),
        "hopper_acc": lambda: hopper_gemm(qa, qb, torch.float32, accumulate_into=main),
        "exact_tiles": lambda: tg.fp8_scaled_gemm(oa_e, ob_e, torch.bfloat16, al),
        "exact_blocks": lambda: tg.fp8_scaled_gemm(oa32, ob32, torch.bfloat16, al),
        "exact": lambda: exact_gemm(qa, qb, torch.bfloat16),
    }
    for m in methods:
        if m == "hopper_acc" and s["gemm"] != "wgrad":
            continue
        try:
            res[m] = flop / bench_ms(fns[m]) / 1e9
        except Exception as e:
            res[m] = None
            print(f"  {m} failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)
    # correctness at this shape: our outputs vs the float32 product of the same MXFP4 values
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = (qa.dequantize(unscaled=True) @ qb.dequantize(unscaled=True).t()).double() * al
    err = {}
    for name, fn in (("hopper", lambda: hopper_gemm(qa, qb)), ("exact", lambda: exact_gemm(qa, qb)),
                     ("hopper_rows", lambda: _native_gemm(qa, qb, torch.float32, al, None, scaling="rows")),
                     ("hopper_tiles", lambda: _native_gemm(qa, qb, torch.float32, al, None, scaling="tiles")),
                     ("dot_scaled", lambda: tg.dot_scaled_gemm(qa, qb))):
        if name in methods or name == "hopper":
            c = fn()
            err[name] = ((c.double() - ref).norm() / ref.norm()).item()
    conv_ms = bench_ms(lambda: tile_operands(qa, qb, al))
    conv_nat_ms = bench_ms(lambda: (tg.to_e4m3(qa, 128, order="natural"), tg.to_e4m3(qb, 128, order="natural")))
    del ref
    return res, err, nbad, dict(tile_operands=conv_ms, natural_order_kernels=conv_nat_ms)


def backward_rows(models, tokens, log):
    """Both backward GEMMs from BF16 tensors per linear layer of each model (see the module docstring)."""
    from megatron_mxfp4 import MXFP4Recipe
    from megatron_mxfp4 import backward as bwd
    from megatron_mxfp4.numerics.fp8 import quantize_fp8
    from megatron_mxfp4.ops import hopper_gemm as hg

    recipe = MXFP4Recipe()
    rows = []
    for model in models:
        h = MODELS[model]
        for layer, (din, dout) in {"qkv": (h, 3 * h), "proj": (h, h), "fc1": (h, 4 * h), "fc2": (4 * h, h)}.items():
            g = torch.Generator(device="cuda").manual_seed(din + dout)
            dy = torch.randn(tokens, dout, generator=g, device="cuda").to(torch.bfloat16)
            x = torch.randn(tokens, din, generator=g, device="cuda").to(torch.bfloat16)
            w = torch.randn(dout, din, generator=g, device="cuda").to(torch.bfloat16) * 0.02
            key = bwd.StreamKey(seed=7, layer=1, call=0)

            def fp8():
                qd, sd = quantize_fp8(dy)
                qw, sw = quantize_fp8(w)
                qx, sx = quantize_fp8(x)
                dx = torch._scaled_mm(qd, qw.t().contiguous().t(), sd, sw, out_dtype=torch.bfloat16)
                dw = torch._scaled_mm(qd.t().contiguous(), qx.t().contiguous().t(), sd, sx, out_dtype=torch.bfloat16)
                return dx, dw

            def quant():
                qd = bwd.quantize_grad_output(dy, recipe, key)
                bwd._quantize(w.t(), recipe, key, bwd.Gemm.DGRAD, bwd.Operand.WEIGHT, qd[0].signs)
                bwd._quantize(x.t(), recipe, key, bwd.Gemm.WGRAD, bwd.Operand.INPUT, qd[1].signs)

            def mxfp4():
                qd, qw = bwd.grad_output_operands(dy, recipe, key)
                return (bwd.dgrad(dy, w, recipe, key, qdy=qd, out_dtype=torch.bfloat16),
                        bwd.wgrad(dy, x, recipe, key, qdy=qw, out_dtype=torch.bfloat16))

            def scaled(scaling):
                def run():
                    before, hg.SCALING = hg.SCALING, scaling
                    try:
                        return mxfp4()
                    finally:
                        hg.SCALING = before
                return run

            (qd, sd), (qw, sw), (qx, sx) = quantize_fp8(dy), quantize_fp8(w), quantize_fp8(x)
            qwt, qdt, qxt = qw.t().contiguous().t(), qd.t().contiguous(), qx.t().contiguous().t()

            def fp8_gemms():  # operands cast beforehand: the two GEMMs alone
                return (torch._scaled_mm(qd, qwt, sd, sw, out_dtype=torch.bfloat16),
                        torch._scaled_mm(qdt, qxt, sd, sx, out_dtype=torch.bfloat16))

            fns = {"bf16": lambda: (dy @ w, dy.t() @ x), "fp8_tensor": fp8, "fp8_gemms": fp8_gemms, "mxfp4": mxfp4,
                   "mxfp4_rows": scaled("rows"), "mxfp4_tiles": scaled("tiles"), "mxfp4_quant": quant}
            ms = {name: bench_ms(fn) for name, fn in fns.items()}
            flop = 2 * 2.0 * tokens * din * dout
            row = dict(model=model, layer=layer, T=tokens, din=din, dout=dout, ms=ms,
                       speedup_vs_bf16={k: ms["bf16"] / v for k, v in ms.items() if k != "mxfp4_quant"},
                       quant_share=ms["mxfp4_quant"] / ms["mxfp4"], tflops_bf16=flop / ms["bf16"] / 1e9)
            rows.append(row)
            log(f"{model} {layer} [{tokens}x{din}->{dout}] " + " ".join(f"{k}={v:.3f}ms" for k, v in ms.items())
                + f"  mxfp4 {ms['bf16'] / ms['mxfp4']:.2f}x bf16, fp8 {ms['bf16'] / ms['fp8_tensor']:.2f}x bf16")
            fns.clear()  # the closures hold this layer's tensors
            torch.cuda.empty_cache()
    return rows


def backward_markdown(rows, cmd, dev, clocks) -> str:
    md = [f"# Both backward GEMMs from BF16 tensors on {dev}", "", f"`{cmd}` — {time.strftime('%Y-%m-%d')}, "
          f"torch {torch.__version__}; SM clock / max / power after the run: {clocks}.", "",
          "Median ms (`triton.testing.do_bench`, L2 flushed) of dX = dY·W plus dW = dYᵀ·X per linear layer, "
          "quantizers included (see `bench/gemm.py --help`). Speed-up = BF16 time / time.", "",
          "MXFP4 = the library's default; rows / tiles = the same backward with the `hopper` GEMM's per-row or "
          "1×128-tile scaling.", "",
          "| model | layer | T, in → out | BF16 ms | FP8 tensorwise ms (GEMMs alone) | MXFP4 ms (quantize share) | "
          "MXFP4 rows ms | MXFP4 tiles ms | MXFP4 × BF16 | rows × BF16 | tiles × BF16 | FP8 × BF16 (GEMMs alone) |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["ms"]
        md.append(f"| {r['model']} | {r['layer']} | {r['T']}, {r['din']} → {r['dout']} | {m['bf16']:.3f} | "
                  f"{m['fp8_tensor']:.3f} ({m['fp8_gemms']:.3f}) | {m['mxfp4']:.3f} ({100 * r['quant_share']:.0f}%) | "
                  f"{m['mxfp4_rows']:.3f} | {m['mxfp4_tiles']:.3f} | {r['speedup_vs_bf16']['mxfp4']:.2f} | "
                  f"{r['speedup_vs_bf16']['mxfp4_rows']:.2f} | {r['speedup_vs_bf16']['mxfp4_tiles']:.2f} | "
                  f"{r['speedup_vs_bf16']['fp8_tensor']:.2f} "
                  f"({r['speedup_vs_bf16']['fp8_gemms']:.2f}) |")
    return "\n".join(md) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backward", action="store_true",
                    help="both backward GEMMs from BF16 tensors per layer, quantizers included (module docstring)")
    ap.add_argument("--models", default="1.3b,6.7b")
    ap.add_argument("--tp", default="1,2,8")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--tune", action="store_true", help="sweep the exact kernel's configs first and use the best")
    ap.add_argument("--out", default=None, help="path stem: writes STEM.json and STEM.md")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/gemm.py needs a CUDA GPU")
    import triton

    from megatron_mxfp4.ops import triton_gemm as tg

    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    if args.backward:
        rows = backward_rows(args.models.split(","), args.tokens, log)
        cmd = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
        text = backward_markdown(rows, cmd, torch.cuda.get_device_name(), gpu_clocks())
        print(text)
        if args.out:
            write_results(args.out, dict(command=cmd, device=torch.cuda.get_device_name(), rows=rows), text)
        return
    methods = args.methods.split(",")
    signs = torch.where(torch.rand(64, device="cuda") < 0.5, -1.0, 1.0)
    tuned = None
    if args.tune:
        log("Exact-kernel config sweep at (M, N, K) = (8192, 4096, 16384):")
        best = tune(8192, 4096, 16384, signs, log)
        tuned = {str(k): v for k, v in best.items()}
        for sb in (32, 128):
            if sb in best:
                tg.FP8_GEMM_CONFIGS[sb] = best[sb][0]
        if "dot_scaled" in best:
            tg.DOT_SCALED_CONFIG = best["dot_scaled"][0]
    seen = {}
    rows = []
    for i, s in enumerate(gemm_shapes(args.models.split(","), [int(t) for t in args.tp.split(",")], args.tokens)):
        key = (s["M"], s["N"], s["K"])
        if key not in seen:
            seen[key] = run_shape(s, methods, signs, seed=10 + 2 * i)
            torch.cuda.empty_cache()
        res, err, nbad, conv_ms = seen[key]
        row = dict(s, tflops=res, rel_err_vs_fp32=err, bad_slabs=nbad, conversion_ms=conv_ms)
        rows.append(row)
        tf = " ".join(f"{m}={res[m]:.0f}" if res.get(m) else f"{m}=-" for m in methods if m in res)
        print(f"{s['model']} tp{s['tp']} {s['layer']} {s['gemm']} {key}: {tf} err={err}", flush=True)
    dev = torch.cuda.get_device_name()
    cmd = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    clocks = gpu_clocks()
    head = ["| model | TP | layer | GEMM | M, N, K |"] + [f" {m} |" for m in methods] + \
           [" hopper / bf16 | hopper / fp8_tensor | exact / bf16 | err hopper | err exact |"]
    table = ["".join(head), "|" + "---|" * (5 + len(methods) + 5)]
    for r in rows:
        t = r["tflops"]
        cells = [f" {t[m]:.0f} |" if t.get(m) else " – |" for m in methods]
        ratio = lambda x, y: f"{t[x] / t[y]:.2f}" if t.get(x) and t.get(y) else "–"  # noqa: E731
        e = r["rel_err_vs_fp32"]
        table.append(f"| {r['model']} | {r['tp']} | {r['layer']} | {r['gemm']} | {r['M']}, {r['N']}, {r['K']} |"
                     + "".join(cells) + f" {ratio('hopper', 'bf16')} | {ratio('hopper', 'fp8_tensor')} | "
                     f"{ratio('exact', 'bf16')} | {e.get('hopper', float('nan')):.1e} | {e.get('exact', float('nan')):.1e} |")

    def geo(m, model):
        vals = [r["tflops"][m] / r["tflops"]["bf16"] for r in rows
                if r["model"] == model and r["tflops"].get(m) and r["tflops"].get("bf16")]
        return (torch.tensor(vals).log().mean().exp().item() if vals else float("nan")), len(vals)

    summary = {}
    for model in args.models.split(","):
        summary[model] = {m: geo(m, model)[0] for m in methods if m != "bf16"}
    md = [f"# MXFP4 GEMM vs BF16 / FP8 on {dev}", "",
          f"`{cmd}` — {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, triton {triton.__version__}, "
          f"CUDA {torch.version.cuda}; SM clock / max / power after the run: {clocks}.", "",
          "TFLOP/s (2MNK / median time; BF16 output; L2 flushed between runs). Error columns: ‖C − C_fp32‖/‖C_fp32‖ "
          "against the float32 (no TF32) product of the same MXFP4 operands.", ""] + table + \
        ["", "Geometric mean of throughput / BF16 over each model's shapes:", ""] + \
        [f"- {model}: " + ", ".join(f"{m} {v:.2f}×" for m, v in s.items()) for model, s in summary.items()]
    if tuned:
        md += ["", "Exact-kernel config sweep (best per scale block; BM, BN, warps, stages, group):", ""] + \
              [f"- {k}: {v[0]} → {v[1]:.0f} TFLOP/s" for k, v in tuned.items()] + ["", "```"] + lines + ["```"]
    text = "\n".join(md) + "\n"
    print(text)
    if args.out:
        configs = {"fp8_gemm": {str(k): v for k, v in tg.FP8_GEMM_CONFIGS.items()}, "dot_scaled": tg.DOT_SCALED_CONFIG}
        write_results(args.out, dict(command=cmd, device=dev, torch=torch.__version__, triton=triton.__version__,
                                     cuda=torch.version.cuda, clocks=clocks, methods=methods, configs=configs,
                                     tuning=tuned, summary_vs_bf16=summary, rows=rows), text)


if __name__ == "__main__":
    main()
