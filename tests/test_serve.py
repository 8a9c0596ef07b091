"""``qlora serve`` driven by the official ``openai`` client against a real uvicorn server.

Oracles: ``qlora generate`` (greedy output for the same prompt and adapter), the
same request served alone (for concurrent and batched requests), and the
OpenAI client's own parsing of responses, streams and errors.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

import qlora
from qlora.cli.main import main
from qlora.infer.messages import Message
from qlora.infer.template import render_chat

from random_adapters import save_random_adapter

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

KEY = "sk-test-key"
HELLO = [{"role": "user", "content": "Hello"}]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir):
    """Two saved adapters with large random deltas, so their answers differ from the base and each other."""
    root = tmp_path_factory.mktemp("serve-adapters")
    for name, seed in (("a", 1), ("b", 2)):
        save_random_adapter(tiny_model_dir, root / name, seed)
    return root


@pytest.fixture(scope="module")
def served(tiny_model_dir, adapters):
    """The server as ``qlora serve`` builds it (NF4 base, fp32 compute), on 127.0.0.1, any free port."""
    from qlora.infer.batcher import ContinuousBatcher
    from qlora.serve.app import build_app
    from qlora.serve.server import BackgroundServer

    model, tokenizer = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    for name in ("a", "b"):
        qlora.load_adapter(model, adapters / name, adapter_name=name)
    batcher = ContinuousBatcher(model.eval(), tokenizer, max_batch_size=32, context_length=512).start()
    app = build_app(batcher, "tiny", ["a", "b"], api_key=KEY)
    with BackgroundServer(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        yield server, batcher, client, tokenizer
    batcher.close()


def _generate(capsys, model_dir, adapters, adapter, prompt, max_tokens=MAX_TOKENS, template="auto") -> str:
    """``qlora generate``'s greedy output (stdout minus its final newline)."""
    capsys.readouterr()
    args = ["generate", "--model", str(model_dir), "--compute-dtype", "fp32", "--temperature", "0",
            "--max-new-tokens", str(max_tokens), "--prompt", prompt, "--template", template]
    if adapter is not None:
        args += ["--adapter", f"{adapter}={adapters / adapter}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n")
    return out[:-1]


def _chat(client, model, messages=HELLO, max_tokens=MAX_TOKENS, **kw):
    return client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                          temperature=0, **kw)


def _stream_chat(client, model, messages=HELLO, **kw) -> tuple[str, str, list]:
    chunks = list(client.chat.completions.create(model=model, messages=messages, stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1
    return text, finish[0], chunks


@pytest.mark.parametrize("model_id", ["tiny", "a"])
def test_chat_equals_qlora_generate(served, capsys, tiny_model_dir, adapters, model_id):
    _, _, client, tokenizer = served
    prompt = render_chat(tokenizer, [Message("user", "Hello")])
    # generate renders --prompt in the same template (the adapters saved none: the tokenizer's)
    expected = _generate(capsys, tiny_model_dir, adapters, None if model_id == "tiny" else model_id, "Hello",
                         template="tokenizer")

    reply = _chat(client, model_id)
    choice = reply.choices[0]
    assert choice.message.content == expected
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "length"  # no early stop: generate (EOS only) decoded the same 10 tokens
    assert reply.model == model_id
    # apply_chat_template's ids, as training tokenizes: the template decides BOS, the tokenizer adds none
    assert reply.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False).input_ids)
    assert reply.usage.completion_tokens == MAX_TOKENS
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + MAX_TOKENS

    text, finish, chunks = _stream_chat(client, model_id, max_tokens=MAX_TOKENS, temperature=0,
                                        stream_options={"include_usage": True})
    assert text == expected and finish == "length"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(chunks) > 3  # streamed in pieces, not in one chunk
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS and not chunks[-1].choices


