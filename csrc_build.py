"""Build description of the CUDA extension `megatron_mxfp4._mxfp4_cuda` (sources in csrc/).

`setup.py` calls `extensions()` when the installed torch has CUDA and nvcc is found. The kernels
themselves are plain CUDA C++ behind a pybind11 module (no torch headers), so they also compile
without torch (see tests/test_csrc_compile.py).

Environment:
  MXFP4_CUDA_ARCHS  semicolon-separated GPU targets, default "80;90a;100a" (a target that this
                    nvcc does not know is dropped with a message); e.g. "90a" for an H100/H200 only.
  MXFP4_NVCC_FLAGS  extra nvcc flags (kernel variants for measurements, e.g. -D macros of csrc/).
  MXFP4_CUBLASLT    "0" builds without cuBLASLt (the Hopper GEMM then runs through torch's scaled_mm).

cuBLASLt (the Hopper GEMM's native call, csrc/mxfp4_gemm_hopper.cu) is taken from the CUDA toolkit, or from
the `nvidia` wheels that CUDA builds of torch install; without it that file compiles to a stub.
"""
from __future__ import annotations

import glob
import importlib.util
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


def cublaslt_paths():
    """(include dir, library file) of cuBLASLt from the CUDA toolkit or torch's `nvidia` wheels, or None."""
    if os.environ.get("MXFP4_CUBLASLT", "1") == "0":
        return None
    roots = []
    nvcc = nvcc_path()
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    for r in (home, nvcc and os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"):
        if r:
            roots += [(os.path.join(r, "include"), os.path.join(r, d)) for d in ("lib64", "lib", "targets/x86_64-linux/lib")]
    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations if spec else []):
        roots += [(os.path.join(base, d, "include"), os.path.join(base, d, "lib")) for d in ("cu13", "cublas", "cu12")]
    for inc, lib in roots:
        libs = sorted(glob.glob(os.path.join(lib, "libcublasLt.so*")))
        if os.path.exists(os.path.join(inc, "cublasLt.h")) and libs:
            return inc, libs[0]
    return None


def extensions():
    """(ext_modules, cmdclass) for setuptools: the CUDA extension built with torch's BuildExtension."""
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    archs = os.environ.get("MXFP4_CUDA_ARCHS", DEFAULT_ARCHS)
    includes, defines, link = [os.path.join(ROOT, "csrc")], [], []
    lt = cublaslt_paths()
    if lt is None:
        print("csrc_build: cuBLASLt not found; the Hopper GEMM's native call is left out (torch's scaled_mm is used)")
    else:
        includes.append(lt[0])
        defines.append("-DMXFP4_WITH_CUBLASLT")
        link += [lt[1], "-Wl,-rpath," + os.path.dirname(lt[1])]
    ext = CUDAExtension(
        EXT_NAME,
        sources=sources(),
        include_dirs=includes,
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS + defines + os.environ.get("MXFP4_NVCC_FLAGS", "").split()
                                                 + gencode_flags(archs)},
        extra_link_args=link,
    )
    return [ext], {"build_ext": BuildExtension}
