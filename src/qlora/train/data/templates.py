"""Chat templates: the built-in ones and the tokenizer's own.

Templates are Jinja strings in the same dialect as Hugging Face
``chat_template``s, so ``tokenizer.apply_chat_template(..., chat_template=...)``
renders ours exactly as it renders a model's own: the text qlora trains on and
the text a user's inference stack produces are the same by construction.

A model's own template always wins under ``auto``: a built-in one is used only
for a tokenizer without a template, or when asked by name, because a model
trained in a foreign format never sees that format at inference.
"""

from __future__ import annotations

from pathlib import Path

from qlora.errors import UsageError
from qlora.model.chat_format import ChatFormat
from qlora.template_file import is_custom, read_template
from qlora.template_names import template_name

_BOS = "{% if bos_token %}{{ bos_token }}{% endif %}"

CHATML = (
    _BOS + "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3 = (
    _BOS + "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Alpaca (Stanford): a preamble (the system message, or the standard one), then
# "### Instruction:" / "### Response:" blocks. A response ends with EOS because
# the format has no other end-of-turn marker.
ALPACA = (
    _BOS + "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}"
    "{% else %}{{ 'Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{% if not loop.first and messages[loop.index0 - 1]['role'] == 'assistant' %}{{ '\n\n' }}{% endif %}"
    "{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '### Response:\n' + message['content'] }}{% if eos_token %}{{ eos_token }}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)

TEMPLATES = {"chatml": CHATML, "llama-3": LLAMA3, "alpaca": ALPACA}

# The special tokens each built-in format needs as single tokens; Alpaca needs none.
_MARKERS = {"chatml": ("<|im_start|>", "<|im_end|>"),
            "llama-3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")}


def own_template(tokenizer) -> str | None:
    """The tokenizer's own chat template (the default one of several), or ``None``."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # tokenizers may carry several named templates
        own = own.get("default")
    return own or None


def fallback_template_name(tokenizer) -> str:
    """The built-in format ``auto`` picks for a tokenizer without a chat template.

    ChatML or Llama 3 when the vocabulary has their markers as single tokens (Qwen and Llama 3 base
    models do), else Alpaca: its headings are plain text and an answer ends with EOS, so a base model
    such as Llama 2 or Mistral needs no new tokens. ChatML there would spell ``<|im_end|>`` in a dozen
    ordinary pieces that the model learns to print as part of every answer.
    """
    vocab = tokenizer.get_vocab()
    for name, markers in _MARKERS.items():
        if all(m in vocab for m in markers):
            return name
    return "alpaca"


def fallback_note(tokenizer) -> str:
    """One line saying which format ``--template auto`` chose for a tokenizer without a template."""
    name = fallback_template_name(tokenizer)
    why = ("its vocabulary has that format's markers" if name in _MARKERS else
           "its vocabulary has no ChatML or Llama 3 markers, and Alpaca needs no new tokens")
    return (f"note: the model's tokenizer has no chat_template; --template auto uses the built-in {name!r} "
            f"format ({why}). Pass --template to choose another.")


def resolve_chat_template(tokenizer, name: str = "auto") -> str:
    """The Jinja template to train with.

    Args:
        tokenizer: a transformers tokenizer.
        name: ``"auto"`` (the tokenizer's own template, else :func:`fallback_template_name`'s),
            ``"tokenizer"`` (the tokenizer's own, required), or a built-in name
            (``chatml``, ``llama-3``, ``alpaca``), in any spelling of :mod:`qlora.template_names`; or the
            user's own template (:mod:`qlora.template_file`: a Jinja file, a tokenizer folder, Jinja text).

    Raises:
        UsageError: unknown name, ``"tokenizer"`` with a tokenizer that has none, or an unreadable template file.
    """
    if is_custom(name):
        return read_template(name)[0]
    try:
        name = template_name(name)
    except ValueError as exc:
        raise UsageError(f"--template: {exc}") from None
    own = own_template(tokenizer)
    if name == "auto":
        return own or TEMPLATES[fallback_template_name(tokenizer)]
    if name == "tokenizer":
        if not own:
            raise UsageError(
                "--template tokenizer: this tokenizer has no chat_template; "
                f"choose a built-in template ({', '.join(TEMPLATES)})."
            )
        return own
    return TEMPLATES[name]


def resolve_chat_format(tokenizer, name: str = "auto", date: str = "", system_into_user: bool = False) -> ChatFormat:
    """The :class:`ChatFormat` to train with: :func:`resolve_chat_template` plus where it came from,
    the pinned date and the system-message handling.

    Raises:
        UsageError: as :func:`resolve_chat_template`, a user's template that is not valid Jinja, or a malformed
            date.
    """
    if is_custom(name):
        template, origin = read_template(name)
        fmt = ChatFormat(template=template, origin=origin, name="custom", system_into_user=system_into_user)
        _check_syntax(tokenizer, fmt)
        return fmt.with_date(date) if date else fmt
    template = resolve_chat_template(tokenizer, name)
    own = own_template(tokenizer)
    if own and template == own:
        folder = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
        jinja = folder / "chat_template.jinja"
        origin = (f"{jinja}" if jinja.is_file() else
                  f"chat_template in {folder / 'tokenizer_config.json'}" if folder.is_dir() else "the tokenizer's chat_template")
        used = "tokenizer"
    else:
        used = next((n for n, t in TEMPLATES.items() if t == template), name)
        origin = f"built-in template {used!r}"
    fmt = ChatFormat(template=template, origin=origin, name=used, system_into_user=system_into_user)
    return fmt.with_date(date) if date else fmt


_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def _check_syntax(tokenizer, fmt: ChatFormat) -> None:
    """Refuse a user's template that is not valid Jinja (in transformers' dialect) before any data is read; an error
    raised by rendering depends on the conversation and is reported with the row that raises it."""
    from jinja2.exceptions import TemplateSyntaxError

    try:
        tokenizer.apply_chat_template(_PROBE, chat_template=fmt.pinned_template(), tokenize=False)
    except TemplateSyntaxError as exc:
        raise UsageError(f"--template: {fmt.origin}, line {exc.lineno}: not a valid Jinja chat template "
                         f"({exc.message}); fix the template (transformers renders it with Jinja2).") from None
    except Exception:  # noqa: BLE001 - the template's own checks (roles, system messages): reported per row
        pass
