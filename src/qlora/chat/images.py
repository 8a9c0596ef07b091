"""Images in conversations: where users write them, and reading them.

A row's images come in the shapes users have:

- message parts, OpenAI / Hugging Face style: ``{"type": "image", "image": SRC}``, ``{"type": "image",
  "path" | "url": SRC}``, ``{"type": "image_url", "image_url": {"url": SRC}}`` (or the URL as a string);
- a bare ``{"type": "image"}`` part whose image is the next one of the row's ``images`` column (TRL's vision
  datasets, e.g. HuggingFaceH4/llava-instruct-mix-vsft);
- LLaMA-Factory's ``<image>`` placeholders in a text, filled in order from the row's ``images`` column
  (ShareGPT and alpaca rows; a text with images but no placeholder gets them before its text, as
  LLaMA-Factory's plugins put them).

SRC is a local file (a path relative to the data file's folder, then to the ``--data`` folder the file was found
in, then to ``--media-dir``, by default ``--dataset-dir``, or absolute), a ``data:`` URI, or what ``datasets`` stores for an ``Image`` column
(``{"bytes", "path"}``, a PIL image).
Nothing is downloaded. Every image is checked when the data are read (a missing or unreadable file fails
before the model loads) and decoded again when the row is tokenized, so decoded images are never all held.

A message holding images gets a content of parts, ``{"type": "image"}`` where each image was and
``{"type": "text", "text": ...}`` around them, which is what chat templates of vision-language models render
as their image placeholders.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

from qlora.errors import UsageError
from qlora.model.image_pixels import PixelBounds, bounded

IMAGE_PART_TYPES = ("image", "image_url")
PLACEHOLDER = "<image>"  # LLaMA-Factory's
IMAGES_COLUMN = "images"
IMAGE_COLUMN = "image"  # a single image a row
MEDIA_COLUMNS = ("videos", "audios")  # LLaMA-Factory's other media columns, which qlora does not read
VIDEO_COLUMN = "video"  # a single video a row (LLaVA-Video-178K's rows)
_SOURCE_KEYS = ("image", "path", "url")


@dataclass(frozen=True)
class ImageRef:
    """One image of a row: a resolved file path, a ``data:`` URI, or raw bytes; ``shown`` is how the data
    wrote it (for messages), ``where`` the row (file and line)."""

    source: str | bytes
    shown: str
    where: str

    def load(self, bounds: PixelBounds = PixelBounds()):
        """The image as an RGB ``PIL.Image``, scaled into ``bounds`` first (:mod:`qlora.model.image_pixels`).

        Raises:
            UsageError: the file is missing or is not an image PIL can read (naming the row and the image).
        """
        try:
            from PIL import Image, UnidentifiedImageError
        except ImportError:
            raise UsageError(f"{self.where}: rows with images need Pillow: pip install pillow.") from None
        try:
            if isinstance(self.source, bytes):
                stream = io.BytesIO(self.source)
            elif self.source.startswith("data:"):
                stream = io.BytesIO(_data_uri_bytes(self.source, self.where, self.shown))
            else:
                stream = self.source
            with Image.open(stream) as image:
                return bounded(image, bounds).convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            reason = "file not found" if isinstance(exc, FileNotFoundError) else f"{type(exc).__name__}: {exc}"
            raise UsageError(f"{self.where}: image {self.shown!r} cannot be read ({reason}). Give a PNG, JPEG or other "
                             "image file Pillow reads, as a path relative to the data file's folder (or "
                             "--dataset-dir), an absolute path or a data: URI; or remove the row.") from None

    def data_uri(self) -> str:
        """The image as a base64 ``data:`` URI of its bytes as given (what outlasts a file moved or deleted later),
        its MIME type the one Pillow names for them.

        Raises:
            UsageError: the file cannot be read any more, or Pillow does not read it.
        """
        if isinstance(self.source, str) and self.source.startswith("data:"):
            return self.source
        try:
            data = self.source if isinstance(self.source, bytes) else Path(self.source).read_bytes()
        except OSError as exc:
            raise UsageError(f"{self.where}: image {self.shown!r} cannot be read ({exc.strerror}).") from None
        checked_image(ImageRef(data, self.shown, self.where))
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            mime = image.get_format_mimetype() or "application/octet-stream"
        return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def attach_images(example, fields: dict[str, Any], folders: Sequence[str | Path]):
    """``example`` (a :class:`~qlora.chat.example.Example`) with its images: message parts and
    ``<image>`` placeholders filled from the row's ``images`` column, each image resolved and checked.

    Args:
        example: the normalized row, its image parts still as written.
        fields: the row's fields (for the ``images`` column, or a single ``image``).
        folders: where relative paths are looked for, in order (the data file's folder, ``--media-dir``).

    Raises:
        UsageError: an image part without an image and no ``images`` left for it, more or fewer ``<image>``
            placeholders than images, images in an assistant turn, a URL, a missing or unreadable image.
    """
    name = IMAGES_COLUMN if fields.get(IMAGES_COLUMN) is not None else IMAGE_COLUMN
    column = fields.get(name)  # "image": one image a row, as many vision datasets store it (an Image column)
    column = [] if column is None else column if isinstance(column, list) else [column]
    has_parts = example.messages is not None and any(_image_parts(m.get("content")) for m in example.messages)
    if not column and not has_parts:
        return example
    where = example.where
    if example.messages is None:
        raise UsageError(f'{where}: an "{name}" column beside a plain text (a text row has no user turn to show an '
                         "image in); images go with conversations (messages, conversations, or alpaca instruction/"
                         "output rows). For image-to-text rows (a caption, an OCR transcript), add a column holding "
                         "the request (such as \"Write the LaTeX for this image.\") and map --data-fields "
                         "instruction=THAT_COLUMN,output=TEXT_COLUMN.")
    pending: Iterator[Any] = iter(enumerate(column))
    refs: list[ImageRef] = []
    messages = []
    placeholders = not has_parts and column
    for i, message in enumerate(example.messages):
        content = message.get("content")
        if placeholders and isinstance(content, str) and PLACEHOLDER in content:
            content = split_placeholders(content)
        if not _image_parts(content):
            messages.append(message)
            continue
        if message.get("role") != "user" and message.get("role") != "system":
            raise UsageError(f"{where}, message {i}: images in this {message.get('role')} message; qlora trains the "
                             "model to write text about images given in user turns. Move the image to the user turn.")
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES:
                source = _part_source(part)
                if source is None:
                    k, source = next(pending, (None, None))
                    if k is None:
                        raise UsageError(f'{where}, message {i}: more images in the messages than in the '
                                         f'"{IMAGES_COLUMN}" column ({len(column)}); give each image part its image '
                                         '({"type": "image", "image": "path"}) or list them all in the column.')
                refs.append(resolve_image(source, where, folders))
                parts.append({"type": "image"})
            else:
                parts.append(part)
        messages.append({**message, "content": parts})
    left = sum(1 for _ in pending)
    if left and placeholders and not refs:  # LLaMA-Factory: images without placeholders go before the user text
        first = next((k for k, m in enumerate(messages) if m.get("role") == "user"), None)
        if first is None:
            raise UsageError(f'{where}: the "{IMAGES_COLUMN}" column has {len(column)} images but the conversation has '
                             "no user turn to put them in (images go with user turns); add the user turn that shows "
                             f"them, with a {PLACEHOLDER} placeholder per image.")
        text = messages[first]["content"]
        start = len(refs)
        refs += [resolve_image(source, where, folders) for source in column[start:]]
        parts = [{"type": "image"} for _ in column[start:]]
        messages[first] = {**messages[first], "content": parts + (text if isinstance(text, list)
                                                                    else [{"type": "text", "text": text}])}
    elif left:
        raise UsageError(f'{where}: the "{IMAGES_COLUMN}" column has {len(column)} images but the messages place '
                         f"{len(column) - left}; give one image part or {PLACEHOLDER} placeholder per image.")
    return replace(example, messages=tuple(messages), images=tuple(refs))


def refuse_media(fields: dict[str, Any], where: str) -> None:
    """Stop at a row holding videos or audios (LLaMA-Factory's ``videos`` and ``audios`` columns, a ``video``
    column): trained without them, its answer would be about media the model never saw, its ``<video>``
    placeholders plain text. A single ``audio`` column is left alone: speech datasets' transcripts are text to
    train on.

    Raises:
        UsageError: naming the row and the column.
    """
    for name in (*MEDIA_COLUMNS, VIDEO_COLUMN):
        if fields.get(name) not in (None, [], ""):
            raise UsageError(f'{where}: a "{name}" column; qlora trains on text and images, not video or audio, and '
                             f'would train this row without them. Remove the row or its "{name}" (a video\'s frames '
                             "can be given as images).")


def images_in(fields: dict[str, Any]) -> str | None:
    """Where a preference or KTO row holds images, in words (``'an "images" column'``, ``'image parts in
    "prompt"'``), or None: an ``images`` or ``image`` column (TRL's vision preference data,
    openbmb/RLAIF-V-Dataset) or image parts in one of its message lists."""
    found = next((f'an "{c}" column' for c in (IMAGES_COLUMN, IMAGE_COLUMN) if fields.get(c) not in (None, [], "")), None)
    return found or next((f'image parts in "{key}"' for key, value in fields.items() if isinstance(value, list)
                          and any(isinstance(m, dict) and any(_image_parts(v) for v in m.values()) for m in value)),
                         None)


def has_image_parts(messages: Sequence[dict[str, Any]]) -> bool:
    """Whether any of ``messages`` holds an image part."""
    return any(_image_parts(m.get("content")) for m in messages)


def as_parts(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages with every text content as a list of one text part: vision-language chat templates (SmolVLM,
    LLaVA) read each content as parts, as TRL gives them."""
    out = []
    for m in messages:
        content = m.get("content")
        out.append({**m, "content": [{"type": "text", "text": content}]} if isinstance(content, str) else m)
    return out


def _image_parts(content: Any) -> bool:
    return isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES
                                             for p in content)


