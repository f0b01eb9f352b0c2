#!/usr/bin/env bash
# The main job of the README: set up .venv if needed, then train a small model with shardoptim.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/python launch/quickstart.py "$@"
