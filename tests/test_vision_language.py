"""Vision-language checkpoints (Gemma 3, Mistral 3, LLaVA, Qwen2.5-VL) fine-tuned on text.

qlora builds the class transformers gives such a config, quantizes the language
model only, adapts only it, and keeps the vision tower and projector 16-bit and
exact through merge, 4-bit export and GGUF export (which, as llama.cpp's
converter, writes the language model).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from qlora.cli.main import main
from qlora.errors import UsageError
from qlora.model.adapter_io import load_adapter, save_adapter
from qlora.model.inject import add_lora
from qlora.model.load import load_model
from qlora.model.quantize import kept_dense_names, non_text_names, quantize_model
from qlora.nn import Linear4bit, LoraLinear
from bnb_oracle import reference_path
from random_adapters import randomize_lora_b
from vision_language import build_tiny_vlm

KINDS = ("gemma3", "mistral3", "llava", "qwen2_5_vl", "llama4")
# transformers 5.24's last vision-language families, language model beside their towers
LATER_KINDS = ("ernie4_5_vl_moe", "granite4_vision", "dots3_note", "janus", "muse_glimmer", "muse_spark")
IDS = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64, 5, 120]])


@pytest.fixture(scope="module")
def vlms(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("vlm")
    return {kind: build_tiny_vlm(root / kind, tiny_tokenizer, kind) for kind in KINDS + ("mllama",)}


def _transformers_model(model_dir):
    """The whole model, vision tower included (Llama 4's AutoModelForCausalLM would drop it)."""
    return AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()


def _under(path: str, towers: set[str]) -> bool:
    return any(path.startswith(t + ".") for t in towers)


@torch.no_grad()
@pytest.mark.parametrize("kind", KINDS)
def test_language_model_is_4bit_and_towers_stay_exact(vlms, kind):
    _check_4bit_language_model_and_exact_towers(vlms[kind])


@torch.no_grad()
@pytest.mark.parametrize("kind", LATER_KINDS)
def test_later_families_language_model_is_4bit_and_towers_stay_exact(kind, tmp_path, tiny_tokenizer):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if kind not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"this transformers has no {kind} models")
    _check_4bit_language_model_and_exact_towers(build_tiny_vlm(tmp_path / kind, tiny_tokenizer, kind))


def _check_4bit_language_model_and_exact_towers(model_dir):
    ref = _transformers_model(model_dir)
    try:
        expected = ref(IDS).logits
    except AttributeError as exc:  # 5.24's Llama4ForConditionalGeneration reads a field its text model lacks
        pytest.skip(f"transformers {transformers.__version__}'s own {type(ref).__name__} fails on any input: {exc}")
    dense, _ = load_model(model_dir, quant=None, compute_dtype=torch.float32, device="cpu")
    assert type(dense) is type(ref)
    assert torch.equal(dense(IDS).logits, expected)

    model, _ = load_model(model_dir, quant="nf4", compute_dtype=torch.float32, device="cpu")
    towers = non_text_names(model)
    assert towers and all(not t.endswith("language_model") for t in towers)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, Linear4bit))}
    tower_linears = [n for n in linears if _under(n, towers)]
    assert tower_linears and all(isinstance(linears[n], nn.Linear) for n in tower_linears)
    state = ref.state_dict()
    for n in tower_linears:
        assert torch.equal(linears[n].weight, state[n + ".weight"])
    text = [n for n in linears if not _under(n, towers) and n not in kept_dense_names(model)]  # head, routers
    assert text and all(isinstance(linears[n], Linear4bit) for n in text)
    quantize_model(ref, compute_dtype=torch.float32)  # in memory: the same layers, the same codes
    assert torch.allclose(model(IDS).logits, ref(IDS).logits, atol=1e-5)


