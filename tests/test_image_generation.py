"""Generation from images: ``qlora generate --image`` and ``/image`` in ``qlora chat`` with an adapter trained on
images.

Oracle: transformers' own ``model.generate(**processor(...), do_sample=False)`` on the 16-bit base with the
adapter merged by PEFT, the prompt rendered by the processor's chat template; its greedy tokens up to the first
end-of-turn token, decoded, are what the CLI prints.
"""

from __future__ import annotations

import base64
import inspect
import json

import pytest
import torch
from transformers import AutoModelForImageTextToText

from qlora.cli.main import main
from image_models import FAMILIES, KINDS, build_image_model, kind_params, oracle_processor, render, write_png

QUESTION = "what is in the picture?"
NEW = 10


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """kind -> (base folder, adapter folder trained on images)."""
    root = tmp_path_factory.mktemp("image-gen")
    (root / "img").mkdir()
    write_png(root / "img" / "a.png", 40, 30, 0)
    write_png(root / "img" / "b.png", 50, 60, 1)
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": f"img/{name}"},
                                                       {"type": "text", "text": QUESTION}]},
                          {"role": "assistant", "content": answer}]}
            for name, answer in (("a.png", "a red square"), ("b.png", "two green circles"))]
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = {}
    for kind in KINDS:
        model = build_image_model(root / kind, kind)
        assert main(["train", "--model", str(model), "--data", str(data), "--output", str(root / f"{kind}-run"),
                     "--quant", "none", "--precision", "fp32", "--max-steps", "3", "--batch-size", "2", "--lr",
                     "1e-2", "--no-progress"]) == 0
        out[kind] = (model, root / f"{kind}-run")
    return out, root / "img"


def _oracle(model_dir, adapter, images, content, whole=False):
    """transformers' greedy reply text (up to the first end-of-turn token) on the merged model; ``whole``: its
    NEW token ids, not stopped by any token."""
    from peft import PeftModel
    from PIL import Image

    processor = oracle_processor(model_dir)
    base = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()
    text = render(processor, [{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.open(p).convert("RGB") for p in images], add_special_tokens=False,
                       return_tensors="pt")
    if "mm_token_type_ids" not in inspect.signature(model.forward).parameters:
        inputs.pop("mm_token_type_ids", None)  # LFM3-VL's processor returns them, its forward (and generate) does not
    if whole:
        model.generation_config.eos_token_id = None
    tokens = model.generate(**inputs, do_sample=False, max_new_tokens=NEW)[0, inputs["input_ids"].shape[1]:].tolist()
    if whole:
        return tokens
    tok = processor.tokenizer
    stops = {tok.eos_token_id} | {tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<end_of_turn>",
                                                                          "<end_of_utterance>") if t in tok.get_vocab()}
    end = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
    return tok.decode(tokens[:end], skip_special_tokens=True)


def _generate(model, adapter, *extra):
    return main(["generate", "--model", str(model), "--adapter", str(adapter), "--quant", "none", "--compute-dtype",
                 "fp32", "--temperature", "0", "--max-new-tokens", str(NEW), *extra])


@pytest.mark.parametrize("kind", kind_params(FAMILIES))
def test_generate_with_an_image_gives_transformers_greedy_tokens(kind, trained, capsys):
    models, img = trained
    model, adapter = models[kind]
    capsys.readouterr()
    assert _generate(model, adapter, "--prompt", QUESTION, "--image", str(img / "a.png")) == 0
    ours = capsys.readouterr().out
    content = [{"type": "image"}, {"type": "text", "text": QUESTION}]
    assert ours == _oracle(model, adapter, [img / "a.png"], content) + "\n"


@pytest.mark.parametrize("kind", kind_params(FAMILIES))
def test_decoding_loop_tokens_past_the_end_of_turn_equal_transformers(kind, trained):
    """The image tensors go into the prefill only; every later step runs on the cache, as generate's."""
    from qlora.chat.images import resolve_image
    from qlora.infer.generate import SamplingOptions, stream_tokens
    from qlora.infer.images import encode_with_images, image_processor
    from qlora.infer.messages import Message
    from qlora.infer.template import render_chat
    from qlora.model.adapter_io import load_adapter
    from qlora.model.load import load_model

    models, img = trained
    model_dir, adapter = models[kind]
    model, tokenizer = load_model(model_dir, quant=None, compute_dtype=torch.float32)
    load_adapter(model, adapter)
    user = Message("user", QUESTION, images=(resolve_image(str(img / "b.png"), "test"),))
    ids, media = encode_with_images(image_processor(model, tokenizer, model_dir, "test"), model,
                                    render_chat(tokenizer, [user]), user.images)
    ours = list(stream_tokens(model.eval(), ids, SamplingOptions(max_new_tokens=NEW, temperature=0), (), media))
    content = [{"type": "image"}, {"type": "text", "text": QUESTION}]
    assert ours == _oracle(model_dir, adapter, [img / "b.png"], content, whole=True)


