"""bitsandbytes 4-bit MoE experts written with transformers 4.x, joined into qlora's expert layers.

transformers 4.x held the experts of Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek, ... as one ``nn.Linear`` per
expert and projection, so its bitsandbytes 4-bit files store each as its own packed layer
(``experts.3.w1.weight`` + ``weight.absmax``, ``weight.quant_state.bitsandbytes__nf4``, ...). transformers 5
holds them as 3-D weights, built by the conversion mapping from those pieces: ``MergeModulelist(dim=0)``
stacks the experts, ``Concatenate(dim=1)`` joins each expert's gate rows then up rows. An
:class:`~qlora.nn.Experts4bit` layer is one expert's ``[out, in]`` matrix, so expert ``e``'s layer is its
pieces' rows one after the other.

NF4/FP4 codes belong to blocks of ``blocksize`` consecutive elements of the flattened matrix, so when every
piece but the last holds a whole number of blocks the joined matrix's codes are the pieces' packed bytes
concatenated and its block absmax their absmax concatenated: nothing is quantized again. A single piece
(``down_proj``) is adopted with its state as stored. Double quantization does not concatenate (each piece has
its own offset and nested blocks of 256), so the joined absmax is decoded to float32 and double-quantized
again: the weights then differ from each piece's own decoding by a second rounding of its block constants
(an 8-bit code step of the absmax, about 1e-3 of it), at the stored 0.127 bits a weight; keeping them float32
would be exact but cost 0.373 bits a weight more on the joined matrices. Pieces that are not whole blocks
are decoded, joined and quantized again in the checkpoint's format; a converter other than those two
operations, or a weight some of whose pieces the file keeps 16-bit (a skip list naming single experts), has its
packed pieces decoded for transformers' converter, then is quantized again (the 16-bit path).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..nn import Experts4bit
from ..quant import QuantState, dequantize_4bit, quantize_4bit
from ..quant.double_quant import block_absmax, compress_absmax
from .checkpoint_layout import CheckpointLayout

_STATE_MARK = ".quant_state.bitsandbytes__"


@dataclass
class _Target:
    """One 3-D expert weight built from packed pieces: ``pieces[p][e]`` is the raw key of expert ``e``'s piece of
    source pattern ``p`` (in the converter's order)."""

    owner: str  # the Experts4bit's path
    name: str  # its expert weight (gate_up_proj, down_proj)
    joinable: bool  # joined here: all packed, the converter stacks experts and concatenates rows only
    pieces: list[list[str]] = field(default_factory=list)
    done: bool = False


def packed_stems(keys: list[str]) -> set[str]:
    """The ``....weight`` keys of the layers a bitsandbytes 4-bit file stores packed (those with a quant state)."""
    return {k.split(_STATE_MARK)[0] for k in keys if _STATE_MARK in k}


def _joins_rows(converter) -> bool:
    """Whether ``converter`` only stacks experts (``MergeModulelist(dim=0)``), then maybe concatenates each
    expert's pieces along their rows (``Concatenate(dim=1)``): each expert's matrix is its pieces' rows."""
    ops = [(type(op).__name__, getattr(op, "dim", None)) for op in getattr(converter, "operations", ())]
    return ops in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)])


