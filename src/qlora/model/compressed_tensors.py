"""Checkpoints in the compressed-tensors format (``quant_method: "compressed-tensors"``), decoded while loading.

llm-compressor writes this format and vLLM serves it natively, so many models are released in it:
RedHatAI's ``-FP8-dynamic`` / ``-FP8`` and ``-quantized.w4a16`` / ``w8a8`` versions of Llama, Qwen,
Mistral and Gemma, Moonshot's Kimi-K2-Thinking (INT4 experts). Its ``quantization_config`` lists
``config_groups``, each a scheme (how weights, and optionally activations, are quantized) with
``targets`` (module class names, module names, or ``re:`` regexes) and an ``ignore`` list of modules
stored in 16 bits. For a targeted module ``M`` the files hold, by the group's ``format``:

- ``float-quantized`` / ``int-quantized`` / ``naive-quantized``: ``M.weight`` as FP8 (``e4m3``) or int8
  codes and ``M.weight_scale`` (and ``M.weight_zero_point`` for an asymmetric scheme);
- ``pack-quantized``: ``M.weight_packed``, int32 words holding 32 / num_bits codes each (code ``i`` at
  bit ``num_bits * i``, stored plus ``2^(num_bits - 1)``), ``M.weight_shape`` (the unpacked shape),
  ``M.weight_scale`` and, asymmetric, ``M.weight_zero_point`` packed the same way along the rows;
- ``nvfp4-pack-quantized``: ``M.weight_packed``, uint8, two ``e2m1`` codes a byte (low nibble first),
  ``M.weight_scale`` (``float8_e4m3fn``, one per 16 input columns) and ``M.weight_global_scale``, stored
  inverted against ModelOpt's ``weight_scale_2``: ``w = code * (weight_scale / weight_global_scale)``.

The scale is not inverted: ``w = (q - zero_point) * scale``, the scale per tensor (one value), per
output channel (``[out, 1]``), per group of ``group_size`` input columns (``[out, in / group]``) or per
``block_structure`` block (a last, partial block has its own). As compressed-tensors' ``dequantize``, the
product is taken in the scale's dtype, then widened to float32: exactly the values transformers'
dequantizing load of such a checkpoint holds. Activation scales (``input_scale``...) and a quantized KV
cache's (``kv_cache_scheme``: ``k_scale``, ``v_scale``) describe inference kernels and play no role in a
dequantized model, whose cache is 16-bit.

Everything else the format can hold (2:4 sparse storage, MXFP4 packing, weight rotations,
activation-only schemes, ...) is refused by :meth:`CompressedTensors.from_config` with the
config field that names it.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

import torch

from ..errors import UsageError
from .modelopt import nvfp4_weight
from .stored_floats import FP8_DTYPES, GIVE_ORIGINAL, expand_scale, layer_part_owner

CT_METHODS = ("compressed-tensors",)
UNPACKED_FORMATS = ("float-quantized", "int-quantized", "naive-quantized")
PACKED_FORMAT = "pack-quantized"
NVFP4_FORMAT = "nvfp4-pack-quantized"
_STRATEGIES = ("tensor", "channel", "group", "block")
_WEIGHT_PARTS = ("weight_scale", "weight_zero_point", "weight_shape", "weight_global_scale")
_ACTIVATION_PARTS = ("input_scale", "input_zero_point", "output_scale", "output_zero_point", "input_global_scale")
_KV_CACHE_PARTS = ("k_scale", "v_scale", "k_zero_point", "v_zero_point")


@dataclass(frozen=True)
class WeightScheme:
    """One config group's weight quantization, as far as decoding needs it."""

    name: str
    targets: tuple[str, ...]
    format: str
    num_bits: int
    type: str  # "int" or "float"
    strategy: str
    group_size: int | None
    block: tuple[int, int] | None

    def matches_name(self, module: str) -> bool:
        """Targeted by name (``re:`` regex matched at the start, or the exact module name)."""
        return any(re.match(t[3:], module) if t.startswith("re:") else t == module for t in self.targets)

    @property
    def by_class(self) -> bool:
        """Has a target that is a module class (``Linear``) rather than a name: it may cover any module."""
        return any(not t.startswith("re:") and "." not in t for t in self.targets)

    def stores(self, names: set[str], module: str) -> bool:
        """Whether a module stored as ``names`` can be of this scheme's format."""
        packed, nvfp4 = module + ".weight_packed" in names, module + ".weight_global_scale" in names
        return packed == (self.format in (PACKED_FORMAT, NVFP4_FORMAT)) and nvfp4 == (self.format == NVFP4_FORMAT)

    def tile(self, shape: torch.Size) -> tuple[int, int] | None:
        """The (rows, columns) block one scale covers, None when the grid alone says it."""
        rows, cols = shape[-2], shape[-1]
        return {"tensor": (rows, cols), "channel": (1, cols), "block": self.block,
                "group": (1, self.group_size)}.get(self.strategy)


