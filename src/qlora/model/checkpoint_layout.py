"""Map checkpoint tensors to a model whose module layout differs from the file's.

transformers v5 builds some models with a layout other than the one their
checkpoints are stored in: MoE experts as one 3-D parameter per projection
(``experts.gate_up_proj`` of shape ``(E, 2I, H)``) where the files hold one
2-D ``experts.{e}.w1.weight`` per expert, or renamed modules (GPT-NeoX's
``embed_out`` -> ``lm_head``). It converts at load time with the model's
*conversion mapping* (renamings, and converters made of operations such as
``MergeModulelist`` and ``Concatenate``) and reverts it on ``save_pretrained``.

qlora reads safetensors itself, so it applies the same mapping, through
transformers' own objects (``get_model_conversion_mapping``,
``rename_source_key``, ``WeightConverter.convert``), never a copy of their
tables. Converted targets are built one at a time: the source tensors of one
target (e.g. every expert's ``w1``/``w3`` of one layer) are read only once all
of them have been seen, converted, handed to the caller (which quantizes them)
and dropped. transformers 4.x has no conversion mapping; its vision-language
models rename by the class's ``_checkpoint_conversion_mapping`` instead (regular
expressions, the first that matches applies, on load and reversed on save),
which is applied here the same way.
"""

from __future__ import annotations

import re
from collections import Counter
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import UsageError

Reader = Callable[[], torch.Tensor]


@dataclass
class _Group:
    """The checkpoint tensors of one converted target, collected until complete."""

    converter: object
    pattern_of: dict[str, str] = field(default_factory=dict)  # raw key -> source pattern
    readers: dict[str, Reader] = field(default_factory=dict)


