"""The chat format of a fine-tune: template, pinned date, system handling.

Training and inference must render conversations identically, so the format a
run trained with is saved next to its adapter (``chat_format.json``) and
``qlora generate`` / ``qlora chat`` render with it by default (``qlora merge``
copies it into the merged model's folder, which they read as well). A format is:

- the Jinja ``chat_template`` (the model's own or a built-in one) and where it
  came from, for error messages;
- the date that templates calling ``strftime_now`` (Llama 3.1/3.2, SmolLM3,
  Granite, gpt-oss) see: pinned at the start of a run, so data tokenized
  today and on a resumed run tomorrow are the same tokens;
- whether a system message is folded into the first user turn, for templates
  that have no system role (Gemma 2, Mistral v0.1);
- the template variables inference renders prompts with unless told otherwise
  (``template_kwargs``): the thinking switch of a template whose rows trained in
  its thinking mode (Gemma 4's ``enable_thinking``), so the model is prompted
  in the mode it learned to answer in.

Template errors (``raise_exception`` in the template, Jinja syntax or runtime
errors) become :class:`~qlora.errors.UsageError` naming the template's origin
and line, the template's own message and what to do.
"""

from __future__ import annotations

import json
import re
import traceback
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from qlora.errors import UsageError
from qlora.template_kwargs import render_parameter

FILE = "chat_format.json"
DATE_FORMAT = "%Y-%m-%d"


@dataclass(frozen=True)
class ChatFormat:
    """How conversations are rendered to text (see the module docstring)."""

    template: str
    origin: str = "the chat template"
    name: str = "auto"
    date: str = ""
    system_into_user: bool = False
    template_kwargs: dict[str, Any] = field(default_factory=dict, hash=False)

    def pinned_template(self) -> str:
        """The template with ``strftime_now`` answering the pinned date.

        transformers exposes ``strftime_now`` as a global of its Jinja environment and turns callables
        passed as template variables into strings, so the pinned clock is a macro prepended to the
        template (on its first line: error line numbers stay those of the template file). Each format
        the template passes as a literal is answered with the pinned date; any other gets the ISO date.
        """
        if not self.date or not uses_date(self.template):
            return self.template
        pinned = pinned_datetime(self.date)
        formats = set(re.findall(r"""strftime_now\(\s*(?:"([^"]*)"|'([^']*)')\s*\)""", self.template))
        answers = {f: pinned.strftime(f) for pair in formats for f in pair if f}
        table = json.dumps(answers)
        macro = (f"{{%- macro strftime_now(format) -%}}{{{{ {table}.get(format, {json.dumps(self.date)}) }}}}"
                 "{%- endmacro %}")
        return macro + self.template

    def messages(self, messages: Sequence[dict]) -> list[dict]:
        """``messages`` as the template receives them (system folded into the first user turn if asked)."""
        messages = [dict(m) for m in messages]
        if self.system_into_user and messages and messages[0].get("role") == "system":
            system = messages.pop(0)
            first_user = next((m for m in messages if m.get("role") == "user"), None)
            if first_user is None:
                messages.insert(0, {"role": "user", "content": system.get("content", "")})
            else:
                first_user["content"] = f"{system.get('content', '')}\n\n{first_user.get('content', '')}"
        return messages

    def render(self, tokenizer, messages: Sequence[dict], where: str = "", /, *, add_generation_prompt: bool = False,
               **kwargs: Any):
        """``tokenizer.apply_chat_template`` with this format; template errors become UsageError naming ``where``.

        ``kwargs`` go to ``apply_chat_template`` (``tokenize``, ``return_dict``, ...) and from there to the template,
        so ``tokenizer`` and ``where`` are positional-only: template variables of those names reach the template. Without
        ``tokenize`` the rendered text is returned.
        """
        kwargs.setdefault("tokenize", False)
        try:
            return tokenizer.apply_chat_template(
                self.messages(messages), chat_template=self.pinned_template(),
                add_generation_prompt=add_generation_prompt, **kwargs)
        except UsageError:
            raise
        except Exception as exc:  # jinja2.TemplateError, or a Python error inside the template
            raise template_error(exc, self, messages, where) from None

    def save(self, folder: str | Path) -> None:
        """Write ``chat_format.json`` into ``folder`` (next to an adapter)."""
        Path(folder, FILE).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "ChatFormat | None":
        """The format saved in ``folder``, or ``None`` (an adapter from before formats were saved)."""
        path = Path(folder, FILE)
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            types = {"template": str, "origin": str, "name": str, "date": str, "system_into_user": bool,
                     "template_kwargs": dict}
            fmt = cls(**{k: data[k] for k in types if k in data})
            wrong = [k for k, kind in types.items() if not isinstance(getattr(fmt, k), kind)]
            if wrong:
                raise TypeError(f"{wrong[0]} must be a {types[wrong[0]].__name__}, got {getattr(fmt, wrong[0])!r}")
            if render_parameter(fmt.template_kwargs):
                raise TypeError(f"template_kwargs holds {render_parameter(fmt.template_kwargs)!r}, which is no "
                                "template variable")
            return fmt
        except (ValueError, TypeError, KeyError) as exc:
            raise UsageError(f"{path}: not a valid chat format file ({exc}); delete it to use the model's own "
                             "template, or retrain the adapter.") from None

    def keeping(self, saved: "ChatFormat | None") -> "ChatFormat":
        """This format, chosen (``--template``) over ``saved`` (an adapter's or a merged model's), with what ``saved``
        fixed besides its template: its pinned date, the template variables this template reads (all of them when
        it is ``saved``'s template) under this format's own, and, for the same template only, the folding of system
        messages (another template may have the system role the saved one lacked). Nothing saved: this format."""
        if saved is None:
            return self
        same = self.template == saved.template
        kept = {k: v for k, v in saved.template_kwargs.items() if same or _reads(self.template, k)}
        return replace(self, date=saved.date or self.date, template_kwargs={**kept, **self.template_kwargs},
                       system_into_user=self.system_into_user or (same and saved.system_into_user))

    def with_date(self, date: str) -> "ChatFormat":
        """A copy with ``date`` pinned (checked: YYYY-MM-DD)."""
        pinned_datetime(date)
        return replace(self, date=date)


