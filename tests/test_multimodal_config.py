"""LLaMA-Factory's and axolotl's multimodal keys, and the image pixel bounds they set.

Oracles: LLaMA-Factory's resize as its documentation of ``image_max_pixels``/``image_min_pixels`` states it (an
image over the maximum, then one under the minimum, scaled by sqrt(bound / pixels) with each side rounded down,
by PIL's ``resize`` with its default filter on the image as opened, then made RGB), written here from that math;
the model's processor (transformers) on images so resized gives the ids and pixel values training must see.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from qlora.chat.images import resolve_image
from qlora.cli.main import main
from qlora.errors import UsageError
from qlora.train.config import load_config
from image_models import build_image_model, oracle_processor, render, write_png

LF_HEAD = "model_name_or_path: m\ndataset: d\noutput_dir: o\nstage: sft\n"


def _yaml(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def _lf_size(width: int, height: int, max_pixels: int, min_pixels: int) -> tuple[int, int]:
    """The size LLaMA-Factory's image regularization gives an image (its two bounds, applied in turn)."""
    if width * height > max_pixels:
        factor = math.sqrt(max_pixels / (width * height))
        width, height = int(width * factor), int(height * factor)
    if width * height < min_pixels:
        factor = math.sqrt(min_pixels / (width * height))
        width, height = int(width * factor), int(height * factor)
    return width, height


def _lf_image(path, max_pixels: int, min_pixels: int):
    from PIL import Image

    image = Image.open(path)
    size = _lf_size(image.width, image.height, max_pixels, min_pixels)
    return (image if size == image.size else image.resize(size)).convert("RGB")


def test_a_llama_factory_vision_example_loads(tmp_path, capsys):
    """LLaMA-Factory's Qwen-VL LoRA example's keys: its pixel bound read, its video settings passed over (they
    apply to videos only), its freeze settings (qlora's own) accepted."""
    text = LF_HEAD + ("image_max_pixels: 262144\nvideo_max_pixels: 16384\nvideo_fps: 1.0\nvideo_maxlen: 256\n"
                      "freeze_vision_tower: true\nfreeze_multi_modal_projector: true\nfreeze_language_model: false\n"
                      "media_dir: pics\n")
    cfg = load_config(_yaml(tmp_path, text), {})
    assert (cfg.image_max_pixels, cfg.image_min_pixels, cfg.media_dir) == (262144, 32 * 32, "pics")
    err = capsys.readouterr().err
    assert "passing over" in err and "video_max_pixels" in err and "video_fps" in err
    assert "freeze_vision_tower" in err  # named as what qlora does anyway


def test_llama_factory_files_take_its_pixel_bounds_and_others_none(tmp_path):
    """LLaMA-Factory bounds every image (768*768 and 32*32 unless set); qlora's own default gives the processor
    each image as stored, as transformers and TRL do."""
    cfg = load_config(_yaml(tmp_path, LF_HEAD), {})
    assert (cfg.image_max_pixels, cfg.image_min_pixels) == (768 * 768, 32 * 32)
    ours = load_config(_yaml(tmp_path, "model: m\ndata: d\noutput: o\n"), {})
    assert (ours.image_max_pixels, ours.image_min_pixels, ours.media_dir) == (0, 0, "")
    flags = load_config(None, {"model": "m", "data": "d", "output": "o", "image_max_pixels": "4096",
                               "image_min_pixels": "64"})
    assert (flags.image_max_pixels, flags.image_min_pixels) == (4096, 64)


