"""One linear layer in every arm, side by side: forward, backward and forward + backward.

Arms (bench/common.py `build_arms`): BF16 through megatron-core's own ColumnParallelLinear /
RowParallelLinear, BF16 through Transformer Engine's `te.Linear`, TE FP8 with delayed and with
current scaling, and the project's `MXFP4ColumnParallelLinear` / `MXFP4RowParallelLinear` with FP8
forward + FP8 backward, BF16 forward + MXFP4 backward and FP8 forward + MXFP4 backward for RHT
g = 0/64/256 and SR/RTN. TE arms run only where `transformer_engine` imports (a skip line otherwise).

Shapes: the four decoder linears of GPT-1.3B (h = 2048) / GPT-6.7B (h = 4096) over T tokens
(default 8192), as the TP-local shards: QKV [h → 3h/TP] and FC1 [h → 4h/TP] column-parallel, attention
projection [h/TP → h] and FC2 [4h/TP → h] row-parallel. No bias. BF16 activations and weights.

Timing (`common.measure`): CUDA-event medians over --iters iterations after --warmup; inputs rotate
over several sets, the L2 cache is flushed before every timed iteration; the backward is timed
after an untimed forward; gradients are reset (untimed) so that no iteration pays an accumulation.
TFLOP/s count 2·T·in·out per GEMM (3 GEMMs for forward + backward). Peak memory = MiB allocated at
the peak of one forward + backward above what was allocated before it.

Backward split (the project's arms, through `megatron_mxfp4.backward`): quantize dY (the dual
kernel: both layouts from one read), quantize W (dgrad operand) and X (wgrad operand), the two
MXFP4 GEMMs on pre-quantized operands, `grad_input` / `grad_weight` end to end, and comm (the dX
all-reduce of a column-parallel layer at TP > 1; none at TP = 1). "unaccounted" = measured backward
− (quantize + GEMMs + comm): launches, casts, copies and Python between the parts. BF16 arms get the
two plain matmuls for comparison; TE arms are not split.

    python bench/linear.py [--model 6.7b] [--layers qkv,proj,fc1,fc2] [--tokens 8192] [--arms 'bf16*,ours_*g64_sr']
    python bench/linear.py --device cpu --tiny       smoke run: toy shape, reference backends, every arm
    python bench/linear.py --dry-run                  print the arms and shapes, run nothing
    torchrun --nproc-per-node 2 bench/linear.py ...   TP = 2 (megatron-core arms; comm = dX all-reduce)

Writes STEM.json and STEM.md (default bench/results/linear-<device>; --out STEM).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

MODELS = {"1.3b": 2048, "6.7b": 4096}
LAYERS = ("qkv", "proj", "fc1", "fc2")
TINY = {"tokens": 256, "layers": {"fc1": ("column", 64, 256), "fc2": ("row", 64, 256)}}


def layer_shapes(model: str, layers, tokens: int, tp: int):
    """[(name, kind, global in, global out, local in, local out)] of the chosen decoder linears."""
    if model == "tiny":
        table = TINY["layers"]
    else:
        if model not in MODELS:
            raise SystemExit(f"--model {model!r}: choose one of {sorted(MODELS)} (or --tiny)")
        h = MODELS[model]
        table = {"qkv": ("column", h, 3 * h), "proj": ("row", h, h), "fc1": ("column", h, 4 * h),
                 "fc2": ("row", 4 * h, h)}
    out = []
    for name in layers:
        if name not in table:
            raise SystemExit(f"--layers: unknown layer {name!r} (choose from {', '.join(table)})")
        kind, din, dout = table[name]
        for what, size in (("input", din), ("output", dout)):
            if (kind == "column" and what == "output" or kind == "row" and what == "input") and size % tp:
                raise SystemExit(f"{name}: {what} features {size} are not divisible by TP={tp}")
        lin = din // tp if kind == "row" else din
        lout = dout // tp if kind == "column" else dout
        out.append(dict(layer=name, kind=kind, tokens=tokens, din=din, dout=dout, local_in=lin, local_out=lout))
    return out


# ------------------------------------------------------------------------------------------- layers

def megatron_config(tp: int, device: torch.device):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=1, tensor_model_parallel_size=tp,
                             params_dtype=torch.bfloat16, bf16=True, use_cpu_initialization=device.type == "cpu",
                             perform_initialization=True, gradient_accumulation_fusion=False, sequence_parallel=False)


def build_layer(arm: C.Arm, shape: dict, impl: str, tp: int, device: torch.device, config):
    """(forward callable x -> y, module) for one arm and shape; x is [T, 1, local in] BF16."""
    init = functools.partial(torch.nn.init.normal_, std=0.02)
    din, dout, kind = shape["din"], shape["dout"], shape["kind"]
    if arm.needs_te:
        if tp > 1:
            raise RuntimeError("TE arms are benchmarked at TP=1 only in linear.py")
        import transformer_engine.pytorch as te

        mod = te.Linear(din, dout, bias=False, params_dtype=torch.bfloat16, device=device)
        return mod, mod
    recipe = arm.recipe if arm.family == "ours" else None
    if impl == "torch":
        if tp > 1:
            raise RuntimeError("--impl torch runs at TP=1 only")
        from megatron_mxfp4 import MXFP4Linear

        mod = (MXFP4Linear(din, dout, bias=False, device=device, dtype=torch.bfloat16, recipe=recipe, layer_id=7)
               if recipe is not None else torch.nn.Linear(din, dout, bias=False, device=device, dtype=torch.bfloat16))
        init(mod.weight)
        return mod, mod
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    common_kw = dict(config=config, init_method=init, bias=False, skip_bias_add=False)
    if recipe is not None:
        import megatron_mxfp4.megatron as mm

        col, row = mm.MXFP4ColumnParallelLinear, mm.MXFP4RowParallelLinear
        common_kw.update(recipe=recipe, layer_id=7)
    else:
        col, row = ColumnParallelLinear, RowParallelLinear
    if kind == "column":
        mod = col(din, dout, gather_output=False, **common_kw)
    else:
        mod = row(din, dout, input_is_parallel=True, **common_kw)
    mod = mod.to(device)
    return (lambda x: mod(x)[0]), mod


# ------------------------------------------------------------------------------------------- timing

def flops(shape: dict) -> float:
    """2·T·in·out of one GEMM of this (TP-local) linear."""
    return 2.0 * shape["tokens"] * shape["local_in"] * shape["local_out"]


def bench_arm(arm: C.Arm, shape: dict, args, device, tp: int, config, flush) -> dict:
    fwd_fn, mod = build_layer(arm, shape, args.impl, tp, device, config)
    params = [p for p in mod.parameters() if p.requires_grad]
    T, lin, lout = shape["tokens"], shape["local_in"], shape["local_out"]
    gen = torch.Generator(device=device).manual_seed(1000 + C.rank())

    def make(i):
        x = torch.randn(T, 1, lin, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_(True)
        dy = torch.randn(T, 1, lout, device=device, dtype=torch.bfloat16, generator=gen) * 1e-3
        return x, dy

    rot = C.Rotation(make, 1 if device.type == "cpu" else C.rotation_count(T * (lin + lout) * 2))
    ctx = lambda: C.te_autocast(arm)  # noqa: E731

    def clear(x):
        x.grad = None
        for p in params:
            p.grad = None

    def fwd_setup(i):
        return rot(i)[0]

    def fwd_run(x):
        with ctx():
            fwd_fn(x)

    def bwd_setup(i):
        x, dy = rot(i)
        clear(x)
        with ctx():
            y = fwd_fn(x)
        return y, dy

    def bwd_run(s):
        s[0].backward(s[1])

    def fb_setup(i):
        x, dy = rot(i)
        clear(x)
        return x, dy

    def fb_run(s):
        with ctx():
            y = fwd_fn(s[0])
        y.backward(s[1])

    kw = dict(warmup=args.warmup, iters=args.iters, flush=flush)
    t_fwd = C.measure(fwd_run, device, setup=fwd_setup, **kw)
    t_bwd = C.measure(bwd_run, device, setup=bwd_setup, **kw)
    t_fb = C.measure(fb_run, device, setup=fb_setup, **kw)
    peak = C.peak_memory(lambda: fb_run(fb_setup(0)), device)
    row = dict(arm=arm.name, fwd=t_fwd.as_dict(), bwd=t_bwd.as_dict(), fwd_bwd=t_fb.as_dict(),
               tflops_fwd_bwd=3 * flops(shape) / (t_fb.median * 1e-3) / 1e12,
               tokens_per_s=T / (t_fb.median * 1e-3), peak_mib=None if peak is None else round(peak, 1))
    if not args.no_split and arm.family in ("ours", "bf16_mcore"):
        weight = mod.weight
        row["split"] = backward_split(arm, weight, rot, device, tp, shape, kw)
    return row


def backward_split(arm: C.Arm, weight: torch.Tensor, rot, device, tp: int, shape: dict, kw) -> dict:
    """Milliseconds of the backward's parts, timed one at a time on the same operands."""
    from megatron_mxfp4 import backward as bwd
    from megatron_mxfp4.numerics.streams import Gemm, Operand, derive_seed
    from megatron_mxfp4.ops import available_backends, mxfp4_gemm

    w = weight.detach()
    parts = {}

    def t(fn, setup=None):
        return round(C.measure(fn, device, setup=setup, **kw).median, 5)

    def operands(i):
        x, dy = rot(i)
        return x.detach().reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])

    if arm.family == "bf16_mcore":
        parts["dgrad_gemm"] = t(lambda s: s[1] @ w, operands)
        parts["wgrad_gemm"] = t(lambda s: s[1].t() @ s[0], operands)
    else:
        recipe = arm.recipe
        seed = derive_seed(recipe.seed, 0)
        key = lambda i: bwd.StreamKey(seed, 7, i)  # noqa: E731
        if recipe.backward_format == "mxfp4":
            def q_dy(i):
                x2, dy2 = operands(i)
                return dy2, key(i)

            parts["quantize_dy_dual"] = t(lambda s: bwd.quantize_grad_output(s[0], recipe, s[1]), q_dy)

            def q_w(i):
                k = key(i)
                return k, bwd.gemm_signs(recipe, k, Gemm.DGRAD, device)

            parts["quantize_w"] = t(lambda s: bwd._quantize(w.t(), recipe, s[0], Gemm.DGRAD, Operand.WEIGHT, s[1]), q_w)

            def q_x(i):
                x2, _ = operands(i)
                k = key(i)
                return x2, k, bwd.gemm_signs(recipe, k, Gemm.WGRAD, device)

            parts["quantize_x"] = t(lambda s: bwd._quantize(s[0].t(), recipe, s[1], Gemm.WGRAD, Operand.INPUT, s[2]),
                                    q_x)
            x2, dy2 = operands(0)
            k0 = key(0)
            qd, qdt = bwd.quantize_grad_output(dy2, recipe, k0)
            qw = bwd._quantize(w.t(), recipe, k0, Gemm.DGRAD, Operand.WEIGHT, bwd.gemm_signs(recipe, k0, Gemm.DGRAD, device))
            qx = bwd._quantize(x2.t(), recipe, k0, Gemm.WGRAD, Operand.INPUT, bwd.gemm_signs(recipe, k0, Gemm.WGRAD, device))
            parts["dgrad_gemm"] = t(lambda s: mxfp4_gemm(qd, qw, torch.float32, backend=recipe.gemm_backend))
            parts["wgrad_gemm"] = t(lambda s: mxfp4_gemm(qdt, qx, torch.float32, backend=recipe.gemm_backend))
            be = recipe.gemm_backend
            parts["gemm_backend"] = available_backends(qd.data, "gemm")[0] if be == "auto" else be
            qbe = recipe.quantize_backend
            parts["quantize_backend"] = available_backends(dy2, "quantize")[0] if qbe == "auto" else qbe

            def full(i):
                x2, dy2 = operands(i)
                k = key(i)
                qa, qb = bwd.quantize_grad_output(dy2, recipe, k)
                return x2, dy2, k, qa, qb

            parts["grad_input_total"] = t(lambda s: bwd.grad_input(s[1], w, recipe, s[2], qdy=s[3]), full)
            parts["grad_weight_total"] = t(lambda s: bwd.grad_weight(s[1], s[0], recipe, s[2], qdy=s[4]), full)
        else:  # FP8 backward: each GEMM casts its own operands
            parts["grad_input_total"] = t(lambda s: bwd.grad_input(s[1], w, recipe, key(0)), operands)
            parts["grad_weight_total"] = t(lambda s: bwd.grad_weight(s[1], s[0], recipe, key(0)), operands)
    if tp > 1 and shape["kind"] == "column":
        from megatron.core import parallel_state as ps

        group = ps.get_tensor_model_parallel_group()
        dx = torch.randn(shape["tokens"], shape["local_in"], device=device, dtype=torch.bfloat16)
        parts["comm_dx_allreduce"] = t(lambda s: torch.distributed.all_reduce(dx, group=group))
    return parts


