"""`mxfp4-report`: turn a run's diagnostics log into a heat map (layers × steps) and a text summary.

    mxfp4-report RUN [--metric snr] [--out PNG]

RUN is one arm's folder of `mxfp4-train` (``runs/tiny/mxfp4-s1``: its ``diagnostics.jsonl``), a .jsonl
file written by `MXFP4Monitor`, or a whole run folder of `mxfp4-train` (``runs/tiny``): then every arm
folder that holds a diagnostics log gets its heat map, and one table sums up all of them. When an arm's
folder also holds its training log ``metrics.jsonl``, the report gives the cost of the sampling measured
in that same run: the extra time of the sampled steps over the median unsampled step, amortized over the
sampling interval.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from collections import defaultdict
from typing import Dict, List, Optional

from .train.metrics import read_jsonl

LOG = "diagnostics.jsonl"


def find_logs(path: str) -> List[str]:
    """The diagnostics logs that `path` names: a .jsonl file, a folder holding ``diagnostics.jsonl``, or a
    run folder whose arm folders hold one each (sorted by folder name). FileNotFoundError when none."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    if os.path.isfile(path):
        return [path]
    if os.path.isfile(os.path.join(path, LOG)):
        return [os.path.join(path, LOG)]
    logs = sorted(os.path.join(path, d, LOG) for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, LOG)))
    if not logs:
        raise FileNotFoundError(f"no diagnostics log in {path} or in its arm folders (mxfp4-train's MXFP4 arms write "
                                f"<arm>-s<seed>/{LOG} when --diagnostics-interval > 0; in your own loop: "
                                "MXFP4Monitor(jsonl_path=...))")
    return logs


def load_records(path: str) -> List[dict]:
    """The records of a diagnostics log (a path or a folder holding ``diagnostics.jsonl``)."""
    if os.path.isdir(path):
        path = os.path.join(path, LOG)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no diagnostics log at {path} (enable the monitor: MXFP4Monitor(jsonl_path=...))")
    return read_jsonl(path)


def _series(records: List[dict], metric: str) -> Dict[tuple, List[tuple]]:
    """{(layer, GEMM): [(step, value), ...] in step order} of the checks (guard events left out)."""
    stats: Dict[tuple, List[tuple]] = defaultdict(list)
    for r in records:
        if "event" not in r:
            stats[(r["layer"], r["gemm"])].append((r["step"], r[metric]))
    return {k: sorted(v) for k, v in sorted(stats.items())}


def _layer_prefix(layers) -> str:
    """The common dotted prefix of the layer names ("decoder.layers."), cut from labels."""
    prefix = os.path.commonprefix(sorted(layers)) if len(layers) > 1 else ""
    return prefix[:prefix.rfind(".") + 1]


def summarize(records: List[dict], metric: str = "snr") -> str:
    """Per (layer, GEMM): first, last and minimum of `metric`, and guard switches."""
    events = [r for r in records if "event" in r]
    lines = [f"| layer | GEMM | checks | first {metric} | last {metric} | min {metric} |", "|---|---|---|---|---|---|"]
    for (layer, gemm), vals in _series(records, metric).items():
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
    prefix = _layer_prefix(layers)  # "decoder.layers." -> labels "0.mlp.linear_fc1"
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


def run_overhead(run_dir: str, records: List[dict]) -> Optional[Dict[str, float]]:
    """`sampling_overhead` of the run whose training log is ``run_dir/metrics.jsonl`` (None without one)."""
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(metrics):
        return None
    train = [r for r in read_jsonl(metrics) if r.get("kind") == "train"]
    return sampling_overhead(train, {r["step"] for r in records if "event" not in r})


def overview(records: List[dict], metric: str = "snr") -> dict:
    """One run's checks in brief: GEMMs, sampled steps, the minimum of `metric` (and where), the median
    over GEMMs of the last value, guard switches."""
    series = _series(records, metric)
    (low, step), (layer, gemm) = min(((v, s), k) for k, vals in series.items() for s, v in vals)
    return {"gemms": len(series), "checks": len({s for vals in series.values() for s, _ in vals}),
            "min": low, "min_at": (layer[len(_layer_prefix({k[0] for k in series})):], gemm, step),
            "median_last": statistics.median(vals[-1][1] for vals in series.values()),
            "switches": sum(1 for r in records if "event" in r)}


def _report_one(log: str, records: List[dict], metric: str, png: Optional[str]) -> None:
    base = os.path.dirname(log) or "."
    print(summarize(records, metric))
    print(f"heat map: {heatmap(records, png or os.path.join(base, f'diagnostics-{metric}.png'), metric)}")
    try:
        o = run_overhead(base, records)
    except ValueError as e:
        print(f"sampling overhead: not measurable ({e})")
    else:
        if o is not None:
            print(f"sampling overhead: {100 * o['overhead']:.2f}% of training time (a sampled step takes "
                  f"{1e3 * o['extra_per_sample_s']:.1f} ms more than the median step of "
                  f"{1e3 * o['median_step_s']:.1f} ms; {o['sampled_steps']} samples, every {o['interval']:g} steps)")


def _report_many(run: str, logs: List[str], metric: str) -> None:
    """One heat map per arm folder, one table for all of them."""
    lines = [f"| run | GEMMs | checks | min {metric} (layer GEMM, step) | median last {metric} | guard switches | "
             "sampling overhead |", "|---|---|---|---|---|---|---|"]
    maps = []
    for log in logs:
        base = os.path.dirname(log)
        records = load_records(log)
        if not _series(records, metric):
            lines.append(f"| {os.path.basename(base)} | — | 0 | — | — | — | — |")
            continue
        o = overview(records, metric)
        try:
            cost = run_overhead(base, records)
        except ValueError:
            cost = None
        layer, gemm, step = o["min_at"]
        share = "—" if cost is None else f"{100 * cost['overhead']:.2f}%"
        lines.append(f"| {os.path.basename(base)} | {o['gemms']} | {o['checks']} | {o['min']:.3g} ({layer} {gemm}, "
                     f"step {step}) | {o['median_last']:.3g} | {o['switches']} | {share} |")
        maps.append(heatmap(records, os.path.join(base, f"diagnostics-{metric}.png"), metric))
    print(f"{len(logs)} runs with diagnostics in {run}; per layer: mxfp4-report {os.path.join(run, '<run>')}\n")
    print("\n".join(lines))
    print("\nheat maps:\n" + "\n".join(f"  {m}" for m in maps))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mxfp4-report", description=__doc__.splitlines()[0])
    ap.add_argument("run", help="an arm's folder (holding diagnostics.jsonl), a .jsonl file, or a run folder of "
                                "mxfp4-train (every arm folder in it)")
    ap.add_argument("--metric", default="snr", choices=["snr", "rel_err", "cosine", "clip_frac_a", "clip_frac_b",
                                                        "zero_frac_a", "zero_frac_b"])
    ap.add_argument("--out", default=None, help="PNG path of one log's heat map (default: next to the log)")
    args = ap.parse_args(argv)
    try:
        logs = find_logs(args.run)
    except FileNotFoundError as e:
        return _error(str(e))
    if len(logs) > 1:
        if args.out:
            return _error(f"--out names one heat map, and {args.run} holds {len(logs)} runs: give it one of them")
        _report_many(args.run, logs, args.metric)
        return 0
    records = load_records(logs[0])
    if not _series(records, args.metric):
        return _error(f"{logs[0]} holds no checks yet")
    _report_one(logs[0], records, args.metric, args.out)
    return 0


def _error(message: str) -> int:
    print(f"mxfp4-report: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
