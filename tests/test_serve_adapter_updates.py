"""Adapters loaded and unloaded while ``qlora serve`` runs (vLLM's ``POST /v1/load_lora_adapter`` and
``/v1/unload_lora_adapter``), driven by the ``openai`` client and httpx against a real server.

Oracles: a server started with the adapter (its replies at temperature 0, its prompt in the adapter's saved chat
format), the same streamed request without a load under way, and the model's parameters before the load.
"""

from __future__ import annotations

import argparse
import copy
import re
import shutil
import threading
import time

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

import qlora
from qlora.model.chat_format import ChatFormat
from qlora.model.inject import adapter_configs

from random_adapters import randomize_lora_b, save_random_adapter

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

KEY = "sk-test-key"
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir):
    """``a``: random deltas on attention and MLP; ``c``: another, saved with the Alpaca chat format."""
    from qlora.train.data.templates import TEMPLATES

    root = tmp_path_factory.mktemp("update-adapters")
    for name, seed in (("a", 1), ("c", 3)):
        save_random_adapter(tiny_model_dir, root / name, seed)
    ChatFormat(template=TEMPLATES["alpaca"], origin="--template alpaca", name="alpaca").save(root / "c")
    return root


def _args(model_dir, *options: str) -> argparse.Namespace:
    """``qlora serve``'s parsed options."""
    from qlora.cli.commands import serve

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser.parse_args(["--model", str(model_dir), *options])


def _server(model_dir, adapters: dict, updates: bool = True, api_key: str | None = KEY):
    """(batcher, app) as ``qlora serve`` builds them, with ``adapters`` (name -> folder) given at start."""
    from qlora.cli.commands.serve import adapter_settings, chat_formats, pixel_bounds
    from qlora.infer.batcher import ContinuousBatcher
    from qlora.serve.app import build_app

    args = _args(model_dir, *[o for name, path in adapters.items() for o in ("--adapter", f"{name}={path}")])
    model, tokenizer = qlora.load_model(model_dir, compute_dtype=torch.float32, device="cpu")
    for name, path in adapters.items():
        qlora.load_adapter(model, path, adapter_name=name)
    batcher = ContinuousBatcher(model.eval(), tokenizer, max_batch_size=8, context_length=512).start()
    app = build_app(batcher, "tiny", list(adapters), api_key=api_key, chat_formats=chat_formats(args, tokenizer),
                    pixel_bounds=pixel_bounds(args),
                    adapter_settings=adapter_settings(args, tokenizer) if updates else None)
    return batcher, app


@pytest.fixture(scope="module")
def updating(tiny_model_dir):
    """A server started without adapters, updates allowed, with its batcher and an httpx client holding the key."""
    from qlora.serve.server import BackgroundServer

    batcher, app = _server(tiny_model_dir, {})
    with BackgroundServer(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        yield batcher, client, http
        http.close()
    batcher.close()


def _chat(client, model, max_tokens=10):
    return client.chat.completions.create(model=model, messages=HELLO, max_tokens=max_tokens, temperature=0)


def _load(http, name, path):
    return http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})


def _unload(http, name):
    return http.post("/v1/unload_lora_adapter", json={"lora_name": name})


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_a_loaded_adapter_answers_as_one_given_at_start(tiny_model_dir, adapters, updating):
    """Loaded while serving, an adapter is listed and answers with the tokens (and, from its saved chat format,
    the prompt) of a server started with it; unloaded, it is gone (404) and its tensors with it; loaded again,
    it answers the same."""
    from qlora.serve.server import BackgroundServer

    batcher, at_start = _server(tiny_model_dir, {"a": adapters / "a", "c": adapters / "c"}, updates=False)
    with BackgroundServer(at_start) as server:
        oracle = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        expected = {name: _chat(oracle, name) for name in ("a", "c")}
    batcher.close()
    assert expected["a"].choices[0].message.content != expected["c"].choices[0].message.content

    batcher, client, http = updating
    before = {n: p.numel() for n, p in batcher.model.named_parameters()}
    base = _chat(client, "tiny").choices[0].message.content
    for name in ("a", "c"):
        response = _load(http, name, adapters / name)
        assert response.status_code == 200 and name in response.text
    assert [m.id for m in client.models.list().data] == ["tiny", "a", "c"]
    assert client.models.retrieve("c").parent == "tiny"
    for name in ("a", "c"):
        reply = _chat(client, name)
        assert reply.choices[0].message.content == expected[name].choices[0].message.content
        assert reply.usage.prompt_tokens == expected[name].usage.prompt_tokens  # "c": the Alpaca prompt
    assert expected["c"].usage.prompt_tokens != expected["a"].usage.prompt_tokens

    for name in ("a", "c"):
        assert _unload(http, name).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("a")
    with pytest.raises(openai.NotFoundError) as refused:
        _chat(client, "a")
    assert refused.value.code == "model_not_found"
    assert {n: p.numel() for n, p in batcher.model.named_parameters()} == before  # its tensors are gone
    assert adapter_configs(batcher.model) == {}
    assert _chat(client, "tiny").choices[0].message.content == base

    assert _load(http, "a", adapters / "a").status_code == 200
    assert _chat(client, "a").choices[0].message.content == expected["a"].choices[0].message.content
    assert _unload(http, "a").status_code == 200