def _image_row(kind: str, model) -> tuple[torch.Tensor, dict]:
    """Token ids and image tensors of one row with a 56x56 image, as the family's processor writes them: its PIL
    image processor's tensors, the image tokens its forward fills (ids after the 8 of the tiny vocabulary), and
    Ernie's token modalities (1 on image tokens; its experts' routing counts the start and end tokens too)."""
    import numpy as np
    from PIL import Image

    image = Image.fromarray((np.random.RandomState(0).rand(56, 56, 3) * 255).astype("uint8"))
    v = model.config.get_text_config().vocab_size - 8
    if kind == "granite4_vision":
        media = dict(transformers.LlavaNextImageProcessorPil(
            size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}, image_grid_pinpoints=[[56, 56]])(
            images=[image], return_tensors="pt"))
        count = sum(len(f) for f in model.model.get_image_features(**media).deepstack_features[0][1])
        return torch.tensor([[5, 6] + [v] * count + [7, 8, 9]]), media
    processor = (transformers.Ernie4_5_VLMoeImageProcessorPil(size={"shortest_edge": 28 * 28, "longest_edge": 56 * 56})
                 if kind == "ernie4_5_vl_moe" else transformers.Qwen2VLImageProcessorPil(
                     min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14, merge_size=2, temporal_patch_size=1))
    media = dict(processor(images=[image], return_tensors="pt"))
    count = int(media["image_grid_thw"].prod()) // 4  # 2x2 patches merged into one token
    if kind == "dots3_note":
        return torch.tensor([[5, 6] + [v] * count + [7, 8, 9]]), media
    ids = torch.tensor([[5, 6, v + 1] + [v] * count + [v + 2, 7, 8]])
    return ids, media | {"mm_token_type_ids": (ids == v).long(), "moe_mm_token_type_ids": (ids >= v).long()}


