"""Reasoning ("thinking") traces of assistant turns, given to each chat template its own way.

Reasoning-distillation data carries an assistant turn's chain of thought in one of three places:
a message field (``reasoning_content``: Qwen3, DeepSeek, vLLM; ``reasoning``; ``thinking``: gpt-oss),
a column beside the answer (``reasoning``/``thinking``/``reasoning_content`` next to ``output`` or
``completion``), or inside the content as a ``<think>...</think>`` block. Normalization keeps the
field under the dataset's own name (the row's reasoning column becomes the answer message's
``reasoning`` field); here, knowing the template, it is placed where that template expects it:

- a template that reads a reasoning field of the message gets it in that field (every name it
  reads), so it formats the reasoning its own way (Qwen3's ``<think>`` block, gpt-oss's analysis
  channel); content holding a ``<think>`` block is split into that field when the template does
  not parse such blocks itself;
- a template that takes reasoning as a content chunk (Mistral's reasoning models:
  ``{"type": "thinking", "thinking": ...}`` before the ``{"type": "text"}`` answer, written
  ``[THINK]...[/THINK]``) gets the content as those two chunks;
- otherwise, when the template or the vocabulary knows ``<think>``/``</think>``, the reasoning is
  folded into the content as ``<think>\\nreasoning\\n</think>\\n\\nanswer``, the block those
  templates parse (and plain-text rows are written the same way);
- otherwise the template has no place for reasoning, and the row is refused rather than trained
  without it.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from qlora.errors import UsageError

REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# NVIDIA's Nemotron post-training sets write "reasoning": "on"/"off" beside an output holding its own <think> block:
# a mode flag, not a trace.
_MODE_FLAGS = ("on", "off")


def message_reasoning(item: dict[str, Any], where: str) -> tuple[str, str] | None:
    """``(key, text)`` of a raw assistant message's (or a row's) reasoning field, or None when it has none (or an
    empty one, or a reasoning-mode flag).

    Raises:
        UsageError: a reasoning field that is not a string.
    """
    for key in REASONING_KEYS:
        value = item.get(key)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise UsageError(f'{where}: field "{key}" (the reasoning of an assistant message) must be a string, got '
                             f"{type(value).__name__}.")
        if value.strip() and value.strip().lower() not in _MODE_FLAGS:
            return key, value
    return None


def reasoning_of(message: dict[str, Any]) -> tuple[str, str] | None:
    """``(key, text)`` of a normalized message's reasoning field, or None."""
    for key in REASONING_KEYS:
        if isinstance(message.get(key), str) and message[key].strip():
            return key, message[key]
    return None


def split_think(content: str) -> tuple[str, str] | None:
    """``(reasoning, answer)`` of content holding a ``<think>...</think>`` block, else None."""
    if THINK_CLOSE not in content:
        return None
    reasoning, answer = content.rsplit(THINK_CLOSE, 1)
    return reasoning.replace(THINK_OPEN, "", 1).strip(), answer.strip()


def fold(reasoning: str, answer: str) -> str:
    """The reasoning as a ``<think>`` block before the answer, as Qwen3 and DeepSeek-R1 write it."""
    return f"{THINK_OPEN}\n{reasoning.strip()}\n{THINK_CLOSE}\n\n{answer.lstrip()}"


def thinking_chunks(template: str) -> bool:
    """Whether ``template`` takes reasoning as content chunks of type ``thinking`` (``block['type'] == 'thinking'``)."""
    return re.search(r"""(?:\[\s*['"]type['"]\s*\]|\.type)\s*==\s*['"]thinking['"]""", template) is not None


def chunk_reasoning(message: dict[str, Any]) -> str:
    """The text of a message's ``thinking`` content chunks ('' when it has none)."""
    content = message.get("content")
    if not isinstance(content, list):
        return ""
    return "".join(str(p.get("thinking", "")) for p in content if isinstance(p, dict) and p.get("type") == "thinking")


def template_reasoning_keys(template: str) -> tuple[str, ...]:
    """The message fields among :data:`REASONING_KEYS` that ``template`` reads (``message.thinking``,
    ``m['reasoning_content']``, ``message.get('reasoning')``, ``"thinking" in message``); none for a template
    that takes reasoning as content chunks, whose ``block['thinking']`` is no message field."""
    if thinking_chunks(template):
        return ()
    return tuple(k for k in REASONING_KEYS if re.search(
        rf"""\.{k}\b|\[\s*['"]{k}['"]\s*\]|\.get\(\s*['"]{k}['"]|['"]{k}['"]\s+(?:not\s+)?in\s""", template))


