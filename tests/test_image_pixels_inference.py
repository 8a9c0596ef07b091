"""A run's image pixel bounds saved with its adapter and applied where the model is shown images again: qlora eval,
generate --image, chat /image, serve (per adapter), a merged folder; LLaMA-Factory's Qwen2-VL resize rules.

Oracles: LLaMA-Factory's resize as its mm_plugin.py states it (the two bounds, then its Qwen2-VL plugin's rules: a
side under 28 raised to 28, a width or height over 200 times the other cut to 180 times it), written here from that
math; transformers' processor on images so resized gives the ids and image tensors the model must see.
"""

from __future__ import annotations

import base64
import io
import json
import math
import shutil

import pytest
import torch
from PIL import Image

from qlora.cli.main import build_parser, main
from image_models import build_image_model, oracle_processor, render, write_png

QUESTION = "what is in the picture?"
HIGH = 4000  # the training run's --image-max-pixels


def _lf_size(width: int, height: int, max_pixels: int = 0, min_pixels: int = 0,
             qwen2_vl: bool = False) -> tuple[int, int]:
    """The size LLaMA-Factory's image regularization gives an image."""
    if max_pixels and width * height > max_pixels:
        factor = math.sqrt(max_pixels / (width * height))
        width, height = int(width * factor), int(height * factor)
    if min_pixels and width * height < min_pixels:
        factor = math.sqrt(min_pixels / (width * height))
        width, height = int(width * factor), int(height * factor)
    if qwen2_vl:
        if min(width, height) < 28:
            width, height = max(width, 28), max(height, 28)
        if width / height > 200:
            width = height * 180
        if height / width > 200:
            height = width * 180
    return width, height


def _rows(image: str) -> str:
    row = {"messages": [{"role": "user", "content": [{"type": "image", "image": image},
                                                     {"type": "text", "text": QUESTION}]},
                        {"role": "assistant", "content": "a red square"}]}
    return json.dumps(row) + "\n"


def _train(model, data, out, *extra) -> None:
    assert main(["train", "--model", str(model), "--data", str(data), "--output", str(out), "--quant", "none",
                 "--precision", "fp32", "--max-steps", "2", "--batch-size", "1", "--no-progress", *extra]) == 0


@pytest.fixture(scope="module")
def qwen_run(tmp_path_factory):
    """(root, base folder, adapter trained with --image-max-pixels HIGH, the 200x150 image)."""
    root = tmp_path_factory.mktemp("bounds")
    image = write_png(root / "big.png", 200, 150, 0)
    data = root / "rows.jsonl"
    data.write_text(_rows("big.png"))
    model = build_image_model(root / "qwen", "qwen2_vl")
    _train(model, data, root / "run", "--image-max-pixels", str(HIGH), "--save-steps", "1")
    return root, model, root / "run", image


@pytest.fixture
def seen(monkeypatch):
    """The images (sizes) and ids each processor call of inference and eval got, recorded around the real call."""
    import qlora.infer.images
    import qlora.chat.image_examples
    from qlora.model.image_processor import process

    calls = []

    def spy(processor, text, images, *args, **kwargs):
        encoded = process(processor, text, images, *args, **kwargs)
        calls.append(([image.size for image in images], encoded["input_ids"][0].tolist(), text, images))
        return encoded

    monkeypatch.setattr(qlora.infer.images, "process", spy)
    monkeypatch.setattr(qlora.chat.image_examples, "process", spy)
    return calls


def _generate(model, *extra) -> int:
    return main(["generate", "--model", str(model), "--quant", "none", "--compute-dtype", "fp32", "--temperature", "0",
                 "--max-new-tokens", "2", "--prompt", QUESTION, *extra])


def _oracle_ids(model, image_path, size) -> list[int]:
    processor = oracle_processor(model)
    image = Image.open(image_path)
    image = (image if image.size == size else image.resize(size)).convert("RGB")
    text = render(processor, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
                  add_generation_prompt=True)
    return processor(text=[text], images=[image], add_special_tokens=False, return_tensors="pt")["input_ids"][0].tolist()