@torch.no_grad()
@pytest.mark.parametrize("kind", ["ernie4_5_vl_moe", "dots3_note", "granite4_vision"])
def test_an_image_row_through_the_later_families_is_transformers_own(kind, tmp_path, tiny_tokenizer):
    """Ernie 4.5-VL routes image tokens to experts of their own and places them by 3-D rotary positions,
    dots3-note's vision tower holds experts of its own (kept 16-bit with the tower) and Granite 4
    Vision injects image features into chosen language-model layers: a row with an image through the 4-bit model
    gives transformers' logits on the same 4-bit codes, and with an adapter PEFT's."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from peft import PeftModel

    if kind not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"this transformers has no {kind} models")
    src = build_tiny_vlm(tmp_path / kind, tiny_tokenizer, kind)
    ref = _transformers_model(src)
    ids, media = _image_row(kind, ref)
    assert (ref(ids, **media).logits - ref(ids).logits).abs().max() > 1e-4  # the image matters
    model, _ = load_model(src, quant="nf4", compute_dtype=torch.float32, device="cpu")
    quantize_model(ref, compute_dtype=torch.float32)  # in memory: the same layers, the same codes
    assert torch.allclose(model(ids, **media).logits, ref(ids, **media).logits, atol=1e-5)

    dense, _ = load_model(src, quant=None, compute_dtype=torch.float32, device="cpu")
    add_lora(dense, r=4, verbose=False)
    randomize_lora_b(dense, seed=0)
    save_adapter(dense, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(_transformers_model(src), str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(dense.eval()(ids, **media).logits, theirs(ids, **media).logits, atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("kind", ["gemma3", "qwen2_5_vl"])
@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj", "fc1"]])
def test_only_the_language_model_is_adapted_and_peft_reads_the_adapter(vlms, kind, targets, tmp_path):
    from peft import PeftModel

    model, _ = load_model(vlms[kind], quant=None, compute_dtype=torch.float32, device="cpu")
    towers = non_text_names(model)
    if isinstance(targets, list) and kind == "qwen2_5_vl":
        targets = ["q_proj", "v_proj", "qkv"]  # its vision blocks' fused attention; not in the language model
    if isinstance(targets, list):
        with pytest.raises(UsageError, match="match no linear layer"):  # vision-only names match nothing
            add_lora(model, r=4, target_modules=targets, verbose=False)
        targets = targets[:2]
    add_lora(model, r=4, alpha=8, dropout=0.0, target_modules=targets, verbose=False)
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    assert adapted and not any(_under(n, towers) for n in adapted)
    assert all(".language_model." in n for n in adapted)
    randomize_lora_b(model, seed=0)
    save_adapter(model, tmp_path / "adapter")

    theirs = PeftModel.from_pretrained(_transformers_model(vlms[kind]), str(tmp_path / "adapter")).eval()
    ours = model.eval()(IDS).logits
    assert (ours - _transformers_model(vlms[kind])(IDS).logits).abs().max() > 1e-3  # the adapter matters
    assert torch.allclose(theirs(IDS).logits, ours, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_a_layer_directly_under_the_language_model_is_in_the_adapters_targets(tmp_path, tiny_tokenizer):
    """Nemotron-H Omni's language model is a whole causal LM, its lm_head a direct child of language_model, which
    all-linear adapts (as PEFT's all-linear does: the model names no output embeddings). The scoped regex written
    as target_modules required a further level (``language_model\\..*\\.lm_head``), so PEFT left lm_head's
    trained adapter out and its logits differed; every adapted layer is now in it."""
    from peft import PeftModel
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if "nemotron_h_omni" not in CONFIG_MAPPING_NAMES:
        pytest.skip("this transformers has no Nemotron-H Omni")
    v = len(tiny_tokenizer)
    text = dict(vocab_size=v + 8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, intermediate_size=128, layers_block_type=["linear_attention", "full_attention"],
                mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8, n_groups=1, chunk_size=8,
                n_routed_experts=4, moe_intermediate_size=32, moe_shared_expert_intermediate_size=32,
                max_position_embeddings=256, pad_token_id=tiny_tokenizer.pad_token_id)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14,
                  video_temporal_patch_size=2)
    config = AutoConfig.for_model("nemotron_h_omni", text_config=text, vision_config=vision, vision_hidden_size=32,
                                  projector_hidden_size=64)
    torch.manual_seed(0)
    ref = AutoModelForImageTextToText.from_config(config).eval()
    ref.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    model, _ = load_model(tmp_path / "m", quant=None, compute_dtype=torch.float32, device="cpu")
    add_lora(model, r=4, alpha=8, dropout=0.0, verbose=False)
    adapted = {n for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    assert "language_model.lm_head" in adapted
    randomize_lora_b(model, seed=0)
    save_adapter(model, tmp_path / "adapter")
    target = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert {n for n in adapted if re.fullmatch(target, n)} == adapted, target

    theirs = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tmp_path / "m"),
                                       str(tmp_path / "adapter")).eval()
    assert torch.allclose(theirs(IDS).logits, model.eval()(IDS).logits, atol=1e-5, rtol=1e-5)


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def test_train_merge_quantize_and_gguf_keep_the_vision_tower(vlms, tmp_path, capsys):
    """The CLI path end to end on Mistral 3 (which AutoModelForCausalLM does not take)."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("gguf")
    src = vlms["mistral3"]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {w}."},
                                                    {"role": "assistant", "content": f"{w} {w} {w}."}]}) + "\n"
                            for w in ("red", "green", "blue", "gold") * 4))
    adapter = tmp_path / "adapter"
    assert main(["train", "--model", str(src), "--data", str(data), "--output", str(adapter), "--max-steps", "12",
                 "--lr", "3e-3", "--batch-size", "4", "--seq-len", "64", "--no-progress"]) == 0
    losses = [json.loads(line)["loss"] for line in (adapter / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses[-1] < losses[0]

    torch.set_grad_enabled(False)  # inference from here; pytest restores nothing, so undone below
    try:
        _check_outputs(src, adapter, tmp_path, capsys)
    finally:
        torch.set_grad_enabled(True)


def _merged_beside_adapted(src, adapter, out):
    """(the 4-bit model with ``adapter``, ``qlora merge``'s float32 output at ``out`` read by transformers, the
    adapted logits on IDS), the merged model checked to give those logits."""
    model, _ = load_model(src, quant="nf4", compute_dtype=torch.float32, device="cpu")
    load_adapter(model, adapter)
    adapted = model.eval()(IDS).logits
    assert main(["merge", "--model", str(src), "--adapter", str(adapter), "--output", str(out),
                 "--dtype", "float32"]) == 0
    merged = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    assert torch.allclose(merged(IDS).logits, adapted, atol=1e-4)
    return model, merged, adapted


def _check_outputs(src, adapter, tmp_path, capsys):
    _, merged, adapted = _merged_beside_adapted(src, adapter, tmp_path / "m")
    original, written = _tensors(src), merged.state_dict()
    vision = [k for k in original if k.startswith(("vision_tower.", "multi_modal_projector."))]
    assert vision and all(torch.equal(written["model." + k], original[k]) for k in vision)

    assert main(["quantize", "--model", str(src), "--output", str(tmp_path / "q4")]) == 0
    skip = json.loads((tmp_path / "q4" / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]
    assert "model.vision_tower" in skip and "model.multi_modal_projector" in skip
    bnb = AutoModelForImageTextToText.from_pretrained(tmp_path / "q4", device_map="cpu", dtype=torch.float32)
    assert type(bnb.model.vision_tower.transformer.layers[0].attention.q_proj) is nn.Linear
    ours_q4, _ = load_model(tmp_path / "q4", compute_dtype=torch.float32, device="cpu")
    base, _ = load_model(src, compute_dtype=torch.float32, device="cpu")
    ours, theirs, before = ours_q4(IDS).logits, bnb(IDS).logits.float(), base(IDS).logits
    assert (ours - theirs).abs().max() < 1e-2 * theirs.abs().max()  # one file, two readers (bitsandbytes in bf16)
    assert (ours - before).abs().max() < 2e-2 * before.abs().max()  # its 16-bit tensors are bfloat16

    capsys.readouterr()
    assert main(["export", "--model", str(src), "--adapter", str(adapter), "--output", str(tmp_path / "g"),
                 "--type", "f32"]) == 0
    gguf_file = next((tmp_path / "g").glob("*.gguf"))
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file=gguf_file.name, dtype=torch.float32)
    assert torch.allclose(back.eval()(IDS).logits, adapted, atol=1e-4)


_TEXT = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
             vocab_size=300)
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
               patch_size=14)


