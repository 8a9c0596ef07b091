"""Helpers of scripts/gpu_check.sh: build the smoke model and data, check a training
run's outputs, and summarize a CUDA test run per file.

    python scripts/gpu_check.py make-model DIR          # Llama-shaped model + tokenizer + data.jsonl
    python scripts/gpu_check.py check-train OUTPUT_DIR  # loss fell, adapter saved
    python scripts/gpu_check.py test-summary JUNIT.xml  # passed/failed/skipped per test file
    python scripts/gpu_check.py collect-summary COLLECT.txt   # dry run: CUDA tests per file
    python scripts/gpu_check.py stub-train OUTPUT_DIR [--rising]  # dry run: what a run writes
    python scripts/gpu_check.py check-flags 'HELP TEXT FILE' FLAG...  # every flag is in --help
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path

# Small but Llama-shaped: GQA, SwiGLU MLP, RMSNorm, rotary, untied head; every dimension a multiple
# of 64 so the 4-bit kernels (and the fused GEMV in generate) take their real paths.
SMOKE_CONFIG = dict(hidden=512, intermediate=1408, layers=4, heads=8, kv_heads=2, max_positions=512)


def make_model(out: Path) -> None:
    from qlora.model.tiny import build_tiny_model, train_tokenizer

    texts = [f"Question: what is {a} plus {b}? Answer: {a + b}." for a in range(30) for b in range(10)]
    tokenizer = train_tokenizer(texts, vocab_size=512)
    build_tiny_model(out / "model", tokenizer=tokenizer, arch="llama", **SMOKE_CONFIG)
    with open(out / "data.jsonl", "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    print(f"model in {out / 'model'}, {len(texts)} examples in {out / 'data.jsonl'}")


def check_train(out: Path) -> int:
    losses = []
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            record = json.loads(line)
            if record.get("split") == "train" and record.get("loss") is not None:  # null: not finite
                losses.append(float(record["loss"]))
    problems = []
    if len(losses) < 4:
        problems.append(f"{metrics}: {len(losses)} train loss records (expected one a step)")
    else:
        k = max(2, len(losses) // 5)
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        print(f"train loss: first {k} steps {first:.4f}, last {k} steps {last:.4f} ({len(losses)} records)")
        if not last < 0.9 * first:
            problems.append(f"loss did not fall by 10%: {first:.4f} -> {last:.4f}")
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # the final adapter: the run folder itself
        if not (out / name).is_file():
            problems.append(f"missing {out / name}")
    for p in problems:
        print("FAIL:", p)
    return 1 if problems else 0


def _file_of(classname: str, file_attr: str | None) -> str:
    if file_attr:
        return file_attr
    module = classname.split(".")
    return "/".join(m for m in module if not m[:1].isupper()) + ".py"


def test_summary(junit: Path) -> int:
    counts: dict[str, Counter] = defaultdict(Counter)
    for case in ET.parse(junit).iter("testcase"):
        file = _file_of(case.get("classname", ""), case.get("file"))
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped":
                outcome = "skipped"
        counts[file][outcome] += 1
    print(f"{'test file':<40}{'passed':>8}{'failed':>8}{'skipped':>9}")
    total = Counter()
    for file in sorted(counts):
        c = counts[file]
        total.update(c)
        print(f"{file:<40}{c['passed']:>8}{c['failed']:>8}{c['skipped']:>9}")
    print(f"{'total':<40}{total['passed']:>8}{total['failed']:>8}{total['skipped']:>9}")
    return 1 if total["failed"] or not total["passed"] else 0


def collect_summary(listing: Path) -> int:
    counts = Counter(line.split("::", 1)[0] for line in listing.read_text().splitlines() if "::" in line)
    print(f"{'test file':<40}{'CUDA tests':>11}")
    for file in sorted(counts):
        print(f"{file:<40}{counts[file]:>11}")
    print(f"{'total':<40}{sum(counts.values()):>11}")
    return 0 if counts else 1


def stub_train(out: Path, rising: bool) -> int:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metrics.jsonl", "w") as f:
        for step in range(1, 31):
            loss = 3.0 + 0.05 * step if rising else 6.0 / (1 + 0.1 * step)
            f.write(json.dumps({"split": "train", "step": step, "loss": loss}) + "\n")
    (out / "adapter_config.json").write_text("{}")
    (out / "adapter_model.safetensors").write_bytes(b"")
    return 0


def check_flags(help_file: Path, flags: list[str]) -> int:
    text = help_file.read_text()
    missing = [f for f in flags if f.startswith("--") and f not in text]
    for f in missing:
        print(f"FAIL: {f} is not an option of this command (see {help_file})")
    return 1 if missing else 0


def main(argv: list[str]) -> int:
    cmd, *args = argv
    if cmd == "make-model":
        make_model(Path(args[0]))
        return 0
    if cmd == "check-train":
        return check_train(Path(args[0]))
    if cmd == "test-summary":
        return test_summary(Path(args[0]))
    if cmd == "collect-summary":
        return collect_summary(Path(args[0]))
    if cmd == "stub-train":
        return stub_train(Path(args[0]), "--rising" in args)
    if cmd == "check-flags":
        return check_flags(Path(args[0]), args[1:])
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