def test_the_bounds_are_saved_with_the_adapter_and_its_checkpoints_and_peft_loads_it(qwen_run):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    root, model, run, _ = qwen_run
    saved = {"image_max_pixels": HIGH, "image_min_pixels": 0, "image_resize": "none"}
    assert json.loads((run / "image_pixels.json").read_text()) == saved
    checkpoints = sorted((run / "checkpoints").glob("step-*/adapter/image_pixels.json"))
    assert checkpoints and all(json.loads(p.read_text()) == saved for p in checkpoints)
    PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(model), run)  # the folder loads unchanged


def test_a_run_without_bounds_saves_no_file(qwen_run, tmp_path):
    root, model, _, _ = qwen_run
    _train(model, root / "rows.jsonl", tmp_path / "plain")
    assert not (tmp_path / "plain" / "image_pixels.json").exists()


def test_a_text_only_run_with_bounds_saves_none_and_resumes_a_checkpoint_from_before_bounds(
        qwen_run, tmp_path, caplog):
    """Bounds (a LLaMA-Factory file's defaults) bound nothing in a run without images: no file beside its adapter;
    its checkpoint written before qlora had bounds resumes, saying what changes if the run had images."""
    _, model, _, _ = qwen_run
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"say {i}", "output": f"{i}"}) + "\n" for i in range(4)))
    out = tmp_path / "text"
    _train(model, data, out, "--image-max-pixels", "589824", "--save-steps", "1")
    assert not list(out.rglob("image_pixels.json"))
    first, last = sorted((out / "checkpoints").iterdir())
    config = first / "run_config.json"
    old = {k: v for k, v in json.loads(config.read_text()).items() if not k.startswith("image_")}
    config.write_text(json.dumps(old))
    shutil.rmtree(last)
    caplog.set_level("WARNING", logger="qlora")
    _train(model, data, out, "--image-max-pixels", "589824", "--save-steps", "1", "--resume")
    assert "written before qlora bounded images (image_max_pixels 589824)" in caplog.text


def test_generate_shows_the_image_bounded_as_training_did(qwen_run, seen, capsys):
    root, model, run, image = qwen_run
    assert _generate(model, "--adapter", str(run), "--image", str(image)) == 0
    bounded = _lf_size(200, 150, HIGH)
    assert seen[-1][0] == [bounded] and seen[-1][1] == _oracle_ids(model, image, bounded)
    assert len(seen[-1][1]) != len(_oracle_ids(model, image, (200, 150)))  # the bound changes the image tokens


@pytest.mark.parametrize("extra, size", [(["--image-max-pixels", "0"], (200, 150)),
                                         (["--image-max-pixels", "2000"], _lf_size(200, 150, 2000)),
                                         (["--image-min-pixels", "3500"], _lf_size(200, 150, HIGH, 3500))])
def test_the_options_replace_the_saved_bounds(qwen_run, seen, extra, size):
    root, model, run, image = qwen_run
    assert _generate(model, "--adapter", str(run), "--image", str(image), *extra) == 0
    assert seen[-1][0] == [size] and seen[-1][1] == _oracle_ids(model, image, size)


def test_a_minimum_over_the_saved_maximum_is_refused(qwen_run, capsys):
    root, model, run, image = qwen_run
    assert _generate(model, "--adapter", str(run), "--image", str(image), "--image-min-pixels", "50000") == 2
    err = capsys.readouterr().err
    assert f"--image-max-pixels ({HIGH}) is below --image-min-pixels (50000" in err and "Traceback" not in err


def test_an_adapter_saved_without_bounds_shows_the_image_as_stored(qwen_run, seen, tmp_path):
    root, model, run, image = qwen_run
    old = shutil.copytree(run, tmp_path / "old", ignore=shutil.ignore_patterns("checkpoints"))
    (old / "image_pixels.json").unlink()
    assert _generate(model, "--adapter", str(old), "--image", str(image)) == 0
    assert seen[-1][0] == [(200, 150)] and seen[-1][1] == _oracle_ids(model, image, (200, 150))


def test_a_broken_bounds_file_is_named(qwen_run, tmp_path, capsys):
    root, model, run, image = qwen_run
    bad = shutil.copytree(run, tmp_path / "bad", ignore=shutil.ignore_patterns("checkpoints"))
    (bad / "image_pixels.json").write_text('{"image_max_pixels": -3}')
    assert _generate(model, "--adapter", str(bad), "--image", str(image)) == 2
    err = capsys.readouterr().err
    assert f"{bad / 'image_pixels.json'}: not a valid image pixel bounds file" in err and "Traceback" not in err


