"""A final answer's reasoning that the chat template hides, written as the model writes it in thinking mode.

Some templates never show a finished answer's reasoning and write no ``<think>`` markup before it for
:func:`~qlora.chat.tokenize.restore_final_reasoning` to fill (Gemma 4 shows reasoning only before tool calls).
Their generation prompt closes an empty reasoning block when thinking is off (Gemma 4's
``<|channel>thought\\n<channel|>``) and leaves the block to the model when a switch (``enable_thinking``,
``thinking``) turns thinking on. A conversation whose final answer has reasoning is then rendered in thinking mode,
and the model's block (that empty one, the reasoning before its closing token) written after that mode's generation
prompt, before the answer: what the model sees and writes at inference.
"""

from __future__ import annotations

from typing import Sequence

from qlora.chat.common_ends import common_prefix
from qlora.chat.reasoning import chunk_reasoning, reasoning_of, split_think
from qlora.model.chat_format import ChatFormat

# The variables templates test to turn thinking on (Qwen3 and Gemma 4 ``enable_thinking``, DeepSeek-V3.1 ``thinking``)
THINKING_ON = {"enable_thinking": True, "thinking": True}


def thinking_switch(template_kwargs: dict, own: dict | None = None) -> dict:
    """The thinking switch among the kwargs a conversation was rendered with: :data:`THINKING_ON` when
    :func:`final_reasoning_in_thinking_mode` rendered it, else empty, as it is for a row that sets the switch in
    its own template variables (``own``): that mode is the row's choice. Saved with the adapter, it renders
    inference prompts in the mode the model learned to answer in."""
    if own_switch(own):
        return {}
    return {k: v for k, v in template_kwargs.items() if k in THINKING_ON}


def own_switch(template_kwargs: dict | None) -> dict:
    """The thinking switch a row's template variables set (``{"enable_thinking": False}``), or empty; a null one
    is unset (``datasets`` fills a struct column's missing keys with nulls)."""
    return {k: v for k, v in (template_kwargs or {}).items() if k in THINKING_ON and v is not None}


def without_switch(template_kwargs: dict | None) -> dict:
    """``template_kwargs`` but for the thinking switch: the variables of the template's default mode."""
    return {k: v for k, v in (template_kwargs or {}).items() if k not in THINKING_ON}


def final_reasoning_in_thinking_mode(tokenizer, fmt: ChatFormat, messages: Sequence[dict], text: str,
                                     markers: Sequence[str], where: str = "",
                                     extra: dict | None = None) -> tuple[str, dict] | None:
    """``(text, template kwargs)`` of the conversation in thinking mode with its final answer's reasoning written
    where the model writes it, or None when that answer has no reasoning, shows it in ``text`` (the template's
    rendering), or the template has no thinking mode whose generation prompt leaves an empty block to the model
    (``markers``: the tokenizer's markup strings, one of which closes the block). ``text`` is the rendering with
    ``extra`` but for a thinking switch: a row whose variables (``extra``) turn thinking off is never rendered in
    thinking mode; one that turns it on is, as one that sets nothing."""
    *before, final = messages
    if not before or before[-1].get("role") != "user" or final.get("role") != "assistant" or final.get("tool_calls"):
        return None
    if any(v is not True for v in own_switch(extra).values()):  # the row turns thinking off
        return None
    parts = _reasoning_and_answer(final)
    if parts is None or not parts[0] or parts[0] in text:
        return None
    reasoning, answer = parts
    extra = without_switch(extra)  # the default mode, which ``text`` is
    prompt = fmt.render(tokenizer, before, where, add_generation_prompt=True, **extra)
    at = text.rfind(answer) if answer else len(text)
    n = min(common_prefix(prompt, text), at)
    if at < 0 or text[n:at].strip():
        return None
    block = prompt[n:]  # the empty block the prompt writes where the answer starts in the rendering
    close = max((block.rfind(m) for m in markers if m), default=-1)
    if close <= 0:
        return None
    on = {**extra, **THINKING_ON}
    full = fmt.render(tokenizer, messages, where, **on)
    prompt_on = fmt.render(tokenizer, before, where, add_generation_prompt=True, **on)
    rest = full[len(prompt_on):]
    lead = rest.find(answer)
    if not full.startswith(prompt_on) or lead < 0 or rest[:lead].strip():
        return None
    return prompt_on + block[:close] + reasoning + block[close:] + rest, on


def _reasoning_and_answer(message: dict) -> tuple[str, str] | None:
    """``(reasoning, answer)`` of an assistant message, both stripped: a reasoning field or thinking chunks and the
    content, or the content's ``<think>`` block and what follows it; None without reasoning."""
    content = message.get("content")
    found = reasoning_of(message)
    field = found[1] if found else chunk_reasoning(message)
    if field:
        answer = content if isinstance(content, str) else "".join(
            str(p.get("text", "")) for p in content or () if isinstance(p, dict) and p.get("type") == "text")
        return field.strip(), answer.strip()
    return split_think(content) if isinstance(content, str) else None