def test_streams_go_on_through_a_load_and_an_unload_waits_for_none(tiny_model_dir, adapters, updating):
    """A load while replies stream (between two of their steps) leaves their tokens as they are without it; an
    unload of an adapter with a reply in flight is refused (409) and the reply goes on; once done, it unloads.
    Each forward is slowed (50 ms) until the load and the unload are done, so the 200-token replies are surely
    under way throughout (a 10 s window, for a loaded machine), and checks that the model's adapters did not change
    while it ran."""
    batcher, client, http = updating
    assert _load(http, "c", adapters / "c").status_code == 200

    def stream(model, gate=None, resume=None) -> str:
        pieces = []
        for k, chunk in enumerate(client.chat.completions.create(model=model, messages=HELLO, max_tokens=200,
                                                                 temperature=0, stream=True,
                                                                 extra_body={"ignore_eos": True})):
            pieces.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
            if k == 1 and gate is not None:
                gate.set()
                assert resume.wait(60)
        return "".join(pieces)

    alone = {model: stream(model) for model in ("tiny", "c")}
    gates, resume = {m: threading.Event() for m in alone}, threading.Event()
    texts = {}
    threads = [threading.Thread(target=lambda m=m: texts.__setitem__(m, stream(m, gates[m], resume)))
               for m in alone]
    model, at_start, changed_midway = batcher.model, [], []

    def slow_start(*_):
        at_start.append(sorted(adapter_configs(model)))
        if not resume.is_set():
            time.sleep(0.05)

    def slow_end(*_):
        changed_midway.append(at_start.pop() != sorted(adapter_configs(model)))

    hooks = [model.register_forward_pre_hook(slow_start), model.register_forward_hook(slow_end)]
    for t in threads:
        t.start()
    try:
        assert all(g.wait(60) for g in gates.values())  # both replies are under way
        assert _load(http, "a", adapters / "a").status_code == 200
        busy = _error(_unload(http, "c"), 409)
        assert busy["code"] == "adapter_in_use" and "'c'" in busy["message"]
    finally:
        resume.set()
        for t in threads:
            t.join(60)
        for hook in hooks:
            hook.remove()
    assert texts == alone and len(set(texts.values())) == 2
    assert len(changed_midway) > 10 and not any(changed_midway)  # loaded between two steps
    deadline = time.monotonic() + 30  # a client sees a reply's last chunk before the batcher retires its row
    while batcher.load()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert batcher.load()["running"] == 0
    assert _unload(http, "c").status_code == 200
    assert _unload(http, "a").status_code == 200


def _save_head_adapter(model_dir, folder, seed: int) -> None:
    """An adapter of q_proj LoRA and lm_head trained whole (``modules_to_save``), random (``seed``), at ``folder``."""
    model, _ = qlora.load_model(model_dir, compute_dtype=torch.float32, device="cpu")
    qlora.add_lora(model, r=4, dropout=0.0, verbose=False, target_modules=["q_proj"], modules_to_save=["lm_head"])
    randomize_lora_b(model, seed, scale=0.3)
    with torch.no_grad():
        model.lm_head.weight.add_(0.5 * torch.randn(model.lm_head.weight.shape,
                                                    generator=torch.Generator().manual_seed(seed)))
    qlora.save_adapter(model, folder)