def test_chat_image_is_bounded_as_training_did(qwen_run, seen, monkeypatch, capsys):
    root, model, run, image = qwen_run
    monkeypatch.setattr("sys.stdin", io.StringIO(f"/image {image}\n{QUESTION}\n/exit\n"))
    assert main(["chat", "--model", str(model), "--adapter", str(run), "--quant", "none", "--compute-dtype", "fp32",
                 "--temperature", "0", "--max-new-tokens", "2"]) == 0
    assert "(image 1 attached" in capsys.readouterr().out
    bounded = _lf_size(200, 150, HIGH)
    assert seen[-1][0] == [bounded]
    assert len(seen[-1][1]) == len(_oracle_ids(model, image, bounded))  # its template adds the system turn


def test_eval_tokenizes_images_bounded_as_training_did(qwen_run, seen, capsys):
    root, model, run, image = qwen_run
    base = ["eval", "--model", str(model), "--adapter", str(run), "--data", str(root / "rows.jsonl"), "--quant", "none"]
    assert main(base) == 0
    assert seen[-1][0] == [_lf_size(200, 150, HIGH)]
    loss = capsys.readouterr().out
    assert main([*base, "--image-max-pixels", "0"]) == 0
    assert seen[-1][0] == [(200, 150)]
    assert capsys.readouterr().out != loss  # another image, other image tokens: another loss


def test_merge_and_quantize_copy_the_bounds_and_the_folders_apply_them(qwen_run, seen, tmp_path):
    """With the processor's files, which the merged (and quantized) folder needs to take images at all."""
    root, model, run, image = qwen_run
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(model), "--adapter", str(run), "--output", str(merged), "--quant", "none",
                 "--dtype", "fp32"]) == 0
    assert (merged / "image_pixels.json").read_text() == (run / "image_pixels.json").read_text()
    assert _generate(merged, "--image", str(image)) == 0
    assert seen[-1][0] == [_lf_size(200, 150, HIGH)]
    assert _generate(model, "--image", str(image)) == 0  # the base folder holds none
    assert seen[-1][0] == [(200, 150)]
    quantized = tmp_path / "nf4"
    assert main(["quantize", "--model", str(merged), "--output", str(quantized), "--compute-dtype", "fp32"]) == 0
    assert (quantized / "image_pixels.json").read_text() == (run / "image_pixels.json").read_text()
    assert main(["generate", "--model", str(quantized), "--compute-dtype", "fp32", "--temperature", "0",
                 "--max-new-tokens", "2", "--prompt", QUESTION, "--image", str(image)]) == 0
    assert seen[-1][0] == [_lf_size(200, 150, HIGH)]


