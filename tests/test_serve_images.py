"""Image parts served by ``qlora serve`` (chat completions' ``image_url``, the Responses API's ``input_image``),
through the real ``openai`` client.

Oracle: ``qlora generate --image`` (whose greedy tokens equal transformers' generate, tests/test_image_generation.py)
on the same NF4 base and adapter: the served reply is its text, while text requests share the batch.
"""

from __future__ import annotations

import base64
import json
import threading

import pytest
import torch

import qlora
from qlora.cli.main import main
from image_models import build_image_model, write_png

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
QUESTION, NEW = "what is in the picture?", 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-images")
    image = write_png(root / "a.png", 40, 30, 0)
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                       {"type": "text", "text": QUESTION}]},
                          {"role": "assistant", "content": "a red square"}]}]
    data = root / "chat.jsonl"
    data.write_text(json.dumps(rows[0]) + "\n")
    out = {}
    for kind in ("gemma3", "llava_next", "internvl"):
        model = build_image_model(root / kind, kind)
        assert main(["train", "--model", str(model), "--data", str(data), "--output", str(root / f"{kind}-run"),
                     "--quant", "none", "--max-steps", "2", "--batch-size", "1", "--lr", "1e-2", "--no-progress"]) == 0
        out[kind] = (model, root / f"{kind}-run")
    return out, image


def _serve(model_dir, adapter=None):
    from qlora.infer.batcher import ContinuousBatcher
    from qlora.serve.app import build_app
    from qlora.serve.server import BackgroundServer

    model, tokenizer = qlora.load_model(model_dir, compute_dtype=torch.float32, device="cpu")
    if adapter is not None:
        qlora.load_adapter(model, adapter, adapter_name="img")
    batcher = ContinuousBatcher(model.eval(), tokenizer, context_length=512).start()
    return batcher, BackgroundServer(build_app(batcher, "base", ["img"] if adapter else [], model_dir=str(model_dir)))


def _uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.mark.parametrize("kind", ["gemma3", "llava_next", "internvl"])  # InternVL: a processor for images alone
def test_served_image_replies_equal_generate(kind, setup, capsys):
    models, image = setup
    model_dir, adapter = models[kind]
    capsys.readouterr()
    assert main(["generate", "--model", str(model_dir), "--adapter", str(adapter), "--quant", "nf4", "--compute-dtype", "fp32",
                 "--temperature", "0", "--max-new-tokens", str(NEW), "--prompt", QUESTION, "--image", str(image)]) == 0
    expected = capsys.readouterr().out[:-1]
    content = [{"type": "image_url", "image_url": {"url": _uri(image)}}, {"type": "text", "text": QUESTION}]
    batcher, server = _serve(model_dir, adapter)
    with server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
        texts = {}

        def text_request():  # a text row decoded beside the image row
            texts["t"] = client.chat.completions.create(model="img", messages=[{"role": "user", "content": "hello"}],
                                                        max_tokens=NEW, temperature=0).choices[0].message.content

        other = threading.Thread(target=text_request)
        other.start()
        reply = client.chat.completions.create(model="img", messages=[{"role": "user", "content": content}],
                                               max_tokens=NEW, temperature=0)
        other.join()
        assert reply.choices[0].message.content == expected
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="img", messages=[{"role": "user", "content": content}], max_tokens=NEW, temperature=0, stream=True)
            if c.choices)
        assert streamed == expected
        response = client.responses.create(model="img", input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": _uri(image)}, {"type": "input_text", "text": QUESTION}]}],
            max_output_tokens=NEW, temperature=0)
        assert response.output_text == expected
        alone = client.chat.completions.create(model="img", messages=[{"role": "user", "content": "hello"}],
                                               max_tokens=NEW, temperature=0).choices[0].message.content
        assert texts["t"] == alone
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="img", max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}])
        assert err.value.status_code == 400 and "only data: URIs are read" in err.value.body["message"]
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="img", max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}]}])
        assert "is not an image Pillow can read" in err.value.body["message"]
    batcher.close()


def test_images_to_a_text_only_model_are_a_400_naming_it(setup, tiny_model_dir):
    _, image = setup
    batcher, server = _serve(tiny_model_dir)
    with server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="base", max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": _uri(image)}}, {"type": "text", "text": "hi"}]}])
        message = err.value.body["message"]
        assert "The model 'base' cannot take these images" in message and "has no vision tower" in message
    batcher.close()


class _Gated:
    """The model's processor (``processor``, set when the server loads it), held at each call until ``release`` is
    set (``entered`` says a call is held), then raising ``error`` if one is set."""

    def __init__(self) -> None:
        self.processor, self.error = None, None
        self.entered, self.release, self.waited_out = threading.Event(), threading.Event(), False

    def __call__(self, *args, **kwargs):
        self.entered.set()
        if not self.release.wait(30):
            self.waited_out = True  # nobody released it: the test's stream did not finish meanwhile
        if self.error is not None:
            raise self.error
        return self.processor(*args, **kwargs)