@pytest.mark.parametrize("kind", kind_params(("gemma4", "lfm3_vl", "qwen3_5", "qwen2_vl", "llava")))
def test_a_merged_folder_loads_in_transformers_as_the_peft_merged_model(kind, trained, tmp_path):
    """``qlora merge`` of an adapter trained on images: transformers loads the folder as the base's model type, and
    its logits on an image row are PEFT's merged model's (Gemma 4's merged config.json, with transformers 4's rope
    keys beside its per-layer-type ones, failed to load, LFM3-VL's with a KeyError: test_transformers4_compat.py)."""
    from peft import PeftModel
    from PIL import Image
    from transformers import AutoConfig

    models, img = trained
    model_dir, adapter = models[kind]
    assert main(["merge", "--model", str(model_dir), "--adapter", str(adapter), "--output", str(tmp_path / "merged"),
                 "--quant", "none", "--dtype", "float32"]) == 0
    assert AutoConfig.from_pretrained(tmp_path / "merged").model_type == AutoConfig.from_pretrained(model_dir).model_type
    processor = oracle_processor(model_dir)
    text = render(processor, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
                  add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.open(img / "a.png").convert("RGB")], add_special_tokens=False,
                       return_tensors="pt")
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    base = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()
    assert type(merged) is type(peft)
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, peft(**inputs).logits, atol=1e-5, rtol=1e-5)


def test_placeholders_place_two_images_and_data_uris_read(trained, capsys):
    models, img = trained
    model, adapter = models["gemma3"]
    uri = "data:image/png;base64," + base64.b64encode((img / "b.png").read_bytes()).decode()
    capsys.readouterr()
    assert _generate(model, adapter, "--prompt", "first <image> then <image> compare", "--image",
                     str(img / "a.png"), "--image", uri) == 0
    content = [{"type": "text", "text": "first "}, {"type": "image"}, {"type": "text", "text": " then "},
               {"type": "image"}, {"type": "text", "text": " compare"}]
    assert capsys.readouterr().out == _oracle(model, adapter, [img / "a.png", img / "b.png"], content) + "\n"


def test_four_bit_base_with_an_image(trained, capsys):
    models, img = trained
    model, adapter = models["llava"]
    assert main(["generate", "--model", str(model), "--adapter", str(adapter), "--quant", "nf4", "--temperature",
                 "0", "--max-new-tokens", "4", "--prompt", QUESTION, "--image", str(img / "a.png")]) == 0
    assert "Traceback" not in capsys.readouterr().err


def test_bad_images_exit_2_with_one_paragraph(trained, tiny_model_dir, tmp_path, capsys):
    models, img = trained
    model, adapter = models["idefics3"]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    cases = [(["--image", str(tmp_path / "missing.png")], "--image: image '"),
             (["--image", str(tmp_path / "broken.png")], "is not an image Pillow can read"),
             (["--image", str(img / "a.png"), "--image", str(img / "b.png"), "--prompt", "one <image> only"],
              "--prompt: the text has 1 <image> placeholders for 2 images"),
             (["--image", str(img / "a.png"), "--template", "none"], "--image with --template none")]
    for extra, said in cases:
        args = ["--prompt", QUESTION, *extra] if "--prompt" not in extra else extra
        assert _generate(model, adapter, *args) == 2
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err, err
    assert main(["generate", "--model", str(tiny_model_dir), "--quant", "none", "--prompt", QUESTION, "--image",
                 str(img / "a.png")]) == 2
    err = capsys.readouterr().err
    assert f"--image {img / 'a.png'}: images were given, but {tiny_model_dir}" in err and "no vision tower" in err
    assert "Traceback" not in err


def test_chat_image_command_attaches_to_the_next_message(trained, monkeypatch, capsys):
    import io

    models, img = trained
    model, adapter = models["gemma3"]
    lines = [f"/image {img / 'missing.png'}", f"/image {img / 'a.png'}", QUESTION, "and the colours?", "/exit"]
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(line + "\n" for line in lines)))
    capsys.readouterr()
    assert main(["chat", "--model", str(model), "--adapter", str(adapter), "--quant", "none", "--compute-dtype",
                 "fp32", "--temperature", "0", "--max-new-tokens", str(NEW)]) == 0
    out = capsys.readouterr().out
    assert "(/image: image '" in out and "not found" in out  # a bad image is said; the chat goes on
    assert "(image 1 attached to your next message" in out
    replies = [line.split("assistant> ", 1)[1] for line in out.splitlines() if "assistant> " in line]
    content = [{"type": "image"}, {"type": "text", "text": QUESTION}]
    assert replies[0] == _oracle(model, adapter, [img / "a.png"], content)
    assert len(replies) == 2


def test_chat_images_go_with_one_message_even_when_its_turn_is_not_saved(tmp_path, monkeypatch, capsys):
    """The images attached with /image are sent with the next message only, also when the store then fails."""
    import io
    from types import SimpleNamespace

    from qlora.cli.commands import chat as chat_command
    from qlora.infer.store import StoreLocked

    sent = []

    def send(text, images=()):
        sent.append((text, [ref.shown for ref in images]))
        yield "ok"
        raise StoreLocked("locked")

    chat = SimpleNamespace(llm=SimpleNamespace(processor=object()), send=send, pending_calls=[], last_reply="ok")
    write_png(tmp_path / "a.png", 8, 8, 0)
    lines = [f"/image {tmp_path / 'a.png'}", "what is it?", "and now?", "/exit"]
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(line + "\n" for line in lines)))
    chat_command._loop(chat, SimpleNamespace(model="m"))
    assert sent == [("what is it?", [str(tmp_path / "a.png")]), ("and now?", [])]
    assert capsys.readouterr().err.count("turn not saved") == 2


