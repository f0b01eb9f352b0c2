#!/usr/bin/env bash
# The main job of the README: set up .venv if needed, then train a small transformer LM with a
# shardoptim optimizer sharded over 2 ranks (torchrun, gloo on CPU), checkpointing to runs/main.
# Rank 1 is killed in step 170 (a simulated preemption); torchrun restarts both ranks and they resume
# from the latest checkpoint (step 150). Each run of this script starts from scratch.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
rm -rf runs/main
exec .venv/bin/torchrun --standalone --nproc-per-node 2 --max-restarts 1 launch/train.py \
  --ckpt-dir runs/main --save-every 50 --keep 2 --kill-at-step 170 "$@"
