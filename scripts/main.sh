#!/usr/bin/env bash
# The main job of the README: set up .venv if needed, then train a small transformer LM with a
# shardoptim optimizer sharded over 2 ranks (torchrun, gloo on CPU).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/torchrun --nproc-per-node 2 launch/train.py "$@"
