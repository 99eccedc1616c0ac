"""One megatron-core transformer layer in every arm, side by side: forward, backward, forward + backward.

Each arm builds a `TransformerLayer` from a layer spec:
  bf16_mcore         megatron-core's local spec (`get_gpt_layer_local_spec`), BF16
  bf16_te            megatron-core's Transformer Engine spec, BF16          } only where
  te_fp8_delayed     the TE spec under TE's FP8 autocast, delayed scaling   } transformer_engine
  te_fp8_current     the TE spec under TE's FP8 autocast, current scaling   } imports
  ours_*             `megatron_mxfp4.megatron.get_gpt_layer_spec(recipe)` on the local spec; with TE
                     also on the TE spec (arm name suffix "@te": TE attention and norms, our linears)
Ratios: "× BF16" compares an arm with the BF16 arm of the same base spec (ours_* with bf16_mcore,
ours_*@te with bf16_te); "× TE FP8" with te_fp8_delayed.

Shapes: GPT-1.3B (h 2048, 16 heads, ffn 8192) or GPT-6.7B (h 4096, 32 heads, ffn 16384) at
seq × micro-batch = 2048 × 4 (T = 8192 tokens), BF16, dropout 0.1 (as configs/), causal attention.
Timing as in linear.py (`common.measure`: warm-up, CUDA-event medians, rotating inputs, L2 flush).
TFLOP/s count the layer's model FLOPs: linears 2·T·(4h² + 2·h·ffn) and causal attention 2·T·s·h per
forward, ×3 for forward + backward (Megatron's convention).

    python bench/layer.py [--model 6.7b] [--seq 2048] [--micro-batch 4] [--arms PATTERNS]
    python bench/layer.py --model 1.3b --experts 8 --topk 2 --part mlp --kernels
                          (the MoE block alone: 8 experts of width ffn / 4, top-2; kernels per step and the
                           quantizers' share of the GPU time)
    python bench/layer.py --device cpu --tiny      smoke run of every arm's code path (reference backends)
    python bench/layer.py --dry-run

Writes STEM.json and STEM.md (default bench/results/layer-<device>; --out STEM).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

MODELS = {"1.3b": dict(hidden=2048, heads=16, ffn=8192), "6.7b": dict(hidden=4096, heads=32, ffn=16384)}
TINY = dict(hidden=256, heads=4, ffn=512, seq=64, micro_batch=4)  # 256: RHT g=256 divides every reduction


def layer_flops(hidden: int, ffn: int, seq: int, tokens: int, tp: int, topk: int = 1, part: str = "layer") -> float:
    """Forward model FLOPs of one layer (or its MLP, `part` "mlp") on one TP rank (causal attention counted
    once; an MoE MLP counts the `topk` experts each token meets, `ffn` being one expert's width)."""
    mlp = 2.0 * tokens * 2 * hidden * ffn * topk
    if part == "mlp":
        return mlp / tp
    linear = 2.0 * tokens * 4 * hidden * hidden + mlp
    attention = 2.0 * tokens * seq * hidden
    return (linear + attention) / tp


def layer_arms(arms, te_available: bool, ours_on_te: bool):
    """The arms plus, with TE, every ours_* arm again on the TE base spec (suffix "@te")."""
    out = list(arms)
    if te_available and ours_on_te:
        out += [dataclasses.replace(a, name=a.name + "@te", label=a.label + " on the TE spec")
                for a in arms if a.family == "ours"]
    return out


def base_of(arm: C.Arm) -> str:
    return "te" if arm.needs_te or arm.name.endswith("@te") else "local"


def transformer_config(shape: dict, tp: int, device: torch.device, dropout: float):
    from megatron.core.transformer.transformer_config import TransformerConfig

    gpu = device.type == "cuda"
    moe = {}
    if shape.get("experts"):  # the allgather dispatcher runs anywhere; expert MLPs without biases (as mxfp4-train)
        moe = dict(num_moe_experts=shape["experts"], moe_router_topk=shape["topk"],
                   moe_token_dispatcher_type="allgather", add_bias_linear=False)
    return TransformerConfig(**{**dict(
        num_layers=1, hidden_size=shape["hidden"], num_attention_heads=shape["heads"], ffn_hidden_size=shape["ffn"],
        tensor_model_parallel_size=tp, sequence_parallel=False, params_dtype=torch.bfloat16, bf16=True,
        use_cpu_initialization=not gpu, perform_initialization=True, gradient_accumulation_fusion=False,
        hidden_dropout=dropout, attention_dropout=dropout, add_bias_linear=True,
        bias_activation_fusion=gpu and not moe, bias_dropout_fusion=gpu, masked_softmax_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False), **moe})


def build(arm: C.Arm, config, device: torch.device, part: str = "layer"):
    from megatron.core.models.gpt import gpt_layer_specs as specs
    from megatron.core.transformer.spec_utils import build_module

    te_base = base_of(arm) == "te"
    experts = config.num_moe_experts
    if arm.family == "ours":
        import megatron_mxfp4.megatron as mm

        spec = mm.get_gpt_layer_spec(arm.recipe, transformer_engine=te_base, num_experts=experts)
    elif te_base:
        spec = specs.get_gpt_layer_with_transformer_engine_spec(num_experts=experts)
    else:
        spec = specs.get_gpt_layer_local_spec(num_experts=experts)
    layer = build_module(spec, config=config, layer_number=1)
    if part == "mlp":  # the MLP (an MoE block with experts) alone, as its layer configured it (expert indices)
        layer = layer.mlp
    # As Megatron's Float16Module does for a model: every floating parameter in BF16 (without apex, the
    # local spec's LayerNorm is torch's, created in float32, which CUDA's layer_norm rejects beside BF16 input).
    return layer.to(device=device, dtype=torch.bfloat16)


def bench_arm(arm: C.Arm, shape: dict, args, device, tp: int, flush) -> dict:
    config = transformer_config(shape, tp, device, args.dropout)
    layer = build(arm, config, device, args.part)
    layer.train()
    params = [p for p in layer.parameters() if p.requires_grad]
    s, b, h = shape["seq"], shape["micro_batch"], shape["hidden"]
    gen = torch.Generator(device=device).manual_seed(2000 + C.rank())
    # the local spec on the CPU needs an explicit causal mask (megatron builds its default one on CUDA)
    mask = (torch.triu(torch.ones(s, s, dtype=torch.bool, device=device), 1).view(1, 1, s, s)
            if device.type == "cpu" and base_of(arm) == "local" else None)

    def make(i):
        x = torch.randn(s, b, h, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_(True)
        dy = torch.randn(s, b, h, device=device, dtype=torch.bfloat16, generator=gen) * 1e-3
        return x, dy

    rot = C.Rotation(make, 1 if device.type == "cpu" else C.rotation_count(2 * s * b * h * 2))
    ctx = lambda: C.te_autocast(arm)  # noqa: E731

    def fwd(x):
        with ctx():
            out, _ = layer(x) if args.part == "mlp" else layer(x, attention_mask=mask)
        return out

    def clear(x):
        x.grad = None
        for p in params:
            p.grad = None

    def bwd_setup(i):
        x, dy = rot(i)
        clear(x)
        return fwd(x), dy

    def fb_setup(i):
        x, dy = rot(i)
        clear(x)
        return x, dy

    def fb_run(st):
        fwd(st[0]).backward(st[1])

    kw = dict(warmup=args.warmup, iters=args.iters, flush=flush)
    launches0 = _grouped_launches()
    t_fwd = C.measure(fwd, device, setup=lambda i: rot(i)[0], **kw)
    t_bwd = C.measure(lambda st: st[0].backward(st[1]), device, setup=bwd_setup, **kw)
    t_fb = C.measure(fb_run, device, setup=fb_setup, **kw)
    peak = C.peak_memory(lambda: fb_run(fb_setup(0)), device)
    kernels = kernel_census(lambda: fb_run(fb_setup(0)), device) if args.kernels else None
    f = layer_flops(h, shape["ffn"], s, s * b, tp, shape.get("topk", 1) if shape.get("experts") else 1, args.part)
    row = dict(arm=arm.name, base_spec=base_of(arm), layer_class=type(layer).__name__,
               fwd=t_fwd.as_dict(), bwd=t_bwd.as_dict(), fwd_bwd=t_fb.as_dict(),
               tflops_fwd_bwd=3 * f / (t_fb.median * 1e-3) / 1e12, tokens_per_s=s * b / (t_fb.median * 1e-3),
               peak_mib=None if peak is None else round(peak, 1), kernels=kernels,
               grouped_quantize_launches=_grouped_launches() - launches0,
               mxfp4_linears=sum(1 for m in layer.modules() if getattr(m, "recipe", None) is not None
                                 and type(m).__name__.startswith("MXFP4")))
    return row


def _grouped_launches() -> int:
    """Grouped quantize launches made so far by MoE layers (`megatron.grouped_experts`: 3 per layer backward,
    FC2's dY, FC2's X and W, FC1's X and W of all local experts), on any backend (the CPU smoke runs the grouped
    reference)."""
    from megatron_mxfp4.megatron import grouped_experts

    return grouped_experts.STATS["launches"]


#: kernel-name fragments of the MXFP4 quantizers (csrc/mxfp4_quantize_kernel.cuh, the grouped one of an MoE
#: layer's experts, csrc/mxfp4_quantize_grouped.cuh) and of the E4M3-tile layout
GROUPED_QUANTIZER_KERNEL = "quantize_grouped_kernel"
QUANTIZER_KERNELS = ("quantize_kernel", GROUPED_QUANTIZER_KERNEL, "to_e4m3_tiles_kernel", "mask_flagged_kernel")


def kernel_census(step, device, repeats: int = 3) -> Optional[dict]:
    """CUDA kernels per `step`, the share of their GPU time spent in the quantizers and in the grouped quantizer
    alone (MoE experts: 3 launches per layer backward for the operands of all local experts but FC1's dY, one
    more per 32 segments), and its launches per step (torch.profiler)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            step()
        torch.cuda.synchronize(device)
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
              and not e.name.startswith(("Memcpy", "Memset"))]
    total = sum(e.device_time for e in events) or 1.0
    quant = sum(e.device_time for e in events if any(k in e.name for k in QUANTIZER_KERNELS))
    grouped = [e for e in events if GROUPED_QUANTIZER_KERNEL in e.name]
    return dict(per_step=len(events) / repeats, quantizer_share=quant / total,
                grouped_quantizer_share=sum(e.device_time for e in grouped) / total,
                grouped_launches_per_step=len(grouped) / repeats)


def add_ratios(rows) -> None:
    by = {r["arm"]: r for r in rows if "error" not in r}
    for r in rows:
        if "error" in r:
            continue
        ref = "bf16_te" if r["base_spec"] == "te" else C.BF16_REFERENCE
        for key, base in (("x_bf16", by.get(ref)), ("x_te_fp8", by.get(C.FP8_REFERENCE))):
            r[key] = None if base is None else {p: round(r[p]["ms"] / base[p]["ms"], 4) for p in ("fwd", "bwd", "fwd_bwd")}
        r["bf16_reference"] = ref


def markdown(result: dict, arms) -> str:
    info, shape = result["device_info"], result["shape"]
    lines = [f"# One transformer layer, every arm — {info['device']}", "",
             f"Command: `{result['command']}`  ",
             f"torch {info['torch']}" + (f", CUDA {info.get('cuda')}, clocks {info.get('clocks')}" if info.get("cuda") else "")
             + (f", megatron-core {info['megatron_core']}" if info.get("megatron_core") else "")
             + f", Transformer Engine: {info.get('transformer_engine') or 'not installed'}; TP={result['tp']}; "
             f"warm-up {result['warmup']}, {result['iters']} timed iterations (median), L2 flush "
             f"{'on' if result['flush_l2'] else 'off'}.", "",
             f"Layer: hidden {shape['hidden']}, {shape['heads']} heads, ffn {shape['ffn']}, seq {shape['seq']} × "
             f"micro-batch {shape['micro_batch']} (T = {shape['seq'] * shape['micro_batch']}), dropout {result['dropout']}, "
             "BF16" + (f"; MoE: {shape['experts']} experts of width {shape['ffn']}, top-{shape['topk']}"
                       if shape.get("experts") else "") + f"; timed: {result.get('part', 'layer')}.", ""]
    for note in result.get("notes", []):
        lines.append(f"> {note}  ")
    lines += ["", "Medians in ms; `× BF16` = time ÷ the BF16 arm of the same base spec (column `BF16 ref`); "
              "`× TE FP8` = time ÷ te_fp8_delayed; TFLOP/s = model FLOPs of forward + backward ÷ time; peak = MiB "
              "above the inputs at the peak of one forward + backward.", ""]
    table = []
    for r in result["rows"]:
        if "error" in r:
            table.append([r["arm"], "", f"error: {r['error'][:80]}"] + [""] * 13)
            continue
        xb, xf = r.get("x_bf16") or {}, r.get("x_te_fp8") or {}
        table.append([r["arm"], r["base_spec"], C.fmt(r["fwd"]["ms"]), C.fmt(r["bwd"]["ms"]), C.fmt(r["fwd_bwd"]["ms"]),
                      C.fmt(r["tflops_fwd_bwd"]), C.fmt(r["tokens_per_s"]), r["bf16_reference"],
                      C.fmt(xb.get("fwd_bwd")), C.fmt(xb.get("bwd")), C.fmt(xf.get("fwd_bwd")), C.fmt(r["peak_mib"]),
                      C.fmt((r.get("kernels") or {}).get("per_step")),
                      C.fmt((r.get("kernels") or {}).get("quantizer_share")),
                      C.fmt((r.get("kernels") or {}).get("grouped_quantizer_share")),
                      C.fmt((r.get("kernels") or {}).get("grouped_launches_per_step"))])
    lines.append(C.markdown_table(["arm", "base spec", "fwd ms", "bwd ms", "fwd+bwd ms", "TFLOP/s", "tokens/s",
                                   "BF16 ref", "fwd+bwd × BF16", "bwd × BF16", "fwd+bwd × TE FP8", "peak MiB",
                                   "kernels / step", "quantizer share", "grouped quantizer share",
                                   "grouped launches / step"], table))
    lines += ["", "## Arms", "", C.arms_table(arms)]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--tiny", action="store_true", help="toy layer (h 256, seq 64 × 4): smoke run of every code path")
    ap.add_argument("--model", default="6.7b", help="1.3b or 6.7b (default 6.7b)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--experts", type=int, default=0, help="MoE: routed experts per layer (0 = a dense MLP)")
    ap.add_argument("--topk", type=int, default=2, help="MoE: experts per token")
    ap.add_argument("--part", choices=("layer", "mlp"), default="layer", help="the whole layer, or its MLP alone")
    ap.add_argument("--kernels", action="store_true", help="also count kernels per step and the quantizers' share "
                    "(the grouped MoE expert quantizer's share and launches beside it)")
    ap.add_argument("--no-grouped-experts", action="store_true",
                    help="MoE: each expert quantizes its own operands (no grouped launch), for comparison")
    ap.add_argument("--arms", default="all", help="comma-separated name patterns (suffix @te: ours on the TE spec)")
    ap.add_argument("--gs", default="0,64,256")
    ap.add_argument("--roundings", default="sr,rtn")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--no-ours-on-te", action="store_true", help="with TE: do not repeat our arms on the TE spec")
    ap.add_argument("--warmup", type=int, default=None, help="default 5 (tiny 1)")
    ap.add_argument("--iters", type=int, default=None, help="default 20 (tiny 2)")
    ap.add_argument("--no-flush", action="store_true")
    ap.add_argument("--allow-reference", action="store_true")
    ap.add_argument("--strict", action="store_true", help="stop at the first failing arm (tests)")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--out", default=None, help="output stem (default bench/results/layer-<device>)")
    args = ap.parse_args(argv)

    device = C.pick_device(args.device)
    if device.type == "cpu" and not args.tiny and not args.dry_run:
        raise SystemExit("bench/layer.py: the CPU runs only the smoke mode; add --tiny (or use --device cuda)")
    if args.tiny:
        shape = dict(TINY)
        args.warmup = 1 if args.warmup is None else args.warmup
        args.iters = 2 if args.iters is None else args.iters
        args.dropout = 0.0
    else:
        if args.model not in MODELS:
            raise SystemExit(f"--model {args.model!r}: choose one of {sorted(MODELS)} (or --tiny)")
        shape = dict(MODELS[args.model], seq=args.seq, micro_batch=args.micro_batch)
    if args.experts < 0 or args.topk < 1 or (args.experts and args.topk > args.experts):
        raise SystemExit(f"--experts {args.experts} --topk {args.topk}: need experts >= topk >= 1 (or --experts 0)")
    if args.experts:  # each expert a quarter of the dense MLP's width (as mxfp4-train's MoE presets)
        shape.update(experts=args.experts, topk=args.topk, ffn=shape["ffn"] // 4)
    args.warmup = 5 if args.warmup is None else args.warmup
    args.iters = 20 if args.iters is None else args.iters
    if args.no_grouped_experts:
        from megatron_mxfp4.megatron import grouped_experts

        grouped_experts.ENABLED = False
    backend = "reference" if device.type == "cpu" and args.backend == "auto" else args.backend
    try:
        gs = [int(g) for g in args.gs.split(",")]
    except ValueError:
        raise SystemExit(f"--gs must be comma-separated integers, got {args.gs!r}")
    te, te_version = C.transformer_engine()
    all_arms = layer_arms(C.build_arms(gs, [r.strip() for r in args.roundings.split(",")], backend=backend),
                          te is not None, not args.no_ours_on_te)
    arms = C.select_arms(all_arms, args.arms)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.dry_run:
        print(C.arms_table(arms))
        print(f"\nlayer {shape}; TP={world}; Transformer Engine: {te_version if te else 'absent: ' + te_version}")
        return None
    C.install_cpu_shims()
    tp = C.init_distributed(device)
    notes = []
    if any(a.family == "ours" for a in arms):
        note = C.check_fast_kernels(device, args.allow_reference)
        if note:
            notes.append(note)
    if te is None and any(a.needs_te for a in arms):
        msg = f"skipped {', '.join(a.name for a in arms if a.needs_te)}: {te_version}"
        print(msg, flush=True)
        notes.append(msg)
        arms = [a for a in arms if not a.needs_te]
    flush = C.L2Flush(device, enabled=not args.no_flush)
    rows = []
    model = "tiny" if args.tiny else args.model
    stem = args.out or C.default_stem(f"layer-{model}" + (f"-tp{tp}" if tp > 1 else ""), device)
    info = C.device_info(device)

    def result_now(partial: bool) -> dict:
        add_ratios(rows)
        return dict(command=C.command_line(), device_info=info, tp=tp, shape=shape, model=model, part=args.part,
                    dropout=args.dropout, warmup=args.warmup, iters=args.iters, flush_l2=not args.no_flush,
                    notes=notes + (["partial: the run stopped before every arm was measured"] if partial else []),
                    arms=[a.describe() for a in arms], rows=rows)

    with C.megatron_parallel(tp, device):
        for arm in arms:
            row = C.run_arm(arm, args.strict, lambda: bench_arm(arm, shape, args, device, tp, flush))
            rows.append(row)
            if C.rank() == 0:
                C.print_row(f"{arm.name:30s}", row)
                if len(rows) < len(arms):
                    partial = result_now(True)
                    C.write_results(stem, partial, markdown(partial, arms))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    result = result_now(False)
    if C.rank() == 0:
        md = markdown(result, arms)
        paths = C.write_results(stem, result, md)
        print(md)
        print("wrote " + " and ".join(paths))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