def test_completions_equal_qlora_generate(served, capsys, tiny_model_dir, adapters):
    _, _, client, _ = served
    prompt = "The quick brown fox"
    for model_id in ("tiny", "b"):
        expected = _generate(capsys, tiny_model_dir, adapters, None if model_id == "tiny" else model_id, prompt)
        reply = client.completions.create(model=model_id, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        assert reply.choices[0].text == expected
        streamed = client.completions.create(model=model_id, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                             stream=True)
        assert "".join(c.choices[0].text for c in streamed) == expected


def test_models_lists_base_and_adapters(served):
    _, _, client, _ = served
    listed = list(client.models.list())
    assert [m.id for m in listed] == ["tiny", "a", "b"]
    for card in listed:  # client.models.retrieve (GET /v1/models/{id}) answers each as the list does
        assert client.models.retrieve(card.id) == card
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve("no/such-model")
    assert exc.value.body["code"] == "model_not_found" and exc.value.body["param"] == "model"


def test_stop_strings_cut_the_reply(served):
    _, _, client, _ = served
    full = _chat(client, "a").choices[0].message.content
    stop = full[3:5]
    cut = full[:full.index(stop)]
    reply = _chat(client, "a", stop=[stop, "never appears"])
    assert reply.choices[0].message.content == cut and reply.choices[0].finish_reason == "stop"
    text, finish, _ = _stream_chat(client, "a", max_tokens=MAX_TOKENS, temperature=0, stop=stop)
    assert text == cut and finish == "stop"


def test_two_adapters_concurrently_are_batched_and_each_equals_alone(served):
    _, batcher, client, _ = served
    alone = {m: _chat(client, m, max_tokens=16).choices[0].message.content for m in ("a", "b")}
    assert alone["a"] != alone["b"]
    before = batcher.load()["mixed_adapter_steps"]
    replies: dict[str, str] = {}

    def ask(model_id: str) -> None:
        replies[model_id] = _chat(client, model_id, max_tokens=16).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(m,)) for m in ("a", "b")]
    _together(batcher, threads)
    assert replies == alone
    # decode steps held rows of both adapters: one forward for the two of them
    assert batcher.load()["mixed_adapter_steps"] - before >= 10


def test_twenty_concurrent_streaming_clients_complete(served):
    _, batcher, client, _ = served
    models = ["tiny", "a", "b"]
    results: dict[int, tuple[str, str]] = {}
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        try:
            text, finish, _ = _stream_chat(client, models[i % 3], messages=[{"role": "user", "content": f"Hi {i}"}],
                                           max_tokens=8, temperature=1.0, top_p=0.9, seed=i)
            results[i] = (text, finish)
        except BaseException as exc:  # reported below, with the others
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(20)]
    _together(batcher, threads, timeout=120)
    assert not errors and sorted(results) == list(range(20))
    assert all(finish in ("stop", "length") for _, finish in results.values())
    assert batcher.load()["max_rows_in_step"] >= 10
    # a seeded, sampled request gives the same text alone as inside a batch of 20
    for i in (0, 1, 2):
        text, _, _ = _stream_chat(client, models[i % 3], messages=[{"role": "user", "content": f"Hi {i}"}],
                                  max_tokens=8, temperature=1.0, top_p=0.9, seed=i)
        assert text == results[i][0]


