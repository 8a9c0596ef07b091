"""`qlora export` of a vision-language model: the projector file (mmproj) as llama.cpp's own encoder runs it.

The oracle is transformers' vision tower + projector on the same image. llama.cpp's CPU encoder computes two
steps in half precision whatever the file's type (measured on llama-cpp-python 0.3.36: its patch convolution
rounds the pixels and the patch weights to f16; its GELU reads an f16 table); the oracle rounds exactly there,
and the rest agrees to float32 rounding. The image is the tower's own size, so llama.cpp resizes nothing.
"""

from __future__ import annotations

import contextlib
import ctypes

import numpy as np
import pytest
import torch
from torch import nn

from image_models import build_image_model
from qlora.cli.main import main

llama_cpp = pytest.importorskip("llama_cpp")
mtmd = pytest.importorskip("llama_cpp.mtmd_cpp")
pytest.importorskip("gguf")


class _F16TableGelu(nn.Module):
    """ggml's CPU GELU: the tanh GELU of the input rounded to f16, read back from an f16 table."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(x.half().float(), approximate="tanh").half().float()


def _random_vision_weights(model_dir) -> None:
    """Random vision tower and projector weights (Gemma 3 initializes its projection to zeros)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vision_tower" in name or "multi_modal_projector" in name:
                norm = p.ndim == 1 and "norm" in name and name.endswith("weight")
                p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.ndim > 1 else 0.5) + (1.0 if norm else 0.0))
    model.save_pretrained(model_dir)


@contextlib.contextmanager
def _mtmd(text_gguf, mmproj):
    """(llama-cpp-python model, mtmd context) for the exported pair."""
    llm = llama_cpp.Llama(model_path=str(text_gguf), n_ctx=256, n_threads=2, verbose=False)
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.warmup, params.flash_attn_type = False, 2, False, 0
    ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), llm._model.model, params)
    assert ctx, "llama.cpp refused the projector file"
    try:
        yield llm, ctx
    finally:
        mtmd.mtmd_free(ctx)
        llm.close()


def _chunks(ctx, prompt: str, rgb: np.ndarray):
    """mtmd's chunks of ``prompt`` (its marker where the image goes) with ``rgb`` (H, W, 3 uint8)."""
    h, w, _ = rgb.shape
    bitmap = mtmd.mtmd_bitmap_init(w, h, (ctypes.c_ubyte * rgb.size).from_buffer_copy(rgb.tobytes()))
    text = mtmd.mtmd_input_text(prompt.encode(), len(prompt.encode()), False, True)
    chunks = mtmd.mtmd_input_chunks_init()
    assert mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (ctypes.c_void_p * 1)(bitmap), 1) == 0
    mtmd.mtmd_bitmap_free(bitmap)
    return chunks, [mtmd.mtmd_input_chunks_get(chunks, i) for i in range(mtmd.mtmd_input_chunks_size(chunks))]


def _is_image(chunk) -> bool:
    return mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE


def _mtmd_image_embeddings(text_gguf, mmproj, rgb: np.ndarray, n_embd: int) -> np.ndarray:
    """The embeddings llama.cpp's mtmd computes for ``rgb`` with the projector file."""
    with _mtmd(text_gguf, mmproj) as (_, ctx):
        chunks, parts = _chunks(ctx, f"look: {mtmd.mtmd_default_marker().decode()} ok", rgb)
        images = [c for c in parts if _is_image(c)]
        assert len(images) == 1
        assert mtmd.mtmd_encode_chunk(ctx, images[0]) == 0
        n = mtmd.mtmd_input_chunk_get_n_tokens(images[0])
        out = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(ctx), shape=(n * n_embd,)).reshape(n, n_embd).copy()
        mtmd.mtmd_input_chunks_free(chunks)
        return out