def _load_mapping(model) -> list:
    """The model's conversion mapping, ``[]`` where transformers has none (4.x)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:
        return []
    try:
        return list(get_model_conversion_mapping(model))
    except Exception as exc:  # an API that changed under us: say so, not a traceback
        raise _api_error(model, exc) from None


def _api_error(model, exc: Exception) -> UsageError:
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    import transformers

    return UsageError(f"cannot map the checkpoint of this {model_type!r} model onto the module layout of transformers "
                      f"{transformers.__version__} ({type(exc).__name__}: {exc}). qlora uses transformers' own "
                      "checkpoint conversion mapping; install a transformers version qlora supports (>=4.56, <=5.x "
                      "as tested), or convert the checkpoint once with transformers (from_pretrained then "
                      "save_pretrained).")


def _odd_shape(key: str, group: _Group) -> UsageError | None:
    """Why ``group``'s tensors cannot be stacked into ``key`` where one of them (one expert's) has a shape the others
    of its pattern do not (a damaged checkpoint, or a tensor of another model), else None. Read again: an error
    path only."""
    try:
        shapes = {raw: tuple(read().shape) for raw, read in group.readers.items()}
    except Exception:  # noqa: BLE001 - a tensor that cannot be read: the conversion's own error says so
        return None
    for pattern in set(group.pattern_of.values()):
        mine = {raw: shape for raw, shape in shapes.items() if group.pattern_of[raw] == pattern}
        common = Counter(mine.values()).most_common(1)[0][0]
        odd = next((raw for raw, shape in mine.items() if shape != common), None)
        if odd is not None:
            return UsageError(f"checkpoint tensor {odd} has shape {mine[odd]}, while the other {len(mine) - 1} "
                              f"tensors stacked with it into {key} have {common}: the checkpoint is damaged, or the "
                              "tensor is another model's.")
    return None


def _legacy_renames(model) -> dict[str, str]:
    """transformers 4.x's ``_checkpoint_conversion_mapping`` of ``model`` (file-name regex -> model name), ``{}``
    where it has none; under transformers 5 the conversion mapping replaces it."""
    renames = getattr(model, "_checkpoint_conversion_mapping", None)
    return dict(renames) if isinstance(renames, dict) and _load_mapping_module() is None else {}


def _load_mapping_module():
    import importlib.util

    return importlib.util.find_spec("transformers.conversion_mapping")


def _renamed(key: str, renames: dict[str, str]) -> str:
    """``key`` under the first of ``renames`` (pattern -> replacement) that matches it, as transformers 4.x renames."""
    for pattern, replacement in renames.items():
        new, n = re.subn(pattern, replacement, key)
        if n:
            return new
    return key


class CheckpointLayout:
    """Routes each checkpoint key to its model key, or to a converted group.

    Args:
        model: the model (on the meta device is fine) whose layout is the target.
        model_keys: the model's dense state-dict keys (before any module swap).
        checkpoint_keys: every key of every shard, so groups know their size.
    """

    def __init__(self, model, model_keys: set[str], checkpoint_keys: list[str]) -> None:
        self.model = model
        mapping = _load_mapping(model)
        self._targets: dict[str, str] = {}  # raw key -> model key
        self._group_of: dict[str, str] = {}  # raw key -> first target key of its group
        self._groups: dict[str, _Group] = {}
        self._size: dict[str, int] = {}
        self._converted: set[str] = set()  # keys a converter matched, whether or not they make a model tensor
        if not mapping:
            renames = _legacy_renames(model)
            for raw in checkpoint_keys:
                target = _renamed(raw, renames)
                if target != raw:
                    self._targets[raw] = target
            return
        try:
            from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

            renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
            converters = [m for m in mapping if isinstance(m, WeightConverter)]
            by_pattern = {p: c for c in converters for p in c.source_patterns}
            meta = dict.fromkeys(model_keys, True)
            base = getattr(model, "base_model_prefix", None)
            for raw in checkpoint_keys:
                target, pattern = rename_source_key(raw, renamings, converters, base, meta)
                if target not in meta and raw in meta:  # as transformers: a key already in model naming stays
                    target, pattern = raw, None
                if pattern is not None:
                    self._converted.add(raw)
                if pattern is None or target not in meta:
                    if target != raw:
                        self._targets[raw] = target
                    continue
                group = self._groups.setdefault(target, _Group(deepcopy(by_pattern[pattern])))
                group.pattern_of[raw] = pattern
                self._group_of[raw] = target
                self._size[target] = self._size.get(target, 0) + 1
        except UsageError:
            raise
        except Exception as exc:
            raise _api_error(model, exc) from None
        # Every parameter, not only each group's first target: a converter with several targets (Sarvam-MoE's
        # ``Split`` of ``query_key_value`` into q/k/v) reads the shape of each, after earlier ones became 4-bit.
        self._shapes = {name: param.shape for name, param in model.named_parameters()}

    @property
    def converts(self) -> bool:
        """True when some checkpoint tensors need a conversion (not only a rename)."""
        return bool(self._groups)

    def target(self, raw: str) -> str:
        """The model key of a checkpoint key that needs no conversion (renamed or as is)."""
        return self._targets.get(raw, raw)

    def needs_conversion(self, raw: str) -> bool:
        """True for a key in a layout transformers converts (e.g. one expert's ``w1``), even
        when it is not a plain tensor (a 4-bit layer's ``weight.absmax``)."""
        return raw in self._converted

    def in_group(self, raw: str) -> bool:
        return raw in self._group_of

    def group(self, raw: str) -> tuple[str, object, str]:
        """A converted key's target model key, the converter that builds it and the source pattern ``raw`` matched
        (:mod:`qlora.model.adapter_layout` converts an adapter's factors of those tensors)."""
        key = self._group_of[raw]
        return key, self._groups[key].converter, self._groups[key].pattern_of[raw]

    def add(self, raw: str, read: Reader) -> dict[str, torch.Tensor]:
        """Collect one tensor of a converted group (``read`` is called only when the
        group is complete). Returns the group's converted tensors, by model key,
        once its last tensor arrived, else ``{}``."""
        key = self._group_of[raw]
        group = self._groups[key]
        group.readers[raw] = read
        if len(group.readers) < self._size[key]:
            return {}
        del self._groups[key]
        return self._convert(key, group)

    def _convert(self, key: str, group: _Group) -> dict[str, torch.Tensor]:
        from transformers.core_model_loading import dot_natural_key

        try:
            converter = group.converter
            # Natural order (expert 2 before expert 10): the stacking follows the order of arrival.
            for raw in sorted(group.readers, key=dot_natural_key):
                converter.add_tensor(key, raw, group.pattern_of[raw], group.readers[raw])
            out = converter.convert(key, model=_AsBuilt(self.model, self._shapes), config=self.model.config)
        except Exception as exc:
            raise _odd_shape(key, group) or _api_error(self.model, exc) from None
        return {name: (value[0] if isinstance(value, list) else value) for name, value in out.items()}

    def taken(self, key: str) -> None:
        """Target ``key`` was built without its converter (:mod:`qlora.model.packed_experts` joins 4-bit pieces)."""
        self._groups.pop(key, None)

    def incomplete(self) -> list[str]:
        """Targets some of whose source tensors never came (a truncated or foreign checkpoint)."""
        return sorted(self._groups)


class _AsBuilt:
    """``model`` as transformers built it, for converters that read a target parameter's shape (Qwen3-VL-MoE's
    ``Transpose(check_dims=True)`` transposes only a tensor not already in that shape; Sarvam-MoE's ``Split``
    cuts by each target's rows): its weights may since have become 4-bit layers (:class:`~qlora.nn.Experts4bit`,
    ``Linear4bit``), so their shapes are the ones recorded at build."""

    def __init__(self, model, shapes: dict[str, torch.Size]) -> None:
        self._model = model
        self._shapes = shapes

    def get_parameter(self, name: str) -> torch.Tensor:
        if name in self._shapes:
            return torch.empty(self._shapes[name], device="meta")
        return self._model.get_parameter(name)

    def __getattr__(self, name: str):
        return getattr(self._model, name)


def to_checkpoint_layout(model, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` (model naming) in the layout transformers' ``save_pretrained`` writes for ``model``:
    its conversion mapping reverted (3-D experts back to one 2-D weight per expert, renamed modules back
    to the files' names), through transformers' own ``revert_weight_conversion``; under 4.x its
    ``_checkpoint_conversion_mapping`` reversed."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # 4.x: its vision-language models' renames reversed, as its save_pretrained does
        reverse = {new: re.sub(r"\(.*\)", "", old.lstrip("^")) for old, new in _legacy_renames(model).items()}
        return {_renamed(k, reverse): v for k, v in state_dict.items()} if reverse else state_dict
    try:
        return revert_weight_conversion(model, state_dict)
    except Exception as exc:  # an API that changed under us: say so, not a traceback
        raise _api_error(model, exc) from None


def converted_on_save(model, keys: list[str]) -> list[str]:
    """The ``keys`` (model naming) that transformers' ``save_pretrained`` writes through a converter of the
    model's conversion mapping (several layers fused into one stored tensor, as HRM's ``gqkv_proj``), not
    only renamed: the stored tensor is not the layer's own. ``[]`` under 4.x (no mapping)."""
    mapping = _load_mapping(model)
    if not mapping:
        return []
    try:
        from transformers.core_model_loading import WeightConverter, apply_converters

        converters = [c.reverse_transform() for c in reversed(mapping) if isinstance(c, WeightConverter)]
        return [k for k in keys if apply_converters(k, converters)[1] is not None]
    except Exception as exc:  # an API that changed under us: say so, not a traceback
        raise _api_error(model, exc) from None
