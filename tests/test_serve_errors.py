"""Internal errors of ``qlora serve`` (bugs, not bad input), seen by the official ``openai`` client.

A stream that fails after its headers went out ends as OpenAI's and vLLM's do: an SSE data line holding an
OpenAI error object (then ``[DONE]``), which the client raises as ``openai.APIError``; the server logs the
exception once with its traceback; the other rows of the batch go on. Oracles: the client's own reading of
the stream, the same request served alone, and the log records.

The fault is in the token pieces that only logprobs entries read (each token's bytes and text): requests asking
for logprobs fail once their reply has started, the others never meet it.
"""

from __future__ import annotations

import logging
import threading

import pytest
import torch

import qlora
from qlora.infer.logprobs import _PIECES, TokenPieces

from test_serve import KEY, _together

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

FAULT = "Internal error: RuntimeError: injected fault"
MAX_TOKENS = 8


class _FaultyPieces(TokenPieces):
    """Token pieces that cannot be read: what a bug in them would raise while a logprobs entry is written."""

    def bytes(self, token: int) -> bytes:
        raise RuntimeError("injected fault")


@pytest.fixture(scope="module")
def faulty(tiny_model_dir):
    from qlora.infer.batcher import ContinuousBatcher
    from qlora.serve.app import build_app
    from qlora.serve.server import BackgroundServer

    model, tokenizer = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    _PIECES[tokenizer] = _FaultyPieces(tokenizer)  # the pieces TokenPieces.of(tokenizer) serves logprobs from
    batcher = ContinuousBatcher(model.eval(), tokenizer, max_batch_size=4,
                                context_length=512).start()
    with BackgroundServer(build_app(batcher, "tiny", [], api_key=KEY)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        yield batcher, client
    batcher.close()


def _stream(client, route: str, prompt: str, **kw) -> list:
    if route == "chat":
        return list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                                   max_tokens=MAX_TOKENS, temperature=0, stream=True, **kw))
    return list(client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                          stream=True, **kw))


def _text(route: str, chunks: list) -> str:
    if route == "chat":
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return "".join(c.choices[0].text for c in chunks if c.choices)


def _qlora_errors(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "qlora" and r.levelno >= logging.ERROR]


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_a_failing_stream_ends_with_an_error_the_client_raises_and_spares_its_batch(faulty, caplog, route):
    batcher, client = faulty
    logprobs = {"logprobs": True} if route == "chat" else {"logprobs": 1}
    alone = _text(route, _stream(client, route, "Hello there"))
    steps = batcher.load()["steps"]
    results: dict[str, object] = {}

    def ask(name: str, prompt: str, **kw) -> None:
        try:
            results[name] = _stream(client, route, prompt, **kw)
        except BaseException as exc:  # read below
            results[name] = exc

    threads = [threading.Thread(target=ask, args=("failing", "Hi"), kwargs=logprobs),
               threading.Thread(target=ask, args=("sound", "Hello there"))]
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="qlora"):
        _together(batcher, threads)
    error = results["failing"]
    assert isinstance(error, openai.APIError) and not isinstance(error, openai.APIConnectionError), error
    assert error.message == FAULT
    assert error.body == {"message": FAULT, "type": "server_error", "param": None, "code": None}
    assert error.type == "server_error"
    # the other request, decoded in the same batch, is whole and as it is alone
    assert _text(route, results["sound"]) == alone
    assert batcher.load()["steps"] > steps and batcher.load()["max_rows_in_step"] >= 2
    (record,) = _qlora_errors(caplog)
    assert record.exc_info is not None and "injected fault" in caplog.text and "Traceback" in caplog.text


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_a_failing_request_without_stream_is_a_500_in_openai_shape(faulty, caplog, route):
    """...logged once, and the connection stays usable: the client's next request on it is answered."""
    _, client = faulty
    with caplog.at_level(logging.ERROR, logger="qlora"), pytest.raises(openai.InternalServerError) as exc:
        # ignore_eos: a reply that a sampled EOS ended at once has no token whose logprobs entry meets the fault
        if route == "chat":
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=MAX_TOKENS, logprobs=True, extra_body={"ignore_eos": True})
        else:
            client.completions.create(model="tiny", prompt="Hi", max_tokens=MAX_TOKENS, logprobs=1,
                                      extra_body={"ignore_eos": True})
    assert exc.value.status_code == 500
    assert exc.value.body == {"message": FAULT, "type": "server_error", "param": None, "code": None}
    (record,) = _qlora_errors(caplog)
    assert record.exc_info is not None and "injected fault" in caplog.text
    # answered whole (ignore_eos: a sampled EOS would end it as "stop", which says nothing of the connection)
    after = client.completions.create(model="tiny", prompt="Hi", max_tokens=2, extra_body={"ignore_eos": True})
    assert after.choices[0].finish_reason == "length" and after.usage.completion_tokens == 2