@pytest.mark.parametrize("kind, config, text, towers", [
    ("idefics2", dict(text_config=dict(_TEXT, model_type="mistral"), vision_config=_VISION,
                      perceiver_config=dict(hidden_size=64, resampler_n_latents=4, resampler_depth=1,
                                            resampler_n_heads=2, resampler_head_dim=8, num_key_value_heads=1)),
     "text_model", {"vision_model", "connector"}),
    ("idefics3", dict(text_config=dict(_TEXT, model_type="llama"), vision_config=_VISION), "text_model",
     {"vision_model", "connector"}),
    ("smolvlm", dict(text_config=dict(_TEXT, model_type="llama"), vision_config=_VISION), "text_model",
     {"vision_model", "connector"}),
    ("deepseek_vl", dict(text_config=dict(_TEXT, model_type="llama"),
                         vision_config=dict(_VISION, model_type="siglip_vision_model")), "language_model",
     {"vision_model", "aligner"})])
def test_the_text_decoder_beside_the_towers_is_found(kind, config, text, towers):
    """Bodies holding the text decoder beside the vision tower with no ``get_decoder`` of their own: transformers
    4.x's returns the whole body, and qlora still finds the text model in it (the towers kept 16-bit and out of
    LoRA's reach, images accepted)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    from qlora.model.quantize import text_decoder_path

    if kind not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"this transformers has no {kind} models")
    model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(kind, **config))
    assert model.get_submodule(f"model.{text}").get_input_embeddings() is model.get_input_embeddings()
    assert text_decoder_path(model) == f"model.{text}"
    assert non_text_names(model) == {f"model.{t}" for t in towers}


def test_estimate_counts_the_towers_as_16_bit(vlms):
    from transformers import AutoConfig

    from qlora.model.estimate import count_parameters

    counts = count_parameters(AutoConfig.from_pretrained(vlms["llava"]))
    assert counts.linears and all(".language_model." in lin.name for lin in counts.linears)
    tower = sum(p.numel() for n, p in AutoModelForImageTextToText.from_pretrained(vlms["llava"]).named_parameters()
                if n.startswith(("model.vision_tower.", "model.multi_modal_projector.")))
    assert sum(counts.other_tensors) > tower


def test_a_model_that_does_not_generate_text_is_refused(tmp_path, tiny_tokenizer, capsys):
    from transformers import T5Config, T5ForConditionalGeneration

    T5ForConditionalGeneration(T5Config(vocab_size=len(tiny_tokenizer), d_model=32, d_ff=64, num_layers=1,
                                        num_heads=2, d_kv=16)).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "'t5' is not a text-generating model" in err and "Traceback" not in err


def test_a_transformers_release_whose_own_forward_fails_is_named_not_a_traceback(vlms, tmp_path, capsys):
    """transformers 5.24's Llama4ForConditionalGeneration reads ``image_outputs`` from its text model's output,
    which has none, on any input: generate, train and eval say that the installed transformers' own forward
    failed and to use another release, exit 2, and print no traceback."""
    try:
        with torch.no_grad():
            _transformers_model(vlms["llama4"])(IDS)
    except AttributeError:
        pass
    else:
        pytest.skip(f"transformers {transformers.__version__}'s own Llama 4 forward runs")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "The quick brown fox jumps over the lazy dog."}\n' * 2)
    model = ["--model", str(vlms["llama4"])]
    for argv in (["generate", *model, "--prompt", "Hello", "--max-new-tokens", "2", "--template", "none"],
                 ["train", *model, "--data", str(data), "--output", str(tmp_path / "out"), "--max-steps", "1",
                  "--no-progress"],
                 ["eval", *model, "--data", str(data)]):
        assert main(argv) == 2, argv
        out = capsys.readouterr()
        assert (f"the installed transformers' own forward failed for this model (transformers "
                f"{transformers.__version__}, models/llama4/modeling_llama4.py)") in out.err, out.err
        assert "install another transformers release" in out.err and "Traceback" not in out.err
        assert out.out == "" or argv[0] != "generate"


@torch.no_grad()
def test_a_bitsandbytes_checkpoint_with_a_4bit_vision_tower_loads_as_written(vlms, tmp_path):
    """transformers + bitsandbytes packs the vision tower too, unless told to skip it: qlora reads
    which layers are packed from the file, not from a skip list spelled for some loader."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    theirs = AutoModelForImageTextToText.from_pretrained(vlms["llava"], quantization_config=bnb, device_map="cpu",
                                                         dtype=torch.float32).eval()
    theirs.save_pretrained(tmp_path)
    for f in vlms["llava"].glob("tokenizer*"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    ours, _ = load_model(tmp_path, compute_dtype=torch.float32, device="cpu")
    tower_q = [m for n, m in ours.model.vision_tower.named_modules() if n.endswith("self_attn.q_proj")]  # 4.x
    assert tower_q and all(isinstance(m, Linear4bit) for m in tower_q)  # nests the CLIP encoder one level deeper
    assert isinstance(ours.model.language_model.layers[0].self_attn.q_proj, Linear4bit)
    assert torch.allclose(ours(IDS).logits, reference_path(theirs)(IDS).logits, atol=1e-5)


def test_layers_only_images_reach_keep_zero_adapters(vlms, tmp_path):
    """Llama 3.2 Vision's cross-attention layers sit in the language model but read only image
    states: on text they get no gradient, so their adapters stay zero while the rest train."""
    from safetensors.torch import load_file

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"{w} is a colour and {w} is a word."}) + "\n"
                            for w in ("red", "green", "blue", "gold")))
    out = tmp_path / "adapter"
    assert main(["train", "--model", str(vlms["mllama"]), "--data", str(data), "--output", str(out),
                 "--max-steps", "2", "--seq-len", "32", "--no-progress"]) == 0
    tensors = load_file(out / "adapter_model.safetensors")
    cross = [v for k, v in tensors.items() if ".cross_attn." in k and "lora_B" in k]
    self_attn = [v for k, v in tensors.items() if ".self_attn." in k and "lora_B" in k]
    assert cross and all(not v.any() for v in cross)
    assert self_attn and all(v.any() for v in self_attn)


