"""Packing rows with images: what a vision-language model needs beyond the text path's packed rows.

A packed row's 4D mask and restarting positions (:mod:`qlora.train.data.packing`) keep each example alone in
the language model, and next-fit packing never splits an example, so its image tokens stay whole. Beyond that:

- the image tensors of a pack's examples go in as one batch: per-image ones concatenated in token order (the
  order in which the model scatters image features into its image tokens), per-token ones at each example's
  place in its row (:func:`~qlora.train.data.image_examples.segment_image_batch`);
- models with multimodal rotary positions (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4V: a ``get_rope_index``) give an
  image's tokens 3-D (temporal, height, width) positions and continue the text after it from the image's extent,
  not its token count. The model's own ``get_rope_index`` computes them for each example alone; the rows are
  laid side by side under a leading row of restarting text positions, the ``(4, batch, length)`` form that
  transformers (4.57 and 5.x) reads as rotary positions plus sequence boundaries (flash attention's packing);
- refused: models whose forward builds its own mask from token types (Gemma 3, Gemma 3n, ShieldGemma 2: image
  tokens attend to each other both ways) or reads some tokens bidirectionally by config; the packed mask (each
  example causal and alone) would replace theirs.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from transformers import PreTrainedModel

from qlora.errors import UsageError


def check_image_packing(model: torch.nn.Module, where: str) -> None:
    """Refuse packing rows with images for a model whose attention over images is not causal.

    Raises:
        UsageError: the model builds a mask of its own from token types, or reads tokens bidirectionally.
    """
    owner = next(m for m in model.modules() if isinstance(m, PreTrainedModel))
    text = owner.config.get_text_config()
    if "token_type_ids" in inspect.signature(type(owner).forward).parameters or getattr(
            text, "use_bidirectional_attention", None):
        raise UsageError(f"{where}: this row holds images, and --packing is not supported for "
                         f"{owner.config.model_type} models: their image tokens attend to each other both ways, "
                         "through a mask the model builds itself (from the processor's token types), which the "
                         "packed rows' mask, each example causal and alone, would replace. Train without --packing.")


def multimodal_positions(model: torch.nn.Module) -> Callable[[list[int], dict[str, Any]], torch.Tensor] | None:
    """The model's multimodal rotary positions of one example alone, ``(3, tokens)``, from its ids and image
    tensors; None for a model whose positions are token counts."""
    owner = next((m for m in model.modules() if callable(getattr(m, "get_rope_index", None))), None)
    if owner is None:
        return None
    accepted = inspect.signature(owner.get_rope_index).parameters

    def positions(ids: list[int], media: dict[str, Any]) -> torch.Tensor:
        if not media:  # a text example: the positions of its tokens on all three axes
            return torch.arange(len(ids)).expand(3, -1)
        inputs = {k: v for k, v in media.items() if k in accepted}
        found, _ = owner.get_rope_index(input_ids=torch.tensor([ids]), **inputs)
        return found[:, 0]

    return positions