@pytest.mark.parametrize("text, message", [
    ("freeze_vision_tower: false\n", "run.yaml line 5: freeze_vision_tower false: qlora keeps the vision tower"),
    ("freeze_multi_modal_projector: false\n", "run.yaml line 5: freeze_multi_modal_projector false: qlora keeps"),
    ("freeze_language_model: true\n", "run.yaml line 5: freeze_language_model true: qlora trains LoRA adapters on "
                                      "the language model"),
    ("image_do_pan_and_scan: true\n", "run.yaml line 5: image_do_pan_and_scan true:"),
    ("crop_to_patches: true\n", "run.yaml line 5: crop_to_patches true:"),
    ("image_max_pixels: 100\nimage_min_pixels: 400\n", "--image-max-pixels (100) is below --image-min-pixels (400)"),
])
def test_llama_factory_multimodal_values_qlora_lacks_are_refused(tmp_path, capsys, text, message):
    path = _yaml(tmp_path, LF_HEAD + text)
    with pytest.raises(UsageError, match=re.escape(message)):
        load_config(path, {})
    assert main(["train", str(path)]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_off_values_of_llama_factory_image_switches_load(tmp_path):
    cfg = load_config(_yaml(tmp_path, LF_HEAD + "image_do_pan_and_scan: false\ncrop_to_patches: false\n"
                                                "use_audio_in_video: false\naudio_sampling_rate: 16000\n"), {})
    assert cfg.method == "sft"


@pytest.mark.parametrize("text, message", [
    ("image_size: 512\n", "run.yaml line 5: image_size 512: axolotl resizes"),
    ("image_resize_algorithm: bilinear\n", "run.yaml line 5: image_resize_algorithm 'bilinear'"),
    ("processor_type: LlavaProcessor\n", "run.yaml line 5: processor_type 'LlavaProcessor'"),
])
def test_axolotl_multimodal_keys_qlora_lacks_are_refused(tmp_path, text, message):
    head = "base_model: m\ndatasets: [{path: d.jsonl, type: chat_template}]\noutput_dir: o\nadapter: lora\n"
    with pytest.raises(UsageError, match=re.escape(message)):
        load_config(_yaml(tmp_path, head + text), {})


def test_axolotl_vision_example_keys_load(tmp_path, capsys):
    """axolotl's Gemma 3 vision QLoRA example's multimodal lines: the model's own AutoProcessor, and dataset
    preparation switches of its runtime."""
    text = ("base_model: m\nprocessor_type: AutoProcessor\nskip_prepare_dataset: true\nremove_unused_columns: false\n"
            "sample_packing: false\nload_in_4bit: true\nadapter: qlora\noutput_dir: o\n"
            "datasets: [{path: d.jsonl, type: chat_template, field_messages: messages}]\n")
    cfg = load_config(_yaml(tmp_path, text), {})
    assert cfg.quant == "nf4" and cfg.image_max_pixels == 0
    assert "skip_prepare_dataset" in capsys.readouterr().err


@pytest.mark.parametrize("size", [(40, 30), (70, 60), (3, 2000), (9, 7)])
def test_images_are_bounded_as_llama_factory_bounds_them(tmp_path, size):
    from PIL import Image

    from qlora.model.image_pixels import PixelBounds

    path = write_png(tmp_path / "x.png", *size, seed=3)
    ref = resolve_image(str(path), "row 1")
    for high, low in ((900, 0), (900, 200), (10**9, 2000), (0, 1024), (0, 0)):
        ours = ref.load(PixelBounds(high, low))
        theirs = _lf_image(path, high or 2**62, low)
        assert ours.size == theirs.size and ours.mode == "RGB"
        assert list(ours.getdata()) == list(theirs.getdata())
    assert ref.load().size == Image.open(path).size


def test_a_palette_image_is_resized_before_it_becomes_rgb(tmp_path):
    """As LLaMA-Factory resizes the image as opened: PIL's filter for palette images (nearest), then RGB."""
    from PIL import Image

    from qlora.model.image_pixels import PixelBounds

    path = tmp_path / "p.png"
    write_png(tmp_path / "rgb.png", 50, 40, 5)
    Image.open(tmp_path / "rgb.png").convert("P").save(path)
    ours = resolve_image(str(path), "row 1").load(PixelBounds(500, 0))
    assert list(ours.getdata()) == list(_lf_image(path, 500, 0).getdata())
    rgb_first = Image.open(path).convert("RGB").resize(ours.size)
    assert list(ours.getdata()) != list(rgb_first.getdata())


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return build_image_model(tmp_path_factory.mktemp("qwen") / "m", "qwen2_vl")


def test_training_sees_the_bounded_images_and_media_dir(qwen, tmp_path):
    """Rows whose image paths are relative to ``media_dir`` (not beside the data file); the processor sees each
    image bounded: its ids (Qwen2-VL's image tokens follow the size) and pixels are the processor's on the
    images LLaMA-Factory's resize gives."""
    from PIL import Image

    from qlora.train.trainer import Trainer

    media = tmp_path / "media"
    media.mkdir()
    write_png(media / "a.png", 90, 80, 0)
    write_png(media / "b.png", 30, 20, 1)
    question, answers = "what is in the picture?", ("a red square", "two green circles")
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": name},
                                                       {"type": "text", "text": question}]},
                          {"role": "assistant", "content": answer}]} for name, answer in zip(("a.png", "b.png"),
                                                                                             answers)]
    (tmp_path / "data").mkdir()
    data = tmp_path / "data" / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    high, low = 3000, 1200
    config = load_config(None, dict(model=str(qwen), data=str(data), output=str(tmp_path / "run"), quant="none",
                                    precision="fp32", max_steps=1, progress=False, media_dir=str(media),
                                    image_max_pixels=high, image_min_pixels=low))
    trainer = Trainer(config)
    trainer.setup()
    processor = oracle_processor(qwen)
    for unit, name, answer in zip(sorted(trainer.train_units, key=lambda u: u.index), ("a.png", "b.png"), answers):
        image = _lf_image(media / name, high, low)
        assert image.size != Image.open(media / name).size  # a real resize: the bounds cut a.png, raise b.png
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        inputs = processor(text=[render(processor, messages)], images=[image], add_special_tokens=False,
                           return_tensors="pt")
        assert unit.input_ids == inputs["input_ids"][0].tolist()
        assert torch.equal(unit.media["pixel_values"], inputs["pixel_values"])
        assert torch.equal(unit.media["image_grid_thw"], inputs["image_grid_thw"])


