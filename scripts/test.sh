#!/usr/bin/env bash
# The test command of the README: set up .venv if needed, then run the whole test suite.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest tests -q "$@"