def test_a_vision_tower_inside_the_text_model_stays_16bit_and_unadapted(tmp_path, tiny_tokenizer):
    """GIT's image encoder is a child of its text model (``git.image_encoder`` beside ``git.encoder``), not a
    sibling: it was quantized and adapted by all-linear (adapters text never reaches). It is found as the
    module built from the vision sub-config: 16-bit and equal to transformers', and out of LoRA. The
    adapter names its projection's ``visual_projection.0`` by full path (PEFT would read ``0`` as every
    ``layers.0`` too and fail), and PEFT reads it as qlora runs it."""
    from peft import PeftModel
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        "git", vocab_size=len(tiny_tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=256, pad_token_id=tiny_tokenizer.pad_token_id,
        bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "git")
    tiny_tokenizer.save_pretrained(tmp_path / "git")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "git", dtype=torch.float32).eval()
    model, _ = load_model(tmp_path / "git", compute_dtype=torch.float32, device="cpu")
    assert "git.image_encoder" in non_text_names(model)
    tower = {n: m for n, m in model.named_modules() if n.startswith("git.image_encoder.")}
    linears = [n for n, m in tower.items() if isinstance(m, (nn.Linear, Linear4bit))]
    assert linears and all(type(tower[n]) is nn.Linear for n in linears)
    state = ref.state_dict()
    assert all(torch.equal(tower[n].weight, state[n + ".weight"]) for n in linears)
    assert isinstance(model.git.encoder.layer[0].attention.self.query, Linear4bit)

    add_lora(model, r=4, alpha=8, dropout=0.0, verbose=False)
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    assert adapted and not any(n.startswith("git.image_encoder.") for n in adapted)
    model.train()
    ids = IDS.clamp(max=len(tiny_tokenizer) - 1)
    logits = model(ids).logits  # GIT's own loss needs images (transformers slices off image positions)
    nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).backward()
    assert all(m.lora_B["default"].weight.grad is not None for n, m in model.named_modules() if n in adapted
               and not n.startswith("git.visual_projection."))  # the projection reads image features only
    randomize_lora_b(model, seed=0)
    save_adapter(model, tmp_path / "adapter")
    dense, _ = load_model(tmp_path / "git", quant=None, compute_dtype=torch.float32, device="cpu")
    load_adapter(dense, tmp_path / "adapter")
    with torch.no_grad():
        ours = dense.eval()(ids).logits
        theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "git", dtype=torch.float32),
                                           str(tmp_path / "adapter")).eval()
        assert {n.split("base_model.model.", 1)[1].rsplit(".lora_A", 1)[0] for n, _ in theirs.named_parameters()
                if ".lora_A" in n} == set(adapted)
        assert (ours - ref(ids).logits).abs().max() > 1e-3  # the adapter matters
        torch.testing.assert_close(theirs(ids).logits, ours, rtol=1e-4, atol=1e-4)


