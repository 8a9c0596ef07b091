"""Render a list of messages into the prompt text a chat model was trained on.

The tokenizer's own ``chat_template`` is used when it has one, so a fine-tuned
model sees the format of its training data; otherwise ChatML, the format
qlora's built-in templates and tiny models use.
"""

from __future__ import annotations

from typing import Sequence

from .messages import Message

# Token strings that end an assistant turn in common templates; generation stops on them.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def chatml(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """ChatML text for ``messages``: the fallback when a tokenizer has no template."""
    text = "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def render_chat(tokenizer, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """Prompt text for ``messages`` in the model's chat format, ready for generation.

    Templates without a system role (Gemma's, Mistral's first) raise on one; the
    system text then goes before the first user message, separated by a blank line.
    """
    if not getattr(tokenizer, "chat_template", None):
        return chatml(messages, add_generation_prompt)

    def apply(msgs: Sequence[Message]) -> str:
        return tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in msgs],
                                             tokenize=False, add_generation_prompt=add_generation_prompt)

    if len(messages) < 2 or messages[0].role != "system" or messages[1].role != "user":
        return apply(messages)
    from jinja2.exceptions import TemplateError  # what a template's raise_exception() raises

    try:
        return apply(messages)
    except TemplateError:
        system, user = messages[0], messages[1]
        return apply([Message("user", f"{system.content}\n\n{user.content}"), *messages[2:]])


def stop_token_ids(model, tokenizer) -> set[int]:
    """Token ids that end a reply: EOS from model and tokenizer, plus end-of-turn markers."""
    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return ids
