"""``qlora serve`` refuses a body field of the wrong JSON type as OpenAI does: a 400 ``invalid_request_error``
naming the field ("Invalid type for 'max_tokens': expected an integer, but got a string instead."), never a
silent coercion (``"5"`` read as 5, ``"yes"`` or ``1`` as true) nor a 500.

Oracles: the official ``openai`` client's parsing of the error (it sends the values as given), raw HTTP for the
status and body, and a well-typed request answering as before.
"""

from __future__ import annotations

import httpx
import pytest
import torch

import qlora

from test_serve import KEY

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    from qlora.infer.batcher import ContinuousBatcher
    from qlora.serve.app import build_app
    from qlora.serve.server import BackgroundServer

    model, tokenizer = qlora.load_model(tiny_model_dir, quant=None, compute_dtype=torch.float32, device="cpu")
    batcher = ContinuousBatcher(model.eval(), tokenizer, max_batch_size=4, context_length=256).start()
    with BackgroundServer(build_app(batcher, "tiny", [], api_key=KEY)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        yield server, client
    batcher.close()


# (route, field, value, what OpenAI expects, what the value is)
WRONG = [
    ("chat", "max_tokens", "5", "an integer", "a string"),
    ("chat", "max_tokens", 5.0, "an integer", "a decimal number"),
    ("chat", "max_tokens", True, "an integer", "a boolean"),
    ("chat", "max_completion_tokens", "3", "an integer", "a string"),
    ("chat", "n", "2", "an integer", "a string"),
    ("chat", "seed", "7", "an integer", "a string"),
    ("chat", "top_logprobs", "2", "an integer", "a string"),
    ("chat", "temperature", "0.5", "a number", "a string"),
    ("chat", "top_p", True, "a number", "a boolean"),
    ("chat", "stream", "true", "a boolean", "a string"),
    ("chat", "logprobs", 1, "a boolean", "an integer"),
    ("chat", "top_k", "3", "an integer", "a string"),
    ("chat", "stop", 5, "a string or an array", "an integer"),
    ("completions", "max_tokens", "5", "an integer", "a string"),
    ("completions", "logprobs", "1", "an integer", "a string"),
    ("completions", "echo", "yes", "a boolean", "a string"),
    ("responses", "max_output_tokens", "4", "an integer", "a string"),
    ("responses", "temperature", "0.1", "a number", "a string"),
    ("responses", "store", "false", "a boolean", "a string"),
]


def _create(client, route: str, **kw):
    if route == "chat":
        base = {"model": "tiny", "messages": HELLO, "max_tokens": 2}
        if kw.get("top_logprobs") is not None:
            base["logprobs"] = True
        return client.chat.completions.create(**{**base, **kw})
    if route == "completions":
        return client.completions.create(**{"model": "tiny", "prompt": "Hello", "max_tokens": 2, **kw})
    return client.responses.create(**{"model": "tiny", "input": "Hello", "max_output_tokens": 2, **kw})


@pytest.mark.parametrize("route, field, value, expected, got", WRONG,
                         ids=[f"{r}-{f}-{v!r}" for r, f, v, _, _ in WRONG])
def test_a_value_of_the_wrong_type_is_a_400_naming_the_field(served, route, field, value, expected, got):
    server, client = served
    kw = {"extra_body": {field: value}} if field == "top_k" else {field: value}  # vLLM's: not the client's own
    with pytest.raises(openai.BadRequestError) as exc:
        _create(client, route, **kw)
    assert exc.value.status_code == 400 and exc.value.param == field
    assert exc.value.body == {"message": f"Invalid type for '{field}': expected {expected}, but got {got} instead.",
                              "type": "invalid_request_error", "param": field, "code": None}


def test_raw_http_and_nested_fields(served):
    server, _ = served
    headers = {"Authorization": f"Bearer {KEY}"}
    for body, param in (({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
                        ({"logit_bias": {"5": "1"}}, "logit_bias.5"), ({"model": 5}, "model")):
        response = httpx.post(server.url + "/v1/chat/completions", headers=headers,
                              json={"model": "tiny", "messages": HELLO, "max_tokens": 2, **body})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param
        assert error["message"].startswith(f"Invalid type for '{param}'")


def test_well_typed_values_are_still_served(served):
    """An integer is a number (``temperature: 0``, ``top_p: 1``), and ``null`` is the default, as in OpenAI."""
    _, client = served
    reply = _create(client, "chat", temperature=0, top_p=1, seed=3, n=2, max_tokens=3, stop=None)
    assert len(reply.choices) == 2 and reply.usage.completion_tokens > 0
    assert _create(client, "completions", logprobs=1, echo=False).choices[0].logprobs is not None
