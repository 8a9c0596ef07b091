"""Why target module names adapt nothing: what the names do match, and what the model has instead.

"match no linear layer" alone leaves a user guessing when the name is right but the module is not a layer LoRA
can wrap (DeepSeek-V4's ``o_a_proj`` is a ``DeepseekV4GroupedLinear``: an ``nn.Linear`` subclass whose own forward
multiplies per head group), or when the model has no such layer at all. Both ``qlora train`` (the modules of the
loaded model) and ``qlora estimate`` (those of the model built on the meta device) say it the same way.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, Mapping, Sequence

from torch import nn

from .quantize import matches_any


def weight_modules(model: nn.Module, adaptable: Iterable[str],
                   notes: Mapping[str, str] | None = None) -> dict[str, str]:
    """Modules that hold weights of their own but are not among the ``adaptable`` paths, as path -> what they are:
    the class name, and the note of the first ``notes`` prefix the path starts with (a tower, experts)."""
    adaptable = set(adaptable)
    found = {}
    for path, module in model.named_modules():
        if not path or path in adaptable or next(module.parameters(recurse=False), None) is None:
            continue
        note = next((text for prefix, text in (notes or {}).items() if path.startswith(prefix)), "")
        found[path] = type(module).__name__ + (f" {note}" if note else "")
    return found


def unmatched_hint(targets: Sequence[str] | str, linear_names: Sequence[str], others: Mapping[str, str]) -> str:
    """The sentences that follow "... match no linear layer of this model": for each of ``targets`` (names, or one
    regex over whole paths) that names modules in ``others`` (:func:`weight_modules`), their kind and why LoRA
    cannot take them; then the names of the model's ``linear_names``, or, without any, what holds its weights."""
    said = []
    for target in [targets] if isinstance(targets, str) else targets:
        regex = isinstance(targets, str)
        hits = [p for p in others if (re.fullmatch(target, p) if regex else matches_any(p, [target]))]
        if hits:
            kinds = sorted({others[p] for p in hits})
            why = (", not a linear layer qlora can adapt: LoRA wraps layers that compute x @ W^T + b and nothing "
                   "else" if any("(" not in k for k in kinds) else "")  # a noted kind says its own reason
            said.append(f"{target!r} matches {len(hits)} module{'s' if len(hits) > 1 else ''} ({hits[0]}"
                        f"{', ...' if len(hits) > 1 else ''}) of type {', '.join(kinds)}{why}.")
    if isinstance(targets, str) and not said and any(re.fullmatch(targets, n) for n in linear_names):
        said.append(f"One string is a regex over whole module paths, as in PEFT: to adapt the layers named "
                    f"{targets!r}, pass a list ([{targets!r}]) or a regex ('.*{targets}').")
    if linear_names:
        said.append(f"Its linear layers are named: {', '.join(sorted(set(linear_names)))} (or use 'all-linear').")
    else:
        kinds = Counter(others.values())
        held = ", ".join(f"{kind} ({count})" for kind, count in sorted(kinds.items())) or "no module at all"
        said.append(f"It has no linear layer qlora can adapt: its weights are in {held}.")
    return " ".join(said)