def merged_format(model: str | Path) -> ChatFormat | None:
    """The format saved in a local model folder: ``qlora merge`` copies the adapter's there, so a merged
    fine-tune is prompted as the adapter was; ``None`` for other models and hub ids."""
    return ChatFormat.load(model) if Path(model).is_dir() else None


def today() -> str:
    """Today's date as pinned in a run's config."""
    return datetime.now().strftime(DATE_FORMAT)


def pinned_datetime(date: str) -> datetime:
    """``date`` (YYYY-MM-DD) as a datetime at midnight.

    Raises:
        UsageError: not a date in that form.
    """
    try:
        return datetime.strptime(date, DATE_FORMAT)
    except ValueError:
        raise UsageError(f"--template-date {date!r}: expected a date as YYYY-MM-DD, e.g. {today()}.") from None


def _reads(template: str, variable: str) -> bool:
    """Whether ``template`` names ``variable`` (a template variable it reads)."""
    return re.search(rf"\b{re.escape(variable)}\b", template) is not None


def uses_date(template: str) -> bool:
    """Whether rendering ``template`` depends on the day."""
    return "strftime_now" in template


_SYSTEM_WORDS = ("system",)
_ALTERNATE_WORDS = ("alternate",)


def template_error(exc: Exception, fmt: ChatFormat, messages: Sequence[dict], where: str = "") -> UsageError:
    """One paragraph for a template that failed to render: where, its own message, a hint."""
    line = _template_line(exc)
    place = f"{fmt.origin}" + (f", line {line}" if line else "")
    message = str(getattr(exc, "message", None) or exc).strip() or type(exc).__name__
    roles = [m.get("role") for m in messages]
    text = f"{where + ': ' if where else ''}the chat template ({place}) failed on this conversation {roles}: {message}."
    lowered = message.lower()
    if any(w in lowered for w in _SYSTEM_WORDS) and "system" in roles and not fmt.system_into_user:
        hint = ("This template has no system role. Fold each system message into the first user turn with "
                "--system-into-user (saved with the adapter, so generate and chat do the same), or remove the "
                "system messages from the data.")
    elif any(w in lowered for w in _ALTERNATE_WORDS) or "role" in lowered:
        spoken = [r for r in roles if r not in ("system", "developer")]
        fixes = (["merge consecutive messages of the same role in the data"]
                 if any(a == b for a, b in zip(spoken, spoken[1:])) else [])
        if spoken[:1] == ["assistant"]:  # a ShareGPT dump's opening greeting by the bot
            fixes.append("remove the assistant message that opens the conversation (or give it a user turn before)")
        if "system" in roles and not fmt.system_into_user:
            fixes.append("try --system-into-user")
        hint = ("The template requires its own order of roles (e.g. user and assistant alternating, starting with "
                f"user): {', or '.join(fixes) or 'write the conversation in that order'}.")
    elif fmt.name == "custom":
        hint = ("Check this conversation against what the template expects (roles, content types), and fix the "
                "template or the data.")
    else:
        hint = ("Check this conversation against what the template expects (roles, content types); the template "
                "is the model's own format, so fix the data rather than the template.")
    return UsageError(f"{text} {hint}")


