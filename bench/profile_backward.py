"""Where the time of one MXFP4 linear backward goes: a torch.profiler summary against the floors.

For one arm (default ours_bf16_mxfp4_g64_sr) and one linear (default GPT-6.7B FC1: T = 8192,
4096 → 16384, megatron-core layer as in linear.py), and the BF16 megatron-core arm beside it:

1. measured backward: CUDA-event median (as linear.py: warm-up, rotating inputs, L2 flush);
2. profile of --profile-iters backwards (torch.profiler, CPU + CUDA): every kernel by name with its
   launch count and time per backward, grouped into categories by name (quantize, layout
   conversion, GEMM, slab fix, casts/copies, reductions, elementwise, memory, comm, other — a
   heuristic on kernel names, stated in the output); kernels and launch calls per backward; host
   (CPU) time of the backward; device idle = measured − sum of kernel times (launch gaps);
3. floors: copy bandwidth and BF16 / FP8 GEMM rates measured in this run, the byte floor of the
   three quantize calls (dY dual, W, X) at copy bandwidth, the FLOP floor of the two GEMMs at the
   BF16 and FP8 rates, and the measured stand-alone times of our parts (quantize calls through
   `megatron_mxfp4.backward`, the MXFP4 GEMM on pre-quantized operands, and on Hopper the cuBLASLt
   FP8 GEMM alone on operands already in its E4M3-tile layout);
4. what remains: measured backward − (stand-alone quantize + stand-alone GEMM), and measured
   backward − (quantize byte floor + GEMM FLOP floor);
5. the host: wall time of the backward call without the profiler, and cProfile's functions by own
   time (--host-iters).

    python bench/profile_backward.py [--arm ours_bf16_mxfp4_g64_sr] [--model 6.7b] [--layer fc1] [--tokens 8192]
    python bench/profile_backward.py --device cpu --tiny      smoke run (CPU ops instead of kernels)

Writes STEM.json and STEM.md (default bench/results/profile-backward-<device>), and with --trace a
Chrome trace of the profiled iterations.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402
import linear as L  # noqa: E402

# (category, pattern on the kernel / op name); first match wins
CATEGORIES = [
    ("quantize (ours, CUDA)", r"quantize_kernel|mxfp4_quant"),
    ("E4M3 tile layout", r"to_e4m3|mask_flagged"),
    ("slab fix (Triton)", r"slab_fix"),
    ("exact FP8 GEMM (Triton)", r"fp8_scaled_gemm|dot_scaled"),
    ("GEMM (cuBLAS / cuBLASLt / CUTLASS)", r"gemm|sm90_xmma|nvjet|cutlass|xmma|Kernel2|cublas|aten::mm|aten::matmul|aten::addmm|_scaled_mm"),
    ("NCCL", r"nccl"),
    ("memcpy / memset", r"Memcpy|Memset|memcpy|memset"),
    ("casts / copies", r"copy|_to_copy|aten::to\b|cast|convert"),
    ("reductions (amax, sums)", r"reduce|amax|aten::sum|aten::max|aten::abs"),
    ("fill / zero", r"fill|zero"),
    ("elementwise", r"elementwise|vectorized|aten::mul|aten::add|aten::div|aten::where|aten::sub"),
]


def categorize(name: str) -> str:
    for cat, pat in CATEGORIES:
        if re.search(pat, name, flags=re.IGNORECASE):
            return cat
    return "other"


def copy_bandwidth(device: torch.device) -> float:
    """TB/s of a 1 GiB device-to-device copy (read + write), median of CUDA-event timings."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    ms = C.events_median(lambda: y.copy_(x), 10)
    return 2 * x.numel() / (ms * 1e-3) / 1e12


def gemm_rates(shape: dict, device: torch.device, kw) -> dict:
    """Measured ms of the two backward GEMM shapes in BF16 (torch.mm) and FP8 (per-tensor
    torch._scaled_mm), BF16 output."""
    T, din, dout = shape["tokens"], shape["local_in"], shape["local_out"]
    res = {}
    dims = {"dgrad": (T, din, dout), "wgrad": (dout, din, T)}  # (M, N, K)
    for gemm, (M, N, K) in dims.items():
        a = torch.randn(M, K, device=device, dtype=torch.bfloat16)
        b = torch.randn(N, K, device=device, dtype=torch.bfloat16)
        res[f"bf16_{gemm}_ms"] = C.measure(lambda s: torch.mm(a, b.t()), device, **kw).median
        if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
            a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
            one = torch.ones((), device=device)
            res[f"fp8_{gemm}_ms"] = C.measure(
                lambda s: torch._scaled_mm(a8, b8.t(), one, one, out_dtype=torch.bfloat16), device, **kw).median
    return res


