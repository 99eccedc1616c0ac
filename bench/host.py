"""Host cost of one linear layer's forward + backward at shapes where the GPU waits on the host.

For each shape (T tokens, in → out) and arm, side by side in one run:
  nn_linear       torch.nn.Linear in BF16 (the floor a layer's host path is held to)
  mxfp4_bf16fwd   MXFP4Linear, BF16 forward + MXFP4 backward (default recipe: SR, RHT g = 64); its backward is
                  one native call where that applies (`backward.fused_backward`)
  mxfp4_steps     mxfp4_bf16fwd with the one-call backward off: three quantize calls and two GEMM calls from
                  Python (the path before it; same bits)
  mxfp4_rows      mxfp4_bf16fwd with the `hopper` GEMM's per-row scaling (one conversion and one fix launch for
                  both backward GEMMs)
  mxfp4_fp8fwd    MXFP4Linear with recipe.forward = "fp8"
  mxfp4_graph     mxfp4_bf16fwd with recipe.cuda_graphs, forward + backward captured once in a CUDA graph:
                  the host's cost is one `replay()` (GPU only; skipped on a CPU)

Columns: host ms = median wall time of the Python call `y = layer(x); y.backward(dy)` with the GPU
synchronized before each call (so the launch queue never blocks it: this is the time the host needs to issue
the work), its spread (10th–90th percentile) over --iters calls after --warmup; GPU ms = the same call's time
with a synchronization after it (events); kernels = CUDA kernels per forward + backward (torch.profiler).
Ratios are against nn_linear of the same shape.

    python bench/host.py [--shapes 256x256x256,2048x2048x8192] [--iters 50] [--out STEM]
    python bench/host.py --device cpu --iters 3      (a smoke run of the code path; CPU times mean nothing)
    python bench/host.py --profile 20                (also: where the host time goes, per Python function)
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

from megatron_mxfp4 import MXFP4Linear, MXFP4Recipe  # noqa: E402

ARMS = {
    "nn_linear": None,
    "mxfp4_bf16fwd": MXFP4Recipe(),
    "mxfp4_steps": MXFP4Recipe(),
    "mxfp4_rows": MXFP4Recipe(),
    "mxfp4_fp8fwd": MXFP4Recipe(forward="fp8"),
    "mxfp4_graph": MXFP4Recipe(cuda_graphs=True),
}
GRAPH_ARMS = ("mxfp4_graph",)


class _patched:
    """Within: `module.name` is `value` (an arm's variant of the library's default path)."""

    def __init__(self, module: str, name: str, value):
        self.module, self.name, self.value = module, name, value

    def __enter__(self):
        import importlib

        self._mod = importlib.import_module(self.module)
        self._old = getattr(self._mod, self.name)
        setattr(self._mod, self.name, self.value)

    def __exit__(self, *exc):
        setattr(self._mod, self.name, self._old)


#: arms that run the default layer with one piece of the library swapped (see the module docstring)
ARM_VARIANTS = {
    "mxfp4_steps": lambda: _patched("megatron_mxfp4.backward", "fused_backward", lambda *a, **k: None),
    "mxfp4_rows": lambda: _patched("megatron_mxfp4.ops.hopper_gemm", "SCALING", "rows"),
}


def build(arm: str, din: int, dout: int, device, dtype):
    recipe = ARMS[arm]
    if recipe is None:
        return torch.nn.Linear(din, dout, bias=False, device=device, dtype=dtype)
    if device.type == "cpu":
        recipe = MXFP4Recipe(forward=recipe.forward, backend="reference")
    return MXFP4Linear(din, dout, bias=False, device=device, dtype=dtype, recipe=recipe)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_arm(arm: str, t: int, din: int, dout: int, device, iters: int, warmup: int) -> dict:
    if arm in ARM_VARIANTS:
        with ARM_VARIANTS[arm]():
            return _measure(arm, t, din, dout, device, iters, warmup)
    return _measure(arm, t, din, dout, device, iters, warmup)


def _measure(arm: str, t: int, din: int, dout: int, device, iters: int, warmup: int) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layer = build(arm, din, dout, device, dtype)
    x = torch.randn(t, din, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(t, dout, device=device, dtype=dtype)

    def step():
        x.grad = None
        layer.weight.grad = None
        layer(x).backward(dy)

    if arm in GRAPH_ARMS:  # warm up on a side stream, capture one call; each step is then a replay
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        x.grad = layer.weight.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            layer(x).backward(dy)
        step = graph.replay  # noqa: F811

    for _ in range(warmup):
        step()
    host, gpu = [], []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        step()
        host.append((time.perf_counter() - t0) * 1e3)
        _sync(device)
        gpu.append((time.perf_counter() - t0) * 1e3)
    kernels = None
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            _sync(device)
        kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                      and not e.name.startswith(("Memcpy", "Memset"))) / 3
    q = lambda v, p: sorted(v)[min(len(v) - 1, int(p * len(v)))]  # noqa: E731
    return dict(arm=arm, shape=[t, din, dout], host_ms=q(host, 0.5), host_p10=q(host, 0.1), host_p90=q(host, 0.9),
                wall_ms=q(gpu, 0.5), kernels=kernels)


def profile_arm(arm: str, t: int, din: int, dout: int, device, steps: int, top: int = 30) -> str:
    """cProfile of `steps` forward + backward calls after warm-up: the `top` functions by own time."""
    import cProfile
    import io
    import pstats

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layer = build(arm, din, dout, device, dtype)
    x = torch.randn(t, din, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(t, dout, device=device, dtype=dtype)
    for _ in range(5):
        layer(x).backward(dy)
    _sync(device)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        layer(x).backward(dy)
    prof.disable()
    _sync(device)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return f"## cProfile {arm} {t}x{din}->{dout}, {steps} calls\n" + buf.getvalue()


def markdown(result: dict) -> str:
    info = result["device"]
    lines = [f"# Host cost of one linear layer, forward + backward, on {info['device']}", "",
             f"Command: `{result['command']}`  ", f"torch {info['torch']}; {result['iters']} timed calls after "
             f"{result['warmup']} warm-up calls per arm (see `bench/host.py` for the columns).", ""]
    rows = []
    for r in result["rows"]:
        base = next((b for b in result["rows"] if b["shape"] == r["shape"] and b["arm"] == "nn_linear"), None)
        t, din, dout = r["shape"]
        rows.append([f"{t}, {din} → {dout}", r["arm"], C.fmt(r["host_ms"]),
                     f"{C.fmt(r['host_p10'])}–{C.fmt(r['host_p90'])}",
                     C.fmt(r["host_ms"] / base["host_ms"]) if base else "–",
                     C.fmt(r["wall_ms"]), C.fmt(r["kernels"])])
    lines.append(C.markdown_table(["T, in → out", "arm", "host ms", "p10–p90", "× nn.Linear", "call + sync ms",
                                   "kernels"], rows))
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None)
    ap.add_argument("--shapes", default="256x256x256,2048x2048x8192", help="comma list of TxINxOUT")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--out", default=None, help="output stem (default bench/results/host-<device>)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also print a cProfile of N calls of each MXFP4 arm at the first shape")
    args = ap.parse_args(argv)
    device = C.pick_device(args.device)
    unknown = [a for a in args.arms.split(",") if a not in ARMS]
    if unknown:
        raise SystemExit(f"bench/host.py: unknown arm(s) {unknown}; choose from {list(ARMS)}")
    try:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        assert all(len(s) == 3 and min(s) > 0 for s in shapes)
    except (ValueError, AssertionError):
        raise SystemExit(f"bench/host.py: --shapes {args.shapes!r} must be a comma list of TxINxOUT, e.g. 256x256x256")
    arms = args.arms.split(",")
    gpu_only = GRAPH_ARMS + tuple(ARM_VARIANTS)  # a replay; variants of the GPU path (the CPU runs the reference)
    if device.type != "cuda" and any(a in gpu_only for a in arms):
        print(f"bench/host.py: {[a for a in arms if a in gpu_only]} need a CUDA device; skipped")
        arms = [a for a in arms if a not in gpu_only]
    rows = []
    for t, din, dout in shapes:
        for arm in arms:
            r = measure_arm(arm, t, din, dout, device, args.iters, args.warmup)
            rows.append(r)
            print(f"{t}x{din}->{dout} {arm:<14} host {r['host_ms']:.3f} ms  call+sync {r['wall_ms']:.3f} ms  "
                  f"kernels {r['kernels']}", flush=True)
    result = dict(command=C.command_line(), device=C.device_info(device), iters=args.iters, warmup=args.warmup,
                  rows=rows)
    text = markdown(result)
    print(text)
    C.write_results(args.out or C.default_stem("host", device), result, text)
    if args.profile:
        t, din, dout = shapes[0]
        for arm in arms:
            if ARMS[arm] is not None and arm not in GRAPH_ARMS:
                print(profile_arm(arm, t, din, dout, device, args.profile))


if __name__ == "__main__":
    main()
