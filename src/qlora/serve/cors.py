"""Cross-origin requests (CORS): the web pages whose scripts may call ``qlora serve``.

A browser lets a page's script call a server of another origin (a web UI on ``http://localhost:3000`` calling
``http://127.0.0.1:8000``) only when the server says that origin may: in its answer to the preflight ``OPTIONS``
the browser sends first, then in ``Access-Control-Allow-Origin`` on each reply. vLLM's options are taken as they are
(``--allowed-origins``, ``--allowed-methods``, ``--allowed-headers``, ``--allow-credentials``), but no origin is
allowed unless named, where vLLM allows every one: a server on this machine is reachable from every page its
browser opens, so allowing all would let any website use the model, read its answers and, with
``--allow-adapter-updates``, have it read folders. Clients that send no ``Origin`` (SDKs, curl, other servers)
are not concerned.
"""

from __future__ import annotations

import json
import re
from typing import Sequence

from ..errors import UsageError

_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s?#]+", re.IGNORECASE)
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP method or header name
_DEFAULT_PORTS = {"http": ":80", "https": ":443"}  # a browser's Origin leaves them out
_NORMALIZED_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "POST", "PUT")  # a browser sends these upper-case


def _items(text: str, option: str) -> list[str]:
    """``text`` as a list of strings: vLLM's JSON list (``'["*"]'``) or comma-separated values."""
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{option} {text!r} is not a JSON list ({exc.msg}); write "
                             f"{option} 'a,b' or {option} '[\"a\", \"b\"]'") from None
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise UsageError(f"{option} {text!r} must be a JSON list of strings")
    else:
        items = text.split(",")
    items = [i.strip() for i in items]
    if not all(items):
        raise UsageError(f"{option} {text!r} has an empty entry; list the values separated by commas")
    return items


def origins(text: str | None) -> tuple[str, ...]:
    """``--allowed-origins``: ``*`` or origins written as browsers send them, ``scheme://host[:port]``; none
    when not given.

    Raises:
        UsageError: an entry with a path or a trailing slash (a browser's ``Origin`` never has one, so it would
            never match), or without a scheme.
    """
    if text is None:
        return ()
    items = _items(text, "--allowed-origins")
    for item in items:
        if item != "*" and not _ORIGIN.fullmatch(item):
            shown = item.rstrip("/") if _ORIGIN.fullmatch(item.rstrip("/")) else "http://localhost:3000"
            raise UsageError(f"--allowed-origins: {item!r} is not an origin; write it as a browser sends it, "
                             f"scheme://host[:port] without a path or trailing slash (e.g. {shown}), or * for any")
    return tuple(_as_sent(item) for item in items)


def _as_sent(origin: str) -> str:
    """``origin`` as a browser writes it in ``Origin`` (compared as it is): scheme and host in lower case, without
    the scheme's default port (``HTTP://LocalHost:80`` is sent as ``http://localhost``)."""
    if origin == "*":
        return origin
    origin = origin.lower()
    port = _DEFAULT_PORTS.get(origin.partition(":")[0])
    return origin[:-len(port)] if port and origin.endswith(port) else origin


def tokens(text: str, option: str) -> tuple[str, ...]:
    """``option``'s value (``--allowed-methods``, ``--allowed-headers``): ``*`` or HTTP methods or header names.

    Raises:
        UsageError: an entry that is no HTTP token.
    """
    items = _items(text, option)
    for item in items:
        if item != "*" and not _TOKEN.fullmatch(item):
            raise UsageError(f"{option}: {item!r} is not an HTTP method or header name")
    return tuple(items)


def methods(text: str) -> tuple[str, ...]:
    """``--allowed-methods``: as :func:`tokens`, with the methods a browser upper-cases (``post``, sent as
    ``POST``) upper-cased, as the preflight compares them exactly.

    Raises:
        UsageError: an entry that is no HTTP method.
    """
    return tuple(m.upper() if m.upper() in _NORMALIZED_METHODS else m for m in tokens(text, "--allowed-methods"))


def allow(app, allowed_origins: Sequence[str], methods: Sequence[str] = ("*",), headers: Sequence[str] = ("*",),
          credentials: bool = False) -> None:
    """Answer cross-origin requests from ``allowed_origins`` (none: the browser's same-origin rule holds) with
    ``methods`` and ``headers``; added last, so it wraps every other layer: a preflight is answered before the API
    key is asked for (browsers send none with it), and errors carry the headers too, for the page to read them.
    ``*`` with ``credentials`` names each page's origin back (with ``Vary: Origin``): browsers refuse a credentialed
    reply allowed to ``*``, which Starlette 0.36 (fastapi 0.110's) gave a request without a cookie."""
    if not allowed_origins:
        return
    from starlette.middleware.cors import CORSMiddleware

    every = "*" in allowed_origins and credentials  # each page's origin named back: browsers refuse * with them
    app.add_middleware(CORSMiddleware, allow_origins=[] if every else list(allowed_origins),
                       allow_origin_regex=".*" if every else None, allow_methods=list(methods),
                       allow_headers=list(headers), allow_credentials=credentials)
