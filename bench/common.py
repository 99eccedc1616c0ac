"""Shared helpers of the benchmark scripts in bench/.

- timing: `events_median` / `graph_time` (CUDA events, CUDA-graph replays) and `measure`, the
  harness of the end-to-end benchmarks: warm-up, then the median over timed iterations, each
  preceded by an untimed `setup` (rotating inputs, a forward whose backward is timed) and an L2
  flush; CUDA events on a GPU, the host clock on the CPU;
- `peak_memory`: extra device memory one call allocates at its peak;
- the arm table of linear.py / layer.py (`build_arms`, `select_arms`), Transformer Engine
  detection and its FP8 autocast;
- a one-process (or torchrun) distributed start and megatron-core model parallelism, with the
  shims megatron-core needs on a CPU-only machine;
- device facts, the exact command line, markdown tables and the JSON + markdown writer.

The scripts run as `python bench/<name>.py` (bench/ is then on sys.path) and import this module as
`common`; tests load it the same way.
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Sequence

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from megatron_mxfp4._cpu_shims import install_cpu_shims  # noqa: E402,F401  (used by the bench scripts)

L2_FLUSH_BYTES = 256 << 20  # > 4x the H200's 60 MB L2

# --------------------------------------------------------------------------------------------- timing


def events_median(fn, iters: int) -> float:
    """Median milliseconds of fn() over iters runs, timed with CUDA events."""
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def graph_time(fn, reps: int = 10, iters: int = 7) -> float:
    """Median milliseconds per call of fn, from replays of a CUDA graph holding `reps` calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    ms = events_median(graph.replay, iters) / reps
    del graph
    return ms


class L2Flush:
    """Overwrites a buffer larger than the L2 cache (a no-op on the CPU), so that the timed region
    starts with a cold cache whatever ran before it."""

    def __init__(self, device: torch.device, nbytes: int = L2_FLUSH_BYTES, enabled: bool = True):
        self.buf = torch.empty(nbytes, dtype=torch.uint8, device=device) if enabled and device.type == "cuda" else None

    def __call__(self) -> None:
        if self.buf is not None:
            self.buf.zero_()


@dataclass
class Timing:
    """Milliseconds of the timed iterations (median, 20th and 80th percentile)."""

    median: float
    p20: float
    p80: float
    iters: int
    samples: List[float] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        return {"ms": round(self.median, 5), "p20_ms": round(self.p20, 5), "p80_ms": round(self.p80, 5),
                "iters": self.iters}


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


def measure(run: Callable, device: torch.device, *, setup: Optional[Callable] = None, warmup: int = 5,
            iters: int = 20, flush: Optional[L2Flush] = None) -> Timing:
    """Time `run(state)` where `state = setup(i)` is prepared untimed before every iteration.

    On a GPU each iteration is bracketed by CUDA events on the current stream (work enqueued by
    `setup` and the L2 flush precedes the start event, so it is not counted; collectives that the
    stream waits for are); the host clock around a synchronizing call elsewhere."""
    if iters < 1 or warmup < 0:
        raise ValueError(f"measure: need iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    setup = setup or (lambda i: None)
    cuda = device.type == "cuda"
    for i in range(warmup):
        run(setup(i))
    if cuda:
        torch.cuda.synchronize(device)
    times = []
    for i in range(iters):
        state = setup(warmup + i)
        if flush is not None:
            flush()
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run(state)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            run(state)
            times.append((time.perf_counter() - t0) * 1e3)
        del state
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), iters, times)


