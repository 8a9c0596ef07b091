"""Is the Hugging Face hub reachable? Asked once per process, answered in seconds.

A model or dataset name that is not a local path is fetched from the hub by
huggingface_hub / ``datasets``. On a machine without the hub they retry each
request with backoff, so a typo or an offline laptop costs about 40 s before
any error. qlora asks first, with one short request to the hub's endpoint
(``HF_ENDPOINT``, proxies from the environment honored), and says plainly what
to do when the answer is no.

With ``HF_HUB_OFFLINE=1`` (the libraries' own switch) nothing is probed: the
libraries then read only their local cache, which fails fast by itself. Without
a hub, models already in the cache still load (``local_files_only``).
"""

from __future__ import annotations

import functools
import os
import re
import threading
import urllib.error
import urllib.request

from .errors import UsageError

PROBE_TIMEOUT_S = 2.0
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def hub_endpoint() -> str:
    """The hub's base URL (``HF_ENDPOINT`` for mirrors, else huggingface.co)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def offline_mode() -> bool:
    """Whether the user switched the Hugging Face libraries to their local cache only."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in _OFFLINE_VARIABLES)


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the hub answers an HTTP request within ``timeout`` seconds (asked once per endpoint).

    Any HTTP answer below 500 counts (the hub is there); no answer, a DNS
    failure, a TLS failure or a gateway error does not. The request runs in a
    daemon thread, so a resolver that hangs cannot hold the caller past ``timeout``.
    """
    return _probe(hub_endpoint(), timeout)


@functools.lru_cache(maxsize=None)
def _probe(endpoint: str, timeout: float) -> bool:
    answer: list[bool] = []

    def ask() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint + "/", method="HEAD"), timeout=timeout).close()
            answer.append(True)
        except urllib.error.HTTPError as exc:
            answer.append(exc.code < 500)
        except Exception:  # URLError, socket and TLS errors: no usable hub
            answer.append(False)

    thread = threading.Thread(target=ask, name="qlora-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


def cached_revision(repo_id: str) -> str | None:
    """The commit the local Hugging Face cache records as model ``repo_id``'s main revision (its ``refs/main``, what
    a download last resolved and an offline load reads), None when the cache holds no such model."""
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo_id):
        return None
    from huggingface_hub import constants  # read at call time: the cache may be set by HF_HUB_CACHE or HF_HOME

    ref = os.path.join(constants.HF_HUB_CACHE, f"models--{repo_id.replace('/', '--')}", "refs", "main")
    try:
        with open(ref) as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def cache_only() -> bool:
    """Whether names must come from the local cache: offline mode, or no hub within the probe's timeout."""
    return offline_mode() or not hub_reachable()


def unreachable_error(name: str, what: str, hint: str, cache_checked: bool = False, near: str = "") -> UsageError:
    """The error for a ``what`` (model, dataset) named ``name`` that is neither local, cached nor downloadable.

    Args:
        name: the name the user gave, after the option that gave it where there is one (``--model org/x``).
        what: ``"model"`` or ``"dataset"``.
        hint: what to pass instead, e.g. ``"a local model folder"``.
        cache_checked: the local Hugging Face cache was already looked in.
        near: a last sentence on what is there locally, for a mistyped path that reads as a hub id.
    """
    if offline_mode():
        return UsageError(
            f"{name} is not a local path and not in the Hugging Face cache, and offline mode is on "
            f"(HF_HUB_OFFLINE), so the {what} cannot be downloaded. Check the spelling of the path, pass {hint}, "
            f"or unset HF_HUB_OFFLINE where the hub is reachable.{near}"
        )
    cache = (" and it is not in the local Hugging Face cache" if cache_checked
             else f"; a {what} downloaded before is read from the cache with HF_HUB_OFFLINE=1")
    return UsageError(
        f"{name} is not a local path, and the Hugging Face hub ({hub_endpoint()}) is not reachable from this "
        f"machine (no answer within {PROBE_TIMEOUT_S:.0f} s), so the {what} cannot be downloaded{cache}. "
        f"Check the spelling of the path, or pass {hint}.{near}"
    )