def summarize_split(row: dict) -> None:
    """Totals of the split: quantize, GEMMs, comm and what the measured backward leaves over."""
    s = row.get("split")
    if not s:
        return
    q = sum(v for k, v in s.items() if k.startswith("quantize_") and isinstance(v, float))
    g = sum(s.get(k, 0.0) for k in ("dgrad_gemm", "wgrad_gemm"))
    c = s.get("comm_dx_allreduce", 0.0)
    if "dgrad_gemm" in s:
        s["quantize_total"] = round(q, 5)
        s["gemm_total"] = round(g, 5)
        s["unaccounted"] = round(row["bwd"]["ms"] - q - g - c, 5)
    else:
        s["unaccounted"] = round(row["bwd"]["ms"] - s["grad_input_total"] - s["grad_weight_total"] - c, 5)


def add_ratios(rows) -> None:
    base = {r["arm"]: r for r in rows if "error" not in r}
    for r in rows:
        if "error" in r:
            continue
        for ref, key in ((C.BF16_REFERENCE, "x_bf16"), (C.FP8_REFERENCE, "x_te_fp8")):
            b = base.get(ref)
            r[key] = None if b is None else {p: round(r[p]["ms"] / b[p]["ms"], 4) for p in ("fwd", "bwd", "fwd_bwd")}


