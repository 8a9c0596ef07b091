"""Processors built for images alone where ``AutoProcessor`` needs torchvision (a video processor it cannot build).

Oracles: the family's PIL image processor constructed directly with the hub folder's settings gives the image
tensors; transformers' own count of each image's tokens (``_get_num_multimodal_tokens``, the path vLLM uses, not
the one that expands the text) or the family's documented rule gives the image tokens; the rest of the ids are
the tokenizer's on the text around them. Training and generation through these processors are checked against
transformers' forward and ``generate`` in test_image_training.py and test_image_generation.py.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import transformers
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from qlora.cli.main import main
from qlora.model.image_only_processor import NeedsTorchvision, image_only_processor
from qlora.model.image_processor import load_image_processor
from image_models import VIDEO_FAMILIES, _family, build_image_model, kind_params, write_png
from qlora_processes import train_records

no_torchvision = pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None,
                                    reason="AutoProcessor builds these processors")
PLACEHOLDER = {"internvl": "<IMG_CONTEXT>", "llava_onevision": "<image>", "smolvlm": "<image>",
               "llava_next_video": "<image>",
               "glm4v": "<|begin_of_image|><|image|><|end_of_image|>", "gemma4": "<|image|>"}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A landscape image and a wide one (InternVL's tiles)."""
    root = tmp_path_factory.mktemp("image-only-png")
    return [Image.open(write_png(root / f"{k}.png", w, h, k)).convert("RGB") for k, (w, h) in
            enumerate(((40, 30), (90, 28)))]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """kind -> (folder, qlora's processor), built on first use."""
    root, out = tmp_path_factory.mktemp("image-only"), {}

    def get(kind):
        if kind not in out:
            folder = build_image_model(root / kind, kind)
            model = AutoModelForImageTextToText.from_pretrained(folder)
            out[kind] = folder, load_image_processor(folder, model, AutoTokenizer.from_pretrained(folder), "here")
        return out[kind]
    return get


@no_torchvision
@pytest.mark.parametrize("kind", kind_params(VIDEO_FAMILIES))
def test_autoprocessor_needs_torchvision_and_qlora_builds_the_familys_class(kind, built):
    folder, processor = built(kind)
    with pytest.raises((ImportError, ValueError), match="(?i)torchvision"):
        AutoProcessor.from_pretrained(folder)
    name = json.loads((folder / "processor_config.json").read_text())["processor_class"]
    assert isinstance(processor, getattr(transformers, name)) and type(processor).__name__ == name
    assert not hasattr(processor, "video_processor")
    assert type(processor.image_processor) is type(_family(kind)[1].image_processor)  # the PIL one
    audio = _family(kind)[1].feature_extractor  # Gemma 4's, read from the folder as AutoFeatureExtractor reads it
    assert getattr(processor, "feature_extractor", None).__class__ is audio.__class__
    assert processor.chat_template == (folder / "chat_template.jinja").read_text()


@pytest.mark.parametrize("kind", kind_params(VIDEO_FAMILIES))
def test_outputs_are_the_image_processors_and_the_familys_token_counts(kind, built, images):
    folder, processor = built(kind)
    settings = json.loads((folder / "processor_config.json").read_text())
    assert all(getattr(processor, k) == v for k, v in settings.items()  # image_seq_len, ...
               if k not in ("processor_class", "image_processor", "video_processor", "feature_extractor"))
    direct = _family(kind)[1].image_processor  # the PIL image processor, constructed here with the hub's settings
    tok = processor.tokenizer
    placeholder = PLACEHOLDER.get(kind, "<|vision_start|><|image_pad|><|vision_end|>")
    for image in images:
        out = processor(text=[f"look: {placeholder} what is it?"], images=[image], add_special_tokens=False,
                        return_tensors="pt")
        expected = direct(images=[image], return_tensors="pt")
        shared = [k for k in expected if k in out]
        assert "pixel_values" in shared
        for key in shared:
            assert torch.equal(out[key], expected[key]), key
        ids = out["input_ids"][0].tolist()
        if kind == "smolvlm":  # image_seq_len <image> tokens for each tile and the whole image
            image_ids = {processor.image_token_id}
            count = expected["pixel_values"].shape[1] * processor.image_seq_len
        elif kind == "glm4v":  # one <|image|> for each merged 2 x 2 block (4.57's _get_num_multimodal_tokens miscounts)
            image_ids = {tok.convert_tokens_to_ids("<|image|>")}
            count = int(expected["image_grid_thw"].prod()) // 4
        else:  # InternVL counts the <img> and </img> around the image's tokens
            image_ids = {getattr(processor, f"{a}_token_id", None) for a in ("image", "start_image", "end_image")}
            count = processor._get_num_multimodal_tokens(image_sizes=[(image.height, image.width)]).num_image_tokens[0]
        assert sum(i in image_ids for i in ids) == count
        if kind.startswith("qwen"):  # one token for each merged 2 x 2 block of patches
            assert count == int(expected["image_grid_thw"].prod()) // 4
        before, after = (tok(t, add_special_tokens=False)["input_ids"] for t in ("look: ", " what is it?"))
        assert ids[:len(before)] == before and ids[-len(after):] == after


@pytest.mark.parametrize("kind", kind_params(k for k in VIDEO_FAMILIES if k in ("qwen2_5_vl", "llava_onevision")))
def test_cli_trains_in_4_bits_and_generates_with_images(kind, built, tmp_path, capsys):
    folder = built(kind)[0]
    write_png(tmp_path / "a.png", 40, 30, 0)
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                       {"type": "text", "text": "what is in the picture?"}]},
                          {"role": "assistant", "content": answer}]} for answer in ("a red square", "a blue one")]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["train", "--model", str(folder), "--data", str(tmp_path / "chat.jsonl"), "--output",
                 str(tmp_path / "run"), "--quant", "nf4", "--max-steps", "4", "--batch-size", "2", "--lr", "1e-2",
                 "--no-progress"]) == 0
    losses = [r["loss"] for r in train_records(tmp_path / "run")]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    capsys.readouterr()
    assert main(["generate", "--model", str(folder), "--adapter", str(tmp_path / "run"), "--temperature", "0",
                 "--max-new-tokens", "4", "--prompt", "what is in the picture?", "--image",
                 str(tmp_path / "a.png")]) == 0  # its tokens equal transformers': test_image_generation.py
    assert "Traceback" not in capsys.readouterr().err


@no_torchvision
def test_a_family_whose_image_processor_needs_torchvision_is_refused_naming_why(tmp_path):
    """Llama 4's image processor exists only for torchvision (Mistral 3's whole PixtralProcessor in transformers 5:
    test_image_training.py)."""
    tok = AutoTokenizer.from_pretrained(build_image_model(tmp_path / "idefics3", "idefics3"))
    tok.save_pretrained(tmp_path / "llama4")
    (tmp_path / "llama4" / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "Llama4ImageProcessorFast", "processor_class": "Llama4Processor"}))
    (tmp_path / "llama4" / "config.json").write_text(json.dumps({"model_type": "llama4"}))
    with pytest.raises(NeedsTorchvision, match="^llama4's image processor has no version without it$"):
        image_only_processor(tmp_path / "llama4", "llama4", tok)
