"""Import-time adjustments for running against the pinned megatron-core wheel.

- `megatron.training` uses `typing.override`, which exists from Python 3.12 on; on 3.11 it is
  provided from `typing_extensions` (same semantics: a decorator that returns its argument).
- `initialize_megatron` always calls `megatron.core.datasets.utils.compile_helpers()`, which runs
  `make` in the package folder and exits the job when that folder has no Makefile (the wheel ships
  the helpers prebuilt and no Makefile). `avoid_helpers_compile()` turns that call into a no-op
  only in exactly that case.
"""
from __future__ import annotations

import importlib.util
import os
import typing
import warnings

PINNED_MCORE = "0.19.2"


def shim_typing_override() -> None:
    if not hasattr(typing, "override"):
        from typing_extensions import override

        typing.override = override


def require_megatron_core():
    """Import megatron.core, with a clear error when it is missing."""
    try:
        import megatron.core  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "megatron_mxfp4.megatron needs megatron-core (pinned: megatron-core==" + PINNED_MCORE + ") and "
            "triton (imported by megatron.core). Install with: pip install numpy 'packaging>=24.2' triton && "
            "pip install --no-deps --ignore-requires-python megatron-core==" + PINNED_MCORE
            + f" (import failed: {e})"
        ) from e
    from megatron.core import package_info

    version = getattr(package_info, "__version__", "?")
    if not version.startswith(PINNED_MCORE.rsplit(".", 1)[0] + "."):
        warnings.warn(f"megatron_mxfp4 is tested against megatron-core {PINNED_MCORE}; found {version}",
                      RuntimeWarning, stacklevel=2)
    return version


def avoid_helpers_compile() -> bool:
    """No-op `compile_helpers` when the helpers are prebuilt and there is no Makefile. Returns
    True when the patch was applied."""
    import megatron.core.datasets.utils as dutils

    folder = os.path.dirname(os.path.abspath(dutils.__file__))
    has_makefile = os.path.exists(os.path.join(folder, "Makefile"))
    prebuilt = importlib.util.find_spec("megatron.core.datasets.helpers_cpp") is not None
    if has_makefile or not prebuilt:
        return False

    def compile_helpers():  # the wheel's helpers_cpp extension is already built
        return None

    dutils.compile_helpers = compile_helpers
    return True
