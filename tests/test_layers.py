"""The package's layers import downward only (docs/architecture.md): every import statement of every module under
src/qlora, read with ``ast`` (function-level imports too, which a look at ``sys.modules`` after importing would miss
until that function runs)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"

# Which layers (subpackages of qlora) each layer may import. Any layer may import the top-level helper modules
# (qlora/errors.py, qlora/hub.py, ...), which import no layer.
MAY_IMPORT = {
    "cli": {"serve", "train", "infer", "chat", "model", "optim", "nn", "quant"},
    "serve": {"infer", "chat", "model", "nn", "quant"},
    "train": {"chat", "model", "optim", "nn", "quant"},
    "infer": {"chat", "model", "nn", "quant"},
    "chat": {"model", "nn", "quant"},
    "model": {"nn", "quant"},
    "optim": {"quant"},
    "nn": {"quant"},
    "quant": set(),
}
ENTRY_POINTS = {"qlora.__main__": "cli"}  # ``python -m qlora`` runs the command line: it imports as cli does


def _module_name(path: Path, src: Path) -> str:
    parts = path.relative_to(src).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path, src: Path) -> list[tuple[int, str]]:
    """``(line, module)`` for each qlora module an import statement of ``path`` names (``from qlora import train``
    names ``qlora.train``; relative imports resolved)."""
    name = _module_name(path, src)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return [(line, module) for line, module in found if module.split(".")[0] == "qlora"]


def _layer(module: str) -> str | None:
    """The layer a qlora module belongs to (None: the package itself or a top-level helper module)."""
    if module in ENTRY_POINTS:
        return ENTRY_POINTS[module]
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in MAY_IMPORT else None


def _violations(src: Path) -> list[str]:
    out = []
    for path in sorted((src / "qlora").rglob("*.py")):
        importer = _layer(_module_name(path, src))
        for line, module in _imported(path, src):
            target = _layer(module)
            if target is None or target == importer:
                continue
            allowed = MAY_IMPORT[importer] if importer is not None else set()
            if target not in allowed:
                out.append(f"{path.relative_to(src)}:{line}: {importer or 'a top-level module'} imports {module} "
                           f"({target})")
    return out


def test_layers_import_downward_only():
    violations = _violations(SRC)
    assert not violations, "imports against the layer table of docs/architecture.md:\n" + "\n".join(violations)


def test_every_subpackage_is_a_layer():
    """A new subpackage gets its row in the table (and in docs/architecture.md) before it is checked."""
    packages = {p.parent.name for p in (SRC / "qlora").glob("*/__init__.py")}
    assert packages == set(MAY_IMPORT)


def test_the_documented_table_is_the_checked_one():
    """docs/architecture.md's table of layers says what this test enforces."""
    rows = re.findall(r"^\| `(\w+)` \|[^|]*\| ([^|]*) \|$", ARCHITECTURE.read_text(encoding="utf-8"), re.M)
    documented = {layer: set(re.findall(r"`(\w+)`", may)) for layer, may in rows}
    assert documented == MAY_IMPORT


def test_a_violation_is_reported(tmp_path):
    """The check sees function-level and relative imports (a model module reaching up into train)."""
    package = tmp_path / "qlora"
    for folder in ("model", "train"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "errors.py").write_text("")
    (package / "model" / "load.py").write_text(
        "from ..errors import UsageError\n\ndef f():\n    from ..train import trainer\n")
    (package / "train" / "trainer.py").write_text("from qlora.model.load import f\n")
    assert _violations(tmp_path) == ["qlora/model/load.py:4: model imports qlora.train.trainer (train)"]
