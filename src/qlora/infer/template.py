"""Render a list of messages into the prompt text a chat model was trained on.

A fine-tune's :class:`~qlora.model.chat_format.ChatFormat` (saved with its
adapter) is used when given, so the model sees the format of its training data,
date and system handling included; otherwise the tokenizer's own
``chat_template``; otherwise ChatML, the format qlora's tiny models use.
"""

from __future__ import annotations

from typing import Sequence

from qlora.model.chat_format import ChatFormat
from qlora.model.chat_format import stop_token_ids as _stop_token_ids

from .messages import Message


def chatml(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """ChatML text for ``messages``: the fallback when a tokenizer has no template."""
    text = "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def render_chat(tokenizer, messages: Sequence[Message], add_generation_prompt: bool = True,
                chat_format: ChatFormat | None = None) -> str:
    """Prompt text for ``messages`` in the model's chat format, ready for generation."""
    dicts = [{"role": m.role, "content": m.content} for m in messages]
    if chat_format is not None:
        return chat_format.render(tokenizer, dicts, add_generation_prompt=add_generation_prompt)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(dicts, tokenize=False, add_generation_prompt=add_generation_prompt)
    return chatml(messages, add_generation_prompt)


def stop_token_ids(model, tokenizer) -> set[int]:
    """Token ids that end a reply: EOS from model and tokenizer, plus end-of-turn markers."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return _stop_token_ids(tokenizer, eos)
