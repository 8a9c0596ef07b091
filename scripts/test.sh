#!/usr/bin/env bash
# Set up (CPU build of torch, the package with its test extras) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check "torch==2.13.0"
python3 -m pip install -q --disable-pip-version-check -e ".[test]"
python3 -m pytest -q -p no:cacheprovider "$@"
