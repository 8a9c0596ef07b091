"""NVIDIA ModelOpt checkpoints (``quant_method: "modelopt"``): NVFP4 and FP8, decoded while loading.

NVIDIA releases Llama, Qwen3, DeepSeek-R1 and gpt-oss models quantized by TensorRT Model Optimizer
(``nvidia/*-FP4``, ``*-NVFP4``, ``*-FP8``). ``config.json`` names ``quant_algo`` in its
``quantization_config``; older releases carry it only in ``hf_quant_config.json``
(``{"producer": ..., "quantization": {"quant_algo": ...}}``), which vLLM reads then. Per quantized
linear layer ``M``:

- NVFP4: ``M.weight`` uint8, two ``e2m1`` codes a byte (low nibble first: the even column),
  ``M.weight_scale`` ``float8_e4m3fn``, one per ``group_size`` (16) input columns, and ``M.weight_scale_2``
  a float32 scalar: ``w = code * (weight_scale * weight_scale_2)``;
- FP8: ``M.weight`` ``float8_e4m3fn`` and ``M.weight_scale`` (per tensor, or per output row):
  ``w = code * weight_scale``.

``input_scale`` (static activation scales) and, with a ``kv_cache_quant_algo``, ``k_scale`` / ``v_scale``
serve quantized inference kernels and are dropped. Layers in ``exclude_modules`` are stored in 16 bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UsageError
from .stored_floats import FP8_DTYPES, GIVE_ORIGINAL, expand_scale, layer_part_owner, unpack_fp4

MODELOPT_METHODS = ("modelopt",)
ALGOS = ("NVFP4", "FP8")
_PARTS = ("weight_scale", "weight_scale_2")
_DROPPED = ("input_scale",)
_KV_SCALES = ("k_scale", "v_scale")


def nvfp4_weight(packed: torch.Tensor, block_scale: torch.Tensor, key: str, what: str) -> torch.Tensor:
    """Packed ``e2m1`` codes ``[out, in / 2]`` times their float32 scale, one per block of ``[out, in]``
    (``[out, in / group]``), as float32."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise UsageError(f"{what} weight {key}: its codes are {tuple(packed.shape)} {packed.dtype}, not the format's "
                         "uint8 [out, in / 2] (two FP4 codes a byte); is the checkpoint intact?")
    values = unpack_fp4(packed)
    full = expand_scale(block_scale, values.shape, None)
    if full is None or block_scale.dim() != 2 or block_scale.shape[0] != values.shape[0]:
        raise UsageError(f"{what} weight {key}: its scales {tuple(block_scale.shape)} do not tile its shape "
                         f"{tuple(values.shape)} in groups of input columns; the scales and weights do not belong "
                         "together.")
    return values * full


@dataclass(frozen=True)
class ModelOpt:
    """A ModelOpt checkpoint's ``quant_algo`` and whether its attention layers carry KV-cache scales."""

    algo: str | None
    kv_cache: bool = False
    source: str = "config.json"

    @classmethod
    def from_config(cls, qc: dict, source: str) -> "ModelOpt | None":
        """The format a ``quantization_config`` (or ``hf_quant_config.json``'s ``quantization``) names, None when it
        is not ModelOpt.

        Raises:
            UsageError: for a ``quant_algo`` whose weights qlora does not decode.
        """
        if qc.get("quant_method") not in MODELOPT_METHODS:
            return None
        algo = qc.get("quant_algo")
        if algo is not None and algo not in ALGOS:  # None: 16-bit weights (a quantized KV cache at most)
            raise UsageError(f"{source} describes a ModelOpt checkpoint with quant_algo = {algo!r}; qlora decodes "
                             f"ModelOpt {' and '.join(ALGOS)} weights only ({algo!r} stores weights with AWQ pre-quant "
                             "scales, INT4/INT8 codes or several schemes, which it would misread). " + GIVE_ORIGINAL)
        return cls(algo, bool(qc.get("kv_cache_quant_algo")), source)

    def owner(self, key: str) -> str | None:
        """``M.weight_scale`` and ``M.weight_scale_2`` belong to ``M.weight``; activation and KV-cache scales to
        nothing."""
        return layer_part_owner(key, _PARTS, _DROPPED + (_KV_SCALES if self.kv_cache else ()))

    def check(self, key: str, names: set[str], file: Path) -> None:
        """Raise when a weight's codes or scales are missing."""
        if names == {key}:
            return
        base = key[: -len("weight")]
        need = {key, base + "weight_scale"} | ({base + "weight_scale_2"} if self.algo == "NVFP4" else set())
        if not need <= names:
            raise UsageError(f"{file}: the ModelOpt {self.algo} weight {key} is stored as {', '.join(sorted(names))}, "
                             f"which lacks {', '.join(sorted(need - names))}; is the checkpoint complete?")

    def whole_error(self, key: str, tensor: torch.Tensor) -> str | None:
        """Codes without their scales cannot be a model tensor."""
        if tensor.dtype in (torch.uint8, *FP8_DTYPES):
            return (f"is stored as {tensor.dtype} codes without its scales ({key}_scale), which are in no weight "
                    "file; is the checkpoint complete?")
        return None

    def decode(self, key: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """NVFP4: ``code * (weight_scale * weight_scale_2)``; FP8: ``code * weight_scale``; float32."""
        base = key[: -len("weight")]
        codes, scale = parts[key], parts[base + "weight_scale"].to(torch.float32)
        if self.algo == "NVFP4" and codes.dtype == torch.uint8:
            return nvfp4_weight(codes, scale * parts[base + "weight_scale_2"].to(torch.float32), key, "ModelOpt NVFP4")
        if codes.dtype not in FP8_DTYPES:
            raise UsageError(f"ModelOpt {self.algo} weight {key} is stored as {codes.dtype}, not the format's "
                             f"{'uint8 FP4 pairs' if self.algo == 'NVFP4' else 'float8_e4m3fn'}; the files and "
                             f"{self.source} do not belong together.")
        values = codes.to(torch.float32)
        full = expand_scale(scale.reshape(-1, 1) if scale.numel() > 1 else scale, values.shape, None)
        if full is None:
            raise UsageError(f"ModelOpt FP8 weight {key}: its scale {tuple(scale.shape)} is neither one value nor one "
                             f"per row of its shape {tuple(values.shape)}; is the checkpoint intact?")
        return values * full
