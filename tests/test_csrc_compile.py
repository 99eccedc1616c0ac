"""The CUDA sources in csrc/ compile with nvcc for sm_90a and sm_100a (skipped without nvcc).

The kernels are torch-free CUDA C++ behind pybind11, so this needs neither a GPU nor a CUDA torch.
By default a representative subset is compiled to keep the test short: the binding, the
dispatcher and the dual kernels of the three input types (a dual kernel contains both the row and
the column code paths; the row-only and column-only files instantiate the same code with other tile
shapes), and the grouped kernel's dispatcher and BF16 instantiations; with MXFP4_COMPILE_CHECK=all every translation unit is compiled, the
pybind11 module is linked and imported, and a host-only function is called.
"""
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import csrc_build  # noqa: E402

NVCC = csrc_build.nvcc_path()
ARCHS = ("90a", "100a")
SUBSET = ("binding.cpp", "mxfp4_quantize.cu", "mxfp4_quantize_bf16_dual.cu", "mxfp4_quantize_f32_dual.cu",
          "mxfp4_quantize_f16_dual.cu", "mxfp4_tiles.cu", "mxfp4_rows.cu", "mxfp4_fp8_cast.cu", "mxfp4_backward_hopper.cu",
          "mxfp4_gemm_hopper.cu", "mxfp4_quantize_grouped.cu", "mxfp4_quantize_grouped_bf16.cu",
          "mxfp4_quantize_tc.cu")

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def _includes():
    pybind11 = pytest.importorskip("pybind11")
    return ["-I" + os.path.join(ROOT, "csrc"), "-I" + pybind11.get_include(), "-I" + sysconfig.get_paths()["include"]]


def _compile(src: str, out: str, archs, extra=()) -> subprocess.CompletedProcess:
    flags = csrc_build.NVCC_FLAGS + ["-Xcompiler", "-fPIC"] + _includes() + list(extra)
    if src.endswith(".cu"):
        known = csrc_build.known_archs(NVCC)
        missing = [a for a in archs if known and a.rstrip("af") not in known]
        if missing:
            pytest.skip(f"this nvcc cannot target sm_{', sm_'.join(missing)}")
        flags += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return subprocess.run([NVCC, *flags, "-c", os.path.join(ROOT, "csrc", src), "-o", out],
                          capture_output=True, text=True)


def test_every_source_is_in_the_build():
    names = sorted(os.path.basename(p) for p in csrc_build.sources(relative=False))
    on_disk = sorted(f for f in os.listdir(os.path.join(ROOT, "csrc")) if f.endswith((".cu", ".cpp")))
    assert names == on_disk
    assert set(SUBSET) <= set(names)


def test_native_gemm_compiles_with_cublaslt(tmp_path):
    """The Hopper GEMM's native call against the cuBLASLt headers (where they are found; without them the
    file compiles to a stub, covered by the test below)."""
    lt = csrc_build.cublaslt_paths()
    if lt is None:
        pytest.skip("cuBLASLt headers not found (CUDA toolkit or torch's nvidia wheels)")
    r = _compile("mxfp4_gemm_hopper.cu", str(tmp_path / "gemm.o"), ("90a",), ["-I" + lt[0], "-DMXFP4_WITH_CUBLASLT"])
    assert r.returncode == 0, r.stderr[-4000:]