def _template_line(exc: Exception) -> int | None:
    """The template line of a Jinja error: from a syntax error, else the innermost template frame."""
    line = getattr(exc, "lineno", None)
    if line:
        return line
    for frame, lineno in reversed(list(traceback.walk_tb(exc.__traceback__))):
        if frame.f_code.co_filename == "<template>":
            return lineno
    return None


_ARGUMENTS_AS_TEXT = re.compile(r"""arguments['"]?\]?\s*\+""")  # DeepSeek: '...' + tool['function']['arguments']
_ARGUMENTS_AS_JSON = re.compile(r"""arguments['"]?\]?\s*\|\s*tojson""")  # function.arguments|tojson


def for_template(messages: Sequence[dict], template: str) -> list[dict]:
    """Messages as ``template`` can take them: OpenAI's ``developer`` role becomes ``system`` for a template
    that has no developer role (all but a few recent ones), since that is what it means there; tool-call
    arguments are a dict (Hugging Face's convention, ``| tojson`` in the template) except for templates that
    concatenate them as JSON text and never write them with ``tojson`` (DeepSeek V3/R1; Apertus concatenates the
    arguments of its own content blocks but writes OpenAI ``tool_calls``' with ``tojson``)."""
    developer = "developer" in template
    as_text = bool(_ARGUMENTS_AS_TEXT.search(template)) and not _ARGUMENTS_AS_JSON.search(template)
    out = []
    for m in messages:
        if "weight" in m:  # ours (which turns are trained), not the template's
            m = {k: v for k, v in m.items() if k != "weight"}
        if m.get("role") == "developer" and not developer:
            m = {**m, "role": "system"}
        if m.get("tool_calls") and m.get("content") is None:  # transformers drops None keys; templates need one
            m = {**m, "content": ""}
        if as_text and m.get("tool_calls"):
            m = {**m, "tool_calls": [_arguments_as_text(c) for c in m["tool_calls"]]}
        out.append(m)
    return out


def _arguments_as_text(call: dict) -> dict:
    fn = call.get("function", {})
    if isinstance(fn.get("arguments"), str):
        return call
    return {**call, "function": {**fn, "arguments": json.dumps(fn.get("arguments", {}), ensure_ascii=False)}}


# Token strings that end an assistant turn in common templates: generation stops on them, and
# training counts them as the end marker of a turn (with EOS and generation_config's eos ids).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|END_OF_TURN_TOKEN|>",
                      "<|end_of_turn|>", "<|return|>")


def stop_token_ids(tokenizer, generation_eos: int | Sequence[int] | None = None) -> set[int]:
    """Ids that end a reply: the tokenizer's EOS, ``generation_config.eos_token_id`` (one id or a
    list), and the end-of-turn markers above that the vocabulary has."""
    ids: set[int] = set()
    for value in (generation_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return ids
