"""An Ollama ``Modelfile`` for an exported GGUF: FROM, TEMPLATE and stop tokens.

Ollama templates are Go ``text/template`` programs, chat templates are Jinja
programs; no general translation exists. What most chat formats share is a
*per-message* shape: ``head`` once, then for each message
``prefix[role] + content + suffix[role]``, then a generation prompt. This
module recovers that shape by rendering the model's own Jinja template on
probe conversations (text markers as contents), then checks it: the shape must
reproduce the Jinja rendering of every probe conversation exactly (with and
without a system message, one and two turns, with and without the generation
prompt). Only a verified shape is written as a Go template (ChatML, Llama 3,
Gemma, Phi-3 and the like pass); for any other template (e.g. Llama 2 /
Mistral ``[INST]`` formats that fold the system prompt into the first user
turn) the Modelfile says so instead of guessing, and a template that needs a
system message it cannot place drops the system branch with a note.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

_ROLES = ("system", "user", "assistant")


@dataclass
class ChatFormat:
    """A chat template in per-message form."""

    head: str
    prefix: dict[str, str]
    suffix: dict[str, str]
    generation: str
    notes: list[str] = field(default_factory=list)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        text = self.head + "".join(self.prefix[m["role"]] + m["content"] + self.suffix[m["role"]] for m in messages)
        if add_generation_prompt and messages and messages[-1]["role"] != "assistant":
            text += self.generation
        return text


def chat_format(tokenizer) -> ChatFormat | None:
    """The verified per-message form of ``tokenizer``'s chat template, or None."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    specials = [t for t in set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab()) if t]

    def render(messages: list[tuple[str, str]], gen: bool = True) -> str | None:
        try:
            return tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                                 tokenize=False, add_generation_prompt=gen)
        except Exception:  # templates raise on conversations they do not allow
            return None

    def boundary(text: str) -> bool:  # pieces are cut after a special token or a newline, never inside one
        return not text or text.endswith("\n") or any(text.endswith(t) for t in specials)

    x, y, z, w = "\u2460qx\u2460", "\u2461qy\u2461", "\u2462qz\u2462", "\u2463qw\u2463"
    one, three = render([("user", x)]), render([("user", x), ("assistant", y), ("user", z)])
    if one is None or three is None or one.count(x) != 1 or not all(three.count(c) == 1 for c in (x, y, z)):
        return None
    before_x, after_x = one.split(x)  # head + pre_u | post_u + generation
    closed = render([("user", x)], gen=False)  # post_u (+ whatever ends a prompt without generation)
    closed_after = closed.split(x, 1)[1] if closed and x in closed else after_x
    post_u = _cut(_common_prefix(after_x, closed_after), boundary, from_end=True)
    x_to_y, y_to_z = three.split(x)[1].split(y)[0], three.split(y)[1].split(z)[0]
    if not x_to_y.startswith(post_u) or not three.endswith(after_x):
        return None
    pre_u = _cut(_common_suffix(before_x, y_to_z), lambda t: boundary(before_x[: len(before_x) - len(t)])
                 and boundary(y_to_z[: len(y_to_z) - len(t)]), from_end=False)
    head, post_a = before_x[: len(before_x) - len(pre_u)], y_to_z[: len(y_to_z) - len(pre_u)]
    fmt = ChatFormat(head, {"user": pre_u, "assistant": x_to_y[len(post_u):]},
                     {"user": post_u, "assistant": post_a}, after_x[len(post_u):])

    with_system = render([("system", w), ("user", x)])
    if with_system is not None and with_system.count(w) == 1 and with_system.startswith(head):
        pre_s, after = with_system[len(head):].split(w, 1)
        post_s = after.split(x, 1)[0]
        if post_s.endswith(pre_u):
            fmt.prefix["system"], fmt.suffix["system"] = pre_s, post_s[: len(post_s) - len(pre_u)]
    probes = [[("user", x)], [("user", x), ("assistant", y), ("user", z)]]
    if not all(fmt.render(_messages(p)) == render(p) for p in probes):
        return None
    if "system" in fmt.prefix and not all(fmt.render(_messages([("system", w)] + p)) == render([("system", w)] + p)
                                          for p in probes):
        del fmt.prefix["system"], fmt.suffix["system"]
    if "system" not in fmt.prefix:
        fmt.notes.append("system messages are not translated (the chat template does not render them as a "
                         "turn of their own); Ollama's TEMPLATE ignores them")
    return fmt


