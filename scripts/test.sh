#!/usr/bin/env bash
# Set up (CPU build of torch, the package with its test extras) and run the whole test suite; then, for a whole
# run (no arguments), check what a new user gets: scripts/fresh_install_check.sh installs the package without
# extras in a fresh virtual environment and runs the README's first command, a short train and a generate, and
# scripts/compat_check.sh runs a smoke subset under transformers 4.57 (about 3 minutes).
# Arguments go to pytest (e.g. `bash scripts/test.sh tests/test_demo.py`) and skip the fresh-install check.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check "torch==2.13.0"
python3 -m pip install -q --disable-pip-version-check -e ".[test]"
python3 -m pytest -q -p no:cacheprovider "$@"
if [ "$#" -eq 0 ]; then
    bash scripts/fresh_install_check.sh
    bash scripts/compat_check.sh  # the declared transformers floor (4.x) still loads, trains and generates
fi
