"""vLLM's ``/tokenize`` and ``/detokenize``, ``/version`` and ``HEAD /health`` of ``qlora serve``, over raw HTTP.

Oracles: the tokenizer itself (``__call__``, ``apply_chat_template(tokenize=True)``, ``decode``,
``convert_ids_to_tokens``), the chat route's own ``usage.prompt_tokens`` for the same messages, and vLLM's
response shapes (``count``, ``max_model_len``, ``tokens``, ``token_strs``; ``prompt``).
"""

from __future__ import annotations

import httpx
import pytest

import qlora

from test_serve import KEY
from test_serve_vllm_extras import _serve

pytest.importorskip("fastapi")

AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is two plus two?"}]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from chat_families import model_for

    batcher, server, tokenizer, _ = _serve(model_for("qwen2.5", tmp_path_factory.mktemp("qwen")))
    with server:
        yield server.url, tokenizer
    batcher.close()


def _post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, headers=AUTH, timeout=60)


def test_a_prompt_tokenizes_as_the_tokenizer_does(qwen):
    url, tokenizer = qwen
    reply = _post(url, "/tokenize", {"model": "tiny", "prompt": "Hello there", "return_token_strs": True}).json()
    ids = tokenizer("Hello there").input_ids
    assert reply == {"count": len(ids), "max_model_len": 256, "tokens": ids,
                     "token_strs": tokenizer.convert_ids_to_tokens(ids)}
    assert _post(url, "/tokenize", {"prompt": "Hello there", "add_special_tokens": False}).json()["tokens"] == \
        tokenizer("Hello there", add_special_tokens=False).input_ids


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_messages_tokenize_as_the_chat_route_renders_them(qwen, generation_prompt):
    url, tokenizer = qwen
    reply = _post(url, "/tokenize", {"messages": CHAT, "add_generation_prompt": generation_prompt}).json()
    assert reply["tokens"] == tokenizer.apply_chat_template(CHAT, add_generation_prompt=generation_prompt,
                                                            tokenize=True, return_dict=True)["input_ids"]
    assert reply["token_strs"] is None
    if generation_prompt:
        chat = _post(url, "/v1/chat/completions", {"model": "tiny", "messages": CHAT, "max_tokens": 1}).json()
        assert reply["count"] == chat["usage"]["prompt_tokens"]


def test_a_chat_longer_than_the_context_is_counted_not_refused(qwen):
    """vLLM's /tokenize checks no context length (what a client asks it to learn whether a chat fits): a chat longer
    than --context-length was the chat route's 400 'context_length_exceeded', with no count."""
    url, tokenizer = qwen
    chat = [{"role": "user", "content": "two plus two " * 200}]
    reply = _post(url, "/tokenize", {"messages": chat})
    assert reply.status_code == 200, reply.text
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert reply.json()["tokens"] == ids and reply.json()["count"] > reply.json()["max_model_len"]
    assert _post(url, "/tokenize", {"prompt": "two plus two " * 200}).json()["count"] > 256


def test_detokenize_gives_the_text_back(qwen):
    url, tokenizer = qwen
    ids = _post(url, "/tokenize", {"messages": CHAT}).json()["tokens"]
    assert _post(url, "/detokenize", {"model": "tiny", "tokens": ids}).json() == {"prompt": tokenizer.decode(ids)}


@pytest.mark.parametrize("path, body, status, param", [
    ("/tokenize", {"model": "tiny"}, 400, "prompt"),
    ("/tokenize", {"prompt": "Hi", "messages": CHAT}, 400, "prompt"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"model": "other", "prompt": "Hi"}, 404, "model"),
    ("/tokenize", {"prompt": "Hi", "temprature": 1}, 400, "temprature"),
    ("/tokenize", {"messages": [{"role": "user"}]}, 400, "messages.0.content"),
    ("/detokenize", {"tokens": [0, 10 ** 9]}, 400, "tokens.1"),
    ("/detokenize", {"tokens": "1 2"}, 400, "tokens"),
])
def test_bad_requests_are_openai_shaped_errors_naming_the_field(qwen, path, body, status, param):
    url, _ = qwen
    reply = _post(url, path, body)
    assert reply.status_code == status
    assert reply.json()["error"]["param"] == param


def test_the_version_and_a_health_check_by_head(qwen):
    url, _ = qwen
    assert httpx.get(url + "/version", headers=AUTH).json() == {"version": qlora.__version__}
    assert httpx.head(url + "/health").status_code == 200  # no key needed, as GET
    assert httpx.get(url + "/version").status_code == 401
