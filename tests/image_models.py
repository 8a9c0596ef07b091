"""Tiny vision-language checkpoints with their processors, to train on images (test helper).

Each folder holds what the hub's does: random weights, a locally trained tokenizer with the family's image
and turn tokens added (EOS is the family's end-of-turn token), a chat template that renders image parts as the
family's placeholder, and a processor (PIL image processor with small sizes) that ``AutoProcessor`` loads.
Gemma 3's template is the real one (tests/data/chat_templates); Qwen2-VL's and SmolVLM's are written after
the hub's (Qwen/Qwen2-VL-7B-Instruct, HuggingFaceTB/SmolVLM-Instruct); LLaVA's is a plain role-prefixed one.
Aya Vision's and ViP-LLaVA's are LLaVA's too (HunyuanVL's with its image placeholder between its start and end
tokens), Idefics2's SmolVLM's, GLM-4.1V's Qwen2-VL's with GLM's image markers; PaliGemma (its processor's prefix
and suffix) has none. Families whose processor takes a video processor (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4.1V,
SmolVLM2, InternVL, LLaVA-OneVision, Gemma 4: its audio feature extractor too, and the real template; Qwen3.5
and LFM3-VL: Qwen3-VL's processor, tokens and template; LLaVA-NeXT-Video: LLaVA-NeXT's) and Mistral 3 (whose
PixtralProcessor needs torchvision) get the hub's files written as the hub has them (the image processor's
``preprocessor_config.json`` with the hub's class name, ``processor_config.json`` naming the processor class and
its settings, the tokenizer and ``chat_template.jinja``): their processors cannot be built without torchvision.
Tokenizers are generic fast ones, or the family's fast class where transformers 4.x's processor insists on it.
``KINDS`` leaves out families whose processor class itself needs torchvision here (``NEEDS_TORCHVISION``) and
those this transformers lacks (``MISSING``: ``kind_params`` skips them).
Image processors are the PIL ones (4.x's slow ones).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

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
GEMMA4_TEMPLATE = (Path(__file__).parent / "data" / "chat_templates" / "gemma-4.jinja").read_text()

INTERNVL_TEMPLATE = LLAVA_TEMPLATE.replace("<image>", "<IMG_CONTEXT>")  # the hub's -hf templates write <IMG_CONTEXT>

# Each family's processor class.
PROCESSORS = {"gemma3": "Gemma3Processor", "llava": "LlavaProcessor", "llava_next": "LlavaNextProcessor",
              "vipllava": "LlavaProcessor", "idefics2": "Idefics2Processor", "glm4v": "Glm4vProcessor",
              "idefics3": "Idefics3Processor", "aya_vision": "AyaVisionProcessor", "paligemma": "PaliGemmaProcessor",
              "mistral3": "PixtralProcessor", "qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
              "qwen3_vl": "Qwen3VLProcessor", "smolvlm": "SmolVLMProcessor", "internvl": "InternVLProcessor",
              "llava_onevision": "LlavaOnevisionProcessor", "hunyuan_vl": "HunYuanVLProcessor",
              "gemma4": "Gemma4Processor", "qwen3_5": "Qwen3VLProcessor", "lfm3_vl": "Lfm3VlProcessor",
              "llava_next_video": "LlavaNextVideoProcessor"}
# The video processor class a family's hub folder names (transformers 5's nested processor_config.json).
VIDEO_PROCESSORS = {"qwen3_vl": "Qwen3VLVideoProcessor", "qwen3_5": "Qwen3VLVideoProcessor",
                    "gemma4": "Gemma4VideoProcessor", "lfm3_vl": "Qwen3VLVideoProcessor",
                    "llava_next_video": "LlavaNextVideoVideoProcessor"}


def _importable(name: str) -> bool:
    """Whether transformers' class ``name`` is usable here (some processors' modules import torchvision: 4.x fails
    to import them, 5 gives a placeholder class that raises on any public attribute)."""
    try:
        return callable(getattr(transformers, name).from_pretrained)
    except ImportError:
        return False


# Families this transformers lacks (4.56 has no Qwen3-VL): their tests skip, saying so.
MISSING = tuple(k for k in PROCESSORS if k not in CONFIG_MAPPING_NAMES)
# Processor classes that need torchvision to import at all (transformers 5's PixtralProcessor, 4.x's
# SmolVLMProcessor, whose module imports its video processor's): without torchvision, their families are refused
# for images, naming it.
NEEDS_TORCHVISION = tuple(k for k, name in PROCESSORS.items() if k not in MISSING and not _importable(name))
# Families whose processor takes a video processor: built without torchvision by qlora for images alone.
VIDEO_FAMILIES = tuple(k for k in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "glm4v", "smolvlm", "internvl",
                                    "llava_onevision", "gemma4", "qwen3_5", "lfm3_vl", "llava_next_video")
                       if k not in NEEDS_TORCHVISION)
FAMILIES = tuple(k for k in ("gemma3", "llava", "llava_next", "vipllava", "idefics2", "idefics3", "aya_vision",
                             *VIDEO_FAMILIES, "mistral3", "hunyuan_vl")
                 if k not in NEEDS_TORCHVISION)
KINDS = tuple(k for k in FAMILIES if k not in MISSING)  # the families built here


def kind_params(kinds) -> list:
    """``kinds`` as test parameters, those this transformers lacks skipped with the reason."""
    return [pytest.param(k, marks=pytest.mark.skipif(k in MISSING, reason=f"transformers {transformers.__version__} "
                                                     f"has no {k} models")) for k in kinds]


class HubFiles(NamedTuple):
    """A processor as the hub's files hold it, for processors that cannot be built here."""
    processor_class: str
    image_processor: object
    image_processor_type: str  # the class the hub's preprocessor_config.json names
    settings: dict
    chat_template: str
    feature_extractor: object = None  # an audio one beside the images (Gemma 4's)


