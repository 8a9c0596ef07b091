"""Render a list of messages into the prompt text a chat model was trained on.

A fine-tune's :class:`~qlora.model.chat_format.ChatFormat` (saved with its
adapter) is used when given, so the model sees the format of its training data,
date and system handling included; otherwise the tokenizer's own
``chat_template``; otherwise ChatML, the format qlora's tiny models use.
Tool definitions go to the template (``apply_chat_template(tools=...)``), as
they did when a model was trained on tool-calling data; a template that has no
place for them is detected by :func:`renders_tools` rather than trusted.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

from qlora.chat.content_parts import reads_only_parts, reads_parts
from qlora.model.chat_format import ChatFormat, for_template
from qlora.model.chat_format import stop_token_ids as _stop_token_ids
from qlora.errors import UsageError

from .messages import Message


def chatml(messages: Sequence[Message], add_generation_prompt: bool = True,
           continue_final_message: bool = False) -> str:
    """ChatML text for ``messages``: the fallback when a tokenizer has no template (``continue_final_message``:
    the last message left open, as transformers leaves it)."""
    text = "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages)
    if continue_final_message:
        return text[:-len("<|im_end|>\n")]
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def chat_template(tokenizer, chat_format: ChatFormat | None = None, tools: bool = False) -> str | None:
    """The Jinja template :func:`render_chat` uses (``None``: the ChatML fallback).

    A tokenizer with several named templates uses its ``tool_use`` one for requests with tools,
    as ``apply_chat_template`` does.
    """
    if chat_format is not None:
        return chat_format.template
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):
        own = own.get("tool_use") if tools and own.get("tool_use") else own.get("default")
    return own or None


def render_chat(tokenizer, messages: Sequence[Message], add_generation_prompt: bool = True,
                chat_format: ChatFormat | None = None, tools: Sequence[dict[str, Any]] | None = None,
                template_kwargs: dict[str, Any] | None = None) -> str:
    """Prompt text for ``messages`` in the model's chat format, ready for generation.

    ``chat_format`` (the one a fine-tune saved) wins over the tokenizer's own template, and its
    ``template_kwargs`` (the thinking mode it trained in) apply unless ``template_kwargs`` set them.
    Templates without a system role (Gemma's, Mistral's first) raise on one; the
    system text then goes before the first user message, separated by a blank line.
    A content sent as several parts is handed over as its parts or its texts joined with newlines, as the
    template reads it (:mod:`qlora.chat.content_parts`, vLLM's rule); a template that reads a content only as
    parts gets a string content as one text part.
    ``tools`` (OpenAI function definitions) are passed to the template as ``tools``;
    ``template_kwargs`` go to ``apply_chat_template`` as its keyword arguments (template variables
    such as Qwen3's ``enable_thinking``, or ``continue_final_message``, ``documents``, and
    ``add_generation_prompt``, which overrides the argument).
    """
    template = chat_template(tokenizer, chat_format, tools=bool(tools))
    extra = {**(chat_format.template_kwargs if chat_format is not None else {}), **(template_kwargs or {})}
    add_generation_prompt = extra.pop("add_generation_prompt", add_generation_prompt)
    if template is None:
        return chatml(messages, add_generation_prompt, bool(extra.get("continue_final_message")))
    if tools:
        extra["tools"] = [dict(t) for t in tools]

    parts, only_parts = reads_parts(template), reads_only_parts(template)

    def apply(msgs: Sequence[Message]) -> str:
        from jinja2.exceptions import TemplateSyntaxError

        dicts = for_template([m.as_dict(parts) for m in msgs], template)
        # every content as parts, as training renders rows with images; a template that reads only parts (LLaVA's)
        # gets a string as one text part, as vLLM gives it: it would drop the text of a string
        if only_parts or any(m.images for m in msgs):
            from qlora.chat.images import as_parts

            dicts = as_parts(dicts)
        if chat_format is not None:
            return chat_format.render(tokenizer, dicts, add_generation_prompt=add_generation_prompt, **extra)
        try:
            return tokenizer.apply_chat_template(dicts, chat_template=template, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt, **extra)
        except TemplateSyntaxError as exc:  # a damaged chat_template.jinja / tokenizer_config.json
            raise UsageError(f"the model's chat template is not valid Jinja ({exc.message}, line {exc.lineno}); fix "
                             "its chat_template.jinja or tokenizer_config.json, or choose a built-in format with "
                             "--template chatml, llama-3 or alpaca.") from None

    from jinja2.exceptions import TemplateError  # what a template's raise_exception() raises

    def reasoned(msgs: Sequence[Message]) -> str:
        try:
            return apply(msgs)
        except (TemplateError, UsageError):  # gpt-oss's refuses a call with both text and reasoning: its text alone
            if not any(m.reasoning for m in msgs):
                raise
            return apply([replace(m, reasoning="") for m in msgs])

    if len(messages) < 2 or messages[0].role != "system" or messages[1].role != "user":
        return reasoned(messages)
    try:
        return reasoned(messages)
    except (TemplateError, UsageError):  # a saved ChatFormat reports template errors as UsageError
        system, user = messages[0], messages[1]
        return reasoned([Message("user", f"{system.content}\n\n{user.content}", images=user.images), *messages[2:]])


_PROBE_TOOL = {"type": "function", "function": {
    "name": "qlora_probe_tool", "description": "Probe whether the template renders tools.",
    "parameters": {"type": "object", "properties": {"qlora_probe_arg": {"type": "string"}}}}}


def renders_tools(tokenizer, chat_format: ChatFormat | None = None) -> bool:
    """Whether the chat template shows tool definitions to the model (many templates ignore ``tools``)."""
    template = chat_template(tokenizer, chat_format, tools=True)
    if template is None or "tools" not in template:
        return False
    probe = [Message("user", "Hello")]
    try:
        return "qlora_probe_tool" in render_chat(tokenizer, probe, chat_format=chat_format, tools=[_PROBE_TOOL])
    except Exception:  # a template that fails on tools cannot serve them either
        return False


def stop_token_ids(model, tokenizer) -> set[int]:
    """Token ids that end a reply: EOS from model and tokenizer, plus end-of-turn markers.

    In gpt-oss's harmony format ``<|end|>`` closes every message, the reasoning (analysis
    channel) too; a reply ends at ``<|return|>`` or ``<|call|>``, so ``<|end|>`` is no stop there
    unless the model's generation config lists it."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = _stop_token_ids(tokenizer, eos)
    vocab = tokenizer.get_vocab()
    listed = {eos} if isinstance(eos, int) else set(eos or ())
    if "<|return|>" in vocab and "<|channel|>" in vocab:
        ids.update(vocab[t] for t in ("<|return|>", "<|call|>") if t in vocab)
        if vocab.get("<|end|>") not in listed:
            ids.discard(vocab.get("<|end|>"))
    return ids
