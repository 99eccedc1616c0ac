"""Full GPT training steps through the project's entry point, one run per arm, side by side.

Each arm is a `python -m megatron_mxfp4.pretrain_gpt` job launched by configs/pretrain_gpt.sh (the
same command lines as training: mock data, the model's preset, `--use-distributed-optimizer`,
`--no-gradient-accumulation-fusion`, and for the local spec without apex `--no-persist-layer-norm
--no-masked-softmax-fusion`), shortened to --iters iterations with a small global batch. Megatron's
own log lines give the timing: "elapsed time per iteration (ms)" (its timers, with a barrier) and
"throughput per GPU (TFLOP/s/GPU)" averaged over each --log-interval; the first --skip iterations
(start-up, warm-up, DelayedScaling's amax history) are left out and the median over the remaining
intervals is reported. Peak memory is Megatron's "max allocated" (`--log-memory-interval`).

Models: 345m (24 layers, h 1024, seq 1024, micro-batch 8, global batch 64: the paper's smallest model with its
batch) on 1 GPU; 1.3b (24 layers, h 2048, seq 2048) on 1 GPU (TP=1); 6.7b (32 layers, h 4096, seq 2048) on 2
GPUs (TP=2 over NCCL, distributed optimizer, selective activation recomputation so that the local
spec's unfused attention fits). Micro-batch 4 × seq 2048 = 8192 tokens per micro-batch.

Arms (pretrain_gpt.sh's ARM and TRANSFORMER_IMPL; `--arms` takes name patterns):
  bf16_local / bf16_te             stock Megatron, BF16, local or Transformer Engine spec
  te_fp8_delayed / te_fp8_current  TE FP8 (hybrid delayed / E4M3 tensorwise current scaling)
  mxfp4_local / mxfp4_te           --mxfp4-backward, BF16 forward (g=64, SR; variants _g0_sr, ...)
  mxfp4_fp8_local / mxfp4_fp8_te   --mxfp4-backward --mxfp4-forward fp8
  ours_fp8_fp8                     --mxfp4-backward --mxfp4-forward fp8 --mxfp4-backward-format fp8
TE arms and *_te run only where transformer_engine imports.
Ratios: "× BF16" against the BF16 arm of the same spec (local / TE); "× TE FP8" against te_fp8_delayed.

    python bench/step.py --model 1.3b [--gpus 0,1] [--arms 'bf16_*,mxfp4_*'] [--iters 30] [--time-budget 540]
    python bench/step.py --model 6.7b --gpus 0,1
    python bench/step.py --model 345m --arms 'bf16_local,mxfp4_local,bf16_te,te_fp8_delayed,mxfp4_te,mxfp4_fp8_te'
    python bench/step.py --model 1.3b --dry-run        print the command of every arm, run nothing

With more GPUs than TP needs, arms run concurrently, one per group of TP GPUs (stated in the output).
Writes STEM.json / STEM.md (default bench/results/step-<model>-<device>) after every arm, and the
per-arm logs to --log-dir (default: beside the results).
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

LAUNCHER = os.path.join(C.REPO, "configs", "pretrain_gpt.sh")
MODELS = {
    "345m": dict(tp=1, micro_batch=8, global_batch=64, iters=30, extra=[]),  # the paper's smallest, its batch
    "1.3b": dict(tp=1, micro_batch=4, global_batch=8, iters=30, extra=[]),
    "6.7b": dict(tp=2, micro_batch=4, global_batch=8, iters=20, extra=["--recompute-activations"]),
    "tiny": dict(tp=1, micro_batch=4, global_batch=16, iters=30, extra=[]),
}
SEQ = {"345m": 1024, "1.3b": 2048, "6.7b": 2048, "tiny": 512}


@dataclass
class StepArm:
    name: str
    label: str
    launcher_arm: str  # pretrain_gpt.sh ARM
    impl: str  # local | transformer_engine
    extra: List[str] = field(default_factory=list)
    mxfp4_args: str = ""
    runnable: Optional[str] = None  # None, or why it cannot run

    @property
    def needs_te(self) -> bool:
        return self.impl == "transformer_engine"


def step_arms(gs=(0, 64, 256), roundings=("sr", "rtn")) -> List[StepArm]:
    arms = [StepArm("bf16_local", "BF16, megatron-core local spec", "bf16", "local"),
            StepArm("bf16_te", "BF16, Transformer Engine spec", "bf16", "transformer_engine"),
            StepArm("te_fp8_delayed", "TE FP8, delayed scaling (hybrid)", "te_fp8", "transformer_engine",
                    extra=["--fp8-format", "hybrid", "--fp8-recipe", "delayed"]),
            StepArm("te_fp8_current", "TE FP8, current scaling (E4M3 tensorwise)", "te_fp8", "transformer_engine"),
            StepArm("ours_fp8_fp8", "ours: FP8 fwd + FP8 bwd", "mxfp4_fp8", "local",
                    mxfp4_args="--mxfp4-backward-format fp8")]
    for fwd, arm in (("bf16", "mxfp4"), ("fp8", "mxfp4_fp8")):
        for impl, suffix in (("local", "local"), ("transformer_engine", "te")):
            for g in gs:
                for r in roundings:
                    tail = "" if (g, r) == (64, "sr") else f"_g{g}_{r}"
                    arms.append(StepArm(f"{arm}_{suffix}{tail}",
                                        f"ours: {fwd.upper()} fwd + MXFP4 bwd (g={g}, {r.upper()}), {suffix} spec",
                                        arm, impl, mxfp4_args=f"--mxfp4-rht-block {g} --mxfp4-rounding {r}"))
    return arms


# run order: the no-TE arms first (they run everywhere), then the TE ones
DEFAULT_ARMS = ("bf16_local,mxfp4_local,mxfp4_fp8_local,bf16_te,te_fp8_delayed,mxfp4_te,mxfp4_fp8_te,te_fp8_current,"
                "ours_fp8_fp8")


def select(arms: List[StepArm], patterns: str) -> List[StepArm]:
    import fnmatch

    pats = [p.strip() for p in (patterns or DEFAULT_ARMS).split(",") if p.strip()]
    chosen = []  # in the order of the patterns (the run order), each pattern's matches in table order
    for p in pats:
        chosen += [a for a in arms if fnmatch.fnmatchcase(a.name, p) and a not in chosen]
    unknown = [p for p in pats if not any(fnmatch.fnmatchcase(a.name, p) for a in arms)]
    if unknown:
        raise SystemExit(f"--arms: no arm matches {unknown}; arms are: {', '.join(a.name for a in arms)}")
    return chosen


def arm_env(arm: StepArm, model: str, cfg: dict, gpus: List[int], port: int, iters: int, log_interval: int) -> Dict[str, str]:
    env = {"MODEL": model, "ARM": arm.launcher_arm, "TRANSFORMER_IMPL": arm.impl, "GPUS_PER_NODE": str(len(gpus)),
           "TP": str(cfg["tp"]), "MICRO_BATCH": str(cfg["micro_batch"]), "GLOBAL_BATCH": str(cfg["global_batch"]),
           "TRAIN_ITERS": str(iters), "LR_DECAY_ITERS": str(iters), "LOG_INTERVAL": str(log_interval),
           "EVAL_ITERS": "0", "EVAL_INTERVAL": "1000000", "MASTER_PORT": str(port),
           "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in gpus), "MXFP4_ARGS": arm.mxfp4_args,
           "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
           "CUDA_DEVICE_MAX_CONNECTIONS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHON": os.environ.get("PYTHON", sys.executable)}
    return env


def extra_args(arm: StepArm, cfg: dict, log_interval: int, seed: int) -> List[str]:
    return ["--seed", str(seed), "--log-memory-interval", str(log_interval)] + cfg["extra"] + arm.extra


def launcher_command(env: Dict[str, str], args: List[str], launcher: str = LAUNCHER) -> str:
    """The exact command pretrain_gpt.sh runs for this arm (its DRY_RUN mode)."""
    full = dict(os.environ, **env, DRY_RUN="1")
    out = subprocess.run(["bash", launcher] + args, env=full, capture_output=True, text=True, timeout=60)
    if out.returncode:
        raise RuntimeError(f"pretrain_gpt.sh DRY_RUN failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    return out.stdout.strip()


# ------------------------------------------------------------------------------------------- log parsing

_ITER = re.compile(r"iteration\s+(\d+)/\s*(\d+)\s*\|(.*)")
_MS = re.compile(r"elapsed time per iteration \(ms\):\s*([0-9.]+)")
_TF = re.compile(r"throughput per GPU \(TFLOP/s/GPU\):\s*([0-9.]+)")
_LOSS = re.compile(r"lm loss:\s*([0-9.Ee+-]+)")
_GBS = re.compile(r"global batch size:\s*(\d+)")
_MEM = re.compile(r"max allocated:\s*([0-9.]+)")
_SKIPPED = re.compile(r"number of skipped iterations:\s*(\d+)")


def parse_log(text: str) -> dict:
    """Megatron's interval log lines: [{iteration, ms, tflops, loss, global_batch, skipped}], the
    "max allocated" MB of every memory report, and the megatron_mxfp4 recipe line."""
    intervals = []
    for line in text.splitlines():
        m = _ITER.search(line)
        if not m:
            continue
        rest = m.group(3)
        ms, tf, loss, gbs, sk = (_MS.search(rest), _TF.search(rest), _LOSS.search(rest), _GBS.search(rest),
                                 _SKIPPED.search(rest))
        if ms is None:
            continue
        intervals.append(dict(iteration=int(m.group(1)), train_iters=int(m.group(2)), ms=float(ms.group(1)),
                              tflops=float(tf.group(1)) if tf else None, loss=float(loss.group(1)) if loss else None,
                              global_batch=int(gbs.group(1)) if gbs else None,
                              skipped=int(sk.group(1)) if sk else 0))
    mem = [float(x) for x in _MEM.findall(text)]
    recipe = next((ln.split("megatron_mxfp4:", 1)[1].strip() for ln in text.splitlines() if "megatron_mxfp4:" in ln
                   and ("MXFP4 backward" in ln or "stock Megatron" in ln)), None)
    return dict(intervals=intervals, max_allocated_mb=mem, recipe_line=recipe)


def summarize(parsed: dict, skip: int, seq: int, tp: int) -> dict:
    """Medians over the intervals that start after iteration `skip`."""
    good = [iv for iv in parsed["intervals"] if iv["iteration"] > skip]
    if not good:
        return dict(status="no timed interval after warm-up" if parsed["intervals"] else "no iteration logged")
    ms = statistics.median(iv["ms"] for iv in good)
    tfs = [iv["tflops"] for iv in good if iv["tflops"] is not None]
    gbs = good[-1]["global_batch"]
    out = dict(status="ok", ms_per_iter=ms, intervals_used=len(good), ms_per_interval=[iv["ms"] for iv in good],
               tflops_per_gpu=statistics.median(tfs) if tfs else None, last_iteration=good[-1]["iteration"],
               last_loss=good[-1]["loss"], skipped_iterations=sum(iv["skipped"] for iv in good))
    if gbs:
        out["tokens_per_s"] = gbs * seq / (ms * 1e-3)
        out["tokens_per_s_per_gpu"] = out["tokens_per_s"] / tp
    if parsed["max_allocated_mb"]:
        out["peak_allocated_mib"] = max(parsed["max_allocated_mb"])
    return out


def add_ratios(rows: List[dict]) -> None:
    by = {r["arm"]: r for r in rows if r.get("status") == "ok"}
    for r in rows:
        if r.get("status") != "ok":
            continue
        ref = "bf16_te" if r["impl"] == "transformer_engine" else "bf16_local"
        for key, b in (("x_bf16", by.get(ref)), ("x_te_fp8", by.get("te_fp8_delayed"))):
            r[key] = None if b is None else round(r["ms_per_iter"] / b["ms_per_iter"], 4)
        r["bf16_reference"] = ref


# ------------------------------------------------------------------------------------------- running

def run_arm(arm: StepArm, env: Dict[str, str], args_list: List[str], log_path: str, timeout: float,
            launcher: str = LAUNCHER) -> dict:
    full = dict(os.environ, **env)
    full["PYTHONPATH"] = C.REPO + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    t0 = time.time()
    with open(log_path, "w") as log:
        try:
            p = subprocess.run(["timeout", "--signal=TERM", "--kill-after=15", str(int(timeout)), "bash", launcher]
                               + args_list, env=full, cwd=C.REPO, stdout=log, stderr=subprocess.STDOUT)
            rc = p.returncode
        except Exception as e:  # pragma: no cover - launcher missing
            log.write(f"\n[step.py: launch failed: {e}]\n")
            rc = -1
    return dict(returncode=rc, wall_s=round(time.time() - t0, 1), timed_out=rc in (124, 137))


def markdown(result: dict) -> str:
    info = result["device_info"]
    lines = [f"# GPT-{result['model']} training step, every arm — {info['device']}", "",
             f"Command: `{result['command']}`  ",
             f"torch {info['torch']}" + (f", CUDA {info.get('cuda')}" if info.get("cuda") else "")
             + (f", megatron-core {info['megatron_core']}" if info.get("megatron_core") else "")
             + f", Transformer Engine: {info.get('transformer_engine') or 'not installed'}. "
             f"TP={result['tp']}, micro-batch {result['micro_batch']} × seq {result['seq']}, global batch "
             f"{result['global_batch']}, {result['iters']} iterations, log interval {result['log_interval']}, "
             f"the first {result['skip']} iterations left out; ms/iter = median of Megatron's interval averages.", ""]
    for note in result.get("notes", []):
        lines.append(f"> {note}  ")
    lines += ["", "`× BF16` = ms/iter ÷ the BF16 arm of the same spec; `× TE FP8` = ÷ te_fp8_delayed (< 1 is faster). "
              "TFLOP/s/GPU is Megatron's model-FLOP count. Peak = Megatron's max allocated (MiB).", ""]
    rows = []
    for r in result["rows"]:
        if r.get("status") != "ok":
            rows.append([r["arm"], r.get("impl", ""), "", "", "", "", "", "", "", r.get("status", "")])
            continue
        rows.append([r["arm"], r["impl"], C.fmt(r["ms_per_iter"], 4), C.fmt(r.get("tflops_per_gpu")),
                     C.fmt(r.get("tokens_per_s")), C.fmt(r.get("x_bf16")), C.fmt(r.get("x_te_fp8")),
                     C.fmt(r.get("peak_allocated_mib"), 5), C.fmt(r.get("last_loss"), 4), "ok"])
    lines.append(C.markdown_table(["arm", "spec", "ms/iter", "TFLOP/s/GPU", "tokens/s", "× BF16", "× TE FP8",
                                   "peak MiB", "lm loss (last)", "status"], rows))
    lines += ["", "Commands (pretrain_gpt.sh DRY_RUN; run with the environment printed in the JSON):", ""]
    for r in result["rows"]:
        if r.get("command"):
            lines.append(f"- `{r['arm']}`: `{r['command']}`")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="1.3b", choices=sorted(MODELS))
    ap.add_argument("--arms", default=None, help=f"comma-separated name patterns (default {DEFAULT_ARMS})")
    ap.add_argument("--gpus", default=None, help="GPU indices to use (default: all visible)")
    ap.add_argument("--iters", type=int, default=None, help="training iterations per arm (default 30 / 20 for 6.7b)")
    ap.add_argument("--log-interval", type=int, default=5)
    ap.add_argument("--skip", type=int, default=10, help="iterations left out of the medians (default 10)")
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--global-batch", type=int, default=None)
    ap.add_argument("--arm-timeout", type=float, default=300, help="seconds per arm before it is stopped")
    ap.add_argument("--time-budget", type=float, default=540,
                    help="stop starting new arms when this many seconds have passed (default 540)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--log-dir", default=None)
    ap.add_argument("--launcher", default=LAUNCHER,
                    help="launch script honouring pretrain_gpt.sh's variables and DRY_RUN (default configs/pretrain_gpt.sh)")
    ap.add_argument("--dry-run", action="store_true", help="print every arm's command and exit")
    ap.add_argument("--out", default=None, help="output stem (default bench/results/step-<model>-<device>)")
    args = ap.parse_args(argv)

    cfg = dict(MODELS[args.model])
    if args.micro_batch:
        cfg["micro_batch"] = args.micro_batch
    if args.global_batch:
        cfg["global_batch"] = args.global_batch
    iters = args.iters or cfg["iters"]
    if args.skip >= iters:
        raise SystemExit(f"--skip {args.skip} leaves no timed iteration of --iters {iters}")
    if args.log_interval < 1 or args.log_interval > iters:
        raise SystemExit(f"--log-interval must be in [1, {iters}], got {args.log_interval}")
    arms = select(step_arms(), args.arms)
    te, te_version = C.transformer_engine()
    import torch

    ngpu = torch.cuda.device_count()
    try:
        gpus = [int(g) for g in args.gpus.split(",")] if args.gpus else list(range(ngpu))
    except ValueError:
        raise SystemExit(f"--gpus must be comma-separated GPU indices, got {args.gpus!r}")
    tp = cfg["tp"]
    slots = [gpus[i:i + tp] for i in range(0, len(gpus) - tp + 1, tp)]
    notes = []
    if args.dry_run:
        slots = slots or [list(range(tp))]
        for i, arm in enumerate(arms):
            env = arm_env(arm, args.model, cfg, slots[0], 29600 + 10 * i, iters, args.log_interval)
            status = arm.runnable or ("needs Transformer Engine" if arm.needs_te and te is None else "runnable")
            print(f"{arm.name} [{status}]\n  env: {' '.join(f'{k}={shlex.quote(v)}' for k, v in env.items() if k in ('MODEL', 'ARM', 'TRANSFORMER_IMPL', 'TP', 'MXFP4_ARGS'))}")
            if not arm.runnable:
                print("  " + launcher_command(env, extra_args(arm, cfg, args.log_interval, args.seed), args.launcher))
        return None
    if not slots:
        raise SystemExit(f"bench/step.py: GPT-{args.model} needs {tp} GPU(s) (TP={tp}); found {ngpu}")
    if len(slots) > 1:
        notes.append(f"{len(slots)} arms ran at a time, each on its own {tp} GPU(s) of the same host "
                     f"(slots {slots})")
    if torch.cuda.is_available() and any(a.launcher_arm.startswith("mxfp4") and not a.runnable for a in arms):
        from megatron_mxfp4.ops import cuda_quantize

        if not cuda_quantize.is_available():
            raise SystemExit(f"bench/step.py: the MXFP4 arms need the compiled quantizer: {cuda_quantize._LOAD_ERROR}")
    from torch import device as _dev

    dev = _dev("cuda", slots[0][0]) if torch.cuda.is_available() else _dev("cpu")
    stem = args.out or C.default_stem(f"step-{args.model}", dev)
    log_dir = args.log_dir or (stem + "-logs")
    os.makedirs(log_dir, exist_ok=True)
    rows: List[dict] = []
    queue = []
    for arm in arms:
        row = dict(arm=arm.name, label=arm.label, impl=arm.impl)
        if arm.runnable:
            row["status"] = f"not runnable: {arm.runnable}"
        elif arm.needs_te and te is None:
            row["status"] = f"skipped: {te_version}"
            print(f"{arm.name}: skipped ({te_version})", flush=True)
        else:
            queue.append((arm, row))
        rows.append(row)
    seq = SEQ[args.model]
    result = dict(command=C.command_line(), device_info=C.device_info(dev), model=args.model,
                  tp=tp, micro_batch=cfg["micro_batch"], global_batch=cfg["global_batch"], seq=seq, iters=iters,
                  log_interval=args.log_interval, skip=args.skip, notes=notes, rows=rows,
                  log_dir=os.path.relpath(os.path.abspath(log_dir), C.REPO))  # no machine path in the record
    start = time.time()
    lock = threading.Lock()

    def write():
        with lock:
            add_ratios(rows)
            C.write_results(stem, result, markdown(result))

    def worker(slot_index: int, slot: List[int]):
        port = 29500 + 50 * slot_index
        while True:
            with lock:
                if not queue:
                    return
                arm, row = queue.pop(0)
            left = args.time_budget - (time.time() - start)
            if left < 60:
                row["status"] = f"not run: time budget of {args.time_budget:.0f} s spent"
                continue
            port += 7
            env = arm_env(arm, args.model, cfg, slot, port, iters, args.log_interval)
            xargs = extra_args(arm, cfg, args.log_interval, args.seed)
            row["env"] = {k: v for k, v in env.items() if k != "PYTHON"}
            try:
                row["command"] = launcher_command(env, xargs, args.launcher)
            except Exception as e:
                row["status"] = f"launcher failed: {e}"
                continue
            log_path = os.path.join(log_dir, f"{arm.name}.log")
            print(f"[{time.time() - start:6.0f} s] {arm.name} on GPU {slot} ...", flush=True)
            run = run_arm(arm, env, xargs, log_path, min(args.arm_timeout, left), args.launcher)
            with open(log_path, errors="replace") as f:
                text = f.read()
            parsed = parse_log(text)
            summary = summarize(parsed, args.skip, seq, tp)
            with lock:
                row.update(run, **summary, log=os.path.relpath(log_path, C.REPO), recipe_line=parsed["recipe_line"])
                if run["returncode"] != 0 and summary.get("status") == "ok":
                    row["exit_note"] = f"exit code {run['returncode']} after the timed intervals"
                elif run["returncode"] != 0:
                    row["status"] = f"failed (exit {run['returncode']}{', timed out' if run['timed_out'] else ''})"
                    row["log_tail"] = "\n".join(text.strip().splitlines()[-8:])
            print(f"[{time.time() - start:6.0f} s] {arm.name}: {row['status']}"
                  + (f", {row['ms_per_iter']:.1f} ms/iter, {row.get('tflops_per_gpu')} TFLOP/s/GPU"
                     if row.get("status") == "ok" else ""), flush=True)
            write()

    threads = [threading.Thread(target=worker, args=(i, s)) for i, s in enumerate(slots)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    write()
    print(markdown(result))
    print(f"wrote {stem}.json and {stem}.md; logs in {log_dir}")
    return result


if __name__ == "__main__":
    main()
