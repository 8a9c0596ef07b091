"""Prefix-LM models: the prompt read both ways, the answer causally, marked by ``token_type_ids``.

PaliGemma (1 and 2) is trained so: its processor, given a ``suffix``, marks the image and prompt 0 and the answer
1, and its forward lets the 0s attend to each other both ways (``block_sequence_ids`` in transformers 5, the
training mask of 4.x). Without the marker its forward does not fall back to a causal mask everywhere:
transformers 5 sets ``use_bidirectional_attention`` on its text config, so sdpa without a padding mask reads the
whole row both ways (each answer token sees the later ones), and 4.x reads every row both ways unless it is
given token types and labels. HRM-Text (``prefix_lm``) marks its prefix with 1 instead.

qlora's rows carry the split in their labels: the prefix is each example's tokens before its first trained one
(the prompt; a multi-turn row's later turns stay causal, so no trained token ever sees a later token).
"""

from __future__ import annotations

import torch
from torch import nn

from qlora.chat.tokenize import IGNORE_INDEX
from qlora.errors import UsageError


def prefix_type(model: nn.Module) -> int | None:
    """The ``token_type_ids`` value that marks the prefix for ``model``'s forward; None for other models."""
    config = getattr(getattr(model, "module", model), "config", None)
    kind = getattr(config, "model_type", None)
    if kind == "paligemma":
        return 0
    if kind == "hrm_text" and getattr(config, "prefix_lm", False):
        return 1
    return None


def prefix_tokens(labels: torch.Tensor, sequence_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``(batch, length)`` bool: the tokens before the first trained label of their example (``sequence_ids``
    numbers a packed row's examples; without it each row is one example)."""
    if sequence_ids is None:
        sequence_ids = torch.zeros_like(labels)
    length = labels.shape[-1]
    place = torch.arange(length, device=labels.device).expand_as(labels)
    example = sequence_ids + 1  # padding (-1) becomes an example of its own
    first = torch.full((labels.shape[0], int(example.max()) + 1), length, device=labels.device)
    first = first.scatter_reduce(1, example, torch.where(labels != IGNORE_INDEX, place, length), "amin")
    first = first.gather(1, example)
    return place < first


def token_types(labels: torch.Tensor, prefix: int) -> torch.Tensor:
    """``token_type_ids`` for a batch of unpacked rows: ``prefix`` on each row's prompt, the other value (0 or 1)
    from its first trained token on, as PaliGemma's processor marks a prompt and its suffix."""
    return torch.where(prefix_tokens(labels), prefix, 1 - prefix)


def prompt_types(model: nn.Module, ids: torch.Tensor, scored: bool = False, answer: int = 0) -> dict[str, torch.Tensor]:
    """The ``token_type_ids`` keyword of a generation's prefill: the prompt is the prefix, as PaliGemma's
    processor marks a prompt given without a suffix (its forward ignores them once the cache holds the prompt,
    and each generated token is causal), the last ``answer`` tokens (forced ones of the reply) causal, all of it
    causal where the prompt's own tokens are ``scored`` (their logprobs must not see later ones); ``{}`` for
    other models."""
    prefix = prefix_type(model)
    if prefix is None:
        return {}
    types = torch.full_like(ids, 1 - prefix)
    if not scored:
        types[:, :ids.shape[1] - answer] = prefix
    return {"token_type_ids": types}


def packed_windows(model: nn.Module, windows: dict[str, int | None], seq_len: int) -> dict[str, int | None]:
    """The layer types a packed row's mask is built for: PaliGemma's forward takes one mask and builds the
    sliding layers' from it (a 4D mask it uses as given), so PaliGemma 2's full and sliding layers share one,
    which is exact while no row is longer than the window.

    Raises:
        UsageError: a prefix-LM with sliding layers whose window is shorter than ``--seq-len``.
    """
    if prefix_type(model) is None or len(windows) < 2:
        return windows
    shortest = min(w for w in windows.values() if w is not None)
    if shortest < seq_len:
        kind = getattr(getattr(model, "config", None), "model_type", "?")
        raise UsageError(f"--packing is not supported for {kind} models with --seq-len {seq_len}: the model takes "
                         f"one attention mask for its full and sliding-window layers, so a packed row must fit its "
                         f"window ({shortest} tokens). Use --seq-len {shortest} or less, or train without --packing.")
    return {"full_attention": None}
