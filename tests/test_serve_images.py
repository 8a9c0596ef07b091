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
    for kind in ("gemma3", "llava_next"):
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


@pytest.mark.parametrize("kind", ["gemma3", "llava_next"])
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
