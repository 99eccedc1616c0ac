"""The run folder's report: ``summary.md`` (+ ``summary.json``) and ``loss.png``.

Reads every ``<arm>-s<seed>/metrics.jsonl`` (finished or not) and ``done.json`` of a run folder:
final validation loss mean ± sample standard deviation over seeds, gap to BF16 (paired by seed
when BF16 ran the same seeds), tokens/s, MFU (tokens/s × `presets.Config.model_flops_per_token` over
the GPUs' BF16 peak, `metrics.PEAK_BF16_FLOPS`; "—" elsewhere) and peak memory; the plot shows the
smoothed train curves and the validation points of every arm (mean over seeds) and, on the lower
axis, each arm's gap to BF16.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from typing import Dict, List, Optional

from .arms import ARMS
from .metrics import read_jsonl


def _runs(out: str) -> Dict[str, Dict[int, dict]]:
    """{arm: {seed: {"train": [...], "valid": [...], "done": {...} or None}}} in the arms' table order."""
    found: Dict[str, Dict[int, dict]] = {}
    if not os.path.isdir(out):
        return found
    for name in sorted(os.listdir(out)):
        d = os.path.join(out, name)
        if not os.path.isdir(d) or "-s" not in name:
            continue
        arm, _, seed = name.rpartition("-s")
        if arm not in ARMS or not seed.isdigit():
            continue
        recs = read_jsonl(os.path.join(d, "metrics.jsonl"))
        done = None
        if os.path.exists(os.path.join(d, "done.json")):
            with open(os.path.join(d, "done.json")) as f:
                done = json.load(f)
        found.setdefault(arm, {})[int(seed)] = {
            "train": [r for r in recs if r.get("kind") == "train"],
            "valid": [r for r in recs if r.get("kind") == "valid"], "done": done}
    order = list(ARMS)
    return {a: found[a] for a in sorted(found, key=order.index)}


def _mean_sd(xs: List[float]):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def _fmt(m, sd, digits=3) -> str:
    if m is None:
        return "—"
    return f"{m:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def _final_val(r: dict) -> Optional[float]:
    if r["done"] is not None:
        return r["done"].get("final_val_loss")
    return None


def aggregate(out: str) -> List[dict]:
    runs = _runs(out)
    base = runs.get("bf16", {})
    rows = []
    for arm, seeds in runs.items():
        finals = {s: _final_val(r) for s, r in seeds.items()}
        done = {s: v for s, v in finals.items() if v is not None}
        m, sd = _mean_sd(list(done.values()))
        gap_m = gap_sd = None
        if arm != "bf16" and done:
            paired = [v - _final_val(base[s]) for s, v in done.items() if s in base and _final_val(base[s]) is not None]
            if paired:
                gap_m, gap_sd = _mean_sd(paired)
        train_m, _ = _mean_sd([r["done"].get("final_train_loss") for r in seeds.values() if r["done"]])
        tps, _ = _mean_sd([r["done"].get("tokens_per_s") for r in seeds.values() if r["done"]])
        mfu, _ = _mean_sd([r["done"].get("mfu") for r in seeds.values() if r["done"]])
        mems = [r["done"].get("peak_memory_mb") for r in seeds.values() if r["done"]]
        progress = {s: (r["train"][-1]["step"] + 1 if r["train"] else 0) for s, r in seeds.items()}
        any_done = next((r["done"] for r in seeds.values() if r["done"]), None)
        rows.append({
            "arm": arm, "seeds": sorted(seeds), "seeds_done": sorted(done), "final_val_mean": m, "final_val_sd": sd,
            "gap_to_bf16_mean": gap_m, "gap_to_bf16_sd": gap_sd, "final_train_mean": train_m,
            "tokens_per_s": tps, "mfu": mfu, "peak_memory_mb": max(mems) if mems else None,
            "memory_kind": any_done.get("memory_kind") if any_done else None,
            "steps_done": progress,
        })
    return rows


