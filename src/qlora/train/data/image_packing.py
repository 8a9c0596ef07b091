"""Packing rows with images: what a vision-language model needs beyond the text path's packed rows.

A packed row's 4D mask and restarting positions (:mod:`qlora.train.data.packing`) keep each example alone in
the language model, and next-fit packing never splits an example, so its image tokens stay whole. Beyond that:

- the image tensors of a pack's examples go in as one batch: per-image ones concatenated in token order (the
  order in which the model scatters image features into its image tokens), per-token ones at each example's
  place in its row (:func:`~qlora.chat.image_examples.segment_image_batch`);
- models with multimodal rotary positions (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4V: a ``get_rope_index``) give an
  image's tokens 3-D (temporal, height, width) positions and continue the text after it from the image's extent,
  not its token count. The model's own ``get_rope_index`` computes them for each example alone; the rows are
  laid side by side under a leading row of restarting text positions, the ``(4, batch, length)`` form that
  transformers (4.57 and 5.x) reads as rotary positions plus sequence boundaries (flash attention's packing).
  HunyuanVL's 4 axes (position, width, height, image index) take no such row (its 5.24 forward refuses it), nor
  do GLM-4.1V's and GLM-4.5V's decoders in transformers 4.x (5's take it): refused;
- Gemma 3 lets each image's tokens see each other both ways, blocks its forward finds in the processor's
  ``token_type_ids`` (runs of 1) and ORs into the causal mask; Molmo2 makes all the image tokens of a sequence
  (``mm_token_type_ids`` 1: every image's start, patch, column and end tokens) one such block. An explicit mask
  replaces the model's, so the packed one carries those blocks (:func:`image_blocks`), each kept inside its
  example. PaliGemma's prompts (images included) are such blocks too (:mod:`qlora.chat.prefix_lm`). Flash
  attention takes no mask: refused there. Refused too: other models whose forward takes token
  types (their meaning in the mask is not known here) or reads tokens bidirectionally by config (Gemma 4's
  ``use_bidirectional_attention``).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple

import torch
import transformers
from transformers import PreTrainedModel

from qlora.chat.prefix_lm import prefix_type
from qlora.errors import UsageError
from qlora.train.data.packing import MASK_ATTENTION


class ImageBlocks(NamedTuple):
    """Where a model's image tokens attend to each other both ways: the per-token tensor marking them with 1, and
    whether each run of them is a block of its own (Gemma 3: one image each, transformers'
    get_block_sequence_ids_for_mask) or all of a sequence's are one (Molmo2's forward gives them all block 0)."""
    key: str
    per_run: bool


# Model types whose decoder in transformers 4.x takes only its 3 rotary rows, not the packed text row above them.
THREE_ROWS_BEFORE_5 = ("glm4v", "glm4v_moe")

# Model types whose forward lets image tokens attend to each other both ways.
IMAGE_BLOCKS = {"gemma3": ImageBlocks("token_type_ids", per_run=True),
                "molmo2": ImageBlocks("mm_token_type_ids", per_run=False)}


def check_image_packing(model: torch.nn.Module, where: str) -> None:
    """Refuse packing rows with images where the packed mask cannot be the model's own.

    Raises:
        UsageError: the model builds a mask of its own from token types qlora does not know, reads tokens
            bidirectionally by config, or needs image blocks under an attention that takes no mask.
    """
    owner = _pretrained(model)
    kind = owner.config.model_type
    attn = getattr(owner.config, "_attn_implementation", None) or "eager"
    head = f"{where}: this row holds images, and --packing is not supported for {kind} models"
    if kind in IMAGE_BLOCKS and attn not in MASK_ATTENTION:
        raise UsageError(f"{head} with attention implementation {attn!r}: each image's tokens attend to each other "
                         "both ways, which only an explicit mask carries. Use eager or sdpa attention, or train "
                         "without --packing.")
    if kind not in IMAGE_BLOCKS and prefix_type(owner) is not None and attn not in MASK_ATTENTION:
        raise UsageError(f"{head} with attention implementation {attn!r}: each example's prompt is read both ways, "
                         "which only an explicit mask carries. Use eager or sdpa attention, or train without "
                         "--packing.")
    if kind not in IMAGE_BLOCKS and prefix_type(owner) is None and (
            "token_type_ids" in inspect.signature(type(owner).forward).parameters or getattr(
            owner.config.get_text_config(), "use_bidirectional_attention", None)):
        raise UsageError(f"{head}: the model builds its attention mask itself from the processor's token types or "
                         "reads some tokens both ways, which the packed rows' mask (each example causal and alone) "
                         "would replace. Train without --packing.")
    axes = _rotary_axes(model)
    old = kind in THREE_ROWS_BEFORE_5 and int(transformers.__version__.split(".")[0]) < 5
    if axes not in (None, 3) or old:
        which = f" in transformers {transformers.__version__} (5 takes it: upgrade transformers)" if old else ""
        raise UsageError(f"{head}: a packed row's positions are its examples' text positions above each one's "
                         f"multimodal rotary positions (transformers' packed form), and this model's forward{which} "
                         f"takes only its {axes} rotary axes (it refuses the extra row). Train without --packing.")


def _rotary_axes(model: torch.nn.Module) -> int | None:
    """How many multimodal rotary axes the model's ``get_rope_index`` gives (``mrope_section``'s length: Qwen2-VL's
    3, HunyuanVL's 4), or None for a model without one."""
    if not any(callable(getattr(m, "get_rope_index", None)) for m in model.modules()):
        return None
    text = _pretrained(model).config.get_text_config()
    for name in ("rope_parameters", "rope_scaling"):
        section = (getattr(text, name, None) or {}).get("mrope_section")
        if section:
            return len(section)
    return None


def image_blocks_of(model: torch.nn.Module) -> ImageBlocks | None:
    """How the model reads its image tokens both ways (:data:`IMAGE_BLOCKS`); None where it reads them causally."""
    return IMAGE_BLOCKS.get(_pretrained(model).config.model_type)


def image_blocks(token_types: torch.Tensor, sequence_ids: torch.Tensor, per_run: bool = True) -> torch.Tensor:
    """``(batch, length)`` ids of the image blocks in packed rows (-1 outside any): each run of 1 in
    ``token_types`` within one example is one block, or (``per_run`` False) all of one example's 1s are."""
    image = token_types == 1
    if not per_run:
        return torch.where(image, sequence_ids, -1)
    before = torch.nn.functional.pad(image, (1, 0))[:, :-1]
    same = torch.nn.functional.pad(sequence_ids, (1, 0), value=-2)[:, :-1] == sequence_ids
    starts = image & ~(before & same)
    return torch.where(image, starts.long().cumsum(-1) - 1, -1)


def _pretrained(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside ``model`` (a PEFT wrapper's base), else ``model`` itself."""
    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), model)


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