def _pil(name: str, **kwargs):
    """transformers' PIL image processor ``name`` (``...Pil`` in 5, the slow class in 4.x)."""
    return (getattr(transformers, f"{name}Pil", None) or getattr(transformers, name))(**kwargs)


def _tokenizer(kind: str, added: list[str], eos: str, named: dict[str, str] | None = None):
    """The locally trained tokenizer with ``added`` special tokens, of a class ``kind``'s processor accepts: a generic
    fast tokenizer, or the family's fast class over the same tokenizer where the processor takes only its family's
    classes (transformers 4.x's Qwen2-VL and PaliGemma processors)."""
    from qlora.model.tiny import train_tokenizer

    base = train_tokenizer(_TEXTS, vocab_size=300, chat_template=False)
    # ids and mask only, as the hub's tokenizers of these families give (4.x's generic class adds token_type_ids)
    tok = _tokenizer_class(PROCESSORS[kind])(tokenizer_object=base._tokenizer, bos_token="<|bos|>", eos_token=eos,
                                             pad_token="<|pad|>", unk_token="<|unk|>", extra_special_tokens=named or {},
                                             model_input_names=["input_ids", "attention_mask"])
    # added here, not as a constructor argument: transformers 5 leaves additional_special_tokens out of the vocab
    tok.add_special_tokens({"additional_special_tokens": list(dict.fromkeys(["<|im_start|>", "<|im_end|>", *added]))})
    return tok


def _tokenizer_class(processor: str) -> type:
    """``PreTrainedTokenizerFast``, or the fast class among those ``processor`` insists on (4.x's tuple of names)."""
    accepted = getattr(getattr(transformers, processor), "tokenizer_class", None) if _importable(processor) else None
    fast = next((n for n in accepted if n.endswith("Fast")), None) if isinstance(accepted, tuple) else None
    return getattr(transformers, fast) if fast else transformers.PreTrainedTokenizerFast


