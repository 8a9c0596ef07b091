"""bitsandbytes 8-bit checkpoints (LLM.int8: a model saved after ``load_in_8bit=True``), decoded while loading.

transformers + bitsandbytes store each quantized linear layer ``M`` as ``M.weight`` (int8 codes, in
``nn.Linear``'s ``[out, in]`` orientation even for GPT-2's ``Conv1D``), ``M.SCB`` (float32, the absolute
maximum of each output row) and ``M.weight_format`` (a uint8 scalar naming the codes' layout; 0, "row",
is the only one bitsandbytes still reads). A row's values are ``code * SCB / 127``, computed as
bitsandbytes' ``int8_vectorwise_dequant`` computes them: ``code * SCB * float32(1 / 127)``. Layers
the config skips (``llm_int8_skip_modules``, the output head) are stored in 16/32 bits and read as
they are. The int8 outlier threshold acts on activations at run time and plays no role in the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UsageError
from .stored_floats import layer_part_owner

_SCALE, _FORMAT = "SCB", "weight_format"
_ROW_FORMAT = 0  # bitsandbytes' LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING["row"]
_INV_127 = 7.874015718698502e-3  # bitsandbytes' reciprocal of 127


@dataclass(frozen=True)
class BnbInt8:
    """A bitsandbytes 8-bit checkpoint: ``weight`` codes with their ``SCB`` row scales."""

    source: str = "config.json"
    linear_layout = True  # decoded weights are [out, in], also for Conv1D modules

    @classmethod
    def from_config(cls, qc: dict, source: str) -> "BnbInt8 | None":
        """The format, when ``qc`` names bitsandbytes 8-bit; None otherwise."""
        if qc.get("quant_method", "bitsandbytes") != "bitsandbytes":  # older configs name no method
            return None
        if qc.get("load_in_8bit", qc.get("_load_in_8bit")) and not qc.get("load_in_4bit", qc.get("_load_in_4bit")):
            return cls(source)
        return None

    def owner(self, key: str) -> str | None:
        """``M.SCB`` and ``M.weight_format`` belong to ``M.weight``."""
        return layer_part_owner(key, (_SCALE, _FORMAT))

    def check(self, key: str, names: set[str], file: Path) -> None:
        """Raise when a weight's codes or row scales are missing."""
        base = key[: -len("weight")]
        if names - {key} and (key not in names or base + _SCALE not in names):
            raise UsageError(f"{file}: the bitsandbytes 8-bit weight {key} is stored as {', '.join(sorted(names))}, "
                             f"which lacks {'its row scales ' + base + _SCALE if key in names else 'its codes'}; "
                             "is the checkpoint complete?")

    def whole_error(self, key: str, tensor: torch.Tensor) -> str | None:
        """int8 codes with no row scales cannot be a model tensor."""
        if tensor.dtype == torch.int8:
            return (f"is stored as int8 codes without its row scales ({key[: -len('weight')]}{_SCALE}), which are in "
                    "no weight file; is the checkpoint complete?")
        return None

    def decode(self, key: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """``code * SCB / 127`` per output row, as float32."""
        base = key[: -len("weight")]
        codes, scb = parts[key], parts[base + _SCALE]
        fmt = parts.get(base + _FORMAT)
        if fmt is not None and int(fmt.reshape(-1)[0]) != _ROW_FORMAT:
            raise UsageError(f"bitsandbytes 8-bit weight {key}: its {base + _FORMAT} is {int(fmt.reshape(-1)[0])}, a "
                             "GPU tile layout (col32/col_turing/col_ampere) written by bitsandbytes before 0.45, "
                             "which no current bitsandbytes reads. Load and save the model again with a current "
                             "transformers + bitsandbytes, or give its 16/32-bit original.")
        if codes.dtype != torch.int8 or codes.dim() != 2 or scb.numel() != codes.shape[0]:
            raise UsageError(f"bitsandbytes 8-bit weight {key}: its codes {tuple(codes.shape)} ({codes.dtype}) and "
                             f"row scales {tuple(scb.shape)} do not fit the format (int8 [out, in] and one scale "
                             "per row); is the checkpoint intact?")
        return codes.to(torch.float32) * scb.to(torch.float32).reshape(-1, 1) * _INV_127