def split_placeholders(text: str) -> list[dict[str, Any]]:
    """``text`` as content parts: ``{"type": "image"}`` at each ``<image>``, text parts around them."""
    parts: list[dict[str, Any]] = []
    for k, piece in enumerate(text.split(PLACEHOLDER)):
        if k:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _part_source(part: dict[str, Any]) -> Any:
    if part.get("type") == "image_url":
        value = part.get("image_url")
        return value.get("url") if isinstance(value, dict) else value
    return next((part[k] for k in _SOURCE_KEYS if part.get(k) is not None), None)


def resolve_image(source: Any, where: str, folders: Sequence[str | Path] = ()) -> ImageRef:
    """An :class:`ImageRef` for what the data (or a command's ``--image``) wrote, its file found and its header
    checked; a relative path is looked for in ``folders``, in order (none: the working directory).

    Raises:
        UsageError: a URL, a missing file, or one Pillow does not recognize as an image.
    """
    if type(source).__module__.startswith("PIL."):
        buffer = io.BytesIO()
        source.save(buffer, format="PNG")
        return ImageRef(buffer.getvalue(), "<PIL image>", where)
    if isinstance(source, dict):  # a datasets Image cell: {"bytes": ..., "path": ...}
        if source.get("bytes"):
            return checked_image(ImageRef(bytes(source["bytes"]), str(source.get("path") or "<image bytes>"), where))
        source = source.get("path")
    if not isinstance(source, str) or not source.strip():
        raise UsageError(f"{where}: an image must be a path, a data: URI or an image column's bytes, got "
                         f"{type(source).__name__}.")
    if source.startswith("data:"):
        _data_uri_bytes(source, where, source[:40] + "...")
        return checked_image(ImageRef(source, source[:40] + "...", where))
    if source.startswith(("http://", "https://")):
        raise UsageError(f"{where}: image {source!r} is a URL; qlora reads local files only. Download the images "
                         "and give their paths (relative to the data file's folder or --media-dir).")
    path = Path(source.removeprefix("file://")).expanduser()
    candidates = [] if path.is_absolute() else [Path(folder) / path for folder in folders]
    found = next((c for c in candidates if c.is_file()), path)
    if not found.is_file():
        looked = ", ".join(str(f) for f in folders)
        hint = ("Give paths relative to the data file's folder (or the --data folder, or --media-dir, by default "
                "--dataset-dir), or absolute ones." if folders else
                "Give an existing image file (relative to the working directory, or absolute) or a data: URI.")
        raise UsageError(f"{where}: image {source!r} not found" + (f" (looked in {looked})" if looked and not
                         path.is_absolute() else "") + f". {hint}")
    return checked_image(ImageRef(str(found), source, where))