def test_sources_compile_for_sm90a_and_sm100a(tmp_path, monkeypatch):
    full = os.environ.get("MXFP4_COMPILE_CHECK") == "all"
    srcs = [os.path.basename(p) for p in csrc_build.sources(relative=False)] if full else list(SUBSET)
    objs = [str(tmp_path / (s + ".o")) for s in srcs]
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        results = list(pool.map(lambda so: _compile(so[0], so[1], ARCHS), zip(srcs, objs)))
    for src, r in zip(srcs, results):
        assert r.returncode == 0, f"{src} failed to compile:\n{r.stderr[-4000:]}"
    if not full:
        return
    ext = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    lib = tmp_path / ("_mxfp4_cuda" + ext)
    r = subprocess.run([NVCC, "-shared", "-o", str(lib), *objs], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    spec = importlib.util.spec_from_file_location("_mxfp4_cuda", lib)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.tile_shape(1, 64, mod.DUAL) == (64, 256)
    assert mod.tile_shape(0, 256, mod.DUAL) == (0, 0)  # float32 dual g=256: two launches instead
    if shutil.which("cuobjdump"):
        out = subprocess.run(["cuobjdump", "--list-elf", str(lib)], capture_output=True, text=True).stdout
        assert "sm_90a" in out and "sm_100a" in out
    _check_python_callers(mod, monkeypatch)


def _check_python_callers(mod, monkeypatch):
    """The Python wrappers call the compiled entry points with the arguments they declare: each call gets past
    pybind11's argument conversion (a wrong count or type raises TypeError) into C++, which then fails for
    want of a GPU (or of cuBLASLt in this build) — with its own error, not a TypeError."""
    import torch

    from megatron_mxfp4.numerics.quantize import quantize_reference
    from megatron_mxfp4.ops import cuda_quantize as cq, cuda_tiles, cvt_rs, hopper_backward as hb, hopper_gemm as hg

    class Monitor:
        def counter(self, dev):
            return torch.zeros(1, dtype=torch.int32)

        def after_call(self, dev):
            pass

    for m in (hb, hg):
        monkeypatch.setattr(m, "_ext", mod)
        monkeypatch.setattr(m, "launch_on", lambda dev, fn, *a: fn(*a))
        monkeypatch.setattr(m, "current_stream_handle", lambda dev: 0)
    monkeypatch.setattr(hg, "_lt_workspace", lambda dev, stream: torch.empty(16, dtype=torch.uint8))
    monkeypatch.setattr(hg, "monitor", Monitor())
    monkeypatch.setattr(cuda_tiles, "_ext", mod)
    monkeypatch.setattr(cuda_tiles, "supports", lambda t: None)
    monkeypatch.setattr(cuda_tiles, "_call", lambda dev, fn, *a: fn(*a, 0))
    a, b = quantize_reference(torch.randn(16, 64)), quantize_reference(torch.randn(24, 64))
    dy, x = torch.randn(64, 32, dtype=torch.bfloat16), torch.randn(64, 48, dtype=torch.bfloat16)
    w = torch.randn(32, 48, dtype=torch.bfloat16)
    calls = [lambda: hg._native_gemm(a, b, torch.float32, 1.0, None, scaling="rows"),
             lambda: cuda_tiles.to_e4m3_rows(a),
             lambda: hb.backward_gemms(dy, x, w, rht_block=64, stochastic=True, prescale=0.75, seed=3,
                                       offsets=(1, 2, 3, 4), signs_dgrad=None, signs_wgrad=None,
                                       dx_dtype=torch.bfloat16, dw_dtype=torch.bfloat16)]
    monkeypatch.setattr(cq, "launch_on", lambda dev, fn, *a: fn(*a))
    monkeypatch.setattr(cq, "current_stream_handle", lambda dev: 0)
    v, words = torch.zeros(8), torch.zeros(2, dtype=torch.int64)
    calls.append(lambda: cvt_rs.device_probe(mod, torch.device("cpu"))(v, words, cvt_rs.feed()))
    for call in calls:
        with pytest.raises((RuntimeError, ValueError)):
            call()
    # the cvt.rs feed table: software rule by default, per device, bounded
    assert mod.hw_sr_feed(0) == 0 and mod.hw_sr_feed(1000) == 0
    mod.set_hw_sr_feed(2, cvt_rs.feed(bias=True))
    assert mod.hw_sr_feed(2) == cvt_rs.feed(bias=True) and mod.hw_sr_feed(1) == 0
    mod.set_hw_sr_feed(2, 0)
    with pytest.raises(ValueError, match="out of range"):
        mod.set_hw_sr_feed(64, 1)
    assert mod.backward_hopper_workspace_size(64, 48, 32, 64, 0, 48, 1, 0, 48, 1, False) > 64 * 32