def _family(kind: str):
    """(tokenizer, processor, text config, other config arguments) of a tiny ``kind`` model."""
    if kind == "gemma3":
        from transformers import Gemma3Processor

        names = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
        tok = _tokenizer(kind, ["<start_of_turn>", "<end_of_turn>", *names.values()], "<end_of_turn>", names)
        proc = Gemma3Processor(_pil("Gemma3ImageProcessor", size={"height": 56, "width": 56}), tok,
                               chat_template=GEMMA3_TEMPLATE, image_seq_length=4)
        ids = {k: tok.convert_tokens_to_ids(v) for k, v in names.items()}
        return tok, proc, dict(model_type="gemma3_text", query_pre_attn_scalar=16), dict(
            vision_config=dict(_VISION, model_type="siglip_vision_model", image_size=56, patch_size=14),
            mm_tokens_per_image=4, image_token_index=ids["image_token"], boi_token_index=ids["boi_token"],
            eoi_token_index=ids["eoi_token"])
    if kind in ("llava", "llava_next", "vipllava", "llava_next_video"):
        from transformers import LlavaNextProcessor, LlavaProcessor

        names = {"image_token": "<image>", **({"video_token": "<video>"} if kind == "llava_next_video" else {})}
        tok = _tokenizer(kind, list(names.values()), "<|im_end|>", names)
        sizes = dict(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        spec = dict(vision_config=dict(_VISION, model_type="clip_vision_model", image_size=28, patch_size=14,
                                       projection_dim=32), image_token_index=tok.convert_tokens_to_ids("<image>"),
                    vision_feature_layer=-1)
        common = dict(chat_template=LLAVA_TEMPLATE, patch_size=14, vision_feature_select_strategy="default",
                      num_additional_image_tokens=1)
        if kind == "vipllava":  # its projector reads several vision layers, each without its CLS token
            spec = dict(spec, vision_feature_layers=[-1, 0])
            del spec["vision_feature_layer"]
        if kind in ("llava", "vipllava"):
            proc = LlavaProcessor(_pil("CLIPImageProcessor", **sizes), tok, **common)
        elif kind == "llava_next_video":  # LLaVA-NeXT's images; its processor takes the video processor first
            pins = [[28, 28], [28, 56], [56, 28]]
            proc = HubFiles(PROCESSORS[kind], _pil("LlavaNextImageProcessor", **sizes, image_grid_pinpoints=pins),
                            "LlavaNextImageProcessor", {k: v for k, v in common.items() if k != "chat_template"},
                            LLAVA_TEMPLATE)
            spec.update(image_grid_pinpoints=pins, video_token_index=tok.convert_tokens_to_ids("<video>"))
        else:
            pins = [[28, 28], [28, 56], [56, 28]]
            proc = LlavaNextProcessor(_pil("LlavaNextImageProcessor", **sizes, image_grid_pinpoints=pins), tok,
                                      **common)
            spec["image_grid_pinpoints"] = pins
        return tok, proc, dict(model_type="llama"), spec
    if kind == "idefics2":  # a perceiver resampler turns each image into image_seq_len latents
        from transformers import Idefics2Processor

        tok = _tokenizer(kind, ["<fake_token_around_image>", "<image>", "<end_of_utterance>"], "<end_of_utterance>")
        images = _pil("Idefics2ImageProcessor", size={"shortest_edge": 28, "longest_edge": 56})
        proc = Idefics2Processor(images, tok, image_seq_len=4, chat_template=SMOLVLM_TEMPLATE)
        return tok, proc, dict(model_type="mistral"), dict(
            vision_config=dict(_VISION, model_type="idefics2_vision", image_size=56, patch_size=14),
            perceiver_config=dict(hidden_size=_TEXT["hidden_size"], resampler_n_latents=4, resampler_depth=1,
                                  resampler_n_heads=2, resampler_head_dim=16, num_key_value_heads=1),
            image_token_id=tok.convert_tokens_to_ids("<image>"))
    if kind == "idefics3":
        from transformers import Idefics3Processor

        tok = _tokenizer(kind, ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"],
                         "<end_of_utterance>")
        images = _pil("Idefics3ImageProcessor", size={"longest_edge": 56}, max_image_size={"longest_edge": 28})
        proc = Idefics3Processor(images, tok, chat_template=SMOLVLM_TEMPLATE, image_seq_len=1)
        return tok, proc, dict(model_type="llama"), dict(
            vision_config=dict(_VISION, model_type="idefics3_vision", image_size=28, patch_size=14), scale_factor=2,
            image_token_id=tok.convert_tokens_to_ids("<image>"))
    if kind == "aya_vision":
        from transformers import AyaVisionProcessor

        names = ["<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_LINE_BREAK|>", "<|IMG_PATCH|>"]
        tok = _tokenizer(kind, ["<image>", *names], "<|im_end|>", {"image_token": "<image>"})
        tiles = _pil("GotOcr2ImageProcessor", size={"height": 28, "width": 28}, crop_to_patches=True, max_patches=3)
        proc = AyaVisionProcessor(tiles, tok, patch_size=14, img_size=28, downsample_factor=2,
                                  chat_template=LLAVA_TEMPLATE)
        return tok, proc, dict(model_type="cohere2"), dict(
            vision_config=dict(_VISION, model_type="siglip_vision_model", image_size=28, patch_size=14),
            downsample_factor=2, image_token_index=tok.convert_tokens_to_ids("<|IMG_PATCH|>"))
    if kind == "paligemma":
        from transformers import PaliGemmaProcessor

        tok = _tokenizer(kind, ["<image>"], "<|im_end|>", {"image_token": "<image>"})
        images = _pil("SiglipImageProcessor", size={"height": 28, "width": 28}, image_seq_length=4)  # 4.x reads it
        proc = PaliGemmaProcessor(images, tok)
        return tok, proc, dict(model_type="gemma"), dict(
            vision_config=dict(_VISION, model_type="siglip_vision_model", image_size=28, patch_size=14,
                               projection_dim=64),
            projection_dim=64, image_token_index=tok.convert_tokens_to_ids("<image>"))
    if kind == "mistral3":
        tok = _tokenizer(kind, ["[IMG]", "[IMG_BREAK]", "[IMG_END]"], "<|im_end|>")
        images = _pil("PixtralImageProcessor", size={"longest_edge": 56}, patch_size=14)
        proc = HubFiles(PROCESSORS[kind], images, "PixtralImageProcessor", dict(patch_size=14, spatial_merge_size=2),
                        LLAVA_TEMPLATE.replace("<image>\n", "[IMG]"))
        return tok, proc, dict(model_type="mistral"), dict(
            vision_config=dict(_VISION, model_type="pixtral", image_size=56, patch_size=14, head_dim=16),
            spatial_merge_size=2, image_token_index=tok.convert_tokens_to_ids("[IMG]"))
    if kind in ("qwen3_5", "lfm3_vl"):  # Qwen3-VL's processor and tokens; recurrent layers beside attention
        tok, proc, _, spec = _family("qwen3_vl")
        proc = proc._replace(processor_class=PROCESSORS[kind])
        if kind == "qwen3_5":  # gated delta-net layers; a partial rotary (its real 0.25) split into 3 axes
            spec["vision_config"]["model_type"] = "qwen3_5_vision"
            rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3], "mrope_interleaved": True,
                    "partial_rotary_factor": 0.5}
            return tok, proc, dict(model_type="qwen3_5_text", head_dim=32, rope_parameters=rope,
                                   layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                                   linear_key_head_dim=16, linear_value_head_dim=16, linear_num_value_heads=4), spec
        # LFM3-VL: short convolutions, sliding and full attention with a proportional rope on the full layers
        rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                "full_attention": {"rope_type": "proportional", "rope_theta": 1e6, "partial_rotary_factor": 0.5}}
        vision = dict(model_type="lfm3_vl_vision", hidden_size=32, intermediate_size=64, num_attention_heads=2,
                      num_key_value_heads=2, num_hidden_layers=2, layer_types=["conv", "full_attention"],
                      patch_size=16, spatial_merge_size=2, temporal_patch_size=2)
        return tok, proc, dict(model_type="lfm3", num_hidden_layers=3, sliding_window=8, rope_parameters=rope,
                               layer_types=["conv", "sliding_attention", "full_attention"]), dict(
            vision_config=vision, projector_hidden_size=64, image_token_id=spec["image_token_id"],
            video_token_id=spec["video_token_id"], vision_start_token_id=spec["vision_start_token_id"],
            vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"))
    if kind in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        tok = _tokenizer(kind, ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
                         "<|im_end|>")
        patch = 16 if kind == "qwen3_vl" else 14
        size = dict(min_pixels=(2 * patch) ** 2 * 4, max_pixels=(4 * patch) ** 2 * 4, patch_size=patch)
        hub_type = "Qwen2VLImageProcessorFast" if kind == "qwen3_vl" else "Qwen2VLImageProcessor"
        proc = HubFiles(PROCESSORS[kind], _pil("Qwen2VLImageProcessor", **size), hub_type, {}, QWEN2_VL_TEMPLATE)
        ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>")}
        rope = {"type": "mrope", "mrope_section": [2, 3, 3]}
        vision = dict(depth=1, hidden_size=32, num_heads=2, patch_size=patch, spatial_merge_size=2,
                      temporal_patch_size=2)
        if kind == "qwen2_vl":
            vision.update(embed_dim=32, hidden_size=64, mlp_ratio=2)
        elif kind == "qwen2_5_vl":
            vision.update(intermediate_size=64, out_hidden_size=64, window_size=56, fullatt_block_indexes=[0])
        else:
            vision.update(intermediate_size=64, out_hidden_size=64, num_position_embeddings=16,
                          deepstack_visual_indexes=[0])
            rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True}
        text = dict(model_type=f"{kind}_text", rope_scaling=rope)
        return tok, proc, text, dict(vision_config=vision, image_token_id=ids["<|image_pad|>"],
                                     video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"])
    if kind == "glm4v":  # GLM-4.1V: Qwen2-VL's patches and 3-axis rotary positions, its own image markers
        names = ["<|begin_of_image|>", "<|end_of_image|>", "<|image|>", "<|begin_of_video|>", "<|end_of_video|>",
                 "<|video|>"]
        tok = _tokenizer(kind, names, "<|im_end|>")
        size = dict(size={"shortest_edge": 28 * 28 * 4, "longest_edge": 56 * 56 * 4}, patch_size=14)
        template = QWEN2_VL_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>",
                                             "<|begin_of_image|><|image|><|end_of_image|>")
        proc = HubFiles(PROCESSORS[kind], _pil("Glm4vImageProcessor", **size), "Glm4vImageProcessor", {}, template)
        ids = {t: tok.convert_tokens_to_ids(t) for t in names}
        rope = {"rope_type": "default", "mrope_section": [2, 3, 3]}  # 4.x's name; 5 reads it as rope_parameters
        vision = dict(depth=1, hidden_size=32, num_heads=2, patch_size=14, image_size=56, spatial_merge_size=2,
                      temporal_patch_size=2, intermediate_size=64, out_hidden_size=64)
        return tok, proc, dict(model_type="glm4v_text", rope_scaling=rope, rope_theta=10000.0), dict(
            vision_config=vision, image_token_id=ids["<|image|>"], video_token_id=ids["<|video|>"],
            image_start_token_id=ids["<|begin_of_image|>"], image_end_token_id=ids["<|end_of_image|>"],
            video_start_token_id=ids["<|begin_of_video|>"], video_end_token_id=ids["<|end_of_video|>"])
    if kind == "gemma4":  # images of up to 70 soft tokens (its smallest budget), each 2 x 2 pool of 14-pixel patches
        from transformers import Gemma4AudioFeatureExtractor

        names = {"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
                 "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>"}
        tok = _tokenizer(kind, ["<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|video|>", *names.values()],
                         "<turn|>", names)
        images = _pil("Gemma4ImageProcessor", patch_size=14, max_soft_tokens=70, pooling_kernel_size=2)
        proc = HubFiles(PROCESSORS[kind], images, "Gemma4ImageProcessor", dict(image_seq_length=70), GEMMA4_TEMPLATE,
                        Gemma4AudioFeatureExtractor())
        ids = {k: tok.convert_tokens_to_ids(v) for k, v in names.items()}
        text = dict(model_type="gemma4_text", layer_types=["sliding_attention", "full_attention"], sliding_window=16,
                    hidden_size_per_layer_input=16, vocab_size_per_layer_input=len(tok), global_head_dim=16)
        return tok, proc, text, dict(
            vision_config=dict(_VISION, model_type="gemma4_vision", num_key_value_heads=2, head_dim=16, patch_size=14,
                               pooling_kernel_size=2, position_embedding_size=64), audio_config=None,
            image_token_id=ids["image_token"], boi_token_id=ids["boi_token"], eoi_token_id=ids["eoi_token"],
            audio_token_id=ids["audio_token"], boa_token_id=ids["boa_token"])
    if kind == "smolvlm":
        tok = _tokenizer(kind, ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"],
                         "<end_of_utterance>")
        images = _pil("SmolVLMImageProcessor", size={"longest_edge": 56}, max_image_size={"longest_edge": 28})
        proc = HubFiles(PROCESSORS[kind], images, "SmolVLMImageProcessor", dict(image_seq_len=1), SMOLVLM_TEMPLATE)
        return tok, proc, dict(model_type="llama"), dict(
            vision_config=dict(_VISION, model_type="smolvlm_vision", image_size=28, patch_size=14), scale_factor=2,
            image_token_id=tok.convert_tokens_to_ids("<image>"))
    if kind == "internvl":
        names = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                 "video_token": "<video>"}
        tok = _tokenizer(kind, list(names.values()), "<|im_end|>", names)
        tiles = _pil("GotOcr2ImageProcessor", size={"height": 28, "width": 28}, crop_to_patches=True, max_patches=3)
        proc = HubFiles(PROCESSORS[kind], tiles, "GotOcr2ImageProcessorFast", dict(image_seq_length=1),
                        INTERNVL_TEMPLATE)
        return tok, proc, dict(model_type="qwen2"), dict(
            vision_config=dict(_VISION, model_type="internvl_vision", image_size=[28, 28], patch_size=[14, 14]),
            downsample_ratio=0.5, image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"))
    if kind == "llava_onevision":
        names = {"image_token": "<image>", "video_token": "<video>"}
        tok = _tokenizer(kind, list(names.values()), "<|im_end|>", names)
        pins = [[28, 28], [28, 56], [56, 28]]
        images = _pil("LlavaOnevisionImageProcessor", size={"height": 28, "width": 28}, image_grid_pinpoints=pins)
        proc = HubFiles(PROCESSORS[kind], images, "LlavaOnevisionImageProcessor",
                        dict(num_image_tokens=4, vision_feature_select_strategy="full",
                             vision_aspect_ratio="anyres_max_9"), LLAVA_TEMPLATE)
        return tok, proc, dict(model_type="qwen2"), dict(
            vision_config=dict(_VISION, model_type="siglip_vision_model", image_size=28, patch_size=14),
            image_grid_pinpoints=pins, vision_feature_select_strategy="full", vision_feature_layer=-1,
            image_token_index=tok.convert_tokens_to_ids("<image>"),
            video_token_index=tok.convert_tokens_to_ids("<video>"))
    if kind == "hunyuan_vl":  # 4-axis rotary positions (position, width, height, image index), as HunyuanOCR's
        names = {"image_token": "<image>", "image_start_token": "<img>", "image_end_token": "</img>"}
        tok = _tokenizer(kind, list(names.values()), "<|im_end|>", names)
        images = _pil("HunYuanVLImageProcessor", min_pixels=32 * 32, max_pixels=64 * 64)
        proc = transformers.HunYuanVLProcessor(images, tok, chat_template=LLAVA_TEMPLATE.replace("<image>\n",
                                                                                                 "<img><image></img>"))
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2, 2]}
        ids = {k: tok.convert_tokens_to_ids(v) for k, v in names.items()}
        return tok, proc, dict(model_type="hunyuan_vl_text", rope_parameters=rope), dict(
            vision_config=dict(_VISION, model_type="hunyuan_vl_vision", patch_size=16, spatial_merge_size=2,
                               out_hidden_size=_TEXT["hidden_size"]),
            image_token_id=ids["image_token"], im_start_id=ids["image_start_token"], im_end_id=ids["image_end_token"])
    raise ValueError(kind)


