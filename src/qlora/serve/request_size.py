"""How large a request ``qlora serve`` takes: its body's bytes, and a prompt text's tokens past the context.

Setting a request up runs on one thread (rendering, tokenizing; see :func:`qlora.serve.app.build_app`), so one huge
request held every other's set-up behind it: a 50 MB prompt took minutes to tokenize only to be refused for the
context. A body over ``--max-request-bytes`` is answered 413 before it is read whole (its ``Content-Length``, or the
bytes of a chunked one as they come), and a prompt text whose first part alone already has more tokens than the
context is refused as one over the context (400 ``context_length_exceeded``, as vLLM and OpenAI answer it) without
tokenizing the rest.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from .protocol import APIError

# room for OpenAI's 50 MB of image bytes a request, base64-encoded (4/3 as large), with the text around them
DEFAULT_MAX_REQUEST_BYTES = 100 << 20
HEAD_CHARS_PER_TOKEN = 32  # a prompt's first context x this many characters are counted before all of it
_CUT_TOKENS = 8  # the tokens a cut through a word may add to the head's count over the whole text's


def too_large(limit: int, size: int | None = None) -> APIError:
    """The 413 of a body over ``limit`` bytes (``size``: its Content-Length, when it gave one)."""
    said = f"is {size} bytes" if size is not None else "goes on"
    return APIError(413, f"The request body {said}, over qlora serve's limit of {limit} bytes (--max-request-bytes); "
                         "send a smaller request, or start qlora serve with a larger --max-request-bytes (0: no "
                         "limit).", code="request_too_large")


class LimitBody:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 in OpenAI's error shape, before the
    route reads it (a chunked body is read here up to the limit, then handed on whole)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self.limit:
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.limit:
                await _answer(too_large(self.limit, int(length)), scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        chunks, size = [], 0
        while True:  # no Content-Length: chunked, counted as it comes
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await _answer(too_large(self.limit), scope, receive, send)
                return
            if not message.get("more_body"):
                break
        whole = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay():
            nonlocal whole
            if whole is None:
                return await receive()  # after the body: a disconnect, which a stream waits for
            message, whole = whole, None
            return message

        await self.app(scope, replay, send)


async def _answer(error: APIError, scope, receive, send) -> None:
    await JSONResponse(error.body(), error.status, headers={"Connection": "close"})(scope, receive, send)


def refuse_overlong_text(tokenizer, text: str, context_length: int, param: str) -> None:
    """Refuse ``text`` (the prompt ``param`` gave) when its first ``context_length * HEAD_CHARS_PER_TOKEN``
    characters alone have more tokens than the context holds: all of it has at least as many, less the few a cut
    through a word may add, so the rest need not be tokenized to know it does not fit. Shorter texts, and ones of
    fewer tokens there, are left to the count of all their tokens.

    Raises:
        APIError: 400 ``context_length_exceeded``, as the whole prompt's count would give.
    """
    head = context_length * HEAD_CHARS_PER_TOKEN
    if len(text) <= head:
        return
    counted = len(tokenizer(text[:head], add_special_tokens=False).input_ids) - _CUT_TOKENS
    if counted >= context_length:
        raise APIError(400, f"This model's maximum context length is {context_length} tokens (prompt and reply). "
                            f"However, the {param} came to more than {counted} tokens (counted in the first {head} "
                            f"of {len(text)} characters), which leaves no room for a reply. Shorten the {param}.",
                       param, "context_length_exceeded")