class PackedExperts:
    """Collects the packed per-expert pieces of a 4.x bitsandbytes checkpoint and loads each 3-D expert weight
    into its :class:`~qlora.nn.Experts4bit` once all its pieces were read.

    Args:
        layout: the checkpoint's layout (which keys transformers' converters join, and how).
        keys: every key of every shard.
        experts_at: model key of a converted target -> ``(Experts4bit, its path, weight name)``, None when the
            target is no Experts4bit weight (experts kept dense: its pieces are decoded for the converter).

    Raises:
        ValueError: the file holds fewer experts' pieces of a weight than the model has experts.
    """

    def __init__(self, layout: CheckpointLayout, keys: list[str],
                 experts_at: Callable[[str], tuple[Experts4bit, str, str] | None]) -> None:
        from transformers.core_model_loading import dot_natural_key

        self._layout = layout
        stems = packed_stems(keys)
        by_target: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        converters = {}
        # target -> pattern -> its source tensors, packed or not
        sources: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for raw in sorted(keys, key=dot_natural_key):
            if layout.in_group(raw):
                target, converter, pattern = layout.group(raw)
                sources[target][pattern] += 1
                if raw in stems:
                    by_target[target][pattern].append(raw)
                    converters[target] = converter
        self._targets: dict[str, _Target] = {}
        self._modules: dict[str, Experts4bit] = {}
        self._parts: dict[str, set[str]] = defaultdict(set)  # piece stem -> its keys still to read
        self._target_of: dict[str, str] = {}  # piece stem -> target
        for target, by_pattern in by_target.items():
            found = experts_at(target)
            converter = converters[target]
            patterns = [p for p in converter.source_patterns if p in by_pattern]
            owner = name = ""
            joinable = False
            if found is not None:
                module, owner, name = found
                self._modules[owner] = module
                experts = len(module.layers(name))
                short = {p: n for p, n in sources[target].items() if n < experts}
                if short:
                    raise ValueError(f"it holds {', '.join(f'{n} of {p}' for p, n in short.items())} where the "
                                     f"model's {target} has {experts} experts")
                # all pieces packed (a skip list may keep some 16-bit: then all go through the converter)
                joinable = (sum(map(len, by_pattern.values())) == sum(sources[target].values())
                            and _joins_rows(converter)
                            and not module.layout.applied_transposed(name)
                            and not module.layout.rows and len({len(by_pattern[p]) for p in patterns}) == 1
                            and len(module.layers(name)) == len(by_pattern[patterns[0]]))
            self._targets[target] = _Target(owner, name, joinable, [by_pattern[p] for p in patterns])
            for raws in by_pattern.values():
                for raw in raws:
                    self._target_of[raw] = target
        for key in keys:
            stem = self._stem(key)
            if stem in self._target_of:
                self._parts[stem].add(key)
        self._read: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)

    def _stem(self, raw: str) -> str:
        """The ``....weight`` key of the piece a stored tensor (``weight`` or ``weight.absmax``, ...) belongs to."""
        return raw if raw in self._target_of else raw.split(".weight.")[0] + ".weight"

    def __contains__(self, raw: str) -> bool:
        stem = self._stem(raw)
        return stem in self._target_of and raw in self._parts[stem]

    def joinable(self, raw: str) -> bool:
        """Whether the piece ``raw`` (its ``weight`` key) is joined here (else it goes through the converter,
        decoded by :meth:`decoded`)."""
        return self._targets[self._target_of[raw]].joinable

    def add(self, raw: str, tensor: torch.Tensor) -> list[str]:
        """Keep one stored tensor of a piece (a copy: the shard is closed later). Returns the pieces (``weight``
        keys) this completed."""
        stem = self._stem(raw)
        self._read[stem][raw[len(stem):].lstrip(".") or "weight"] = tensor.clone()
        self._parts[stem].discard(raw)
        return [stem] if not self._parts[stem] else []

    def state(self, stem: str) -> tuple[torch.Tensor, QuantState]:
        """A complete piece's packed bytes and quant state (its stored tensors are dropped)."""
        parts = self._read.pop(stem)
        packed = parts.pop("weight")
        return packed, QuantState.from_dict({k.removeprefix("weight."): v for k, v in parts.items()})

    def decoded(self, stem: str, dtype: torch.dtype) -> torch.Tensor:
        """A complete piece decoded to ``dtype`` (for the converter path)."""
        packed, state = self.state(stem)
        return dequantize_4bit(packed, state, dtype)

    def loaded_targets(self, stem: str) -> list[str]:
        """Load every joinable target whose pieces are all read now that ``stem`` is; their model keys."""
        target = self._target_of[stem]
        spec = self._targets[target]
        if not spec.joinable or spec.done or any(self._parts[s] for ps in spec.pieces for s in ps):
            return []
        module = self._modules[spec.owner]
        for e, layer in enumerate(module.layers(spec.name)):
            packed, state = _joined([self.state(ps[e]) for ps in spec.pieces], layer.double_quant)
            try:
                layer.load_quant_state(packed, state)
            except ValueError as exc:
                raise ValueError(f"expert {e} of {spec.name}: {exc}") from None
        spec.done = True
        self._layout.taken(target)
        return [target]

    def unread(self) -> list[str]:
        """Joined targets some of whose pieces never came (a truncated checkpoint)."""
        return sorted(t for t, spec in self._targets.items() if spec.joinable and not spec.done)


def _joined(pieces: list[tuple[torch.Tensor, QuantState]], double_quant: bool) -> tuple[torch.Tensor, QuantState]:
    """One expert's matrix from its pieces' rows: the packed bytes and block absmax concatenated where every piece
    but the last is whole blocks, else decoded and quantized again (float32 values, the pieces' format)."""
    if len(pieces) == 1:
        return pieces[0]
    first = pieces[0][1]
    shapes = [tuple(state.shape) for _, state in pieces]
    if len({(s.quant_type, s.blocksize) for _, s in pieces}) > 1 or len({s[1:] for s in shapes}) > 1:
        raise ValueError(f"its pieces differ in format or width ({', '.join(map(str, shapes))})")
    shape = torch.Size((sum(s[0] for s in shapes), *shapes[0][1:]))
    if any(state.shape.numel() % state.blocksize for _, state in pieces[:-1]):
        dense = torch.cat([dequantize_4bit(p, s, torch.float32) for p, s in pieces])
        packed, state = quantize_4bit(dense, first.quant_type, first.blocksize, double_quant)
        state.dtype = first.dtype
        return packed, state
    packed = torch.cat([p.reshape(-1).view(torch.uint8) for p, _ in pieces]).reshape(-1, 1)
    absmax = torch.cat([block_absmax(s) for _, s in pieces])
    offset = nested = None
    if double_quant:
        absmax, offset, nested = compress_absmax(absmax)
    return packed, QuantState(absmax=absmax, shape=shape, code=first.code, blocksize=first.blocksize,
                              quant_type=first.quant_type, dtype=first.dtype, offset=offset, nested=nested)