def checked_image(ref: ImageRef, advice: str = "Replace the file or remove the row.") -> ImageRef:
    """``ref`` once Pillow recognizes it as an image (its header only: decoding waits for tokenization).

    Raises:
        UsageError: Pillow is missing, or does not read it (naming ``ref.where`` and the image, then ``advice``).
    """
    try:
        from PIL import Image
    except ImportError:
        raise UsageError(f"{ref.where}: rows with images need Pillow: pip install pillow.") from None
    source = ref.source
    stream = io.BytesIO(source) if isinstance(source, bytes) else io.BytesIO(
        _data_uri_bytes(source, ref.where, ref.shown)) if source.startswith("data:") else source
    try:
        with Image.open(stream) as image:
            image.verify()
    except Exception as exc:  # PIL raises many types for a damaged file
        raise UsageError(f"{ref.where}: image {ref.shown!r} is not an image Pillow can read ({type(exc).__name__}: "
                         f"{exc}). {advice}") from None
    return ref


def _data_uri_bytes(uri: str, where: str, shown: str) -> bytes:
    header, _, data = uri.partition(",")
    if not header.endswith(";base64"):
        raise UsageError(f"{where}: image {shown!r}: only base64 data: URIs (data:image/png;base64,...) are read.")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f"{where}: image {shown!r}: the data: URI is not valid base64.") from None