def test_without_media_dir_a_path_beside_neither_is_not_found(qwen, tmp_path, capsys):
    (tmp_path / "media").mkdir()
    write_png(tmp_path / "media" / "a.png", 40, 30, 0)
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                       {"type": "text", "text": "q"}]},
                          {"role": "assistant", "content": "a"}]}]
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(rows[0]) + "\n")
    args = ["train", "--model", str(qwen), "--data", str(data), "--quant", "none", "--max-steps", "1",
            "--no-progress"]
    assert main([*args, "--output", str(tmp_path / "o1")]) == 2
    assert "image 'a.png' not found" in capsys.readouterr().err
    assert main([*args, "--output", str(tmp_path / "o2"), "--media-dir", str(tmp_path / "media")]) == 0
    evaluate = ["eval", "--model", str(qwen), "--adapter", str(tmp_path / "o2"), "--data", str(data), "--quant",
                "none"]
    capsys.readouterr()
    assert main(evaluate) == 2  # eval looks where train looks: --media-dir, else --dataset-dir
    assert "image 'a.png' not found" in capsys.readouterr().err
    assert main([*evaluate, "--media-dir", str(tmp_path / "media")]) == 0
    assert main([*evaluate, "--dataset-dir", str(tmp_path / "media")]) == 0


def test_eval_finds_images_as_training_does(qwen, tmp_path, capsys):
    """``qlora eval`` looks for a relative image path beside the data file, then in ``--media-dir`` (by default
    ``--dataset-dir``), as training does: its loss is that of the same rows with the image's absolute path."""
    media, registry = tmp_path / "media", tmp_path / "registry"
    for folder, color in ((media, 0), (registry, 1), (tmp_path / "data", 2)):
        folder.mkdir()
        write_png(folder / ("beside.png" if folder.name == "data" else "a.png"), 40, 30, color)

    def loss(image: str) -> list[str]:
        """The eval command on one row showing ``image``."""
        row = {"messages": [{"role": "user", "content": [{"type": "image", "image": image},
                                                         {"type": "text", "text": "what is in the picture?"}]},
                            {"role": "assistant", "content": "a red square"}]}
        data = tmp_path / "data" / "rows.jsonl"
        data.write_text(json.dumps(row) + "\n")
        return ["eval", "--model", str(qwen), "--data", str(data), "--quant", "none", "--seq-len", "2048"]

    def printed(args: list[str]) -> str:
        capsys.readouterr()
        assert main(args) == 0
        return capsys.readouterr().out.splitlines()[-1]

    assert printed([*loss("a.png"), "--media-dir", str(media)]) == printed(loss(str(media / "a.png")))
    assert printed([*loss("a.png"), "--dataset-dir", str(registry)]) == printed(loss(str(registry / "a.png")))
    assert printed(loss(str(media / "a.png"))) != printed(loss(str(registry / "a.png")))  # the images differ
    # beside the data file first, then the media folder
    (media / "beside.png").write_bytes((media / "a.png").read_bytes())
    beside = printed([*loss("beside.png"), "--media-dir", str(media)])
    assert beside == printed(loss(str(tmp_path / "data" / "beside.png"))) != printed(loss(str(media / "beside.png")))
    assert main(loss("a.png")) == 2  # beside neither: named
    err = capsys.readouterr().err
    assert "image 'a.png' not found" in err and "--media-dir" in err


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_preference_training_sees_the_bounded_images(qwen, tmp_path, method):
    """Pairs (and KTO's unpaired rows) with images: their image tensors are the processor's on the bounded image."""
    from qlora.train.trainer import Trainer

    write_png(tmp_path / "a.png", 90, 80, 0)
    rows = [{"images": ["a.png"], "prompt": [{"role": "user", "content": [{"type": "image"},
                                                                          {"type": "text", "text": "what is it?"}]}],
             "chosen": [{"role": "assistant", "content": "a red square"}],
             "rejected": [{"role": "assistant", "content": "two green circles"}]}] * 2
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    high = 2000
    trainer = Trainer(load_config(None, dict(model=str(qwen), data=str(data), output=str(tmp_path / "run"),
                                             method=method, quant="none", precision="fp32", max_steps=1,
                                             batch_size=2, progress=False, image_max_pixels=high)))
    trainer.setup()
    processor = oracle_processor(qwen)
    expected = processor.image_processor(images=[_lf_image(tmp_path / "a.png", high, 0)], return_tensors="pt")
    unbounded = processor.image_processor(images=[_lf_image(tmp_path / "a.png", 2**62, 0)], return_tensors="pt")
    assert not torch.equal(expected["image_grid_thw"], unbounded["image_grid_thw"])
    for unit in trainer.train_units:
        assert torch.equal(unit.media["pixel_values"], expected["pixel_values"])
        assert torch.equal(unit.media["image_grid_thw"], expected["image_grid_thw"])
