"""A MODEL (not a measurement) of the MXFP4-backward speed-up on B200 / B300, from H200 measurements and
datasheet rates, so that a user can judge the recipe before having the hardware.

Inputs:
  (a) our measured H200 quantize kernels (bench/results/quantize-h200.json), scaled by the HBM
      bandwidth ratio of the target GPU to the H200's datasheet 4.8 TB/s (stated; the H200 kernels are
      instruction-bound at 14-35 % of copy bandwidth with SR, so this scaling is optimistic: the
      sensitivity table also shows them at H200 speed);
  (b) datasheet dense tensor-core rates of BF16, FP8 and FP4 (sources printed with the table), times
      an achievable-fraction factor per format (measured "maximum achievable matmul FLOPS" where a
      source has it; an assumption otherwise, stated);
  (c) the GEMM shapes of GPT-1.3B / GPT-6.7B at T = 8192 tokens per micro-batch (TP = 1);
  (d) an explicit assumption for the non-GEMM share f of a BF16 step on the same GPU (default 0.30),
      with the sensitivity to it.
The H200 column uses our measured H200 GEMM rates (bench/results/gemm-h200.json: cuBLAS BF16, FP8
tensorwise, and our `hopper` MXFP4 GEMM end to end) instead of datasheet rates: it is the model's
prediction for the machine we can measure, to be checked against bench/step.py.

    python bench/blackwell_model.py [--f 0.3] [--out bench/results/blackwell-model.md] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

RESULTS = os.path.join(C.REPO, "bench", "results")

# ------------------------------------------------------------------------------------------- inputs

SOURCES = {
    "klockwood_b200": "https://glennklockwood.com/garden/processors/B200",
    "klockwood_b300": "https://glennklockwood.com/garden/processors/B300",
    "nvidia_blackwell_ultra": "https://developer.nvidia.com/blog/inside-nvidia-blackwell-ultra-the-chip-powering-the-ai-factory-era",
    "mleng_table": "https://github.com/stas00/ml-engineering/blob/master/compute/accelerator/README.md",
    "mleng_mamf": "https://github.com/stas00/ml-engineering/blob/master/insights/when-to-upgrade-gpus/README.md",
}

# Dense (no sparsity) tensor-core peak rates in TFLOP/s and HBM bandwidth in TB/s, per GPU.
DATASHEET = {
    "H200": dict(bf16=989.0, fp8=1979.0, fp4=None, hbm=4.8,
                 note="H100/H200 SXM dense rates and H200 HBM3e bandwidth",
                 sources=["mleng_table"]),
    "B200": dict(bf16=2250.0, fp8=4500.0, fp4=9000.0, hbm=8.0,
                 note="HGX B200 (1000 W) dense rates; 8 TB/s HBM3e",
                 sources=["klockwood_b200", "mleng_table"]),
    "B300": dict(bf16=2250.0, fp8=4500.0, fp4=15000.0, hbm=8.0,
                 note="FP4: 15 PFLOP/s dense NVFP4 and 8 TB/s per Blackwell Ultra GPU (NVIDIA); BF16 / FP8: the HGX "
                      "B300 dense rates (same as HGX B200); the HGX B300 FP4 figure is about 13 PFLOP/s (sensitivity)",
                 sources=["nvidia_blackwell_ultra", "klockwood_b300"]),
}
B300_FP4_ALTERNATIVES = {"15 PF (NVIDIA, Blackwell Ultra GPU)": 15000.0, "13 PF (HGX B300)": 13000.0,
                         "9 PF (B200's FP4 rate: MXFP4 without the Ultra FP4 uplift)": 9000.0}

# Achieved / peak for large GEMMs ("maximum achievable matmul FLOPS", B200 measurements).
EFFICIENCY = dict(bf16=1745.0 / 2250.0, fp8=3432.5 / 4500.0)
EFFICIENCY_FP4_ASSUMED = EFFICIENCY["fp8"]  # no FP4 measurement found: assumed equal to FP8's
COPY_EFFICIENCY = 4.2123 / 4.8  # our H200 copy bandwidth over its datasheet HBM bandwidth (quantize-h200.json)

MODELS = {"1.3b": dict(hidden=2048, layers=24, ffn=8192), "6.7b": dict(hidden=4096, layers=32, ffn=16384)}
TOKENS, SEQ, VOCAB = 8192, 2048, 50304  # micro-batch 4 × seq 2048; GPT-2 vocabulary padded as Megatron does
ARMS = {  # (forward format, backward format)
    "BF16": ("bf16", "bf16"),
    "FP8 (TE-like: FP8 fwd + FP8 bwd)": ("fp8", "fp8"),
    "ours: BF16 fwd + MXFP4 bwd": ("bf16", "mxfp4"),
    "ours: FP8 fwd + MXFP4 bwd": ("fp8", "mxfp4"),
}
FORMULAS = """\
Per transformer layer and micro-batch of T tokens (TP = 1), linears i = QKV [h→3h], proj [h→h],
FC1 [h→ffn], FC2 [ffn→h] with F_i = 2·T·in_i·out_i FLOPs per GEMM:

  R_x            = datasheet dense rate of format x × achievable fraction η_x   (x = bf16, fp8, fp4)
  t_fwd          = Σ_i F_i / R_fwd  + [fwd = fp8]  · Σ_i 3 B · (T·in_i + in_i·out_i) / BW_eff
  t_bwd(bf16)    = Σ_i 2·F_i / R_bf16
  t_bwd(fp8)     = Σ_i 2·F_i / R_fp8  + Σ_i (4 B · T·out_i + 2 B · in_i·out_i + 2 B · T·in_i) / BW_eff
  t_bwd(mxfp4)   = Σ_i 2·F_i / R_fp4  + Σ_i [q_dual(T×out_i) + q_col(out_i×in_i) + q_col(T×in_i)] / s_q
  t_attn         = 3 · 2·T·s·h / R_bf16          (causal QKᵀ and PV, forward + backward, never quantized)
  t_head         = 3 · 2·T·h·V / R_bf16          (LM head, never quantized)
  t_gemm(arm)    = L · (t_fwd + t_bwd + t_attn) + t_head
  t_other        = f / (1 − f) · t_gemm(BF16)    (non-GEMM work: norms, softmax, GeLU, dropout, optimizer,
                                                   comm; the same in every arm)
  t_step(arm)    = t_gemm(arm) + t_other         (per micro-batch; the optimizer step is in t_other)
  speed-up       = t_step(reference) / t_step(arm)

