"""A chat template the user brings: a Jinja file, a tokenizer folder, or Jinja text.

TRL's ``chat_template_path`` (a ``.jinja`` file or a tokenizer folder), the alignment-handbook's inline
``chat_template``, axolotl's ``chat_template_jinja`` (text or a file) and ``qlora train --template FILE.jinja``
all name a template that is not one of qlora's names. It is trained with exactly as the model's own would be
(the same rendering, the same assistant mask) and saved with the adapter like any format. A ``template``
value holding ``{{`` or ``{%`` is the template's text; any other value that is not a template name is a path.
Kept free of heavy imports: the config check reads files before the model loads.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from qlora.errors import UsageError
from qlora.template_names import TEMPLATE_NAMES, template_name

INLINE_ORIGIN = "the chat template given inline"


def is_inline(value: str) -> bool:
    """Whether a ``template`` value is Jinja text rather than a name or a path."""
    return "{{" in value or "{%" in value


def is_custom(value: str) -> bool:
    """Whether a ``template`` value is the user's own template (text or a path), not one of qlora's names."""
    if is_inline(value):
        return True
    try:
        template_name(value, TEMPLATE_NAMES)
        return False
    except ValueError:
        return _looks_like_path(value)


def _looks_like_path(value: str) -> bool:
    return "/" in value or "\\" in value or value.endswith((".jinja", ".j2")) or Path(value).expanduser().exists()


def own_value(value: str) -> str:
    """A value that other tools read as a template's text or a path, never as a name (``chatml`` there is a file)."""
    return value if is_custom(value) else f"./{value}"


def read_template(value: str, option: str = "--template") -> tuple[str, str]:
    """The Jinja text of a user's ``template`` value and where it came from (for errors naming file and line).

    A file is read as the template; a folder is a tokenizer's, whose ``chat_template.jinja`` (or the
    ``chat_template`` of its ``tokenizer_config.json``) is taken, as TRL's ``chat_template_path`` takes it.

    Raises:
        UsageError: a missing path, a folder without a chat template, a file that is not UTF-8 text or
            never uses ``messages`` (not a chat template).
    """
    if is_inline(value):
        return value, INLINE_ORIGIN
    path = Path(value).expanduser()
    if path.is_dir():
        text, origin = _folder_template(path, option)
    elif path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"{option} {value}: not a Jinja chat template (not UTF-8 text: {exc.reason} at byte "
                             f"{exc.start}); give a .jinja file such as a model's chat_template.jinja.") from None
        origin = str(path)
    else:
        raise UsageError(f"{option} {value}: no such file or folder, and not a template name; give a Jinja chat "
                         "template file (.jinja), a tokenizer folder, or one of "
                         f"{', '.join(n for n in TEMPLATE_NAMES if n != 'none')}.")
    if "messages" not in text:
        raise UsageError(f"{option} {value}: not a Jinja chat template: it never uses `messages`, the conversation a "
                         "chat template renders; give a .jinja file such as a model's chat_template.jinja.")
    return text, origin


def _folder_template(folder: Path, option: str) -> tuple[str, str]:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8"), str(jinja)
    config = folder / "tokenizer_config.json"
    try:
        own = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, UnicodeDecodeError, ValueError):
        own = None
    if isinstance(own, list):  # several named templates: the default one, as transformers picks it
        own = next((t.get("template") for t in own if isinstance(t, dict) and t.get("name") == "default"), None)
    if not isinstance(own, str) or not own:
        raise UsageError(f"{option} {folder}: this folder has no chat template (no chat_template.jinja, no "
                         "chat_template in tokenizer_config.json); give a tokenizer folder that has one, or a .jinja "
                         "file.")
    return own, f"chat_template in {config}"


def template_digest(value: str) -> str:
    """A digest of a template file's text, so a resumed run notices the file changed under the same path."""
    text, _ = read_template(value)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