def _messages(pairs: list[tuple[str, str]]) -> list[dict]:
    return [{"role": r, "content": c} for r, c in pairs]


def _cut(text: str, ok, from_end: bool) -> str:
    """The longest piece of ``text`` passing ``ok``: a prefix (``from_end``: dropping from its end) or a suffix."""
    for n in range(len(text), -1, -1):
        piece = text[:n] if from_end else text[len(text) - n:]
        if ok(piece):
            return piece
    return ""


def _common_suffix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return a[len(a) - n:]


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def go_template(fmt: ChatFormat, drop_head: str = "") -> str:
    """``fmt`` as an Ollama (Go text/template) TEMPLATE over ``.Messages``.

    Args:
        drop_head: text at the start of ``head`` that the runtime adds itself
            (the BOS token, when the GGUF says to add it).
    """
    head = fmt.head[len(drop_head):] if drop_head and fmt.head.startswith(drop_head) else fmt.head
    branches = []
    for role in _ROLES:
        if role in fmt.prefix:
            keyword = "if" if not branches else "else if"
            branches.append(f'{{{{ {keyword} eq .Role "{role}" }}}}{_literal(fmt.prefix[role])}{{{{ .Content }}}}'
                            f'{_literal(fmt.suffix[role])}')
    last = '{{ if and (eq (len (slice $.Messages $i)) 1) (ne .Role "assistant") }}'
    return (f"{_literal(head)}{{{{ range $i, $_ := .Messages }}}}{''.join(branches)}{{{{ end }}}}"
            f"{last}{_literal(fmt.generation)}{{{{ end }}}}{{{{ end }}}}")


def _literal(text: str) -> str:
    """Template text that prints ``text`` verbatim (``{{`` escaped as an action)."""
    return text.replace("{{", '{{ "{{" }}')


def stop_tokens(fmt: ChatFormat | None, tokenizer) -> list[str]:
    """Strings that end a reply: the EOS token and the special tokens closing an assistant turn."""
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    if fmt is not None:
        specials = sorted(set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab()), key=len, reverse=True)
        tail = fmt.suffix["assistant"]
        stops += [t for t in specials if t and t in tail and t not in stops]
    return stops


def modelfile_text(gguf_file: str, tokenizer, add_bos: bool, adapter: str | None = None,
                   projector: str | None = None) -> tuple[str, list[str]]:
    """``(Modelfile text, notes)`` for ``gguf_file`` (a path relative to the Modelfile); with ``adapter`` (a GGUF
    LoRA adapter beside the Modelfile) ``gguf_file`` is the base model's GGUF, written as given; a vision model's
    ``projector`` file is a second ``FROM``, which Ollama stores as the model's projector."""
    fmt = chat_format(tokenizer)
    lines = ([f"FROM {gguf_file}", f"ADAPTER ./{adapter}", ""] if adapter
             else [f"FROM ./{gguf_file}", *([f"FROM ./{projector}"] if projector else []), ""])
    notes: list[str] = []
    if fmt is None:
        notes.append("no TEMPLATE written: the model's chat template has no verified per-message form "
                     "(or there is none); add a TEMPLATE by hand for chat use")
    else:
        bos = tokenizer.bos_token if add_bos and tokenizer.bos_token else ""
        template = go_template(fmt, drop_head=bos)
        if '"""' in template:
            notes.append('no TEMPLATE written: the chat format contains """, which a Modelfile cannot quote')
        else:
            lines += [f'TEMPLATE """{template}"""', ""]
        notes += fmt.notes
    for stop in stop_tokens(fmt, tokenizer):
        lines.append(f'PARAMETER stop "{_quote(stop)}"')
    header = [f"# {n}" for n in notes]
    return "\n".join(header + ([""] if header else []) + lines).rstrip() + "\n", notes


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def write_modelfile(directory: str | Path, gguf_file: str, tokenizer, add_bos: bool,
                    adapter: str | None = None, projector: str | None = None) -> list[str]:
    """Write ``directory/Modelfile``; return the notes on what was not translated."""
    text, notes = modelfile_text(gguf_file, tokenizer, add_bos, adapter, projector)
    (Path(directory) / "Modelfile").write_text(text, encoding="utf-8")
    return notes