q_mode(shape) = H200-measured quantize time: bytes / (median effective TB/s of that kernel mode, g and
rounding over the six measured shapes), bytes = 2 B·n read + copies · (0.5 + 1/32) B·n written.
s_q = HBM_target / 4.8 TB/s (H200 datasheet): the quantize kernels scaled by memory bandwidth.
BW_eff = HBM_target × 0.877 (our measured H200 copy / datasheet) for FP8 casts (3 B/element: read
BF16, write E4M3; dY in both layouts 4 B; transposes of FP8 copies 2 B).
On the H200 column R_x are our measured per-shape rates and t_bwd(mxfp4) uses the measured
end-to-end `hopper` MXFP4 GEMM (layout conversion included), s_q = 1."""


def load_quantize(path: str) -> dict:
    """Median effective TB/s per (mode, g, rounding) of the measured H200 quantize kernels."""
    with open(path) as f:
        q = json.load(f)
    groups = {}
    for r in q["results"]:
        if "ms" not in r or r.get("mode") not in ("rowwise", "columnwise", "dual"):
            continue
        groups.setdefault((r["mode"], r["g"], r["rounding"]), []).append(r["tb_s"])
    return dict(tb_s={k: statistics.median(v) for k, v in groups.items()}, copy_tb_s=q["copy_tb_s"],
                device=q.get("device"), command=q.get("command"))


def load_gemm(path: str) -> dict:
    """Measured H200 TFLOP/s per (model, layer, gemm) at TP = 1: bf16, fp8_tensor, hopper."""
    with open(path) as f:
        g = json.load(f)
    out = {}
    for r in g["rows"]:
        if r["tp"] == 1:
            out[(r["model"], r["layer"], r["gemm"])] = {k: r["tflops"].get(k) for k in ("bf16", "fp8_tensor", "hopper")}
    return dict(rates=out, device=g.get("device"), command=g.get("command"))


def quantize_ms(tb_s: dict, mode: str, g: int, rounding: str, numel: int) -> float:
    copies = 2 if mode == "dual" else 1
    nbytes = numel * 2 + copies * numel * (0.5 + 1 / 32)
    return nbytes / (tb_s[(mode, g, rounding)] * 1e12) * 1e3


# ------------------------------------------------------------------------------------------- the model

def linears(m: dict):
    h, ffn = m["hidden"], m["ffn"]
    return [("qkv", h, 3 * h), ("proj", h, h), ("fc1", h, ffn), ("fc2", ffn, h)]


def step_model(model: str, device: str, q: dict, gemm: dict, f: float, g: int = 64, rounding: str = "sr",
               eta_fp4: float = EFFICIENCY_FP4_ASSUMED, fp4_rate: float = None, scale_quantize: bool = True) -> dict:
    """Milliseconds per micro-batch for every arm, and the backward of the linears alone."""
    m = MODELS[model]
    ds = DATASHEET[device]
    T, h, L = TOKENS, m["hidden"], m["layers"]
    measured = device == "H200"
    bw_eff = ds["hbm"] * 1e12 * COPY_EFFICIENCY
    s_q = 1.0 if (measured or not scale_quantize) else ds["hbm"] / DATASHEET["H200"]["hbm"]

    def rate(fmt: str, layer: str = None, which: str = None) -> float:
        """TFLOP/s of one GEMM."""
        if measured:
            key = {"bf16": "bf16", "fp8": "fp8_tensor", "fp4": "hopper"}[fmt]
            if layer is None:  # attention / LM head: the mean BF16 rate of the model's measured GEMMs
                vals = [v["bf16"] for (mm, _, _), v in gemm["rates"].items() if mm == model and v.get("bf16")]
                return statistics.mean(vals)
            if which == "fwd":
                return statistics.mean(gemm["rates"][(model, layer, w)][key] for w in ("dgrad", "wgrad"))
            return gemm["rates"][(model, layer, which)][key]
        peak = ds[fmt] if fmt != "fp4" else (fp4_rate or ds["fp4"])
        eta = EFFICIENCY.get(fmt, eta_fp4) if fmt != "fp4" else eta_fp4
        return peak * eta

    def ms(flop: float, tflops: float) -> float:
        return flop / (tflops * 1e12) * 1e3

    t_attn = ms(3 * 2.0 * T * SEQ * h, rate("bf16"))
    t_head = ms(3 * 2.0 * T * h * VOCAB, rate("bf16"))
    per_arm, bwd_only = {}, {}
    for arm, (fwd, bwd) in ARMS.items():
        t_fwd = t_bwd = 0.0
        for name, din, dout in linears(m):
            F = 2.0 * T * din * dout
            t_fwd += ms(F, rate(fwd, name, "fwd"))
            if fwd == "fp8":
                t_fwd += 3 * (T * din + din * dout) / bw_eff * 1e3
            if bwd == "bf16":
                t_bwd += ms(F, rate("bf16", name, "dgrad")) + ms(F, rate("bf16", name, "wgrad"))
            elif bwd == "fp8":
                t_bwd += ms(F, rate("fp8", name, "dgrad")) + ms(F, rate("fp8", name, "wgrad"))
                t_bwd += (4 * T * dout + 2 * din * dout + 2 * T * din) / bw_eff * 1e3
            else:
                t_bwd += ms(F, rate("fp4", name, "dgrad")) + ms(F, rate("fp4", name, "wgrad"))
                tq = (quantize_ms(q["tb_s"], "dual", g, rounding, T * dout)
                      + quantize_ms(q["tb_s"], "columnwise", g, rounding, dout * din)
                      + quantize_ms(q["tb_s"], "columnwise", g, rounding, T * din))
                t_bwd += tq / s_q
        per_arm[arm] = L * (t_fwd + t_bwd + t_attn) + t_head
        bwd_only[arm] = t_bwd
    t_other = f / (1 - f) * per_arm["BF16"]
    steps = {arm: t + t_other for arm, t in per_arm.items()}
    return dict(step_ms=steps, gemm_ms=per_arm, other_ms=t_other, bwd_linears_ms_per_layer=bwd_only)


def speedups(res: dict) -> dict:
    s, b = res["step_ms"], res["bwd_linears_ms_per_layer"]
    fp8 = "FP8 (TE-like: FP8 fwd + FP8 bwd)"
    return {
        "bwd_mxfp4_vs_bf16": b["BF16"] / b["ours: BF16 fwd + MXFP4 bwd"],
        "bwd_mxfp4_vs_fp8": b[fp8] / b["ours: BF16 fwd + MXFP4 bwd"],
        "step_ours_bf16_vs_bf16": s["BF16"] / s["ours: BF16 fwd + MXFP4 bwd"],
        "step_ours_fp8_vs_bf16": s["BF16"] / s["ours: FP8 fwd + MXFP4 bwd"],
        "step_ours_fp8_vs_fp8": s[fp8] / s["ours: FP8 fwd + MXFP4 bwd"],
        "step_fp8_vs_bf16": s["BF16"] / s[fp8],
    }


# ------------------------------------------------------------------------------------------- report

def report(q: dict, gemm: dict, f: float) -> tuple:
    devices = ["H200", "B200", "B300"]
    lines = ["# MXFP4 backward on Blackwell: a MODEL, not a measurement", "",
             "**This file is the output of a model** (`bench/blackwell_model.py`); nothing here ran on a B200 or B300. "
             "It combines our H200 measurements with datasheet rates and the assumptions listed below. Re-run it "
             "when measured Blackwell numbers exist, and trust those instead.", "",
             f"Command: `{C.command_line()}`", "", "## Formulas", "", "```", FORMULAS, "```", "",
             "## Inputs", "", "Datasheet dense rates (TFLOP/s, no sparsity) and HBM bandwidth per GPU:", ""]
    rows = []
    for d in devices:
        ds = DATASHEET[d]
        rows.append([d, C.fmt(ds["bf16"], 4), C.fmt(ds["fp8"], 4), C.fmt(ds["fp4"], 5) if ds["fp4"] else "none (no FP4 tensor cores)",
                     ds["hbm"], ds["note"], ", ".join(SOURCES[s] for s in ds["sources"])])
    lines.append(C.markdown_table(["GPU", "BF16", "FP8", "FP4", "HBM TB/s", "what", "source"], rows))
    lines += ["",
              f"- Achievable fraction of peak η (large GEMMs, measured on B200, {SOURCES['mleng_mamf']}): BF16 "
              f"{EFFICIENCY['bf16']:.3f} (1745 of 2250), FP8 {EFFICIENCY['fp8']:.3f} (3432.5 of 4500). "
              f"**FP4/MXFP4: no measurement found; assumed {EFFICIENCY_FP4_ASSUMED:.3f} (= FP8's)**, sensitivity below.",
              "- **MXFP4 rate: datasheets give \"FP4\" (NVIDIA quotes NVFP4 for Blackwell Ultra). That MXFP4 (32-element "
              "blocks, E8M0 scales) runs at the same tensor-core rate is an assumption** — not found in a datasheet; the "
              "B300 sensitivity rows include the B200 FP4 rate (9 PF).",
              f"- H200 quantize kernels (measured, `{q['command']}` on {q['device']}): median effective TB/s over the six "
              f"shapes, for the default recipe (g = 64, SR): dual {q['tb_s'][('dual', 64, 'sr')]:.3f}, columnwise "
              f"{q['tb_s'][('columnwise', 64, 'sr')]:.3f}, rowwise {q['tb_s'][('rowwise', 64, 'sr')]:.3f} TB/s "
              f"(copy bandwidth {q['copy_tb_s']:.3f} TB/s). Scaled to Blackwell by 8.0 / 4.8 = "
              f"{8.0 / 4.8:.3f}× (HBM ratio; optimistic for instruction-bound kernels).",
              f"- H200 GEMM rates (measured, `{gemm['command']}` on {gemm['device']}), TP = 1 rows; our MXFP4 GEMM is the "
              "`hopper` backend end to end (E4M3-tile layout conversion + cuBLASLt 1×128 FP8 GEMM + slab fix).",
              f"- Shapes: T = {TOKENS} tokens per micro-batch (seq {SEQ} × 4), vocabulary {VOCAB}; GPT-1.3B: 24 layers, "
              "h 2048, ffn 8192; GPT-6.7B: 32 layers, h 4096, ffn 16384; TP = 1.",
              f"- **Assumption: non-GEMM share of a BF16 step f = {f:.2f}** on every GPU (the same absolute non-GEMM "
              "time in every arm). Sensitivity below. On the H200 this share can be read from bench/step.py "
              "(BF16 step time − modelled GEMM time) once measured.", ""]
    result = {"assumptions": dict(f=f, eta=EFFICIENCY, eta_fp4=EFFICIENCY_FP4_ASSUMED, copy_efficiency=COPY_EFFICIENCY,
                                  quantize_scaling="HBM ratio"), "datasheet": DATASHEET, "sources": SOURCES,
              "results": {}}
    for model in MODELS:
        lines += [f"## GPT-{model}", "", "Per micro-batch (ms) and speed-ups (reference time ÷ arm time; > 1 is faster). "
                  "H200 = model with our measured H200 rates.", ""]
        res = {d: step_model(model, d, q, gemm, f) for d in devices}
        sp = {d: speedups(res[d]) for d in devices}
        result["results"][model] = {d: dict(res[d], speedups=sp[d]) for d in devices}
        rows = [["backward of the 4 linears, one layer: BF16"] + [C.fmt(res[d]["bwd_linears_ms_per_layer"]["BF16"]) for d in devices],
                ["… FP8 (TE-like)"] + [C.fmt(res[d]["bwd_linears_ms_per_layer"]["FP8 (TE-like: FP8 fwd + FP8 bwd)"]) for d in devices],
                ["… MXFP4 (ours, g=64 SR)"] + [C.fmt(res[d]["bwd_linears_ms_per_layer"]["ours: BF16 fwd + MXFP4 bwd"]) for d in devices],
                ["**backward speed-up MXFP4 vs BF16**"] + [f"**{sp[d]['bwd_mxfp4_vs_bf16']:.2f}×**" for d in devices],
                ["**backward speed-up MXFP4 vs FP8**"] + [f"**{sp[d]['bwd_mxfp4_vs_fp8']:.2f}×**" for d in devices]]
        for arm in ARMS:
            rows.append([f"step: {arm}"] + [C.fmt(res[d]["step_ms"][arm]) for d in devices])
        rows += [["step speed-up: FP8 vs BF16"] + [f"{sp[d]['step_fp8_vs_bf16']:.2f}×" for d in devices],
                 ["**step speed-up: ours BF16 fwd + MXFP4 bwd vs BF16**"] + [f"**{sp[d]['step_ours_bf16_vs_bf16']:.2f}×**" for d in devices],
                 ["**step speed-up: ours FP8 fwd + MXFP4 bwd vs BF16**"] + [f"**{sp[d]['step_ours_fp8_vs_bf16']:.2f}×**" for d in devices],
                 ["**step speed-up: ours FP8 fwd + MXFP4 bwd vs FP8**"] + [f"**{sp[d]['step_ours_fp8_vs_fp8']:.2f}×**" for d in devices]]
        lines += [C.markdown_table(["ms per micro-batch / speed-up", "H200 (measured rates)", "B200 (model)", "B300 (model)"],
                                   rows), ""]
        # sensitivity to f
        fs = (0.1, 0.2, 0.3, 0.4, 0.5)
        srows = []
        for d in ("B200", "B300"):
            for key, what in (("step_ours_bf16_vs_bf16", "ours BF16+MXFP4 vs BF16"),
                              ("step_ours_fp8_vs_fp8", "ours FP8+MXFP4 vs FP8")):
                srows.append([d, what] + [f"{speedups(step_model(model, d, q, gemm, fx))[key]:.2f}×" for fx in fs])
        lines += ["Sensitivity of the step speed-up to the non-GEMM share f:", "",
                  C.markdown_table(["GPU", "speed-up", *[f"f = {fx}" for fx in fs]], srows), ""]
        # sensitivity to FP4 efficiency, quantize scaling, recipe, B300 FP4 rate
        base = {d: speedups(step_model(model, d, q, gemm, f)) for d in ("B200", "B300")}
        variants = [("as above", {}),
                    ("η_fp4 = 0.5", dict(eta_fp4=0.5)),
                    ("quantize at H200 speed (no bandwidth scaling)", dict(scale_quantize=False)),
                    ("recipe g = 0, SR", dict(g=0)), ("recipe g = 256, SR", dict(g=256)),
                    ("recipe g = 64, RTN", dict(rounding="rtn"))]
        vrows = []
        for label, kw in variants:
            cells = []
            for d in ("B200", "B300"):
                s = speedups(step_model(model, d, q, gemm, f, **kw)) if kw else base[d]
                cells += [f"{s['bwd_mxfp4_vs_bf16']:.2f}×", f"{s['step_ours_bf16_vs_bf16']:.2f}×",
                          f"{s['step_ours_fp8_vs_fp8']:.2f}×"]
            vrows.append([label] + cells)
        for label, rate in B300_FP4_ALTERNATIVES.items():
            s = speedups(step_model(model, "B300", q, gemm, f, fp4_rate=rate))
            vrows.append([f"B300 MXFP4 rate {label}", "", "", "", f"{s['bwd_mxfp4_vs_bf16']:.2f}×",
                          f"{s['step_ours_bf16_vs_bf16']:.2f}×", f"{s['step_ours_fp8_vs_fp8']:.2f}×"])
        lines += [f"Other sensitivities (f = {f}):", "",
                  C.markdown_table(["variant", "B200 bwd vs BF16", "B200 step BF16+MXFP4 vs BF16",
                                    "B200 step FP8+MXFP4 vs FP8", "B300 bwd vs BF16", "B300 step BF16+MXFP4 vs BF16",
                                    "B300 step FP8+MXFP4 vs FP8"], vrows), ""]
    lines += ["## Reading", "",
              "- On Blackwell the MXFP4 GEMM has its own tensor-core rate (2× FP8 on B200, ~3.3× on B300 by the datasheets "
              "above), so the backward's GEMM time shrinks; the quantize kernels (RHT + SR + packing) then decide how much "
              "of that reaches the step: the rows \"quantize at H200 speed\" and \"g = 0\" bound that term.",
              "- The step speed-up is capped by the share of the step that the backward linears are: forward GEMMs, "
              "attention, the LM head and the non-GEMM work f are unchanged by an MXFP4 backward.",
              "- The H200 column is the same model fed with our measured H200 rates: it predicts what bench/step.py should "
              "measure; if it does not, the model is missing a cost (see bench/profile_backward.py).",
              "- Not modelled: communication (TP/DP), overlap of quantize with GEMMs, Blackwell's hardware "
              "stochastic-rounding conversion (which would cut the quantize kernels' instruction count), and any "
              "difference between TE's FP8 cast kernels and the 3 B/element floor used here."]
    return "\n".join(lines) + "\n", result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--f", type=float, default=0.30, help="non-GEMM share of a BF16 step (default 0.30)")
    ap.add_argument("--quantize", default=os.path.join(RESULTS, "quantize-h200.json"))
    ap.add_argument("--gemm", default=os.path.join(RESULTS, "gemm-h200.json"))
    ap.add_argument("--out", default=os.path.join(RESULTS, "blackwell-model.md"))
    ap.add_argument("--json", default=None, help="also write the numbers as JSON")
    args = ap.parse_args(argv)
    if not 0 <= args.f < 1:
        raise SystemExit(f"--f is a share of the step time in [0, 1), got {args.f}")
    for p in (args.quantize, args.gemm):
        if not os.path.exists(p):
            raise SystemExit(f"bench/blackwell_model.py: {p} is missing (the measured H200 inputs)")
    q, gemm = load_quantize(args.quantize), load_gemm(args.gemm)
    md, result = report(q, gemm, args.f)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    print(md)
    print(f"wrote {args.out}" + (f" and {args.json}" if args.json else ""))
    return result


if __name__ == "__main__":
    main()
