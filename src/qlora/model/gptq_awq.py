"""GPTQ and AWQ checkpoints (``quant_method: "gptq"`` / ``"awq"``), decoded while loading.

Both store a quantized linear layer ``M`` as integer codes packed into int32 words, with one float16
scale and one integer zero point per group of ``group_size`` input rows (``-1``: one group) and output
column: ``w[i, o] = (q[i, o] - z[g(i), o]) * s[g(i), o]``, ``w`` in ``[in, out]`` orientation (the model's
``nn.Linear`` weight is its transpose, GPT-2's ``Conv1D`` weight is ``w``).

- GPTQ (AutoGPTQ, GPTQModel, optimum): ``M.qweight`` ``[in * bits / 32, out]`` packs ``32 / bits`` codes
  along the input rows (row ``i`` of word row ``r`` at bit ``bits * (i % (32 / bits))``); ``M.qzeros``
  ``[groups, out * bits / 32]`` packs the zero points the same way along the columns, stored minus one in
  the original format (``checkpoint_format: gptq``) and as they are in ``gptq_v2``; ``M.scales``
  ``[groups, out]``; ``M.g_idx`` ``[in]``, each input row's group: with ``desc_act`` (act-order) the
  groups follow the order rows were quantized in, not the row index.
- AWQ (AutoAWQ, GEMM kernels): ``M.qweight`` ``[in, out / 8]`` packs eight 4-bit codes along the
  output columns in the interleaved order 0, 2, 4, 6, 1, 3, 5, 7 (word nibble ``k`` holds column
  ``[0, 2, 4, 6, 1, 3, 5, 7][k]`` of its eight); ``M.qzeros`` ``[groups, out / 8]`` the same way;
  ``M.scales`` ``[groups, out]``; group ``g(i) = i // group_size``.

The products are exact in float32. Layers left unquantized (``modules_to_not_convert``, the output head
unless ``lm_head`` is quantized) are stored in 16 bits and read as they are. Variants with another
packing (GPTQ 3-bit, Marlin/BitBLAS/IPEX repacks, AWQ GEMV/exllama/llm-awq) are refused, naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UsageError
from .stored_floats import GIVE_ORIGINAL, layer_part_owner

GPTQ_METHODS = ("gptq",)
AWQ_METHODS = ("awq",)
_PARTS = ("qweight", "qzeros", "scales", "g_idx")
_AWQ_NIBBLE_OF_COLUMN = (0, 4, 1, 5, 2, 6, 3, 7)  # column j of eight is in nibble [j]


@dataclass(frozen=True)
class GroupedInt:
    """A GPTQ or AWQ checkpoint's packing: method, bits, group size and GPTQ's zero-point offset."""

    method: str
    bits: int
    group_size: int
    zero_offset: int = 0  # added to the stored zero points: 1 in the original GPTQ format
    source: str = "config.json"
    linear_layout = True  # decoded weights are [out, in], also for Conv1D modules

    @property
    def requantized(self) -> str:
        """What a 4-bit load of these weights costs, said once when loading."""
        return (f"the checkpoint's {self.method.upper()} integer weights are decoded to float and quantized to 4 bits "
                "again, which adds quantization error to theirs; give the model's original 16/32-bit checkpoint "
                "where you have it.")

    @classmethod
    def from_config(cls, qc: dict, source: str) -> "GroupedInt | None":
        """The format a ``quantization_config`` names, None when it is neither GPTQ nor AWQ.

        Raises:
            UsageError: for a variant whose packing qlora does not decode.
        """
        method = qc.get("quant_method")
        if method in GPTQ_METHODS:
            return cls._gptq(qc, source)
        if method in AWQ_METHODS:
            return cls._awq(qc, source)
        return None

    @classmethod
    def _gptq(cls, qc: dict, source: str) -> "GroupedInt":
        bits = qc.get("bits", 4)
        if bits not in (2, 4, 8):
            raise _refused(source, "gptq", "bits", bits, "codes that do not divide a 32-bit word evenly")
        field = "checkpoint_format" if "checkpoint_format" in qc else "format"
        fmt = qc.get(field) or "gptq"
        if qc.get("is_marlin_format") or fmt not in ("gptq", "gptq_v2"):
            field, fmt = ("is_marlin_format", True) if qc.get("is_marlin_format") else (field, fmt)
            raise _refused(source, "gptq", field, fmt, "weights repacked for an inference kernel (Marlin, BitBLAS, "
                           "IPEX)")
        return cls("gptq", bits, _group_size(qc, source, "gptq"), 1 if fmt == "gptq" else 0, source)

    @classmethod
    def _awq(cls, qc: dict, source: str) -> "GroupedInt":
        bits = qc.get("bits", qc.get("w_bit", 4))
        if bits != 4:
            raise _refused(source, "awq", "bits", bits, "a width the AWQ GEMM packing does not have")
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise _refused(source, "awq", "version", qc.get("version"), "weights packed for the GEMV, exllama, IPEX "
                           "or Marlin kernels, in another order than GEMM's")
        if str(qc.get("backend", "autoawq")).lower() not in ("autoawq",):
            raise _refused(source, "awq", "backend", qc.get("backend"), "llm-awq's packing")
        if qc.get("zero_point", True) is False:
            raise _refused(source, "awq", "zero_point", False, "symmetric AWQ weights, which AutoAWQ does not write")
        return cls("awq", 4, _group_size(qc, source, "awq"), 0, source)

    def owner(self, key: str) -> str | None:
        """``M.qweight``, ``M.qzeros``, ``M.scales``, ``M.g_idx`` all make ``M.weight``."""
        return layer_part_owner(key, _PARTS)

    def check(self, key: str, names: set[str], file: Path) -> None:
        """Raise when a layer's codes, zero points or scales are missing, or it holds a weight besides them."""
        if names == {key}:
            return
        base = key[: -len("weight")]
        need = {base + "qweight", base + "qzeros", base + "scales"}
        if not need <= names or key in names:
            problem = (f"lacks {', '.join(sorted(need - names))}" if not need <= names
                       else "holds a float weight besides its codes")
            raise UsageError(f"{file}: the {self.method.upper()} layer {base[:-1]} is stored as "
                             f"{', '.join(sorted(names))}, which {problem}; is the checkpoint complete?")

    def whole_error(self, key: str, tensor: torch.Tensor) -> str | None:
        """Packed int32 codes alone cannot be a model tensor."""
        if tensor.dtype == torch.int32 and key.endswith("weight"):
            return (f"is stored as int32 words without the {self.method.upper()} layer's other parts; is the "
                    "checkpoint complete?")
        return None

    def decode(self, key: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The float32 weight ``[out, in]`` of layer ``key``."""
        base = key[: -len("weight")]
        qweight, qzeros, scales = (parts[base + p] for p in ("qweight", "qzeros", "scales"))
        if {qweight.dtype, qzeros.dtype} != {torch.int32} or qweight.dim() != 2 or scales.dim() != 2:
            raise self._error(key, qweight, qzeros, scales, "int32 qweight and qzeros, 2-D scales")
        out = scales.shape[1]
        if self.method == "gptq":
            codes = _unpack_rows(qweight, self.bits)
            groups = parts.get(base + "g_idx")
        else:
            codes = _unpack_columns(qweight, self.bits, awq=True)[:, :out]
            groups = None
        rows = codes.shape[0]
        zeros = _unpack_columns(qzeros, self.bits, awq=self.method == "awq")[:, :out] + self.zero_offset
        if groups is None:
            size = rows if self.group_size == -1 else self.group_size
            groups = torch.arange(rows) // size
        groups = groups.long()
        if (codes.shape[1] != out or zeros.shape != scales.shape or groups.shape != (rows,)
                or int(groups.min()) < 0 or int(groups.max()) >= scales.shape[0]):
            raise self._error(key, qweight, qzeros, scales, f"groups of {self.group_size} input rows")
        w = (codes - zeros[groups]).to(torch.float32) * scales.to(torch.float32)[groups]
        return w.t().contiguous()

    def _error(self, key: str, qweight, qzeros, scales, what: str) -> UsageError:
        return UsageError(f"{self.method.upper()} layer {key[: -len('.weight')]}: its qweight {tuple(qweight.shape)} "
                          f"({qweight.dtype}), qzeros {tuple(qzeros.shape)} and scales {tuple(scales.shape)} do not "
                          f"fit {self.bits}-bit {self.method.upper()} packing with {what} as {self.source} says; the "
                          "files and config do not belong together.")


def _group_size(qc: dict, source: str, method: str) -> int:
    size = qc.get("group_size", qc.get("q_group_size", 128))
    if not (isinstance(size, int) and (size == -1 or size > 0)):
        raise UsageError(f"{source}: quantization_config.group_size of this {method.upper()} checkpoint must be a "
                         f"positive integer or -1 (one group), got {size!r}.")
    return size


def _unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """``[R, C]`` int32 words to ``[R * 32 / bits, C]`` codes: row ``k`` of word row ``r`` at bit ``bits * k``."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32).view(1, -1, 1)
    codes = (words.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1, words.shape[1]).to(torch.int16)


def _unpack_columns(words: torch.Tensor, bits: int, awq: bool) -> torch.Tensor:
    """``[R, C]`` int32 words to ``[R, C * 32 / bits]`` codes; AWQ's interleaved column order undone."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    codes = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    if awq:
        codes = codes[..., list(_AWQ_NIBBLE_OF_COLUMN)]
    return codes.reshape(words.shape[0], -1).to(torch.int16)


def _refused(source: str, method: str, field: str, value, what: str) -> UsageError:
    return UsageError(f"{source} describes a {method.upper()} checkpoint with quantization_config {field} = "
                      f"{value!r}: {what}. qlora decodes GPTQ 2/4/8-bit (checkpoint_format gptq or gptq_v2) and "
                      f"AWQ 4-bit GEMM weights only, and would misread these. " + GIVE_ORIGINAL)
