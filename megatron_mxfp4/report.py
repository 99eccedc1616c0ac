"""`mxfp4-report`: turn a run's diagnostics log into a heat map (layers × steps) and a text summary.

    mxfp4-report RUN_DIR [--metric snr] [--out RUN_DIR/diagnostics.png]

Reads `RUN_DIR/diagnostics.jsonl` (or a .jsonl path), as written by `MXFP4Monitor`. When the run folder
also holds the training log `metrics.jsonl` (`mxfp4-train`), it reports the cost of the sampling measured
in that same run: the extra time of the sampled steps over the median unsampled step, amortized over the
sampling interval.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from collections import defaultdict
from typing import Dict, List


def load_records(path: str) -> List[dict]:
    if os.path.isdir(path):
        path = os.path.join(path, "diagnostics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no diagnostics log at {path} (enable the monitor: MXFP4Monitor(jsonl_path=...))")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(records: List[dict], metric: str = "snr") -> str:
    """Per (layer, GEMM): first, last and minimum of `metric`, and guard switches."""
    stats: Dict[tuple, List[tuple]] = defaultdict(list)
    events = [r for r in records if "event" in r]
    for r in records:
        if "event" not in r:
            stats[(r["layer"], r["gemm"])].append((r["step"], r[metric]))
    lines = [f"| layer | GEMM | checks | first {metric} | last {metric} | min {metric} |", "|---|---|---|---|---|---|"]
    for (layer, gemm), vals in sorted(stats.items()):
        vals.sort()
        series = [v for _, v in vals]
        lines.append(f"| {layer} | {gemm} | {len(vals)} | {series[0]:.3g} | {series[-1]:.3g} | {min(series):.3g} |")
    if events:
        lines.append("")
        lines += [f"- step {e['step']}: {e['layer']} {e['gemm']} {e['event']} (SNR {e['snr']:.3g} < "
                  f"{e['threshold']} for {e['patience']} checks)" for e in events]
    return "\n".join(lines)


def sampling_overhead(train_records: List[dict], sampled_steps, skip_first: int = 3) -> Dict[str, float]:
    """Cost of the diagnostics, measured in the run itself.

    `train_records`: the run's per-step records (``kind == "train"``, with ``step`` and ``step_time``);
    `sampled_steps`: the steps on which the monitor measured. The first `skip_first` steps (warm-up,
    compilation) are left out of both groups. Returns the median unsampled step time, the mean extra time
    of a sampled step, the sampling interval (median gap between sampled steps) and the overhead: extra /
    (interval · median step), the fraction of training time the sampling adds."""
    import statistics

    sampled = set(sampled_steps)
    times = {r["step"]: r["step_time"] for r in train_records if r.get("kind", "train") == "train"}
    plain = [t for s, t in times.items() if s >= skip_first and s not in sampled]
    hits = sorted(s for s in sampled if s >= skip_first and s in times)
    if len(plain) < 2 or not hits:
        raise ValueError(f"need unsampled and sampled steps after step {skip_first}: "
                         f"{len(plain)} unsampled, {len(hits)} sampled")
    base = statistics.median(plain)
    extra = sum(times[s] for s in hits) / len(hits) - base
    all_sampled = sorted(sampled)
    gaps = [b - a for a, b in zip(all_sampled, all_sampled[1:])]
    interval = statistics.median(gaps) if gaps else float(len(times))
    return {"median_step_s": base, "extra_per_sample_s": extra, "sampled_steps": len(hits),
            "interval": interval, "overhead": extra / (interval * base)}


def heatmap(records: List[dict], out: str, metric: str = "snr") -> str:
    """One panel per GEMM: rows = layers, columns = sampled steps, colour = log10(metric)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if "event" not in r]
    gemms = sorted({r["gemm"] for r in rows})
    layers = sorted({r["layer"] for r in rows}, key=_natural)
    steps = sorted({r["step"] for r in rows})
    prefix = os.path.commonprefix(layers) if len(layers) > 1 else ""
    prefix = prefix[:prefix.rfind(".") + 1]  # cut at a dot: "decoder.layers." -> labels "0.mlp.linear_fc1"
    panel_w = max(3.0, 0.3 * len(steps))
    fig, axes = plt.subplots(1, len(gemms), figsize=(2.5 + panel_w * len(gemms), 1.5 + 0.2 * len(layers)),
                             squeeze=False, sharey=True)
    for k, (ax, gemm) in enumerate(zip(axes[0], gemms)):
        grid = [[math.nan] * len(steps) for _ in layers]
        for r in rows:
            if r["gemm"] == gemm:
                v = r[metric]
                grid[layers.index(r["layer"])][steps.index(r["step"])] = math.log10(v) if v > 0 else math.nan
        im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_title(f"{gemm}: log10 {metric}")
        if k == 0:
            ax.set_yticks(range(len(layers)), [n[len(prefix):] for n in layers], fontsize=7)
            if prefix:
                ax.set_ylabel(prefix.rstrip("."))
        ticks = list(range(0, len(steps), max(1, len(steps) // 8)))
        ax.set_xticks(ticks, [steps[i] for i in ticks])
        ax.set_xlabel("step")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in name.replace(".", " ").split()]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="mxfp4-report", description=__doc__.splitlines()[0])
    ap.add_argument("run", help="run folder (holding diagnostics.jsonl) or a .jsonl file")
    ap.add_argument("--metric", default="snr", choices=["snr", "rel_err", "cosine", "clip_frac_a", "clip_frac_b",
                                                        "zero_frac_a", "zero_frac_b"])
    ap.add_argument("--out", default=None, help="PNG path (default: next to the log)")
    args = ap.parse_args(argv)
    records = load_records(args.run)
    base = args.run if os.path.isdir(args.run) else os.path.dirname(args.run) or "."
    out = args.out or os.path.join(base, f"diagnostics-{args.metric}.png")
    print(summarize(records, args.metric))
    print(f"heat map: {heatmap(records, out, args.metric)}")
    metrics = os.path.join(base, "metrics.jsonl")
    if os.path.exists(metrics):
        with open(metrics) as f:
            train = [r for r in map(json.loads, filter(str.strip, f)) if r.get("kind") == "train"]
        steps = {r["step"] for r in records if "event" not in r}
        try:
            o = sampling_overhead(train, steps)
        except ValueError as e:
            print(f"sampling overhead: not measurable ({e})")
        else:
            print(f"sampling overhead: {100 * o['overhead']:.2f}% of training time (a sampled step takes "
                  f"{1e3 * o['extra_per_sample_s']:.1f} ms more than the median step of "
                  f"{1e3 * o['median_step_s']:.1f} ms; {o['sampled_steps']} samples, every {o['interval']:g} steps)")


if __name__ == "__main__":
    main()
