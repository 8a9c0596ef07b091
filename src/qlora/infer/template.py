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
    """Prompt text for ``messages`` in the model's chat format, ready for generation."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    return chatml(messages, add_generation_prompt)


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
