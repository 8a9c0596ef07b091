"""Offline, real data for the fidelity benchmark: the Python standard library.

Every machine that runs this benchmark has CPython's own source, so the corpus
needs no download and is identical wherever the Python version is. Files are
split into pretraining and held-out sets by a hash of their relative path
(stable across runs and machines, independent of file order). The fine-tuning
task is mined from the same files but has a different shape: given a
function's signature and docstring, write its body. Task pairs for evaluation
come only from held-out files, which pretraining never saw.
"""

from __future__ import annotations

import ast
import hashlib
import json
import sys
import sysconfig
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
HELD_OUT_PERCENT = 10
TASK_INSTRUCTION = "Write the body of this Python function."


@dataclass
class Corpus:
    """Texts of the pretraining and held-out files, with what is needed to reproduce them."""

    train: list[str] = field(default_factory=list)
    held_out: list[str] = field(default_factory=list)
    train_paths: list[str] = field(default_factory=list)
    held_out_paths: list[str] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)


def _path_hash(rel: str) -> int:
    return int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big")


def is_held_out(rel: str) -> bool:
    """Held-out membership by path hash: the same files on every machine and run."""
    return _path_hash(rel) % 100 < HELD_OUT_PERCENT


def stdlib_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """``(relative path, path)`` of the stdlib's ``.py`` files in hash order (a
    deterministic order that mixes packages, so a byte cap still samples widely)."""
    root = root or Path(sysconfig.get_paths()["stdlib"])
    files = [(p.relative_to(root).as_posix(), p) for p in root.rglob("*.py")
             if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda rp: (_path_hash(rp[0]), rp[0]))


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def load_corpus(max_train_bytes: int, max_held_out_bytes: int) -> Corpus:
    """The stdlib split into pretraining and held-out texts, each capped in bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    corpus, sizes, skipped = Corpus(), {"train": 0, "held_out": 0}, 0
    for rel, path in stdlib_files(root):
        split = "held_out" if is_held_out(rel) else "train"
        cap = max_held_out_bytes if split == "held_out" else max_train_bytes
        if sizes[split] >= cap:
            if all(sizes[s] >= c for s, c in (("train", max_train_bytes), ("held_out", max_held_out_bytes))):
                break
            continue
        text = _read(path)
        if text is None or not text.strip():
            skipped += 1
            continue
        getattr(corpus, split).append(text)
        getattr(corpus, f"{split}_paths").append(rel)
        sizes[split] += len(text.encode())
    corpus.provenance = {
        "source": "CPython standard library .py files (no site-packages, no test directories)",
        "root": str(root),
        "python": sys.version.split()[0],
        "split": f"held out if sha256(relative path) % 100 < {HELD_OUT_PERCENT}",
        "train_files": len(corpus.train), "train_bytes": sizes["train"],
        "held_out_files": len(corpus.held_out), "held_out_bytes": sizes["held_out"],
        "skipped_unreadable": skipped,
        "train_paths_sha256": hashlib.sha256("\n".join(corpus.train_paths).encode()).hexdigest(),
        "held_out_paths": corpus.held_out_paths,
    }
    return corpus


def function_pairs(source: str, max_chars: int) -> list[dict[str, str]]:
    """Alpaca records ``{instruction, input: signature + docstring, output: body}``
    for each function of ``source`` that has a docstring and a body after it."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    pairs = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or ast.get_docstring(node) is None:
            continue
        if len(node.body) < 2 or node.end_lineno is None:
            continue
        split = node.body[0].end_lineno - node.lineno + 1
        text = textwrap.dedent("\n".join(lines[node.lineno - 1:node.end_lineno]))
        head, body = "\n".join(text.splitlines()[:split]), "\n".join(text.splitlines()[split:])
        if body.strip() and len(head) + len(body) <= max_chars:
            # A fenced answer: it must not begin with whitespace, which byte-level BPE
            # would merge with the template's newline and so break prefix stability.
            pairs.append({"instruction": TASK_INSTRUCTION, "input": head, "output": f"```python\n{body}\n```"})
    return pairs


def write_task(out_dir: Path, n_train: int, n_eval: int, max_chars: int) -> dict:
    """Mine function-completion pairs (train from pretraining files, eval from
    held-out files), write ``train.jsonl``/``eval.jsonl``, return their provenance."""
    out_dir.mkdir(parents=True, exist_ok=True)
    found: dict[str, list[dict[str, str]]] = {"train": [], "eval": []}
    files = {"train": 0, "eval": 0}
    for rel, path in stdlib_files():
        split = "eval" if is_held_out(rel) else "train"
        want = n_eval if split == "eval" else n_train
        if len(found[split]) >= want:
            if len(found["train"]) >= n_train and len(found["eval"]) >= n_eval:
                break
            continue
        pairs = function_pairs(_read(path) or "", max_chars)
        found[split].extend(pairs[:want - len(found[split])])
        files[split] += bool(pairs)
    for split, pairs in found.items():
        with open(out_dir / f"{split}.jsonl", "w", encoding="utf-8") as fh:
            for pair in pairs:
                fh.write(json.dumps(pair) + "\n")
    return {
        "task": "function body from signature + docstring (alpaca jsonl), mined with ast from the stdlib",
        "train_pairs": len(found["train"]), "train_files": files["train"],
        "eval_pairs": len(found["eval"]), "eval_files": files["eval"],
        "eval_from": "held-out files only (never seen in pretraining)",
        "max_chars": max_chars,
    }
