#!/usr/bin/env bash
# The first command of a GPU session: every CUDA-marked test (summary per file), a CUDA
# `qlora train` + `qlora generate` smoke, then quick benchmarks. Logs and a summary go to
# $OUT (default ./gpu_check_out). Each step has its own time limit; the whole stays
# under 9 minutes. Exit status: 0 when every step passed, 1 otherwise.
#
#   scripts/gpu_check.sh              # on the GPU machine
#   scripts/gpu_check.sh --dry-run    # on a CPU: same steps and checks, GPU work stubbed
#
# On the device machine bitsandbytes is not installed: carry its wheel in .whl/ (see the
# device README); this script installs .whl/*.whl into /tmp/site first when present.
#
# Dry run: the CUDA tests are collected, not run; `qlora train` / `qlora generate` are
# checked against their --help (every flag this script passes must exist) and the
# training outputs are written by a stub (QLORA_GPU_CHECK_STUB_LOSS=rising makes the
# stub's loss rise, to see the check fail); the benchmarks show their --help.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY_RUN=0
case "${1:-}" in
  --dry-run) DRY_RUN=1 ;;
  "") ;;
  *) echo "usage: scripts/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac

OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
FAILED=0
T0=$(date +%s)

if [[ -d .whl ]] && compgen -G ".whl/*.whl" >/dev/null && [[ $DRY_RUN == 0 ]]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$OUT/wheels.log" 2>&1 || { echo "installing .whl/*.whl failed, see $OUT/wheels.log" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# step NAME SECONDS FUNCTION: run an (exported) function with a time limit, log to $OUT/NAME.log, record the outcome.
# GPU_CHECK_STEPS="train_smoke generate_smoke" runs only those steps (default: all).
step() {
  local name=$1 limit=$2; shift 2
  if [[ -n ${GPU_CHECK_STEPS:-} && " $GPU_CHECK_STEPS " != *" $name "* ]]; then return 0; fi
  # A dry run shares a CPU with whatever else runs there: its limits stretch (GPU_CHECK_LIMIT_SCALE).
  limit=$((limit * ${GPU_CHECK_LIMIT_SCALE:-$((DRY_RUN ? 5 : 1))}))
  local start=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" bash -o pipefail -c "$*" >"$OUT/$name.log" 2>&1
  local rc=$?
  local took=$((SECONDS - start))
  if [[ $rc == 0 ]]; then
    printf '%-14s OK    %4ss\n' "$name" "$took" | tee -a "$SUMMARY"
  else
    [[ $rc == 124 || $rc == 137 ]] && echo "(timed out after ${limit}s)" >>"$OUT/$name.log"
    printf '%-14s FAIL  %4ss  rc=%s, see %s\n' "$name" "$took" "$rc" "$OUT/$name.log" | tee -a "$SUMMARY"
    tail -n 15 "$OUT/$name.log" | sed 's/^/    /'
    FAILED=1
  fi
  return $rc
}

environment() {
  if [[ $DRY_RUN == 0 ]]; then nvidia-smi || return 1; fi
  $PY - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for name in ("triton", "bitsandbytes", "transformers", "peft"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # report, do not stop: the tests say what they need
        print(name, "unavailable:", exc)
EOF
  if [[ $DRY_RUN == 0 ]]; then
    $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'torch sees no CUDA device')"
  fi
}

cuda_tests() {
  if [[ $DRY_RUN == 1 ]]; then
    $PY -m pytest -q -p no:cacheprovider -m cuda --collect-only tests >"$WORK/collected.txt" || return 1
    $PY scripts/gpu_check.py collect-summary "$WORK/collected.txt"
  else
    # One process took over 330 s for them; with pytest-xdist (on the device's image) eight workers share the GPU.
    local workers=()
    $PY -c "import xdist" 2>/dev/null && workers=(-n "${GPU_CHECK_WORKERS:-8}")
    $PY -m pytest -q -p no:cacheprovider -m cuda -rfE --tb=short --continue-on-collection-errors "${workers[@]}" \
      --junitxml="$OUT/cuda_tests.xml" tests
    local rc=$?
    $PY scripts/gpu_check.py test-summary "$OUT/cuda_tests.xml" || rc=1
    return $rc
  fi
}

train_smoke() {
  local TRAIN_FLAGS=(--quant nf4 --double-quant --precision bf16 --gradient-checkpointing --optim paged_adamw_8bit
                     --max-steps 30 --batch-size 8 --seq-len 64 --lr 2e-3 --rank 16 --alpha 32 --logging-steps 1
                     --save-steps 0 --no-progress --overwrite)
  $PY scripts/gpu_check.py make-model "$WORK" || return 1
  if [[ $DRY_RUN == 1 ]]; then
    $PY -m qlora train --help >"$WORK/train_help.txt" || return 1
    $PY scripts/gpu_check.py check-flags "$WORK/train_help.txt" "${TRAIN_FLAGS[@]}" --model --data --output || return 1
    local rising=()
    [[ ${QLORA_GPU_CHECK_STUB_LOSS:-} == rising ]] && rising=(--rising)
    $PY scripts/gpu_check.py stub-train "$WORK/run" "${rising[@]}" || return 1
  else
    $PY -m qlora train --model "$WORK/model" --data "$WORK/data.jsonl" --output "$WORK/run" "${TRAIN_FLAGS[@]}" || return 1
  fi
  $PY scripts/gpu_check.py check-train "$WORK/run" || return 1
  cp "$WORK/run/metrics.jsonl" "$OUT/train_metrics.jsonl"
}

generate_smoke() {
  local GEN_FLAGS=(--quant nf4 --compute-dtype bf16 --max-new-tokens 24 --temperature 0)
  if [[ $DRY_RUN == 1 ]]; then
    $PY -m qlora generate --help >"$WORK/generate_help.txt" || return 1
    $PY scripts/gpu_check.py check-flags "$WORK/generate_help.txt" "${GEN_FLAGS[@]}" --model --adapter --prompt
    return
  fi
  [[ -f $WORK/run/adapter_config.json ]] || { echo "no adapter from the train step"; return 1; }
  $PY -m qlora generate --model "$WORK/model" --adapter "$WORK/run" --prompt "Question: what is 3 plus 4? Answer:" \
    "${GEN_FLAGS[@]}" | tee "$WORK/generated.txt" || return 1
  [[ -s $WORK/generated.txt ]] || { echo "generate printed nothing"; return 1; }
}

benches() {
  if [[ $DRY_RUN == 1 ]]; then
    $PY bench/quant_kernels.py --help && $PY bench/optim.py --help >/dev/null
    return
  fi
  $PY bench/quant_kernels.py --repeats 5 --calls 10
}

export DRY_RUN OUT PY WORK
export -f environment cuda_tests train_smoke generate_smoke benches

# Limits add up to 530 s: under 9 minutes even if every step runs to its limit.
step environment 60 environment
step cuda_tests 220 cuda_tests
step train_smoke 110 train_smoke
step generate_smoke 40 generate_smoke
step benches 100 benches

echo "total $(( $(date +%s) - T0 ))s; summary in $SUMMARY, logs in $OUT" | tee -a "$SUMMARY"
exit $FAILED