@dataclass(frozen=True)
class CompressedTensors:
    """A compressed-tensors checkpoint's weight schemes; which stored keys make which tensor, and the decode."""

    schemes: tuple[WeightScheme, ...]
    source: str = "config.json"
    kv_cache: bool = False  # a kv_cache_scheme: attention layers carry k_scale/v_scale for a quantized cache

    @classmethod
    def from_config(cls, qc: dict, source: str) -> "CompressedTensors | None":
        """The format a ``quantization_config`` names, None when it is not compressed-tensors.

        Raises:
            UsageError: for a compressed-tensors variant whose weights qlora cannot decode exactly.
        """
        if qc.get("quant_method") not in CT_METHODS:
            return None
        top = qc.get("format") or "dense"
        sparsity = qc.get("sparsity_config") or {}
        if sparsity and (sparsity.get("format") or "dense") != "dense":
            raise _refused(source, "sparsity_config.format", sparsity.get("format"),
                           "sparse weights stored compressed (2:4 or bitmask)")
        if qc.get("transform_config"):
            raise _refused(source, "transform_config", "(set)", "weights rotated by transforms applied at run time "
                           "(SpinQuant/QuIP Hadamard rotations): the stored weights are not the model's")
        if qc.get("moe_sparsity_config"):
            raise _refused(source, "moe_sparsity_config", "(set)", "MoE experts pruned or replaced")
        status = qc.get("quantization_status", "compressed")
        if status != "compressed":
            raise _refused(source, "quantization_status", status, "weights not compressed yet (a model saved "
                           "while it was being quantized)")
        groups = qc.get("config_groups") or {}
        schemes = tuple(cls._scheme(name, group, top, source) for name, group in groups.items())
        if not schemes:
            raise _refused(source, "config_groups", "{}", "no quantization scheme")
        return cls(schemes, source, bool(qc.get("kv_cache_scheme")))

    @staticmethod
    def _scheme(name: str, group, top: str, source: str) -> WeightScheme:
        field = f"quantization_config.config_groups.{name}"
        if not isinstance(group, dict):  # a preset name over a list of targets (W4A16: ["Linear"])
            raise _refused(source, field, group, "a preset scheme by name, whose parameters the file does not "
                           "spell out")
        weights = group.get("weights")
        if not weights:
            raise _refused(source, f"{field}.weights", None, "an activation-only scheme (the weights are 16-bit "
                           "but the model was tuned for quantized activations)")
        fmt = group.get("format") or top
        if fmt == NVFP4_FORMAT:
            return CompressedTensors._nvfp4_scheme(name, group, weights, field, source)
        if fmt not in UNPACKED_FORMATS + (PACKED_FORMAT,):
            raise _refused(source, f"{field}.format" if group.get("format") else "quantization_config.format", fmt,
                           "a storage format qlora does not decode")
        kind, bits = weights.get("type", "int"), weights.get("num_bits", 8)
        if (kind, bits) != ("float", 8) and not (kind == "int" and bits in (1, 2, 4, 8)):
            raise _refused(source, f"{field}.weights", f"{kind}{bits}", "a weight type qlora does not decode (it "
                           "reads FP8 e4m3 and 1, 2, 4 or 8-bit integers)")
        if kind == "float" and fmt == PACKED_FORMAT:
            raise _refused(source, f"{field}.format", fmt, "packed float weights")
        group_size = weights.get("group_size")
        strategy = weights.get("strategy") or ("tensor" if group_size is None else "group" if group_size > 0
                                               else "channel")
        if strategy not in _STRATEGIES:
            raise _refused(source, f"{field}.weights.strategy", strategy, "a weight scale layout qlora does not "
                           "decode (it reads tensor, channel, group and block)")
        if weights.get("actorder") in ("group", "dynamic", True):
            raise _refused(source, f"{field}.weights.actorder", weights["actorder"], "GPTQ activation ordering "
                           "with a column permutation (weight_g_idx), which compressed-tensors itself no longer "
                           "reads")
        block = weights.get("block_structure")
        if isinstance(block, str):  # "128x128", an older spelling
            block = [int(b) for b in block.split("x")]
        if strategy == "block" and not (isinstance(block, list) and len(block) == 2
                                        and all(isinstance(b, int) and b > 0 for b in block)):
            raise UsageError(f"{source}: {field}.weights.block_structure must be two positive integers "
                             f"[rows, columns] for strategy block, got {block!r}.")
        if strategy == "group" and not (isinstance(group_size, int) and group_size > 0):
            raise UsageError(f"{source}: {field}.weights.group_size must be a positive integer for strategy "
                             f"group, got {group_size!r}.")
        return WeightScheme(name, tuple(group.get("targets") or ()), fmt, bits, kind, strategy, group_size,
                            tuple(block) if block else None)

    @staticmethod
    def _nvfp4_scheme(name: str, group: dict, weights: dict, field: str, source: str) -> WeightScheme:
        kind, bits, group_size = weights.get("type"), weights.get("num_bits"), weights.get("group_size")
        if (kind, bits) != ("float", 4) or not (isinstance(group_size, int) and group_size > 0):
            raise _refused(source, f"{field}.weights", f"{kind}{bits} group_size {group_size}", "not the FP4 "
                           "weights in groups that nvfp4-pack-quantized stores")
        if weights.get("symmetric") is False:
            raise _refused(source, f"{field}.weights.symmetric", False, "NVFP4 weights with a zero point")
        return WeightScheme(name, tuple(group.get("targets") or ()), NVFP4_FORMAT, 4, "float", "tensor_group",
                            group_size, None)

    def owner(self, key: str) -> str | None:
        """The model tensor a stored key belongs to (``M.weight_packed``, ``M.weight_scale``: ``M.weight``),
        None for an activation or KV-cache scale, which the dequantized model (its cache 16-bit) has no use for."""
        return layer_part_owner(key, ("weight_packed", *_WEIGHT_PARTS),
                                _ACTIVATION_PARTS + (_KV_CACHE_PARTS if self.kv_cache else ()))

    def check(self, key: str, names: set[str], file) -> None:
        """Raise when ``key``'s stored parts are not a whole compressed-tensors weight."""
        if names == {key}:
            return
        base = key[: -len("weight")]
        stored = names & {key, base + "weight_packed"}
        if len(stored) != 1 or base + "weight_scale" not in names:
            have = ", ".join(sorted(names))
            raise UsageError(f"{file}: the compressed-tensors weight {key} is stored as {have}, which lacks "
                             f"{'its scale ' + base + 'weight_scale' if stored else 'its codes'} or holds both "
                             "weight and weight_packed; is the checkpoint complete?")

    def whole_error(self, key: str, tensor: torch.Tensor) -> str | None:
        """Why a tensor stored with no scale cannot be a model tensor (codes without their scale), or None."""
        if tensor.dtype in (*FP8_DTYPES, torch.int8, torch.int32, torch.uint8) and \
                key.endswith(("weight", "weight_packed")):
            return (f"is stored as {tensor.dtype} codes without its scale ({key.removesuffix('_packed')}_scale), "
                    "which is not in any weight file; is the checkpoint complete?")
        return None

    def decode(self, key: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The float32 weight ``key`` from its stored parts: ``(q - zero_point) * scale`` in the scale's dtype."""
        base = key[: -len("weight")]
        module = base[:-1]
        scheme = self._scheme_of(module, set(parts), key)
        scale = parts[base + "weight_scale"]
        if scheme.format == NVFP4_FORMAT:  # the global scale is stored inverted
            inverse = parts[base + "weight_global_scale"].to(torch.float32)
            return nvfp4_weight(parts[base + "weight_packed"], scale.to(torch.float32) / inverse, key,
                                "compressed-tensors NVFP4")
        if not scale.is_floating_point() or scale.dtype in FP8_DTYPES:
            raise UsageError(f"compressed-tensors weight {key}: its scale is {scale.dtype}; qlora reads float16, "
                             "bfloat16 and float32 scales. " + GIVE_ORIGINAL)
        zero = parts.get(base + "weight_zero_point")
        if scheme.format == PACKED_FORMAT:
            packed = parts[base + "weight_packed"]
            shape = parts.get(base + "weight_shape")
            cols = int(shape[-1]) if shape is not None and shape.numel() else packed.shape[-1] * 32 // scheme.num_bits
            codes = unpack_int32(packed, scheme.num_bits, cols, key)
            if zero is not None and zero.dtype == torch.int32 and scheme.strategy in ("group", "channel"):
                rows = codes.shape[-2]
                zero = unpack_int32(zero.transpose(-2, -1), scheme.num_bits, rows, key).transpose(-2, -1)
        else:
            codes = parts[key]
        values = codes.to(scale.dtype)
        tile = scheme.tile(values.shape)
        full = expand_scale(scale, values.shape, tile)
        if full is None or (zero is not None and zero.numel() != 1 and zero.shape != scale.shape):
            raise UsageError(f"compressed-tensors weight {key}: its scale {tuple(scale.shape)}"
                             + (f" and zero point {tuple(zero.shape)}" if zero is not None else "")
                             + f" do not tile its shape {tuple(values.shape)} as config group {scheme.name} "
                             f"({scheme.strategy}) says; the scales and weights in the files and {self.source} "
                             "do not belong together.")
        if zero is not None:
            zero = zero.to(scale.dtype)
            values = values - (zero if zero.numel() == 1 else expand_scale(zero, values.shape, tile))
        return (values * full).to(torch.float32)

    def _scheme_of(self, module: str, names: set[str], key: str) -> WeightScheme:
        """The config group that stored ``module``: one targeting it by name, else one by class, of the
        format its parts are in."""
        fits = [s for s in self.schemes if s.stores(names, module)]
        found = next((s for s in fits if s.matches_name(module)), None) or next((s for s in fits if s.by_class), None)
        if found is None:
            raise UsageError(f"compressed-tensors weight {key} is stored quantized, but no config group of "
                             f"{self.source} targets it in that format; the files and config.json do not belong "
                             "together.")
        return found


def unpack_int32(packed: torch.Tensor, num_bits: int, count: int, key: str) -> torch.Tensor:
    """compressed-tensors' ``pack-quantized`` words to signed codes: ``count`` codes along the last dimension,
    code ``i`` at bit ``num_bits * i`` of the row's little-endian bit stream, stored plus ``2^(num_bits-1)``."""
    if packed.dtype != torch.int32 or packed.shape[-1] * 32 < count * num_bits:
        raise UsageError(f"compressed-tensors weight {key}: its packed codes {tuple(packed.shape)} ({packed.dtype}) "
                         f"cannot hold {count} {num_bits}-bit codes a row; is the checkpoint intact?")
    data = packed.contiguous().view(torch.uint8)  # each word's bytes, least significant first ...
    if sys.byteorder == "big":  # ... once a big-endian host's order is turned around
        data = data.reshape(*packed.shape, 4).flip(-1).reshape(data.shape)
    per_byte = 8 // num_bits
    shifts = torch.arange(0, 8, num_bits, dtype=torch.uint8)
    codes = (data.unsqueeze(-1) >> shifts) & ((1 << num_bits) - 1)
    codes = codes.reshape(*packed.shape[:-1], packed.shape[-1] * 4 * per_byte)[..., :count]
    return (codes.to(torch.int16) - (1 << (num_bits - 1))).to(torch.int8)


def _refused(source: str, field: str, value, what: str) -> UsageError:
    return UsageError(f"{source} describes a compressed-tensors checkpoint with quantization_config "
                      f"{field.removeprefix('quantization_config.')} = {value!r}: {what}. qlora decodes "
                      "compressed-tensors FP8 (float-quantized), INT4/INT8 (pack-quantized, int-quantized, "
                      "naive-quantized) and NVFP4 (nvfp4-pack-quantized) weights only, and would misread these. "
                      + GIVE_ORIGINAL)