def test_serve_bounds_each_adapter_s_images_as_its_run_did(tmp_path_factory, seen):
    """Requests naming the bounded adapter see its bounds; the base, and an adapter saved without bounds, none."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from qlora.cli.commands.serve import pixel_bounds
    from qlora.infer.batcher import ContinuousBatcher
    from qlora.serve.app import build_app
    from qlora.serve.server import BackgroundServer
    import qlora

    root = tmp_path_factory.mktemp("serve-bounds")
    image = write_png(root / "a.png", 60, 50, 0)
    (root / "rows.jsonl").write_text(_rows("a.png"))
    model_dir = build_image_model(root / "idefics3", "idefics3")
    _train(model_dir, root / "rows.jsonl", root / "small", "--image-max-pixels", "900")
    plain = shutil.copytree(root / "small", root / "plain", ignore=shutil.ignore_patterns("checkpoints"))
    (plain / "image_pixels.json").unlink()
    argv = ["serve", "--model", str(model_dir), "--adapter", f"small={root / 'small'}", "--adapter", f"plain={plain}"]
    bounds = pixel_bounds(build_parser("serve").parse_args(argv))
    assert {name: b.max_pixels for name, b in bounds.items()} == {None: 0, "small": 900, "plain": 0}
    unbounded = pixel_bounds(build_parser("serve").parse_args([*argv, "--image-max-pixels", "0"]))
    assert {b.max_pixels for b in unbounded.values()} == {0}

    model, tokenizer = qlora.load_model(model_dir, compute_dtype=torch.float32, device="cpu")
    for name in ("small", "plain"):
        qlora.load_adapter(model, root / name, adapter_name=name)
    batcher = ContinuousBatcher(model.eval(), tokenizer, context_length=512).start()
    app = build_app(batcher, "base", ["small", "plain"], model_dir=str(model_dir), pixel_bounds=bounds)
    uri = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    content = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": QUESTION}]
    sizes = {}
    with BackgroundServer(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
        for name in ("base", "small", "plain", "small"):
            client.chat.completions.create(model=name, messages=[{"role": "user", "content": content}], max_tokens=1,
                                           temperature=0)
            sizes.setdefault(name, []).append(seen[-1][0])
    batcher.close()
    assert sizes == {"base": [[(60, 50)]], "small": [[_lf_size(60, 50, 900)]] * 2, "plain": [[(60, 50)]]}


# ---------------------------------------------------------------- LLaMA-Factory's Qwen2-VL resize rules

LF_HEAD = "model_name_or_path: m\ndataset: d\noutput_dir: o\nstage: sft\n"


@pytest.mark.parametrize("template, resize", [("qwen2_vl", "qwen2-vl"), ("qwen3_vl", "qwen2-vl"),
                                              ("glm4v", "qwen2-vl"), ("qwen2_omni", "qwen2-vl"),
                                              ("llava", "none"), (None, "none")])
def test_llama_factory_templates_of_its_qwen2_vl_plugin_resize_as_it_does(tmp_path, template, resize):
    from qlora.train.config import load_config

    path = tmp_path / "run.yaml"
    path.write_text(LF_HEAD + (f"template: {template}\n" if template else ""))
    assert load_config(path, {}).image_resize == resize
    ours = tmp_path / "ours.yaml"
    ours.write_text("model: m\ndata: d\noutput: o\n")
    assert load_config(ours, {}).image_resize == "none"


@pytest.mark.parametrize("size", [(10, 2010), (2010, 10), (6000, 28), (28, 7000), (5, 5), (3, 100), (40, 30)])
def test_the_qwen2_vl_rules_resize_as_llama_factory(tmp_path, size):
    from qlora.model.image_pixels import PixelBounds, bounded

    image = Image.open(write_png(tmp_path / "x.png", *size, seed=1))
    for high, low in ((0, 0), (768 * 768, 32 * 32), (900, 0)):
        ours = bounded(image, PixelBounds(high, low, "qwen2-vl"))
        assert ours.size == _lf_size(*size, high, low, qwen2_vl=True)
    assert bounded(image, PixelBounds()).size == size


def test_an_image_the_processor_refuses_is_one_paragraph_and_the_rules_take_it(qwen_run, seen, tmp_path, capsys):
    """transformers' Qwen2-VL processor refuses an aspect ratio over 200 (it takes tiny images, raising them to its
    minimum): qlora's own runs show images as stored and say which image; with image_resize qwen2-vl (LLaMA-Factory's
    Qwen2-VL templates) the image is cut to a ratio of 180 as LLaMA-Factory cuts it, and taken."""
    root, model, run, image = qwen_run
    wide = write_png(tmp_path / "wide.png", 6000, 28, 2)
    assert _generate(model, "--image", str(wide)) == 2
    err = capsys.readouterr().err
    assert "image '" in err and "(6000x28 pixels as given to the processor)" in err and "aspect ratio" in err
    assert "Traceback" not in err
    data = tmp_path / "rows.jsonl"
    data.write_text(_rows(str(wide)))
    assert main(["train", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "refused"),
                 "--quant", "none", "--max-steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{data} line 1" in err and "(6000x28 pixels" in err and "Traceback" not in err
    _train(model, data, tmp_path / "lf", "--image-resize", "qwen2-vl")
    assert json.loads((tmp_path / "lf" / "image_pixels.json").read_text())["image_resize"] == "qwen2-vl"
    assert _generate(model, "--adapter", str(tmp_path / "lf"), "--image", str(wide)) == 0
    assert seen[-1][0] == [(28 * 180, 28)] and seen[-1][1] == _oracle_ids(model, wide, (28 * 180, 28))