def _write_hub_files(out: Path, files: HubFiles, tok, video_processor: str | None = None) -> None:
    """The processor's files as the hub's folders hold them; with a ``video_processor`` class, the sub-processors'
    settings inside ``processor_config.json``, as transformers 5's ``save_pretrained`` writes them."""
    tok.save_pretrained(out)
    files.image_processor.save_pretrained(out)
    path = out / "preprocessor_config.json"
    config = json.loads(path.read_text())
    config.update(image_processor_type=files.image_processor_type, processor_class=files.processor_class)
    processor = {"processor_class": files.processor_class, **files.settings}
    if video_processor:
        path.unlink()
        processor["image_processor"] = {k: v for k, v in config.items() if k != "processor_class"}
        processor["video_processor"] = {"video_processor_type": video_processor, "merge_size": 2}
    if files.feature_extractor is not None:
        processor["feature_extractor"] = {k: v for k, v in json.loads(files.feature_extractor.to_json_string()).items()
                                          if k != "processor_class"}
    else:
        path.write_text(json.dumps(config, indent=2))
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2))
    (out / "chat_template.jinja").write_text(files.chat_template)


def build_image_model(out_dir: str | Path, kind: str, seed: int = 0, vision: dict | None = None) -> Path:
    """Save a random ``kind`` vision-language model with its tokenizer and processor (``vision``: settings that
    replace the tiny vision config's)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    tok, proc, text, spec = _family(kind)
    spec["vision_config"].update(vision or {})
    text = dict(_TEXT, **text, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    config = AutoConfig.for_model(kind, text_config=text, **spec)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    out = Path(out_dir)
    model.save_pretrained(out)
    if isinstance(proc, HubFiles):
        _write_hub_files(out, proc, tok, VIDEO_PROCESSORS.get(kind))
    else:
        proc.save_pretrained(out)
    return out


def write_png(path: Path, width: int, height: int, seed: int) -> Path:
    """A random RGB PNG written with PIL."""
    import numpy as np
    from PIL import Image

    pixels = (np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8")
    Image.fromarray(pixels).save(path)
    return path


def oracle_processor(model_dir: str | Path):
    """transformers' processor for the folder: ``AutoProcessor``'s, or, where that needs torchvision (a video
    processor), the family's class with the PIL image processor and no video processor, as qlora builds it
    (test_image_only_processor.py checks its outputs against the image processor's and the family's rules)."""
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(model_dir)
    except (ImportError, ValueError) as exc:
        if "torchvision" not in str(exc).lower():
            raise
    from qlora.model.image_only_processor import image_only_processor

    return image_only_processor(model_dir, AutoConfig.from_pretrained(model_dir).model_type,
                                AutoTokenizer.from_pretrained(model_dir))


def render(processor, messages: list, **kwargs) -> str:
    """The folder's chat template on ``messages`` (``processor.apply_chat_template``'s text; SmolVLM's reads its
    video processor, which an image-only processor lacks)."""
    return processor.tokenizer.apply_chat_template(messages, chat_template=processor.chat_template, tokenize=False,
                                                   **kwargs)


def build_paligemma(out_dir: str | Path, text_model: str, sliding_window: int) -> Path:
    """A tiny PaliGemma (``text_model`` "gemma") or PaliGemma 2 ("gemma2": Gemma 2 text layers, one of them
    sliding-window of ``sliding_window`` tokens) in ``out_dir``."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    out = build_image_model(out_dir, "paligemma")
    if text_model == "gemma2":
        config = AutoConfig.from_pretrained(out)
        text = dict(config.text_config.to_dict(), model_type="gemma2", sliding_window=sliding_window,
                    query_pre_attn_scalar=16, hidden_activation="gelu_pytorch_tanh",
                    layer_types=["sliding_attention", "full_attention"])
        config = AutoConfig.for_model("paligemma", text_config=text, vision_config=config.vision_config.to_dict(),
                                      projection_dim=config.projection_dim, image_token_index=config.image_token_id)
        torch.manual_seed(0)
        AutoModelForImageTextToText.from_config(config).save_pretrained(out)
    return out
