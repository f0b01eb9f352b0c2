#!/usr/bin/env bash
# Create .venv (once) with a CPU build of torch and shardoptim installed editable, with the test and
# clients extras.
# Sourced by main.sh and test.sh; safe to run again (it installs only what is missing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
VENV_PY=.venv/bin/python

# torch first, pinned: an unpinned or open-ended requirement would pull a multi-GB CUDA build on a
# CPU-only machine. 2.13.0 satisfies the package's `torch>=2.4`, so the editable install adds nothing.
# Set TORCH_INDEX_URL (e.g. the CPU wheel index) where the default index serves CUDA builds.
if ! "$VENV_PY" -c "import torch" 2>/dev/null; then
  "$VENV_PY" -m pip install --quiet --disable-pip-version-check \
    ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION:-2.13.0}"
fi
# The test and clients extras, with the installed torch as a constraint: lightning, transformers and
# accelerate require torch open-ended, and pip must not replace the build installed above.
# (.venv/bin/shardoptim: the console script, which an editable install made before it existed lacks.)
if ! "$VENV_PY" -c "import shardoptim, safetensors, fsspec, numpy, tqdm, pytest, expecttest, hypothesis, s3fs, moto, lightning, transformers, accelerate" 2>/dev/null \
    || [ ! -x .venv/bin/shardoptim ]; then
  "$VENV_PY" -m pip install --quiet --disable-pip-version-check \
    -c <("$VENV_PY" -c "import torch; print('torch==' + torch.__version__.split('+')[0])") -e ".[test,clients]"
fi
