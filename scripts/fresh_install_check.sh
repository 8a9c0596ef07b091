#!/usr/bin/env bash
# What a new user gets: a fresh virtual environment, the package WITHOUT extras installed by the README's first
# command verbatim (`python3 -m pip install -e . && qlora demo`, run in a copy of this tree), then a short
# `qlora train` and `qlora generate` on a local tiny model. Fails on a non-zero exit or any traceback.
# torch is installed first, pinned (CPU build, as the README says); the rest comes from the package's own
# dependencies. Called by scripts/test.sh; runs alone too.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/qlora-fresh.XXXXXX")"
trap 'rm -rf "$work"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1
unset PYTHONPATH

echo "fresh-install check: a new virtual environment in $work"
python3 -m venv "$work/venv"
# shellcheck disable=SC1091
source "$work/venv/bin/activate"
python3 -m pip install -q "torch==2.13.0" 2>"$work/pip.err" || { cat "$work/pip.err"; exit 1; }
mkdir "$work/qlora"
tar -C "$repo" --exclude=.git --exclude=__pycache__ --exclude='*.egg-info' --exclude=./build --exclude=./.venv \
    -cf - . | tar -C "$work/qlora" -xf -

check() {  # check NAME COMMAND...: run it, no stdin; fail on a non-zero exit or a traceback
    local name=$1
    shift
    local start=$SECONDS
    if ! "$@" >"$work/$name.out" 2>"$work/$name.err" </dev/null; then
        echo "fresh-install check FAILED: '$*' exited non-zero" >&2
        tail -n 40 "$work/$name.out" "$work/$name.err" >&2
        exit 1
    fi
    if grep -q "Traceback" "$work/$name.out" "$work/$name.err"; then
        echo "fresh-install check FAILED: '$*' printed a traceback" >&2
        tail -n 40 "$work/$name.err" >&2
        exit 1
    fi
    local shown="$*"
    echo "  ok ($((SECONDS - start)) s): ${shown%%$'\n'*}"
}

cd "$work/qlora"
check readme bash -c 'python3 -m pip install -q -e . 2>pip.err && qlora demo || { cat pip.err >&2; exit 1; }'
grep -q "^QLoRA adapter: .* answers correct" "$work/readme.out" || { echo "demo printed no result" >&2; exit 1; }

cd "$work"
check tiny python3 -c "
from pathlib import Path
from qlora.model.tiny import build_tiny_model, train_tokenizer
from qlora.train.data import demo_data_path
texts = Path(demo_data_path()).read_text().splitlines()
build_tiny_model(Path('tiny'), tokenizer=train_tokenizer(texts, vocab_size=400), arch='llama')
Path('notes.txt').write_text('QLoRA trains adapters on a 4-bit base.\n\nThe base stays frozen.\n')
"
check train qlora train --model tiny --data "$(python3 -c 'from qlora.train.data import demo_data_path; print(demo_data_path())')" \
    --output run --max-steps 3 --seq-len 64 --no-progress
test -f run/adapter_model.safetensors -a -f run/loss.png || { echo "train wrote no adapter or loss.png" >&2; exit 1; }
check train-txt qlora train --model tiny --data notes.txt --output run-txt --max-steps 2 --seq-len 32 --no-progress
check generate qlora generate --model tiny --adapter run --prompt "What is the capital of Peru?" --max-new-tokens 8
check estimate qlora estimate --model llama-3-8b
echo "fresh-install check passed"
