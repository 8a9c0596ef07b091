"""Which keys of ``chat_template_kwargs`` are template variables, and which are the rendering's own parameters.

``apply_chat_template(**kwargs)`` passes unknown keywords to the template (Qwen3's ``enable_thinking``,
gpt-oss's ``reasoning_effort``, ``documents``), but some of its keywords change how it renders or what it
returns (``tokenize``, ``chat_template``, ...): those are refused wherever template variables are given, the
``chat_template_kwargs`` of ``qlora serve`` requests and the ``--chat-template-kwargs`` options alike. Kept free of
heavy imports: the argument parsers use it.
"""

from __future__ import annotations

from typing import Any, Mapping

# apply_chat_template's parameters that are not template variables (messages, tools and the template have their
# own fields and options)
RENDER_PARAMETERS = frozenset({"conversation", "messages", "tools", "chat_template", "tokenize", "padding",
                               "truncation", "max_length", "return_tensors", "return_dict",
                               "return_assistant_tokens_mask", "tokenizer_kwargs", "sanitize_control_tokens"})


def render_parameter(kwargs: Mapping[str, Any]) -> str | None:
    """The first key of ``kwargs`` that is a parameter of the rendering rather than a template variable, or None."""
    return next((key for key in kwargs if key in RENDER_PARAMETERS), None)
