"""Build description of the CUDA extension `megatron_mxfp4._mxfp4_cuda` (sources in csrc/).

`setup.py` calls `extensions()` when the installed torch has CUDA and nvcc is found. The kernels
themselves are plain CUDA C++ behind a pybind11 module (no torch headers), so they also compile
without torch (see tests/test_csrc_compile.py).

Environment:
  MXFP4_CUDA_ARCHS  semicolon-separated GPU targets, default "80;90a;100a" (a target that this
                    nvcc does not know is dropped with a message); e.g. "90a" for an H100/H200 only.
  MXFP4_NVCC_FLAGS  extra nvcc flags (kernel variants for measurements, e.g. -D macros of csrc/).
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess

ROOT = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "megatron_mxfp4._mxfp4_cuda"
DEFAULT_ARCHS = "80;90a;100a"
#: nvcc flags for the kernels. No fast-math: the numerics contract needs IEEE float32 (denormals,
#: round-to-nearest products and sums, no reassociation).
NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo"]
CXX_FLAGS = ["-O3", "-std=c++17"]


def sources(relative: bool = True) -> list:
    """All translation units of the extension (binding first)."""
    kernels = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu")))
    files = [os.path.join(ROOT, "csrc", "binding.cpp")] + kernels
    return [os.path.relpath(f, ROOT) for f in files] if relative else files


def nvcc_path():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def known_archs(nvcc: str) -> set:
    """Virtual architectures nvcc lists ("90", "100", ...); "90a"/"100f" variants share their number."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return set()
    return {line.strip()[len("compute_"):] for line in out.split() if line.strip().startswith("compute_")}


def gencode_flags(archs: str, nvcc=None) -> list:
    """-gencode flags for a list like "80;90a;100a" (targets nvcc does not know are dropped)."""
    nvcc = nvcc or nvcc_path()
    known = known_archs(nvcc) if nvcc else set()
    flags = []
    for arch in (a.strip() for a in archs.replace(",", ";").split(";")):
        if not arch:
            continue
        if known and arch.rstrip("af") not in known:
            print(f"csrc_build: nvcc does not know sm_{arch}; skipping it")
            continue
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    if not flags:
        raise RuntimeError(f"csrc_build: no usable GPU target in MXFP4_CUDA_ARCHS={archs!r}")
    return flags


def extensions():
    """(ext_modules, cmdclass) for setuptools: the CUDA extension built with torch's BuildExtension."""
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    archs = os.environ.get("MXFP4_CUDA_ARCHS", DEFAULT_ARCHS)
    ext = CUDAExtension(
        EXT_NAME,
        sources=sources(),
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS + os.environ.get("MXFP4_NVCC_FLAGS", "").split()
                                                 + gencode_flags(archs)},
    )
    return [ext], {"build_ext": BuildExtension}