def peak_memory(fn: Callable, device: torch.device) -> Optional[float]:
    """MiB allocated at the peak of fn() above what was allocated before it (None on the CPU)."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


class Rotation:
    """n input sets used in turn, so that no timed iteration finds its operands in the L2 cache
    from the previous one. `make(i)` builds set i."""

    def __init__(self, make: Callable[[int], object], n: int):
        if n < 1:
            raise ValueError(f"Rotation needs at least one input set, got {n}")
        self.sets = [make(i) for i in range(n)]

    def __call__(self, i: int):
        return self.sets[i % len(self.sets)]


def rotation_count(bytes_per_set: int, minimum: int = 2, target_bytes: int = 4 * L2_FLUSH_BYTES) -> int:
    """How many input sets to rotate: enough that together they exceed `target_bytes` (at least
    `minimum`, at most 8)."""
    return max(minimum, min(8, -(-target_bytes // max(1, bytes_per_set))))


# --------------------------------------------------------------------------------------------- arms

BF16_REFERENCE = "bf16_mcore"
FP8_REFERENCE = "te_fp8_delayed"


@dataclass(frozen=True)
class Arm:
    """One configuration of the end-to-end benchmarks.

    family: "bf16_mcore" (megatron-core's own linears, BF16), "bf16_te" (Transformer Engine,
    BF16), "te_fp8" (Transformer Engine FP8; `te_recipe` "delayed" or "current"), or "ours"
    (the project's layers under `recipe`)."""

    name: str
    label: str
    family: str
    recipe: object = None
    te_recipe: Optional[str] = None

    @property
    def needs_te(self) -> bool:
        return self.family in ("bf16_te", "te_fp8")

    @property
    def quantizes_mxfp4(self) -> bool:
        return self.family == "ours" and self.recipe.backward_format == "mxfp4" and self.recipe.quantizes_backward

    def describe(self) -> dict:
        d = {"name": self.name, "label": self.label, "family": self.family}
        if self.te_recipe:
            d["te_recipe"] = self.te_recipe
        if self.recipe is not None:
            r = self.recipe
            d["recipe"] = {k: getattr(r, k) for k in ("forward", "backward_format", "dgrad", "wgrad", "rounding",
                                                       "rht_block", "sign_policy", "backend")}
        return d


def build_arms(gs: Iterable[int] = (0, 64, 256), roundings: Iterable[str] = ("sr", "rtn"), backend: str = "auto",
               seed: int = 1234) -> List[Arm]:
    """The arms of issue 7, in table order: BF16 (megatron-core), BF16 (TE), TE FP8 delayed /
    current, ours FP8 fwd + FP8 bwd, ours BF16 fwd + MXFP4 bwd and ours FP8 fwd + MXFP4 bwd for
    every RHT block g in `gs` and rounding in `roundings`."""
    from megatron_mxfp4 import MXFP4Recipe

    arms = [
        Arm("bf16_mcore", "BF16, megatron-core local layers", "bf16_mcore"),
        Arm("bf16_te", "BF16, Transformer Engine", "bf16_te"),
        Arm("te_fp8_delayed", "TE FP8, delayed scaling (HYBRID)", "te_fp8", te_recipe="delayed"),
        Arm("te_fp8_current", "TE FP8, current scaling (E4M3)", "te_fp8", te_recipe="current"),
        Arm("ours_fp8_fp8", "ours: FP8 fwd + FP8 bwd (per-tensor current scaling)", "ours",
            MXFP4Recipe(forward="fp8", backward_format="fp8", backend=backend, seed=seed)),
    ]
    for fwd in ("bf16", "fp8"):
        for g in gs:
            for rounding in roundings:
                recipe = MXFP4Recipe(forward=fwd, rht_block=g, rounding=rounding, backend=backend, seed=seed)
                arms.append(Arm(f"ours_{fwd}_mxfp4_g{g}_{rounding}",
                                f"ours: {fwd.upper()} fwd + MXFP4 bwd (RHT g={g}, {'SR' if rounding == 'sr' else 'RTN'})",
                                "ours", recipe))
    return arms


def select_arms(arms: Sequence[Arm], patterns: Optional[str]) -> List[Arm]:
    """Arms whose names match one of the comma-separated shell patterns (all when None/"all")."""
    if not patterns or patterns == "all":
        return list(arms)
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [a for a in arms if any(fnmatch.fnmatchcase(a.name, p) for p in pats)]
    unknown = [p for p in pats if not any(fnmatch.fnmatchcase(a.name, p) for a in arms)]
    if unknown:
        raise SystemExit(f"--arms: no arm matches {unknown}; arms are: {', '.join(a.name for a in arms)}")
    return chosen


def arms_table(arms: Sequence[Arm]) -> str:
    rows = []
    for a in arms:
        r = a.recipe
        if r is None:
            what = ""
        elif r.backward_format == "fp8":
            what = f"fwd={r.forward} bwd=fp8 (per-tensor current scaling)"
        else:
            what = f"fwd={r.forward} bwd=mxfp4 g={r.effective_rht_block} {r.rounding} backend={r.backend}"
        rows.append([a.name, a.label, a.family, a.te_recipe or "", what])
    return markdown_table(["arm", "what", "family", "TE recipe", "recipe"], rows)


# --------------------------------------------------------------------------------------------- TE


def transformer_engine():
    """(transformer_engine.pytorch module or None, version or the reason it is unavailable)."""
    try:
        import transformer_engine
        import transformer_engine.pytorch as te
    except Exception as e:  # ImportError, or a broken install raising something else
        return None, f"transformer_engine does not import ({type(e).__name__}: {str(e)[:160]})"
    return te, getattr(transformer_engine, "__version__", "unknown")


def te_fp8_recipe(kind: str):
    """The TE recipe object of an arm: "delayed" = DelayedScaling(HYBRID, amax history 16, max),
    "current" = Float8CurrentScaling(E4M3)."""
    from transformer_engine.common.recipe import DelayedScaling, Format

    if kind == "delayed":
        return DelayedScaling(fp8_format=Format.HYBRID, amax_history_len=16, amax_compute_algo="max")
    if kind == "current":
        from transformer_engine.common.recipe import Float8CurrentScaling

        return Float8CurrentScaling(fp8_format=Format.E4M3)
    raise ValueError(f"unknown TE FP8 recipe {kind!r} (delayed, current)")


def te_autocast(arm: Arm):
    """The forward context of an arm: TE's FP8 autocast for "te_fp8", else a null context."""
    if arm.family != "te_fp8":
        return contextlib.nullcontext()
    import transformer_engine.pytorch as te

    recipe = te_fp8_recipe(arm.te_recipe)
    if hasattr(te, "autocast"):
        return te.autocast(enabled=True, recipe=recipe)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe)


