"""The package's layers import downward only (docs/architecture.md): every import statement of every module under
src/qlora, read with ``ast`` (function-level imports too, which a look at ``sys.modules`` after importing would miss
until that function runs), and every module named in a string (what a package's lazy names, ``lazy_attributes``,
and ``importlib.import_module`` import)."""

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
PUBLIC_API = "qlora"  # the package's own names (qlora.load_model, qlora.Chat): each layer's, imported on first use


def _module_name(path: Path, src: Path) -> str:
    parts = path.relative_to(src).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


_MODULE = re.compile(r"qlora(?:\.\w+)+")


def _docstrings(tree: ast.Module) -> set[int]:
    """The ids of the docstring nodes of ``tree`` (its module's, classes' and functions'): text, not names."""
    holders = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef,
                                                                    ast.AsyncFunctionDef)))]
    return {id(h.body[0].value) for h in holders
            if h.body and isinstance(h.body[0], ast.Expr) and isinstance(h.body[0].value, ast.Constant)}


def _named_module(node: ast.AST) -> str | None:
    """The qlora module a string names: ``"qlora.train.data.formats"`` whole, or the fixed start of an f-string
    (``f"qlora.train.{name}"`` names ``qlora.train``)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value if _MODULE.fullmatch(node.value) else None
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        start = _MODULE.match(str(node.values[0].value))
        return start.group(0) if start else None
    return None


def _imported(path: Path, src: Path) -> list[tuple[int, str]]:
    """``(line, module)`` for each qlora module an import statement of ``path`` names (``from qlora import train``
    names ``qlora.train``; relative imports resolved), or a string outside a docstring names (a lazy name's module,
    ``importlib.import_module("qlora.train.trainer")``)."""
    name = _module_name(path, src)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    docstrings = _docstrings(tree)
    for node in ast.walk(tree):
        named = _named_module(node) if id(node) not in docstrings else None
        if named is not None:
            found.append((node.lineno, named))
        elif isinstance(node, ast.Import):
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
            allowed = (MAY_IMPORT[importer] if importer is not None else
                       set(MAY_IMPORT) if _module_name(path, src) == PUBLIC_API else set())
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


def test_a_module_named_in_a_string_is_an_import(tmp_path):
    """A package's lazy names and ``importlib.import_module`` import the module a string names (an f-string by its
    fixed start); a docstring naming one imports nothing."""
    package = tmp_path / "qlora"
    for folder in ("model", "train"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text('"""qlora.train"""\n')
    (package / "__init__.py").write_text("")
    (package / "model" / "__init__.py").write_text(
        '"""Models; see qlora.train.trainer."""\n_LAZY = {"Trainer": "qlora.train.trainer", "f": "qlora.model.load"}\n')
    (package / "model" / "load.py").write_text(
        'import importlib\n\ndef f(name):\n    """Not qlora.train."""\n'
        '    importlib.import_module("qlora.train.trainer")\n'
        '    return importlib.import_module(f"qlora.train.{name}")\n')
    assert _violations(tmp_path) == ["qlora/model/__init__.py:2: model imports qlora.train.trainer (train)",
                                     "qlora/model/load.py:5: model imports qlora.train.trainer (train)",
                                     "qlora/model/load.py:6: model imports qlora.train (train)"]
