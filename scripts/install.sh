#!/usr/bin/env bash
# Install megatron-mxfp4 into the current Python environment.
#   scripts/install.sh          the package (torch is installed first if missing: the CPU build 2.13.0)
#   scripts/install.sh test     + test dependencies and megatron-core 0.19.2 (pinned)
# On GPU machines install torch with CUDA yourself first; the CUDA extension is then built against it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q "torch==2.13.0"
fi
$PY -m pip install -q setuptools wheel pybind11
extras=""
[ "${1:-}" = "test" ] && extras="[test]"
$PY -m pip install -q --no-build-isolation -e ".${extras}"
