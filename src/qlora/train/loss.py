"""The training loss: summed next-token cross-entropy over trainable labels.

Two paths compute the same number. The plain one asks the model for its
logits. The chunked one asks the decoder for its final hidden states and
applies the output head inside :func:`qlora.nn.chunked_ce.chunked_linear_cross_entropy`,
so the ``[tokens, vocab]`` float32 logits never exist (4 GiB per copy for
Llama-3 at 8k tokens). Models whose logits are more than ``hidden @ W^T``
(soft-capping, logit scales, a head bias) are detected by
:func:`chunked_loss_matches` and keep the plain path.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect

import torch
import torch.nn.functional as F
from torch import nn

from qlora.chat.prefix_lm import prefix_type, token_types
from qlora.nn.chunked_ce import chunked_linear_cross_entropy
from qlora.train.data import IGNORE_INDEX


# Batch entries that are not keyword arguments of the model's forward.
NON_MODEL_KEYS = ("labels", "ref_logps", "desirable", "stand_in", "image_tokens")


# Per-token inputs that a model's processor returns for text too: transformers' ProcessorMixin marks each token's
# modality in ``mm_token_type_ids``, 0 for a text token (create_mm_token_type_ids). Molmo2's forward requires it
# when training.
TEXT_TOKEN_TYPES = ("mm_token_type_ids",)


# transformers 4.x's PaliGemma reads token_type_ids only given labels too ("is_training"); without them it reads
# every token both ways.
TOKEN_TYPES_NEED_LABELS = importlib.util.find_spec("transformers.initialization") is None


@functools.cache
def _forward_inputs(model_class: type) -> frozenset[str]:
    """The keyword inputs of ``model_class``'s forward, read once per class (model_inputs runs at every step)."""
    return frozenset(inspect.signature(model_class.forward).parameters)


def model_inputs(batch: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s keyword arguments in ``batch``: without labels or reference log-probs, and with the
    :data:`TEXT_TOKEN_TYPES` its forward takes that a batch without images lacks (no processor ran for it), at the
    value its processor gives text: 0, as a row without images beside rows with them already gets. A prefix-LM
    (PaliGemma: :mod:`qlora.chat.prefix_lm`) gets the ``token_type_ids`` that mark each row's prompt (rows with
    images carry their processor's), unless the batch's mask is already explicit (packed rows carry the prompt
    blocks in it)."""
    inputs = {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS}
    takes = _forward_inputs(type(getattr(model, "module", model)))  # DDP's model inside
    for key in TEXT_TOKEN_TYPES:
        if key not in inputs and key in takes:
            inputs[key] = torch.zeros_like(batch["input_ids"])
    prefix = prefix_type(model)
    mask = inputs.get("attention_mask")
    if prefix is not None and not isinstance(mask, dict) and (mask is None or mask.dim() == 2):
        if "token_type_ids" not in inputs:  # rows with images carry their processor's
            inputs["token_type_ids"] = token_types(batch["labels"], prefix)
        if TOKEN_TYPES_NEED_LABELS and "labels" in takes:
            inputs["labels"] = batch["labels"]
    return inputs


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    decoder = getattr(model, getattr(model, "base_model_prefix", "") or "", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(decoder, nn.Module) or type(head) is not nn.Linear or head.bias is not None:
        return None
    return decoder, head


def token_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], chunked: bool = False) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over the trainable labels of ``batch``."""
    inputs = model_inputs(batch, model)
    labels = batch["labels"][:, 1:].reshape(-1)
    if chunked:
        decoder, head = decoder_and_head(model)
        hidden = decoder(**inputs, use_cache=False).last_hidden_state[:, :-1]
        return chunked_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, labels)
    logits = model(**inputs, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels,
                           ignore_index=IGNORE_INDEX, reduction="sum")


# Config fields by which transformers models turn ``hidden @ W^T`` into something else.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


@torch.no_grad()
def chunked_loss_matches(model: nn.Module, batch: dict[str, torch.Tensor]) -> bool:
    """Whether the model's logits are exactly its decoder's hidden states times the
    head: checked from the config and numerically, once, on a real batch."""
    parts = decoder_and_head(model)
    config = getattr(model, "config", None)
    configs = [config, config.get_text_config()] if hasattr(config, "get_text_config") else [config]
    if parts is None or any(getattr(c, f, None) not in (None, 1, 1.0) for c in configs for f in _LOGIT_TRANSFORMS):
        return False
    decoder, head = parts
    inputs = model_inputs(batch, model)
    was_training = model.training
    model.eval()
    try:
        logits = model(**inputs, use_cache=False).logits.float()
        ours = (decoder(**inputs, use_cache=False).last_hidden_state @ head.weight.t()).float()
    except (TypeError, AttributeError):  # a decoder without last_hidden_state or these inputs
        return False
    finally:
        model.train(was_training)
    if not torch.isfinite(logits).all():  # unverifiable; the first step reports the non-finite module
        return False
    tol = 1e-4 if head.weight.dtype == torch.float32 else 2e-2
    return ours.shape == logits.shape and bool(torch.allclose(ours, logits, rtol=tol, atol=tol * logits.abs().max().item()))