def table(rows: List[dict], steps: Optional[int] = None) -> str:
    lines = ["| arm | seeds | final val loss | Δ val vs bf16 | final train loss | tokens/s | MFU | peak mem (MiB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        seeds = ",".join(map(str, r["seeds_done"])) or "—"
        if len(r["seeds_done"]) < len(r["seeds"]):
            unfinished = [f"{s}@{r['steps_done'][s]}" + (f"/{steps}" if steps else "")
                          for s in r["seeds"] if s not in r["seeds_done"]]
            seeds += f" (running: {', '.join(unfinished)})"
        gap = "—" if r["arm"] == "bf16" else _fmt(r["gap_to_bf16_mean"], r["gap_to_bf16_sd"])
        if gap != "—" and r["gap_to_bf16_mean"] is not None and r["gap_to_bf16_mean"] >= 0:
            gap = "+" + gap
        tps = "—" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}"
        mem = "—" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:,.0f}"
        mfu = "—" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {r['arm']} | {seeds} | {_fmt(r['final_val_mean'], r['final_val_sd'])} | {gap} | "
                     f"{_fmt(r['final_train_mean'], None)} | {tps} | {mfu} | {mem} |")
    return "\n".join(lines)


def _ema(xs: List[float], span: int) -> List[float]:
    a = 2.0 / (span + 1)
    out, m = [], None
    for x in xs:
        m = x if m is None else a * x + (1 - a) * m
        out.append(m)
    return out