def goals(shape_rows) -> list:
    """The issue's linear-level goals at each shape: (ours BF16 fwd + MXFP4 bwd, g=64, SR) fwd+bwd
    ≤ 0.8× BF16; (ours FP8 fwd + MXFP4 bwd, g=64, SR) within 10% of TE FP8 delayed."""
    out = []
    for shape, rows in shape_rows:
        by = {r["arm"]: r for r in rows if "error" not in r}
        for arm, ref, limit, what in (("ours_bf16_mxfp4_g64_sr", C.BF16_REFERENCE, 0.8, "≤ 0.8× BF16 (megatron-core)"),
                                      ("ours_fp8_mxfp4_g64_sr", C.FP8_REFERENCE, 1.10, "≤ 1.10× TE FP8 delayed")):
            if arm in by and ref in by:
                ratio = by[arm]["fwd_bwd"]["ms"] / by[ref]["fwd_bwd"]["ms"]
                out.append(dict(layer=shape["layer"], arm=arm, reference=ref, goal=what, ratio=round(ratio, 3),
                                met=ratio <= limit))
            else:
                missing = [a for a in (arm, ref) if a not in by]
                out.append(dict(layer=shape["layer"], arm=arm, reference=ref, goal=what, ratio=None, met=None,
                                note=f"not measured: {', '.join(missing)}"))
    return out


