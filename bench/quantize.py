"""MXFP4 quantize throughput on one GPU: copy bandwidth, the PyTorch reference (eager and under
torch.compile) and the compiled kernels (rowwise, columnwise, dual) for g = 0/32/64/128/256, SR and
RTN, on GPT-6.7B backward shapes (T = 8192 tokens; out = 4096, 12288, 16384) and their transposes.

Effective bandwidth counts the bytes a kernel must move: the input read once (2 B per BF16 element)
plus every output written (0.5 B codes + 1/32 B scales per element and copy). Kernel times are
medians of CUDA-graph replays (10 launches per graph), so Python overhead is not included.

    python bench/quantize.py [--quick] [--out bench/results/quantize-h200.json] [--md ...]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_mxfp4.numerics.quantize import quantize_reference  # noqa: E402
from megatron_mxfp4.numerics.rht import draw_signs  # noqa: E402
from megatron_mxfp4.ops import quantize_mxfp4, quantize_mxfp4_dual  # noqa: E402
from megatron_mxfp4.ops import cuda_quantize, cvt_rs  # noqa: E402

from common import events_median, graph_time  # noqa: E402,F401  (bench/common.py)

SHAPES = [(8192, 4096), (8192, 12288), (8192, 16384), (4096, 8192), (12288, 8192), (16384, 8192)]
GS = (0, 32, 64, 128, 256)


def copy_bandwidth() -> float:
    """Device-to-device copy of 4 GiB (read + write), eager launches timed with events (as in the
    device baseline notes; inside a CUDA graph the copy becomes a slower copy-engine memcpy node)."""
    x = torch.randint(0, 255, (4 << 30,), dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    ms = events_median(lambda: y.copy_(x), 10)
    x = y = None
    torch.cuda.empty_cache()
    return 2 * (4 << 30) / (ms * 1e-3) / 1e12


def graph_copy_bandwidth() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = graph_time(lambda: y.copy_(x), reps=5)
    return 2 * x.numel() / (ms * 1e-3) / 1e12


def effective_bytes(numel: int, copies: int, elem: int = 2) -> float:
    return numel * elem + copies * numel * (0.5 + 1 / 32)


def bench_kernels(shapes, gs, roundings, modes, copy_tbs, rows):
    for (t, n) in shapes:
        # several inputs in rotation when one would nearly fit in the 60 MB L2
        nbuf = 1 if t * n * 2 >= 256 << 20 else 4
        xs = [torch.randn(t, n, device="cuda").to(torch.bfloat16) for _ in range(nbuf)]
        for g in gs:
            s1 = draw_signs(g, 1, 2, "cuda") if g else None
            s2 = draw_signs(g, 1, 3, "cuda") if g else None
            for rounding_arm in roundings:
                # "sr-soft": SR with the software rule where the cvt.rs self-test allowed the instruction
                rounding = "sr" if rounding_arm == "sr-soft" else rounding_arm
                for mode in modes:
                    if mode == "dual-tc" and g != 64:  # the tensor-core transform kernel exists for g = 64
                        continue
                    state = {"i": 0}

                    def nxt():
                        state["i"] = (state["i"] + 1) % nbuf
                        return xs[state["i"]]

                    if mode == "rowwise":
                        fn = lambda: quantize_mxfp4(nxt(), -1, rounding=rounding, rht_block=g, signs=s1, seed=7,  # noqa: E731
                                                    offset=1, backend="cuda")
                        copies = 1
                    elif mode == "columnwise":
                        fn = lambda: quantize_mxfp4(nxt().t(), -1, rounding=rounding, rht_block=g, signs=s2,  # noqa: E731
                                                    seed=7, offset=2, backend="cuda")
                        copies = 1
                    else:  # dual, dual-tc
                        fn = lambda: quantize_mxfp4_dual(nxt(), rounding=rounding, rht_block=g, signs_row=s1,  # noqa: E731
                                                         signs_col=s2, seed=7, offset_row=1, offset_col=2,
                                                         backend="cuda")
                        copies = 2
                    dev = torch.cuda.current_device()
                    feed = cuda_quantize._ext.hw_sr_feed(dev)
                    if rounding_arm == "sr-soft":  # a captured graph keeps the feed it was captured with
                        cuda_quantize._ext.set_hw_sr_feed(dev, 0)
                    cuda_quantize.TC_DUAL = mode == "dual-tc"  # read when the graph is captured
                    try:
                        ms = graph_time(fn, reps=10 if nbuf == 1 else 8)
                    finally:
                        cuda_quantize._ext.set_hw_sr_feed(dev, feed)
                        cuda_quantize.TC_DUAL = False
                    tbs = effective_bytes(t * n, copies) / (ms * 1e-3) / 1e12
                    row = dict(shape=[t, n], mode=mode, g=g, rounding=rounding_arm, ms=round(ms, 5),
                               tb_s=round(tbs, 4), frac_copy=round(tbs / copy_tbs, 4))
                    rows.append(row)
                    print(f"{t:>6}x{n:<6} {mode:<10} g={g:<3} {rounding_arm:<3} {ms * 1e3:9.1f} us  "
                          f"{tbs:6.3f} TB/s  {100 * tbs / copy_tbs:5.1f}% of copy", flush=True)
        xs.clear()
        torch.cuda.empty_cache()


def bench_reference(copy_tbs, rows, compile_too: bool, eager: bool = True):
    t, n = 8192, 16384
    x = torch.randn(t, n, device="cuda").to(torch.bfloat16)
    s = draw_signs(64, 1, 2, "cuda")

    def eager_fn():
        return quantize_reference(x, -1, rounding="sr", rht_block=64, signs=s, seed=7, offset=1)

    variants = [("reference eager", eager_fn)] if eager else []
    if compile_too:
        compiled = torch.compile(quantize_reference, dynamic=False)
        variants.append(("reference torch.compile",
                         lambda: compiled(x, -1, rounding="sr", rht_block=64, signs=s, seed=7, offset=1)))
    for name, fn in variants:
        t0 = time.time()
        try:
            fn()
            torch.cuda.synchronize()
            warm = time.time() - t0
            ms = events_median(fn, 5)
        except Exception as e:  # report, do not abort the kernel numbers
            print(f"{name}: failed ({type(e).__name__}: {str(e)[:200]})")
            rows.append(dict(shape=[t, n], mode=f"rowwise ({name})", g=64, rounding="sr", error=str(e)[:500]))
            continue
        tbs = effective_bytes(t * n, 1) / (ms * 1e-3) / 1e12
        rows.append(dict(shape=[t, n], mode=f"rowwise ({name})", g=64, rounding="sr", ms=round(ms, 4),
                         tb_s=round(tbs, 4), frac_copy=round(tbs / copy_tbs, 4), first_call_s=round(warm, 1)))
        print(f"{t:>6}x{n:<6} {name:<24} g=64 sr {ms * 1e3:9.1f} us  {tbs:6.3f} TB/s  "
              f"{100 * tbs / copy_tbs:5.1f}% of copy (first call {warm:.1f} s)", flush=True)


def markdown(result) -> str:
    lines = [f"# MXFP4 quantize kernels on {result['device']}", "",
             f"Command: `{result['command']}`  ", f"torch {result['torch']}, copy bandwidth "
             f"{result['copy_tb_s']:.3f} TB/s (read + write of a 4 GiB buffer, median of eager copies).",
             f"SR rounding: {result.get('sr_rule', 'the software rule')}"
             + (" (sr-soft rows: the software rule)." if result.get("sr_rule", "the software rule") != "the software rule"
                else "."), "",
             "Effective TB/s = (2 B read + 0.53 B written per element and copy) / time.", "",
             "| shape [T, N] | mode | g | rounding | µs | TB/s | % of copy |", "|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        if "note" in r:
            lines.append(f"\n{r['note']}: {r['tb_s']:.3f} TB/s")
            continue
        if "ms" not in r:
            lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['mode']} | {r['g']} | {r['rounding']} | "
                         f"failed | | |")
            continue
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['mode']} | {r['g']} | {r['rounding']} | "
                     f"{r['ms'] * 1e3:.1f} | {r['tb_s']:.3f} | {100 * r['frac_copy']:.1f} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="only [8192, 16384] (every g)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile reference")
    ap.add_argument("--out", default="bench/results/quantize-h200.json")
    ap.add_argument("--md", default=None, help="markdown table (default: --out with .md)")
    ap.add_argument("--compile-only", action="store_true",
                    help="only the torch.compile reference, appended to an existing --out file")
    ap.add_argument("--profile-one", action="store_true",
                    help="run the dual g=64 SR kernel on [8192, 16384] 4 times (for a profiler) and exit")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/quantize.py needs a CUDA device")
    if not cuda_quantize.is_available():
        raise SystemExit(f"bench/quantize.py: {cuda_quantize._LOAD_ERROR}")
    torch.manual_seed(0)
    if args.profile_one:
        x = torch.randn(8192, 16384, device="cuda").to(torch.bfloat16)
        s = draw_signs(64, 1, 2, "cuda")
        for _ in range(4):
            quantize_mxfp4_dual(x, rounding="sr", rht_block=64, signs_row=s, signs_col=s, seed=7, offset_row=1,
                                offset_col=2, backend="cuda")
        torch.cuda.synchronize()
        return
    if args.compile_only:
        with open(args.out) as f:
            result = json.load(f)
        bench_reference(result["copy_tb_s"], result["results"], compile_too=True, eager=False)
        result["command"] += " ; python " + " ".join(sys.argv)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        with open(args.md or os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(markdown(result))
        return
    copy_tbs = copy_bandwidth()
    # the first SR quantize runs the cvt.rs self-test (Blackwell); its verdict decides the SR arms
    quantize_mxfp4(torch.randn(64, 64, device="cuda"), -1, rounding="sr", backend="cuda")
    sr_rule = cvt_rs.describe(cvt_rs.feed_in_use(torch.device("cuda", torch.cuda.current_device())))
    print(f"device {torch.cuda.get_device_name()}  copy bandwidth {copy_tbs:.3f} TB/s  SR: {sr_rule}", flush=True)
    rows = []
    shapes = [(8192, 16384)] if args.quick else SHAPES
    gs = GS
    roundings = ("sr", "rtn") + (("sr-soft",) if sr_rule != cvt_rs.describe(0) else ())
    bench_kernels(shapes, gs, roundings, ("rowwise", "columnwise", "dual", "dual-tc"), copy_tbs, rows)
    bench_reference(copy_tbs, rows, compile_too=not args.no_compile)
    rows.append(dict(note="copy bandwidth inside a CUDA graph (copy-engine memcpy node), for reference",
                     tb_s=round(graph_copy_bandwidth(), 4)))
    result = dict(command="python " + " ".join(sys.argv), device=torch.cuda.get_device_name(),
                  capability=list(torch.cuda.get_device_capability()), torch=torch.__version__,
                  copy_tb_s=round(copy_tbs, 4), sr_rule=sr_rule, results=rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    md = args.md or os.path.splitext(args.out)[0] + ".md"
    with open(md, "w") as f:
        f.write(markdown(result))
    print(f"wrote {args.out} and {md}")


if __name__ == "__main__":
    main()
