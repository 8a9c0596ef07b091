"""The parameters an adapter folder trains, read from the shapes of the tensors it saved (no tensor is loaded).

Continuing an adapter trains every tensor PEFT saved for it, whatever made it: LoRA factors at each layer's own rank
(``rank_pattern``), DoRA magnitudes, LoRA biases, LoRA on 3-D expert weights (``target_parameters``), modules trained
whole (``modules_to_save``) and new token rows (``trainable_token_indices``). Counting them is exact where deriving
them from the config's rank and targets is not; only a frozen embedding PEFT saves beside LoRA on it
(``embed_tokens.base_layer.weight``) is no trained tensor. An adapter saved for the checkpoint layout (transformers 4's per-expert
layers) is counted as loading converts it (:mod:`qlora.model.adapter_layout`): fused experts' LoRA is wider.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UsageError
from .adapter_tensors import PEFT_PREFIX, lora_key


@dataclass(frozen=True)
class AdapterSize:
    """An adapter folder's saved tensor shapes (PEFT's keys) and its config."""

    folder: Path
    shapes: dict[str, tuple[int, ...]]
    config: dict

    @property
    def tensors(self) -> tuple[int, ...]:
        """Element counts of the trained tensors."""
        return tuple(math.prod(s) for k, s in self.shapes.items() if ".base_layer." not in k or ".lora_" in k)

    @property
    def params(self) -> int:
        return sum(self.tensors)

    @property
    def lora_paths(self) -> tuple[str, ...]:
        """The modules carrying LoRA factors (``lora_A``), by path."""
        return tuple(sorted({lora_key(k)[0] for k in self.shapes if k.startswith(PEFT_PREFIX) and ".lora_A." in k}))

    def in_layout(self, model: nn.Module) -> AdapterSize:
        """The tensors as they are once loaded on ``model`` (built on ``meta``): converted to its layout."""
        from .adapter_layout import to_model_layout

        tensors = {k: torch.empty(s, device="meta") for k, s in self.shapes.items()}
        config, moved = to_model_layout(model, self.config, tensors, self.folder)
        return AdapterSize(self.folder, {k: tuple(t.shape) for k, t in moved.items()}, config)


def adapter_size(adapter_dir: str | Path) -> AdapterSize:
    """The saved tensors of ``adapter_dir/adapter_model.safetensors`` by shape, with its config.

    Raises:
        UsageError: the file is missing, pickled (``adapter_model.bin``) or not a readable safetensors file.
    """
    from safetensors import SafetensorError, safe_open

    from .adapter_io import read_adapter_config, read_adapter_weights

    folder = Path(adapter_dir)
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        read_adapter_weights(folder)  # says what the folder holds instead
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()
                      if not key.endswith(".lora_velora_embed")}  # VeLoRA's backward state, not trained
    except (SafetensorError, OSError, ValueError) as exc:
        raise UsageError(f"{weights} is corrupted or not a safetensors file ({exc}).") from exc
    return AdapterSize(folder, shapes, read_adapter_config(folder))
