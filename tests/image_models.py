"""Tiny vision-language checkpoints with their processors, to train on images (test helper).

Each folder holds what the hub's does: random weights, a locally trained tokenizer with the family's image
and turn tokens added (EOS is the family's end-of-turn token), a chat template that renders image parts as the
family's placeholder, and a processor (PIL image processor with small sizes) that ``AutoProcessor`` loads.
Gemma 3's template is the real one (tests/data/chat_templates); Qwen2-VL's and SmolVLM's are written after
the hub's (Qwen/Qwen2-VL-7B-Instruct, HuggingFaceTB/SmolVLM-Instruct); LLaVA's is a plain role-prefixed one.
Aya Vision's is LLaVA's too; PaliGemma (refused for images by type) has none. Qwen2-VL's processor (its video
processor) and Mistral 3's (PixtralProcessor) need torchvision, so ``KINDS`` lists them only when it is installed;
without it, Mistral 3's folder holds the hub's processor files (``processor_config.json`` naming
PixtralProcessor), which ``AutoProcessor`` refuses.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

_TEXTS = ["what is in the picture? a red square on a blue field", "the cat sat on the mat and looked at it",
          "describe the image: two green circles", "user assistant system model"] * 10
_TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, max_position_embeddings=1024, head_dim=16)
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)

QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] "
    "!= 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>"
    "{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' "
    "in content %}{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] "
    "== 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == "
    "'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: {% for p in m['content'] %}{% if p['type'] == 'image' %}"
    "<image>\n{% else %}{{ p['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT: {% endif %}")
GEMMA3_TEMPLATE = (Path(__file__).parent / "data" / "chat_templates" / "gemma-3.jinja").read_text()

KINDS = ("gemma3", "llava", "llava_next", "idefics3", "aya_vision") + (
    ("qwen2_vl", "mistral3") if importlib.util.find_spec("torchvision") else ())


def _tokenizer(added: list[str], eos: str, named: dict[str, str] | None = None):
    from transformers import PreTrainedTokenizerFast

    from qlora.model.tiny import train_tokenizer

    base = train_tokenizer(_TEXTS, vocab_size=300, chat_template=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=base._tokenizer, bos_token="<|bos|>", eos_token=eos,
                                  pad_token="<|pad|>", unk_token="<|unk|>", extra_special_tokens=named or {})
    # added here, not as a constructor argument: transformers 5 leaves additional_special_tokens out of the vocab
    tok.add_special_tokens({"additional_special_tokens": list(dict.fromkeys(["<|im_start|>", "<|im_end|>", *added]))})
    return tok


def _family(kind: str):
    """(tokenizer, processor, text config, other config arguments) of a tiny ``kind`` model."""
    if kind == "gemma3":
        from transformers import Gemma3ImageProcessorPil, Gemma3Processor

        names = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
        tok = _tokenizer(["<start_of_turn>", "<end_of_turn>", *names.values()], "<end_of_turn>", names)
        proc = Gemma3Processor(Gemma3ImageProcessorPil(size={"height": 56, "width": 56}), tok,
                               chat_template=GEMMA3_TEMPLATE, image_seq_length=4)
        ids = {k: tok.convert_tokens_to_ids(v) for k, v in names.items()}
        return tok, proc, dict(model_type="gemma3_text", query_pre_attn_scalar=16), dict(
            vision_config=dict(_VISION, model_type="siglip_vision_model", image_size=56, patch_size=14),
            mm_tokens_per_image=4, image_token_index=ids["image_token"], boi_token_index=ids["boi_token"],
            eoi_token_index=ids["eoi_token"])
    if kind in ("llava", "llava_next"):
        from transformers import CLIPImageProcessorPil, LlavaNextImageProcessorPil, LlavaNextProcessor, LlavaProcessor

        tok = _tokenizer(["<image>"], "<|im_end|>", {"image_token": "<image>"})
        sizes = dict(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        spec = dict(vision_config=dict(_VISION, model_type="clip_vision_model", image_size=28, patch_size=14,
                                       projection_dim=32), image_token_index=tok.convert_tokens_to_ids("<image>"),
                    vision_feature_layer=-1)
        common = dict(chat_template=LLAVA_TEMPLATE, patch_size=14, vision_feature_select_strategy="default",
                      num_additional_image_tokens=1)
        if kind == "llava":
            proc = LlavaProcessor(CLIPImageProcessorPil(**sizes), tok, **common)
        else:
            pins = [[28, 28], [28, 56], [56, 28]]
            proc = LlavaNextProcessor(LlavaNextImageProcessorPil(**sizes, image_grid_pinpoints=pins), tok, **common)
            spec["image_grid_pinpoints"] = pins
        return tok, proc, dict(model_type="llama"), spec
    if kind == "idefics3":
        from transformers import Idefics3ImageProcessorPil, Idefics3Processor

        tok = _tokenizer(["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"],
                         "<end_of_utterance>")
        images = Idefics3ImageProcessorPil(size={"longest_edge": 56}, max_image_size={"longest_edge": 28})
        proc = Idefics3Processor(images, tok, chat_template=SMOLVLM_TEMPLATE, image_seq_len=1)
        return tok, proc, dict(model_type="llama"), dict(
            vision_config=dict(_VISION, model_type="idefics3_vision", image_size=28, patch_size=14), scale_factor=2,
            image_token_id=tok.convert_tokens_to_ids("<image>"))
    if kind == "aya_vision":
        from transformers import AyaVisionProcessor, GotOcr2ImageProcessorPil

        names = ["<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_LINE_BREAK|>", "<|IMG_PATCH|>"]
        tok = _tokenizer(["<image>", *names], "<|im_end|>", {"image_token": "<image>"})
        tiles = GotOcr2ImageProcessorPil(size={"height": 28, "width": 28}, crop_to_patches=True, max_patches=3)
        proc = AyaVisionProcessor(tiles, tok, patch_size=14, img_size=28, downsample_factor=2,
                                  chat_template=LLAVA_TEMPLATE)
        return tok, proc, dict(model_type="cohere2"), dict(
            vision_config=dict(_VISION, model_type="siglip_vision_model", image_size=28, patch_size=14),
            downsample_factor=2, image_token_index=tok.convert_tokens_to_ids("<|IMG_PATCH|>"))
    if kind == "paligemma":
        from transformers import PaliGemmaProcessor, SiglipImageProcessorPil

        tok = _tokenizer(["<image>"], "<|im_end|>", {"image_token": "<image>"})
        proc = PaliGemmaProcessor(SiglipImageProcessorPil(size={"height": 28, "width": 28}), tok)
        return tok, proc, dict(model_type="gemma"), dict(
            vision_config=dict(_VISION, model_type="siglip_vision_model", image_size=28, patch_size=14,
                               projection_dim=64),
            projection_dim=64, image_token_index=tok.convert_tokens_to_ids("<image>"))
    if kind == "mistral3":
        from transformers import PixtralImageProcessorPil

        tok = _tokenizer(["[IMG]", "[IMG_BREAK]", "[IMG_END]"], "<|im_end|>")
        images = PixtralImageProcessorPil(size={"longest_edge": 56}, patch_size=14)
        proc = _pixtral_processor(images, tok)
        return tok, proc or images, dict(model_type="mistral"), dict(
            vision_config=dict(_VISION, model_type="pixtral", image_size=56, patch_size=14, head_dim=16),
            spatial_merge_size=2, image_token_index=tok.convert_tokens_to_ids("[IMG]"))
    if kind == "qwen2_vl":
        from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

        tok = _tokenizer(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"], "<|im_end|>")
        size = dict(min_pixels=28 * 28 * 4, max_pixels=56 * 56 * 4)
        proc = Qwen2VLProcessor(Qwen2VLImageProcessor(**size), tok, Qwen2VLVideoProcessor(),
                                chat_template=QWEN2_VL_TEMPLATE)
        ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>")}
        text = dict(model_type="qwen2_vl_text", rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
        return tok, proc, text, dict(
            vision_config=dict(depth=1, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=14,
                               spatial_merge_size=2, temporal_patch_size=2),
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"])
    raise ValueError(kind)


def _pixtral_processor(images, tok):
    """Mistral 3's processor, or None where it cannot be built (it needs torchvision)."""
    if not importlib.util.find_spec("torchvision"):
        return None
    from transformers import PixtralProcessor

    return PixtralProcessor(images, tok, patch_size=14, spatial_merge_size=2, chat_template=LLAVA_TEMPLATE.replace(
        "<image>\n", "[IMG]"))


def build_image_model(out_dir: str | Path, kind: str, seed: int = 0) -> Path:
    """Save a random ``kind`` vision-language model with its tokenizer and processor."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    tok, proc, text, spec = _family(kind)
    text = dict(_TEXT, **text, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    config = AutoConfig.for_model(kind, text_config=text, **spec)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    out = Path(out_dir)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    if not hasattr(proc, "tokenizer"):  # a processor that needs torchvision: the hub folder's files, as written
        tok.save_pretrained(out)
        (out / "processor_config.json").write_text(json.dumps({"processor_class": "PixtralProcessor", "patch_size": 14,
                                                                "spatial_merge_size": 2}))
    return out


def write_png(path: Path, width: int, height: int, seed: int) -> Path:
    """A random RGB PNG written with PIL."""
    import numpy as np
    from PIL import Image

    pixels = (np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8")
    Image.fromarray(pixels).save(path)
    return path
