"""The lower bounds in pyproject.toml are at least the first release of every API qlora uses.

``AUDIT`` is the record of the audit (each entry: the package, where it is required, the API, the first
release that has it, and how that was established); a change that lowers a bound below an entry fails here.
Features behind a guard (FSDP2, the GGUF writer) state their own version, checked against the same record.
Only what can set a minimum is listed: APIs much older than the bound (``torch.compile``, float8 dtypes,
``torch.load(mmap=)``, all 2.1 or older) are left out. Every package src/qlora imports is declared, or
listed in ``UNDECLARED`` with what brings it in.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
CORE = None  # the package's own dependencies, not an extra

# (distribution, where required: CORE or extras, API, first release with it, evidence)
AUDIT = [
    ("torch", [CORE], "torch.get_autocast_dtype(device_type), torch.is_autocast_enabled(device_type)", "2.4",
     "torch/_C/__init__.pyi of the 2.4.0 wheel; TransformerEngine#1277 'starting from PyTorch 2.4'"),
    ("torch", [CORE], "torch.get_device_module, torch.random.fork_rng(device_type=), torch.amp.GradScaler(device)",
     "2.4", "present in the 2.4.0 wheel's sources (fork_rng's device_type since pytorch#98069, 2.1)"),
    ("torch", [CORE], "transformers 5's is_torch_available (disables torch < 2.6)", "2.6",
     "transformers/utils/import_utils.py of transformers 5.x"),
    ("transformers", [CORE], "from_pretrained(dtype=...)", "4.56", "README 'Which transformers?': 4.55 fails"),
    ("jinja2", [CORE], "chat templates through transformers' apply_chat_template", "3.1.0",
     "transformers 4.56 utils/chat_template_utils.py refuses older jinja2"),
    ("safetensors", [CORE], "FP8 tensors in safetensors.torch", "0.4.2",
     "safetensors/torch.py: float8_e4m3fn absent in 0.4.1, present in 0.4.2"),
    ("safetensors", [CORE], "transformers 4.56's own requirement", "0.4.3", "transformers 4.56.0 METADATA"),
    ("tokenizers", [CORE], "transformers 4.56's own requirement", "0.22", "transformers 4.56.0 METADATA"),
    ("pydantic", ["serve", "test", "bench"], "pydantic.ConfigDict, model_validator (qlora.serve.protocol)", "2.0",
     "pydantic 2 API; protocol models validated under pydantic 2.0.3"),
    ("gguf", ["export", "test"], "GGUFWriter.add_sliding_window_pattern, add_rope_freq_base_swa, "
     "add_expert_group_count; MODEL_ARCH_NAMES gpt-oss, smollm3, glm4moe, ...", "0.18.0",
     "absent from the gguf 0.17.1 wheel, present in 0.18.0"),
    ("triton", ["test", "bench"], "tl.interleave, tl.split, tl.reshape, tl.inline_asm_elementwise", "3.0",
     "triton/language/__init__.py of the 3.0.0 wheel"),
]
# Optional features that refuse an older release by name instead of raising the package's bound.
GUARDED = [
    ("torch", "torch.distributed.fsdp.fully_shard(ignored_params=...) for --fsdp", "2.7",
     "fully_shard has no ignored_params in the 2.6.0 wheel (pytorch#146631, Feb 2025)"),
]


def _requirements() -> dict[str | None, list[Requirement]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups: dict[str | None, list[str]] = {CORE: project["dependencies"], **project["optional-dependencies"]}
    return {group: [Requirement(r) for r in reqs] for group, reqs in groups.items()}


def _lower_bound(req: Requirement) -> Version | None:
    bounds = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=", ">")]
    return max(bounds, default=None)


@pytest.mark.parametrize("dist, groups, api, first, evidence", AUDIT, ids=[f"{a[0]}-{a[3]}" for a in AUDIT])
def test_declared_minimum_covers_api(dist, groups, api, first, evidence):
    requirements = _requirements()
    for group in groups:
        matching = [r for r in requirements[group] if canonicalize_name(r.name) == canonicalize_name(dist)]
        where = "dependencies" if group is CORE else f"optional-dependencies.{group}"
        assert matching, f"{dist} is used ({api}) but not declared in {where}"
        bound = _lower_bound(matching[0])
        assert bound is not None and bound >= Version(first), (
            f"{where}: {matching[0]} admits releases without {api} (first in {dist} {first}: {evidence})")


def test_guarded_features_name_the_audited_version():
    from qlora.model.gguf_export import GGUF_VERSION
    from qlora.train.distributed import FSDP2_TORCH

    (_, _, fsdp_first, _), = GUARDED
    assert Version(FSDP2_TORCH) == Version(fsdp_first)
    gguf_first = next(first for dist, _, _, first, _ in AUDIT if dist == "gguf")
    assert Version(".".join(map(str, GGUF_VERSION))) == Version(gguf_first)


def test_export_refuses_a_gguf_older_than_audited(tmp_path):
    """An installed gguf 0.17 (a package and its dist-info, first on the path) is refused by name, not met
    with an AttributeError halfway through an export."""
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "__init__.py").write_text("")
    info = tmp_path / "gguf-0.17.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gguf\nVersion: 0.17.1\n")
    code = ("from qlora.errors import UsageError\nfrom qlora.model.gguf_export import require_gguf\n"
            "try:\n    require_gguf()\nexcept UsageError as exc:\n    print(exc)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT / "src")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "needs gguf>=0.18; gguf 0.17.1 is installed" in out.stdout


# Imported by src/qlora but declared by no requirement of its own: what brings each in, or why it may be absent.
UNDECLARED = {
    "PIL": "matplotlib requires pillow",
    "huggingface_hub": "transformers and datasets require it",
    "pyarrow": "datasets requires it (its Parquet and Arrow engine)",
    "starlette": "fastapi requires it",
    "llama_cpp": "optional: export's k-quants, refused by name without it",
    "sentence_transformers": "optional: qlora chat --embedder, the chat model's embeddings without it",
}


def test_every_imported_package_is_declared():
    """A package src/qlora imports is a requirement (core or an extra), or is listed in UNDECLARED with why."""
    import ast
    from importlib.metadata import packages_distributions

    imported = set()
    for path in (ROOT / "src" / "qlora").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.partition(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.partition(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m != "qlora"}
    declared = {canonicalize_name(r.name) for reqs in _requirements().values() for r in reqs}
    providers = packages_distributions()
    undeclared = sorted(m for m in third_party - set(UNDECLARED)
                        if not {canonicalize_name(d) for d in providers.get(m, [m])} & declared)
    assert not undeclared, f"imported by src/qlora, declared nowhere in pyproject.toml: {undeclared}"
    assert not set(UNDECLARED) - third_party, "UNDECLARED lists a package src/qlora no longer imports"