# ------------------------------------------------------------------------------------------- report

def markdown(result: dict) -> str:
    info = result["device_info"]
    lines = [f"# One linear layer, every arm — {info['device']}", "",
             f"Command: `{result['command']}`  ", f"torch {info['torch']}"
             + (f", CUDA {info.get('cuda')}, clocks {info.get('clocks')}" if info.get("cuda") else "")
             + (f", megatron-core {info['megatron_core']}" if info.get("megatron_core") else "")
             + f", Transformer Engine: {info.get('transformer_engine') or 'not installed'}; TP={result['tp']}, "
             f"impl={result['impl']}, warm-up {result['warmup']}, {result['iters']} timed iterations (median), "
             f"L2 flush {'on' if result['flush_l2'] else 'off'}.", ""]
    for note in result.get("notes", []):
        lines.append(f"> {note}  ")
    lines.append("")
    lines.append("Times are medians in ms; `× BF16` / `× TE FP8` = this arm's time ÷ the reference's time (< 1 is "
                 "faster); TFLOP/s and tokens/s from forward + backward; peak = MiB above the inputs at the peak of "
                 "one forward + backward.")
    for shape, rows in result["shapes"]:
        lines += ["", f"## {shape['layer']} ({shape['kind']}-parallel): T={shape['tokens']}, "
                      f"{shape['local_in']} → {shape['local_out']} (TP-local)", ""]
        table = []
        for r in rows:
            if "error" in r:
                table.append([r["arm"], f"error: {r['error'][:80]}"] + [""] * 8)
                continue
            xb, xf = r.get("x_bf16") or {}, r.get("x_te_fp8") or {}
            table.append([r["arm"], C.fmt(r["fwd"]["ms"]), C.fmt(r["bwd"]["ms"]), C.fmt(r["fwd_bwd"]["ms"]),
                          C.fmt(r["tflops_fwd_bwd"]), C.fmt(r["tokens_per_s"]), C.fmt(xb.get("fwd_bwd")),
                          C.fmt(xb.get("bwd")), C.fmt(xf.get("fwd_bwd")), C.fmt(r["peak_mib"])])
        lines.append(C.markdown_table(["arm", "fwd ms", "bwd ms", "fwd+bwd ms", "TFLOP/s", "tokens/s",
                                       "fwd+bwd × BF16", "bwd × BF16", "fwd+bwd × TE FP8", "peak MiB"], table))
        split = [r for r in rows if r.get("split")]
        if split:
            lines += ["", "Backward split (ms; each part timed alone on the same operands):", ""]
            t2 = []
            for r in split:
                s = r["split"]
                t2.append([r["arm"], C.fmt(s.get("quantize_dy_dual")), C.fmt(s.get("quantize_w")),
                           C.fmt(s.get("quantize_x")), C.fmt(s.get("dgrad_gemm")), C.fmt(s.get("wgrad_gemm")),
                           C.fmt(s.get("grad_input_total")), C.fmt(s.get("grad_weight_total")),
                           C.fmt(s.get("comm_dx_allreduce")), C.fmt(r["bwd"]["ms"]), C.fmt(s.get("unaccounted")),
                           s.get("gemm_backend", "")])
            lines.append(C.markdown_table(["arm", "quant dY (dual)", "quant W", "quant X", "dgrad GEMM",
                                           "wgrad GEMM", "grad_input", "grad_weight", "comm", "bwd measured",
                                           "unaccounted", "GEMM backend"], t2))
    if result.get("goals"):
        lines += ["", "## Goals (issue 7, fwd + bwd time ratio)", ""]
        lines.append(C.markdown_table(["layer", "arm", "goal", "ratio", "met"],
                                      [[g["layer"], g["arm"], g["goal"], C.fmt(g["ratio"]),
                                        {True: "yes", False: "**no**", None: g.get("note", "n/a")}[g["met"]]]
                                       for g in result["goals"]]))
    lines += ["", "## Arms", "", C.arms_table(result["arm_objects"])]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--tiny", action="store_true", help="toy shape (T=256, 64 → 256): a smoke run of every code path")
    ap.add_argument("--model", default="6.7b", help="1.3b or 6.7b (default 6.7b)")
    ap.add_argument("--layers", default=None, help="comma list of qkv,proj,fc1,fc2 (default all; tiny: fc1,fc2)")
    ap.add_argument("--tokens", type=int, default=8192, help="T = sequence × micro-batch (default 8192)")
    ap.add_argument("--arms", default="all", help="comma-separated name patterns, e.g. 'bf16*,te_*,ours_*g64_sr'")
    ap.add_argument("--gs", default="0,64,256", help="RHT blocks of the MXFP4 arms (default 0,64,256)")
    ap.add_argument("--roundings", default="sr,rtn", help="roundings of the MXFP4 arms (default sr,rtn)")
    ap.add_argument("--backend", default="auto", help="MXFP4Recipe.backend of our arms (default auto; CPU: reference)")
    ap.add_argument("--impl", choices=("mcore", "torch"), default="mcore",
                    help="mcore: megatron-core layers (default); torch: nn.Linear / MXFP4Linear")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default 5; tiny 1)")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (default 20; tiny 2)")
    ap.add_argument("--no-flush", action="store_true", help="do not flush the L2 cache before timed iterations")
    ap.add_argument("--no-split", action="store_true", help="skip the backward split")
    ap.add_argument("--allow-reference", action="store_true", help="time MXFP4 arms even on the reference kernels")
    ap.add_argument("--strict", action="store_true", help="stop at the first failing arm (tests)")
    ap.add_argument("--dry-run", action="store_true", help="print the arms and shapes and exit")
    ap.add_argument("--out", default=None, help="output stem (default bench/results/linear-<device>)")
    args = ap.parse_args(argv)

    device = C.pick_device(args.device)
    if device.type == "cpu" and not args.tiny and not args.dry_run:
        raise SystemExit("bench/linear.py: the CPU runs only the smoke mode; add --tiny (or use --device cuda)")
    if args.tiny:
        args.warmup = 1 if args.warmup is None else args.warmup
        args.iters = 2 if args.iters is None else args.iters
    args.warmup = 5 if args.warmup is None else args.warmup
    args.iters = 20 if args.iters is None else args.iters
    backend = "reference" if device.type == "cpu" and args.backend == "auto" else args.backend
    try:
        gs = [int(g) for g in args.gs.split(",")]
    except ValueError:
        raise SystemExit(f"--gs must be comma-separated integers, got {args.gs!r}")
    roundings = [r.strip() for r in args.roundings.split(",")]
    arms = C.select_arms(C.build_arms(gs, roundings, backend=backend), args.arms)
    world = int(os.environ.get("WORLD_SIZE", 1))
    model = "tiny" if args.tiny else args.model
    tokens = TINY["tokens"] if args.tiny else args.tokens
    layers = args.layers.split(",") if args.layers else (list(TINY["layers"]) if args.tiny else list(LAYERS))
    shapes = layer_shapes(model, layers, tokens, world)
    te, te_version = C.transformer_engine()
    if args.dry_run:
        print(C.arms_table(arms))
        print()
        print(C.markdown_table(["layer", "kind", "T", "in → out (TP-local)"],
                               [[s["layer"], s["kind"], s["tokens"], f"{s['local_in']} → {s['local_out']}"] for s in shapes]))
        print(f"\nTP={world}; Transformer Engine: {te_version if te else 'absent: ' + te_version}")
        return None

    C.install_cpu_shims()
    tp = C.init_distributed(device) if (args.impl == "mcore" or world > 1) else 1
    notes = []
    note = C.check_fast_kernels(device, args.allow_reference) if any(a.family == "ours" for a in arms) else None
    if note:
        notes.append(note)
    if te is None and any(a.needs_te for a in arms):
        skipped = [a.name for a in arms if a.needs_te]
        msg = f"skipped {', '.join(skipped)}: {te_version}"
        print(msg, flush=True)
        notes.append(msg)
        arms = [a for a in arms if not a.needs_te]
    if tp > 1 and any(a.needs_te for a in arms):
        notes.append("TE arms skipped at TP > 1 (linear.py runs te.Linear at TP=1 only)")
        arms = [a for a in arms if not a.needs_te]
    flush = C.L2Flush(device, enabled=not args.no_flush)
    shape_rows = []
    stem = args.out or C.default_stem("linear" + (f"-tp{tp}" if tp > 1 else ""), device)
    info = C.device_info(device)

    def result_now(partial: bool) -> dict:
        return dict(command=C.command_line(), device_info=info, tp=tp, impl=args.impl, warmup=args.warmup,
                    iters=args.iters, flush_l2=not args.no_flush,
                    notes=notes + (["partial: the run stopped before every shape was measured"] if partial else []),
                    arms=[a.describe() for a in arms], shapes=shape_rows, goals=goals(shape_rows))

    ctx = C.megatron_parallel(tp, device) if args.impl == "mcore" else contextlib.nullcontext()
    with ctx:
        config = megatron_config(tp, device) if args.impl == "mcore" else None
        for shape in shapes:
            rows = []
            for arm in arms:
                def measured():
                    row = bench_arm(arm, shape, args, device, tp, config, flush)
                    summarize_split(row)
                    return row

                row = C.run_arm(arm, args.strict, measured)
                rows.append(row)
                if C.rank() == 0:
                    C.print_row(f"{shape['layer']:5s} {arm.name:26s}", row)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            add_ratios(rows)
            shape_rows.append((shape, rows))
            if C.rank() == 0 and len(shape_rows) < len(shapes):
                C.write_results(stem, result_now(True), markdown(dict(result_now(True), arm_objects=arms)))
    result = result_now(False)
    if C.rank() == 0:
        md = markdown(dict(result, arm_objects=arms))
        paths = C.write_results(stem, result, md)
        print(md)
        print("wrote " + " and ".join(paths))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