@pytest.fixture
def gated(tmp_path, monkeypatch):
    """A server for an untrained Gemma 3 whose processor is held by a :class:`_Gated`, that gate, and an image."""
    import qlora.infer.images as images

    folder, gate, real = build_image_model(tmp_path / "g", "gemma3"), _Gated(), images.image_processor

    def gated_processor(*args):
        gate.processor = real(*args)
        return gate

    monkeypatch.setattr(images, "image_processor", gated_processor)
    batcher, server = _serve(folder)
    with server:
        yield batcher, server, gate, write_png(tmp_path / "a.png", 40, 30, 0)
    batcher.close()


def test_streams_go_on_while_a_request_s_images_are_processed(gated):
    """Setting a request up (its images through the processor) runs off the event loop: a stream decoded
    meanwhile is written to its client to the end while the processor is still held."""
    batcher, server, gate, image = gated
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    content = [{"type": "image_url", "image_url": {"url": _uri(image)}}, {"type": "text", "text": QUESTION}]
    replies = {}

    def image_request():
        replies["image"] = client.chat.completions.create(model="base", messages=[{"role": "user", "content": content}],
                                                          max_tokens=NEW, temperature=0).choices[0].message.content

    with batcher.paused():  # the stream's tokens all come after the image request is held in its processor
        stream = iter(client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hello"}],
                                                     max_tokens=NEW, temperature=0, stream=True))
        assert next(stream).choices[0].delta.role == "assistant"
        other = threading.Thread(target=image_request)
        other.start()
        assert gate.entered.wait(60)
    chunks = list(stream)
    finished_while_held = not gate.waited_out
    gate.release.set()
    other.join()
    assert finished_while_held and chunks[-1].choices[0].finish_reason in ("stop", "length")
    alone = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hello"}],
                                           max_tokens=NEW, temperature=0).choices[0].message.content
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == alone
    again = client.chat.completions.create(model="base", messages=[{"role": "user", "content": content}],
                                           max_tokens=NEW, temperature=0).choices[0].message.content
    assert replies["image"] == again and not gate.waited_out


def test_a_processor_failing_on_the_input_is_a_400_naming_its_error(gated):
    _, server, gate, image = gated
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _uri(image)}},
                                             {"type": "text", "text": QUESTION}]}]
    gate.release.set()
    assert client.chat.completions.create(model="base", messages=messages, max_tokens=2).choices[0].finish_reason
    gate.error = IndexError("index 3 is out of bounds for axis 0 with size 3")
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="base", messages=messages, max_tokens=2)
    assert err.value.body["param"] == "messages" and err.value.body["message"].startswith(
        "The model 'base' cannot take these images: the model's processor (_Gated) cannot take 1 image(s) with this "
        "text (IndexError: index 3 is out of bounds for axis 0 with size 3).")
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="base", input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": _uri(image)}, {"type": "input_text", "text": QUESTION}]}])
    assert err.value.body["param"] == "input" and "(IndexError: index 3 is out" in err.value.body["message"]
    gate.error = TypeError("__call__() got an unexpected keyword argument 'add_special_tokens'")
    with pytest.raises(openai.InternalServerError) as err:  # a wrong call is a bug, not the client's input
        client.chat.completions.create(model="base", messages=messages, max_tokens=2)
    assert "TypeError: __call__() got an unexpected keyword argument" in err.value.body["message"]


def _setup_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("qlora-serve-setup")}


def test_shutdown_ends_the_setup_thread_without_waiting_for_a_request_held_in_setup(gated):
    """The thread setting requests up is shut down with the server: a shutdown while a request is held in its
    processor does not wait for it, and the thread ends once that request's setup returns."""
    import time

    _, server, gate, image = gated
    before = _setup_threads()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    content = [{"type": "image_url", "image_url": {"url": _uri(image)}}, {"type": "text", "text": QUESTION}]
    outcome = {}

    def image_request():
        try:
            client.chat.completions.create(model="base", messages=[{"role": "user", "content": content}], max_tokens=2)
        except openai.APIError as exc:  # the server went away while the request was held
            outcome["error"] = exc

    held = threading.Thread(target=image_request)
    held.start()
    assert gate.entered.wait(60)
    (ours,) = _setup_threads() - before
    start = time.monotonic()
    server.__exit__(None, None, None)
    stopped = time.monotonic() - start
    assert not server.thread.is_alive() and stopped < 20, f"shutdown took {stopped:.1f} s"
    assert ours.is_alive()  # still in the held processor call
    gate.release.set()
    held.join(60)
    ours.join(30)
    assert not ours.is_alive() and "error" in outcome
