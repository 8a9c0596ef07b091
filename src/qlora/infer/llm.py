"""The model seen as an LLM: prompt text in, completion text out.

Memories that ask the model to summarize or extract facts depend only on the
:class:`LLM` protocol, so tests drive them with a scripted stand-in that
returns known text, and the real path uses :class:`ModelLLM`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterator, Protocol, Sequence

from qlora.chat.prefix_lm import prefix_type
from qlora.chat.prefix_suffix import image_prompt
from qlora.errors import UsageError
from qlora.model.chat_format import ChatFormat

from .generate import SamplingOptions, default_stop_ids, stream_text
from .sampling_options import merged, model_defaults
from .messages import Message
from .reply_reading import ReplyReader, ReplyText, Splitter
from .template import chat_template, render_chat, renders_tools, stop_token_ids
from .tool_calls import ToolCallFormat, ToolCallStream, markup_token_ids, tool_call_format
from .turn_end import turn_end_stops


class LLM(Protocol):
    """Anything that completes a prompt with text."""

    def complete(self, prompt: str, **options: Any) -> str: ...


class ModelLLM:
    """A loaded causal LM + tokenizer, prompted through its chat template.

    Args:
        model: a transformers causal LM.
        tokenizer: its tokenizer.
        chat_format: the format to prompt in (a fine-tune's saved one); default: the tokenizer's template.
        processor: the model's processor (:func:`qlora.infer.images.image_processor`), for messages with images.
        template_kwargs: variables the chat template is rendered with (``{"enable_thinking": False}``), over the
            format's own.
        **defaults: :class:`SamplingOptions` fields used unless a call overrides them (left out: the model's
            generation config values, else :class:`SamplingOptions`'s).
    """

    def __init__(self, model, tokenizer, chat_format: ChatFormat | None = None, processor=None,
                 template_kwargs: dict[str, Any] | None = None, **defaults: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor
        self.chat_format = chat_format
        self.template_kwargs = template_kwargs
        self.options = SamplingOptions(**merged(model_defaults(model), defaults))
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.reader = ReplyReader(tokenizer)
        self._turn_ends: dict[bool, tuple[str, ...]] = {}  # with tools or not (a tokenizer's tool_use template)

    def tool_format(self) -> ToolCallFormat:
        """How this model writes tool calls (from its chat template).

        Raises:
            UsageError: the template does not render tool definitions, so the model would never see them.
        """
        if not renders_tools(self.tokenizer, self.chat_format):
            origin = self.chat_format.origin if self.chat_format is not None else "the tokenizer's chat_template"
            raise UsageError(f"--tools: the chat template ({origin}) does not render tools, so the model would "
                             "never see them. Use a model whose template renders tools (one trained on "
                             "tool-calling data with its own template), or leave out --tools.")
        return tool_call_format(chat_template(self.tokenizer, self.chat_format, tools=True) or "")

    def reply(self, messages: Sequence[Message], tools: Sequence[dict] | None = None,
              **options: Any) -> tuple[Iterator[str], Splitter | None]:
        """Stream the assistant's reply to ``messages``: its decoded text (markup that tells calls, reasoning or
        harmony's channels kept) and what splits that into the answer a user reads, its reasoning and its calls
        (``push`` each piece, ``finish`` at the end; None: the text is the answer). The reply ends at its turn end
        where the format spells that as text (:func:`~qlora.infer.turn_end.turn_end_stops`). A prefix-LM's
        (PaliGemma's) messages with images are its processor's prompt instead (:func:`image_prompt`), as it trained
        on them, and its reply ends at EOS.

        Raises:
            UsageError: images without a processor; a prefix-LM's images with messages that end with an answer,
                or with ``tools``.
        """
        if "max_new_tokens" in options:  # in place of the model's max_length too
            options = {**options, "max_length": None}
        images = [ref for m in messages for ref in m.images]
        if images and self.processor is None:
            raise UsageError("these messages hold images, but no image processor was given for the model.")
        if images and prefix_type(self.model) is not None:
            if tools:
                raise UsageError("--tools: PaliGemma's prompt with images (its processor's prefix) has no place for "
                                 "tools; leave out --tools to ask about images.")
            prompt = image_prompt(self.processor, [m.as_dict() for m in messages])
            return stream_text(self.model, self.tokenizer, prompt, replace(self.options, **options),
                               default_stop_ids(self.model, self.tokenizer), images=images,
                               processor=self.processor), None
        prompt = render_chat(self.tokenizer, messages, chat_format=self.chat_format, tools=tools,
                             template_kwargs=self.template_kwargs)
        template = chat_template(self.tokenizer, self.chat_format, tools=bool(tools))
        calls = self.tool_format() if tools else None
        keep = markup_token_ids(calls, self.tokenizer) if calls is not None else frozenset()
        keep |= self.reader.keep(template, self.chat_format, self.template_kwargs)
        names = [t["function"]["name"] for t in tools] if tools else None
        split = self.reader.splitter(prompt, template, self.chat_format, self.template_kwargs,
                                     ToolCallStream(calls, names) if calls is not None else None, names)
        if bool(tools) not in self._turn_ends:
            self._turn_ends[bool(tools)] = turn_end_stops(self.tokenizer, self.stop_ids, self.chat_format,
                                                          self.template_kwargs, tools)
        return stream_text(self.model, self.tokenizer, prompt, replace(self.options, **options), self.stop_ids,
                           keep=keep, stop_strings=self._turn_ends[bool(tools)], chat=True, images=images,
                           processor=self.processor), split

    def stream_messages(self, messages: Sequence[Message], **options: Any) -> Iterator[str]:
        """Stream the answer to ``messages`` (no tools), its reasoning left out."""
        yield from ReplyText(*self.reply(messages, **options))

    def complete(self, prompt: str, **options: Any) -> str:
        """The reply to ``prompt`` sent as one user message (the text a user reads), stripped of surrounding space."""
        return "".join(self.stream_messages([Message("user", prompt)], **options)).strip()