class _Failing:
    """A processor failing on every call with ``error`` (as a processor does on input it cannot take)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def __call__(self, *args, **kwargs):
        raise self.error


@pytest.mark.parametrize("error", [IndexError("index 3 is out of bounds for axis 0 with size 3"),
                                   RuntimeError("cannot reshape tensor of 0 elements"), ZeroDivisionError()])
def test_a_processor_failing_on_the_input_exits_2_naming_its_error(error, tmp_path, monkeypatch, capsys):
    import qlora.infer.images as images

    folder = build_image_model(tmp_path / "g", "gemma3")
    monkeypatch.setattr(images, "image_processor", lambda *args, **kwargs: _Failing(error))
    capsys.readouterr()
    assert main(["generate", "--model", str(folder), "--quant", "none", "--max-new-tokens", "2", "--prompt", QUESTION,
                 "--image", str(write_png(tmp_path / "a.png", 40, 30, 0))]) == 2
    err = capsys.readouterr().err
    said = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    assert f"the model's processor (_Failing) cannot take 1 image(s) with this text ({said})" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_wrong_call_of_the_processor_is_not_reported_as_bad_input(tmp_path, monkeypatch):
    """A TypeError (a wrong call, a processor that does not match transformers) is a bug: it propagates."""
    import qlora.infer.images as images

    folder = build_image_model(tmp_path / "g", "gemma3")
    error = TypeError("__call__() got an unexpected keyword argument 'add_special_tokens'")
    monkeypatch.setattr(images, "image_processor", lambda *args, **kwargs: _Failing(error))
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        main(["generate", "--model", str(folder), "--quant", "none", "--max-new-tokens", "2", "--prompt", QUESTION,
              "--image", str(write_png(tmp_path / "a.png", 40, 30, 0))])


def _chat_lines(monkeypatch, capsys, model, lines, *extra):
    """``qlora chat`` on ``model`` reading ``lines``: (exit code, its replies, stdout, stderr)."""
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("".join(line + "\n" for line in lines)))
    capsys.readouterr()
    code = main(["chat", "--model", str(model), "--quant", "none", "--compute-dtype", "fp32", "--temperature", "0",
                 "--max-new-tokens", str(NEW), *extra])
    out, err = capsys.readouterr()
    return code, [line.split("assistant> ", 1)[1] for line in out.splitlines() if "assistant> " in line], out, err


def test_a_resumed_session_sends_its_images_again_wherever_the_file_went(tmp_path, monkeypatch, capsys,
                                                                         tiny_model_dir):
    """A stored session keeps the images of its turns (their bytes): resumed, the model is shown them again,
    so its next reply is the one the unbroken chat gives, though the image file was deleted meanwhile. A stored
    image that no longer reads is said and left out; a text-only model cannot resume the session (exit 2)."""
    import sqlite3

    model = build_image_model(tmp_path / "g", "gemma3")
    image = write_png(tmp_path / "a.png", 40, 30, 0)
    later = "and the colours?"
    code, unbroken, _, _ = _chat_lines(monkeypatch, capsys, model, [f"/image {image}", QUESTION, later, "/exit"])
    assert code == 0 and len(unbroken) == 2
    db = tmp_path / "chats.sqlite"
    session = ["--session", "s", "--db", str(db)]
    code, first, _, _ = _chat_lines(monkeypatch, capsys, model, [f"/image {image}", QUESTION, "/exit"], *session)
    assert code == 0 and first == unbroken[:1]
    image.unlink()
    code, resumed, out, err = _chat_lines(monkeypatch, capsys, model, [later, "/exit"], *session)
    assert code == 0 and resumed == unbroken[1:] and "resumed session 's': 2 messages" in out, err
    # without its image the reply differs: the image is what made it equal
    code, text_only, _, _ = _chat_lines(monkeypatch, capsys, model, [QUESTION, later, "/exit"])
    assert text_only[1] != unbroken[1]

    code, _, _, err = _chat_lines(monkeypatch, capsys, tiny_model_dir, ["/exit"], *session)
    assert code == 2 and f"--session s: the session holds images, but {tiny_model_dir}" in err
    assert "no vision tower" in err and "Traceback" not in err

    conn = sqlite3.connect(db)
    conn.execute("UPDATE messages SET images = json_set(images, '$[0].data', 'data:image/png;base64,AAAA')")
    conn.commit()
    conn.close()
    code, _, out, err = _chat_lines(monkeypatch, capsys, model, ["/exit"], *session)
    assert code == 0 and "Traceback" not in err
    assert f"message 1 (image 1): image {str(image)!r} is not an image Pillow can read" in err
    assert "It is left out of the conversation." in err
