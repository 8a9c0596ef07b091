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
    """One batcher behind five servers: CORS off (the default), one page allowed, every page allowed, one page
    written as a user may write it (upper case, methods in lower case), and every page with credentials."""
    from qlora.infer.batcher import ContinuousBatcher
    from qlora.serve import cors
    from qlora.serve.app import build_app
    from qlora.serve.server import BackgroundServer

    model, tokenizer = qlora.load_model(tiny_model_dir, quant=None, compute_dtype=torch.float32, device="cpu")
    batcher = ContinuousBatcher(model.eval(), tokenizer, max_batch_size=4, context_length=128).start()
    apps = [build_app(batcher, "tiny", [], api_key=KEY) for _ in range(5)]
    cors.allow(apps[1], cors.origins(PAGE))
    cors.allow(apps[2], cors.origins('["*"]'))
    cors.allow(apps[3], cors.origins("HTTP://LocalHost:3000,https://app.example.org:443"), cors.methods("get,post"),
               cors.tokens("Authorization,Content-Type", "--allowed-headers"))
    cors.allow(apps[4], cors.origins("*"), credentials=True)
    with (BackgroundServer(apps[0]) as off, BackgroundServer(apps[1]) as page, BackgroundServer(apps[2]) as every,
          BackgroundServer(apps[3]) as written, BackgroundServer(apps[4]) as credentials):
        yield off.url, page.url, every.url, written.url, credentials.url
    batcher.close()


def test_by_default_no_page_may_call_the_server(servers):
    off, *_ = servers
    assert "access-control-allow-origin" not in _preflight(off, PAGE).headers
    reply = httpx.post(off + "/v1/chat/completions", json=BODY, headers={"Origin": PAGE,
                                                                         "Authorization": f"Bearer {KEY}"})
    assert reply.status_code == 200 and "access-control-allow-origin" not in reply.headers


def test_an_allowed_page_passes_the_preflight_without_the_key_and_reads_replies_and_errors(servers):
    _, page, *_ = servers
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
    _, page, *_ = servers
    preflight = _preflight(page, "http://evil.example")
    assert preflight.status_code == 400 and "access-control-allow-origin" not in preflight.headers
    reply = httpx.get(page + "/v1/models", headers={"Origin": "http://evil.example",
                                                     "Authorization": f"Bearer {KEY}"})
    assert "access-control-allow-origin" not in reply.headers


def test_a_star_allows_every_page(servers):
    _, _, every, *_ = servers
    for origin in (PAGE, "https://app.example.org"):
        assert _preflight(every, origin).status_code == 200
        reply = httpx.get(every + "/v1/models", headers={"Origin": origin, "Authorization": f"Bearer {KEY}"})
        assert reply.headers["access-control-allow-origin"] == "*"


def test_origins_and_methods_match_as_a_browser_writes_them(servers):
    """A browser's Origin has its scheme and host in lower case and no default port, and it upper-cases the method
    of a preflight (Fetch's normalization); the preflight compares them exactly, so an origin or a method written
    otherwise matched no page: 'Disallowed CORS origin, method'."""
    written = servers[3]
    for origin in (PAGE, "https://app.example.org"):
        preflight = _preflight(written, origin)
        assert preflight.status_code == 200, preflight.text
        assert preflight.headers["access-control-allow-origin"] == origin
        assert "POST" in preflight.headers["access-control-allow-methods"].split(", ")
    reply = httpx.post(written + "/v1/chat/completions", json=BODY, headers={"Origin": PAGE,
                                                                             "Authorization": f"Bearer {KEY}"})
    assert reply.status_code == 200 and reply.headers["access-control-allow-origin"] == PAGE


def test_a_star_with_credentials_names_each_page_back(servers):
    """The Fetch standard refuses a credentialed reply whose Access-Control-Allow-Origin is ``*``: with
    --allow-credentials every page's own origin is named back, with ``Vary: Origin`` for caches (Starlette 0.36,
    what fastapi 0.110 installs, sent ``*`` to a request without a cookie)."""
    credentials = servers[4]
    for origin in (PAGE, "https://app.example.org"):
        preflight = _preflight(credentials, origin)
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == origin
        assert preflight.headers["access-control-allow-credentials"] == "true"
        reply = httpx.get(credentials + "/v1/models", headers={"Origin": origin, "Authorization": f"Bearer {KEY}"})
        assert reply.headers["access-control-allow-origin"] == origin
        assert reply.headers["access-control-allow-credentials"] == "true"
        assert "origin" in reply.headers["vary"].lower()


def test_the_options_take_vllm_s_json_lists_and_comma_lists():
    from qlora.serve import cors

    assert cors.origins('["http://a.example", "https://b.example:8443"]') == ("http://a.example",
                                                                              "https://b.example:8443")
    assert cors.origins("http://a.example, http://b.example") == ("http://a.example", "http://b.example")
    assert cors.origins(None) == ()
    assert cors.tokens("GET,POST", "--allowed-methods") == ("GET", "POST")
    assert cors.origins("HTTP://LocalHost:80,https://a.example:443,https://b.example:8443") == (
        "http://localhost", "https://a.example", "https://b.example:8443")
    assert cors.methods("get, Post,PATCH,purge") == ("GET", "POST", "PATCH", "purge")  # Fetch upper-cases six


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