def parses_think_blocks(template: str) -> bool:
    """Whether ``template`` reads a ``<think>`` block out of the content itself (``'</think>' in content``,
    ``content.split('</think>')``), rather than only writing the markers (Kimi-K2-Thinking's ``<think></think>``
    before every answer, its reasoning read from a field)."""
    return re.search(r"""['"]</think>['"]\s*(?:not\s+)?in\b|\(\s*['"]</think>['"]""", template) is not None


def knows_think_markers(template: str, tokenizer) -> bool:
    """Whether the model writes reasoning as a ``<think>`` block: its template parses one, or its vocabulary
    has both markers as tokens."""
    if THINK_CLOSE in template:
        return True
    if tokenizer is None:
        return False
    unk = getattr(tokenizer, "unk_token_id", None)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in (THINK_OPEN, THINK_CLOSE)]
    return all(i is not None and i != unk for i in ids)


def has_reasoning(messages: Sequence[dict] | None, plain: tuple[str, str] | None = None) -> bool:
    """Whether an example carries reasoning: a field or a ``<think>`` block of an assistant turn, or a plain row's."""
    return plain is not None or any(
        m.get("role") == "assistant" and (reasoning_of(m) or THINK_CLOSE in (m.get("content") or ""))
        for m in messages or ())


def placement(template: str, tokenizer) -> str:
    """How :func:`place_reasoning` gives reasoning to ``template``, in words for the run log (reasoning in a field
    that a template has no place for is refused before; a ``<think>`` block in the content stays text)."""
    keys = template_reasoning_keys(template)
    if thinking_chunks(template):
        return "given to the chat template as thinking content chunks"
    if keys:
        return f"given to the chat template as {'/'.join(keys)}"
    if knows_think_markers(template, tokenizer):
        return "written as <think> blocks"
    return "trained as part of the answer text: this chat template has no place of its own for reasoning"


def no_place_error(where: str, key: str, origin: str) -> UsageError:
    return UsageError(
        f'{where}: field "{key}" holds the reasoning of an assistant turn, but the chat template ({origin}) has no '
        f"place for reasoning: it reads no {'/'.join(REASONING_KEYS)} field and neither it nor the tokenizer "
        "knows <think>/</think> markers, so the reasoning would be dropped from training. Train a reasoning "
        "model, whose own template takes reasoning (Qwen3, DeepSeek-R1, gpt-oss, GLM-4.5, SmolLM3), give the model a "
        "chat template that renders a reasoning_content field or <think> blocks (chat_template.jinja in its "
        f'folder), or remove the "{key}" field from the data (or write the reasoning into the answer yourself).')


def place_reasoning(messages: Sequence[dict], template: str, tokenizer, where: str = "",
                    origin: str = "the chat template") -> list[dict]:
    """``messages`` with each assistant turn's reasoning where ``template`` takes it (see the module docstring).

    Raises:
        UsageError: a turn has reasoning and the template has no place for it (naming the message and field).
    """
    keys = template_reasoning_keys(template)
    chunks = thinking_chunks(template)
    parses_think = parses_think_blocks(template)
    out = []
    for i, m in enumerate(messages):
        found = reasoning_of(m) if m.get("role") == "assistant" else None
        bare = {k: v for k, v in m.items() if k not in REASONING_KEYS}
        content = bare.get("content") if isinstance(bare.get("content"), str) else ""
        if found is None:
            embedded = split_think(content) if (keys or chunks) and not parses_think else None
            if embedded and m.get("role") == "assistant":  # e.g. gpt-oss: its template wants the field
                bare = _given(bare, embedded[0], embedded[1], keys, chunks)
            out.append(bare if m.get("role") == "assistant" else m)
            continue
        key, reasoning = found
        if chunks:
            out.append(_given(bare, reasoning, content, keys, chunks))
        elif keys:
            out.append({**bare, **{k: reasoning for k in keys}})
        elif knows_think_markers(template, tokenizer):
            out.append({**bare, "content": fold(reasoning, content)})
        else:
            raise no_place_error(f"{where}, message {i + 1} of the conversation", key, origin)
    return out


def _given(message: dict, reasoning: str, answer: str, keys: tuple[str, ...], chunks: bool) -> dict:
    """``message`` with ``reasoning`` and ``answer`` as the template takes them: thinking + text chunks, or the
    answer as content and the reasoning in each field of ``keys``."""
    if chunks:
        return {**message, "content": [{"type": "thinking", "thinking": reasoning}, {"type": "text", "text": answer}]}
    return {**message, "content": answer, **{k: reasoning for k in keys}}
