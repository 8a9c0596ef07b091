"""Browsers calling ``qlora serve`` (CORS), with the requests a browser sends: a preflight ``OPTIONS`` carrying
``Origin`` and ``Access-Control-Request-*``, then the request with its ``Origin``.

Oracles: the Fetch standard's reading of the answers (the page may read a reply only when
``Access-Control-Allow-Origin`` names its origin or is ``*``), vLLM's option names and forms, and the CLI's exit 2.
"""

from __future__ import annotations

import httpx
import pytest
import torch

import qlora

from test_serve import KEY

pytest.importorskip("fastapi")

PAGE = "http://localhost:3000"
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}


def _preflight(url: str, origin: str) -> httpx.Response:
    return httpx.options(url + "/v1/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})


@pytest.fixture(scope="module")
def servers(tiny_model_dir):
    """One batcher behind three servers: CORS off (the default), one page allowed, and every page allowed."""
    from qlora.infer.batcher import ContinuousBatcher
    from qlora.serve import cors
    from qlora.serve.app import build_app
    from qlora.serve.server import BackgroundServer

    model, tokenizer = qlora.load_model(tiny_model_dir, quant=None, compute_dtype=torch.float32, device="cpu")
    batcher = ContinuousBatcher(model.eval(), tokenizer, max_batch_size=4, context_length=128).start()
    apps = [build_app(batcher, "tiny", [], api_key=KEY) for _ in range(3)]
    cors.allow(apps[1], cors.origins(PAGE))
    cors.allow(apps[2], cors.origins('["*"]'))
    with BackgroundServer(apps[0]) as off, BackgroundServer(apps[1]) as page, BackgroundServer(apps[2]) as every:
        yield off.url, page.url, every.url
    batcher.close()


def test_by_default_no_page_may_call_the_server(servers):
    off, _, _ = servers
    assert "access-control-allow-origin" not in _preflight(off, PAGE).headers
    reply = httpx.post(off + "/v1/chat/completions", json=BODY, headers={"Origin": PAGE,
                                                                         "Authorization": f"Bearer {KEY}"})
    assert reply.status_code == 200 and "access-control-allow-origin" not in reply.headers


def test_an_allowed_page_passes_the_preflight_without_the_key_and_reads_replies_and_errors(servers):
    _, page, _ = servers
    preflight = _preflight(page, PAGE)
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == PAGE
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert {"authorization", "content-type"} <= {h.strip().lower() for h in
                                                  preflight.headers["access-control-allow-headers"].split(",")}
    reply = httpx.post(page + "/v1/chat/completions", json=BODY, headers={"Origin": PAGE,
                                                                          "Authorization": f"Bearer {KEY}"})
    assert reply.status_code == 200 and reply.headers["access-control-allow-origin"] == PAGE
    assert reply.json()["object"] == "chat.completion"
    refused = httpx.post(page + "/v1/chat/completions", json=BODY, headers={"Origin": PAGE})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == PAGE
    assert refused.json()["error"]["code"] == "invalid_api_key"


def test_another_page_is_refused(servers):
    _, page, _ = servers
    preflight = _preflight(page, "http://evil.example")
    assert preflight.status_code == 400 and "access-control-allow-origin" not in preflight.headers
    reply = httpx.get(page + "/v1/models", headers={"Origin": "http://evil.example",
                                                     "Authorization": f"Bearer {KEY}"})
    assert "access-control-allow-origin" not in reply.headers


def test_a_star_allows_every_page(servers):
    _, _, every = servers
    for origin in (PAGE, "https://app.example.org"):
        assert _preflight(every, origin).status_code == 200
        reply = httpx.get(every + "/v1/models", headers={"Origin": origin, "Authorization": f"Bearer {KEY}"})
        assert reply.headers["access-control-allow-origin"] == "*"


def test_the_options_take_vllm_s_json_lists_and_comma_lists():
    from qlora.serve import cors

    assert cors.origins('["http://a.example", "https://b.example:8443"]') == ("http://a.example",
                                                                              "https://b.example:8443")
    assert cors.origins("http://a.example, http://b.example") == ("http://a.example", "http://b.example")
    assert cors.origins(None) == ()
    assert cors.tokens("GET,POST", "--allowed-methods") == ("GET", "POST")


@pytest.mark.parametrize("option, value, shown", [
    ("--allowed-origins", "http://localhost:3000/", "without a path or trailing slash (e.g. http://localhost:3000)"),
    ("--allowed-origins", "localhost:3000", "scheme://host[:port]"),
    ("--allowed-origins", '["http://a.example"', "not a JSON list"),
    ("--allowed-origins", "http://a.example,", "empty entry"),
    ("--allowed-headers", "x header", "not an HTTP method or header name"),
    ("--allowed-methods", '[1]', "must be a JSON list of strings"),
])
def test_a_bad_value_exits_2_naming_the_option_before_the_model_loads(capsys, monkeypatch, tiny_model_dir, option,
                                                                     value, shown):
    from qlora.cli.commands import generate
    from qlora.cli.main import main

    monkeypatch.setattr(generate, "load_model_from_args", lambda *a, **k: pytest.fail("the model was loaded"))
    code = main(["serve", "--model", str(tiny_model_dir), option, value])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert option in err and shown in err
