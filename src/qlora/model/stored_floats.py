"""Checkpoints stored in 8- or 4-bit floats, decoded tensor by tensor while loading.

Several models are released mainly in a low-precision float format rather than in 16 bits:

- block-scaled FP8 (transformers' ``quant_method: "fp8"``, FineGrainedFP8): DeepSeek-V3/R1,
  Qwen3's ``-FP8`` releases, MiniMax-M2 and others. A linear weight is stored as ``weight``
  (``float8_e4m3fn``) and ``weight_scale_inv``, one float scale per block of the weight
  (``weight_block_size``, 128 x 128 in these models; a last, partial block has its own scale);
  ``w = q * scale``; other writers name a layer's scale ``weight_scale`` (AutoFP8, one a tensor) or
  ``qscale_weight`` (Mistral), read alike. Some checkpoints put MoE experts in the same files as
  packed FP4 (two ``e2m1`` codes a byte) with one scale per 32 values.
- row-scaled FP8 (``quant_method: "fbgemm_fp8"``): Meta's Llama-3.1-405B-Instruct-FP8. The scale of
  ``X`` is ``X_scale``: a linear ``weight`` ``[out, in]`` has one per output row (``[out, 1]``), an
  expert stack ``(E, in, out)`` (Llama 4) one per expert and output column; ``w = q * scale``. Layers in
  ``modules_to_not_convert`` are stored in 16 bits; the activation bound (``activation_scale_ub``)
  only matters to the FP8 matmul.
- MXFP4 (``quant_method: "mxfp4"``): OpenAI's gpt-oss stores its MoE experts as ``P_blocks``
  (two ``e2m1`` codes a byte, low nibble first) and ``P_scales`` (one power-of-two exponent,
  biased by 127, per 32 values), the weight transposed against the model's ``(E, in, out)``.

qlora decodes each such tensor to float32 as soon as its parts are read (the products of codes and
scales, exact; the values transformers' ``dequantize`` loading path computes) and then treats it like
a tensor of a 32-bit checkpoint: a linear weight or an expert stack is quantized to NF4 at once. The
model never exists in 16 bits as a whole; at most one decoded tensor (or one layer's experts) does.

:class:`DecodePlan` gathers any :class:`StoredFormat`'s parts; the other formats have theirs in
``compressed_tensors.py``, ``modelopt.py``, ``bnb_int8.py`` and ``gptq_awq.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Protocol

import torch

from ..errors import UsageError

FP8_METHODS = ("fp8",)
FBGEMM_METHODS = ("fbgemm_fp8",)
MXFP4_METHODS = ("mxfp4",)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # e2m1 codes
_FP8_SCALE = "_scale_inv"  # FineGrainedFP8: the scale of `X` is `X_scale_inv` (`weight_scale_inv`)
# A linear layer's scale as other writers of `quant_method: fp8` name it, also `w = q * scale`: AutoFP8's per-tensor
# `weight_scale` (neuralmagic's first -FP8 releases), Mistral's `qscale_weight` (transformers reads it as the former)
_FP8_LAYER_SCALES = ("weight_scale", "qscale_weight")
# static activation scales, by those writers' names too: no role in a dequantized model
_FP8_IGNORED = ("activation_scale", "input_scale", "act_scale", "qscale_act")
_MX_PAYLOAD, _MX_SCALES = "_blocks", "_scales"
_FBGEMM_SCALE = "_scale"  # fbgemm_fp8: the scale of `X` is `X_scale`, for the tensors its layers hold in FP8
_FBGEMM_SCALED = ("weight", "gate_up_proj", "down_proj")
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)

GIVE_ORIGINAL = ("Give it the model's original 16/32-bit checkpoint instead (qlora quantizes it to 4 bits while "
                 "loading, or once with `qlora quantize`).")  # the advice when a format's variant is refused
Part = tuple[Path, str]  # (weight file, key in it)


class StoredFormat(Protocol):
    """How a checkpoint stores its tensors in parts (:class:`StoredFloats`, or another format's).

    A format whose decoded weights are ``nn.Linear``'s ``[out, in]`` even where the model holds GPT-2's
    ``Conv1D`` ``[in, out]`` says so with a true ``linear_layout`` attribute; one whose 4-bit load adds a
    second quantization error says what in a ``requantized`` message.
    """

    def owner(self, key: str) -> str | None:
        """The model tensor a stored key is a part of; None for a key the model has no use for."""

    def check(self, key: str, names: set[str], file: Path) -> None:
        """Raise a UsageError when the stored ``names`` are not a whole tensor ``key``."""

    def whole_error(self, key: str, tensor: torch.Tensor) -> str | None:
        """Why ``tensor``, stored alone, cannot be the model tensor ``key`` (codes without a scale), or None."""

    def decode(self, key: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The float32 tensor ``key`` from its stored parts (keyed by their checkpoint names)."""


@dataclass(frozen=True)
class StoredFloats:
    """How a checkpoint's low-precision tensors are stored: its ``quantization_config`` method and FP8 block."""

    method: str
    block: tuple[int, int] | None = None
    source: str = "config.json"

    @classmethod
    def from_config(cls, qc: dict, source: str) -> "StoredFloats | None":
        """The format a ``quantization_config`` names, or None when it is not one qlora decodes."""
        method = qc.get("quant_method")
        if method in MXFP4_METHODS or method in FBGEMM_METHODS:
            return cls(method, None, source)
        if method not in FP8_METHODS:
            return None
        block = qc.get("weight_block_size")
        fmt = qc.get("fmt", "e4m3")
        if fmt not in ("e4m3", "float8_e4m3fn"):
            raise UsageError(f"{source}: quantization_config.fmt is {fmt!r}; qlora reads FP8 checkpoints in e4m3 "
                             "(the format transformers writes and reads).")
        if block is not None and not (isinstance(block, (list, tuple)) and len(block) == 2
                                      and all(isinstance(b, int) and b > 0 for b in block)):
            raise UsageError(f"{source}: quantization_config.weight_block_size must be two positive integers "
                             f"[rows, columns], got {block!r}.")
        return cls(method, tuple(block) if block is not None else None, source)

    def decode(self, key: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The float32 tensor ``key`` from its stored parts (keyed by their checkpoint names)."""
        if self.method in MXFP4_METHODS:
            return _mxfp4(parts[key + _MX_PAYLOAD], parts[key + _MX_SCALES], key)
        if self.method in FBGEMM_METHODS:
            return _fbgemm(key, parts[key], parts[key + _FBGEMM_SCALE])
        return self._fp8(key, parts[key], next(parts[n] for n in _fp8_scales(key) if n in parts))

    def _fp8(self, key: str, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        values = unpack_fp4(q) if q.dtype in (torch.int8, torch.uint8) else q.to(torch.float32)
        full = expand_scale(_scale_values(scale), values.shape, self.block)
        if full is None:
            raise _grid_error(key, values, scale, self.source)
        return values * full

    def check(self, key: str, names: set[str], file: Path) -> None:
        """Raise when ``key``'s stored parts are not a whole tensor of the format."""
        if self.method in MXFP4_METHODS and names & {key + _MX_PAYLOAD, key + _MX_SCALES}:
            if names != {key + _MX_PAYLOAD, key + _MX_SCALES}:
                missing = (names ^ {key + _MX_PAYLOAD, key + _MX_SCALES}).pop()
                raise UsageError(f"{file}: the MXFP4 tensor {key} lacks its part {missing}; is the "
                                 "checkpoint complete?")
        elif self.method in (*FP8_METHODS, *FBGEMM_METHODS) and names - {key}:
            scales = sorted(names - {key})
            if key not in names:
                raise UsageError(f"{file}: {scales[0]} has no weight {key} beside it; is the checkpoint complete?")
            if len(scales) > 1:
                raise UsageError(f"{file}: the FP8 weight {key} has several scales ({', '.join(scales)}), so which "
                                 "one applies is not known; the checkpoint mixes two writers' files.")

    def whole_error(self, key: str, tensor: torch.Tensor) -> str | None:
        """Why a tensor stored with no scale cannot be a model tensor (FP8 codes alone), or None."""
        if self.method in (*FP8_METHODS, *FBGEMM_METHODS) and tensor.dtype in FP8_DTYPES:
            scale = _FBGEMM_SCALE if self.method in FBGEMM_METHODS else _FP8_SCALE
            return (f"is stored in FP8 without a scale beside it: it lacks its scale {key}{scale}, which is in "
                    "no weight file; is the checkpoint complete?")
        return _unscaled_fp8(key, tensor)

    def owner(self, key: str) -> str | None:
        """The model tensor a stored key belongs to (``X_blocks``, ``X_scales``: ``X``), None for one to drop."""
        if self.method in MXFP4_METHODS:
            for suffix in (_MX_PAYLOAD, _MX_SCALES):
                if key.endswith(suffix):
                    return key[: -len(suffix)]
            return key
        if self.method in FBGEMM_METHODS:
            if key.rpartition(".")[2] == "input_scale_ub":  # the activation bound, should a writer keep it
                return None
            owner = key.removesuffix(_FBGEMM_SCALE)
            return owner if owner != key and owner.rpartition(".")[2] in _FBGEMM_SCALED else key
        if key.endswith(_FP8_SCALE):
            return key[: -len(_FP8_SCALE)]
        return layer_part_owner(key, _FP8_LAYER_SCALES, _FP8_IGNORED)


class DecodePlan:
    """The checkpoint's tensors as the model sees them, each with the stored parts it is decoded from.

    A tensor is handed out when the last of its parts is read (files in order, keys in order), so a
    scale stored in a later shard than its weight, as sharded checkpoints do, is waited for.
    """

    def __init__(self, fmt: StoredFormat | None, keys: dict[Path, list[str]]) -> None:
        self.fmt = fmt
        parts: dict[str, list[Part]] = {}
        for file, file_keys in keys.items():
            for key in file_keys:
                owner = fmt.owner(key) if fmt else key
                if owner is not None:
                    parts.setdefault(owner, []).append((file, key))
        self._at: dict[Path, list[tuple[str, list[Part]]]] = {file: [] for file in keys}
        for key, found in parts.items():
            if fmt is not None:
                fmt.check(key, {k for _, k in found}, found[0][0])
            self._at[found[-1][0]].append((key, found))

    def keys(self) -> list[str]:
        """Every tensor the checkpoint decodes to, in model-facing names (scales folded in)."""
        return [key for entries in self._at.values() for key, _ in entries]

    def in_file(self, file: Path) -> list[tuple[str, list[Part]]]:
        """The tensors whose last part is in ``file``, as ``(key, parts)``."""
        return self._at[file]

    def decode(self, key: str, parts: list[Part], read: Callable[[Path, str], torch.Tensor]) -> torch.Tensor:
        """Read ``key``'s parts with ``read`` and decode them to float32 (a tensor stored whole comes back as
        read)."""
        tensors = {name: read(file, name) for file, name in parts}
        if self.fmt is None or len(tensors) == 1:
            tensor = tensors[parts[0][1]]
            why = (self.fmt.whole_error(key, tensor) if self.fmt is not None else None) or _unscaled_fp8(key, tensor)
            if why:
                raise UsageError(f"{parts[0][0]}: tensor {key} {why}")
            return tensor
        return self.fmt.decode(key, tensors)


def layer_part_owner(key: str, parts: Collection[str], dropped: Collection[str] = ()) -> str | None:
    """The owner of a key stored beside a layer's weight: ``M.weight`` for ``M.<part>``, None for ``M.<dropped>``
    (a scale the dequantized model has no use for), else ``key`` itself."""
    module, _, leaf = key.rpartition(".")
    if leaf in dropped:
        return None
    if leaf in parts:
        return f"{module}.weight" if module else "weight"
    return key


def _fp8_scales(key: str) -> tuple[str, ...]:
    """The names the scale of FP8 tensor ``key`` may be stored under (its ``_scale_inv``; a layer's other names)."""
    module, _, leaf = key.rpartition(".")
    others = tuple(f"{module}.{s}" if module else s for s in _FP8_LAYER_SCALES) if leaf == "weight" else ()
    return (key + _FP8_SCALE, *others)


def expand_scale(scale: torch.Tensor, shape: torch.Size, block: tuple[int, int] | None) -> torch.Tensor | None:
    """``scale``, one value per block of the last two dimensions of ``shape``, repeated to ``shape``; None when
    its grid does not tile ``shape``.

    The block is ``block`` when the grid is ``shape`` divided by it, rounded up (a last, partial block
    has its own scale); else the grid's own equal division of ``shape`` (packed FP4 experts: 1 x 32).
    """
    if scale.numel() == 1:
        return scale.reshape(())
    while scale.dim() < len(shape):
        scale = scale.unsqueeze(0)
    if scale.dim() != len(shape) or scale.shape[:-2] != shape[:-2]:
        return None
    (rows, cols), (grid_r, grid_c) = shape[-2:], scale.shape[-2:]
    bm, bn = block or (0, 0)
    if not (block and -(-rows // bm) == grid_r and -(-cols // bn) == grid_c):
        if rows % grid_r or cols % grid_c:
            return None
        bm, bn = rows // grid_r, cols // grid_c
    return scale.repeat_interleave(bm, dim=-2)[..., :rows, :].repeat_interleave(bn, dim=-1)[..., :cols]


def _unscaled_fp8(key: str, tensor: torch.Tensor) -> str | None:
    if tensor.dtype not in FP8_DTYPES:
        return None
    return (f"is stored in FP8 without a scale beside it ({key}{_FP8_SCALE}) but config.json names no FP8 format "
            "(quantization_config with quant_method fp8); the files and config.json do not belong together.")


def _scale_values(scale: torch.Tensor) -> torch.Tensor:
    """Scales as float32: floats as they are; ``uint8``/``float8_e8m0fnu`` exponents (UE8M0) as 2^(e - 127)."""
    if scale.dtype == torch.uint8:
        return torch.exp2(scale.to(torch.float32) - 127.0)
    return scale.to(torch.float32)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Two ``e2m1`` codes a byte, low nibble first, as float32 values (the last dimension doubles)."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = packed.view(torch.uint8)
    pairs = torch.stack((lut[(codes & 0x0F).long()], lut[(codes >> 4).long()]), dim=-1)
    return pairs.reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def _mxfp4(blocks: torch.Tensor, scales: torch.Tensor, key: str) -> torch.Tensor:
    """gpt-oss's MXFP4: ``blocks`` ``(..., rows, G, 16)`` and ``scales`` ``(..., rows, G)`` to ``(..., rows, 32 G)``,
    an expert stack transposed to the model's ``(E, in, out)`` as transformers does."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[:-1] != scales.shape:
        raise UsageError(f"MXFP4 tensor {key}: its blocks {tuple(blocks.shape)} ({blocks.dtype}) and scales "
                         f"{tuple(scales.shape)} ({scales.dtype}) do not fit the format (uint8 blocks of 16 bytes, "
                         "one uint8 exponent per block); is the checkpoint intact?")
    values = unpack_fp4(blocks) * _scale_values(scales).unsqueeze(-1)
    values = values.reshape(*blocks.shape[:-2], -1)
    return (values.transpose(-2, -1) if values.dim() == 3 else values).contiguous()


def _fbgemm(key: str, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fbgemm_fp8's ``q * scale``: one scale per row of a linear weight ``[out, in]``, per expert and output column
    of an expert stack ``(E, in, out)`` (stored ``(E, 1, out)`` for ``gate_up_proj``, ``(E, out, 1)`` for
    ``down_proj``, as transformers' FbgemmFp8Llama4TextExperts holds them)."""
    values, scale = q.to(torch.float32), _scale_values(scale)
    grid = (values.shape[0], 1) if values.dim() == 2 else (values.shape[0], 1, values.shape[-1])
    if q.dtype not in FP8_DTYPES or values.dim() not in (2, 3) or scale.numel() != grid[0] * grid[-1]:
        raise UsageError(f"fbgemm_fp8 tensor {key}: {tuple(q.shape)} ({q.dtype}) with the scale {tuple(scale.shape)} "
                         "is not the format's layout (FP8 codes and one scale per output row, or per expert and "
                         "output column); the scales and weights do not belong together.")
    return values * scale.reshape(grid)


def _grid_error(key: str, values: torch.Tensor, scale: torch.Tensor, source: str) -> UsageError:
    return UsageError(f"FP8 tensor {key}: its scale grid {tuple(scale.shape)} does not tile its shape "
                      f"{tuple(values.shape)} with the weight_block_size of {source} nor with equal blocks; the "
                      "scales and weights do not belong together.")