def standalone_parts(arm: C.Arm, weight: torch.Tensor, x2: torch.Tensor, dy2: torch.Tensor, device, kw) -> dict:
    """Stand-alone ms of our backward's parts on the given operands (each timed alone)."""
    from megatron_mxfp4 import backward as bwd
    from megatron_mxfp4.numerics.streams import Gemm, Operand, derive_seed
    from megatron_mxfp4.ops import mxfp4_gemm

    recipe = arm.recipe
    w = weight.detach()
    key = bwd.StreamKey(derive_seed(recipe.seed, 0), 7, 0)
    t = lambda fn: C.measure(lambda s: fn(), device, **kw).median  # noqa: E731
    sd, sw = bwd.gemm_signs(recipe, key, Gemm.DGRAD, device), bwd.gemm_signs(recipe, key, Gemm.WGRAD, device)
    parts = {"quantize_dy_dual": t(lambda: bwd.quantize_grad_output(dy2, recipe, key)),
             "quantize_w": t(lambda: bwd._quantize(w.t(), recipe, key, Gemm.DGRAD, Operand.WEIGHT, sd)),
             "quantize_x": t(lambda: bwd._quantize(x2.t(), recipe, key, Gemm.WGRAD, Operand.INPUT, sw))}
    qd, qdt = bwd.quantize_grad_output(dy2, recipe, key)
    qw = bwd._quantize(w.t(), recipe, key, Gemm.DGRAD, Operand.WEIGHT, sd)
    qx = bwd._quantize(x2.t(), recipe, key, Gemm.WGRAD, Operand.INPUT, sw)
    parts["dgrad_mxfp4_gemm"] = t(lambda: mxfp4_gemm(qd, qw, torch.float32, backend=recipe.gemm_backend))
    parts["wgrad_mxfp4_gemm"] = t(lambda: mxfp4_gemm(qdt, qx, torch.float32, backend=recipe.gemm_backend))
    if device.type == "cuda":
        try:  # the cuBLASLt FP8 GEMM alone, operands already in the E4M3-tile layout (Hopper backend)
            from torch.nn.functional import ScalingType, scaled_mm

            from megatron_mxfp4.numerics.quantize import gemm_alpha
            from megatron_mxfp4.ops.hopper_gemm import hopper_supports, tile_operands

            if hopper_supports(qd.data) is None:
                bw = ScalingType.BlockWise1x128
                for name, (a, b) in (("dgrad", (qd, qw)), ("wgrad", (qdt, qx))):
                    oa, ob, _ = tile_operands(a, b, gemm_alpha(a, b))
                    parts[f"{name}_fp8_tile_gemm_only"] = t(lambda: scaled_mm(
                        oa.codes, ob.codes.t(), oa.scales.t(), bw, ob.scales.t(), bw, output_dtype=torch.float32))
                    parts[f"{name}_tile_layout_conversion"] = t(lambda: tile_operands(a, b, gemm_alpha(a, b)))
        except Exception as e:  # report, keep the rest
            parts["fp8_tile_gemm_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return parts


def profile_backward(fwd_fn, params, rot, arm, device, iters: int, trace: str = None) -> dict:
    """torch.profiler over `iters` backwards (each after an untimed, unprofiled forward)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    states = []
    for i in range(iters):  # forwards first, outside the profile
        x, dy = rot(i)
        x.grad = None
        for p in params:
            p.grad = None
        with C.te_autocast(arm):
            states.append((fwd_fn(x), dy))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with profile(activities=acts) as prof:
        for i, (y, dy) in enumerate(states):
            with record_function(f"backward_{i}"):
                y.backward(dy)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    if trace:
        prof.export_chrome_trace(trace)
    events = prof.events()
    cpu = torch.autograd.DeviceType.CPU
    # record_function labels appear as CPU ranges (and, on a GPU, as device-side annotations: not kernels)
    host_ms = [e.time_range.elapsed_us() / 1e3 for e in events if e.name.startswith("backward_") and e.device_type == cpu]
    launches = sum(1 for e in events if "LaunchKernel" in e.name or "cuLaunch" in e.name)
    kernels = defaultdict(lambda: [0, 0.0])
    if device.type == "cuda":
        for e in events:
            if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("backward_"):
                k = kernels[e.name]
                k[0] += 1
                k[1] += e.time_range.elapsed_us()
        unit = "CUDA kernels"
    else:  # the smoke mode: CPU ops by self time
        for a in prof.key_averages():
            if a.key.startswith("backward_") or a.self_cpu_time_total <= 0:
                continue
            k = kernels[a.key]
            k[0] += a.count
            k[1] += a.self_cpu_time_total
        unit = "CPU ops (self time)"
    rows = sorted(({"name": n, "category": categorize(n), "count_per_bwd": c / iters, "us_per_bwd": us / iters}
                   for n, (c, us) in kernels.items()), key=lambda r: -r["us_per_bwd"])
    cats = defaultdict(lambda: {"count_per_bwd": 0.0, "us_per_bwd": 0.0})
    for r in rows:
        cats[r["category"]]["count_per_bwd"] += r["count_per_bwd"]
        cats[r["category"]]["us_per_bwd"] += r["us_per_bwd"]
    return dict(unit=unit, iters=iters, host_ms_per_bwd=sum(host_ms) / max(1, len(host_ms)),
                launch_calls_per_bwd=launches / iters, kernels_per_bwd=sum(r["count_per_bwd"] for r in rows),
                busy_us_per_bwd=sum(r["us_per_bwd"] for r in rows),
                categories=dict(sorted(cats.items(), key=lambda kv: -kv[1]["us_per_bwd"])), kernels=rows)


def host_profile(fwd_fn, params, rot, arm, device, iters: int, top: int = 20) -> dict:
    """Host (Python + launch) time of the backward call, without the torch profiler: the wall time of
    each `backward()` call (the GPU finishes asynchronously; synchronized before each call so that a
    full launch queue never blocks it), then cProfile over the same calls: functions by own time."""
    import cProfile
    import pstats
    import time

    def setup(i):
        x, dy = rot(i)
        x.grad = None
        for p in params:
            p.grad = None
        with C.te_autocast(arm):
            y = fwd_fn(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return y, dy

    wall = []
    for i in range(iters):
        y, dy = setup(i)
        t0 = time.perf_counter()
        y.backward(dy)
        wall.append((time.perf_counter() - t0) * 1e3)
    prof = cProfile.Profile()
    for i in range(iters):
        y, dy = setup(i)
        prof.enable()
        y.backward(dy)
        prof.disable()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    st = pstats.Stats(prof)
    rows = []
    for (file, line, fn), (cc, nc, tt, ct, _) in st.stats.items():
        where = f"{os.path.basename(file)}:{line}" if line else file
        rows.append({"function": f"{fn} ({where})", "calls_per_bwd": nc / iters, "own_us_per_bwd": tt / iters * 1e6,
                     "cum_us_per_bwd": ct / iters * 1e6})
    rows.sort(key=lambda r: -r["own_us_per_bwd"])
    wall.sort()
    return dict(iters=iters, host_ms_median=wall[len(wall) // 2], functions=rows[:top])


def run_arm(arm: C.Arm, shape: dict, args, device, config, flush) -> dict:
    fwd_fn, mod = L.build_layer(arm, shape, "mcore", 1, device, config)
    params = [p for p in mod.parameters() if p.requires_grad]
    T, lin, lout = shape["tokens"], shape["local_in"], shape["local_out"]
    gen = torch.Generator(device=device).manual_seed(3000)

    def make(i):
        return (torch.randn(T, 1, lin, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_(True),
                torch.randn(T, 1, lout, device=device, dtype=torch.bfloat16, generator=gen) * 1e-3)

    rot = C.Rotation(make, 1 if device.type == "cpu" else C.rotation_count(T * (lin + lout) * 2))
    kw = dict(warmup=args.warmup, iters=args.iters, flush=flush)

    def bwd_setup(i):
        x, dy = rot(i)
        x.grad = None
        for p in params:
            p.grad = None
        with C.te_autocast(arm):
            return fwd_fn(x), dy

    measured = C.measure(lambda s: s[0].backward(s[1]), device, setup=bwd_setup, **kw)
    trace = None
    if args.trace:
        trace = os.path.splitext(args.trace)[0] + f"-{arm.name}.json"
    prof = profile_backward(fwd_fn, params, rot, arm, device, args.profile_iters, trace)
    out = dict(arm=arm.name, label=arm.label, measured_bwd=measured.as_dict(), profile=prof)
    if args.host_iters:
        out["host"] = host_profile(fwd_fn, params, rot, arm, device, args.host_iters)
    if trace:
        out["trace"] = trace
    if arm.family == "ours" and arm.recipe.backward_format == "mxfp4":
        x, dy = rot(0)
        out["standalone_ms"] = standalone_parts(arm, mod.weight, x.detach().reshape(T, lin), dy.reshape(T, lout),
                                                device, kw)
    prof["idle_us_per_bwd"] = measured.median * 1e3 - prof["busy_us_per_bwd"]
    return out


def floors(shape: dict, device, kw, arms_out) -> dict:
    """Byte and FLOP floors of the backward, and what remains of each arm's measured time."""
    T, lin, lout = shape["tokens"], shape["local_in"], shape["local_out"]
    f = {}
    if device.type == "cuda":
        f["copy_tb_s"] = copy_bandwidth(device)
    f.update(gemm_rates(shape, device, kw))
    w_out = 0.5 + 1 / 32  # bytes written per element and copy: codes + E8M0 scales
    qbytes = (T * lout * (2 + 2 * w_out)) + (lout * lin * (2 + w_out)) + (T * lin * (2 + w_out))
    f["quantize_bytes"] = qbytes
    if "copy_tb_s" in f:
        f["quantize_floor_ms"] = qbytes / (f["copy_tb_s"] * 1e12) * 1e3
    f["gemm_flops"] = 2 * 2.0 * T * lin * lout
    f["bf16_gemms_ms"] = f["bf16_dgrad_ms"] + f["bf16_wgrad_ms"]
    if "fp8_dgrad_ms" in f:
        f["fp8_gemms_ms"] = f["fp8_dgrad_ms"] + f["fp8_wgrad_ms"]
    for a in arms_out:
        s = a.get("standalone_ms")
        m = a["measured_bwd"]["ms"]
        if s:
            q = s["quantize_dy_dual"] + s["quantize_w"] + s["quantize_x"]
            g = s["dgrad_mxfp4_gemm"] + s["wgrad_mxfp4_gemm"]
            g_only = s.get("dgrad_fp8_tile_gemm_only", 0) + s.get("wgrad_fp8_tile_gemm_only", 0)
            a["remainder"] = {
                "standalone_quantize_ms": q, "standalone_mxfp4_gemm_ms": g,
                "measured_minus_standalone_parts_ms": m - q - g,
                "fp8_tile_gemm_only_ms": g_only or None,
                "layout_conversion_and_fix_ms": (g - g_only) if g_only else None,
            }
            if "quantize_floor_ms" in f:
                fl = f["quantize_floor_ms"] + f.get("fp8_gemms_ms", f["bf16_gemms_ms"])
                a["remainder"]["floor_ms"] = fl
                a["remainder"]["measured_minus_floor_ms"] = m - fl
    return f


def markdown(result: dict) -> str:
    info, shape, fl = result["device_info"], result["shape"], result["floors"]
    lines = [f"# Profile of one linear backward — {info['device']}", "",
             f"Command: `{result['command']}`  ",
             f"torch {info['torch']}" + (f", CUDA {info.get('cuda')}, clocks {info.get('clocks')}" if info.get("cuda") else "")
             + f"; {shape['layer']} T={shape['tokens']}, {shape['local_in']} → {shape['local_out']}; "
             f"measured = median of {result['iters']} {'CUDA-event' if info.get('cuda') else 'host-clock'} timings after "
             f"{result['warmup']} warm-up{', L2 flushed' if info.get('cuda') else ''}; "
             f"profile over {result['profile_iters']} backwards.", ""]
    for note in result.get("notes", []):
        lines.append(f"> {note}  ")
    lines += ["", "## Floors (this run)", ""]
    frows = []
    if "copy_tb_s" in fl:
        frows.append(["copy bandwidth (1 GiB, read + write)", f"{fl['copy_tb_s']:.3f} TB/s"])
        frows.append(["quantize byte floor: dY dual + W + X at copy bandwidth",
                      f"{fl['quantize_floor_ms']:.3f} ms ({fl['quantize_bytes'] / 1e6:.0f} MB)"])
    frows.append(["two BF16 GEMMs (torch.mm, dgrad + wgrad shapes)", f"{fl['bf16_gemms_ms']:.3f} ms "
                  f"({fl['gemm_flops'] / (fl['bf16_gemms_ms'] * 1e-3) / 1e12:.0f} TFLOP/s)"])
    if "fp8_gemms_ms" in fl:
        frows.append(["two FP8 GEMMs (torch._scaled_mm per-tensor)", f"{fl['fp8_gemms_ms']:.3f} ms "
                      f"({fl['gemm_flops'] / (fl['fp8_gemms_ms'] * 1e-3) / 1e12:.0f} TFLOP/s)"])
    lines.append(C.markdown_table(["floor", "value"], frows))
    for a in result["arms"]:
        p = a["profile"]
        lines += ["", f"## {a['arm']} — {a['label']}", "",
                  f"- measured backward: **{a['measured_bwd']['ms']:.3f} ms** (p20 {a['measured_bwd']['p20_ms']:.3f}, "
                  f"p80 {a['measured_bwd']['p80_ms']:.3f})",
                  f"- {p['unit']}: {p['kernels_per_bwd']:.0f} per backward, sum {p['busy_us_per_bwd'] / 1e3:.3f} ms; "
                  f"launch calls per backward: {p['launch_calls_per_bwd']:.0f}; host time of the backward call "
                  f"{p['host_ms_per_bwd']:.3f} ms; device idle (measured − kernel sum) {p['idle_us_per_bwd'] / 1e3:.3f} ms"]
        r = a.get("remainder")
        if r:
            lines.append(f"- stand-alone parts: quantize {r['standalone_quantize_ms']:.3f} ms + MXFP4 GEMMs "
                         f"{r['standalone_mxfp4_gemm_ms']:.3f} ms; measured − parts = "
                         f"**{r['measured_minus_standalone_parts_ms']:.3f} ms**")
            if r.get("fp8_tile_gemm_only_ms"):
                lines.append(f"- of the MXFP4 GEMMs: cuBLASLt FP8 GEMM alone {r['fp8_tile_gemm_only_ms']:.3f} ms, "
                             f"layout conversion + slab fix + launches {r['layout_conversion_and_fix_ms']:.3f} ms")
            if "floor_ms" in r:
                lines.append(f"- floor (quantize bytes at copy bandwidth + FP8 GEMM rate): {r['floor_ms']:.3f} ms; "
                             f"measured − floor = **{r['measured_minus_floor_ms']:.3f} ms**")
            s = a["standalone_ms"]
            lines += ["", C.markdown_table(["stand-alone part", "ms"],
                                           [[k, C.fmt(v) if isinstance(v, float) else v] for k, v in s.items()])]
        h = a.get("host")
        if h:
            lines += ["", f"Host time of the backward call without the profiler: **{h['host_ms_median']:.3f} ms** "
                          f"(median of {h['iters']}); cProfile, functions by own time per backward:", "",
                      C.markdown_table(["function", "calls / bwd", "own µs / bwd", "cumulative µs / bwd"],
                                       [[f["function"][:90].replace("|", "/"), C.fmt(f["calls_per_bwd"]),
                                         C.fmt(f["own_us_per_bwd"]), C.fmt(f["cum_us_per_bwd"])]
                                        for f in h["functions"]])]
        lines += ["", "By category (heuristic on names):", "",
                  C.markdown_table(["category", "launches / bwd", "ms / bwd", "% of kernel sum"],
                                   [[c, C.fmt(v["count_per_bwd"]), C.fmt(v["us_per_bwd"] / 1e3),
                                     C.fmt(100 * v["us_per_bwd"] / max(p["busy_us_per_bwd"], 1e-9))]
                                    for c, v in p["categories"].items()]),
                  "", f"Top {min(len(p['kernels']), result['top'])} by time:", "",
                  C.markdown_table(["name", "category", "count / bwd", "µs / bwd"],
                                   [[k["name"][:100].replace("|", "/"), k["category"], C.fmt(k["count_per_bwd"]),
                                     C.fmt(k["us_per_bwd"])] for k in p["kernels"][:result["top"]]])]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None)
    ap.add_argument("--tiny", action="store_true", help="toy shape on the CPU: the code path only")
    ap.add_argument("--arm", default="ours_bf16_mxfp4_g64_sr", help="the arm to profile (an arm name of linear.py)")
    ap.add_argument("--compare", default="bf16_mcore", help="arms profiled beside it (comma list; '' for none)")
    ap.add_argument("--model", default="6.7b")
    ap.add_argument("--layer", default="fc1")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--profile-iters", type=int, default=None, help="backwards inside the profile (default 5; tiny 2)")
    ap.add_argument("--top", type=int, default=25, help="kernels listed by name")
    ap.add_argument("--host-iters", type=int, default=None,
                    help="backwards timed on the host and under cProfile (default 10; tiny 2; 0: none)")
    ap.add_argument("--no-flush", action="store_true")
    ap.add_argument("--allow-reference", action="store_true")
    ap.add_argument("--trace", default=None, help="write Chrome traces to TRACE-<arm>.json")
    ap.add_argument("--out", default=None, help="output stem (default bench/results/profile-backward-<device>)")
    args = ap.parse_args(argv)
    device = C.pick_device(args.device)
    if device.type == "cpu" and not args.tiny:
        raise SystemExit("bench/profile_backward.py: the CPU runs only the smoke mode; add --tiny")
    tiny = args.tiny
    args.warmup = (1 if tiny else 5) if args.warmup is None else args.warmup
    args.iters = (2 if tiny else 20) if args.iters is None else args.iters
    args.profile_iters = (2 if tiny else 5) if args.profile_iters is None else args.profile_iters
    args.host_iters = (2 if tiny else 10) if args.host_iters is None else args.host_iters
    backend = "reference" if device.type == "cpu" and args.backend == "auto" else args.backend
    all_arms = {a.name: a for a in C.build_arms(backend=backend)}
    names = [args.arm] + [n for n in args.compare.split(",") if n and n != args.arm]
    unknown = [n for n in names if n not in all_arms]
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; choose from {', '.join(all_arms)}")
    arms = [all_arms[n] for n in names]
    te, te_version = C.transformer_engine()
    notes = []
    if te is None and any(a.needs_te for a in arms):
        notes.append(f"skipped {', '.join(a.name for a in arms if a.needs_te)}: {te_version}")
        arms = [a for a in arms if not a.needs_te]
    shape = L.layer_shapes("tiny" if tiny else args.model, ["fc1" if tiny else args.layer],
                           L.TINY["tokens"] if tiny else args.tokens, 1)[0]
    C.install_cpu_shims()
    C.init_distributed(device)
    if any(a.family == "ours" for a in arms):
        note = C.check_fast_kernels(device, args.allow_reference)
        if note:
            notes.append(note)
    flush = C.L2Flush(device, enabled=not args.no_flush)
    out = []
    with C.megatron_parallel(1, device):
        config = L.megatron_config(1, device)
        for arm in arms:
            out.append(run_arm(arm, shape, args, device, config, flush))
            print(f"{arm.name}: measured backward {out[-1]['measured_bwd']['ms']:.3f} ms", flush=True)
        fl = floors(shape, device, dict(warmup=args.warmup, iters=args.iters, flush=flush), out)
    result = dict(command=C.command_line(), device_info=C.device_info(device), shape=shape, warmup=args.warmup,
                  iters=args.iters, profile_iters=args.profile_iters, top=args.top, notes=notes,
                  categories_rule=[list(c) for c in CATEGORIES], floors=fl, arms=out)
    md = markdown(result)
    paths = C.write_results(args.out or C.default_stem("profile-backward", device), result, md)
    print(md)
    print("wrote " + " and ".join(paths))
    torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