def _rounded_model(model_dir):
    """transformers' model, its vision tower rounding where llama.cpp's encoder rounds (pixels are rounded by
    the caller)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    for name, module in model.named_modules():
        if name.endswith("patch_embedding"):
            module.weight.data = module.weight.data.half().float()
        if "vision_tower" in name and hasattr(module, "activation_fn"):
            module.activation_fn = _F16TableGelu()
    return model


def _oracle(model_dir, rgb: np.ndarray) -> np.ndarray:
    """transformers' image features for ``rgb``, rounded where llama.cpp's encoder rounds."""
    from transformers import AutoProcessor

    model = _rounded_model(model_dir)
    images = AutoProcessor.from_pretrained(model_dir).image_processor
    x = (rgb.astype(np.float32) / 255 - np.float32(images.image_mean)) / np.float32(images.image_std)
    pixels = torch.from_numpy(x).permute(2, 0, 1)[None].half().float()
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixels)
    features = getattr(features, "pooler_output", features)
    features = features[0] if isinstance(features, (tuple, list)) else features
    return features.reshape(-1, model.config.get_text_config().hidden_size).numpy()


def test_gemma3_mmproj_encodes_images_as_transformers_does(tmp_path, capsys):
    model_dir = build_image_model(tmp_path / "gemma3", "gemma3")
    _random_vision_weights(model_dir)
    out = tmp_path / "out"
    assert main(["export", "--model", str(model_dir), "--output", str(out), "--type", "f32", "--quant", "none"]) == 0
    assert (out / "mmproj-f32.gguf").is_file()
    assert "--mmproj" in capsys.readouterr().out
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./model-f32.gguf\nFROM ./mmproj-f32.gguf\n" in modelfile

    rgb = (np.random.RandomState(0).rand(56, 56, 3) * 255).astype(np.uint8)  # the tower's size: no resize
    expected = _oracle(model_dir, rgb)
    got = _mtmd_image_embeddings(out / "model-f32.gguf", out / "mmproj-f32.gguf", rgb, expected.shape[1])
    assert got.shape == expected.shape == (4, 64)  # mm_tokens_per_image: 4x4 patches pooled 2x2
    error = np.abs(got - expected).max() / np.abs(expected).max()
    assert error < 1e-5, error  # measured 3.8e-7


def test_gemma3_f16_mmproj_pairs_with_a_quantized_language_model(tmp_path):
    """Any --type but f32 writes the projector in f16 (norms, embeddings and biases f32), which llama.cpp loads."""
    import gguf

    model_dir = build_image_model(tmp_path / "gemma3", "gemma3")
    _random_vision_weights(model_dir)
    out = tmp_path / "out"
    assert main(["export", "--model", str(model_dir), "--output", str(out), "--type", "q8_0", "--quant", "none"]) == 0
    reader = gguf.GGUFReader(out / "mmproj-f16.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["v.blk.0.attn_q.weight"] == types["mm.input_projection.weight"] == "F16"
    assert {types[n] for n in ("v.patch_embd.weight", "v.position_embd.weight", "v.blk.0.ln1.weight",
                               "v.blk.0.attn_q.bias", "mm.soft_emb_norm.weight")} == {"F32"}
    assert not any(name.startswith(("token_embd", "blk.")) for name in types)  # the language model is not in it
    rgb = (np.random.RandomState(1).rand(56, 56, 3) * 255).astype(np.uint8)
    expected = _oracle(model_dir, rgb)
    got = _mtmd_image_embeddings(out / "model-q8_0.gguf", out / "mmproj-f16.gguf", rgb, expected.shape[1])
    assert np.abs(got - expected).max() / np.abs(expected).max() < 5e-3  # f16 weights: measured 5.1e-4


def test_vlm_without_a_checked_projector_exports_its_language_model_and_says_why(tmp_path, capsys):
    model_dir = build_image_model(tmp_path / "llava", "llava")
    out = tmp_path / "out"
    assert main(["export", "--model", str(model_dir), "--output", str(out), "--type", "f16", "--quant", "none"]) == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["Modelfile", "model-f16.gguf"]
    err = capsys.readouterr().err
    assert "no image projector (mmproj)" in err and "LLaVA" in err
    assert (out / "Modelfile").read_text().count("FROM ") == 1


def test_a_projector_trained_whole_reaches_the_mmproj(tmp_path):
    """An adapter's projector trained whole (``modules_to_save``) is the one llama.cpp's encoder runs, as PEFT's
    merged model has it. (qlora puts no LoRA on the vision tower: text training never reaches it.)"""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model_dir = build_image_model(tmp_path / "gemma3", "gemma3")
    _random_vision_weights(model_dir)
    base = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.q_proj",
                        modules_to_save=["multi_modal_projector"])
    peft_model = get_peft_model(base, config)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged_dir = tmp_path / "merged"
    peft_model.merge_and_unload().save_pretrained(merged_dir)
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja"):
        if (model_dir / name).is_file():
            (merged_dir / name).write_bytes((model_dir / name).read_bytes())

    out = tmp_path / "out"
    assert main(["export", "--model", str(model_dir), "--adapter", str(tmp_path / "adapter"), "--output", str(out),
                 "--type", "f32", "--quant", "none"]) == 0
    rgb = (np.random.RandomState(2).rand(56, 56, 3) * 255).astype(np.uint8)
    expected, unadapted = _oracle(merged_dir, rgb), _oracle(model_dir, rgb)
    got = _mtmd_image_embeddings(out / "model-f32.gguf", out / "mmproj-f32.gguf", rgb, expected.shape[1])
    scale = np.abs(expected).max()
    assert np.abs(expected - unadapted).max() / scale > 1e-2  # the adapter changes the embeddings
    assert np.abs(got - expected).max() / scale < 1e-5


def test_llama_cpp_greedy_tokens_with_an_image_equal_transformers_generate(tmp_path):
    """The exported pair in llama.cpp (prompt tokens, image embeddings in place, Gemma 3's bidirectional attention
    over the image) generates transformers' greedy tokens."""
    from PIL import Image
    from transformers import AutoProcessor

    from image_models import render

    model_dir = build_image_model(tmp_path / "gemma3", "gemma3")
    _random_vision_weights(model_dir)
    out = tmp_path / "out"
    assert main(["export", "--model", str(model_dir), "--output", str(out), "--type", "f32", "--quant", "none"]) == 0

    processor = AutoProcessor.from_pretrained(model_dir)
    text = render(processor, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]}],
                  add_generation_prompt=True)
    rgb = (np.random.RandomState(3).rand(56, 56, 3) * 255).astype(np.uint8)
    inputs = processor(text=[text], images=[Image.fromarray(rgb)], add_special_tokens=False, return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].half().float()
    model = _rounded_model(model_dir)
    model.generation_config.eos_token_id = None
    ids = inputs["input_ids"][0].tolist()
    expected = model.generate(**inputs, do_sample=False, max_new_tokens=12)[0, len(ids):].tolist()

    image_id = model.config.image_token_index
    boi = processor.tokenizer.convert_ids_to_tokens(model.config.boi_token_index)
    with _mtmd(out / "model-f32.gguf", out / "mmproj-f32.gguf") as (llm, ctx):
        # Gemma 3's processor writes "\n\n<start_of_image>(image)<end_of_image>\n\n" where the template has
        # <start_of_image>; mtmd writes <start_of_image> and <end_of_image> around its marker itself
        prompt = text.replace(boi, f"\n\n{mtmd.mtmd_default_marker().decode()}\n\n")
        chunks, parts = _chunks(ctx, prompt, rgb)
        seen = []
        for c in parts:
            if _is_image(c):
                seen += [image_id] * mtmd.mtmd_input_chunk_get_n_tokens(c)
            else:
                n = ctypes.c_size_t()
                tokens = mtmd.mtmd_input_chunk_get_tokens_text(c, ctypes.byref(n))
                seen += [tokens[i] for i in range(n.value)]
        assert seen == ids  # the same prompt, token for token
        lctx, n_past = llm._ctx.ctx, llama_cpp.llama_pos(0)
        assert mtmd.mtmd_helper_eval_chunks(ctx, lctx, chunks, 0, 0, 64, True, ctypes.byref(n_past)) == 0
        got = []
        for _ in range(len(expected)):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(lctx, -1), shape=(llm.n_vocab(),))
            got.append(int(logits.argmax()))
            assert llama_cpp.llama_decode(lctx, llama_cpp.llama_batch_get_one((llama_cpp.llama_token * 1)(got[-1]),
                                                                              1)) == 0
        mtmd.mtmd_input_chunks_free(chunks)
    assert got == expected