@pytest.mark.parametrize("route", ["chat/completions", "completions"])
def test_disconnect_mid_stream_frees_the_row(served, route):
    server, batcher, client, _ = served
    body = {"model": "tiny", "max_tokens": 300, "temperature": 0}
    body |= {"messages": HELLO} if route == "chat/completions" else {"prompt": "Hello"}
    alone = httpx.post(f"{server.url}/v1/{route}", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert alone.json()["choices"][0]["finish_reason"] == "length"  # would run 300 steps
    before = batcher.load()
    with httpx.stream("POST", f"{server.url}/v1/{route}", json=body | {"stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as response:
        assert response.status_code == 200
        lines = (line for line in response.iter_lines() if line)
        if route == "chat/completions":
            assert '"role":"assistant"' in next(lines)
        assert ('"content":' if route == "chat/completions" else '"text":"') in next(lines)  # decoding has started
    _wait(lambda: batcher.load()["requests_cancelled"] == before["requests_cancelled"] + 1)
    after = batcher.load()
    assert after["running"] == after["waiting"] == 0
    assert after["requests_completed"] == before["requests_completed"]
    assert after["tokens_generated"] - before["tokens_generated"] < 300


@pytest.mark.parametrize("route", ["chat/completions", "completions"])
def test_disconnect_while_waiting_for_a_slot_never_takes_one(served, route):
    """A stream whose client leaves before its row was admitted (the batch was busy) is dropped from the
    queue: it decodes no token."""
    server, batcher, _, _ = served
    body = {"model": "tiny", "max_tokens": 300, "temperature": 0, "stream": True}
    body |= {"messages": HELLO} if route == "chat/completions" else {"prompt": "Hello"}
    before = batcher.load()
    with batcher.paused():
        with httpx.stream("POST", f"{server.url}/v1/{route}", json=body,
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as response:
            assert response.status_code == 200
            _wait(lambda: batcher.load()["waiting"] == 1)
        _wait(lambda: batcher._waiting[0].cancelled)  # the disconnect reached it while the loop is held
    _wait(lambda: batcher.load()["requests_cancelled"] == before["requests_cancelled"] + 1)
    after = batcher.load()
    assert after["running"] == after["waiting"] == 0 and after["tokens_generated"] == before["tokens_generated"]


def test_errors_have_openai_shape_and_status(served):
    server, _, client, _ = served
    bad_key = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        bad_key.models.list()
    assert exc.value.status_code == 401 and exc.value.code == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models").status_code == 401  # no key at all
    assert httpx.post(server.url + "/v1/completions", content=b"{").status_code == 401  # the key is checked first
    assert httpx.get(server.url + "/health").status_code == 200  # liveness needs no key

    response = httpx.post(server.url + "/v1/chat/completions", content=b'{"model": "a", "messages": [',
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert response.json()["error"]["code"] == "invalid_json"
    response = httpx.post(server.url + "/v1/chat/completions", content=b'{"model": "a", "messages": []}',
                          headers={"Authorization": f"Bearer {KEY}",  # curl -d's default content type
                                   "Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 400 and "Content-Type: application/json" in response.json()["error"]["message"]

    with pytest.raises(openai.NotFoundError) as exc:  # OpenAI's and vLLM's 404 for a model that does not exist
        _chat(client, "no-such-model")
    assert exc.value.status_code == 404 and exc.value.code == "model_not_found" and exc.value.param == "model"

    with pytest.raises(openai.BadRequestError) as exc:  # vLLM's and OpenAI's 400 (it was a 413)
        _chat(client, "a", messages=[{"role": "user", "content": "fox " * 600}])
    assert exc.value.code == "context_length_exceeded" and exc.value.param == "messages"
    assert "maximum context length is" in exc.value.message

    with pytest.raises(openai.BadRequestError) as exc:
        _chat(client, "a", n=0)
    assert exc.value.param == "n"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="a", messages=HELLO, temperature=5)
    assert exc.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as exc:
        _chat(client, "a", messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    assert exc.value.param == "messages.0.content.0.image_url.url"  # only data: URIs are read
    # the server still answers after all of these
    assert _chat(client, "a").choices[0].finish_reason == "length"


def test_unknown_body_fields_are_400_naming_the_closest_known(served):
    """As OpenAI answers "Unrecognized request argument supplied": a typo is not silently ignored."""
    server, _, client, _ = served
    cases = [(lambda **kw: _chat(client, "a", **kw), {"temprature": 0}, "temperature"),
             (lambda **kw: client.completions.create(model="a", prompt="Hi", max_tokens=2, **kw),
              {"max_token": 3}, "max_tokens"),
             (lambda **kw: client.responses.create(model="a", input="Hi", max_output_tokens=2, **kw),
              {"max_output_token": 3}, "max_output_tokens"),
             (lambda **kw: client.chat.completions.create(model="a", messages=HELLO, max_tokens=2, stream=True, **kw),
              {"repetition_penalthy": 1.1}, "repetition_penalty"),
             (lambda **kw: client.conversations.create(items=[], **kw), {"metdata": {}}, "metadata")]
    for call, extra, closest in cases:
        with pytest.raises(openai.BadRequestError) as exc:
            call(extra_body=extra)
        (typo,) = extra
        assert exc.value.param == typo
        assert exc.value.body["message"] == (f"Unrecognized request argument supplied: {typo} "
                                             f"(did you mean '{closest}'?)")
    response = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": "a", "messages": HELLO, "colour": None, "zzzz": 1})
    assert response.status_code == 400 and response.json()["error"]["param"] == "colour"
    assert response.json()["error"]["message"] == "Unrecognized request arguments supplied: colour, zzzz"


def test_every_field_the_openai_client_sends_is_accepted(served):
    """The client's own parameters of each route (its TypedDicts) and vLLM's sampling extras are taken;
    those that would change the reply in a way qlora does not implement are 400s naming them."""
    from openai.types import completion_create_params
    from openai.types.chat import completion_create_params as chat_params
    from openai.types.responses import response_create_params

    from qlora.serve.protocol import ChatCompletionRequest, CompletionRequest
    from qlora.serve.responses import ResponsesRequest

    for params, request in ((chat_params.CompletionCreateParamsBase, ChatCompletionRequest),
                            (completion_create_params.CompletionCreateParamsBase, CompletionRequest),
                            (response_create_params.ResponseCreateParamsBase, ResponsesRequest)):
        assert set(params.__annotations__) - request.known_fields() == set(), request
    _, _, client, _ = served
    sent = dict(user="u", metadata={"k": "v"}, store=False, service_tier="auto", safety_identifier="s",
                prompt_cache_key="p", reasoning_effort="low", modalities=["text"],
                extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1})
    assert _chat(client, "a", **sent).choices[0].finish_reason == "length"
    assert client.completions.create(model="a", prompt="Hi", max_tokens=2, user="u",
                                      extra_body={"top_k": 5}).choices[0].text is not None
    assert client.responses.create(model="a", input="Hi", max_output_tokens=2, user="u", service_tier="auto",
                                   prompt_cache_key="p", safety_identifier="s").status == "incomplete"
    for kw, param in ((dict(modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"}), "modalities"),
                      (dict(audio={"voice": "alloy", "format": "wav"}), "audio"),
                      (dict(web_search_options={}), "web_search_options")):
        with pytest.raises(openai.BadRequestError) as exc:
            _chat(client, "a", **kw)
        assert exc.value.param == param


def test_a_request_body_over_the_limit_is_a_413_before_it_is_read(tiny_model_dir):
    """A body over --max-request-bytes (given by Content-Length, or chunked with none) is a 413 in OpenAI's error
    shape naming the limit and the option, streaming or not, after the key's check (401 first); a body within it is
    served alike whether chunked or not, its stream too."""
    import json

    from qlora.cli.commands.serve import MAX_REQUEST_BYTES
    from qlora.infer.batcher import ContinuousBatcher
    from qlora.serve.app import build_app
    from qlora.serve.request_size import DEFAULT_MAX_REQUEST_BYTES
    from qlora.serve.server import BackgroundServer

    assert MAX_REQUEST_BYTES == DEFAULT_MAX_REQUEST_BYTES == 100 << 20  # the CLI's default is the server's
    model, tokenizer = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    batcher = ContinuousBatcher(model.eval(), tokenizer, context_length=512).start()
    limit, auth = 4096, {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    small = {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    large = {**small, "prompt": "Hello " * 1000}

    def chunked(body):
        data = json.dumps(body).encode()
        return (data[k:k + 1000] for k in range(0, len(data), 1000))  # no Content-Length: chunked

    with BackgroundServer(build_app(batcher, "tiny", [], api_key=KEY, max_request_bytes=limit)) as server:
        url = server.url + "/v1/completions"
        for stream in (False, True):
            for content in (json.dumps({**large, "stream": stream}).encode(), chunked({**large, "stream": stream})):
                r = httpx.post(url, content=content, headers=auth, timeout=60)
                assert r.status_code == 413, r.text
                error = r.json()["error"]
                assert error["code"] == "request_too_large" and error["type"] == "invalid_request_error"
                assert f"limit of {limit} bytes (--max-request-bytes)" in error["message"]
            alike = [httpx.post(url, content=content, headers=auth, timeout=60) for content in (
                json.dumps({**small, "stream": stream}).encode(), chunked({**small, "stream": stream}))]
            assert [r.status_code for r in alike] == [200, 200]
            if stream:
                assert alike[0].text.count("data:") == alike[1].text.count("data:") > 1
            else:
                assert alike[0].json()["choices"] == alike[1].json()["choices"]
        r = httpx.post(url, content=json.dumps(large).encode(), headers={"Content-Type": "application/json"})
        assert r.status_code == 401
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi " * 2000}])
        assert err.value.status_code == 413
    batcher.close()


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_a_prompt_text_far_past_the_context_is_refused_without_tokenizing_it_all(served, route, monkeypatch):
    """A prompt whose first part alone has more tokens than the context is refused as one over the context (vLLM's
    and OpenAI's 400 context_length_exceeded): the whole has at least as many (the oracle: all of it tokenized),
    and only its first context x 32 characters were; with truncate_prompt_tokens it is cut, as vLLM does, and
    answered. A prompt within that head is counted whole, as before."""
    server, batcher, client, tokenizer = served
    text = "Hello there " * 20000  # 240,000 characters
    assert len(tokenizer(text).input_ids) >= batcher.context_length
    counted = []
    real = tokenizer.__class__.__call__
    monkeypatch.setattr(tokenizer.__class__, "__call__",
                        lambda self, t, *a, **kw: counted.append(len(t)) or real(self, t, *a, **kw))
    kw = dict(model="tiny", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as err:
        if route == "chat":
            client.chat.completions.create(messages=[{"role": "user", "content": text}], **kw)
        else:
            client.completions.create(prompt=text, **kw)
    assert err.value.body["code"] == "context_length_exceeded"
    assert max(counted) == batcher.context_length * 32 < len(text)  # its first context x 32 characters alone
    assert err.value.body["param"] == ("messages" if route == "chat" else "prompt")
    assert f"maximum context length is {batcher.context_length} tokens" in err.value.body["message"]
    cut = dict(extra_body={"truncate_prompt_tokens": 16}, **kw)
    reply = (client.chat.completions.create(messages=[{"role": "user", "content": text}], **cut) if route == "chat"
             else client.completions.create(prompt=text, **cut))
    assert reply.usage.prompt_tokens == 16
    with pytest.raises(openai.BadRequestError, match="resulted in"):  # within the head: counted whole, as before
        client.completions.create(prompt="Hello there " * 400, **kw)


def test_serve_without_fastapi_says_what_to_install(monkeypatch, capsys, tiny_model_dir):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if not installed: find_spec gives None
    assert main(["serve", "--model", str(tiny_model_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'qlora[serve]'" in err[0]


def test_nothing_else_imports_the_server_stack():
    code = ("import sys, qlora, qlora.cli.main, qlora.cli.commands.serve, qlora.infer.batcher, qlora.model.load\n"
            "assert not {'fastapi', 'uvicorn', 'starlette'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, env=_env())


@pytest.mark.parametrize("force", [False, True])
def test_shutdown_answers_the_requests_still_running_with_503(tiny_model_dir, force):
    """Past the grace period (or at once on a second Ctrl-C, uvicorn's force exit) a shutdown ends the running
    and waiting requests: each client gets the 503 ``server_shutdown`` error (a plain reply's status, a
    stream's last event before ``[DONE]``), not a connection dropped mid-reply."""
    from qlora.infer.batcher import ContinuousBatcher
    from qlora.serve.app import build_app
    from qlora.serve.server import BackgroundServer

    model, tokenizer = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    batcher = ContinuousBatcher(model.eval(), tokenizer, context_length=512).start()
    server = BackgroundServer(build_app(batcher, "tiny", []), on_shutdown=batcher.close, grace_s=600 if force else 0)
    outcomes: dict[str, object] = {}

    def plain() -> None:
        try:
            outcomes["plain"] = client.completions.create(model="tiny", prompt="Hello", max_tokens=400, temperature=0)
        except openai.APIError as exc:
            outcomes["plain"] = exc

    def stream() -> None:
        chunks = []
        try:
            for chunk in client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=400, stream=True):
                chunks.append(chunk)
        except openai.APIError as exc:
            outcomes["stream"] = (chunks, exc)

    with server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        threads = [threading.Thread(target=plain), threading.Thread(target=stream)]
        with batcher.paused():  # both requests wait for the loop, which holds until the shutdown closed the batcher
            for t in threads:
                t.start()
            _wait(lambda: batcher.load()["waiting"] == 2)
            server.server.should_exit = True  # what SIGINT and SIGTERM do
            server.server.force_exit = force  # what a second SIGINT does
            _wait(lambda: batcher._closed)
        for t in threads:
            t.join(30)
    plain_error = outcomes["plain"]
    assert isinstance(plain_error, openai.APIStatusError) and plain_error.status_code == 503
    assert plain_error.body["code"] == "server_shutdown"
    chunks, stream_error = outcomes["stream"]
    assert chunks and chunks[0].choices[0].delta.role == "assistant"  # the stream had begun
    assert "shutting down" in stream_error.message and stream_error.body["code"] == "server_shutdown"


def test_shutdown_lets_requests_finish_within_the_grace_period(tiny_model_dir):
    """A request running when the shutdown begins gets its whole reply, and the server stops once it is sent,
    not at the end of the grace period."""
    from qlora.infer.batcher import ContinuousBatcher
    from qlora.serve.app import build_app
    from qlora.serve.server import BackgroundServer

    model, tokenizer = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    batcher = ContinuousBatcher(model.eval(), tokenizer, context_length=512).start()
    server = BackgroundServer(build_app(batcher, "tiny", []), on_shutdown=batcher.close, grace_s=600)
    replies = []
    with server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        alone = client.completions.create(model="tiny", prompt="Hello", max_tokens=MAX_TOKENS, temperature=0)
        thread = threading.Thread(target=lambda: replies.append(
            client.completions.create(model="tiny", prompt="Hello", max_tokens=MAX_TOKENS, temperature=0)))
        with batcher.paused():
            thread.start()
            _wait(lambda: batcher.load()["waiting"] == 1)
            server.server.should_exit = True
            _wait(lambda: not server.server.servers[0].is_serving())  # the shutdown began: no new connections
        thread.join(60)
        server.thread.join(60)
        assert not server.thread.is_alive()  # stopped once the reply was sent
    assert replies[0].choices[0].text == alone.choices[0].text and replies[0].usage.completion_tokens == MAX_TOKENS
    batcher.close()


def test_a_request_set_up_after_the_batcher_closed_is_a_503(tiny_model_dir, caplog):
    """A request reaching the batcher once the shutdown closed it gets the running ones' 503, not a 500 logged
    with its traceback (one per request: a storm while a busy server stops), and /stats counts each of its rows as
    cancelled, as it counts the rows the shutdown ended (they were not counted at all)."""
    from qlora.infer.batcher import ContinuousBatcher
    from qlora.serve.app import build_app
    from qlora.serve.server import BackgroundServer

    model, tokenizer = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    batcher = ContinuousBatcher(model.eval(), tokenizer, context_length=512).start()
    bodies = {"completions": {"prompt": ["Hello", "Bye"], "max_tokens": 5, "n": 2},
              "chat/completions": {"messages": HELLO}, "responses": {"input": "Hello", "max_output_tokens": 16}}
    rows = {"completions": 4, "chat/completions": 1, "responses": 1}
    with BackgroundServer(build_app(batcher, "tiny", [])) as server:
        batcher.close()
        for route, body in bodies.items():
            for stream in (False, True):
                before = httpx.get(f"{server.url}/stats").json()
                reply = httpx.post(f"{server.url}/v1/{route}", json=body | {"model": "tiny", "stream": stream})
                assert reply.status_code == 503, (route, stream, reply.text)
                assert reply.json()["error"]["code"] == "server_shutdown"
                after = httpx.get(f"{server.url}/stats").json()
                assert after["requests_cancelled"] - before["requests_cancelled"] == rows[route], (route, after)
                assert after["waiting"] == after["running"] == 0
    assert not [r for r in caplog.records if r.levelno >= 40], caplog.text


def test_sigterm_is_an_interrupt_in_the_main_thread_only():
    """The CLI's SIGTERM handling: KeyboardInterrupt in the main thread, the old handler back afterwards; another
    thread (a library running the server there) may set no handler, so nothing changes."""
    from qlora.sigterm import sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with sigterm_as_interrupt():
            signal.raise_signal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before
    seen = []

    def elsewhere() -> None:
        with sigterm_as_interrupt():
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    assert seen == [before]


# SIGTERM (or SIGINT) sent by the process to itself as the model's load starts: a service manager stopping
# `qlora serve` while it loads (systemd, docker stop).
_STOPPED_WHILE_LOADING = """
import os, signal, sys
import qlora.model.load as load
from qlora.cli.main import main

real = load.load_model
def load_model(*args, **kwargs):
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    return real(*args, **kwargs)
load.load_model = load_model
sys.exit(main(["serve", "--model", sys.argv[2], "--port", "0"]))
"""


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_sigterm_while_the_model_loads_stops_serve_as_ctrl_c_does(tiny_model_dir, sig):
    proc = subprocess.run([sys.executable, "-c", _STOPPED_WHILE_LOADING, sig, str(tiny_model_dir)], env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130 and proc.stderr.strip().endswith("qlora: interrupted"), proc
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_qlora_serve_command_end_to_end(tiny_model_dir, adapters, sig):
    """The real command: loopback, an ephemeral port, the key from QLORA_API_KEY, a clean stop on Ctrl-C
    or SIGTERM (status 0, the batcher closed: uvicorn re-raises the signal after its shutdown)."""
    cmd = [sys.executable, "-m", "qlora", "serve", "--model", str(tiny_model_dir), "--adapter",
           f"a={adapters / 'a'}", "--compute-dtype", "fp32", "--port", "0", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=_env(QLORA_API_KEY=KEY))
    try:
        line = _startup_line(proc)
        assert line.startswith("qlora serve: http://127.0.0.1:"), line + proc.stderr.read()
        base = line.split()[2]
        client = openai.OpenAI(base_url=base, api_key=KEY, max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == [Path(tiny_model_dir).name, "a"]
        assert _chat(client, "a").usage.completion_tokens == MAX_TOKENS
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base, api_key="nope", max_retries=0).models.list()
    finally:
        proc.send_signal(sig)  # uvicorn shuts down gracefully
        assert proc.wait(30) == 0
        assert "qlora serve: stopped" in proc.stderr.read()


def _startup_line(proc: subprocess.Popen) -> str:
    """The server's "qlora serve: http://..." line (warnings from libraries may come first)."""
    line = ""
    for line in iter(proc.stderr.readline, ""):
        if line.startswith("qlora serve: http://"):
            break
    return line


def _env(**extra: str) -> dict[str, str]:
    src = str(Path(qlora.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1", **extra}


def _together(batcher, threads, timeout: float = 60.0) -> None:
    """Run the request threads so that every request queues first and all join the batch at the same
    step boundary; return when they are done."""
    with batcher.paused():
        for t in threads:
            t.start()
        _wait(lambda: batcher.load()["waiting"] == len(threads))
    for t in threads:
        t.join(timeout)


def _wait(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_each_adapter_chats_in_the_format_it_was_trained_with(tiny_model_dir, adapters, capsys, tmp_path):
    """An adapter saved with ``chat_format.json`` (here Alpaca) is prompted in that format, as ``qlora generate``
    does with ``--template auto``; the base keeps the model's own template."""
    import argparse
    import shutil

    from qlora.cli.commands.serve import chat_formats
    from qlora.infer.batcher import ContinuousBatcher
    from qlora.model.chat_format import ChatFormat
    from qlora.serve.app import build_app
    from qlora.serve.server import BackgroundServer
    from qlora.train.data.templates import TEMPLATES

    alpaca_dir = tmp_path / "c"
    shutil.copytree(adapters / "a", alpaca_dir)
    ChatFormat(template=TEMPLATES["alpaca"], origin="--template alpaca", name="alpaca").save(alpaca_dir)
    capsys.readouterr()
    assert main(["generate", "--model", str(tiny_model_dir), "--compute-dtype", "fp32", "--temperature", "0",
                 "--max-new-tokens", str(MAX_TOKENS), "--adapter", f"c={alpaca_dir}", "--prompt", "Hello"]) == 0
    expected = capsys.readouterr().out[:-1]

    model, tokenizer = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(model, alpaca_dir, adapter_name="c")
    formats = chat_formats(argparse.Namespace(model=str(tiny_model_dir), template="auto", adapter=[f"c={alpaca_dir}"]),
                           tokenizer)
    assert formats["c"].name == "alpaca" and None not in formats
    batcher = ContinuousBatcher(model.eval(), tokenizer, max_batch_size=4, context_length=512).start()
    try:
        with BackgroundServer(build_app(batcher, "tiny", ["c"], chat_formats=formats)) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
            reply = _chat(client, "c")
            base = _chat(client, "tiny")
    finally:
        batcher.close()
    assert reply.choices[0].message.content == expected
    alpaca_prompt = formats["c"].render(tokenizer, HELLO, add_generation_prompt=True)
    assert "### Instruction:\nHello" in alpaca_prompt
    assert reply.usage.prompt_tokens == len(tokenizer(alpaca_prompt, add_special_tokens=False).input_ids)  # BOS by the template
    assert base.usage.prompt_tokens == len(tokenizer(render_chat(tokenizer, [Message("user", "Hello")]),
                                                     add_special_tokens=False).input_ids)
    assert base.usage.prompt_tokens != reply.usage.prompt_tokens


def test_a_choice_gathers_a_long_reply_in_linear_time():
    """A reply of many small events (a long stream) is joined once, not re-copied at each event: 40,000
    events of a 50-character text take milliseconds (re-copying the text so far took seconds); the text and
    logprobs are those of the events, in order."""
    from qlora.infer.batcher import Event
    from qlora.infer.logprobs import TokenLogprob
    from qlora.serve.app import _Choice

    choice = _Choice(0, generation=None)
    pieces = [f"{k:<49}|" for k in range(40_000)]
    entries = [TokenLogprob(k, -0.5) for k in range(len(pieces))]
    start = time.perf_counter()
    for k, (piece, entry) in enumerate(zip(pieces, entries)):
        choice.add(Event(piece, "length" if k == len(pieces) - 1 else None, logprobs=[entry]))
    text = choice.text
    elapsed = time.perf_counter() - start
    assert text == "".join(pieces) and choice.logprobs == entries and choice.last.finish_reason == "length"
    assert elapsed < 1.0, f"{elapsed:.2f} s"