def curves(out: str):
    """{arm: (train steps, smoothed train loss mean over seeds, valid steps, valid loss mean)}."""
    res = {}
    for arm, seeds in _runs(out).items():
        tr = [r["train"] for r in seeds.values() if r["train"]]
        if not tr:
            continue
        n = min(len(t) for t in tr)
        span = max(1, n // 15)
        sm = [_ema([x["loss"] for x in t[:n]], span) for t in tr]
        steps = [x["step"] for x in tr[0][:n]]
        mean = [statistics.fmean(v) for v in zip(*sm)]
        va = [r["valid"] for r in seeds.values() if r["valid"]]
        vs, vm = [], []
        if va:
            k = min(len(v) for v in va)
            vs = [x["step"] for x in va[0][:k]]
            vm = [statistics.fmean(x["loss"] for x in col) for col in zip(*(v[:k] for v in va))]
        res[arm] = (steps, mean, vs, vm)
    return res


def plot(out: str, title: str = "") -> Optional[str]:
    """Write ``loss.png`` (needs matplotlib; returns None with a note otherwise)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed (pip install 'megatron-mxfp4[train]'); no loss.png")
        return None
    cs = curves(out)
    if not cs:
        return None
    fig, (ax, gx) = plt.subplots(2, 1, figsize=(9, 8), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    colors = {}
    for i, (arm, (ts, tm, vs, vm)) in enumerate(cs.items()):
        c = colors[arm] = f"C{i % 10}"
        ax.plot(ts, tm, color=c, lw=1.3, label=f"{arm} (train, smoothed)")
        if vs:
            ax.plot(vs, vm, color=c, lw=0, marker="o", ms=4, label=f"{arm} (valid)")
    ax.set_ylabel("loss (nats/token)")
    all_tail = [v for (_, tm, _, vm) in cs.values() for v in tm[len(tm) // 5:] + vm]
    if all_tail:
        lo, hi = min(all_tail), max(all_tail)
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-3), hi + 0.15 * (hi - lo + 1e-3))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title or os.path.basename(os.path.abspath(out)))
    if "bf16" in cs:
        bts, btm, bvs, bvm = cs["bf16"]
        bt = dict(zip(bts, btm))
        bv = dict(zip(bvs, bvm))
        for arm, (ts, tm, vs, vm) in cs.items():
            if arm == "bf16":
                continue
            pts = [(s, v - bt[s]) for s, v in zip(ts, tm) if s in bt]
            if pts:
                gx.plot(*zip(*pts), color=colors[arm], lw=1.2, label=f"{arm} − bf16 (train, smoothed)")
            vp = [(s, v - bv[s]) for s, v in zip(vs, vm) if s in bv]
            if vp:
                gx.plot(*zip(*vp), color=colors[arm], lw=0.8, ls="--", marker="o", ms=3, label=f"{arm} − bf16 (valid)")
        gx.axhline(0, color="k", lw=0.8)
        gx.set_ylabel("gap to bf16 (loss)")
        if gx.get_legend_handles_labels()[0]:  # bf16 alone: no gap lines (and legend() would warn)
            gx.legend(fontsize=7)
    else:
        gx.text(0.5, 0.5, "no bf16 arm: no gap to show", ha="center", va="center", transform=gx.transAxes)
    gx.grid(alpha=0.3)
    gx.set_xlabel("step")
    fig.tight_layout()
    path = os.path.join(out, "loss.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_summary(out: str, meta: Optional[dict] = None) -> str:
    """Write summary.md / summary.json / loss.png; returns the results table (markdown)."""
    if meta is None:
        meta = {}
        cfg_path = os.path.join(out, "config.json")
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                meta = json.load(f)
    cfg = meta.get("config", {})
    rows = aggregate(out)
    tab = table(rows, cfg.get("steps"))
    source = (meta.get("data") or {}).get("source") or cfg.get("corpus", "")
    png = plot(out, title=f"{meta.get('preset', '')} — {source}".strip(" —"))
    lines = [f"# mxfp4-train: {meta.get('preset', 'custom')}", ""]
    if meta.get("command"):
        lines += ["```", meta["command"], "```", ""]
    lines += [tab, ""]
    notes = []
    any_done = None
    for arm_dir in sorted(os.listdir(out)) if os.path.isdir(out) else []:
        p = os.path.join(out, arm_dir, "done.json")
        if os.path.exists(p):
            with open(p) as f:
                any_done = json.load(f)
            break
    if any_done:
        notes.append(f"Device: {any_done.get('device')}; compute dtype {any_done.get('dtype')}; transformer impl "
                     f"{any_done.get('transformer_impl')}; TP {any_done.get('tp')}, DP {any_done.get('dp')}.")
        if any_done.get("dtype") == "float32":
            notes.append("On this CPU the model computes in float32, not BF16: the `bf16` arm is the unquantized "
                         "(float32) baseline, and the MXFP4 arms quantize float32 gradients.")
        notes.append(f"Peak memory is the {any_done.get('memory_kind')}"
                     + (" (the whole process: arms that ran in one process share it)." if
                        any_done.get("memory_kind") == "process peak RSS" else "."))
    if cfg:
        tokens = cfg.get("steps", 0) * cfg.get("global_batch", 0) * cfg.get("seq_length", 0)
        notes.append(f"Model: {cfg.get('layers')} layers × {cfg.get('hidden')} hidden, {cfg.get('heads')} heads, "
                     f"FFN {cfg.get('ffn')}, sequence {cfg.get('seq_length')}, "
                     f"~{meta.get('params', 0) / 1e6:.1f}M parameters; {cfg.get('steps')} steps × "
                     f"{cfg.get('global_batch')} sequences = {tokens:,} tokens; LR {cfg.get('lr')} → "
                     f"{cfg.get('min_lr')} (warmup {cfg.get('warmup')}, cosine), dropout {cfg.get('dropout')}.")
    data = meta.get("data") or {}
    if data:
        epochs = ""
        if data.get("train_tokens") and cfg:
            epochs = f" ({tokens / data['train_tokens']:.3g} epochs of its train split)"
        notes.append(f"Data: {data.get('source')} — {data.get('documents', 0):,} documents, {data.get('tokens', 0):,} "
                     f"tokens (fingerprint {data.get('corpus_fingerprint')}), tokenizer {data.get('tokenizer')}"
                     f"{epochs}.")
    notes.append("Final val loss: the validation loss at the last step (mean ± sample std over seeds); Δ: paired by "
                 "seed against bf16; final train loss: mean of the last 10% of steps; tokens/s: median step.")
    lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    if png:
        lines += ["![loss](loss.png)", ""]
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"rows": rows, "meta": meta}, f, indent=1, default=str)
    return tab