# --------------------------------------------------------------------------------------------- distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: torch.device) -> int:
    """Start torch.distributed (NCCL on a GPU, gloo on the CPU) from torchrun's environment, or as
    a single process; returns the world size."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                         **({"device_id": device} if device.type == "cuda" else {}))
    return world


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def run_arm(arm: Arm, strict: bool, fn: Callable[[], dict]) -> dict:
    """fn()'s result row, or an error row for `arm` when it raises (re-raised when `strict`; the
    traceback printed on rank 0), so that one failing arm does not end a benchmark."""
    try:
        return fn()
    except Exception as e:
        if strict:
            raise
        if rank() == 0:
            traceback.print_exc()
        return dict(arm=arm.name, error=f"{type(e).__name__}: {e}")


def print_row(prefix: str, row: dict) -> None:
    """One progress line per benchmarked arm (rank 0 prints)."""
    if "error" in row:
        print(f"{prefix} ERROR {row['error'][:150]}", flush=True)
    else:
        print(f"{prefix} fwd {row['fwd']['ms']:8.3f}  bwd {row['bwd']['ms']:8.3f}  fwd+bwd {row['fwd_bwd']['ms']:8.3f} ms"
              f"  {row['tflops_fwd_bwd']:7.1f} TFLOP/s", flush=True)


@contextlib.contextmanager
def megatron_parallel(tp: int, device: torch.device, seed: int = 1234):
    """megatron-core model parallelism (TP = `tp`) with its RNG tracker seeded (the "inference"
    tracker on the CPU, where megatron's CUDA generator fork is unavailable)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as tp_random

    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    if device.type == "cuda":
        tp_random.model_parallel_cuda_manual_seed(seed)
    else:
        tp_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    try:
        yield
    finally:
        ps.destroy_model_parallel()


# --------------------------------------------------------------------------------------------- kernels


def check_fast_kernels(device: torch.device, allow_reference: bool) -> Optional[str]:
    """On a GPU, refuse to time the MXFP4 arms on the PyTorch reference (it is ~100x slower than
    the kernels and would say nothing about speed): returns None when the compiled quantizer and a
    GPU GEMM backend are available, else raises SystemExit, or returns the reason as a note when
    `allow_reference`. On the CPU (the smoke mode) returns a note: reference backends."""
    if device.type != "cuda":
        return "CPU smoke run: PyTorch reference quantizer and GEMM (timings are not speed measurements)"
    from megatron_mxfp4.ops import available_backends

    probe = torch.zeros(1, device=device)
    q = available_backends(probe, "quantize")
    g = available_backends(probe, "gemm")
    missing = []
    if "cuda" not in q:
        from megatron_mxfp4.ops import cuda_quantize

        missing.append(f"compiled quantizer ({getattr(cuda_quantize, '_LOAD_ERROR', 'not registered')})")
    if not g or g[0] == "reference":
        missing.append(f"a GPU GEMM backend (available: {g})")
    if not missing:
        return None
    msg = ("MXFP4 arms would run on the slow PyTorch reference: missing " + "; ".join(missing) +
           ". Build the extension (MXFP4_BUILD_EXT=1 python setup.py build_ext --inplace) or pass --allow-reference")
    if not allow_reference:
        raise SystemExit(msg)
    warnings.warn(msg, RuntimeWarning)
    return msg


# --------------------------------------------------------------------------------------------- facts and output


def _version(module: str) -> Optional[str]:
    try:
        m = __import__(module, fromlist=["__version__"])
    except Exception:
        return None
    return getattr(m, "__version__", "unknown")


def gpu_clocks() -> str:
    """SM clock, max SM clock and power draw from nvidia-smi ("n/a" when unavailable)."""
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm,power.draw", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip() or "n/a"
    except Exception:
        return "n/a"


def device_info(device: torch.device) -> dict:
    """What ran the benchmark: device name and count, versions, clocks."""
    info = {"device_type": device.type, "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        info.update(device=torch.cuda.get_device_name(device), capability=list(torch.cuda.get_device_capability(device)),
                    gpus=torch.cuda.device_count(), cuda=torch.version.cuda, clocks=gpu_clocks())
    else:
        info.update(device=f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    for name, mod in (("triton", "triton"), ("megatron_core", "megatron.core.package_info")):
        v = _version(mod)
        if v is not None:
            info[name] = v
    te, te_v = transformer_engine()
    info["transformer_engine"] = te_v if te is not None else None
    return info


def device_tag(device: torch.device) -> str:
    """A short file-name tag: "h200", "b200", ... for GPUs, "cpu" on the CPU."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    for tag in ("h200", "h100", "b300", "b200", "gb200", "a100"):
        if tag in name:
            return tag
    return "".join(c for c in name.split()[-1] if c.isalnum()) or "gpu"


def command_line(argv: Optional[Sequence[str]] = None) -> str:
    """The command as it was run, with the script path relative to the repository."""
    argv = list(sys.argv if argv is None else argv)
    script = os.path.relpath(os.path.abspath(argv[0]), REPO) if argv and argv[0].endswith(".py") else (argv[0] if argv else "")
    launcher = "torchrun --nproc-per-node " + os.environ["WORLD_SIZE"] + " " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else "python "
    return launcher + " ".join([script] + [_quote(a) for a in argv[1:]])


def _quote(a: str) -> str:
    return a if a and all(c.isalnum() or c in "-_=.,/:*+@%" for c in a) else "'" + a.replace("'", "'\\''") + "'"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join("" if c is None else str(c) for c in r) + " |")
    return "\n".join(lines)


def fmt(x, digits: int = 3, empty: str = "–") -> str:
    """A number for a table: `digits` significant figures (thousands without exponent)."""
    if x is None:
        return empty
    if isinstance(x, str):
        return x
    if x != x:  # NaN
        return "nan"
    if abs(x) >= 10 ** digits:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def write_results(stem: str, result: dict, markdown: str) -> List[str]:
    """Write STEM.json and STEM.md (directories created); returns the two paths."""
    os.makedirs(os.path.dirname(os.path.abspath(stem)) or ".", exist_ok=True)
    paths = [stem + ".json", stem + ".md"]
    with open(paths[0], "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(paths[1], "w") as f:
        f.write(markdown if markdown.endswith("\n") else markdown + "\n")
    return paths


def default_stem(kind: str, device: torch.device) -> str:
    """bench/results/<kind>-<device tag>, or $BENCH_OUT/<kind>-<device tag> when BENCH_OUT is set."""
    base = os.environ.get("BENCH_OUT") or os.path.join(REPO, "bench", "results")
    return os.path.join(base, f"{kind}-{device_tag(device)}")


def pick_device(name: Optional[str]) -> torch.device:
    """--device: "cuda" (default when available), "cuda:N" or "cpu"; a clear error otherwise."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"--device {name!r} is not a device (cuda, cuda:N, cpu)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {name}: no CUDA device is visible; use --device cpu --tiny for a smoke run")
        local = int(os.environ.get("LOCAL_RANK", dev.index or 0))
        dev = torch.device("cuda", local)
    elif dev.type != "cpu":
        raise SystemExit(f"--device {name!r}: only cuda and cpu are supported")
    return dev
