"""Added tokens: grow the vocabulary and train the new rows, saved PEFT's way.

When the user adds tokens (a chat template's markers missing from the
vocabulary, say), the input embedding and the output head get new rows,
initialized to the mean of the existing rows (transformers'
``resize_token_embeddings``). The two modules are then trained whole, as
PEFT's ``modules_to_save=["embed_tokens", "lm_head"]`` does, and
:func:`qlora.save_adapter` writes them under PEFT's keys
(``base_model.model.model.embed_tokens.weight``...), so that a base model
resized to the tokenizer's length and ``peft.PeftModel.from_pretrained`` give
the same model as qlora's ``load_adapter``. The model remembers the size it had
before growing (:func:`grow_vocabulary`), so that an adapter saved from it also
holds the grown tables PEFT saves when the vocabulary changed (its
``save_embedding_layers``): those a resized base does not get back otherwise.
"""

from __future__ import annotations

import logging

from torch import nn

from ..errors import UsageError
from ..nn import Linear4bit
from .inject import adapter_configs, pending_modules_to_save

log = logging.getLogger("qlora")


def embedding_module_names(model: nn.Module) -> list[str]:
    """Full paths of the input embedding and (when separate) output head."""
    by_id = {id(m): n for n, m in model.named_modules()}
    names = []
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None and id(module) in by_id and by_id[id(module)] not in names:
            names.append(by_id[id(module)])
    return names


def grow_vocabulary(model: nn.Module, rows: int, mean_resizing: bool) -> None:
    """Resize the embedding and output head to ``rows`` (transformers' ``resize_token_embeddings``),
    remembering the vocabulary size the model was loaded with."""
    model.__dict__.setdefault("_qlora_base_vocab", model.config.get_text_config().vocab_size)
    model.resize_token_embeddings(rows, mean_resizing=mean_resizing)


def vocabulary_grown(model: nn.Module) -> bool:
    """Whether :func:`grow_vocabulary` changed the model's vocabulary size since it was loaded."""
    base = model.__dict__.get("_qlora_base_vocab")
    return base is not None and base != model.config.get_text_config().vocab_size


def add_special_tokens(model: nn.Module, tokenizer, tokens: str | list[str]) -> int:
    """Add ``tokens`` (as special tokens; one string is one token) to the tokenizer and resize the model.

    New embedding and output rows are the mean of the existing ones (tokens that fit in an embedding padded past
    the tokenizer take its unused rows as they are, as ``resize_token_embeddings`` leaves them). The
    embedding and output head are marked trainable for the next
    :func:`qlora.add_lora` (PEFT's ``modules_to_save``). Save the tokenizer
    next to the adapter: the adapter only fits a base resized to its length.

    Returns:
        The number of tokens actually added (those already known are skipped).

    Raises:
        UsageError: the output head is 4-bit (it must stay dense to be trained).
    """
    tokens = [t for t in dict.fromkeys([tokens] if isinstance(tokens, str) else tokens) if t]
    vocab = tokenizer.get_vocab()
    new = [t for t in tokens if t not in vocab]
    if not new:
        return 0
    head = model.get_output_embeddings()
    if isinstance(head, Linear4bit):
        raise UsageError("the output head is 4-bit; keep lm_head dense (the default) to add tokens.")
    added = tokenizer.add_tokens(new, special_tokens=True)
    size = len(tokenizer)
    if size > model.get_input_embeddings().weight.shape[0]:
        grow_vocabulary(model, size, mean_resizing=True)
    configs = adapter_configs(model)
    for name in embedding_module_names(model):
        # adapters attached already train the resized modules too; otherwise the next add_lora will
        for saved in [pending_modules_to_save(model)] + [c.modules_to_save for c in configs.values()]:
            if name not in saved:
                saved.append(name)
        model.get_submodule(name).requires_grad_(bool(configs))
    names = pending_modules_to_save(model)
    log.info("qlora: added %d tokens (%s); vocabulary now %d; training %s", added, ", ".join(new), size,
             ", ".join(names))
    return added

