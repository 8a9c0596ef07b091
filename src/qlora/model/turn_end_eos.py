"""The token a fine-tune's chat format ends an answer with, listed among a written model's EOS ids.

transformers' ``generate``, vLLM and TGI stop where ``generation_config.json``'s ``eos_token_id`` says. A base model
fine-tuned in a chat format whose turn ends in another token than the base's EOS (ChatML's ``<|im_end|>`` on a
Llama or Qwen base, whose EOS is ``<|end_of_text|>`` / ``<|endoftext|>``) learned to end its answers with that token,
so a merged or quantized folder that kept the base's ids alone would run on past the answer in those tools (qlora's
own inference and the Ollama Modelfile stop at it). LLaMA-Factory adds a template's stop words to the exported
``eos_token_id`` alike; the base's ids stay first (tools that read one EOS take the first).
"""

from __future__ import annotations

from typing import Any

from ..errors import UsageError
from .chat_format import ChatFormat, stop_token_ids
from .trained_tokens import eot_token_ids

_QUESTION, _ANSWER = "Say it.", "It is said."


def turn_end_id(tokenizer, fmt: ChatFormat, generation_eos: int | list[int] | None = None,
                eot_tokens: str = "") -> int | None:
    """The stop token that ``fmt`` writes after an answer (the one training taught the model to end with), or
    None: the format ends an answer in text (ChatML on a vocabulary without ``<|im_end|>``: training adds EOS) or
    cannot render a plain user/assistant exchange.

    Args:
        generation_eos: the model's ``generation_config.eos_token_id``, counted as stop tokens as training does.
        eot_tokens: the run's ``--eot-tokens`` (comma-separated), also counted.
    """
    answer = {"role": "assistant", "content": _ANSWER}
    try:
        text = fmt.render(tokenizer, [{"role": "user", "content": _QUESTION}, answer], **fmt.template_kwargs)
    except UsageError:
        return None
    end = text.rfind(_ANSWER)
    if end < 0:
        return None
    end += len(_ANSWER)
    stops = stop_token_ids(tokenizer, generation_eos) | eot_token_ids(tokenizer, eot_tokens)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return next((i for i, (start, _) in zip(encoded["input_ids"], encoded["offset_mapping"])
                 if start >= end and i in stops), None)


def add_turn_end_eos(generation_config: Any, tokenizer, fmt: ChatFormat | None, eot_tokens: str = "") -> None:
    """Append :func:`turn_end_id` to ``generation_config.eos_token_id`` (made a list, the base's ids first) where it
    is not there yet; nothing for ``fmt`` None or a config-less model."""
    if generation_config is None or fmt is None:
        return
    eos = generation_config.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not ids and tokenizer.eos_token_id is not None:
        ids = [tokenizer.eos_token_id]
    end = turn_end_id(tokenizer, fmt, ids, eot_tokens)
    if end is not None and end not in ids:
        generation_config.eos_token_id = [*ids, end]