def _broken(adapters, tmp_path, name: str, edit) -> str:
    """A copy of adapter ``a`` whose tensors ``edit`` changed."""
    folder = tmp_path / name
    shutil.copytree(adapters / "a", folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    save_file(edit(tensors), folder / "adapter_model.safetensors")
    return folder


def test_bad_loads_and_unloads_are_refused_and_leave_the_model_as_it_was(tiny_model_dir, adapters, updating,
                                                                         tmp_path):
    batcher, client, http = updating
    before = {n: p.numel() for n, p in batcher.model.named_parameters()}

    missing = _error(_load(http, "x", tmp_path / "nowhere"), 404)
    assert str(tmp_path / "nowhere") in missing["message"] and missing["param"] == "lora_path"
    (tmp_path / "empty").mkdir()
    assert "adapter_config.json is missing" in _error(_load(http, "x", tmp_path / "empty"), 400)["message"]
    base = _error(_load(http, "tiny", adapters / "a"), 400)
    assert "base model" in base["message"] and "unload" not in base["message"] and base["param"] == "lora_name"
    dotted = _error(_load(http, "a.b", adapters / "a"), 400)
    assert "'.'" in dotted["message"] and dotted["param"] == "lora_name"

    wide = _broken(adapters, tmp_path, "wide", lambda t: {k: torch.zeros(v.shape[0], v.shape[1] + 3)
                                                          if "q_proj.lora_A" in k else v for k, v in t.items()})
    shape = _error(_load(http, "x", wide), 400)["message"]
    assert "shape" in shape and "q_proj" in shape
    elsewhere = _broken(adapters, tmp_path, "elsewhere",
                        lambda t: {k.replace("layers.0.", "layers.97."): v for k, v in t.items()})
    assert "layers.97" in _error(_load(http, "x", elsewhere), 400)["message"]
    head = _broken(adapters, tmp_path, "head", lambda t: t | {
        "base_model.model.lm_head.weight": batcher.model.lm_head.weight.detach().clone() + 1})
    in_place = _error(_load(http, "x", head), 400)["message"]
    assert "lm_head" in in_place and "in the base model itself" in in_place
    grown = tmp_path / "grown"
    shutil.copytree(adapters / "a", grown)
    tokenizer = copy.deepcopy(batcher.tokenizer)
    tokenizer.add_tokens(["<new-token>"])
    tokenizer.save_pretrained(grown)
    assert f"{len(batcher.tokenizer) + 1} tokens" in _error(_load(http, "x", grown), 400)["message"]
    assert {n: p.numel() for n, p in batcher.model.named_parameters()} == before  # no layers left half loaded
    assert adapter_configs(batcher.model) == {} and [m.id for m in client.models.list().data] == ["tiny"]

    assert _load(http, "a", adapters / "a").status_code == 200
    taken = _error(_load(http, "a", adapters / "c"), 400)
    assert "already" in taken["message"] and taken["param"] == "lora_name"
    assert _error(_unload(http, "b"), 404)["code"] == "adapter_not_found"
    assert "cannot be unloaded" in _error(_unload(http, "tiny"), 400)["message"]
    assert _error(http.post("/v1/unload_lora_adapter", json={}), 400)["param"] == "lora_name"
    assert _unload(http, "a").status_code == 200


def test_the_batcher_refuses_a_request_for_an_unloaded_adapter(updating):
    """A request set up before its adapter was unloaded, submitted after, is refused at once rather than failing in
    its prefill (the server answers it as an unknown model)."""
    from qlora.infer.batcher import Request, UnknownAdapter
    from qlora.infer.sampling_options import SamplingOptions

    batcher, _, _ = updating
    with pytest.raises(UnknownAdapter, match="'gone'"):
        batcher.submit(Request([1, 2, 3], "gone", SamplingOptions(max_new_tokens=2), lambda event: None))
    assert batcher.load()["waiting"] == 0


def _listed_routes(http) -> list[str]:
    """The routes an unknown path's 404 names, each checked to be one the server answers (no 404 of its own)."""
    unknown = _error(http.get("/v1/nothing-here"), 404)
    assert unknown["code"] == "not_found"
    routes = re.findall(r"/v1/[a-z_/]+", unknown["message"].partition("answers")[2])
    for route in routes:
        assert http.post(route, json={}).status_code != 404, route
    return routes


def test_updates_need_the_option_and_the_key(tiny_model_dir, adapters, updating):
    """Without --allow-adapter-updates both routes are a 404 naming the option, and an unknown path's 404 does not
    list them; with it, the API key guards them, and that 404 lists them (it did not)."""
    from qlora.serve.server import BackgroundServer

    _, _, http = updating
    anonymous = httpx.post(f"{http.base_url}/v1/load_lora_adapter",
                           json={"lora_name": "a", "lora_path": str(adapters / "a")})
    assert _error(anonymous, 401)["code"] == "invalid_api_key"
    served = _listed_routes(http)
    assert served[-2:] == ["/v1/load_lora_adapter", "/v1/unload_lora_adapter"] and "/v1/chat/completions" in served
    batcher, app = _server(tiny_model_dir, {}, updates=False, api_key=None)
    try:
        with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as plain:
            for refused in (_load(plain, "a", adapters / "a"), _unload(plain, "a")):
                assert "--allow-adapter-updates" in _error(refused, 404)["message"]
            assert [m["id"] for m in plain.get("/v1/models").json()["data"]] == ["tiny"]
            assert _listed_routes(plain) == served[:-2]
    finally:
        batcher.close()


@pytest.mark.parametrize("options", [[], ["--image-max-pixels", "4096"], ["--template", "chatml"]])
def test_a_loaded_adapter_gets_the_format_and_pixel_bounds_of_one_given_at_start(tiny_model_dir, adapters, tmp_path,
                                                                                options):
    """``qlora serve``'s settings of a loaded folder are those ``chat_formats`` and ``pixel_bounds`` give it as an
    ``--adapter``: its saved chat format and pixel bounds, the options over them; a bad bounds file is a 400 that
    leaves the model untouched."""
    from qlora.cli.commands.serve import adapter_settings, chat_formats, pixel_bounds
    from qlora.model.image_pixels import PixelBounds
    from qlora.model.load import load_tokenizer

    from qlora.train.data.templates import TEMPLATES

    folder = tmp_path / "v"
    shutil.copytree(adapters / "c", folder)
    PixelBounds(max_pixels=200_000, min_pixels=1000).save(folder)
    ChatFormat(template=TEMPLATES["alpaca"], origin="--template alpaca", name="alpaca", date="2024-05-06").save(folder)
    tokenizer = load_tokenizer(tiny_model_dir)
    given = _args(tiny_model_dir, "--adapter", f"v={folder}", *options)
    loaded = adapter_settings(_args(tiny_model_dir, *options), tokenizer)(folder)
    assert loaded == (chat_formats(given, tokenizer)["v"], pixel_bounds(given)["v"])
    assert loaded[1].min_pixels == 1000 and loaded[1].max_pixels == (4096 if options[:1] == ["--image-max-pixels"]
                                                                      else 200_000)
    assert loaded[0].name == ("chatml" if "chatml" in options else "alpaca")
    assert loaded[0].date == "2024-05-06"  # another template keeps the saved date (ChatFormat.keeping)


def test_a_bad_settings_file_leaves_the_model_as_it_was(adapters, updating, tmp_path):
    batcher, client, http = updating
    folder = tmp_path / "bad"
    shutil.copytree(adapters / "a", folder)
    (folder / "image_pixels.json").write_text('{"image_max_pixels": -1}')
    assert "image_pixels.json" in _error(_load(http, "bad", folder), 400)["message"]
    assert adapter_configs(batcher.model) == {} and [m.id for m in client.models.list().data] == ["tiny"]


def test_an_adapter_that_saved_modules_whole_loads_as_its_own_copies(tiny_model_dir, adapters, updating, tmp_path):
    """An adapter with ``modules_to_save`` (lm_head trained whole) loads beside the base as its own copy: it
    answers as a server started with it and another adapter, the base's replies are unchanged while it is
    loaded, and its unload leaves the model as it was."""
    from qlora.nn import SavedModules
    from qlora.serve.server import BackgroundServer

    _save_head_adapter(tiny_model_dir, tmp_path / "head", seed=5)

    batcher, at_start = _server(tiny_model_dir, {"a": adapters / "a", "head": tmp_path / "head"}, updates=False)
    with BackgroundServer(at_start) as server:
        oracle = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        expected = _chat(oracle, "head").choices[0].message.content
    batcher.close()

    batcher, client, http = updating
    before = {n: p.numel() for n, p in batcher.model.named_parameters()}
    base = _chat(client, "tiny").choices[0].message.content
    assert _load(http, "head", tmp_path / "head").status_code == 200
    assert isinstance(batcher.model.lm_head, SavedModules)
    assert _chat(client, "head").choices[0].message.content == expected != base
    assert _chat(client, "tiny").choices[0].message.content == base
    assert _unload(http, "head").status_code == 200
    assert not isinstance(batcher.model.lm_head, SavedModules)
    assert {n: p.numel() for n, p in batcher.model.named_parameters()} == before
    assert _chat(client, "tiny").choices[0].message.content == base


def test_bodies_of_the_wrong_type_and_names_that_cannot_be_ids_are_400s_naming_their_field(adapters, updating):
    """The bodies follow the other routes' strict types (``"5"`` for an integer is a 400); an empty, dotted or
    control-character ``lora_name`` is refused naming ``lora_name``, an empty ``lora_path`` (not the server's working
    directory) naming ``lora_path``; a unicode name with a space and a slash is a fine id. None touches the model."""
    batcher, client, http = updating
    before = {n: p.numel() for n, p in batcher.model.named_parameters()}
    typed = _error(http.post("/v1/unload_lora_adapter", json={"lora_name": "a", "lora_int_id": "5"}), 400)
    assert typed["param"] == "lora_int_id" and "expected an integer, but got a string" in typed["message"]
    for name in ("", "a.b", "a\nb", "a\x00b"):
        assert _error(_load(http, name, adapters / "a"), 400)["param"] == "lora_name", name
    empty = _error(http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": ""}), 400)
    assert empty["param"] == "lora_path" and "empty" in empty["message"]
    assert {n: p.numel() for n, p in batcher.model.named_parameters()} == before
    assert adapter_configs(batcher.model) == {} and [m.id for m in client.models.list().data] == ["tiny"]
    name = "équipe/sql v2"
    assert _load(http, name, adapters / "a").status_code == 200
    assert [m.id for m in client.models.list().data] == ["tiny", name] and _chat(client, name).choices
    assert _unload(http, name).status_code == 200


def test_an_unload_during_the_load_of_its_name_is_a_409_and_the_load_completes(tiny_model_dir, adapters):
    """While a load of ``a`` is under way (held in its settings read), an unload of ``a`` is a 409 saying it is being
    loaded, not a 404 that it does not exist; a request for ``a`` is vLLM's 404 ``model_not_found`` saying its load is
    under way (it said only that ``a`` does not exist), a second load of ``a`` a 400 saying so; the load then finishes
    and ``a`` answers."""
    from qlora.cli.commands.serve import adapter_settings
    from qlora.infer.batcher import ContinuousBatcher
    from qlora.serve.app import build_app
    from qlora.serve.server import BackgroundServer

    model, tokenizer = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    batcher = ContinuousBatcher(model.eval(), tokenizer, max_batch_size=2, context_length=128).start()
    settings, reading, go_on = adapter_settings(_args(tiny_model_dir), tokenizer), threading.Event(), threading.Event()

    def held(folder):
        reading.set()
        assert go_on.wait(60)
        return settings(folder)

    app = build_app(batcher, "tiny", [], api_key=None, adapter_settings=held)
    loaded = {}
    try:
        with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as http:
            thread = threading.Thread(target=lambda: loaded.setdefault("a", _load(http, "a", adapters / "a")))
            thread.start()
            try:
                assert reading.wait(60)
                busy = _error(_unload(http, "a"), 409)
                assert busy["code"] == "adapter_in_use" and "being loaded" in busy["message"]
                for early in (http.post("/v1/chat/completions", json={"model": "a", "messages": HELLO}),
                              http.post("/v1/completions", json={"model": "a", "prompt": "Hi"}),
                              http.post("/v1/responses", json={"model": "a", "input": "Hi"}), http.get("/v1/models/a")):
                    refused = _error(early, 404)
                    assert refused["code"] == "model_not_found" and "load" in refused["message"], refused
                    assert "under way" in refused["message"] and "retry" in refused["message"]
                again = _error(_load(http, "a", adapters / "a"), 400)["message"]
                assert "being loaded" in again
            finally:
                go_on.set()
                thread.join(60)
            assert loaded["a"].status_code == 200
            assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["tiny", "a"]
            assert _unload(http, "a").status_code == 200
    finally:
        batcher.close()


def test_a_whole_module_copy_of_another_vocabulary_is_refused_and_the_base_kept(tiny_model_dir, updating, tmp_path):
    """An adapter whose lm_head, trained whole (``modules_to_save``), has a row more than this base's (trained with a
    token added, its tokenizer not saved) is a 400 naming lm_head: loading it would resize the embeddings and head
    that every adapter and the base share. Parameter names, shapes and the base's reply stay as they were."""
    batcher, client, http = updating
    model, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    qlora.add_lora(model, r=4, dropout=0.0, verbose=False, target_modules=["q_proj"], modules_to_save=["lm_head"])
    qlora.save_adapter(model, tmp_path / "grown")
    tensors = load_file(tmp_path / "grown" / "adapter_model.safetensors")
    save_file({k: torch.cat([v, v[:1]]) if ".lm_head." in k else v for k, v in tensors.items()},
              tmp_path / "grown" / "adapter_model.safetensors")
    before = {n: p.shape for n, p in batcher.model.named_parameters()}
    base = _chat(client, "tiny").choices[0].message.content
    refused = _error(_load(http, "grown", tmp_path / "grown"), 400)["message"]
    assert "lm_head" in refused and "resize" in refused
    assert {n: p.shape for n, p in batcher.model.named_parameters()} == before
    assert _chat(client, "tiny").choices[0].message.content == base
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_updates_once_the_server_shuts_down_are_503s(tiny_model_dir, adapters):
    """A load or unload that reaches a server whose batcher is closed (shutting down) is a 503 ``server_shutdown``,
    as a chat request is, and leaves the adapters as they were."""
    from qlora.serve.server import BackgroundServer

    batcher, app = _server(tiny_model_dir, {"a": adapters / "a"}, api_key=None)
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        batcher.close()
        for refused in (_load(http, "c", adapters / "c"), _unload(http, "a")):
            assert _error(refused, 503)["code"] == "server_shutdown"
        assert sorted(adapter_configs(batcher.model)) == ["a"]


def test_a_load_checks_the_model_only_between_two_steps(tiny_model_dir, updating, tmp_path):
    """A load walks the model's parameters (to refuse base writes) only while the batcher is paused, as every load
    and unload changes them, so a concurrent one cannot change them under it (torch's "dictionary changed size during
    iteration", a 500): with the batcher held, even a refused load waits; released, it is answered."""
    batcher, client, http = updating
    folder = tmp_path / "head"
    model, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    qlora.add_lora(model, r=4, dropout=0.0, verbose=False, target_modules=["q_proj"])
    qlora.save_adapter(model, folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    save_file(tensors | {"base_model.model.lm_head.weight": torch.zeros_like(model.lm_head.weight)},
              folder / "adapter_model.safetensors")
    answered, got = threading.Event(), []
    thread = threading.Thread(target=lambda: (got.append(_load(http, "h", folder)), answered.set()))
    with batcher.paused():
        thread.start()
        assert not answered.wait(2)
    thread.join(60)
    assert answered.is_set() and "lm_head" in _error(got[0], 400)["message"]
    assert [m.id for m in client.models.list().data] == ["tiny"]


@pytest.mark.parametrize("dropped", ["lora_A", "lora_B"])
def test_an_adapter_file_missing_one_lora_matrix_is_refused(adapters, updating, tmp_path, dropped):
    """A file with a layer's lora_A but not its lora_B (or the reverse: a save cut short, a hand edit) is a 400 naming
    the layer, not loaded with the missing matrix at its initialization (zero B: silently the base there; random A:
    noise); the model is left as it was."""
    batcher, client, http = updating
    before = {n: p.shape for n, p in batcher.model.named_parameters()}
    cut = _broken(adapters, tmp_path, "cut", lambda t: {k: v for k, v in t.items()
                                                        if not ("layers.1.self_attn.v_proj" in k and dropped in k)})
    refused = _error(_load(http, "cut", cut), 400)["message"]
    assert "layers.1.self_attn.v_proj" in refused and f"not its {dropped}" in refused
    assert {n: p.shape for n, p in batcher.model.named_parameters()} == before
    assert [m.id for m in client.models.list().data] == ["tiny"]


def _snapshot(batcher) -> tuple:
    """The model as a later load or reply sees it: each module's path and type, each parameter's and buffer's values
    (and whether it trains), and its logits on a fixed input; read between two steps."""
    model = batcher.model
    with batcher.paused(), torch.inference_mode():
        modules = [(path, type(m).__name__) for path, m in model.named_modules()]
        tensors = {n: (t.detach().clone(), t.requires_grad) for n, t in [*model.named_parameters(),
                                                                          *model.named_buffers()]}
        logits = model(torch.tensor([[5, 6, 7, 8, 9]])).logits
    return modules, tensors, logits


def _same(before: tuple, after: tuple) -> bool:
    (modules, tensors, logits), (modules2, tensors2, logits2) = before, after
    return (modules == modules2 and tensors.keys() == tensors2.keys() and torch.equal(logits, logits2)
            and all(torch.equal(t, tensors2[n][0]) and grad == tensors2[n][1] for n, (t, grad) in tensors.items()))


def test_a_load_that_fails_midway_leaves_the_model_as_it_was(tiny_model_dir, updating, tmp_path):
    """A load refused once its layers were added (a tensor of another shape, found while its tensors are copied)
    takes them out again, wrappers included: modules, parameters, buffers and logits equal those before (it left an
    empty LoRA wrapper on each layer it adapts, here lm_head). So an adapter that trains lm_head whole loads after it
    (it was refused: lm_head "adapted with LoRA" by adapters []), and its unload puts the model back as it was too (it
    left empty wrappers on the layers it adapted)."""
    batcher, client, http = updating
    model, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    qlora.add_lora(model, r=4, dropout=0.0, verbose=False, target_modules=["q_proj", "lm_head"])
    qlora.save_adapter(model, tmp_path / "bad")
    tensors = load_file(tmp_path / "bad" / "adapter_model.safetensors")
    save_file({k: torch.zeros(v.shape[0] + 1, v.shape[1]) if "lm_head.lora_B" in k else v for k, v in tensors.items()},
              tmp_path / "bad" / "adapter_model.safetensors")
    _save_head_adapter(tiny_model_dir, tmp_path / "head", seed=7)

    before, base = _snapshot(batcher), _chat(client, "tiny").choices[0].message.content
    refused = _error(_load(http, "bad", tmp_path / "bad"), 400)["message"]
    assert "shape" in refused and "lm_head" in refused
    assert _same(before, _snapshot(batcher)) and adapter_configs(batcher.model) == {}
    assert _load(http, "head", tmp_path / "head").status_code == 200
    assert _chat(client, "head").choices[0].message.content != base == _chat(client, "tiny").choices[0].message.content
    assert _unload(http, "head").status_code == 200
    assert _same(before, _snapshot(batcher))


def test_an_adalora_adapter_given_at_start_runs_on_its_rows_alone_and_unloads(tiny_model_dir, tmp_path):
    """An AdaLoRA adapter served from the start changes its own requests' replies, not the base's beside it (its
    layers ran for every row of the batch: the base's reply was the adapter's), and unloads: the model is then as
    loaded without it (the unload was a 400, "only LoRA/DoRA adapters can be deleted")."""
    from qlora.model.adalora import adalora_layers, add_adalora
    from qlora.serve.server import BackgroundServer

    model, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    add_adalora(model, init_r=4, target_r=2, total_step=2, target_modules=["q_proj", "v_proj"], verbose=False)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for layer in adalora_layers(model).values():
            layer.E.copy_(torch.randn(layer.E.shape, generator=g))
            layer.B.mul_(30)
    qlora.save_adapter(model, tmp_path / "ada")

    batcher, plain = _server(tiny_model_dir, {})
    fresh = _snapshot(batcher)
    with BackgroundServer(plain) as server:
        base = _chat(openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60),
                     "tiny").choices[0].message.content
    batcher.close()
    batcher, app = _server(tiny_model_dir, {"ada": tmp_path / "ada"})
    try:
        with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=60,
                                                           headers={"Authorization": f"Bearer {KEY}"}) as http:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
            own = _chat(client, "ada").choices[0].message.content
            assert own != base and _chat(client, "tiny").choices[0].message.content == base
            assert _unload(http, "ada").status_code == 200
            assert [m.id for m in client.models.list().data] == ["tiny"]
            assert _same(fresh, _snapshot(batcher)) and adapter_configs(batcher.model) == {}
            assert _chat(client, "tiny").choices[0].message.content == base
            refused = _error(_load(http, "ada", tmp_path / "ada"), 400)["message"]
            assert "AdaLoRA" in refused and "--adapter" in refused
    finally:
        batcher.close()