def test_a_model_that_requires_token_types_when_training_trains_on_text(tmp_path, tiny_tokenizer, capsys):
    """Molmo2's forward requires ``mm_token_type_ids`` when training (its processor returns them, 0 on every text
    token; its mask joins the tokens marked 1). qlora train and eval exited 2 saying an image or another model
    supplies that input; a batch without images now gets the processor's text value (all zeros), the loss falls,
    with --packing too, PEFT reads the adapter to the same logits, the merge keeps them, and greedy decoding is
    transformers' generate."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if "molmo2" not in CONFIG_MAPPING_NAMES:
        pytest.skip("this transformers has no Molmo2 models")
    from peft import PeftModel

    text = dict(_TEXT, num_hidden_layers=2, head_dim=16, vocab_size=len(tiny_tokenizer) + 8,
                bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
                pad_token_id=tiny_tokenizer.pad_token_id)
    config = AutoConfig.for_model("molmo2", text_config=text, vision_config=dict(_VISION, image_size=[28, 28]),
                                  adapter_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                                      vision_feature_layer=[-1]))
    torch.manual_seed(0)
    ref = AutoModelForImageTextToText.from_config(config)
    with pytest.raises(ValueError, match="mm_token_type_ids"):  # transformers' own forward, training, ids alone
        ref.train()(IDS, labels=IDS)
    with torch.no_grad():  # zeros are text: the same logits as none given
        assert torch.equal(ref.eval()(IDS).logits, ref(IDS, mm_token_type_ids=torch.zeros_like(IDS)).logits)
    src = tmp_path / "m"
    ref.save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {w}."},
                                                    {"role": "assistant", "content": f"{w} {w} {w}."}]}) + "\n"
                            for w in ("red", "green", "blue", "gold") * 4))
    for packing in ([], ["--packing"]):
        adapter = tmp_path / f"adapter{len(packing)}"
        assert main(["train", "--model", str(src), "--data", str(data), "--output", str(adapter), "--max-steps", "12",
                     "--lr", "3e-3", "--batch-size", "4", "--seq-len", "64", "--no-progress", *packing]) == 0, \
            capsys.readouterr().err
        losses = [json.loads(line)["loss"] for line in (adapter / "metrics.jsonl").read_text().splitlines()
                  if '"loss"' in line]
        assert losses[-1] < losses[0], losses
    assert main(["eval", "--model", str(src), "--adapter", str(adapter), "--data", str(data)]) == 0

    torch.set_grad_enabled(False)
    try:
        model, merged, _ = _merged_beside_adapted(src, adapter, tmp_path / "merged")
        dense, _ = load_model(src, quant=None, compute_dtype=torch.float32, device="cpu")
        load_adapter(dense, adapter)
        theirs = PeftModel.from_pretrained(_transformers_model(src), adapter).eval()(IDS).logits
        assert (theirs - ref(IDS).logits).abs().max() > 1e-3  # the adapter matters
        assert torch.allclose(theirs, dense.eval()(IDS).logits, atol=1e-5, rtol=1e-5)
        from qlora.infer.generate import SamplingOptions, stream_tokens

        eos = tiny_tokenizer.eos_token_id
        ours = list(stream_tokens(model, IDS[:, :7], SamplingOptions(max_new_tokens=8, temperature=0), {eos}))
        theirs = merged.generate(IDS[:, :7], attention_mask=torch.ones_like(IDS[:, :7]), max_new_tokens=8,
                                 do_sample=False, eos_token_id=eos, pad_token_id=tiny_tokenizer.pad_token_id)
        theirs = theirs[0, 7:].tolist()
        assert ours == (theirs[:theirs.index(eos) + 1] if eos in theirs else theirs)
    finally:
        torch.set_grad_enabled(True)


@pytest.mark.parametrize("kind", ["llava", "qwen2_5_vl"])
def test_a_peft_adapter_on_the_vision_tower_loads_saves_and_merges_as_peft(tmp_path, tiny_tokenizer, kind):
    """PEFT's all-linear adapts a vision-language model's tower and projector too (as adapters trained on images
    do): qlora adapts those layers where an adapter names them (a KeyError before), each computing what PEFT's
    does, writes them back for PEFT, and merges them into the 16-bit tower."""
    from peft import LoraConfig, PeftModel, get_peft_model

    model_dir = build_tiny_vlm(tmp_path / kind, tiny_tokenizer, kind)
    theirs = get_peft_model(_transformers_model(model_dir), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                      target_modules="all-linear"))
    theirs.eval().save_pretrained(tmp_path / "theirs")
    ours, _ = load_model(model_dir, quant=None, compute_dtype=torch.float32, device="cpu")
    towers = non_text_names(ours)
    load_adapter(ours, tmp_path / "theirs")
    tower_layers = {n: m for n, m in ours.named_modules() if isinstance(m, LoraLinear) and _under(n, towers)}
    assert len(tower_layers) > 2

    def tower_outputs(model, prefix=""):
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            return {n: model.get_submodule(prefix + n)(torch.randn(3, m.base_layer.in_features, generator=g))
                    for n, m in tower_layers.items()}

    expected = tower_outputs(theirs, "base_model.model.")
    for name, value in tower_outputs(ours).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-5, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, rtol=1e-5, atol=1e-5)
    save_adapter(ours, tmp_path / "ours")
    again = PeftModel.from_pretrained(_transformers_model(model_dir), str(tmp_path / "ours")).eval()
    for name, value in tower_outputs(again, "base_model.model.").items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-5, msg=name)
    assert main(["merge", "--model", str(model_dir), "--adapter", str(tmp_path / "ours"), "--output",
                 str(tmp_path / "merged"), "--quant", "none", "--dtype", "float32"]) == 0
    merged = _transformers_model(tmp_path / "merged")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in tower_layers.items():
            x = torch.randn(3, module.base_layer.in_features, generator=g)
            torch.testing.assert_close(merged.get_submodule(name)(x), expected[name], rtol=1e-5, atol=1e-5, msg=name)
